"""Post-training quantization without Lightning: capture, prepare, calibrate, convert.

Usable from a plain PyTorch loop::

    qmodel = quantize_ptq(model, calib_loader, backend="x86", input_fn=lambda batch: batch[0])
    lightning_quant.save(qmodel, "model.pt2")
"""

from __future__ import annotations

import functools
from collections.abc import Callable, Iterable
from typing import Any

import torch
from torch import nn

from lightning_quant import _bias_correction, _torchao
from lightning_quant.capture import (
    OWN_FORWARD,
    ROUTE_ATTR,
    CallNormalizer,
    batch_size_of,
    compiled_wrapper_inner,
    deepcopy,
    detach_inputs,
    export,
    is_zero_pad,
    named_inputs,
    shape_mismatch,
    used_state_bytes,
)
from lightning_quant.config import QuantConfig, QuantizationError

#: key of the converted GraphModule's ``meta`` dict where capture details are kept for export
META_KEY = "lightning_quant"


def as_call(batch: Any) -> tuple[tuple, dict]:
    """Turn one calibration item into call arguments.

    A Tensor is one positional argument, a tuple/list are positional arguments, a dict are keyword arguments.
    """
    if isinstance(batch, dict):
        return (), dict(batch)
    if isinstance(batch, (tuple, list)):
        return tuple(batch), {}
    return (batch,), {}


def strip_unused_attrs(gm: torch.fx.GraphModule) -> torch.fx.GraphModule:
    """Drop parameters/buffers no ``get_attr`` node reads (``convert_pt2e`` keeps the unused fp32 weights)."""
    used = {n.target for n in gm.graph.nodes if n.op == "get_attr"}
    for name in [n for n, _ in gm.named_parameters()] + [n for n, _ in gm.named_buffers()]:
        if name in used:
            continue
        owner_name, _, attr = name.rpartition(".")
        owner = gm.get_submodule(owner_name) if owner_name else gm
        owner._parameters.pop(attr, None)
        owner._buffers.pop(attr, None)
    gm.delete_all_unused_submodules()
    gm.recompile()
    return gm


def structural_copy(module: nn.Module) -> nn.Module:
    """A copy of ``module``'s structure that shares its Parameter and buffer objects (for rewriting before capture)."""
    memo = {id(t): t for t in (*module.parameters(), *module.buffers())}
    return deepcopy(module, memo)


def _get_attr(gm: torch.fx.GraphModule, target: str) -> Any:
    return functools.reduce(lambda obj, name: getattr(obj, name, None), target.split("."), gm)


def _replaceable_int8_weight(gm: torch.fx.GraphModule, w_dq: Any) -> tuple[torch.fx.Node, torch.Tensor] | None:
    """``(get_attr node, int8 weight)`` behind a weight's ``dequantize_per_channel`` node, if a rewrite may grow it.

    That is: a constant used by this node only, with zero points all 0 (symmetric), so int8 0 stands for 0.0.
    """
    if getattr(w_dq, "target", None) != torch.ops.quantized_decomposed.dequantize_per_channel.default:
        return None
    w_attr, w_zp = w_dq.args[0], w_dq.args[2]
    if getattr(w_attr, "op", None) != "get_attr" or len(w_attr.users) != 1:
        return None
    weight = _get_attr(gm, w_attr.target)
    zero_points = _get_attr(gm, w_zp.target) if getattr(w_zp, "op", None) == "get_attr" else None
    if not isinstance(weight, torch.Tensor) or zero_points is None or bool(zero_points.any()):
        return None
    return w_attr, weight


def _replace_weight(gm: torch.fx.GraphModule, w_attr: torch.fx.Node, weight: torch.Tensor, suffix: str) -> None:
    name = f"{w_attr.target}_{suffix}"
    gm.register_buffer(name, weight)
    w_attr.target = name


#: convolutions :func:`pad_single_channel_qconvs` rewrites -> the dimensions of their weight
_CONVS = {
    torch.ops.aten.conv1d.default: 3,
    torch.ops.aten.conv1d.padding: 3,
    torch.ops.aten.conv2d.default: 4,
    torch.ops.aten.conv2d.padding: 4,
}


