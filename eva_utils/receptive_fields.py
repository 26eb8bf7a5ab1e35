"""Receptive fields: the theoretical field of every layer, and the effective one (Luo et al., 2016).

Theoretical field. Every tensor ``t`` computed from the input gets a geometry per spatial axis:

* ``jump``: distance, in input pixels, between two adjacent units of ``t``;
* ``rf``: how many input pixels one unit of ``t`` can see;
* ``start``: centre of the field of ``t``'s first unit, in input pixel coordinates (pixel ``i``
  has centre ``i``).

A convolution or average pool with (dilated) kernel ``k``, stride ``s`` and padding ``p`` maps
them to::

    jump_out  = jump_in * s
    rf_out    = rf_in + (k - 1) * jump_in
    start_out = start_in + ((k - 1) / 2 - p) * jump_in

and a sum (or any element-wise op) of branches sees the union of its branches' fields: with
equal centres, as in a residual block, the largest field. The geometry is followed per *tensor*,
by watching every ATen operation of one forward pass (a ``TorchDispatchMode``), so functional
code (``F.relu``, ``out + shortcut``, ``F.avg_pool2d``) is followed as exactly as modules are.
Those are the spatial ops this package's ResNets run; any other (max or adaptive pools, padding,
cropping, upsampling, transposed convolutions, broadcasts) is refused, not guessed.

Effective field. Only part of the theoretical field matters in practice: the gradient of one
output unit with respect to the input falls off roughly like a Gaussian from the centre. The
map :func:`effective_receptive_field` returns is that gradient, averaged over many images.
"""

from __future__ import annotations

import copy
from collections.abc import Iterable, Sequence
from dataclasses import dataclass
from functools import partial

import torch
from torch import Tensor, nn
from torch.utils._python_dispatch import TorchDispatchMode
from torch.utils._pytree import tree_leaves

from .progress import bar

Size = tuple[int, ...]

# Modules torchsummary leaves out of its table: containers whose output is a child's output.
_CONTAINERS = (nn.Sequential, nn.ModuleList, nn.ModuleDict)


