"""The only module that imports torchao or executorch.

Their APIs move fast; every other module goes through the small functions here. Imports are lazy so that
``import lightning_quant`` stays cheap and ``backend="x86"`` never needs executorch.
"""

from __future__ import annotations

import contextlib
import dataclasses
import functools
import logging
import math
import threading
import types
from collections.abc import Iterator
from typing import Any

import torch
from torch import nn

from lightning_quant.capture import deepcopy, is_zero_pad
from lightning_quant.config import BACKENDS


@contextlib.contextmanager
def _quiet_import() -> Iterator[None]:
    """Torchao logs a warning per optional CUDA kernel library it cannot load on a CPU build; hide that noise."""
    loggers = [logging.getLogger(n) for n in ("torchao", "torch.utils._pytree")]
    levels = [lg.level for lg in loggers]
    for lg in loggers:
        lg.setLevel(logging.ERROR)
    try:
        yield
    finally:
        for lg, level in zip(loggers, levels):
            lg.setLevel(level)


@functools.cache
def _pt2e() -> Any:
    with _quiet_import():
        import torchao.quantization.pt2e as pt2e
        import torchao.quantization.pt2e.fake_quantize  # noqa: F401
        import torchao.quantization.pt2e.observer  # noqa: F401
        import torchao.quantization.pt2e.quantize_pt2e  # noqa: F401
        import torchao.quantization.pt2e.quantizer.x86_inductor_quantizer  # noqa: F401
    return pt2e


def executorch_available() -> bool:
    try:
        import executorch  # noqa: F401
    except ImportError:
        return False
    return True


def require_executorch(backend: str = "arm") -> None:
    """Raise a clear error naming the extra to install when executorch is missing."""
    if not executorch_available():
        raise ModuleNotFoundError(
            f"`backend={backend!r}` exports an ExecuTorch `.pte` lowered to XNNPACK and needs the `executorch` "
            'package. Install it with `pip install "lightning-quant[arm]"`, or use backend="x86".'
        )


def register_quantized_ops() -> None:
    """Register the ``quantized_decomposed`` ops that int8 PT2E programs use (needed to load a plain ``.pt2``)."""
    _pt2e()


# --------------------------------------------------------------------------------------------------- quantizers


def _observer_ctor(observer: str) -> Any:
    obs = _pt2e().observer
    return {
        "histogram": obs.HistogramObserver,
        "minmax": obs.MinMaxObserver,
        "moving_average": obs.MovingAverageMinMaxObserver,
    }[observer]


def _with_activation_observer(qconfig: Any, observer: str) -> Any:
    """Return ``qconfig`` with its activation observer replaced (PTQ only; QAT keeps its fake-quant recipe)."""
    ctor = _observer_ctor(observer)

    def swap(spec: Any) -> Any:
        if spec is None:
            return None
        kwargs = dict(getattr(spec.observer_or_fake_quant_ctr, "p", None).keywords or {})
        return dataclasses.replace(spec, observer_or_fake_quant_ctr=ctor.with_args(**kwargs))

    return dataclasses.replace(
        qconfig, input_activation=swap(qconfig.input_activation), output_activation=swap(qconfig.output_activation)
    )


@functools.cache
def _shared_range_observers() -> dict[str, type]:
    """Per-channel weight observers whose channels all share one range: per-tensor numerics in per-channel form.

    x86's Inductor lowering fuses only per-channel int8 weights into its int8 conv/linear kernels; a per-tensor weight
    would fall back to dequantize + fp32 conv. Giving every channel the same (min, max) gives the same scale to every
    channel, so the int8 values equal per-tensor quantization's exactly while the fast kernels still apply.
    """
    obs = _pt2e().observer

    def shared(base: type) -> type:
        def forward(self: Any, x: torch.Tensor) -> torch.Tensor:
            out = base.forward(self, x)
            if self.min_val.numel():
                self.min_val.fill_(self.min_val.min())
                self.max_val.fill_(self.max_val.max())
            return out

        name = f"SharedRange{base.__name__}"
        return type(name, (base,), {"forward": forward, "__module__": __name__, "__qualname__": name})

    classes = [shared(obs.PerChannelMinMaxObserver), shared(obs.MovingAveragePerChannelMinMaxObserver)]
    return {cls.__name__: cls for cls in classes}


@functools.cache
def _fast_fake_quantize_class() -> type:
    """``FusedMovingAvgObsFakeQuantize`` running :func:`lightning_quant._fast_qat.fused_moving_avg_fake_quant`.

    Same buffers, state dict and results as torchao's class; only the forward's kernels differ.
    """
    from lightning_quant import _fast_qat

    base = _pt2e().fake_quantize.FusedMovingAvgObsFakeQuantize

    def forward(self: Any, X: torch.Tensor) -> torch.Tensor:
        out = _fast_qat.fused_moving_avg_fake_quant(self, X)
        return base.forward(self, X) if out is None else out

    name = "FastFusedMovingAvgObsFakeQuantize"
    return type(name, (base,), {"forward": forward, "__module__": __name__, "__qualname__": name})