def pad_single_channel_qconvs(gm: torch.fx.GraphModule) -> int:
    """Compute each int8 conv with one input channel as a 2-channel conv whose extra channel and weights are zero.

    Works around an Inductor bug (torch 2.13): with weight freezing and a dynamic batch, an int8 conv whose input has
    one channel (Conv2d, and Conv1d on raw waveforms) is compiled with wrong strides, and the AOTInductor package
    returns wrong outputs without any error.
    Applied to a converted graph: the int8 weight gets a zero input channel (symmetric weights: int8 0 is 0.0) and the
    float input is zero-padded before its quantize node, so quantize -> dequantize -> conv still fuses to a oneDNN
    qconv. Same results. Returns the number of convolutions rewritten.
    """
    qd = torch.ops.quantized_decomposed
    graph = gm.graph
    fixed = 0
    for conv in list(graph.nodes):
        if conv.op != "call_function" or conv.target not in _CONVS:
            continue
        x_dq, w_dq = conv.args[0], conv.args[1]
        groups = conv.args[6] if len(conv.args) > 6 else conv.kwargs.get("groups", 1)
        if groups != 1 or getattr(x_dq, "target", None) != qd.dequantize_per_tensor.default:
            continue
        x_q = x_dq.args[0]
        found = _replaceable_int8_weight(gm, w_dq)
        if getattr(x_q, "target", None) != qd.quantize_per_tensor.default or found is None:
            continue
        w_attr, weight = found
        if weight.ndim != _CONVS[conv.target] or weight.shape[1] != 1:
            continue
        _replace_weight(gm, w_attr, torch.cat([weight, torch.zeros_like(weight)], dim=1), "padded")
        with graph.inserting_before(x_q):
            pad = [0, 0] * (weight.ndim - 2) + [0, 1]  # no spatial padding; one zero channel after the input's
            padded = graph.call_function(torch.ops.aten.constant_pad_nd.default, (x_q.args[0], pad, 0.0))
            q = graph.call_function(x_q.target, (padded, *x_q.args[1:]))
            dq = graph.call_function(x_dq.target, (q, *x_dq.args[1:]))
        conv.replace_input_with(x_dq, dq)
        fixed += 1
    if fixed:
        graph.eliminate_dead_code()
        strip_unused_attrs(gm)
    return fixed


def fold_pads_into_depthwise_qconvs(gm: torch.fx.GraphModule) -> int:
    """Compute an asymmetric zero pad + int8 depthwise conv as one conv with symmetric padding and a larger kernel.

    EfficientNet's static "same" padding pads right/bottom only before each stride-2 depthwise conv (``F.pad(x, [0,
    1, 0, 1])``). ``aten.conv2d`` has symmetric padding only, so the pad stays a separate pass that copies the whole
    activation (about 10% of EfficientNet-Lite0's batch-32 latency on x86). With total padding ``L`` before and ``R``
    after in a dimension, padding both sides by ``P = max(L, R)`` and growing the kernel by ``P - L`` zero taps in front
    and ``P - R`` behind reads the same inputs with the same weights, and gives the same output size. The extra taps
    cost a depthwise conv little (3x3 -> 4x4); dense convs are left alone. Applied to a converted graph before export
    for x86 (int8 weight 0 is 0.0 with symmetric weights; the pad's zero point pads 0.0). Returns the convs rewritten.
    """
    qd = torch.ops.quantized_decomposed
    graph = gm.graph
    fixed = 0
    for conv in list(graph.nodes):
        if conv.op != "call_function" or conv.target != torch.ops.aten.conv2d.default or conv.kwargs:
            continue
        x_dq, w_dq, bias, stride, padding, dilation, groups = (*conv.args, *_CONV_DEFAULTS[len(conv.args) :])
        if list(dilation) != [1, 1] or getattr(x_dq, "target", None) != qd.dequantize_per_tensor.default:
            continue
        x_q = x_dq.args[0]
        pad = x_q.args[0] if getattr(x_q, "target", None) == qd.quantize_per_tensor.default else None
        if pad is None or not is_zero_pad(pad) or len(pad.args[1]) != 4 or min(pad.args[1]) < 0:
            continue
        pad_dq = pad.args[0]
        if pad_dq.target != qd.dequantize_per_tensor.default or tuple(pad_dq.args[1:6]) != tuple(x_q.args[1:6]):
            continue  # not the same quantization on both sides of the pad
        found = _replaceable_int8_weight(gm, w_dq)
        if found is None or found[1].ndim != 4 or found[1].shape[1] != 1 or groups == 1:
            continue  # depthwise only
        w_attr, weight = found
        left, right, top, bottom = pad.args[1]
        before = [top + padding[0], left + padding[1]]
        after = [bottom + padding[0], right + padding[1]]
        sym = [max(b, a) for b, a in zip(before, after)]
        grow = [sym[1] - before[1], sym[1] - after[1], sym[0] - before[0], sym[0] - after[0]]
        _replace_weight(gm, w_attr, torch.nn.functional.pad(weight, grow), "grown")  # int8 zero taps
        conv.args = (pad_dq, w_dq, bias, list(stride), sym, [1, 1], groups)
        fixed += 1
    if fixed:
        graph.eliminate_dead_code()
        strip_unused_attrs(gm)
    return fixed


