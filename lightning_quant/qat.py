"""QATCallback: quantization-aware training from a chosen epoch, freezes, and int8 export when ``fit`` ends."""

from __future__ import annotations

import contextlib
import os
import weakref
from pathlib import Path
from typing import Any

import lightning.pytorch as pl
import torch
from lightning.pytorch.callbacks import Callback
from lightning.pytorch.utilities.model_helpers import is_overridden
from typing_extensions import override

from lightning_quant import _torchao
from lightning_quant._guards import artifact_dir, check_precision, check_siblings, check_strategy, resolve_dirpath
from lightning_quant._report import QuantReport, QuantResults, convert_on_rank_zero, finish
from lightning_quant.capture import QUANTIZABLE, ROUTE_ATTR, SELF, install, installed, resolve_targets, uninstall
from lightning_quant.config import QuantConfig, QuantizationError, expect_output_args, first_line
from lightning_quant.qat_graph import QATGraph, is_captured_state, to_float_names


def _expect_epoch(name: str, value: Any, optional: bool) -> int | None:
    if value is None and optional:
        return None
    if isinstance(value, bool) or not isinstance(value, int):
        kind = "a non-negative int or None" if optional else "a non-negative int"
        raise TypeError(f"Expected argument `{name}` to be {kind}, but got {value!r} of type {type(value).__name__}.")
    if value < 0:
        raise ValueError(f"Expected argument `{name}` to be a non-negative epoch index, but got {value}.")
    return value


