"""Quantization-aware training on a PT2E graph, without Lightning: the fake-quant stand-in for a float submodule.

``QATGraph`` replaces a float submodule in place. On its first call it captures the submodule with ``torch.export`` from
the real inputs (train mode, dynamic batch) and prepares it with the backend's QAT quantizer (Conv+BN fused, FakeQuant
on weights and activations). The prepared graph shares the float module's Parameter objects, so an existing optimizer,
its momentum buffers and LR schedule go on untouched.

It also fixes what PT2E graphs get wrong inside a training framework:

* ``.train()``/``.eval()`` raise on exported graphs: here they only move flags, and each forward sets the graph's
  BatchNorm/dropout ``training`` literals from ``self.training`` (Lightning restores modes by flag, never by call);
* torchao's own train/eval helpers and ``prepare_qat_pt2e`` rewrite BN ``eps``/``momentum`` and dropout ``p`` to
  defaults: the user's values are written back;
* FakeQuantize modules observe even in eval mode: observers are switched off whenever the graph is not training.
"""

from __future__ import annotations

from typing import Any

import torch
from torch import nn
from torch.utils._pytree import tree_flatten, tree_unflatten, treespec_dumps, treespec_loads

from lightning_quant import _fast_qat, _torchao
from lightning_quant.capture import (
    SELF,
    CallNormalizer,
    deepcopy,
    detach_inputs,
    export,
    graph_to_cpu,
    retarget_devices,
    shape_mismatch,
    used_state_bytes,
)
from lightning_quant.config import QuantConfig, QuantizationError
from lightning_quant.quantize import META_KEY, capturable, strip_unused_attrs

aten = torch.ops.aten
_BATCH_NORM = (aten.batch_norm.default, aten._native_batch_norm_legit.default, aten.cudnn_batch_norm.default)
_DROPOUT = (aten.dropout.default,)


def set_graph_training(
    gm: torch.fx.GraphModule, train: bool, bn_frozen: bool = False, keep_eval: frozenset[str] = frozenset()
) -> bool:
    """Flip only the ``training`` literal of BatchNorm and dropout nodes.

    BatchNorm stays in eval when ``bn_frozen``; the nodes named in ``keep_eval`` (layers the user put in eval mode
    inside a training submodule) stay in eval always.
    """
    changed = False
    for node in gm.graph.nodes:
        if node.op != "call_function":
            continue
        if node.target in _BATCH_NORM:
            bn_train = bool(train and not bn_frozen and node.name not in keep_eval)
            if node.args[5] != bn_train:
                node.args = (*node.args[:5], bn_train, *node.args[6:])
                changed = True
        elif node.target in _DROPOUT:
            drop_train = bool(train and node.name not in keep_eval)
            if node.args[2] != drop_train:
                node.args = (*node.args[:2], drop_train, *node.args[3:])
                changed = True
    if changed:
        gm.recompile()
    return changed


def restore_bn_literals(gm: torch.fx.GraphModule, float_module: nn.Module) -> int:
    """Write the float module's BatchNorm ``momentum``/``eps`` back into the prepared graph.

    ``prepare_qat_pt2e`` hard-codes ``momentum=0.1, eps=1e-5`` in the fused Conv+BN pattern (including the
    ``running_var + eps`` node that scales the weight). Returns the number of BatchNorm nodes fixed.
    """
    fixed = 0
    for node in gm.graph.nodes:
        if node.op != "call_function" or node.target not in _BATCH_NORM:
            continue
        running_var = node.args[4]
        if getattr(running_var, "op", None) != "get_attr":
            continue
        owner = running_var.target.rpartition(".")[0]
        try:
            bn = float_module.get_submodule(owner)
        except AttributeError:
            continue
        if not isinstance(bn, nn.modules.batchnorm._BatchNorm):
            continue
        momentum = 0.1 if bn.momentum is None else float(bn.momentum)
        node.args = (*node.args[:6], momentum, float(bn.eps), *node.args[8:])
        for user in list(running_var.users):
            if user.target == aten.add.Tensor and len(user.args) == 2 and isinstance(user.args[1], float):
                user.args = (user.args[0], float(bn.eps))
        fixed += 1
    gm.recompile()
    return fixed