#: aten.conv2d's defaults after (input, weight): bias, stride, padding, dilation, groups
_CONV_DEFAULTS = (None, None, None, [1, 1], [0, 0], [1, 1], 1)


def qconv1d_as_qconv2d(gm: torch.fx.GraphModule) -> int:
    """Compute each int8 ``Conv1d`` as a ``Conv2d`` over a height of 1.

    Works around an Inductor limit (torch 2.13): it fuses the activation after an int8 conv into the oneDNN kernel,
    but oneDNN's int8 conv1d takes ReLU only ("Unsupported post op swish for quantized pointwise conv1d": SiLU,
    Hardswish, GELU after a Conv1d failed to run). The input is unsqueezed before its quantize node and the output
    squeezed right after the conv, so the activation stays a kernel of its own and the conv is an int8 conv2d.
    Applied to a converted graph before export for x86; same results. Returns the convolutions rewritten.
    """
    qd = torch.ops.quantized_decomposed
    graph = gm.graph
    fixed = 0
    for conv in list(graph.nodes):
        if conv.op != "call_function" or conv.target != torch.ops.aten.conv1d.default or conv.kwargs:
            continue
        x_dq, w_dq, bias, stride, padding, dilation, groups = (*conv.args, *_CONV1D_DEFAULTS[len(conv.args) :])
        if getattr(x_dq, "target", None) != qd.dequantize_per_tensor.default:
            continue
        x_q = x_dq.args[0]
        found = _replaceable_int8_weight(gm, w_dq)
        if getattr(x_q, "target", None) != qd.quantize_per_tensor.default or found is None:
            continue
        w_attr, weight = found
        _replace_weight(gm, w_attr, weight.unsqueeze(2), "2d")
        with graph.inserting_before(x_q):
            taller = graph.call_function(torch.ops.aten.unsqueeze.default, (x_q.args[0], 2))
            q = graph.call_function(x_q.target, (taller, *x_q.args[1:]))
            dq = graph.call_function(x_dq.target, (q, *x_dq.args[1:]))
        with graph.inserting_before(conv):
            conv2d = graph.call_function(
                torch.ops.aten.conv2d.default,
                (dq, w_dq, bias, [1, *stride], [0, *padding], [1, *dilation], groups),
            )
            out = graph.call_function(torch.ops.aten.squeeze.dim, (conv2d, 2))
        conv.replace_all_uses_with(out)
        graph.erase_node(conv)
        fixed += 1
    if fixed:
        graph.eliminate_dead_code()
        strip_unused_attrs(gm)
    return fixed


#: aten.conv1d's defaults after (input, weight): bias, stride, padding, dilation, groups
_CONV1D_DEFAULTS = (None, None, None, [1], [0], [1], 1)


def contiguous_linear_inputs(gm: torch.fx.GraphModule) -> int:
    """Quantize each int8 linear's input from a contiguous copy (fused into the quantize kernel, no extra buffer).

    Works around a torchao bug (0.18): an int8 linear on a non-contiguous input of more than two dimensions (tokens
    from ``x.flatten(2).transpose(1, 2)``, the projections inside ``nn.MultiheadAttention``) with a dynamic batch
    makes Inductor's weight freezing raise ``TypeError: torch.Size() takes an iterable of 'int'``. Applied to a
    converted graph before export for x86; same results. Returns the number of linears whose input was changed.
    """
    qd = torch.ops.quantized_decomposed
    graph = gm.graph
    fixed = 0
    for linear in list(graph.nodes):
        if linear.op != "call_function" or linear.target != torch.ops.aten.linear.default:
            continue
        x_dq = linear.args[0]
        if getattr(x_dq, "target", None) != qd.dequantize_per_tensor.default:
            continue
        x_q = x_dq.args[0]
        if getattr(x_q, "target", None) != qd.quantize_per_tensor.default:
            continue
        src = x_q.args[0]
        if getattr(src, "target", None) == torch.ops.aten.clone.default:
            continue  # done (a quantize shared by several linears)
        with graph.inserting_before(x_q):
            copy_ = graph.call_function(
                torch.ops.aten.clone.default, (src,), {"memory_format": torch.contiguous_format}
            )
        x_q.replace_input_with(src, copy_)
        fixed += 1
    if fixed:
        gm.recompile()
    return fixed