class QATCallback(QuantResults, Callback):
    """Quantization-aware training: fake-quantize the chosen submodules from ``start_epoch``, export int8 at fit end.

    Until ``start_epoch`` training is plain float. From the start of that epoch each chosen submodule is replaced by a
    fake-quant PT2E graph (``prepare_qat_pt2e`` with the backend's QAT recipe; Conv+BN fused), captured from the
    first real call. The graph shares the float Parameters, so the optimizer, its momentum and the LR schedule carry
    on unchanged. Validation, test and predict run it in eval mode (BN running stats, dropout off) and never update
    observers. When ``fit`` ends an int8 **copy** is converted, exported with its sidecar, reloaded and checked, and
    its metrics are logged with an ``_int8`` suffix next to the fake-quant ones; the LightningModule stays a trainable
    fake-quant model, so ``fit`` can continue.

    Freezing follows torchvision's QAT recipe when asked: BatchNorm statistics first, observers one epoch later, e.g.
    ``QATCallback(start_epoch=0, freeze_bn_epoch=3, freeze_observer_epoch=4)``. By default nothing is frozen.

    Args:
        backend: ``"x86"`` (aliases ``"fbgemm"``, ``"onednn"``) or ``"arm"`` (aliases ``"qnnpack"``, ``"xnnpack"``).
        start_epoch: first epoch trained with fake quantization (0 = from the start, e.g. fine-tuning a float model).
        freeze_bn_epoch: from this epoch BatchNorm uses and keeps its running statistics (``None``: never).
        freeze_observer_epoch: from this epoch (> ``start_epoch``) scales and zero points stop changing (``None``:
            never).
        weight_granularity: ``"per_channel"`` (default) or ``"per_tensor"`` weight scales, as in
            :class:`~lightning_quant.PTQCallback`.
        modules: what to quantize, as in :class:`~lightning_quant.PTQCallback`.
        dirpath: where artifacts go (default ``<trainer.log_dir>/quantized``).
        max_batch_size: largest batch the artifact accepts.
        export: write the int8 artifact when ``fit`` ends.
        evaluate: run ``validation_step`` with the int8 artifact and log ``<metric><metric_suffix>``.
        metric_suffix: appended to your metric names for the int8 results.
        dynamic_dims: other dimensions of the batched inputs that vary, each with its largest size: ``{1: 512}`` for
            text of 2 to 512 tokens in dimension 1 (x86 only). Every other dimension is fixed at the first batch's size.

    Raises:
        TypeError: an argument has the wrong type.
        ValueError: an argument is out of range, a freeze epoch comes before ``start_epoch``, or (at ``setup``)
            ``start_epoch >= max_epochs`` so QAT would never run.

    Example::

        >>> from lightning_quant import QATCallback
        >>> cb = QATCallback(backend="fbgemm", start_epoch=1, freeze_bn_epoch=2, freeze_observer_epoch=3)
        >>> cb.config.backend, cb.start_epoch
        ('x86', 1)
    """

    def __init__(
        self,
        backend: str = "x86",
        start_epoch: int = 0,
        freeze_bn_epoch: int | None = None,
        freeze_observer_epoch: int | None = None,
        weight_granularity: str = "per_channel",
        modules: str | list[str] | None = None,
        dirpath: str | None = None,
        max_batch_size: int = 1024,
        export: bool = True,
        evaluate: bool = True,
        metric_suffix: str = "_int8",
        dynamic_dims: dict[int, int] | None = None,
    ) -> None:
        self.config = QuantConfig(
            backend=backend,
            modules=modules,
            max_batch_size=max_batch_size,
            weight_granularity=weight_granularity,
            dynamic_dims=dynamic_dims,
        )
        if self.config.backend == "arm":
            _torchao.require_executorch(backend)
        self.start_epoch = _expect_epoch("start_epoch", start_epoch, optional=False)
        self.freeze_bn_epoch = _expect_epoch("freeze_bn_epoch", freeze_bn_epoch, optional=True)
        self.freeze_observer_epoch = _expect_epoch("freeze_observer_epoch", freeze_observer_epoch, optional=True)
        for name, value in (
            ("freeze_bn_epoch", self.freeze_bn_epoch),
            ("freeze_observer_epoch", self.freeze_observer_epoch),
        ):
            if value is not None and value < self.start_epoch:
                raise ValueError(
                    f"Expected argument `{name}` to be >= `start_epoch` ({self.start_epoch}), but got {value}: "
                    f"there is nothing to freeze before QAT starts. Use {name}={self.start_epoch} or later."
                )
        if self.freeze_observer_epoch is not None and self.freeze_observer_epoch == self.start_epoch:
            raise ValueError(
                f"Expected argument `freeze_observer_epoch` to be > `start_epoch` ({self.start_epoch}), but got "
                f"{self.freeze_observer_epoch}: frozen from QAT's first epoch, the observers would never see data and "
                f"the model would have no scales to convert with. Use freeze_observer_epoch={self.start_epoch + 1} or "
                "later."
            )
        if not isinstance(export, bool):
            raise TypeError(f"Expected argument `export` to be a bool, but got {export!r}.")
        expect_output_args(dirpath, evaluate, metric_suffix)
        self.dirpath = dirpath
        self._dirpath: Path | None = None  # resolved at `setup`, on every rank
        self._dirpath_trainer: weakref.ref | None = None  # the trainer it was resolved for
        self.export = export
        self.evaluate = evaluate
        self.metric_suffix = metric_suffix
        self.targets: tuple[str, ...] = ()
        self._targets_of: weakref.ref | None = None  # the LightningModule `targets` were resolved for
        self.phase = "float"  # "float" before start_epoch, "qat" from it on
        self.quantized_modules: dict[str, torch.fx.GraphModule] = {}
        self.report: QuantReport | None = None
        self._warned_eval: set[str] = set()
        self._warned_bypass: set[str] = set()
        self._batches = 0
        self._epochs_run = 0  # training epochs this fit has run
        self._defer = False  # fit is setting up: graphs restored from a checkpoint wait for `on_fit_start`
        self._pending: dict[str, QATGraph] = {}
        self._bypass = _BypassCounter()

    # ---------------------------------------------------------------------------------------------- state

    def _resolve(self, pl_module: pl.LightningModule) -> tuple[str, ...]:
        """The targets in ``pl_module``, resolved once per model (one callback may serve several models in turn)."""
        owner = self._targets_of() if self._targets_of is not None else None
        if not self.targets or owner is not pl_module:
            self.targets = resolve_targets(pl_module, self.config.modules)
            self._targets_of = weakref.ref(pl_module)
        return self.targets

    def graphs(self, pl_module: pl.LightningModule) -> dict[str, QATGraph]:
        """The fake-quant graphs currently installed in ``pl_module`` (empty before ``start_epoch``)."""
        found = {name: installed(pl_module, name) for name in self._resolve(pl_module)}
        return {name: g for name, g in found.items() if isinstance(g, QATGraph)}

    # ---------------------------------------------------------------------------------------------- hooks

    def attach(self, pl_module: pl.LightningModule) -> None:
        """Let ``pl_module`` load QAT checkpoints.

        A ``load_state_dict`` pre-hook installs and captures the fake-quant graphs (from the inputs kept in the
        checkpoint) before the weights load.

        Runs in ``setup`` for ``fit``/``validate``/``test``/``predict`` with ``ckpt_path``; call it yourself before
        ``load_state_dict`` or ``load_from_checkpoint`` outside a Trainer, e.g.
        ``model = MyModel(**ckpt["hyper_parameters"]); qat.attach(model); model.load_state_dict(ckpt["state_dict"])``.
        """
        hooks = getattr(pl_module, "_lightning_quant_hooks", None)
        if hooks is None:
            hooks = pl_module._lightning_quant_hooks = {}
        if id(self) not in hooks:
            hooks[id(self)] = (
                pl_module.register_load_state_dict_pre_hook(_SwapBeforeLoad(self)),
                pl_module.register_load_state_dict_post_hook(_DeferAfterLoad(self)),
            )

    @override
    def setup(self, trainer: pl.Trainer, pl_module: pl.LightningModule, stage: str) -> None:
        check_strategy(trainer, "QATCallback")
        check_precision(trainer, "QATCallback")
        # resolved afresh for each run: for `fit` at `on_fit_start` (or when a checkpoint loads), after the
        # LightningModule's `setup` and `configure_model`, which run after this and may build the layers
        self.targets, self._targets_of = (), None
        if stage != "fit" and is_overridden("configure_model", pl_module):
            self.attach(pl_module)  # its layers may not exist yet: the targets are resolved when a checkpoint loads
            return
        if stage != "fit":
            try:
                resolve_targets(pl_module, self.config.modules)
            except ValueError as err:  # e.g. the int8 artifact swapped in after fit, to evaluate it
                if any(not _exists(pl_module, n) for n in self.config.modules or ()):
                    raise  # a typo in `modules` stays an error
                pl.utilities.rank_zero_warn(
                    f"QATCallback does nothing in `trainer.{getattr(stage, 'value', stage)}`, and a QAT checkpoint "
                    f"cannot be loaded into this model: {err}"
                )
                return
            self._resolve(pl_module)
            check_siblings(self, trainer, pl_module)
        if stage == "fit" and _spawned(trainer) and not getattr(pl_module, "_lightning_quant_hooks", None):
            raise QuantizationError(
                "With a spawning strategy (e.g. strategy='ddp_spawn'), the launching process loads what the workers "
                "learned into your model, which needs the QAT load hook: call `qat_callback.attach(model)` before "
                "`trainer.fit(model, ...)`. From a LightningCLI config, where there is no such call, use "
                "`strategy: ddp` (it runs the script once per process and needs no hook)."
            )
        self._defer = stage == "fit"
        self._pending = {}
        self.attach(pl_module)
        if stage != "fit":
            return
        # what an earlier fit (or another model) left must not pass for this fit's results or warnings
        self.phase = "float"
        self.quantized_modules, self.report = {}, None
        self._warned_eval, self._warned_bypass = set(), set()
        self._epochs_run = 0
        max_epochs = trainer.max_epochs
        if isinstance(max_epochs, int) and 0 <= max_epochs <= self.start_epoch:
            raise ValueError(
                f"Expected argument `start_epoch` ({self.start_epoch}) to be < the Trainer's max_epochs "
                f"({max_epochs}): QAT would never run. Lower `start_epoch` or raise `max_epochs`."
            )
        self._dirpath = resolve_dirpath(self.dirpath, trainer) if self.export else None
        self._dirpath_trainer = weakref.ref(trainer)
        if trainer.world_size > 1 and next(pl_module.buffers(), None) is None:
            # DDP broadcasts rank 0's buffers before each forward (the observers' ranges, so every rank converts the
            # same scales), collecting them afresh each time, but only if the model had buffers when it was wrapped:
            # a model without BatchNorm has none until the fake-quant graph is captured.
            pl_module.register_buffer(_DDP_SYNC_BUFFER, torch.zeros(()), persistent=False)

    def swap(self, pl_module: pl.LightningModule, only: str | None = None) -> dict[str, QATGraph]:
        """Install a fake-quant graph for every target (or ``only`` one) that has none yet; returns all installed."""
        self._resolve(pl_module)
        for name in self.targets if only is None else (only,):
            current = installed(pl_module, name)
            if not isinstance(current, QATGraph):
                graph = QATGraph(current, name, self.config).to(_device_of(current))
                graph.training = current.training  # not .train(): layers the user keeps in eval stay so
                install(pl_module, name, graph)
        return self.graphs(pl_module)

    def _install_pending(self, pl_module: pl.LightningModule) -> None:
        """Put back the graphs a resume set aside while ``fit`` set up (see ``_DeferAfterLoad``); stop deferring."""
        pending, self._pending, self._defer = self._pending, {}, False
        for name, graph in pending.items():
            install(pl_module, name, graph.to(_device_of(graph.float_module)))

    @override
    def on_fit_start(self, trainer: pl.Trainer, pl_module: pl.LightningModule) -> None:
        # after `configure_optimizers`, which saw the float modules as in the run that wrote the checkpoint
        self._install_pending(pl_module)
        self._resolve(pl_module)
        check_siblings(self, trainer, pl_module)

    @override
    def on_train_start(self, trainer: pl.Trainer, pl_module: pl.LightningModule) -> None:
        # here, not at `on_fit_start`: a resume restores the epoch between the two
        epoch, frozen = trainer.current_epoch, self.freeze_observer_epoch
        first_qat_epoch = max(epoch, self.start_epoch)
        if frozen is None or first_qat_epoch < frozen:
            return
        fresh = [n for n in self.targets if not getattr(installed(pl_module, n), "captured", False)]
        if fresh:
            raise ValueError(
                f"Expected argument `freeze_observer_epoch` ({frozen}) to be > the first QAT epoch: fit resumes at "
                f"epoch {epoch} (epochs continue from the checkpoint) without QAT state for {fresh}, so QAT would "
                "start with its observers frozen, train with fake quantization that never saw data, and have no "
                f"scales to convert with. Use freeze_observer_epoch={first_qat_epoch + 1} or later, or None."
            )

    @override
    def teardown(self, trainer: pl.Trainer, pl_module: pl.LightningModule, stage: str) -> None:
        self._bypass.stop()  # an epoch that did not end leaves no hooks on the user's layers
        self._defer, self._pending = False, {}

    @override
    def on_exception(self, trainer: pl.Trainer, pl_module: pl.LightningModule, exception: BaseException) -> None:
        self._bypass.stop()  # Lightning does not call `teardown` on an exception
        # A resume that failed before `on_fit_start` (in `configure_optimizers`, say): the loaded graphs go back in
        with contextlib.suppress(Exception):  # never hide the exception being handled
            self._install_pending(pl_module)
        # A stand-in that never captured (capture failed, or fit stopped before its first batch) holds nothing
        # trained: give the float submodule back, so that the model and its state_dict keys are as they were.
        if not self.targets:
            return  # failed before any swap (at setup, say)
        for name in self.targets:
            with contextlib.suppress(Exception):  # never hide the exception being handled
                graph = installed(pl_module, name)
                if isinstance(graph, QATGraph) and not graph.captured:
                    uninstall(pl_module, name, graph.float_module)

    @override
    def on_train_epoch_start(self, trainer: pl.Trainer, pl_module: pl.LightningModule) -> None:
        self._epochs_run += 1
        epoch = trainer.current_epoch
        if epoch < self.start_epoch:
            self.phase = "float"
            return
        self.phase = "qat"
        self._batches = 0
        self._bypass.watch(pl_module, self.targets)
        for graph in self.swap(pl_module).values():
            graph.training_calls = 0
            if self.freeze_bn_epoch is not None and epoch >= self.freeze_bn_epoch:
                graph.freeze_bn()
            if self.freeze_observer_epoch is not None and epoch >= self.freeze_observer_epoch:
                graph.freeze_observers()

    @override
    def on_train_batch_start(
        self, trainer: pl.Trainer, pl_module: pl.LightningModule, batch: Any, batch_idx: int
    ) -> None:
        if self.phase != "qat":
            return
        self._batches += 1
        for name, graph in self.graphs(pl_module).items():
            if not graph.training and name not in self._warned_eval:
                self._warned_eval.add(name)
                pl.utilities.rank_zero_warn(
                    f"QATCallback: {name!r} is in eval mode while the Trainer trains, so its fake-quant observers "
                    "learn nothing and BatchNorm does not update; converting it to int8 will fail. Lightning keeps the "
                    f"mode you set on a submodule: call `.train()` on {name!r} (e.g. in `on_train_epoch_start`) or "
                    "do not call `.eval()` on it."
                )

    @override
    def on_train_epoch_end(self, trainer: pl.Trainer, pl_module: pl.LightningModule) -> None:
        graphs = self.graphs(pl_module)
        bypassed = self._bypass.stop(graphs.get(SELF))
        if self.phase != "qat" or not self._batches:
            return
        if bypassed and "bypassed" not in self._warned_bypass:
            self._warned_bypass.add("bypassed")
            pl.utilities.rank_zero_warn(
                f"QATCallback: in epoch {trainer.current_epoch}, {bypassed} train-mode calls ran Conv/Linear layers of "
                f"{type(pl_module).__name__} without fake quantization: QAT stands in for `self(...)` (your "
                "`forward`), and `training_step` also calls layers or submodules directly (e.g. "
                "`self.head(self.backbone(x))`). Call `self(...)` there, or name the submodules with `modules=`."
            )
        for name, graph in graphs.items():
            if graph.training and not graph.training_calls and name not in self._warned_bypass:
                self._warned_bypass.add(name)
                call = "`self(...)`" if name == SELF else f"`{name}`"
                pl.utilities.rank_zero_warn(
                    f"QATCallback: {name!r} was not called in the {self._batches} training batches of epoch "
                    f"{trainer.current_epoch}, so its fake-quant graph learned nothing there: QAT trains what "
                    f"`training_step` calls through {call}. Call it there, or leave it out of `modules=`."
                )

    @override
    def on_fit_end(self, trainer: pl.Trainer, pl_module: pl.LightningModule) -> None:
        if not self.export or trainer.interrupted:
            return
        graphs = self.graphs(pl_module)
        if not graphs or not all(g.captured for g in graphs.values()):
            pl.utilities.rank_zero_warn(
                f"QATCallback: {self._why_no_qat(trainer, graphs)}; no int8 model was exported."
            )
            return
        # converted once, on rank 0 (the only rank that writes artifacts): every rank gets the same int8 model
        self.quantized_modules = convert_on_rank_zero(trainer, lambda: {n: g.convert() for n, g in graphs.items()})
        if trainer.is_global_zero:
            self.report = finish(
                trainer,
                pl_module,
                self.quantized_modules,
                method="QAT",
                backend=self.config.backend,
                dirpath=artifact_dir(self, trainer),
                metric_suffix=self.metric_suffix,
                evaluate=self.evaluate,
                fp32_reference={name: g.float_module for name, g in graphs.items()},
                baseline="fake-quant",
            )

    def _why_no_qat(self, trainer: pl.Trainer, graphs: dict[str, QATGraph]) -> str:
        if graphs:
            never = [n for n, g in graphs.items() if not g.captured]
            return f"{never} never ran after the swap to fake quantization, so there is nothing to convert"
        if not self._epochs_run:
            return (
                f"fit ran no training epoch (it started at epoch {trainer.current_epoch} and max_epochs is "
                f"{trainer.max_epochs}, e.g. resuming a finished run): raise max_epochs to train with QAT"
            )
        n = self._epochs_run
        return f"fit ended before QAT ran (start_epoch={self.start_epoch}; it ran {n} training epoch{'s' * (n != 1)})"

    @property
    @override
    def state_key(self) -> str:
        return self._generate_state_key(backend=self.config.backend, modules=self.config.modules)

    @override
    def state_dict(self) -> dict[str, Any]:
        return {
            "phase": self.phase,
            "backend": self.config.backend,
            "weight_granularity": self.config.weight_granularity,
            "max_batch_size": self.config.max_batch_size,
            "dynamic_dims": self.config.dynamic_dims,
            "start_epoch": self.start_epoch,
            "freeze_bn_epoch": self.freeze_bn_epoch,
            "freeze_observer_epoch": self.freeze_observer_epoch,
            "targets": list(self.targets),
        }

    @override
    def load_state_dict(self, state_dict: dict[str, Any]) -> None:
        # The schedule comes from __init__ (the user may change it on resume); what was quantized must not change.
        self.phase = state_dict.get("phase", self.phase)
        saved = tuple(state_dict.get("targets", ()))
        if saved and self.targets and saved != self.targets:
            raise ValueError(
                f"The checkpoint was trained with QAT on {list(saved)}, but `modules` now selects "
                f"{list(self.targets)}. Resume with the same `modules`."
            )
        granularity = state_dict.get("weight_granularity", "per_channel")
        if self.phase != "float" and granularity != self.config.weight_granularity:
            raise ValueError(
                f"The checkpoint was trained with QAT and weight_granularity={granularity!r}, but "
                f"`weight_granularity` is now {self.config.weight_granularity!r}. Resume with the same value."
            )


