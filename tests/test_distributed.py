"""One run on several processes (torchrun + DistributedDataParallel, gloo on the CPU): each
rank's BatchNorm normalises its slice of the global batch, so two ranks with BatchNorm train
what one process trains with Ghost BatchNorm of two splits. Every rank runs one thread, and a
stuck collective gives up after EVA_DIST_TIMEOUT seconds, so no test waits on a dead rank."""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
import torch

from eva_utils import cli, runfolder
from eva_utils.config import Config
from eva_utils.sweeps import shard

from .conftest import cli_env, fake_checkpoint, run_cli
from .test_rank_variables import free_port

pytestmark = pytest.mark.usefixtures("one_thread")
DIST_TIMEOUT = "30"  # seconds a rank waits in a collective for a peer
ACCEPTANCE = (
    "--device", "cpu", "--data", "synthetic", "--train-size", "128", "--test-size", "64",
    "--batch-size", "32", "--epochs", "2", "--dropout", "0", "--precision", "fp32",
    "--arch", "tiny", "--quiet",
)  # fmt: skip
KEYS = ("train_loss", "train_acc", "test_loss", "test_acc")
KILLED_EPOCHS = 20


def torchrun(
    *args: str,
    cwd: Path,
    nproc: int = 2,
    program: tuple[str, ...] = ("-m", "eva_utils"),
    **options,
) -> subprocess.Popen:
    """``torchrun --standalone --nproc-per-node NPROC -m eva_utils ARGS`` (or another
    ``program``: a script) started in ``cwd``."""
    env = {**cli_env(), "EVA_DIST_TIMEOUT": DIST_TIMEOUT}
    command = [sys.executable, "-m", "torch.distributed.run", "--standalone",
               f"--nproc-per-node={nproc}", *program, *args]  # fmt: skip
    return subprocess.Popen(command, cwd=cwd, env=env, stdout=subprocess.PIPE,
                            stderr=subprocess.PIPE, text=True, **options)  # fmt: skip


def finish(process: subprocess.Popen, timeout: float = 240) -> tuple[int, str, str]:
    out, err = process.communicate(timeout=timeout)
    return process.returncode, out, err


def history(run: Path) -> list[dict]:
    rows = runfolder.read_metrics(run / runfolder.METRICS)["history"]
    return [{key: row[key] for key in ("epoch", *KEYS, "lr")} for row in rows]


def weights(run: Path) -> torch.Tensor:
    state = runfolder.load_checkpoint(run / runfolder.LAST)["model"]
    return torch.cat([v.flatten().double() for v in state.values() if v.is_floating_point()])


@pytest.fixture(scope="module")
def runs(tmp_path_factory) -> tuple[dict[str, Path], subprocess.CompletedProcess]:
    """The acceptance pair (two ranks with BatchNorm; one process with GBN of 2 splits) and the
    one-process run again with other convolution kernels (NCHW), whose distance from it is what
    float32 summation order alone moves this training by; and what the ranks' job printed (it
    shows its progress: the acceptance recipe without --quiet)."""
    folder = tmp_path_factory.mktemp("distributed")
    shown = [flag for flag in ACCEPTANCE if flag != "--quiet"]
    ranks = torchrun("train", *shown, "--norm", "bn", "--out", "ranks", cwd=folder)
    code, out, err = finish(ranks)
    assert code == 0, err
    for name, extra in (("ghost", ()), ("ghost-nchw", ("--no-channels-last",))):
        done = run_cli("train", *ACCEPTANCE, "--norm", "gbn", "--num-splits", "2", *extra,
                       "--out", name, cwd=folder)  # fmt: skip
        assert done.returncode == 0, done.stderr
    printed = subprocess.CompletedProcess(ranks.args, code, out, err)
    return {name: folder / name for name in ("ranks", "ghost", "ghost-nchw")}, printed