def own_constants_per_call(gm: torch.fx.GraphModule) -> int:
    """Give every conv/linear call its own copy of a float constant (a bias) that several calls read.

    A module called twice reads one bias from two int8 convs. ExecuTorch's XNNPACK lowering (1.5) quantizes a conv's
    fp32 bias with that conv's input scale and keeps one copy per constant, so the second call ran with the first
    one's bias (the ``.pte`` was 0.02 off an output span of 0.4; separate convs with the same weights were 0.002 off).
    Applied to a converted graph before export for arm; same results in PyTorch. Returns the copies made.
    """
    readers: dict[str, list[torch.fx.Node]] = {}
    for node in gm.graph.nodes:
        if node.op == "get_attr":
            readers.setdefault(node.target, []).extend(node.users)
    copied = 0
    for target, users in readers.items():
        value = _get_attr(gm, target)
        if len(users) < 2 or not isinstance(value, torch.Tensor) or not value.is_floating_point():
            continue
        for user in users[1:]:
            attr = next(a for a in user.all_input_nodes if a.op == "get_attr" and a.target == target)
            with gm.graph.inserting_before(user):
                own = gm.graph.get_attr(f"{target.replace('.', '_')}_call{copied}")
            gm.register_buffer(own.target, value.detach().clone())
            user.replace_input_with(attr, own)
            copied += 1
    if copied:
        gm.graph.eliminate_dead_code()
        strip_unused_attrs(gm)
    return copied


def capturable(module: nn.Module, backend: str) -> nn.Module:
    """What to hand to ``torch.export`` for ``backend``: ``module`` itself, or a rewritten structural copy."""
    shell = structural_copy(module)
    shell.__dict__.pop("forward", None)  # never capture an instance-level routing...
    shell.__dict__.pop(OWN_FORWARD, None)  # (or the compiled forward it stands in for)
    shell._modules.pop(ROUTE_ATTR, None)  # ...nor what it routes to
    return shell


def _observed_where(observer: torch.fx.Node) -> str:
    """Where an observer's tensor comes from, for messages: the submodule that produces it, or the input's name."""
    source = observer.args[0] if observer.args else observer
    if source.op == "placeholder":
        return f"input {source.name!r}"
    if source.op == "get_attr":
        return f"weight {source.target!r}"
    stack = source.meta.get("nn_module_stack") or {}
    path, cls = next(reversed(stack.values()), (None, None))
    return f"output of {path!r}" if path else f"node {source.name!r}"


def _nonfinite_inputs(args: tuple, kwargs: dict) -> str:
    """The inputs holding NaN or +-inf (``"input 'x' holds NaN"``), or that they come from inside the model."""
    bad = []
    for name, x in named_inputs(args, kwargs):
        if isinstance(x, torch.Tensor) and x.is_floating_point() and not bool(torch.isfinite(x).all()):
            bad.append(f"input {name!r} holds {'NaN' if bool(x.isnan().any()) else '+-inf'}")
    return ", ".join(bad) or "every input is finite: the model produced them"


