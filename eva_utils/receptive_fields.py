"""Receptive fields: the theoretical field of every layer, and the effective one (Luo et al., 2016).

Theoretical field. Every tensor ``t`` computed from the input gets a geometry per spatial axis:

* ``jump``: distance, in input pixels, between two adjacent units of ``t``;
* ``rf``: how many input pixels one unit of ``t`` can see;
* ``start``: centre of the field of ``t``'s first unit, in input pixel coordinates (pixel ``i``
  has centre ``i``).

A convolution or pool with (dilated) kernel ``k``, stride ``s`` and padding ``p`` maps them to::

    jump_out  = jump_in * s
    rf_out    = rf_in + (k - 1) * jump_in
    start_out = start_in + ((k - 1) / 2 - p) * jump_in

and a sum (or any element-wise op) of branches sees the union of its branches' fields: with
equal centres, as in a residual block, the largest field. The geometry is followed per *tensor*,
by watching every ATen operation of one forward pass (a ``TorchDispatchMode``), so functional
code (``F.relu``, ``out + shortcut``, ``F.avg_pool2d``) is followed as exactly as modules are.

Effective field. Only part of the theoretical field matters in practice: the gradient of one
output unit with respect to the input falls off roughly like a Gaussian from the centre. The
map :func:`effective_receptive_field` returns is that gradient, averaged over many images.
"""

from __future__ import annotations

import copy
import itertools
from collections.abc import Iterable, Iterator, Sequence
from dataclasses import dataclass

import torch
from torch import Tensor, nn
from torch.utils._python_dispatch import TorchDispatchMode
from torch.utils._pytree import tree_leaves

from .progress import bar

Size = tuple[int, ...]

# Modules torchsummary leaves out of its table: containers whose output is a child's output.
_CONTAINERS = (nn.Sequential, nn.ModuleList, nn.ModuleDict)
# ATen names shown under a friendlier one in the table.
_OP_NAMES = {
    "convolution": "conv",
    "max_pool1d_with_indices": "max_pool1d",
    "max_pool2d_with_indices": "max_pool2d",
    "max_pool3d_with_indices": "max_pool3d",
    "constant_pad_nd": "pad",
}


