"""The precision a run computes in: chosen by what the hardware computes natively (each GPU
simulated through the CUDA queries), fp16 guarded by a gradient scaler, and old configs with
the ``amp`` switch still loading."""

from __future__ import annotations

import json
import math
import platform
import warnings
from pathlib import Path

import pytest
import torch
from torch import nn

from eva_utils import notebook
from eva_utils.config import Config
from eva_utils.engine import train
from eva_utils.errors import TrainingDiverged
from eva_utils.precision import Precision, choose_precision
from eva_utils.step import Step
from tools.readme import platform_table

ROOT = Path(__file__).resolve().parents[1]
BF16, FP16, FP32 = torch.bfloat16, torch.float16, None
# GPU: (name, compute capability, what auto picks: dtype, gradient scaler, channels_last)
GPUS = {
    "T4": ("Tesla T4", (7, 5), (FP16, True, True)),
    "V100": ("Tesla V100-SXM2-16GB", (7, 0), (FP16, True, True)),
    "P100": ("Tesla P100-PCIE-16GB", (6, 0), (FP32, False, True)),
    "A100": ("NVIDIA A100-SXM4-40GB", (8, 0), (BF16, False, True)),
    "H100": ("NVIDIA H100 80GB HBM3", (9, 0), (BF16, False, True)),
}


def simulate_gpu(monkeypatch, name: str, capability: tuple[int, int]) -> None:
    """A CUDA device as torch's queries describe it. is_bf16_supported says yes, as torch's
    does on every GPU from 7.0 on (it counts emulation): the choice must not believe it."""
    monkeypatch.setattr(torch.cuda, "is_available", lambda: True)
    monkeypatch.setattr(torch.cuda, "device_count", lambda: 1)
    monkeypatch.setattr(torch.cuda, "get_device_name", lambda device=None: name)
    monkeypatch.setattr(torch.cuda, "get_device_capability", lambda device=None: capability)
    monkeypatch.setattr(torch.cuda, "is_bf16_supported", lambda including_emulation=True: True)


def simulate_cpu(monkeypatch, bf16_instructions: bool) -> None:
    monkeypatch.setattr(platform, "machine", lambda: "x86_64")
    monkeypatch.setattr(
        torch.cpu, "_is_avx512_bf16_supported", lambda: bf16_instructions, raising=False
    )


def picked(precision) -> tuple:
    return precision.dtype, precision.scaler, precision.channels_last


@pytest.mark.parametrize("gpu", GPUS)
def test_auto_picks_what_the_gpu_computes_natively(monkeypatch, gpu):
    name, capability, expected = GPUS[gpu]
    simulate_gpu(monkeypatch, name, capability)
    assert picked(choose_precision(torch.device("cuda"))) == expected


@pytest.mark.parametrize(
    ("bf16_instructions", "expected"), [(True, (BF16, False, True)), (False, (FP32, False, True))]
)
def test_auto_picks_bf16_only_on_cpus_with_bf16_instructions(
    monkeypatch, bf16_instructions, expected
):
    simulate_cpu(monkeypatch, bf16_instructions)
    assert picked(choose_precision(torch.device("cpu"))) == expected


def test_readme_platform_table_is_generated_from_the_choice():
    assert platform_table() in (ROOT / "README.md").read_text()


def emulation_note(device: str, precision: str) -> str:
    """The note for ``precision`` on ``device``, looked up when called (so that each test fails
    alone on code without it)."""
    from eva_utils import precision as module

    return module.emulation_note(torch.device(device), precision)


@pytest.mark.parametrize("gpu", ["T4", "V100", "P100"])
def test_explicit_bf16_where_it_is_emulated_runs_in_bf16_with_a_one_line_note(monkeypatch, gpu):
    name, capability, _ = GPUS[gpu]
    simulate_gpu(monkeypatch, name, capability)
    with warnings.catch_warnings():
        warnings.simplefilter("error")  # a note, not a UserWarning
        chosen = choose_precision(torch.device("cuda"), "bf16")
    assert chosen.dtype == BF16 and not chosen.scaler
    note = emulation_note("cuda", "bf16")
    assert note.startswith("note: bf16 is emulated on this cuda") and "\n" not in note


def test_explicit_bf16_on_a_cpu_without_bf16_instructions_says_so_in_a_note(monkeypatch):
    simulate_cpu(monkeypatch, bf16_instructions=False)
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        assert choose_precision(torch.device("cpu"), "bf16").dtype == BF16
    assert emulation_note("cpu", "bf16") == (
        "note: bf16 is emulated on this cpu (no bf16 instructions): training runs, slowly; "
        "precision=auto uses fp32 here"
    )