#: a placeholder buffer that makes DDP synchronize the buffers the fake-quant graphs add later (see ``setup``)
_DDP_SYNC_BUFFER = "_lightning_quant_ddp_sync"


class _BypassCounter:
    """Counts train-mode calls of a LightningModule's own Conv/Linear layers while QAT stands in for its ``forward``.

    The routed fake-quant graph runs its own copies of the layers ``forward`` uses (sharing their Parameters) and never
    calls them, so a call to one of those comes from code that bypasses ``self(...)`` and trains it in float. Layers
    ``forward`` does not use (a projection head called after ``self(x)``) are not counted.
    """

    def __init__(self) -> None:
        self._calls: dict[torch.nn.Module, int] = {}
        self._hooks: list[Any] = []

    def watch(self, pl_module: torch.nn.Module, targets: tuple[str, ...]) -> None:
        self.stop()
        if SELF not in targets:
            return  # a submodule stand-in replaces the module itself: nothing else can call it
        for name, layer in pl_module.named_modules():
            if isinstance(layer, QUANTIZABLE) and not name.startswith(ROUTE_ATTR + "."):
                self._hooks.append(layer.register_forward_pre_hook(self._count))

    def _count(self, module: torch.nn.Module, args: Any) -> None:
        if module.training:
            self._calls[module] = self._calls.get(module, 0) + 1

    def stop(self, graph: QATGraph | None = None) -> int:
        """Remove the hooks; return the calls counted since :meth:`watch` of layers whose weight ``graph`` trains."""
        for hook in self._hooks:
            hook.remove()
        self._hooks.clear()
        calls, self._calls = self._calls, {}
        if graph is None or graph.gm is None:
            return 0
        trained = {id(p) for p in graph.gm.parameters()}
        return sum(n for layer, n in calls.items() if id(getattr(layer, "weight", None)) in trained)