def eval_mode_nodes(gm: torch.fx.GraphModule, float_module: nn.Module) -> frozenset[str]:
    """The BatchNorm and dropout nodes of ``gm`` whose layer in ``float_module`` is in eval mode.

    A layer the user put in eval mode inside a training submodule (BatchNorm kept frozen while fine-tuning, say)
    keeps that mode in the graph, as Lightning keeps it on the float module.
    """
    if not float_module.training:
        return frozenset()  # the whole submodule in eval: the graph's own mode covers it
    in_eval = {name for name, m in float_module.named_modules() if name and not m.training}
    if not in_eval:
        return frozenset()
    names = set()
    for node in gm.graph.nodes:
        if node.op != "call_function" or node.target not in _BATCH_NORM + _DROPOUT:
            continue
        owner = None
        if node.target in _BATCH_NORM and getattr(node.args[4], "op", None) == "get_attr":
            owner = node.args[4].target.rpartition(".")[0]  # running_var's owner
        stack = node.meta.get("nn_module_stack") or {}
        paths = [owner] if owner else []
        paths += [_local_path(path) for path, _ in stack.values()]
        if any(p in in_eval or any(p.startswith(e + ".") for e in in_eval) for p in paths if p):
            names.add(node.name)
    return frozenset(names)


def _local_path(path: str) -> str:
    """``nn_module_stack`` paths as attribute paths: ``L['self'].layer[0]`` / ``layer.0`` -> ``layer.0``."""
    path = path.replace("L['self'].", "").replace("L['self']", "")
    return path.replace("[", ".").replace("]", "").replace("'", "").strip(".")


def count_unobserved(gm: nn.Module) -> int:
    """The fake-quantize modules in ``gm`` whose observer has never seen a tensor (no range, so no scale)."""
    n = 0
    for m in gm.modules():
        obs = getattr(m, "activation_post_process", None) if _torchao.is_fake_quantize(m) else None
        min_val = getattr(obs, "min_val", None)
        if isinstance(min_val, torch.Tensor) and (min_val.numel() == 0 or not bool(torch.isfinite(min_val).all())):
            n += 1
    return n


def _affine_batch_norms(shell: nn.Module) -> None:
    """Give each ``affine=False`` BatchNorm of the capture shell a fixed scale of 1 and shift of 0 (same outputs).

    torchao's QAT Conv+BN pattern divides the BatchNorm weight by the running std, and ``None`` crashes it at the first
    call. Constant buffers, not Parameters: nothing new trains, and the user's module is untouched.
    """
    for layer in shell.modules():
        if isinstance(layer, nn.modules.batchnorm._BatchNorm) and layer.weight is None and layer.num_features:
            ref = layer.running_mean if layer.running_mean is not None else torch.empty(0)
            del layer.weight, layer.bias  # registered as None Parameters
            layer.register_buffer("weight", torch.ones(layer.num_features, dtype=ref.dtype, device=ref.device))
            layer.register_buffer("bias", torch.zeros(layer.num_features, dtype=ref.dtype, device=ref.device))


def _refuse_cumulative_batch_norm(module: nn.Module, name: str, err: Exception) -> None:
    """Name a BatchNorm with ``momentum=None`` as the reason a training-mode capture failed."""
    for layer_name, layer in module.named_modules():
        if isinstance(layer, nn.modules.batchnorm._BatchNorm) and layer.momentum is None:
            raise QuantizationError(
                f"QAT cannot capture {name!r}: its BatchNorm {layer_name or name!r} has momentum=None (a cumulative "
                "average over all batches so far, which torch.export cannot trace in training). Give it a momentum "
                "(e.g. `momentum=0.1`, PyTorch's default), or leave this submodule out of `modules=`."
            ) from err