def use_fast_fake_quantize(gm: nn.Module, fast: bool) -> int:
    """Switch torchao's ``FusedMovingAvgObsFakeQuantize`` modules in ``gm`` to the fast class (or back), in place.

    Only the class changes (buffers, their identity and the state dict stay), so optimizers, checkpoints and the
    observer switches are unaffected. Returns the number of modules switched.
    """
    fast_cls = _fast_fake_quantize_class()
    base = fast_cls.__base__
    old, new = (base, fast_cls) if fast else (fast_cls, base)
    n = 0
    for m in gm.modules():
        if type(m) is old:
            m.__class__ = new
            n += 1
    return n


def __getattr__(name: str) -> Any:
    # Lets pickle and ``copy`` find the lazily built observer and fake-quantize classes by name.
    if name.startswith("SharedRange"):
        classes = _shared_range_observers()
        if name in classes:
            return classes[name]
    if name == "FastFusedMovingAvgObsFakeQuantize":
        return _fast_fake_quantize_class()
    raise AttributeError(f"module {__name__!r} has no attribute {name!r}")


def _x86_per_tensor_weights(qconfig: Any, is_qat: bool) -> Any:
    """Return x86 ``qconfig`` with per-tensor weight numerics (see :func:`_shared_range_observers`)."""
    classes = _shared_range_observers()
    spec = qconfig.weight
    if is_qat:
        ctor = _pt2e().fake_quantize.FakeQuantize.with_args(
            observer=classes["SharedRangeMovingAveragePerChannelMinMaxObserver"], eps=2**-12
        )
    else:
        ctor = classes["SharedRangePerChannelMinMaxObserver"].with_args(eps=2**-12)
    return dataclasses.replace(qconfig, weight=dataclasses.replace(spec, observer_or_fake_quant_ctr=ctor))


def get_quantizer(backend: str, *, is_qat: bool = False, observer: str | None = None, per_channel: bool = True) -> Any:
    """Build the PT2E quantizer for ``backend`` ("x86" or "arm").

    x86: torchao's ``X86InductorQuantizer`` (int8 weights, uint8 activations).
    arm: ExecuTorch's ``XNNPACKQuantizer`` (symmetric int8 weights, int8 activations).
    Weights are per-channel unless ``per_channel=False`` (one scale per tensor; on x86 in per-channel form with all
    channels sharing it, so that Inductor's int8 kernels still apply).
    """
    if backend == "x86":
        xiq = _pt2e().quantizer.x86_inductor_quantizer
        qconfig = xiq.get_default_x86_inductor_quantization_config(is_qat=is_qat)
        if not per_channel:
            qconfig = _x86_per_tensor_weights(qconfig, is_qat)
        if observer and not is_qat:
            qconfig = _with_activation_observer(qconfig, observer)
        return _x86_quantizer_class()().set_global(qconfig)
    if backend == "arm":
        require_executorch(backend)
        _pt2e()
        with _quiet_import():
            from executorch.backends.xnnpack.quantizer.xnnpack_quantizer import get_symmetric_quantization_config
        qconfig = get_symmetric_quantization_config(is_per_channel=per_channel, is_qat=is_qat)
        if observer and not is_qat:
            qconfig = _with_activation_observer(qconfig, observer)
        return _xnnpack_quantizer_class()().set_global(qconfig)
    raise ValueError(f"Expected argument `backend` to be one of {list(BACKENDS)}, but got {backend!r}.")


#: ops whose output a following ReLU6/hardtanh can be fused into, as in XNNPACK (conv and batch norm: the conv-bn pair
#: of a QAT graph, whose output XNNPACKQuantizer annotates on the batch norm)
_CLAMP_PRODUCERS = {
    torch.ops.aten.conv1d.default,
    torch.ops.aten.conv2d.default,
    torch.ops.aten.linear.default,
    torch.ops.aten.batch_norm.default,
    torch.ops.aten._native_batch_norm_legit_no_training.default,
    torch.ops.aten.add.Tensor,
}
_CLAMPS = {torch.ops.aten.hardtanh.default, torch.ops.aten.hardtanh_.default}


