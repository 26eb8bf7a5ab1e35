"""The notebook's ``EVA_<FIELD>`` overrides and the CLI's flags read text through one parser:
a value it cannot read, or an ``EVA_`` variable that names no field, is one line naming the
variable (or flag) and what it accepts, never a bare ValueError or a silent default."""

from __future__ import annotations

import os

import pytest

from eva_utils.cli import main
from eva_utils.errors import ConfigError
from eva_utils.notebook import notebook_config

BAD_VALUES = [
    ("EPOCHS", "abc", "a whole number"),
    ("TRAIN_SIZE", "1e3", "a whole number or none"),
    ("SEED", "1.0", "a whole number"),
    ("LR", "1,5", "a number"),
    ("CHANNELS_LAST", "flase", "true or false (or 1/0, yes/no)"),
]


@pytest.fixture(autouse=True)
def _no_overrides(monkeypatch):
    """Start from an environment without EVA_ variables, whatever the caller's shell sets."""
    for variable in [v for v in os.environ if v.startswith("EVA_")]:
        monkeypatch.delenv(variable)


def config_error(monkeypatch, **variables: str) -> str:
    for name, value in variables.items():
        monkeypatch.setenv(name, value)
    with pytest.raises(ConfigError) as error:
        notebook_config()
    message = str(error.value)
    assert "\n" not in message
    return message


@pytest.mark.parametrize(("field", "text", "accepts"), BAD_VALUES)
def test_override_that_cannot_be_read_names_the_variable(field, text, accepts, monkeypatch):
    message = config_error(monkeypatch, **{f"EVA_{field}": text})
    assert message == f"EVA_{field} must be {accepts}, got {text!r}"


@pytest.mark.parametrize(("text", "value"), [("true", True), ("No", False), ("0", False)])
def test_switch_overrides_read_the_words_they_accept(text, value, monkeypatch):
    monkeypatch.setenv("EVA_CHANNELS_LAST", text)
    assert notebook_config().channels_last is value


def test_misspelt_override_is_reported_with_the_field_it_resembles(monkeypatch):
    message = config_error(monkeypatch, EVA_EPOCH="10")
    assert message.startswith("EVA_EPOCH names no Config field (did you mean EVA_EPOCHS?")
    assert "rename or unset it" in message


def test_the_notebooks_own_variables_are_no_overrides(monkeypatch, tmp_path):
    for variable in ("EVA_SMOKE", "EVA_RUN_DIR", "EVA_REFERENCE_RUN", "EVA_PRETRAINED_URL"):
        monkeypatch.setenv(variable, str(tmp_path) if variable != "EVA_SMOKE" else "0")
    monkeypatch.setenv("EVA_EPOCHS", "3")
    assert notebook_config().epochs == 3


def test_override_the_config_refuses_names_the_variable(monkeypatch):
    message = config_error(monkeypatch, EVA_EPOCHS="0")
    assert message == "epochs must be a positive integer, got 0 (the environment sets EVA_EPOCHS=0)"


@pytest.mark.parametrize(
    ("field", "text", "accepts"), [v for v in BAD_VALUES if v[0] != "CHANNELS_LAST"]
)
def test_the_cli_says_the_same_bad_values_in_one_line(field, text, accepts, capsys):
    """argparse turns the parser's ConfigError (a ValueError) into its own usage error: the
    last line names the flag and the value, and there is no traceback."""
    flag = "--" + field.lower().replace("_", "-")
    with pytest.raises(SystemExit) as exit:
        main(["train", "--data", "synthetic", f"{flag}={text}"])
    assert exit.value.code == 2
    err = capsys.readouterr().err
    assert "Traceback" not in err
    last = err.strip().splitlines()[-1]
    assert last == f"eva8 train: error: argument {flag}: invalid {field.lower()} value: {text!r}"