@pytest.mark.parametrize("gpu", ["A100", "H100"])
def test_explicit_bf16_where_it_is_native_has_no_note(monkeypatch, gpu):
    name, capability, _ = GPUS[gpu]
    simulate_gpu(monkeypatch, name, capability)
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        assert choose_precision(torch.device("cuda"), "bf16").dtype == BF16
    assert emulation_note("cuda", "bf16") == emulation_note("cuda", "fp16") == ""


@pytest.mark.parametrize("bf16_instructions", [True, False])
def test_explicit_fp16_on_a_cpu_says_it_is_emulated_and_slow(monkeypatch, bf16_instructions):
    simulate_cpu(monkeypatch, bf16_instructions)
    auto = "bf16" if bf16_instructions else "fp32"
    assert emulation_note("cpu", "fp16") == (
        "note: fp16 is emulated on a CPU: training runs, 8-12x slower than in fp32; "
        f"precision=auto uses {auto} here"
    )
    assert notebook.device_report("cpu", "fp16").splitlines()[1] == emulation_note("cpu", "fp16")
    assert emulation_note("cpu", "auto") == emulation_note("cpu", "fp32") == ""


@pytest.mark.parametrize("precision", ["fp16", "bf16"])
def test_training_in_an_emulated_precision_says_so_in_one_note_not_a_warning(
    precision, monkeypatch, capsys
):
    from eva_utils.training import fit

    simulate_cpu(monkeypatch, bf16_instructions=False)
    config = RESUMABLE.replace(precision=precision, epochs=1)
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        fit(config, progress=False)
    notes = [line for line in capsys.readouterr().err.splitlines() if line.startswith("note:")]
    assert len(notes) == 1 and notes[0].startswith(f"note: {precision} is emulated on ")


@pytest.mark.parametrize("gpu", GPUS)
def test_explicit_fp16_always_uses_a_gradient_scaler_on_gpus(monkeypatch, gpu):
    name, capability, _ = GPUS[gpu]
    simulate_gpu(monkeypatch, name, capability)
    assert picked(choose_precision(torch.device("cuda"), "fp16")) == (FP16, True, True)


def test_explicit_fp16_uses_a_gradient_scaler_on_the_cpu():
    assert picked(choose_precision(torch.device("cpu"), "fp16", False)) == (FP16, True, False)


def test_device_report_names_the_gpu_its_compute_capability_and_the_precision(monkeypatch):
    simulate_gpu(monkeypatch, "Tesla T4", (7, 5))
    assert notebook.device_report() == (
        "Device: CUDA (Tesla T4, compute capability 7.5); "
        "training in fp16 with a gradient scaler, channels_last"
    )


@pytest.mark.parametrize(("amp", "precision"), [(True, "auto"), (False, "fp32")])
def test_a_config_recorded_with_the_amp_switch_loads_as_its_precision(amp, precision):
    recorded = Config(precision=precision).to_dict()
    del recorded["precision"]
    assert Config.from_dict({**recorded, "amp": amp}) == Config(precision=precision)


def test_every_recorded_run_config_loads():
    for path in sorted((ROOT / "results").glob("*/metrics.json")):
        recorded = json.loads(path.read_text())["config"]
        assert Config.from_dict(recorded).precision == ("auto" if recorded["amp"] else "fp32")


# --- fp16 with a gradient scaler, on the CPU ---------------------------------------------------


def linear_model_and_batches(count: int = 3):
    torch.manual_seed(0)
    model = nn.Sequential(nn.Flatten(), nn.Linear(3 * 4 * 4, 10))
    generator = torch.Generator().manual_seed(0)
    return model, [
        (torch.randn(8, 3, 4, 4, generator=generator), torch.randint(10, (8,), generator=generator))
        for _ in range(count)
    ]


def fp16_epoch(model: nn.Module, batches) -> tuple[dict[str, float], torch.amp.GradScaler]:
    """One epoch in fp16 with a gradient scaler; returns its result and the step's scaler."""
    optimizer = torch.optim.SGD(model.parameters(), lr=0.1, momentum=0.9)
    step = Step(model, precision=Precision(torch.float16, scaler=True, channels_last=False))
    return train(model, batches, optimizer, step, progress=False), step.scaler