def fuse_clamp_annotations(gm: torch.fx.GraphModule) -> int:
    """Quantize conv/linear/add + ReLU6 (hardtanh) at the clamp's output only, as ReLU already is.

    XNNPACKQuantizer (executorch 1.5) fuses only ReLU into a conv, linear or add; a hardtanh gets its own annotation
    sharing its input's qparams, so the int8 scale of ``relu6(conv(x))`` is fitted to the *unclamped* conv output. In
    EfficientNet-Lite0's stem that is a [-106, 119] range, i.e. 7 int8 levels in [0, 6]: every rounding difference
    between XNNPACK's kernels and the reference then moves an activation by 1/7 of its range, and the ``.pte`` drifts
    far from the in-process int8 model (and from fp32). Moving the producer's output spec to the clamp gives a [0, 6]
    scale; XNNPACK lowering fuses the clamp into the conv (its output min/max), so the ``.pte`` computes the same thing.
    Returns the number of clamps rewritten.
    """
    pt2e = _pt2e()
    annotation_cls = pt2e.quantizer.QuantizationAnnotation
    shared_cls = pt2e.quantizer.SharedQuantizationSpec
    key = "quantization_annotation"
    fused = 0
    for act in gm.graph.nodes:
        if act.op != "call_function" or act.target not in _CLAMPS or not act.args:
            continue
        producer = act.args[0]
        if not isinstance(producer, torch.fx.Node) or producer.target not in _CLAMP_PRODUCERS:
            continue
        produced, clamp = producer.meta.get(key), act.meta.get(key)
        spec = getattr(produced, "output_qspec", None)
        if len(producer.users) != 1 or spec is None or isinstance(spec, shared_cls) or clamp is None:
            continue
        producer.meta[key] = dataclasses.replace(produced, output_qspec=None)
        act.meta[key] = annotation_cls(input_qspec_map={}, output_qspec=spec, _annotated=True)
        fused += 1
    return fused


def quantize_before_pad(gm: torch.fx.GraphModule) -> int:
    """Quantize a zero pad's *input* (the pad then runs on int8), not its output, where only its consumers quantize.

    EfficientNet's ``Conv2dStaticSamePadding`` (and any ``nn.ZeroPad2d`` before a conv) puts a pad between a conv's
    ReLU6 and the next conv's input quantization. X86InductorQuantizer leaves the pad unannotated, so each such conv
    wrote fp32 and a separate pass padded and quantized it (27% of EfficientNet-Lite0's batch-32 time). Quantizing
    the pad's input with the same spec, and sharing it through the pad, lets Inductor fuse the quantization into the
    conv (uint8 output) and pad uint8 data; with a zero point for 0.0 the values are the same. Returns the pads moved.
    """
    pt2e = _pt2e()
    annotation_cls, shared_cls = pt2e.quantizer.QuantizationAnnotation, pt2e.quantizer.SharedQuantizationSpec
    key = "quantization_annotation"
    moved = 0
    for pad in gm.graph.nodes:
        if not is_zero_pad(pad) or getattr(pad.meta.get(key), "_annotated", False) or not pad.users:
            continue
        source = pad.args[0]
        specs = [getattr(u.meta.get(key), "input_qspec_map", {}).get(pad) for u in pad.users]
        spec = specs[0]
        if spec is None or isinstance(spec, shared_cls) or any(s is not spec and s != spec for s in specs):
            continue
        if getattr(source.meta.get(key), "output_qspec", None) is not None:
            continue  # its output is quantized already
        edge = shared_cls((source, pad))
        pad.meta[key] = annotation_cls(input_qspec_map={source: spec}, output_qspec=edge, _annotated=True)
        for user in pad.users:
            user.meta[key].input_qspec_map[pad] = edge
        moved += 1
    return moved


#: batch norm as a QAT graph holds it after a conv (not folded until convert)
_BATCH_NORMS = {
    torch.ops.aten.batch_norm.default,
    torch.ops.aten._native_batch_norm_legit.default,
    torch.ops.aten._native_batch_norm_legit_no_training.default,
    torch.ops.aten.cudnn_batch_norm.default,
}


def annotate_conv1d(quantizer: Any, gm: torch.fx.GraphModule) -> int:
    """Quantize every ``Conv1d`` as X86InductorQuantizer quantizes a lone ``Conv2d``.

    X86InductorQuantizer (torchao 0.18) quantizes a Conv1d only when a ReLU follows it: Conv1d + BatchNorm + GELU/SiLU
    (audio, text CNNs) stayed fp32 without a word, and a backbone of such layers had "nothing to quantize". Its
    input, weight and bias get the Conv2d specs; in a QAT graph, where BatchNorm is still separate, the BatchNorm's
    output is quantized, as for QAT's Conv2d + BatchNorm pattern. Returns the convolutions annotated.
    """
    config = quantizer.global_config
    if config is None:
        return 0
    xiq = _pt2e().quantizer.x86_inductor_quantizer
    key = "quantization_annotation"
    done = 0
    for conv in gm.graph.nodes:
        if conv.op != "call_function" or conv.target != torch.ops.aten.conv1d.default:
            continue
        if getattr(conv.meta.get(key), "_annotated", False):
            continue
        users = list(conv.users)
        bn = users[0] if config.is_qat and len(users) == 1 and users[0].target in _BATCH_NORMS else None
        if bn is not None and getattr(bn.meta.get(key), "_annotated", False):
            continue
        quantizer._annotate_conv_node_helper(conv, bn is None, config)
        if bn is not None:
            bn.meta[key] = xiq._X86InductorQuantizationAnnotation(
                output_qspec=xiq.get_output_act_qspec(config), _annotated=True, _is_output_of_quantized_pattern=True
            )
            for getitem in bn.users:  # the batch norm's tuple outputs, if any
                getitem.meta[key] = xiq._X86InductorQuantizationAnnotation(_annotated=True)
        done += 1
    return done