@dataclass(frozen=True)
class RFRow:
    """One layer's output. Geometry tuples have one entry per spatial axis: (height, width).

    ``kernel`` (the dilated extent), ``stride`` and ``padding`` (before the first pixel) are
    those of the convolution or pool that the layer itself runs, ``None`` for layers that
    run none (norms, activations, blocks). ``output_shape`` leaves out the batch dimension.
    """

    name: str
    type: str
    output_shape: Size
    kernel: Size | None
    stride: Size | None
    padding: Size | None
    jump: Size
    rf: Size
    start: tuple[float, ...]

    @property
    def units(self) -> Size:
        """Output units per spatial axis (1 each once the spatial layout is flattened away)."""
        dims = len(self.rf)
        spatial = len(self.output_shape) == dims + 1  # (C, H, W), not a flattened (features,)
        return tuple(self.output_shape[1:]) if spatial else (1,) * dims

    def centre(self, index: Sequence[int] | None = None) -> tuple[float, ...]:
        """Centre of the field of the unit at ``index`` (default: the middle unit ``n // 2``)."""
        index = tuple(n // 2 for n in self.units) if index is None else tuple(index)
        return tuple(s + i * j for s, i, j in zip(self.start, index, self.jump))

    def covers(self, image: Size, every_unit: bool = False) -> bool:
        """Whether some unit's field (or, with ``every_unit``, every unit's) contains every
        pixel of an image of ``image`` = (height, width) pixels."""
        axes = zip(self.start, self.jump, self.rf, self.units, image)
        for start, jump, rf, units, length in axes:
            half = (rf - 1) / 2
            centres = [start + i * jump for i in range(units)]
            ok = [c - half <= 0 and c + half >= length - 1 for c in centres]
            if not (all(ok) if every_unit else any(ok)):
                return False
        return True


@dataclass(frozen=True)
class _Field:
    """The geometry of one tensor; ``size`` is None once the spatial layout is gone."""

    jump: tuple[int, ...]
    rf: tuple[int, ...]
    start: tuple[float, ...]
    size: Size | None

    def apply(self, kernel: Size, stride: Size, padding: Size, size: Size | None) -> _Field:
        return _Field(
            tuple(j * s for j, s in zip(self.jump, stride)),
            tuple(r + (k - 1) * j for r, k, j in zip(self.rf, kernel, self.jump)),
            tuple(
                st + ((k - 1) / 2 - p) * j
                for st, k, p, j in zip(self.start, kernel, padding, self.jump)
            ),
            size,
        )

    def collapse(self, size: Size | None) -> _Field:
        """Every unit merged into one (global pooling, flattening): a kernel as large as the map."""
        if self.size is None:  # already one unit
            return _Field(self.jump, self.rf, self.start, size)
        return self.apply(self.size, self.size, (0,) * len(self.size), size)


def _union(fields: Sequence[_Field], size: Size | None) -> _Field:
    """The field of an element-wise op of ``fields`` laid out alike (a residual sum): per axis,
    the union of the first units' fields."""
    dims = len(fields[0].rf)
    jump = tuple(max(f.jump[d] for f in fields) for d in range(dims))
    low = [min(f.start[d] - (f.rf[d] - 1) / 2 for f in fields) for d in range(dims)]
    high = [max(f.start[d] + (f.rf[d] - 1) / 2 for f in fields) for d in range(dims)]
    rf = tuple(round(h - lo) + 1 for lo, h in zip(low, high))
    start = tuple((lo + h) / 2 for lo, h in zip(low, high))
    return _Field(jump, rf, start, size)


def _per_axis(value: Sequence[int], dims: int) -> Size:
    """An ATen size argument (one int for every axis, or one per axis) as ``dims`` ints."""
    return tuple(value) * dims if len(value) == 1 else tuple(value)


def _is_leaf(module: nn.Module) -> bool:
    return next(module.children(), None) is None


@dataclass(frozen=True)
class _Op:
    """A spatial operation seen during the trace: its name and its parameters per axis."""

    name: str
    kernel: Size
    stride: Size
    padding: Size


class _Tracer(TorchDispatchMode):
    """Follows the geometry of every tensor computed from the input, and records rows."""

    def __init__(self, model: nn.Module, dims: int) -> None:
        super().__init__()
        self.dims = dims
        # id(tensor) -> (tensor, field, the spatial op that computed it); the tensor is kept so
        # that its id is never reused.
        self.fields: dict[int, tuple[Tensor, _Field, _Op | None]] = {}
        self.rows: list[RFRow] = []
        self.every_module: dict[str, RFRow] = {}  # containers included
        self.stack: list[tuple[str, nn.Module]] = []
        self.root = model

    # --- fields of tensors ---

    def field(self, tensor: Tensor) -> _Field | None:
        entry = self.fields.get(id(tensor))
        return entry[1] if entry is not None and entry[0] is tensor else None

    def track(self, tensor: Tensor, field: _Field, op: _Op | None = None) -> None:
        """``op`` None: an element-wise op, also one in place (``relu_`` on a conv's output)."""
        self.fields[id(tensor)] = (tensor, field, op)

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        kwargs = kwargs or {}
        out = func(*args, **kwargs)
        fields = [self.field(t) for t in tree_leaves((args, kwargs)) if isinstance(t, Tensor)]
        inputs = [f for f in fields if f is not None]  # None: a weight, a buffer, a constant
        outputs = [t for t in tree_leaves(out) if isinstance(t, Tensor)]
        if not inputs or not outputs:
            return out
        name = func.overloadpacket.__name__
        spatial = outputs[0].ndim >= self.dims + 2  # (N, C, *axes); else flattened away
        size = tuple(outputs[0].shape[-self.dims :]) if spatial else None
        op = self.spatial_op(name, args)
        if op is not None:
            field = inputs[0].apply(op.kernel, op.stride, op.padding, size)
        else:
            field = self.elementwise(name, inputs, size)
        for tensor in outputs:
            self.track(tensor, field, op)
        if op is not None:
            self.add_functional_row(op, outputs[0], field)
        return out

    def spatial_op(self, name: str, args) -> _Op | None:
        """The kernel, stride and padding of a convolution or average pool (None for any other
        op). Other pools are refused: guessing them element-wise would understate the field."""
        d = self.dims
        if name == "convolution":
            if args[6]:  # transposed: its stride spreads units apart instead of merging them
                raise NotImplementedError("receptive_field cannot follow transposed convolutions")
            weight, stride, padding, dilation = args[1], args[3], args[4], args[5]
            kernel = tuple(dl * (k - 1) + 1 for k, dl in zip(weight.shape[2:], dilation))
            return _Op("conv", kernel, tuple(stride), tuple(padding))
        if name == f"avg_pool{d}d":
            kernel = _per_axis(args[1], d)
            stride = _per_axis(args[2], d) if len(args) > 2 and args[2] else kernel
            padding = _per_axis(args[3], d) if len(args) > 3 else (0,) * d
            return _Op(name, kernel, stride, padding)
        if "pool" in name:  # max_pool2d_with_indices, _adaptive_avg_pool2d, avg_pool3d...
            raise NotImplementedError(
                f"receptive_field cannot follow {name.lstrip('_')}: "
                f"it follows convolutions and avg_pool{d}d only"
            )
        return None

    def elementwise(self, name: str, inputs: Sequence[_Field], size: Size | None) -> _Field:
        """Any other op: element-wise (fields united) if every input has the output's layout,
        global if the output has none left; anything else (a broadcast, a resize) is refused."""
        if size is not None and all(f.size == size for f in inputs):
            return _union(inputs, size)
        if size is None or all(n == 1 for n in size):  # mean over H, W; flatten; view(N, -1)
            return _union([f.collapse(size) for f in inputs], size)
        sizes = ", ".join(str(f.size) for f in inputs)
        raise NotImplementedError(
            f"receptive_field cannot follow {name}: it maps the spatial size {sizes} to {size}, "
            "neither element-wise nor global"
        )

    # --- rows ---

    def add_functional_row(self, op: _Op, output: Tensor, field: _Field) -> None:
        """A row for a spatial op called in the forward of a module with sub-modules (or of the
        model): no leaf module's row would show it. A leaf's own op is in the leaf's row."""
        parent, module = self.stack[-1] if self.stack else ("", self.root)
        if module is not self.root and _is_leaf(module):
            return
        name = f"{parent}.{op.name}" if parent else op.name
        self.rows.append(self.row(name, f"F.{op.name}", output, field, op))

    def row(self, name: str, kind: str, output: Tensor, field: _Field, op: _Op | None) -> RFRow:
        return RFRow(
            name, kind, tuple(output.shape[1:]),
            op.kernel if op else None, op.stride if op else None, op.padding if op else None,
            field.jump, field.rf, field.start,
        )  # fmt: skip

    def before_forward(self, name: str, module: nn.Module, args) -> None:
        self.stack.append((name, module))

    def after_forward(self, name: str, module: nn.Module, args, output) -> None:
        self.stack.pop()
        tensors = [t for t in tree_leaves(output) if isinstance(t, Tensor)]
        field = self.field(tensors[0]) if tensors else None
        if field is None:
            return
        op = self.fields[id(tensors[0])][2] if _is_leaf(module) else None
        row = self.row(name, type(module).__name__, tensors[0], field, op)
        self.every_module[name] = row
        if module is not self.root and not isinstance(module, _CONTAINERS):
            self.rows.append(row)


def _trace(model: nn.Module, input_size: Size) -> _Tracer:
    """One forward pass of a CPU copy in eval mode, under a forked RNG, without gradients."""
    probe = copy.deepcopy(getattr(model, "_orig_mod", model)).cpu().float().eval()
    dims = len(input_size) - 1
    tracer = _Tracer(probe, dims)
    for name, module in probe.named_modules():
        module.register_forward_pre_hook(partial(tracer.before_forward, name))
        module.register_forward_hook(partial(tracer.after_forward, name))
    image = torch.zeros(1, *input_size)
    with torch.random.fork_rng(devices=[]), torch.no_grad(), tracer:
        tracer.track(image, _Field((1,) * dims, (1,) * dims, (0.0,) * dims, tuple(input_size[1:])))
        probe(image)
    return tracer


def receptive_field(model: nn.Module, input_size: Size = (3, 32, 32)) -> list[RFRow]:
    """One :class:`RFRow` per layer, in execution order, as torchsummary lists them (no
    containers), plus functional spatial ops (``F.avg_pool2d``...) called in a block's forward.

    The model is not touched: the pass runs on a copy, so its weights, buffers, training flag
    and the global random state are the same afterwards. Raises ``NotImplementedError`` for an
    op whose geometry it does not follow (see the module's docstring).
    """
    return _trace(model, input_size).rows


def layer_field(
    model: nn.Module, layer: str | None = None, input_size: Size = (3, 32, 32)
) -> RFRow:
    """The row of the module named ``layer`` (containers such as ``"layer4"`` included);
    default: :func:`default_erf_layer`'s choice."""
    rows = _trace(model, input_size).every_module
    layer = _default_layer(model, rows) if layer is None else layer
    if layer not in rows:
        raise ValueError(f"{type(model).__name__} has no module {layer!r} on the input's path")
    return rows[layer]


def first_covering(rows: Sequence[RFRow], image: Size, every_unit: bool = False) -> RFRow | None:
    """The first row in which some unit (or every unit) sees the whole ``image`` (H, W)."""
    return next((row for row in rows if row.covers(image, every_unit)), None)


# --- the table -----------------------------------------------------------------------------------

_COLUMNS = (
    ("Layer (type)", 36), ("Output Shape", 20), ("Kernel", 8), ("Stride", 8), ("Padding", 9),
    ("Jump", 7), ("RF", 7), ("Start", 8),
)  # fmt: skip
_MARK = " *"


def _joined(values: Sequence[int]) -> str:
    """(3, 32, 32) -> "3x32x32"."""
    return "x".join(map(str, values))


def _axes(values: Sequence | None, fmt: str = "{}") -> str:
    """(3, 3) -> "3"; (3, 5) -> "3x5"; None -> "-"."""
    if values is None:
        return "-"
    shown = [fmt.format(v) for v in values]
    return shown[0] if len(set(shown)) == 1 else "x".join(shown)


def format_receptive_field(
    model: nn.Module | Sequence[RFRow], input_size: Size = (3, 32, 32)
) -> str:
    """The receptive-field table in torchsummary's layout; ``*`` marks the first layer in which
    a unit's field covers the whole input, and the footer names it."""
    rows = receptive_field(model, input_size) if isinstance(model, nn.Module) else list(model)
    image = tuple(input_size[1:])
    flagged = first_covering(rows, image)
    every = first_covering(rows, image, every_unit=True)
    width = sum(w for _, w in _COLUMNS) + len(_MARK)
    lines = ["-" * width, "".join(f"{title:>{w}}" for title, w in _COLUMNS), "=" * width]
    for row in rows:
        cells = (
            f"{row.name} ({row.type})", str([-1, *row.output_shape]), _axes(row.kernel),
            _axes(row.stride), _axes(row.padding), _axes(row.jump), _axes(row.rf),
            _axes(row.start, "{:.1f}"),
        )  # fmt: skip
        line = "".join(f"{cell:>{w}}" for cell, (_, w) in zip(cells, _COLUMNS))
        lines.append(line + (_MARK if row is flagged else ""))
    lines += ["=" * width, f"Input size: {_joined(input_size)}"]
    if rows:
        last = rows[-1]
        lines.append(f"Final receptive field: {_joined(last.rf)} pixels (jump {_axes(last.jump)})")
    if flagged is None:
        lines.append(f"No layer's receptive field covers the whole {_joined(image)} input")
    else:
        lines.append(
            f"* first layer with a unit that sees the whole {_joined(image)} input: "
            f"{flagged.name} (rf {_joined(flagged.rf)})"
        )
    if every is not None:
        lines.append(
            f"  every unit sees the whole input from: {every.name} (rf {_joined(every.rf)})"
        )
    lines.append("-" * width)
    return "\n".join(lines) + "\n"


def print_receptive_field(
    model: nn.Module | Sequence[RFRow], input_size: Size = (3, 32, 32)
) -> None:
    """Print :func:`format_receptive_field`'s table."""
    print(format_receptive_field(model, input_size), end="")


# --- effective receptive field -------------------------------------------------------------------

ERF_BATCH = 64


def default_erf_layer(model: nn.Module, input_size: Size = (3, 32, 32)) -> str:
    """The last direct child of ``model`` whose output still has a spatial layout larger than
    1x1 (``"layer4"`` in ResNet18: the last stage before pooling)."""
    return _default_layer(model, _trace(model, input_size).every_module)


def _default_layer(model: nn.Module, rows: dict[str, RFRow]) -> str:
    model = getattr(model, "_orig_mod", model)
    children = [name for name, _ in model.named_children() if name in rows]
    spatial = [name for name in children if any(u > 1 for u in rows[name].units)]
    if not spatial:
        raise ValueError(f"{type(model).__name__} has no child with a spatial output")
    return spatial[-1]


def effective_receptive_field(
    model: nn.Module,
    inputs: Tensor | Iterable,
    layer: str | None = None,
    *,
    device: torch.device | str = "cpu",
    progress: bool = False,
) -> Tensor:
    """Luo et al.'s effective receptive field of the centre unit of ``layer``, as (H, W) in [0, 1].

    The gradient of the centre unit (all channels summed) with respect to the input, in absolute
    value, summed over the input channels and averaged over every image of ``inputs``: a tensor
    (N, C, H, W) of normalised images, or batches of them (``(images, labels)`` pairs, as a
    :class:`~eva_utils.loaders.DeviceLoader` yields). ``layer`` names a module (default:
    :func:`default_erf_layer`). The model runs in eval mode on a copy; it is not changed.
    """
    source = getattr(model, "_orig_mod", model)
    probe = copy.deepcopy(source).to(device).float().eval().requires_grad_(False)
    captured: list[Tensor] = []
    total, count = torch.zeros(()), 0
    batches = inputs.split(ERF_BATCH) if isinstance(inputs, Tensor) else inputs
    with torch.random.fork_rng(devices=[]), torch.enable_grad():
        for batch in bar(batches, desc="effective receptive field", progress=progress):
            images = batch[0] if isinstance(batch, tuple | list) else batch
            if count == 0:  # the default layer depends on the images' size
                layer = layer or default_erf_layer(source, tuple(images.shape[1:]))
                probe.get_submodule(layer).register_forward_hook(
                    lambda module, args, output: captured.append(output)
                )
            images = images.to(device).float().requires_grad_(True)
            captured.clear()
            probe(images)
            output = captured[-1]
            height, width = output.shape[-2:]
            output[..., height // 2, width // 2].sum().backward()
            total = total + images.grad.abs().sum(1).sum(0).cpu()  # (H, W)
            count += len(images)
    if count == 0:
        raise ValueError("effective_receptive_field needs at least one image")
    erf = total / count
    peak = erf.max()
    return erf / peak if peak > 0 else erf


def field_box(field: RFRow, image: Size) -> tuple[float, float, float, float]:
    """(top, left, bottom, right) edges, in imshow's pixel coordinates, of the theoretical field
    of the centre unit (the unit :func:`effective_receptive_field` follows), clipped to the image
    of ``image`` = (height, width) pixels."""
    height, width = image
    top, left = (c - (r - 1) / 2 - 0.5 for c, r in zip(field.centre(), field.rf))
    bottom, right = (c + (r - 1) / 2 + 0.5 for c, r in zip(field.centre(), field.rf))
    return max(top, -0.5), max(left, -0.5), min(bottom, height - 0.5), min(right, width - 0.5)
