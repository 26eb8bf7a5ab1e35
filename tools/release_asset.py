"""Write the trained model's release asset from a checkpoint: the maintainer's step behind
``make release-asset``, not part of the library. Scripts in ``tools/`` import ``eva_utils``;
``eva_utils`` never imports them.

The asset is the checkpoint with its floating-point weights in fp16 (integer counters kept),
saved in the eva8 checkpoint format and named with its sha256 prefix. It is byte for byte the
same file on every run (with the same torch version), so ``eva_utils.pretrained.SHA256``, the
digest :func:`eva_utils.pretrained.download` accepts, is the digest printed here for the
reference run's ``best.pt``.

    python tools/release_asset.py ../shared/reference-runs/session8-h100/best.pt --out dist
"""

from __future__ import annotations

import argparse
import hashlib
import io
import sys
from pathlib import Path
from typing import Any

import torch

from eva_utils.errors import CheckpointError
from eva_utils.files import atomic_write
from eva_utils.pretrained import RELEASE_TAG, SHA256, asset_name, file_sha256
from eva_utils.runfolder import load_checkpoint


def half_precision(state: dict[str, Any]) -> dict[str, Any]:
    """The checkpoint ``state`` with its floating-point weights in fp16 (integer counters kept).
    Raises CheckpointError if a weight is beyond fp16's range."""
    model = {
        name: tensor.half() if tensor.is_floating_point() else tensor
        for name, tensor in state["model"].items()
    }
    overflow = [
        name for name, t in model.items() if t.is_floating_point() and not t.isfinite().all()
    ]
    if overflow:
        raise CheckpointError(f"{overflow[0]} does not fit in fp16: keep this checkpoint in fp32")
    return {**state, "model": model}


def write_asset(source: str | Path, out: str | Path) -> Path:
    """Write the release asset of the checkpoint ``source`` (weights in fp16) into the folder
    ``out``, named with its sha256 prefix; returns its path."""
    state = half_precision(load_checkpoint(Path(source)))
    buffer = io.BytesIO()
    torch.save(state, buffer)  # the eva8 checkpoint format, as read back by load_checkpoint
    data = buffer.getvalue()
    path = Path(out) / asset_name(hashlib.sha256(data).hexdigest())
    atomic_write(path, lambda file: file.write(data))
    return path


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(
        prog="python tools/release_asset.py",
        description="Write the trained model's release asset (weights in fp16) from a checkpoint.",
    )
    parser.add_argument("checkpoint", help="an eva8 best.pt, e.g. the reference run's")
    parser.add_argument("--out", default="dist", help="folder for the asset (default: dist)")
    args = parser.parse_args(argv)
    try:
        path = write_asset(args.checkpoint, args.out)
    except CheckpointError as error:
        print(f"error: {error}", file=sys.stderr)
        return 1
    digest = file_sha256(path)
    pinned = "the pinned SHA256" if digest == SHA256 else "NOT the pinned SHA256"
    print(f"{path}: {path.stat().st_size / 1e6:.1f} MB, sha256 {digest} ({pinned})")
    print(f"attach it to the release {RELEASE_TAG} as {path.name}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