@functools.cache
def _x86_quantizer_class() -> type:
    """``X86InductorQuantizer`` that also quantizes every Conv1d, and before zero pads.

    See :func:`annotate_conv1d` and :func:`quantize_before_pad`.
    """
    xiq = _pt2e().quantizer.x86_inductor_quantizer

    def annotate(self: Any, model: torch.fx.GraphModule) -> torch.fx.GraphModule:
        model = xiq.X86InductorQuantizer.annotate(self, model)
        annotate_conv1d(self, model)  # after torchao's, which fuses Conv1d + ReLU on its own
        quantize_before_pad(model)
        return model

    name = "PadAwareX86InductorQuantizer"
    return type(name, (xiq.X86InductorQuantizer,), {"annotate": annotate, "__module__": __name__, "__qualname__": name})


@functools.cache
def _xnnpack_quantizer_class() -> type:
    """``XNNPACKQuantizer`` that also fuses ReLU6 into conv/linear/add (see :func:`fuse_clamp_annotations`)."""
    with _quiet_import():
        from executorch.backends.xnnpack.quantizer.xnnpack_quantizer import XNNPACKQuantizer

    def annotate(self: Any, model: torch.fx.GraphModule) -> torch.fx.GraphModule:
        model = XNNPACKQuantizer.annotate(self, model)
        fuse_clamp_annotations(model)
        return model

    name = "ClampFusingXNNPACKQuantizer"
    return type(name, (XNNPACKQuantizer,), {"annotate": annotate, "__module__": __name__, "__qualname__": name})


_PATTERN_CACHE: dict[tuple, torch.fx.GraphModule] = {}
_PATTERN_LOCK = threading.RLock()


_PLAIN = (bool, int, float, str, type(None), types.FunctionType, types.BuiltinFunctionType, torch._ops.OpOverload)


def _pattern_key(pattern: Any, example_inputs: tuple, is_cuda: bool, kwargs: dict) -> tuple | None:
    """What a Conv+BN pattern graph depends on: the function's code and closure, and the inputs' metadata.

    ``None`` (no caching) unless every closure value, default and non-tensor input is a plain constant or function:
    a key holding some object by identity would never hit again and would keep that object alive.
    """
    pattern = getattr(pattern, "fn", pattern)  # torchao wraps each pattern function in a ``WrapperModule``
    code = getattr(pattern, "__code__", None)
    if code is None:
        return None
    try:
        closure = tuple(c.cell_contents for c in pattern.__closure__ or ())
    except ValueError:  # an empty cell
        return None
    kwdefaults = tuple(sorted((pattern.__kwdefaults__ or {}).items()))
    constants, inputs = [*closure, *(pattern.__defaults__ or ()), *(v for _, v in kwdefaults)], []
    for v in (*example_inputs, *(kwargs[k] for k in sorted(kwargs))):
        if isinstance(v, torch.Tensor):
            inputs.append(("tensor", tuple(v.shape), v.dtype, v.device.type))
        else:
            inputs.append((type(v), v))
            constants.append(v)
    if not all(isinstance(v, _PLAIN) for v in constants):
        return None

    def typed(values: Any) -> tuple:  # True == 1 == 1.0 as dict keys: keep the type with each value
        return tuple((type(v), v) for v in values)

    defaults = (typed(pattern.__defaults__ or ()), typed(v for _, v in kwdefaults), tuple(k for k, _ in kwdefaults))
    return (code, typed(closure), defaults, tuple(inputs), tuple(sorted(kwargs)), bool(is_cuda))