class _SwapBeforeLoad:
    """``load_state_dict`` pre-hook: swap in and capture fake-quant graphs when the incoming state holds them.

    A class, not a closure, so the LightningModule stays picklable (``ddp_spawn``).
    """

    def __init__(self, callback: QATCallback) -> None:
        self.callback = callback

    def __call__(self, module: torch.nn.Module, state_dict: dict[str, Any], prefix: str, *args: Any) -> None:
        # Lightning loads the model before the callbacks' own state: compare QAT settings here, from the graphs' state
        trained = {
            k[len(prefix) : -len("._extra_state")]: v
            for k, v in state_dict.items()
            if k.startswith(prefix) and k.endswith("._extra_state") and is_captured_state(v)
        }
        try:
            targets = self.callback._resolve(module)
        except ValueError:
            if trained:
                raise
            return  # a float checkpoint into a model this callback cannot quantize (an int8 artifact swapped in)
        expected = {ROUTE_ATTR if n == SELF else n: n for n in targets}
        alone = len(getattr(module, "_lightning_quant_hooks", {})) <= 1  # other QAT callbacks train other submodules
        # a target absent from the checkpoint had not been called yet (it holds float weights): it starts QAT now
        mismatch = not set(trained) <= set(expected) if alone else any(_overlap(t, set(expected)) for t in trained)
        if trained and mismatch:
            shown = sorted(SELF if k == ROUTE_ATTR else k for k in trained)
            raise ValueError(
                f"The checkpoint was trained with QAT on {shown}, but this QATCallback quantizes "
                f"{sorted(expected.values())}. Resume with the same `modules` (modules={shown})."
            )
        for key, extra in trained.items():
            if key not in expected:
                continue  # another callback's graph
            backend = extra.get("backend", self.callback.config.backend)
            if backend != self.callback.config.backend:
                raise ValueError(
                    f"The checkpoint was trained with QAT for backend {backend!r}, but `backend` is now "
                    f"{self.callback.config.backend!r}. Resume with the same backend (the fake-quant graphs differ)."
                )
        for name in targets:
            key = prefix + (ROUTE_ATTR if name == SELF else name) + "."
            if not any(k.startswith(key + "gm.") for k in state_dict):
                extra = state_dict.get(key + "_extra_state")
                if isinstance(extra, dict) and "example_spec" in extra:  # an uncaptured graph, as earlier checkpoints
                    to_float_names(state_dict, key)  # kept it: under the graph's `source`
                # a float checkpoint (saved before QAT started, e.g. `test(ckpt_path="best")` after fit): if a
                # fake-quant graph stands in now, give the float module back, and the float weights load into it
                current = installed(module, name)
                if isinstance(current, QATGraph) and _float_keys(module, name, current, prefix) <= state_dict.keys():
                    uninstall(module, name, current.float_module)
                    if current.captured:
                        pl.utilities.rank_zero_warn(
                            f"QATCallback: float weights were loaded into {name!r}, which held a fake-quant graph: "
                            "the float module is back, and the graph's observer ranges are dropped (QAT captures "
                            "again at its next training epoch)."
                        )
                continue
            graph = self.callback.swap(module, only=name)[name]
            if not graph.capture_from_state_dict(state_dict, key):
                raise QuantizationError(
                    f"The checkpoint holds a QAT graph for {name!r} but not the inputs it was captured from; it was "
                    "written by another version of lightning-quant. Start QAT again from the float weights."
                )
            unused = getattr(graph, "unused", None)
            if unused is not None and not any(k.startswith(key + "unused.") for k in state_dict):
                # written before the graphs kept what `forward` never uses: those tensors keep their current values
                state_dict.update({f"{key}unused.{k}": v for k, v in unused.state_dict().items()})