def test_two_ranks_with_batchnorm_train_what_one_process_with_two_ghost_batches_trains(runs):
    """The same numbers up to float32 summation order: the two ranks' gradients are summed in
    another order than one process's, and SGD amplifies any rounding difference (an activation
    within rounding of a ReLU's kink passes its gradient in one run, not in the other). So the
    bound is measured here, on this CPU, by changing only the convolution kernels (NCHW for
    channels_last: the same arithmetic, summed in another order): the ranks' losses may differ
    from the one process's by 3 times the largest relative change that makes to a loss of the
    history, their accuracies by as many images more than it, their weights by 3 times its
    distance. (One number alone is no measure: with the small network a kernel change can leave
    a loss that barely moved within 1e-6, where the ranks' summation moved it 3e-5.) Measured
    on a Xeon with AVX512-BF16, and on it with AVX2 kernels (ATEN_CPU_CAPABILITY=avx2
    ONEDNN_MAX_CPU_ISA=AVX2), seeds 0-3: the ranks moved the losses by at most 1.36 times the
    kernels' largest change (seed 1, the default; 0.07-0.81 at the others), the weights by at
    most 0.78 times their distance, each accuracy by at most one training image."""
    folders, _ = runs
    ranks, ghost, order = (history(folders[name]) for name in ("ranks", "ghost", "ghost-nchw"))
    assert len(ranks) == len(ghost) == 2
    losses = ("train_loss", "test_loss")
    spread = max(abs(o[key] - g[key]) / abs(g[key]) for o, g in zip(order, ghost) for key in losses)
    for r, g, o in zip(ranks, ghost, order):
        assert r["lr"] == g["lr"]
        for key in losses:
            assert abs(r[key] - g[key]) <= (3 * spread + 1e-6) * abs(g[key]), key
        for key, images in (("train_acc", 128), ("test_acc", 64)):
            assert abs(r[key] - g[key]) <= 3 * abs(o[key] - g[key]) + 1 / images, key
    distance = (weights(folders["ghost-nchw"]) - weights(folders["ghost"])).norm()
    assert (weights(folders["ranks"]) - weights(folders["ghost"])).norm() <= 3 * distance


def test_one_step_on_two_ranks_equals_the_ghost_batch_step_to_float32_rounding(tmp_path):
    """After one SGD step nothing has amplified rounding yet: each weight is w - lr * (g + wd *
    w), with g summed over 32 images in another order; float32 sums of n terms err by at most
    n * 1.2e-7 relative, so with lr 0.016 every weight agrees far inside 1e-6."""
    one_step = [*ACCEPTANCE[:-1], "--quiet", "--epochs", "1", "--max-batches", "1"]
    code, _, err = finish(torchrun("train", *one_step, "--norm", "bn", "--out", "r", cwd=tmp_path))
    assert code == 0, err
    done = run_cli("train", *one_step, "--norm", "gbn", "--out", "g", cwd=tmp_path)
    assert done.returncode == 0, done.stderr
    torch.testing.assert_close(weights(tmp_path / "r"), weights(tmp_path / "g"), rtol=0, atol=1e-6)


# Collectives that gloo's threads finish (and release) after the program's last line: on torch
# 2.14, ending with sys.exit here aborted 5 of 5 jobs ("terminate called without an active
# exception"), the notebook's two-process demo 2 of 12 beside a busy loop.
GLOO_LEFT_BUSY = """
import sys
import torch
import torch.distributed as dist
from eva_utils.ranks import Ranks, exit_process

ranks = Ranks.from_environment()
ranks.join(torch.device("cpu"))
model = ranks.wrap(torch.nn.Linear(4, 2), torch.device("cpu"))
model(torch.ones(3, 4)).sum().backward()
for _ in range(20):
    dist.all_reduce(torch.ones(1 << 16), async_op=True)
ranks.leave()
sys.stdout.write(f"rank {ranks.rank} done\\n")  # one write: under torchrun the ranks share a pipe
exit_process(0)
"""


def test_a_rank_that_leaves_with_collectives_in_gloos_threads_exits_cleanly(tmp_path):
    """A process that joined ranks ends without Python's shutdown (:func:`exit_process`), so no
    gloo thread releases a tensor into a finalising interpreter."""
    (tmp_path / "busy.py").write_text(GLOO_LEFT_BUSY)
    code, out, err = finish(torchrun(cwd=tmp_path, program=("busy.py",)), timeout=120)
    assert code == 0, err
    assert "terminate called" not in err
    assert sorted(out.split("\n")) == ["", "rank 0 done", "rank 1 done"]