@contextlib.contextmanager
def _cached_conv_bn_patterns() -> Iterator[None]:
    """Export each of torchao's Conv+BN pattern graphs once per process.

    ``prepare_qat_pt2e`` and ``convert_pt2e`` export up to 24 small pattern functions per conv kind with
    ``torch.export`` on every call (~0.1 s each: ~10 s of a QAT convert). A pattern graph depends only on the function
    and the example inputs' shapes, dtypes and device, so it is cached on those; callers get a deep copy (replacement
    passes may edit it).
    """
    from torchao.quantization.pt2e import qat_utils

    original = qat_utils._get_aten_graph_module_for_pattern

    def cached(pattern: Any, example_inputs: tuple, is_cuda: bool = False, **kwargs: Any) -> torch.fx.GraphModule:
        key = _pattern_key(pattern, example_inputs, is_cuda, kwargs)
        if key is None:
            return original(pattern, example_inputs, is_cuda, **kwargs)
        if key not in _PATTERN_CACHE:
            _PATTERN_CACHE[key] = original(pattern, example_inputs, is_cuda, **kwargs)
        return deepcopy(_PATTERN_CACHE[key])

    with _PATTERN_LOCK:  # two threads patching at once could leave the wrapper installed for good
        qat_utils._get_aten_graph_module_for_pattern = cached
        try:
            yield
        finally:
            qat_utils._get_aten_graph_module_for_pattern = original


#: ops whose weight and bias (arguments 1 and 2) the quantizers annotate
_WEIGHTED = {
    torch.ops.aten.conv1d.default,
    torch.ops.aten.conv2d.default,
    torch.ops.aten.conv_transpose2d.input,
    torch.ops.aten.linear.default,
}


def unshare_weights(gm: torch.fx.GraphModule) -> int:
    """Give each conv/linear call its own ``get_attr`` node for a weight (or bias) that several calls read.

    A module called twice (a shared Conv2d) reads one weight node from two convs. XNNPACKQuantizer's QAT annotation
    skips a conv whose weight node is annotated already, so the second call kept an fp32 weight behind int8
    activations, and the ``.pte`` failed to load ("Failed to create convolution node ... xnn_status_invalid_parameter").
    Separate nodes for the same parameter get a quantization each (the same scales: the same values). Returns the
    nodes added.
    """
    added = 0
    for node in list(gm.graph.nodes):
        if node.op != "call_function" or node.target not in _WEIGHTED:
            continue
        for index in (1, 2):
            attr = node.args[index] if len(node.args) > index else None
            if not isinstance(attr, torch.fx.Node) or attr.op != "get_attr" or len(attr.users) < 2:
                continue
            with gm.graph.inserting_before(node):
                own = gm.graph.get_attr(attr.target)
            own.meta = dict(attr.meta)
            node.replace_input_with(attr, own)
            added += 1
    if added:
        gm.recompile()
    return added


def own_attributes_per_read(gm: torch.fx.GraphModule) -> int:
    """Point every ``get_attr`` node but the first of a tensor attribute at a copy of its own.

    torchao folds a BatchNorm into its conv by writing the folded weight back to the conv's weight attribute (at
    ``prepare_pt2e``; for QAT at ``convert_pt2e``). A conv module called twice (a shared head, a siamese encoder) had
    both folds write to one attribute: the second call folded its BatchNorm into the first call's result, and both
    calls used that (int8 outputs off by the whole output range). Copies are made only for tensors read more than once.
    Returns the copies made.
    """
    seen: set[str] = set()
    made = 0
    for node in gm.graph.nodes:
        if node.op != "get_attr":
            continue
        value = functools.reduce(getattr, node.target.split("."), gm)
        if node.target not in seen or not isinstance(value, torch.Tensor):
            seen.add(node.target)
            continue
        i = 0
        while hasattr(gm, f"{node.target.replace('.', '_')}_read{i}"):
            i += 1
        name = f"{node.target.replace('.', '_')}_read{i}"
        copy = value.detach().clone()
        if isinstance(value, nn.Parameter):
            gm.register_parameter(name, nn.Parameter(copy, requires_grad=value.requires_grad))
        else:
            gm.register_buffer(name, copy)
        node.target = name
        made += 1
    if made:
        gm.recompile()
    return made


def prepare(gm: torch.fx.GraphModule, quantizer: Any, *, is_qat: bool = False) -> torch.fx.GraphModule:
    unshare_weights(gm)
    if not is_qat:  # PTQ folds BatchNorms here; QAT trains the shared Parameter and folds in `convert`, on a copy
        own_attributes_per_read(gm)
    q = _pt2e().quantize_pt2e
    if not is_qat:
        return q.prepare_pt2e(gm, quantizer)
    with _cached_conv_bn_patterns():
        return q.prepare_qat_pt2e(gm, quantizer)


_BN_EPS_KEY = "lightning_quant_bn_eps"


def _bn_eps_arg(node: torch.fx.Node) -> tuple[int, str] | None:
    """Position and name of a batch norm node's eps argument (``None`` for other nodes)."""
    if node.op != "call_function" or not isinstance(node.target, torch._ops.OpOverload):
        return None
    if "batch_norm" not in node.target.__name__:
        return None
    names = [a.name for a in node.target._schema.arguments]
    for name in ("eps", "epsilon"):  # cudnn_batch_norm and miopen_batch_norm say "epsilon"
        if name in names:
            return names.index(name), name
    return None