def _refuse_batch_norm_called_twice(ep: torch.export.ExportedProgram, module: nn.Module, name: str) -> None:
    """Refuse a Conv2d's BatchNorm called more than once per forward in training (torchao's QAT fusion fails on it).

    A Conv-BN encoder applied to two inputs failed inside torchao: at capture on x86 ("Input partition has more than
    one output node"), at convert on arm ("Tried to erase Node add_ but it still had 1 users"), after training.
    """
    calls: dict[str, set[str]] = {}
    after_conv2d: set[str] = set()  # Conv1d + BatchNorm1d called twice trains and converts (checked): not refused
    for node in ep.graph.nodes:
        if node.op != "call_function" or "batch_norm" not in str(node.target):
            continue
        stack = node.meta.get("nn_module_stack") or {}
        key, (fqn, cls) = next(reversed(stack.items()), ("", ("", None)))
        if "BatchNorm" not in str(cls):
            continue
        fqn = fqn.partition("@")[0]
        calls.setdefault(fqn, set()).add(key)  # every call: one after a conv and one elsewhere fails too
        source = node.args[0] if node.args else None
        if isinstance(source, torch.fx.Node) and source.target == torch.ops.aten.conv2d.default:
            after_conv2d.add(fqn)
    for fqn, keys in calls.items():
        if len(keys) > 1 and fqn in after_conv2d:
            layer = fqn.removeprefix("L['self'].") or name
            raise QuantizationError(
                f"QAT cannot train {name!r} ({type(module).__name__}): its BatchNorm {layer!r} is called {len(keys)} "
                "times per forward (a module applied to several inputs, as in a siamese encoder), and torchao's QAT "
                "conv-BatchNorm fusion takes one call per BatchNorm. Quantize it with PTQCallback (which handles "
                "it), or give each call a BatchNorm of its own."
            )


def is_captured_state(extra: Any) -> bool:
    """Whether a state_dict ``_extra_state`` value is that of a captured :class:`QATGraph`."""
    return isinstance(extra, dict) and bool(extra.get("example_spec"))


def to_float_names(state_dict: dict[str, Any], prefix: str) -> None:
    """Rename an uncaptured graph's state under ``prefix`` to its float module's names (``source.*`` -> ``*``)."""
    state_dict.pop(prefix + "_extra_state", None)
    source = prefix + "source."
    for key in [k for k in state_dict if k.startswith(source)]:
        state_dict[prefix + key[len(source) :]] = state_dict.pop(key)


def _float_state_until_captured(graph: QATGraph, state_dict: dict[str, Any], prefix: str, local_metadata: Any) -> None:
    """``state_dict`` post-hook: a graph not captured yet saves exactly its float module's state.

    A checkpoint written while a target had not been called yet (a submodule ``training_step`` never reached) then
    loads back into the float model, for a resume as for plain ``load_state_dict``.
    """
    if graph.gm is None:
        to_float_names(state_dict, prefix)


def _float_state_into_source(graph: QATGraph, state_dict: dict[str, Any], prefix: str, *args: Any) -> None:
    """``load_state_dict`` pre-hook, the inverse of :func:`_float_state_until_captured` for a graph not captured."""
    if graph.gm is not None:
        return
    state_dict.setdefault(prefix + "_extra_state", graph.get_extra_state())
    if "source" in graph._modules:
        for key in graph.source.state_dict(keep_vars=True):
            if prefix + key in state_dict and prefix + "source." + key not in state_dict:
                state_dict[prefix + "source." + key] = state_dict.pop(prefix + key)