def test_a_rank_started_without_torchrun_still_flushes_its_output(tmp_path, monkeypatch):
    """torchrun starts its workers unbuffered (``python -u``); ranks started another way (by hand,
    by a cluster's launcher) buffer what they print, and :func:`exit_process` skips the shutdown
    that would flush it, so it flushes first."""
    monkeypatch.delenv("PYTHONUNBUFFERED", raising=False)  # set where CI runs, and here
    (tmp_path / "busy.py").write_text(GLOO_LEFT_BUSY)
    rendezvous = {"WORLD_SIZE": "2", "MASTER_ADDR": "127.0.0.1", "MASTER_PORT": str(free_port()),
                  "EVA_DIST_TIMEOUT": DIST_TIMEOUT}  # fmt: skip
    ranks = [
        subprocess.Popen(
            [sys.executable, "busy.py"], cwd=tmp_path, stdout=subprocess.PIPE,
            stderr=subprocess.PIPE, text=True,
            env={**cli_env(), **rendezvous, "RANK": str(rank), "LOCAL_RANK": str(rank)},
        )
        for rank in (0, 1)
    ]  # fmt: skip
    try:
        for rank, process in enumerate(ranks):
            code, out, err = finish(process, timeout=120)
            assert (code, out) == (0, f"rank {rank} done\n"), err
    finally:
        for process in ranks:
            process.kill()


def test_only_the_main_process_writes_and_reports(runs):
    folders, _ = runs
    files = sorted(path.name for path in folders["ranks"].iterdir())
    assert files == sorted(path.name for path in folders["ghost"].iterdir())  # one set, no debris
    environment = runfolder.read_metrics(folders["ranks"] / runfolder.METRICS)["environment"]
    assert environment["world_size"] == 2
    assert environment["images_per_rank"] == environment["images_per_norm"] == 16
    assert (
        "world_size" not in runfolder.read_metrics(folders["ghost"] / "metrics.json")["environment"]
    )  # a single process records what it always did


def test_progress_is_shown_once_not_per_rank(runs):
    _, printed = runs
    for epoch in (1, 2):
        assert printed.stderr.count(f"epoch {epoch}/2:") == 1, printed.stderr
    assert printed.stderr.count("run folder:") == 1
    assert printed.stdout.count("best test accuracy") == 1


@pytest.mark.parametrize(
    ("flags", "message"),
    [
        (("--batch-size", "33"), "batch_size 33 cannot be shared by 2 processes"),
        (
            ("--train-size", "129"),
            "the last batch of each epoch holds 1 of the 129 training images",
        ),
    ],
)
def test_a_batch_the_ranks_cannot_share_is_one_line_before_any_work(tmp_path, flags, message):
    changed = list(ACCEPTANCE)
    for flag, value in zip(flags[::2], flags[1::2]):
        changed[changed.index(flag) + 1] = value
    code, _, err = finish(torchrun("train", *changed, "--norm", "bn", "--out", "run", cwd=tmp_path))
    assert code != 0
    said = [line for line in err.splitlines() if line.startswith("eva8")]
    assert len(said) == 1 and message in said[0], err  # said once, by the main process
    assert not (tmp_path / "run" / runfolder.LAST).exists()


def test_a_resume_on_another_number_of_processes_is_refused_naming_both(tmp_path, runs):
    folders, _ = runs
    run = tmp_path / "run"
    os.system(f"cp -r {folders['ranks']} {run}")
    done = run_cli("train", "--resume", str(run), "--epochs", "3", cwd=tmp_path)
    assert done.returncode == 2
    assert "trained on 2 process(es), this is 1" in done.stderr
    assert "normalise 32 images instead of 16" in done.stderr
    assert len(done.stderr.strip().splitlines()) == 1


def _rank_pid(launcher: subprocess.Popen, rank: int) -> int:
    """The process id of the worker with RANK ``rank`` among ``launcher``'s children."""
    for _ in range(600):
        children = Path(f"/proc/{launcher.pid}/task/{launcher.pid}/children")
        for pid in children.read_text().split() if children.exists() else []:
            with open(f"/proc/{pid}/environ", "rb") as file:
                if f"RANK={rank}".encode() in file.read().split(b"\0"):
                    return int(pid)
        time.sleep(0.1)
    pytest.fail(f"no worker with RANK={rank}")