def _get_bn_eps(node: torch.fx.Node) -> float | None:
    arg = _bn_eps_arg(node)
    if arg is None:
        return None
    index, name = arg
    value = node.args[index] if len(node.args) > index else node.kwargs.get(name)
    return None if value is None else float(value)


def _set_bn_eps(node: torch.fx.Node, eps: float) -> None:
    arg = _bn_eps_arg(node)
    if arg is None:
        return
    index, name = arg
    if len(node.args) > index:
        node.args = (*node.args[:index], eps, *node.args[index + 1 :])
    else:
        node.kwargs = {**node.kwargs, name: eps}


@contextlib.contextmanager
def _fold_with_the_graphs_bn_eps(prepared: torch.fx.GraphModule) -> Iterator[None]:
    """Fold each Conv+BN pair of a QAT graph with its own BatchNorm ``eps``, not torchao's ``1e-5``.

    ``convert_pt2e`` (torchao 0.18) replaces the QAT Conv+BN pattern by a conv + batch norm whose literals come from
    its pattern function (``eps=1e-5``; "TODO: allow setting eps"), and folds the batch norm into the conv weight
    with that eps. The fake-quant model trained with the module's eps, so for ``eps != 1e-5`` and channels of small
    running variance the int8 model computed another function (EfficientNet-Lite0, ``eps=1e-3``: the converted model
    agreed with its own fake-quant model on 83% of images). The replacement batch norm inherits the matched node's
    ``meta``: the eps is recorded there and written back just before the fold.
    """
    from torchao.quantization.pt2e import qat_utils

    for node in prepared.graph.nodes:
        eps = _get_bn_eps(node)
        if eps is not None:
            node.meta[_BN_EPS_KEY] = eps
    original = qat_utils.fold_bn_weights_into_conv_node

    def fold(conv_node: Any, conv_weight_node: Any, conv_bias_node: Any, bn_node: Any, *args: Any, **kwargs: Any):
        eps = bn_node.meta.get(_BN_EPS_KEY)
        if eps is not None:
            _set_bn_eps(bn_node, eps)
        return original(conv_node, conv_weight_node, conv_bias_node, bn_node, *args, **kwargs)

    qat_utils.fold_bn_weights_into_conv_node = fold
    try:
        yield
    finally:
        qat_utils.fold_bn_weights_into_conv_node = original


@contextlib.contextmanager
def _fold_only_the_graphs_conv_kinds() -> Iterator[None]:
    """Skip torchao's Conv+BN fold patterns for the conv kinds a QAT graph does not call.

    ``convert_pt2e`` (torchao 0.18) runs its fold pass for conv1d, conv2d, conv_transpose1d and conv_transpose2d
    whatever the graph holds; each exports 24 pattern graphs (~0.2 s apiece the first time in a process: ~15 s of a
    first QAT convert), and a pattern can only match a call of its conv op. For a kind the graph does not call, this
    runs what the pass does to a graph where nothing matches: its graph normalizations, no pattern exports.
    """
    from torch.nn import functional as F
    from torchao.quantization.pt2e import qat_utils

    aten = torch.ops.aten
    anchors = {
        F.conv1d: aten.conv1d.default,
        F.conv2d: aten.conv2d.default,
        F.conv_transpose1d: aten.conv_transpose1d.default,
        F.conv_transpose2d: aten.conv_transpose2d.input,
    }
    original = qat_utils._fold_conv_bn_qat_helper

    def helper(m: torch.fx.GraphModule, conv_fn: Any, *args: Any, **kwargs: Any) -> torch.fx.GraphModule:
        anchor = anchors.get(conv_fn)
        if anchor is None or any(n.op == "call_function" and n.target == anchor for n in m.graph.nodes):
            return original(m, conv_fn, *args, **kwargs)
        m.graph.eliminate_dead_code()
        m.recompile()
        qat_utils._duplicate_dequantize_node(m)
        m.delete_all_unused_submodules()  # what each pattern replacement does on its way out, match or not
        m.recompile()
        qat_utils._remove_extra_dequantize(m)
        m.graph.eliminate_dead_code()
        m.recompile()
        return m

    qat_utils._fold_conv_bn_qat_helper = helper
    try:
        yield
    finally:
        qat_utils._fold_conv_bn_qat_helper = original


_SYMMETRIC = (torch.per_tensor_symmetric, torch.per_channel_symmetric)