class QATGraph(nn.Module):
    """The fake-quant stand-in for one float submodule (see the module docstring).

    Args:
        module: the float submodule; its Parameters and buffers are shared, not copied.
        name: its dotted name (for messages and artifact names).
        config: backend and export settings.
    """

    is_lightning_quant_stand_in = True

    def __init__(self, module: nn.Module, name: str, config: QuantConfig) -> None:
        super().__init__()
        self._float = [module]
        if name != SELF:
            # Until captured, the float module is a child (so state_dict/.to()/parameters() still see it); after
            # capture its Parameters and buffers live in the graph and it is only referenced. For "self" the root
            # owns them already (and a child pointing back at the root would be a cycle).
            self.source = module
        self.name = name
        self.config = config
        self.gm: torch.fx.GraphModule | None = None
        self.fp32_size_bytes: int | None = None  # what the captured graph reads (not unused layers)
        self.example_inputs: tuple[tuple, dict] | None = None
        self.bn_frozen = False
        self.observers_frozen = False
        self._graph_training: bool | None = None
        self._keep_eval: frozenset[str] = frozenset()  # nodes of layers the user keeps in eval mode
        self._fake_quants: list[nn.Module] = []
        self._shared_buffers: dict[str, str] = {}  # float module buffer name -> the graph's buffer of the same tensor
        self._unused_buffers: list[tuple[nn.Module, str, nn.Module]] = []  # (float owner, name, holder in `unused`)
        self.training_calls = 0  # train-mode calls: the callback checks that training goes through the graph
        self._example_from_checkpoint = False  # the checkpoint keeps 2 samples: the next training batch replaces them
        # until captured, checkpoints hold the float module's state under its own names (see the hooks)
        self.register_state_dict_post_hook(_float_state_until_captured)
        self.register_load_state_dict_pre_hook(_float_state_into_source)

    @property
    def float_module(self) -> nn.Module:
        return self._float[0]

    @property
    def captured(self) -> bool:
        return self.gm is not None

    # ------------------------------------------------------------------------------------------------- modes

    def train(self, mode: bool = True) -> QATGraph:
        self.training = mode
        for m in self.modules():
            m.training = mode  # flags only: exported graphs raise on .train()/.eval()
        return self

    def freeze_bn(self) -> None:
        """BatchNorm uses and keeps its running statistics, in training too."""
        self.bn_frozen = True
        self._graph_training = None  # re-sync literals on the next call

    def freeze_observers(self) -> None:
        """Scales and zero points stop changing."""
        self.observers_frozen = True
        if self.gm is not None:
            self.gm.apply(_torchao.disable_observer)

    def _sync(self) -> None:
        assert self.gm is not None
        if self._graph_training is None or self._graph_training != self.training:
            set_graph_training(self.gm, self.training, self.bn_frozen, self._keep_eval)
            self._graph_training = self.training
        observe = self.training and not self.observers_frozen
        # Read the real buffer, not a Python flag: a checkpoint may have been saved while observers were off.
        fq = self._fake_quants[0] if self._fake_quants else None
        if fq is not None and bool(fq.observer_enabled[0]) != observe:
            self.gm.apply(_torchao.enable_observer if observe else _torchao.disable_observer)

    # ----------------------------------------------------------------------------------------------- capture

    def _apply(self, fn: Any, recurse: bool = True) -> QATGraph:
        """``.to()``/``.cuda()``/``.double()``: also keep the float module and the graph's recorded devices in step.

        After capture the float module is no longer a child; its Parameters are the graph's (moved in place), but a
        move replaces buffer tensors, so its buffers are pointed at the graph's moved ones. The devices export recorded
        in the graph follow the Parameters.
        """
        super()._apply(fn, recurse)
        if self.gm is not None:
            buffers = dict(self.gm.named_buffers())
            for name, graph_name in self._shared_buffers.items():
                owner, _, attr = name.rpartition(".")
                self.float_module.get_submodule(owner)._buffers[attr] = buffers[graph_name]
            for owner, attr, holder in self._unused_buffers:
                owner._buffers[attr] = holder._buffers[attr]
            device = next((p.device for p in self.gm.parameters()), None)
            if device is not None:
                retarget_devices(self.gm, device)
        return self

    def capture(self, args: tuple, kwargs: dict, device: torch.device | None = None) -> None:
        """Export the float module in train mode from ``(args, kwargs)`` and prepare it for QAT.

        ``device``: where to trace the tensors of ``(args, kwargs)`` (default: where they are).
        """
        module = self.float_module
        modes = {m: m.training for m in module.modules()}  # module.train() sets them all: restored after
        module.train()
        try:
            self.example_inputs = detach_inputs(args, kwargs)  # CPU copies, for checkpoints and the int8 export
            self._normalize = CallNormalizer(module, args, kwargs)
            shell = capturable(module, self.config.backend)  # shares the Parameters: the optimizer keeps working
            _affine_batch_norms(shell)
            live = detach_inputs(args, kwargs, device=device)
            try:
                ep = export(
                    shell,
                    *live,
                    max_batch_size=self.config.max_batch_size,
                    name=self.name,
                    dynamic_dims=self.config.dynamic_dims,
                )
            except QuantizationError as err:
                _refuse_cumulative_batch_norm(module, self.name, err)
                raise
        finally:
            for m, mode in modes.items():
                m.training = mode
        _refuse_batch_norm_called_twice(ep, module, self.name)
        self.fp32_size_bytes = used_state_bytes(ep)
        quantizer = _torchao.get_quantizer(self.config.backend, is_qat=True, per_channel=self.config.per_channel)
        gm = _torchao.prepare(ep.module(), quantizer, is_qat=True)
        if _torchao.count_observers(gm) == 0:
            raise ValueError(
                f"The {self.config.backend!r} quantizer found nothing to quantize in {self.name!r} "
                f"({type(module).__name__}). Choose submodules with Conv/Linear layers via `modules=`."
            )
        restore_bn_literals(gm, module)
        _fast_qat.install(gm)  # the same function, fewer full-size passes; convert() undoes it on its copy
        self._modules.pop("source", None)
        if self.name != SELF:  # the root keeps its own; a submodule's unused tensors would leave the model
            self._keep_unused(module, gm)
        # on the Parameters' device, as every buffer (DDP broadcasts them all, NCCL only from the GPU)
        self._keep_example(*self.example_inputs, device=next((p.device for p in module.parameters()), None))
        self.gm = gm
        self._keep_eval = eval_mode_nodes(gm, module)
        graph_buffers = {id(b): n for n, b in gm.named_buffers()}
        self._shared_buffers = {n: graph_buffers[id(b)] for n, b in module.named_buffers() if id(b) in graph_buffers}
        self._fake_quants = [m for m in gm.modules() if _torchao.is_fake_quantize(m)][:1]  # a list: not a child
        self._graph_training = None
        if self.observers_frozen:
            gm.apply(_torchao.disable_observer)

    def _keep_unused(self, module: nn.Module, gm: torch.fx.GraphModule) -> None:
        """Keep the float module's Parameters and buffers its ``forward`` never uses under ``self.unused``.

        ``torch.export`` leaves them out of the graph; without this they would vanish from the model's parameters
        (an optimizer built on them could not be restored) and from its checkpoints.
        """
        in_graph = {id(t) for t in (*gm.parameters(), *gm.buffers())}
        holder = None
        for owner_name, owner in module.named_modules():
            tensors = [(n, t, True) for n, t in owner._parameters.items() if t is not None and id(t) not in in_graph]
            tensors += [
                (n, t, n not in owner._non_persistent_buffers_set)
                for n, t in owner._buffers.items()
                if t is not None and id(t) not in in_graph
            ]
            for attr, tensor, persistent in tensors:
                if holder is None:
                    holder = self.unused = nn.Module()
                where = holder
                for part in owner_name.split(".") if owner_name else ():
                    if part not in where._modules:
                        where.add_module(part, nn.Module())
                    where = where._modules[part]
                if isinstance(tensor, nn.Parameter):
                    where.register_parameter(attr, tensor)
                else:
                    where.register_buffer(attr, tensor, persistent=persistent)
                    self._unused_buffers.append((owner, attr, where))  # kept in step by _apply

    # -------------------------------------------------------------------------------------------- checkpoints

    def _keep_example(self, args: tuple, kwargs: dict, device: torch.device | None = None) -> None:
        """Keep (two samples of) the capture inputs in the module's state.

        So a checkpoint can be captured again before its weights load (resume, ``validate(ckpt_path=...)``).
        """
        leaves, spec = tree_flatten((args, kwargs))
        self._example_spec = treespec_dumps(spec)
        self._example_constants = {}
        for i, x in enumerate(leaves):
            if isinstance(x, torch.Tensor):
                self.register_buffer(f"example_input_{i}", (x[:2] if x.ndim else x).to(device, copy=True))
            else:
                self._example_constants[str(i)] = x

    def get_extra_state(self) -> dict[str, Any]:
        return {
            "example_spec": getattr(self, "_example_spec", None),
            "example_constants": getattr(self, "_example_constants", {}),
            "bn_frozen": self.bn_frozen,
            "observers_frozen": self.observers_frozen,
            "backend": self.config.backend,
            "weight_granularity": self.config.weight_granularity,
            "max_batch_size": self.config.max_batch_size,
            "dynamic_dims": self.config.dynamic_dims,
            "keep_eval": sorted(self._keep_eval),
        }

    def set_extra_state(self, state: dict[str, Any]) -> None:
        self.bn_frozen = bool(state.get("bn_frozen", False))
        self.observers_frozen = bool(state.get("observers_frozen", False))
        if "keep_eval" in state:
            self._keep_eval = frozenset(state["keep_eval"])
        self._graph_training = None

    @staticmethod
    def example_from_state_dict(state_dict: dict[str, Any], prefix: str) -> tuple[tuple, dict] | None:
        """Rebuild the capture inputs stored by a captured ``QATGraph`` under ``prefix`` in ``state_dict``."""
        extra = state_dict.get(prefix + "_extra_state")
        if not isinstance(extra, dict) or not extra.get("example_spec"):
            return None
        spec = treespec_loads(extra["example_spec"])
        constants = extra.get("example_constants", {})
        leaves = [
            constants[str(i)] if str(i) in constants else state_dict[f"{prefix}example_input_{i}"]
            for i in range(spec.num_leaves)
        ]
        return tree_unflatten(leaves, spec)

    def capture_from_state_dict(self, state_dict: dict[str, Any], prefix: str) -> bool:
        """Capture (if not yet) from the inputs kept in a checkpoint; returns whether the graph is captured now."""
        if self.gm is None:
            example = self.example_from_state_dict(state_dict, prefix)
            if example is None:
                return False
            # checkpoints load on the CPU; trace where the Parameters are now (moved later, the graph follows them)
            self.capture(*example, device=next((p.device for p in self.float_module.parameters()), None))
            self.set_extra_state(state_dict[prefix + "_extra_state"])
            self._example_from_checkpoint = True
        return True

    def _refresh_example(self, args: tuple, kwargs: dict) -> None:
        """Export from a full training batch again, not from the 2 samples a checkpoint keeps.

        After a resume the int8 export (its latency line, the artifact's parity checks) would otherwise run on those 2
        samples. ``(args, kwargs)`` are normalized to the capture's call, so they have its structure.
        """
        self._example_from_checkpoint = False
        self.example_inputs = detach_inputs(args, kwargs)

    @torch.compiler.disable  # runs eagerly inside a compiled LightningModule (`trainer.fit(torch.compile(model))`)
    def forward(self, *args: Any, **kwargs: Any) -> Any:
        if self.gm is None:
            self.capture(args, kwargs)
        self._sync()
        what = f"{'A training' if self.training else 'An evaluation'} call of {self.name!r}"
        args, kwargs = self._normalize.normalize(args, kwargs, what)
        try:
            if self.training:
                self.training_calls += 1
                if self._example_from_checkpoint:
                    self._refresh_example(args, kwargs)
                return self.gm(*args, **kwargs)
            # The captured training graph counts BatchNorm's batches whatever its mode; a float BatchNorm in eval
            # mode does not (validation, and the sanity check on resume, would move the count).
            counters = [b for n, b in self.gm.named_buffers() if n.endswith("num_batches_tracked")]
            saved = [c.clone() for c in counters]
            out = self.gm(*args, **kwargs)
        except AssertionError as err:  # the captured graph's shape guards
            mismatch = shape_mismatch(err, what)
            if mismatch is None:
                raise
            raise mismatch from None
        for c, before in zip(counters, saved):
            c.copy_(before)
        return out

    # ----------------------------------------------------------------------------------------------- convert

    def convert(self) -> torch.fx.GraphModule:
        """An int8 copy of the current fake-quant graph (eval semantics, on CPU); the training graph is untouched."""
        if self.gm is None:
            raise QuantizationError(f"QAT never ran on {self.name!r}: it was not called after the swap.")
        unobserved = count_unobserved(self.gm)
        if unobserved:
            raise QuantizationError(
                f"QAT on {self.name!r} ({type(self.float_module).__name__}) never observed any data: {unobserved} "
                "fake-quantize modules have no scale yet, so it cannot be converted to int8. It ran in eval mode "
                "while training (`.eval()` was called on it, and Lightning keeps a submodule's mode), or its "
                f"observers were frozen before its first training batch. Keep {self.name!r} in train mode while it "
                "trains (call `.train()` on it, e.g. in `on_train_epoch_start`), and freeze observers later."
            )
        gm = graph_to_cpu(deepcopy(self.gm))
        _fast_qat.uninstall(gm)  # convert_pt2e pattern-matches torchao's own QAT graph
        set_graph_training(gm, False)
        q = strip_unused_attrs(_torchao.convert(gm))
        args, kwargs = self.example_inputs
        q.meta[META_KEY] = {
            "name": self.name,
            "backend": self.config.backend,
            "example_inputs": detach_inputs(args, kwargs),
            "max_batch_size": self.config.max_batch_size,
            "dynamic_dims": self.config.dynamic_dims,
            "num_calibration_samples": None,
            "observer": "qat",
            "weight_granularity": self.config.weight_granularity,
            "fp32_size_bytes": self.fp32_size_bytes,
        }
        return q

    def extra_repr(self) -> str:
        return (
            f"name={self.name!r}, backend={self.config.backend!r}, captured={self.captured}, "
            f"bn_frozen={self.bn_frozen}, observers_frozen={self.observers_frozen}"
        )