@pytest.mark.skipif(not Path("/proc").is_dir(), reason="finds the rank's process in /proc")
def test_a_killed_rank_ends_the_job_and_a_resume_repeats_the_unbroken_history(tmp_path, runs):
    folders, _ = runs
    # The acceptance recipe on half its images (two batches an epoch of about 0.1-0.3 s with
    # the small network), for enough epochs that the job still trains when the kill lands.
    sizes = {"--train-size": "64", "--test-size": "32", "--epochs": str(KILLED_EPOCHS)}
    recipe = [sizes.get(before, now) for before, now in zip(("", *ACCEPTANCE), ACCEPTANCE)]
    unbroken = torchrun("train", *recipe, "--norm", "bn", "--out", "unbroken", cwd=tmp_path)
    victim = torchrun("train", *recipe, "--norm", "bn", "--out", "run", cwd=tmp_path)
    metrics = tmp_path / "run" / runfolder.METRICS
    for _ in range(1200):  # until epoch 1 is saved
        if metrics.exists() and len(json.loads(metrics.read_text())["history"]) >= 1:
            break
        time.sleep(0.1)
    os.kill(_rank_pid(victim, 1), signal.SIGKILL)
    killed = time.monotonic()
    code, _, err = finish(victim, timeout=120)
    assert code != 0 and time.monotonic() - killed < 60
    assert "local_rank: 1" in err or "rank: 1" in err, err  # torchrun names the rank
    saved = [row["epoch"] for row in runfolder.load_checkpoint(tmp_path / "run" / "last.pt")[
        "history"
    ]]  # fmt: skip
    # the last complete epochs, nothing half-written, and the job did not end on its own
    assert saved == list(range(1, len(saved) + 1)) and len(saved) < KILLED_EPOCHS, saved

    code, _, err = finish(torchrun("train", "--resume", "run", "--quiet", cwd=tmp_path))
    assert code == 0, err
    assert finish(unbroken)[0] == 0
    assert history(tmp_path / "run") == history(tmp_path / "unbroken")


def test_a_sharded_plan_is_the_whole_plan_once():
    runs = list(range(7))
    parts = [shard(runs, index, 3) for index in (1, 2, 3)]
    assert sorted(sum(parts, [])) == runs and all(parts)


SWEEP = [
    "sweep", "--data", "synthetic", "--train-size", "16", "--test-size", "8", "--batch-size",
    "8", "--max-batches", "1", "--epochs", "1", "--device", "cpu", "--quiet", "--arch", "tiny",
    "--grid", "dropout=0,0.1", "--seeds", "1,2",
]  # fmt: skip


def _cells(folder: Path) -> list[dict]:
    """A sweep.json's cells without the timings (which differ between any two runs)."""
    cells = json.loads((folder / "sweep.json").read_text())["cells"]
    return [{k: v for k, v in cell.items() if k != "seconds_per_epoch"} for cell in cells]


def test_a_sweep_in_two_shards_summarises_to_the_unsharded_sweep(tmp_path):
    """Two tasks of a job array, each one part of the plan into the same folder, then
    --summarize: the sweep.json of one unsharded sweep."""
    for part in ("1/2", "2/2"):
        done = run_cli(*SWEEP, "--shard", part, "--out", "sharded", cwd=tmp_path)
        assert done.returncode == 0, done.stderr
        assert f"(part {part[0]} of 2 of a plan of 4)" in done.stdout
    done = run_cli("sweep", "--summarize", "sharded", cwd=tmp_path)
    assert done.returncode == 0, done.stderr
    done = run_cli(*SWEEP, "--out", "whole", cwd=tmp_path)
    assert done.returncode == 0, done.stderr
    assert len(list((tmp_path / "sharded").glob("*/metrics.json"))) == 4
    assert _cells(tmp_path / "sharded") == _cells(tmp_path / "whole")


def test_parallel_runs_are_placed_on_the_visible_gpus_one_each(tmp_path, monkeypatch):
    """Four runs, two at a time, on a machine with GPUs 0 and 1: each child sees one GPU
    (CUDA_VISIBLE_DEVICES), and the two running at once see different ones."""
    from eva_utils import get_preset, sweeps

    seen: list[str] = []

    class Finished:
        returncode = 0

        def poll(self):
            return 0

    def start(command, env=None, **options):
        seen.append(env["CUDA_VISIBLE_DEVICES"])
        return Finished()

    monkeypatch.setattr(sweeps, "visible_gpus", lambda: ["0", "1"])
    monkeypatch.setattr(sweeps.subprocess, "Popen", start)
    monkeypatch.setattr(sweeps, "POLL_SECONDS", 0.0)
    base = get_preset("session8").replace(data="synthetic", epochs=1)
    runs = sweeps.plan(base, {"dropout": [0.0, 0.1]}, [1, 2], tmp_path)
    assert sweeps.train_planned(runs, parallel=2, progress=False) == []
    assert seen == ["0", "1", "0", "1"]