def _trained_qparams(fq: nn.Module) -> tuple[torch.Tensor, torch.Tensor]:
    """The scale and zero point ``fq`` fake-quantizes with, in the dtypes and shapes its observer would return.

    Symmetric (weight) schemes keep a zero point of 0: where ATen's op trained a channel on another grid (all its
    weights of one sign, or all zero: it then picks an asymmetric range, or scale 0.1 and zero point 127), that
    channel takes the observer's symmetric scale instead. XNNPACK and oneDNN store no weight zero points and would
    silently compute with 0.
    """
    scale, zero_point = type(fq).calculate_qparams(fq)
    trained_scale = fq.scale.detach().to(scale.dtype).reshape(scale.shape)
    trained_zero_point = fq.zero_point.detach().to(zero_point.dtype).reshape(zero_point.shape)
    if getattr(fq, "qscheme", None) in _SYMMETRIC:
        keep = trained_zero_point == 0
        trained_scale = torch.where(keep, trained_scale, scale)
        trained_zero_point = torch.where(keep, trained_zero_point, zero_point)
    return trained_scale.clone(), trained_zero_point.clone()


def use_trained_qparams(prepared: nn.Module) -> int:
    """Make ``convert_pt2e`` quantize with the scales and zero points the fake-quant model used, in place.

    ``convert_pt2e`` asks each fake-quantize module's observer for fresh qparams (``calculate_qparams``). ATen's fused
    fake-quantize op, which computed the ones the model trained with, uses another formula for symmetric ranges
    (for int8 in [-128, 127]: ``|min|/128`` or ``max/127`` where the observer takes ``max(|min|, max)/127.5``) and its
    own zero-point nudging; so every per-channel weight of an x86 QAT model was requantized on a grid ~0.4% off the
    trained one (one step apart for many weights: EfficientNet-Lite0's stem moved by up to 35 of 255 output steps).
    Returns the number of modules switched. (Fixed upstream after torchao 0.18 by pytorch/ao#4824, behind a flag.)
    """
    n = 0
    for m in prepared.modules():
        if is_fake_quantize(m) and isinstance(getattr(m, "scale", None), torch.Tensor):
            m.calculate_qparams = functools.partial(_trained_qparams, m)
            n += 1
    return n


def convert(prepared: torch.fx.GraphModule) -> torch.fx.GraphModule:
    """``convert_pt2e``, with the qparams and BatchNorm eps a fake-quant model used.

    It mutates its input in place, so callers pass a copy they own.
    """
    use_trained_qparams(prepared)
    own_attributes_per_read(prepared)  # each call of a shared conv folds its own BatchNorm
    # the lock (re-entrant) also guards the patched fold: two threads patching at once could leave it installed
    with (
        _PATTERN_LOCK,
        _fold_with_the_graphs_bn_eps(prepared),
        _fold_only_the_graphs_conv_kinds(),
        _cached_conv_bn_patterns(),
    ):
        return _pt2e().quantize_pt2e.convert_pt2e(prepared)


def is_observer(module: nn.Module) -> bool:
    pt2e = _pt2e()
    return isinstance(module, (pt2e.ObserverBase, pt2e.FakeQuantizeBase))


def is_fake_quantize(module: nn.Module) -> bool:
    return isinstance(module, _pt2e().FakeQuantizeBase)


def enable_observer(module: nn.Module) -> None:
    """Torchao's ``enable_observer`` (``torch.ao``'s does nothing to torchao FakeQuantize modules)."""
    _pt2e().enable_observer(module)


def disable_observer(module: nn.Module) -> None:
    _pt2e().disable_observer(module)


def count_observers(gm: nn.Module) -> int:
    return sum(is_observer(m) for m in gm.modules())


def nonfinite_observers(gm: torch.fx.GraphModule) -> list[torch.fx.Node]:
    """The graph's observer calls whose recorded range holds NaN or +-inf (observers that saw no data excepted)."""
    found = []
    for node in gm.graph.nodes:
        if node.op != "call_module" or not is_observer(m := gm.get_submodule(node.target)):
            continue
        lo, hi = getattr(m, "min_val", None), getattr(m, "max_val", None)
        if not (torch.is_tensor(lo) and torch.is_tensor(hi)) or not lo.numel() or not hi.numel():
            continue
        untouched = bool((lo == math.inf).all() and (hi == -math.inf).all())
        if not untouched and not bool(torch.isfinite(lo).all() and torch.isfinite(hi).all()):
            found.append(node)
    return found


def allow_train_eval(gm: torch.fx.GraphModule) -> None:
    """Let ``.train()``/``.eval()`` pass over a prepared graph (its literals are handled separately)."""
    _pt2e().allow_exported_model_train_eval(gm)


# ------------------------------------------------------------------------------------------------------ executorch