class CalibrationGraph(nn.Module):
    """Stands in for one submodule during calibration.

    On its first call it captures a float snapshot of the submodule with ``torch.export`` from the real (args, kwargs)
    it receives (batch dim dynamic), and prepares it with the backend's quantizer; every call then runs the observing
    graph, whose outputs are the float outputs. The user's module is never touched: the snapshot is a deep copy.
    """

    def __init__(self, module: nn.Module, name: str, config: QuantConfig) -> None:
        super().__init__()
        snapshot = capturable(deepcopy(module).cpu().eval(), config.backend)
        self._snapshot = [snapshot]  # a list hides it from the module tree (state_dict, .to(), .train())
        self.name = name
        self.config = config
        self.prepared: torch.fx.GraphModule | None = None
        self.fp32_size_bytes: int | None = None  # what the captured graph reads (not unused layers)
        self.example_inputs: tuple[tuple, dict] | None = None
        self.num_samples = 0
        self.num_batches = 0

    def train(self, mode: bool = True) -> CalibrationGraph:
        # PT2E graphs refuse .train()/.eval(); calibration is always an eval-mode graph, so only the flag moves.
        self.training = mode
        return self

    @torch.compiler.disable  # runs eagerly inside a compiled LightningModule (`trainer.fit(torch.compile(model))`)
    def forward(self, *args: Any, **kwargs: Any) -> Any:
        batch = batch_size_of((args, kwargs))
        if self.prepared is not None and batch is not None and batch > self.config.max_batch_size:  # 1st: at capture
            raise ValueError(
                f"Expected argument `max_batch_size` ({self.config.max_batch_size}) to be at least the batch size "
                f"{self.name!r} is called with ({batch}, calibration batch {self.num_batches + 1}). Raise "
                "`max_batch_size` or use smaller batches."
            )
        if self.prepared is None:
            self.example_inputs = detach_inputs(args, kwargs)
            self._normalize = CallNormalizer(self._snapshot[0], args, kwargs)
            ep = export(
                self._snapshot[0],
                *self.example_inputs,
                max_batch_size=self.config.max_batch_size,
                name=self.name,
                dynamic_dims=self.config.dynamic_dims,
            )
            quantizer = _torchao.get_quantizer(
                self.config.backend, observer=self.config.observer, per_channel=self.config.per_channel
            )
            self.fp32_size_bytes = used_state_bytes(ep)
            self.prepared = _torchao.prepare(ep.module(), quantizer)
            if _torchao.count_observers(self.prepared) == 0:
                raise ValueError(
                    f"The {self.config.backend!r} quantizer found nothing to quantize in {self.name!r} "
                    f"({type(self._snapshot[0]).__name__}). Choose submodules with Conv/Linear layers via `modules=`."
                )
            if self.config.bias_correction:
                _bias_correction.attach(self.prepared)
        self.num_samples += batch or 1
        self.num_batches += 1
        args, kwargs = self._normalize.normalize(args, kwargs, f"Calibration batch {self.num_batches} of {self.name!r}")
        try:
            return self.prepared(*args, **kwargs)
        except AssertionError as err:  # the captured graph's shape guards
            mismatch = shape_mismatch(err, f"Calibration batch {self.num_batches} of {self.name!r}")
            if mismatch is None:
                raise
            raise mismatch from None
        except RuntimeError as err:  # the histogram observer's range of a tensor holding NaN or +-inf
            if "not finite" not in str(err):
                raise
            raise ValueError(
                f"Calibration batch {self.num_batches} of {self.name!r} sent NaN or infinite values into a layer to be "
                f"quantized ({_nonfinite_inputs(args, kwargs)}; {err}); observers cannot take a range from them. "
                "Clean the calibration data."
            ) from None

    def convert(self) -> torch.fx.GraphModule:
        """Convert a copy of the calibrated graph to int8 (the observing graph stays usable)."""
        if self.prepared is None:
            raise QuantizationError(
                f"Submodule {self.name!r} was never called during calibration, so it cannot be quantized. Check that "
                "your `validation_step` (or forward) calls it, or choose other submodules with `modules=`."
            )
        nonfinite = _torchao.nonfinite_observers(self.prepared)
        if nonfinite:
            where = ", ".join(dict.fromkeys(_observed_where(n) for n in nonfinite))
            raise ValueError(
                f"Calibration sent NaN or infinite values into {len(nonfinite)} quantized tensor(s) of {self.name!r} "
                f"({where}); an int8 range cannot be taken from them. Clean the calibration data, or keep the model "
                "from producing such values where it is quantized."
            )
        prepared = deepcopy(self.prepared)
        corrected = _bias_correction.apply(prepared, correct=self.config.bias_correction)
        q = strip_unused_attrs(_torchao.convert(prepared))
        q.meta[META_KEY] = {
            "name": self.name,
            "backend": self.config.backend,
            "example_inputs": self.example_inputs,
            "max_batch_size": self.config.max_batch_size,
            "dynamic_dims": self.config.dynamic_dims,
            "num_calibration_samples": self.num_samples,
            "observer": self.config.observer,
            "weight_granularity": self.config.weight_granularity,
            "bias_corrected_layers": corrected,
            "fp32_size_bytes": self.fp32_size_bytes,
        }
        return q