def test_sigterm_stops_every_rank_after_a_consistent_checkpoint(tmp_path):
    """A job scheduler's SIGTERM reaches torchrun, which passes it to every rank: the main
    process says once what the run folder holds, which is whole epochs, and the lock is free."""
    many = [*ACCEPTANCE[:-1], "--quiet"]
    many[many.index("--epochs") + 1] = "50"  # still training when the signal comes
    job = torchrun("train", *many, "--norm", "bn", "--out", "run", cwd=tmp_path)
    metrics = tmp_path / "run" / runfolder.METRICS
    for _ in range(1200):
        if metrics.exists():
            break
        time.sleep(0.1)
    job.send_signal(signal.SIGTERM)
    stopped = time.monotonic()
    code, _, err = finish(job, timeout=120)
    assert code != 0 and time.monotonic() - stopped < 60
    assert err.count("eva8: stopped in epoch") == 1, err  # the main process, once
    saved = runfolder.load_checkpoint(tmp_path / "run" / runfolder.LAST)["history"]
    assert [row["epoch"] for row in saved] == list(range(1, len(saved) + 1))
    assert runfolder.epochs_done(tmp_path / "run") == len(saved)
    assert not (tmp_path / "run" / runfolder.LOCK).exists()


# The CLI, with more arguments on rank 1 than on rank 0 (later flags win): ranks started with
# different commands, as a wrapper script or a mistyped launcher gives them.
RANK_1_ADDS = """
import os, sys
from eva_utils.cli import main
extra = {extra!r} if os.environ["RANK"] == "1" else []
sys.exit(main(sys.argv[1:] + extra))
"""


def test_ranks_given_different_settings_stop_before_any_work_naming_rank_and_settings(tmp_path):
    """Another lr, seed, train_size (the ranks would disagree on the batches per epoch and abort
    in a collective) and run folder on rank 1: one line from the main process names each."""
    script = tmp_path / "rank_1_adds.py"
    extra = ["--lr", "5", "--seed", "7", "--train-size", "64", "--out", "other"]
    script.write_text(RANK_1_ADDS.format(extra=extra))
    job = torchrun("train", *ACCEPTANCE, "--norm", "bn", "--out", "run", cwd=tmp_path,
                   program=(str(script),))  # fmt: skip
    code, _, err = finish(job, timeout=120)
    assert code != 0
    said = [line for line in err.splitlines() if line.startswith("eva8")]
    assert len(said) == 1, err
    assert said[0].startswith("eva8: error: rank 1 was started with other settings than rank 0")
    for shown in (
        "--lr 0.016 on rank 0, 5.0 on rank 1",
        "--seed 1 on rank 0, 7 on rank 1",
        "--train-size 128 on rank 0, 64 on rank 1",
        "--out run on rank 0, other on",
    ):
        assert shown in said[0], said[0]
    # the first rank to stop refused (exit status 2); none aborted in a collective (SIGABRT)
    assert "exitcode  : 2 " in err.split("Root Cause")[-1] and "SIGABRT" not in err, err
    assert not (tmp_path / "run").exists() and not (tmp_path / "other").exists()


@pytest.mark.parametrize("rank", ["0", "1"])
def test_an_interrupt_is_said_by_the_main_process_alone(monkeypatch, capsys, rank):
    """torchrun stops the other ranks (SIGTERM) when one exits with a refusal: they exit 130
    without a line of their own, which the refusal's one line would have beside it."""

    def interrupted(args):
        raise KeyboardInterrupt

    monkeypatch.setenv("RANK", rank)
    monkeypatch.setenv("WORLD_SIZE", "2")
    monkeypatch.setitem(cli.COMMANDS, "train", interrupted)
    assert cli.main(["train", "--data", "synthetic"]) == 130
    said = capsys.readouterr().err
    assert said == ("eva8: interrupted before training started: nothing was saved or changed\n"
                    if rank == "0" else "")  # fmt: skip


def test_a_resume_with_another_recipe_is_refused_once_not_by_every_rank(tmp_path):
    config = Config(data="synthetic", train_size=128, test_size=64, batch_size=32, epochs=2,
                    device="cpu", norm="bn", precision="fp32")  # fmt: skip
    fake_checkpoint(config, tmp_path / "run")
    job = torchrun("train", "--resume", "run", "--lr", "0.5", "--quiet", cwd=tmp_path)
    code, _, err = finish(job, timeout=120)
    assert code != 0
    said = [line for line in err.splitlines() if line.startswith("eva8")]
    assert len(said) == 1 and "cannot resume run with another recipe (--lr" in said[0], err