def lower_to_executorch(ep: torch.export.ExportedProgram) -> tuple[bytes, list[str]]:
    """Lower an int8 exported program to an XNNPACK-delegated ExecuTorch program.

    Returns:
        The ``.pte`` bytes and the names of the ops left outside the XNNPACK delegate (empty when fully delegated).
    """
    require_executorch()
    with _quiet_import():
        from executorch.backends.xnnpack.partition.xnnpack_partitioner import XnnpackPartitioner
        from executorch.exir import to_edge_transform_and_lower

    edge = to_edge_transform_and_lower(
        ep, transform_passes=[infer_symbolic_view_dim], partitioner=[XnnpackPartitioner()]
    )
    _restore_dim_ranges(edge, ep)
    names = (
        getattr(n.target, "__name__", str(n.target))
        for n in edge.exported_program().graph.nodes
        if n.op == "call_function"
    )
    undelegated = sorted({n for n in names if n not in ("executorch_call_delegate", "getitem", "sym_size.int")})
    return edge.to_executorch().buffer, undelegated


def infer_symbolic_view_dim(gm: torch.fx.GraphModule) -> Any:
    """Write a view's one symbolic size (the dynamic batch of a ``Flatten``: ``view_copy(x, [s0, 1280])``) as ``-1``.

    XNNPACK's partitioner refuses a reshape whose target shape holds a symbolic size, but takes one inferred (``-1``)
    size; with every other output size a constant (taken from the node's output shape, so ``x.view(x.size(0), -1)``
    works too), ``-1`` is the same shape. Without this the ``view_copy`` of every
    ``Flatten`` with a dynamic batch stayed outside the delegate, on ExecuTorch's portable kernels.
    """
    from torch.fx.passes.infra.pass_base import PassResult

    changed = False
    for node in gm.graph.nodes:
        if node.op != "call_function" or "view_copy" not in str(node.target) or len(node.args) < 2:
            continue
        val = node.meta.get("val")  # the output's (fake) tensor: its sizes are ints except the dynamic ones
        sizes = list(val.shape) if isinstance(val, torch.Tensor) else list(node.args[1])
        symbolic = [i for i, d in enumerate(sizes) if not isinstance(d, int)]
        if len(symbolic) != 1 or (not isinstance(val, torch.Tensor) and -1 in sizes):
            continue
        shape = [-1 if i == symbolic[0] else int(d) for i, d in enumerate(sizes)]  # x.view(x.size(0), -1) too
        if shape != list(node.args[1]):
            node.update_arg(1, shape)
            changed = True
    if changed:
        gm.recompile()
    return PassResult(gm, changed)


def _restore_dim_ranges(edge: Any, ep: torch.export.ExportedProgram) -> None:
    """Undo a batch-range shrink that XNNPACK lowering causes (executorch 1.5).

    Its channels-last pass re-runs fake convolutions, whose backend choice guards on ``batch < 16``; the guard narrows
    the batch symbol to [2, 15] (or [16, max]) and memory planning then sizes buffers for 15, so any larger batch
    fails at run time. Restoring the exported upper bound before ``to_executorch()`` plans for ``max_batch_size``.
    """
    from torch.utils._sympy.value_ranges import ValueRanges

    original = ep.range_constraints
    for node in edge.exported_program().graph.nodes:
        val = node.meta.get("val") if node.op == "placeholder" else None
        if not isinstance(val, torch.Tensor):
            continue
        for d in val.shape:
            if isinstance(d, torch.SymInt):
                env = d.node.shape_env
                for sym, vr in list(env.var_to_range.items()):
                    if sym in original:
                        env.var_to_range[sym] = ValueRanges(vr.lower, original[sym].upper)


def load_executorch_method(program: str | bytes) -> Any:
    """Load the ``forward`` method of a ``.pte`` program (its path or bytes) with the ExecuTorch runtime + XNNPACK."""
    require_executorch()
    with _quiet_import():
        from executorch.runtime import Runtime

    loaded = Runtime.get().load_program(program)
    method = loaded.load_method("forward")
    method.lq_program = loaded  # the Program holds the bytes the method runs from: keep it as long as the method
    return method


def executorch_threads() -> int | None:
    """Threads of ExecuTorch's threadpool (the one XNNPACK delegates run on); None without ``executorch``."""
    try:
        with _quiet_import():
            from executorch.extension.pybindings.portable_lib import _threadpool_get_thread_count
    except ImportError:
        return None
    return int(_threadpool_get_thread_count())


def set_num_threads(n: int) -> None:
    """``torch.set_num_threads(n)``, and the same for ExecuTorch's threadpool when ``executorch`` is installed.

    Call it before loading a ``.pte``: ExecuTorch's reset frees the threadpool that programs loaded before it still
    point to (running one afterwards crashed here).
    """
    torch.set_num_threads(n)
    if executorch_threads() not in (None, n):
        from executorch.extension.pybindings.portable_lib import _unsafe_reset_threadpool

        _unsafe_reset_threadpool(n)