class _DeferAfterLoad:
    """``load_state_dict`` post-hook: while ``fit`` sets up, hand the float modules back until ``on_fit_start``.

    On resume Lightning loads the model before ``configure_optimizers``. With the float modules in place there, the
    user's code sees the model it was written for (``self.model.backbone.parameters()``, ``self.model[0]``) and the
    optimizer lists the Parameters in the order of the run that saved its state. The graphs hold the loaded state
    (their Parameters and BatchNorm buffers are the float modules') and go back in at ``on_fit_start``.
    """

    def __init__(self, callback: QATCallback) -> None:
        self.callback = callback

    def __call__(self, module: torch.nn.Module, incompatible_keys: Any) -> None:
        if not self.callback._defer:
            return
        for name in self.callback._resolve(module):
            graph = installed(module, name)
            if isinstance(graph, QATGraph) and graph.captured:
                uninstall(module, name, graph.float_module)
                self.callback._pending[name] = graph


def _states_from_graphs(state_dict: dict[str, Any]) -> list[dict[str, Any]]:
    """``QATCallback`` settings read from the captured graphs in a model ``state_dict`` (one per graph)."""
    states = []
    for key, extra in state_dict.items():
        if not (key.endswith("._extra_state") and is_captured_state(extra)):
            continue
        name = key[: -len("._extra_state")]
        states.append(
            {
                "backend": extra.get("backend", "x86"),
                "targets": [SELF if name == ROUTE_ATTR else name],
                "weight_granularity": extra.get("weight_granularity", "per_channel"),
                "max_batch_size": extra.get("max_batch_size", 1024),
                "dynamic_dims": extra.get("dynamic_dims"),
            }
        )
    return states