def test_fp16_step_whose_gradients_overflow_is_skipped_and_training_goes_on():
    """Step 2's gradients are made infinite (its loss stays finite): the scaler skips that step
    and halves its scale, the epoch ends without a divergence, and the weights are those of
    steps 1 and 3 alone (scaling by a power of two is exact, so no rounding differs)."""
    model, batches = linear_model_and_batches()
    steps = iter(range(3))
    model[1].weight.register_hook(lambda grad: grad * math.inf if next(steps) == 1 else grad)
    result, scaler = fp16_epoch(model, batches)
    assert result["images"] == 24 and math.isfinite(result["loss"])
    assert scaler.get_scale() == 65536.0 * scaler.get_backoff_factor()

    reference, _ = linear_model_and_batches()
    fp16_epoch(reference, [batches[0], batches[2]])
    torch.testing.assert_close(model.state_dict(), reference.state_dict())


def test_fp16_nan_loss_still_stops_with_the_one_line_divergence_error():
    model, batches = linear_model_and_batches()
    batches[1][0][0, 0, 0, 0] = math.nan  # the loss of step 2 is NaN
    with pytest.raises(
        TrainingDiverged, match=r"^the loss became NaN or infinite in train, step 2$"
    ):
        fp16_epoch(model, batches)


def test_fp16_autocast_really_computes_in_fp16_on_the_cpu():
    model, batches = linear_model_and_batches(1)
    with torch.autocast("cpu", dtype=torch.float16):
        assert model(batches[0][0]).dtype == torch.float16


# --- what "auto" resolved to, per epoch; a scaler state that cannot work (issue 25 item 9) ----

RESUMABLE = Config(
    data="synthetic", train_size=16, test_size=8, batch_size=8, max_batches=1, device="cpu",
    epochs=2, arch="tiny",
)  # fmt: skip


def _saved_in(config: Config, out: Path, precision: str) -> None:
    """A run folder holding epoch 1 of ``config``, recorded as trained in ``precision``."""
    from eva_utils.devices import environment
    from eva_utils.runfolder import RunFolder
    from eva_utils.state import TrainingState

    run = TrainingState(config, progress=False)
    run.history.append(
        dict(epoch=1, train_loss=2.3, train_acc=0.1, test_loss=2.3, test_acc=0.1, lr=config.lr,
             seconds=1.0, precision=precision)
    )  # fmt: skip
    RunFolder(out).save(run.state_dict(), environment(run.device))


def test_each_epoch_records_the_precision_auto_resolved_to(tmp_path):
    from eva_utils.training import fit

    history = fit(RESUMABLE, out=tmp_path / "run", progress=False)
    resolved = choose_precision(torch.device("cpu")).name
    assert [row["precision"] for row in history] == [resolved, resolved]


def test_a_resume_that_changes_the_resolved_precision_says_so_in_one_line(tmp_path, capsys):
    from eva_utils.training import fit

    resolved = choose_precision(torch.device("cpu")).name
    other = "fp16" if resolved != "fp16" else "bf16"  # what another machine resolved it to
    _saved_in(RESUMABLE, tmp_path / "run", other)
    history = fit(RESUMABLE, out=tmp_path / "run", resume=True, progress=False)
    assert [row["precision"] for row in history] == [other, resolved]
    lines = [line for line in capsys.readouterr().err.splitlines() if line.startswith("note:")]
    assert lines == [
        f"note: this run continues in {resolved} (precision=auto on this hardware); its epochs "
        f"up to 1 were trained in {other}"
    ]


@pytest.mark.parametrize(
    "scaler, says",
    [(lambda saved: [1.0, 2.0], "gradient scaler state is a list, not a dict"),
     (lambda saved: {**saved, "scale": math.nan}, "gradient scaler's scale is nan")],
)  # fmt: skip
def test_a_last_pt_with_an_unusable_scaler_state_is_one_checkpoint_error(scaler, says):
    from eva_utils.errors import CheckpointError
    from eva_utils.state import TrainingState

    config = RESUMABLE.replace(precision="fp16")
    saved = TrainingState(config, progress=False).state_dict()
    assert saved["scaler"]["scale"] > 0  # fp16 on this CPU: a real scaler's state
    saved["scaler"] = scaler(saved["scaler"])
    with pytest.raises(CheckpointError, match=says) as error:
        TrainingState(config, progress=False).load_state_dict(saved)
    assert "\n" not in str(error.value)
