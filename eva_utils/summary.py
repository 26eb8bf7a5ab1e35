"""The torchsummary table, without side effects on the model it describes."""

from __future__ import annotations

import contextlib
import copy
import io

import torch
import torchsummary
from torch import nn


def summary(model: nn.Module, input_size: tuple[int, ...] = (3, 32, 32)) -> str:
    """torchsummary's table for ``model`` as a string.

    torchsummary runs a forward pass in whatever mode the model is in, which would update
    BatchNorm running statistics; here the pass runs on a CPU copy, under a forked RNG, so the
    model (weights, buffers, training flag, device) and the global random state are untouched.
    """
    probe = copy.deepcopy(getattr(model, "_orig_mod", model)).cpu().float()
    buffer = io.StringIO()
    with torch.random.fork_rng(devices=[]), contextlib.redirect_stdout(buffer):
        torchsummary.summary(probe, input_size, device="cpu")
    return buffer.getvalue()


def print_summary(model: nn.Module, input_size: tuple[int, ...] = (3, 32, 32)) -> None:
    print(summary(model, input_size), end="")