def _float_keys(root: torch.nn.Module, name: str, graph: QATGraph, prefix: str) -> set[str]:
    """The state_dict keys ``name``'s float module has under ``root`` (for ``"self"``: all but the route's)."""
    if name == SELF:
        return {prefix + k for k in root.state_dict() if not k.startswith(ROUTE_ATTR + ".")}
    return {f"{prefix}{name}.{k}" for k in graph.float_module.state_dict()}


def _exists(root: torch.nn.Module, name: str) -> bool:
    if name == SELF:
        return True
    try:
        root.get_submodule(name)
    except AttributeError:
        return False
    return True


def _overlap(name: str, others: set[str]) -> bool:
    """``name`` is an ancestor or a descendant of one of ``others``, not one of them (a graph in another place)."""
    return name not in others and any(name.startswith(o + ".") or o.startswith(name + ".") for o in others)


def _spawned(trainer: pl.Trainer) -> bool:
    launcher = getattr(trainer.strategy, "launcher", None)
    return getattr(launcher, "_start_method", None) in ("spawn", "forkserver")


def _device_of(module: torch.nn.Module) -> torch.device:
    return next((p.device for p in module.parameters()), torch.device("cpu"))


def load_qat_checkpoint(
    cls: type[pl.LightningModule],
    checkpoint_path: str,
    *,
    map_location: Any = "cpu",
    weights_only: bool | None = None,
    **kwargs: Any,
) -> pl.LightningModule:
    """``cls.load_from_checkpoint`` for a checkpoint written during QAT: the fake-quant graphs are rebuilt first.

    The QAT settings (backend, submodules, weight granularity, batch limit) are read from the ``QATCallback`` states
    saved in the checkpoint (one per callback the run had).

    Example::

        model = load_qat_checkpoint(MyModel, "epoch=3.ckpt")   # same as MyModel.load_from_checkpoint(...) for QAT

    Raises:
        ValueError: the checkpoint holds no ``QATCallback`` state (a float checkpoint: use ``load_from_checkpoint``).
    """
    import inspect

    from lightning.fabric.utilities.cloud_io import _is_local_file_protocol
    from lightning.fabric.utilities.cloud_io import _load as pl_load

    if not (isinstance(cls, type) and issubclass(cls, pl.LightningModule)):
        raise TypeError(f"Expected argument `cls` to be a LightningModule class, but got {cls!r}.")
    local = isinstance(checkpoint_path, (str, os.PathLike)) and _is_local_file_protocol(checkpoint_path)
    if local and not Path(checkpoint_path).is_file():
        raise FileNotFoundError(
            f"Expected argument `checkpoint_path` to be a checkpoint file, but got {checkpoint_path!r}."
        )
    try:
        checkpoint = pl_load(checkpoint_path, map_location=map_location, weights_only=weights_only)
    except Exception as err:  # not a checkpoint, or one weights-only unpickling refuses
        advice = (
            " For a checkpoint you trust that holds other objects, pass `weights_only=False`."
            if "weights only" in str(err).lower()
            else ""
        )
        raise ValueError(
            f"Expected argument `checkpoint_path` to be a Lightning checkpoint, but {str(checkpoint_path)!r} could not "
            f"be loaded ({first_line(err, 300)}).{advice}"
        ) from err
    if not isinstance(checkpoint, dict) or "state_dict" not in checkpoint:
        raise ValueError(
            f"Expected argument `checkpoint_path` to be a Lightning checkpoint, but {checkpoint_path!r} is not."
        )
    captured = _states_from_graphs(checkpoint["state_dict"])  # what QAT ran on: a weights-only checkpoint has these
    states = [v for k, v in checkpoint.get("callbacks", {}).items() if k.startswith(QATCallback.__name__)] or captured
    if not captured:  # a full checkpoint from before `start_epoch` holds the callback's state, but no graph yet
        holds = "QATCallback state but no fake-quant graph yet"
        holds = holds if states else "no QATCallback state and no fake-quant graphs"
        raise ValueError(
            f"Expected `checkpoint_path` to be a checkpoint written with QATCallback, but {checkpoint_path!r} holds "
            f"{holds} (it was saved before QAT started, or without QAT). Its float model loads with "
            f"`{cls.__name__}.load_from_checkpoint(...)`."
        )
    hparams = dict(checkpoint.get("hyper_parameters", {}))
    accepted = inspect.signature(cls.__init__).parameters
    if not any(p.kind == p.VAR_KEYWORD for p in accepted.values()):
        hparams = {k: v for k, v in hparams.items() if k in accepted}
    model = cls(**{**hparams, **kwargs})
    if is_overridden("configure_model", model):
        model.configure_model()
    model.on_load_checkpoint(checkpoint)
    for state in states:  # one per QATCallback the run had (e.g. one per submodule)
        QATCallback(
            backend=state["backend"],
            modules=state.get("targets") or None,
            weight_granularity=state.get("weight_granularity", "per_channel"),
            max_batch_size=state.get("max_batch_size", 1024),
            dynamic_dims=state.get("dynamic_dims"),
        ).attach(model)
    model.load_state_dict(checkpoint["state_dict"])
    return model
