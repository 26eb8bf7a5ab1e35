"""Colab and Kaggle: whether the notebook runs there, run folders on Google Drive that outlive
a Colab runtime, and a CIFAR-10 added to a Kaggle notebook as its input.

A rerun continues a run from its run folder, but only while the folder exists: when Colab
recycles a runtime (idle, usage limits), ``/content`` goes with it. With the notebook's
``KEEP_ON_DRIVE = True`` the run folders live on Google Drive instead, mounted at
``/content/drive`` (``EVA_DRIVE_MOUNT`` names another mount point), so that a new runtime finds
the last epoch saved there.

On Kaggle the setup cell clones the repository into ``/kaggle/working`` (whose files Kaggle keeps
with the notebook's version), so the run folders are there too; a data set added with *Add
Input* lies under ``/kaggle/input`` (``EVA8_KAGGLE_INPUT`` names another folder), read-only.
"""

from __future__ import annotations

import os
import sys
from pathlib import Path

from .errors import EvaError

DRIVE_MOUNT = "/content/drive"  # where Colab's own snippet mounts Drive
DRIVE_MOUNT_ENV = "EVA_DRIVE_MOUNT"
DRIVE_FOLDER = Path("MyDrive") / "eva8"  # the project's folder in the student's Drive
PARAMETER = "KEEP_ON_DRIVE"  # the notebook's name for the switch


KAGGLE_INPUT = "/kaggle/input"
KAGGLE_INPUT_ENV = "EVA8_KAGGLE_INPUT"
KAGGLE_GPU_ADVICE = (
    "WARNING: this Kaggle notebook has no GPU, training will be very slow. Choose "
    "Settings > Accelerator > GPU T4 x2, then Run All."
)


def in_colab() -> bool:
    return "google.colab" in sys.modules


def in_kaggle() -> bool:
    """Kaggle's kernels say so in their environment (Interactive, or Batch for a saved run)."""
    return "KAGGLE_KERNEL_RUN_TYPE" in os.environ


def kaggle_data() -> Path | None:
    """A CIFAR-10 among the Kaggle notebook's inputs: the first (by name) ``.tar.gz`` named
    like cifar10, or folder with ``train/`` and ``test/`` class folders, at most three levels
    under ``/kaggle/input``; None if there is none."""
    root = Path(os.environ.get(KAGGLE_INPUT_ENV) or KAGGLE_INPUT)
    found = []
    for depth in ("*", "*/*", "*/*/*"):
        for path in sorted(root.glob(depth)):
            cifar = "cifar" in path.name.lower() and path.name.endswith((".tar.gz", ".tgz"))
            if cifar or ((path / "train").is_dir() and (path / "test").is_dir()):
                found.append(path)
        if found:
            return found[0]
    return None


def drive_mount() -> Path:
    """Where Google Drive is (to be) mounted: ``$EVA_DRIVE_MOUNT``, else ``/content/drive``."""
    return Path(os.environ.get(DRIVE_MOUNT_ENV) or DRIVE_MOUNT)


def runs_on_drive(parent: str | Path) -> Path:
    """The folder for run folders when they are kept on Drive: Google Drive mounted (Colab
    asks for access the first time), then ``parent`` under ``MyDrive/eva8`` (an absolute
    ``parent`` stays as it is). Off Colab, ``parent`` itself, said in one line. A mount that
    fails raises EvaError in one line."""
    if not in_colab():
        print(
            f"{PARAMETER} applies only on Colab, where Google Drive can be mounted: the run "
            f"folders stay in {parent} on this machine"
        )
        return Path(parent)
    mount = drive_mount()
    try:
        from google.colab import drive

        drive.mount(str(mount))
    except Exception as error:  # Colab raises ValueError, MessageError, timeouts: one next step
        reason = str(error).strip().splitlines()[0] if str(error).strip() else type(error).__name__
        raise EvaError(
            f"could not mount Google Drive at {mount} ({reason}): allow access when Colab asks, "
            f"or set {PARAMETER} = False to keep the run folders in this runtime"
        ) from None
    if not (mount / DRIVE_FOLDER.parts[0]).is_dir():
        raise EvaError(
            f"{mount} has no {DRIVE_FOLDER.parts[0]} folder after mounting Google Drive: mount "
            f"it again with drive.mount({str(mount)!r}, force_remount=True), or set "
            f"{PARAMETER} = False"
        )
    folder = mount / DRIVE_FOLDER / parent
    print(
        f"run folders on Google Drive: {folder} (a new runtime continues from the last epoch "
        "saved there; each epoch's checkpoint takes longer to write than on the runtime's disk)"
    )
    return folder