def quantize_ptq(
    model: nn.Module,
    calibration_data: Iterable[Any],
    *,
    backend: str = "x86",
    num_calibration_samples: int = 1024,
    observer: str = "histogram",
    weight_granularity: str = "per_channel",
    max_batch_size: int = 1024,
    bias_correction: bool = True,
    input_fn: Callable[[Any], Any] | None = None,
    dynamic_dims: dict[int, int] | None = None,
) -> torch.fx.GraphModule:
    """Post-training int8 quantization of ``model`` in a plain PyTorch program (no Trainer needed).

    ``model`` is left unchanged; the result is a new int8 ``GraphModule`` with the same call signature, ready for
    :func:`lightning_quant.save`.

    Args:
        model: the float model.
        calibration_data: an iterable (e.g. a DataLoader) of inputs. Each item, after ``input_fn``, is a Tensor (one
            positional argument), a tuple (positional arguments) or a dict (keyword arguments).
        backend: ``"x86"`` or ``"arm"`` (see :class:`~lightning_quant.config.QuantConfig`).
        num_calibration_samples: stop after this many samples (counted along dim 0).
        observer: ``"histogram"``, ``"minmax"`` or ``"moving_average"``.
        weight_granularity: ``"per_channel"`` (default) or ``"per_tensor"`` weight scales.
        max_batch_size: largest batch the exported artifact will accept.
        bias_correction: subtract from each conv/linear bias the mean output shift that rounding its weight to int8
            causes on the calibration data.
        input_fn: maps a dataloader item to model inputs, e.g. ``lambda batch: batch[0]`` for ``(x, y)`` batches.
        dynamic_dims: other dimensions of the batched inputs that vary, each with its largest size: ``{1: 512}`` for
            text of 2 to 512 tokens in dimension 1 (x86 only). Every other dimension is fixed at the first batch's size.

    Raises:
        ValueError: bad arguments, or ``calibration_data`` yields nothing.
        CaptureError: ``torch.export`` cannot capture ``model``.

    Example::

        >>> import torch
        >>> from torch import nn
        >>> from lightning_quant import quantize_ptq
        >>> net = nn.Sequential(nn.Conv2d(1, 4, 3), nn.ReLU(), nn.Flatten(), nn.Linear(4 * 6 * 6, 2))
        >>> q = quantize_ptq(net, [torch.randn(8, 1, 8, 8) for _ in range(2)], num_calibration_samples=16)
        >>> q(torch.randn(3, 1, 8, 8)).shape
        torch.Size([3, 2])
    """
    config = QuantConfig(
        backend=backend,
        observer=observer,
        num_calibration_samples=num_calibration_samples,
        max_batch_size=max_batch_size,
        weight_granularity=weight_granularity,
        bias_correction=bias_correction,
        dynamic_dims=dynamic_dims,
    )
    if isinstance(calibration_data, torch.Tensor):
        raise TypeError(
            "Expected argument `calibration_data` to be an iterable of batches (a DataLoader or a list of tensors), "
            "but got a single Tensor, whose rows would be taken as samples. Pass `[tensor]` or a DataLoader."
        )
    if not isinstance(model, nn.Module):
        raise TypeError(f"Expected argument `model` to be a torch.nn.Module, but got {type(model).__name__}.")
    if input_fn is not None and not callable(input_fn):
        raise TypeError(f"Expected argument `input_fn` to be callable or None, but got {type(input_fn).__name__}.")
    if not isinstance(calibration_data, Iterable):
        raise TypeError(
            "Expected argument `calibration_data` to be an iterable of batches (a DataLoader or a list of tensors), "
            f"but got {type(calibration_data).__name__}."
        )
    if any(t.is_meta for t in (*model.parameters(), *model.buffers())):
        raise ValueError(
            "Expected argument `model` to hold real weights, but some are on the 'meta' device (no data). Load its "
            "weights (e.g. `model.to_empty(device='cpu')` then `load_state_dict`) first."
        )
    model = compiled_wrapper_inner(model) or model  # torch.compile(net): quantize net (captured, never changed)
    calib = CalibrationGraph(model, type(model).__name__, config)
    with torch.no_grad():
        for item in calibration_data:
            args, kwargs = as_call(input_fn(item) if input_fn else item)
            calib(*args, **kwargs)
            if calib.num_samples >= config.num_calibration_samples:
                break
    if calib.num_batches == 0:
        raise ValueError("Expected argument `calibration_data` to yield at least one batch, but it was empty.")
    return calib.convert()