@dataclass(frozen=True)
class RFRow:
    """One layer's output. Geometry tuples have one entry per spatial axis: (height, width).

    ``kernel`` (the dilated extent), ``stride`` and ``padding`` (before the first pixel) are
    those of the convolution, pool or pad that the layer itself runs, ``None`` for layers that
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
        if len(self.output_shape) == dims + 1:
            return tuple(self.output_shape[1:])
        return (1,) * dims

    def centre(self, index: Sequence[int] | None = None) -> tuple[float, ...]:
        """Centre of the field of the unit at ``index`` (default: the middle unit ``n // 2``)."""
        index = tuple(n // 2 for n in self.units) if index is None else tuple(index)
        return tuple(s + i * j for s, i, j in zip(self.start, index, self.jump))

    def covers(self, image: Size, every_unit: bool = False) -> bool:
        """Whether some unit's field (or, with ``every_unit``, every unit's) contains every
        pixel of an image of ``image`` = (height, width) pixels."""
        for start, jump, rf, units, length in zip(
            self.start, self.jump, self.rf, self.units, image
        ):
            half = (rf - 1) / 2
            ok = [
                start + i * jump - half <= 0 and start + i * jump + half >= length - 1
                for i in range(units)
            ]
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
        if self.size is None:
            return _Field(self.jump, self.rf, self.start, size)
        zeros = (0,) * len(self.size)
        return self.apply(self.size, self.size, zeros, size)


def _union(fields: Sequence[_Field], size: Size | None) -> _Field:
    """The field of an element-wise op of ``fields``: per axis, the union of the first units'
    fields. Inputs laid out like the output give the jump. Exact for branches laid out alike
    (residual sums, concatenated channels); a broadcast input (1x1, or flattened, as in
    squeeze-and-excitation) is seen whole by every unit, and its union is the first unit's."""
    aligned = [f for f in fields if f.size == size]
    dims = len(fields[0].rf)
    jump = tuple(max(f.jump[d] for f in aligned) if aligned else 0 for d in range(dims))
    low = [min(f.start[d] - (f.rf[d] - 1) / 2 for f in fields) for d in range(dims)]
    high = [max(f.start[d] + (f.rf[d] - 1) / 2 for f in fields) for d in range(dims)]
    return _Field(
        jump,
        tuple(round(h - lo) + 1 for lo, h in zip(low, high)),
        tuple((lo + h) / 2 for lo, h in zip(low, high)),
        size,
    )


def _expand(value, dims: int, default: int | None = None) -> Size:
    """A PyTorch size argument (int, or list of 1 or ``dims`` ints, or empty) as ``dims`` ints."""
    if isinstance(value, int):
        return (value,) * dims
    value = tuple(value)
    if not value:
        return (default,) * dims
    return value * dims if len(value) == 1 else value


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
        # id(tensor) -> (tensor, field); the tensor is kept so that its id is never reused.
        self.fields: dict[int, tuple[Tensor, _Field]] = {}
        self.made_by: dict[int, _Op] = {}  # id(tensor) -> the spatial op that computed it
        self.rows: list[RFRow] = []
        self.every_module: dict[str, RFRow] = {}  # containers included
        self.stack: list[tuple[str, nn.Module]] = []
        self.root = model
        self.functional_counts: dict[str, int] = {}

    # --- fields of tensors ---

    def field(self, tensor: Tensor) -> _Field | None:
        entry = self.fields.get(id(tensor))
        return entry[1] if entry is not None and entry[0] is tensor else None

    def track(self, tensor: Tensor, field: _Field) -> None:
        self.fields[id(tensor)] = (tensor, field)

    def spatial(self, tensor: Tensor) -> Size | None:
        return tuple(tensor.shape[-self.dims :]) if tensor.ndim >= self.dims + 2 else None

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        kwargs = kwargs or {}
        out = func(*args, **kwargs)
        inputs = [
            f
            for t in tree_leaves((args, kwargs))
            if isinstance(t, Tensor) and (f := self.field(t)) is not None
        ]
        outputs = [t for t in tree_leaves(out) if isinstance(t, Tensor)]
        if not inputs or not outputs:
            return out
        name = func.overloadpacket.__name__
        size = self.spatial(outputs[0])
        op = self.spatial_op(name, args, inputs[0], size)
        if op is not None:
            field = inputs[0].apply(op.kernel, op.stride, op.padding, size)
        else:
            field = self.elementwise(name, inputs, size)
        for tensor in outputs:
            self.track(tensor, field)
            if op is not None:
                self.made_by[id(tensor)] = op
            else:  # an in-place op (relu_) reuses the tensor that a convolution made
                self.made_by.pop(id(tensor), None)
        if op is not None and self.in_container():
            self.add_functional_row(op, outputs[0], field)
        return out

    def spatial_op(self, name: str, args, field: _Field, size: Size | None) -> _Op | None:
        """The kernel, stride and padding of a known spatial op (None for any other op)."""
        d = self.dims
        if name == "convolution":
            if args[6]:
                raise NotImplementedError("receptive_field cannot follow transposed convolutions")
            weight, stride, padding, dilation = args[1], args[3], args[4], args[5]
            kernel = [dl * (k - 1) + 1 for k, dl in zip(weight.shape[2:], _expand(dilation, d))]
            return _Op(
                "conv", tuple(kernel[-d:]), _expand(stride, d)[-d:], _expand(padding, d)[-d:]
            )
        if "max_pool" in name and "adaptive" not in name:
            n = int(name.split("max_pool")[1][0])  # max_pool2d... -> 2 axes
            kernel = _expand(args[1], n)
            stride = _expand(args[2] if len(args) > 2 else (), n, None)
            stride = tuple(k if s is None else s for k, s in zip(kernel, stride))
            padding = _expand(args[3] if len(args) > 3 else 0, n)
            dilation = _expand(args[4] if len(args) > 4 else 1, n)
            kernel = tuple(dl * (k - 1) + 1 for k, dl in zip(kernel, dilation))
            return _Op(_OP_NAMES.get(name, name), kernel[-d:], stride[-d:], padding[-d:])
        if name.startswith("avg_pool"):
            n = int(name[len("avg_pool")])
            kernel = _expand(args[1], n)
            stride = _expand(args[2] if len(args) > 2 else (), n, None)
            stride = tuple(k if s is None else s for k, s in zip(kernel, stride))
            padding = _expand(args[3] if len(args) > 3 else 0, n)
            return _Op(name, kernel[-d:], stride[-d:], padding[-d:])
        if "adaptive" in name and "pool" in name:
            sizes_in, sizes_out = field.size, size
            if any(i % o for i, o in zip(sizes_in, sizes_out)):
                raise NotImplementedError(
                    f"receptive_field cannot follow {name.lstrip('_')} from {sizes_in} to "
                    f"{sizes_out}: the windows overlap unevenly unless the sizes divide"
                )
            kernel = tuple(i // o for i, o in zip(sizes_in, sizes_out))
            return _Op(name.lstrip("_"), kernel, kernel, (0,) * d)
        if name == "constant_pad_nd" or (
            "pad" in name and name.startswith(("reflection", "replication", "_pad"))
        ):
            pads = list(args[1])  # (last axis before, after, previous axis before, after, ...)
            before = [0] * d
            for axis in range(min(d, len(pads) // 2)):
                before[d - 1 - axis] = pads[2 * axis]
            return _Op(_OP_NAMES.get(name, name.lstrip("_")), (1,) * d, (1,) * d, tuple(before))
        if name == "slice" and field.size is not None:
            dim = args[1] % args[0].ndim
            axis = dim - (args[0].ndim - d)
            if axis >= 0:  # cropping a spatial axis: a 1-pixel kernel with negative padding
                begin = args[2] if len(args) > 2 and args[2] is not None else 0
                begin = begin + field.size[axis] if begin < 0 else min(begin, field.size[axis])
                step = args[4] if len(args) > 4 else 1
                stride = tuple(step if a == axis else 1 for a in range(d))
                padding = tuple(-begin if a == axis else 0 for a in range(d))
                return _Op("slice", (1,) * d, stride, padding)
        return None

    def elementwise(self, name: str, inputs: Sequence[_Field], size: Size | None) -> _Field:
        """Any other op: element-wise (fields united) if it keeps the layout, else global."""
        laid_out = [f.size for f in inputs if f.size is not None and any(n > 1 for n in f.size)]
        if size is not None and all(s == size for s in laid_out):
            return _union(inputs, size)
        if size is None or all(n == 1 for n in size):  # mean over H, W; flatten; view(N, -1)
            return _union([f.collapse(size) for f in inputs], size)
        raise NotImplementedError(
            f"receptive_field cannot follow {name}: it changes the spatial size "
            f"{laid_out[0] if laid_out else None} to {size} in a way it does not know"
        )

    # --- rows ---

    def in_container(self) -> bool:
        """Whether the running code is a forward that has sub-modules (or no module at all):
        spatial ops there are functional calls that no leaf module's row would show."""
        if not self.stack:
            return True
        module = self.stack[-1][1]
        return module is self.root or any(True for _ in module.children())

    def add_functional_row(self, op: _Op, output: Tensor, field: _Field) -> None:
        parent = self.stack[-1][0] if self.stack else ""
        base = f"{parent}.{op.name}" if parent else op.name
        count = self.functional_counts.get(base, 0)
        self.functional_counts[base] = count + 1
        name = base if count == 0 else f"{base}_{count}"
        self.rows.append(self.row(name, f"F.{op.name}", output, field, op))

    def row(self, name: str, kind: str, output: Tensor, field: _Field, op: _Op | None) -> RFRow:
        return RFRow(
            name, kind, tuple(output.shape[1:]),
            op.kernel if op else None, op.stride if op else None, op.padding if op else None,
            field.jump, field.rf, field.start,
        )  # fmt: skip

    def before_forward(self, name: str):
        def hook(module, args):
            self.stack.append((name, module))

        return hook

    def after_forward(self, name: str):
        def hook(module, args, output):
            self.stack.pop()
            tensors = [t for t in tree_leaves(output) if isinstance(t, Tensor)]
            field = self.field(tensors[0]) if tensors else None
            if field is None:
                return
            leaf = not any(True for _ in module.children())
            op = self.made_by.get(id(tensors[0])) if leaf else None
            row = self.row(name, type(module).__name__, tensors[0], field, op)
            self.every_module[name] = row
            if module is not self.root and not isinstance(module, _CONTAINERS):
                self.rows.append(row)

        return hook


def _trace(model: nn.Module, input_size: Size) -> _Tracer:
    """One forward pass of a CPU copy in eval mode, under a forked RNG, without gradients."""
    probe = copy.deepcopy(getattr(model, "_orig_mod", model)).cpu().float().eval()
    tracer = _Tracer(probe, len(input_size) - 1)
    for name, module in probe.named_modules():
        module.register_forward_pre_hook(tracer.before_forward(name))
        module.register_forward_hook(tracer.after_forward(name))
    dims = len(input_size) - 1
    image = torch.zeros(1, *input_size)
    with torch.random.fork_rng(devices=[]), torch.no_grad(), tracer:
        tracer.track(image, _Field((1,) * dims, (1,) * dims, (0.0,) * dims, tuple(input_size[1:])))
        probe(image)
    return tracer


def receptive_field(model: nn.Module, input_size: Size = (3, 32, 32)) -> list[RFRow]:
    """One :class:`RFRow` per layer, in execution order, as torchsummary lists them (no
    containers), plus functional spatial ops (``F.avg_pool2d``...) called in a block's forward.

    The model is not touched: the pass runs on a copy, so its weights, buffers, training flag
    and the global random state are the same afterwards. Raises ``NotImplementedError`` for ops
    whose geometry is not followed (upsampling, transposed convolutions).
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
    size = "x".join(map(str, image))
    lines.append("=" * width)
    lines.append(f"Input size: {'x'.join(map(str, input_size))}")
    if rows:
        last = rows[-1]
        lines.append(
            f"Final receptive field: {'x'.join(map(str, last.rf))} pixels (jump {_axes(last.jump)})"
        )
    if flagged is None:
        lines.append(f"No layer's receptive field covers the whole {size} input")
    else:
        lines.append(
            f"* first layer with a unit that sees the whole {size} input: {flagged.name} "
            f"(rf {'x'.join(map(str, flagged.rf))})"
        )
    if every is not None:
        lines.append(
            f"  every unit sees the whole input from: {every.name} "
            f"(rf {'x'.join(map(str, every.rf))})"
        )
    lines.append("-" * width)
    return "\n".join(lines) + "\n"


def print_receptive_field(
    model: nn.Module | Sequence[RFRow], input_size: Size = (3, 32, 32)
) -> None:
    print(format_receptive_field(model, input_size), end="")


# --- effective receptive field -------------------------------------------------------------------

ERF_BATCH = 64


def default_erf_layer(model: nn.Module, input_size: Size = (3, 32, 32)) -> str:
    """The last direct child of ``model`` whose output still has a spatial layout larger than
    1x1 (``"layer4"`` in ResNet18: the last stage before pooling)."""
    return _default_layer(model, _trace(model, input_size).every_module)


def _default_layer(model: nn.Module, rows: dict[str, RFRow]) -> str:
    model = getattr(model, "_orig_mod", model)
    spatial = [
        name
        for name, _ in model.named_children()
        if name in rows and any(u > 1 for u in rows[name].units)
    ]
    if not spatial:
        raise ValueError(f"{type(model).__name__} has no child with a spatial output")
    return spatial[-1]


def _image_batches(inputs: Tensor | Iterable, max_batches: int | None) -> Iterator[Tensor]:
    if isinstance(inputs, Tensor):
        inputs = inputs.split(ERF_BATCH)
    for index, batch in enumerate(inputs):
        if max_batches is not None and index >= max_batches:
            return
        yield batch[0] if isinstance(batch, tuple | list) else batch


def effective_receptive_field(
    model: nn.Module,
    inputs: Tensor | Iterable,
    layer: str | None = None,
    *,
    device: torch.device | str = "cpu",
    max_batches: int | None = None,
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
    batches = _image_batches(inputs, max_batches)
    first = next(batches, None)
    if first is None:
        raise ValueError("effective_receptive_field needs at least one image")
    layer = layer or default_erf_layer(source, tuple(first.shape[1:]))
    probe = copy.deepcopy(source).to(device).float().eval().requires_grad_(False)
    captured: list[Tensor] = []
    handle = probe.get_submodule(layer).register_forward_hook(
        lambda module, args, output: captured.append(output)
    )
    total, count = torch.zeros(()), 0
    batches = itertools.chain([first], batches)
    with torch.random.fork_rng(devices=[]), torch.enable_grad():
        for images in bar(batches, desc="effective receptive field", progress=progress):
            images = images.to(device).float().requires_grad_(True)
            captured.clear()
            probe(images)
            output = captured[-1]
            height, width = output.shape[-2:]
            output[..., height // 2, width // 2].sum().backward()
            gradient = images.grad.abs().sum(1).sum(0)  # (H, W)
            total = total + gradient.cpu()
            count += len(images)
    handle.remove()
    erf = total / count
    peak = erf.max()
    return erf / peak if peak > 0 else erf


def field_box(field: RFRow | int, image: Size) -> tuple[float, float, float, float]:
    """(top, left, bottom, right) edges, in imshow's pixel coordinates, of the theoretical field
    of the centre unit (the unit :func:`effective_receptive_field` follows), clipped to the image.

    An int is a square field centred on the image."""
    height, width = image
    if isinstance(field, RFRow):
        rf, centre = field.rf, field.centre()
    else:
        rf, centre = (field, field), ((height - 1) / 2, (width - 1) / 2)
    top, left = (c - (r - 1) / 2 - 0.5 for c, r in zip(centre, rf))
    bottom, right = (c + (r - 1) / 2 + 0.5 for c, r in zip(centre, rf))
    return max(top, -0.5), max(left, -0.5), min(bottom, height - 0.5), min(right, width - 0.5)
