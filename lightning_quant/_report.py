"""After conversion, shared by both callbacks: export, reload and check, evaluate, log, summarise.

Each int8 submodule is exported and reloaded (parity against the in-process int8 model), evaluated with the user's own
``validation_step``, logged as ``*_int8`` metrics, and summarised in the fp32-vs-int8 table.
"""

from __future__ import annotations

import statistics
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import lightning.pytorch as pl
import torch
from lightning.pytorch.utilities import rank_zero_info, rank_zero_warn
from torch import nn
from torch.utils._pytree import tree_flatten, tree_map

from lightning_quant import export
from lightning_quant._loop import all_loaders, has_validation_step, run_validation
from lightning_quant.capture import SELF, batch_size_of, get_submodule
from lightning_quant.config import BACKENDS, QuantizationError, first_line, speed_change
from lightning_quant.quantize import META_KEY


@dataclass
class QuantReport:
    """What a quantization run produced and measured (also written into each artifact's sidecar)."""

    method: str
    backend: str
    baseline: str = "fp32"  # what the metrics are compared against: the float model, or the fake-quant one (QAT)
    artifacts: dict[str, Path] = field(default_factory=dict)
    parity_max_abs_diff: dict[str, float] = field(default_factory=dict)
    size_bytes: dict[str, tuple[int, int]] = field(default_factory=dict)  # name -> (fp32, int8)
    latency_ms: dict[str, tuple[float, float]] = field(default_factory=dict)  # name -> (fp32, int8)
    batch_size: dict[str, int] = field(default_factory=dict)
    metrics_fp32: dict[str, float] = field(default_factory=dict)
    metrics_int8: dict[str, float] = field(default_factory=dict)

    def table(self) -> str:
        title = f"lightning-quant {self.method} summary ({self.backend}, {BACKENDS[self.backend].suffix})"
        rows = [("", self.baseline, "int8", "delta / ratio")]
        for k, v in self.metrics_fp32.items():
            q = self.metrics_int8.get(k)
            rows.append((k, f"{v:.4f}", "-" if q is None else f"{q:.4f}", "-" if q is None else f"{q - v:+.4f}"))
        for name, (f, q) in self.size_bytes.items():
            rows.append((f"size {name} (fp32 -> int8)", _kib(f), _kib(q), f"{q / f:.2f}x"))
        for name, (f, q) in self.latency_ms.items():
            rows.append(
                (
                    f"latency {name} (fp32 -> int8, batch {self.batch_size.get(name)})",
                    f"{f:.3f} ms",
                    f"{q:.3f} ms",
                    speed_change(f, q),
                )
            )
        for name, d in self.parity_max_abs_diff.items():
            rows.append((f"reload parity {name}", "", f"{d:.2e}", "max |diff|"))
        widths = [max(len(r[i]) for r in rows) for i in range(4)]
        lines = [title] + ["  ".join(c.ljust(w) for c, w in zip(r, widths)).rstrip() for r in rows]
        lines += [f"artifact {name}: {p}" for name, p in self.artifacts.items()]
        return "\n".join(lines)


def _kib(n: int) -> str:
    return f"{n / 1024:.1f} KiB"


def _shapes(out: Any) -> list[tuple[int, ...]]:
    return [tuple(x.shape) for x in tree_flatten(out)[0] if isinstance(x, torch.Tensor)]


def check_other_batch(art: Any, q: nn.Module, args: tuple, kwargs: dict, name: str) -> float:
    """Run the reloaded artifact and the in-process int8 model on a batch of 1 (the capture batch is checked already).

    An artifact compiled for the capture batch only would pass a parity check at that batch and return wrong rows
    for any other. Returns the max |diff| at batch 1 (0.0 when the capture batch is 1 or the inputs have no batch).

    Raises:
        export.ArtifactError: the artifact's outputs have other shapes than the in-process model's.
    """
    batch = batch_size_of((args, kwargs))
    if batch is None or batch == 1:
        return 0.0

    def first(x: Any) -> Any:
        return x[:1] if isinstance(x, torch.Tensor) and x.ndim > 0 and x.shape[0] == batch else x

    args1, kwargs1 = tree_map(first, args), tree_map(first, kwargs)
    with torch.no_grad():
        want = q(*args1, **kwargs1)
        try:
            got = art(*args1, **kwargs1)
        except (RuntimeError, ValueError) as err:  # ExecuTorch planned a static batch; the sidecar records it so
            raise export.ArtifactError(
                f"The exported artifact for {name!r} ({art.path.name}) fails on a batch of 1 ({first_line(err)}), "
                f"where the in-process int8 model runs: its runtime holds some tensors at the capture batch ({batch}) "
                f"only (ExecuTorch plans memory ahead). Export it for the other backend, or always call it with "
                f"batches of {batch}; please report this with the model's structure."
            ) from err
    if _shapes(got) != _shapes(want):
        raise export.ArtifactError(
            f"The exported artifact for {name!r} returned outputs of shapes {_shapes(got)} for a batch of 1, but the "
            f"int8 model returns {_shapes(want)}: it was compiled for the capture batch ({batch}) only and would give "
            "wrong results for other batch sizes. Please report this with the model's structure; as a workaround, "
            "always call it with batches of that size."
        )
    return export.max_abs_diff(got, want)


def median_ms(fn: Any, *args: Any, repeats: int = 10, **kwargs: Any) -> float:
    with torch.no_grad():
        for _ in range(2):
            fn(*args, **kwargs)
        times = []
        for _ in range(repeats):
            t = time.perf_counter()
            fn(*args, **kwargs)
            times.append(time.perf_counter() - t)
    return 1000 * statistics.median(times)


def suffixed(name: str, suffix: str) -> str:
    """``val_acc`` -> ``val_acc_int8``; ``val_acc/dataloader_idx_1`` -> ``val_acc_int8/dataloader_idx_1``."""
    base, sep, idx = name.partition("/dataloader_idx_")
    return f"{base}{suffix}{sep}{idx}"


def artifact_stem(pl_module: nn.Module, name: str) -> str:
    return type(pl_module).__name__ if name == SELF else name


def finish(
    trainer: pl.Trainer,
    pl_module: pl.LightningModule,
    quantized: dict[str, torch.fx.GraphModule],
    *,
    method: str,
    backend: str,
    dirpath: Path,
    metric_suffix: str = "_int8",
    evaluate: bool = True,
    fp32_reference: dict[str, nn.Module] | None = None,
    baseline: str = "fp32",
) -> QuantReport:
    """Export, reload, check, evaluate and report ``quantized`` (name -> converted graph).

    Args:
        fp32_reference: float modules for the size and latency baselines (default: the LightningModule's submodules).
        baseline: what the LightningModule runs now, whose metrics the int8 ones are compared with.
    """
    report = QuantReport(method=method, backend=backend, baseline=baseline)
    loaded: dict[str, nn.Module] = {}
    suffix = BACKENDS[backend].suffix
    for name, q in quantized.items():
        path = dirpath / f"{artifact_stem(pl_module, name)}_int8{suffix}"
        diff = export.save(q, path, metadata={"method": method})["parity_max_abs_diff"]  # checked by `save`
        art = export.load(path, backend=backend)
        args, kwargs = q.meta[META_KEY]["example_inputs"]
        diff_one = check_other_batch(art, q, args, kwargs, name)
        if diff_one > max(10 * diff, 1e-3):
            rank_zero_warn(
                f"The exported artifact for {name!r} agrees with the int8 model at the capture batch (max |diff| "
                f"{diff:.2e}) but not at batch 1 (max |diff| {diff_one:.2e}): its results depend on the batch size."
            )
        diff = max(diff, diff_one)
        float_module = (fp32_reference or {}).get(name) or get_submodule(pl_module, name)
        was_training = float_module.training
        float_module.eval()
        try:
            # the class's own forward: for "self" the instance's forward may be routed to a stand-in
            fp32_ms = median_ms(type(float_module).forward.__get__(float_module), *args, **kwargs)
        finally:
            float_module.train(was_training)
        int8_ms = median_ms(art, *args, **kwargs)
        report.artifacts[name] = path
        report.parity_max_abs_diff[name] = diff
        fp32_bytes = q.meta[META_KEY].get("fp32_size_bytes") or export.float_size_bytes(float_module)
        report.size_bytes[name] = (fp32_bytes, path.stat().st_size)
        report.latency_ms[name] = (fp32_ms, int8_ms)
        report.batch_size[name] = next(
            (x.shape[0] for x in tree_flatten((args, kwargs))[0] if isinstance(x, torch.Tensor) and x.ndim), 1
        )
        loaded[name] = art

    val_loaders = trainer.val_dataloaders  # all of them, as the user's validation runs them
    limit = trainer.limit_val_batches  # the user's own bound on validation (fast_dev_run sets it to 1)
    if evaluate and all_loaders(val_loaders) and has_validation_step(pl_module):
        report.metrics_fp32 = run_validation(trainer, pl_module, val_loaders, limit_batches=limit)
        report.metrics_int8 = run_validation(trainer, pl_module, val_loaders, loaded, limit_batches=limit)
        logged = {suffixed(k, metric_suffix): v for k, v in report.metrics_int8.items()}
        # and the model they are compared with, measured in the same pass: the plain key holds the last value the
        # user's validation logged, which can be epochs older (check_val_every_n_epoch, max_steps)
        reference = "_" + baseline.replace("-", "_")
        logged.update(
            {
                suffixed(k, reference): v
                for k, v in report.metrics_fp32.items()
                if not k.partition("/dataloader_idx_")[0].endswith(metric_suffix)
            }
        )
        trainer.callback_metrics.update({k: torch.tensor(v) for k, v in logged.items()})
        for logger in trainer.loggers:
            logger.log_metrics(logged, step=trainer.global_step)
            logger.save()

    for name, path in report.artifacts.items():
        export.update_sidecar(
            path,
            metrics={baseline: report.metrics_fp32, "int8": report.metrics_int8},
            parity_max_abs_diff=report.parity_max_abs_diff[name],
            fp32_size_bytes=report.size_bytes[name][0],
            latency_ms={"fp32": report.latency_ms[name][0], "int8": report.latency_ms[name][1]},
        )
    rank_zero_info(report.table())
    return report


def convert_on_rank_zero(
    trainer: pl.Trainer, convert: Callable[[], dict[str, torch.fx.GraphModule]]
) -> dict[str, torch.fx.GraphModule]:
    """Run ``convert`` (name -> int8 module) on global rank 0 only, and give every rank its result.

    Only rank 0 calibrates, converts and (afterwards) writes artifacts, so that every rank holds the same ranges. The
    result is broadcast as soon as it exists, before the export and evaluation, and a failure on rank 0 is raised on
    every rank: no rank is left waiting in a collective for one that will never come.
    """
    if trainer.world_size <= 1:
        return convert()
    quantized: dict[str, torch.fx.GraphModule] = {}
    failure: BaseException | None = None
    payload: Any = None
    if trainer.is_global_zero:
        try:
            quantized = convert()
            payload = {n: export.serialize(q) for n, q in quantized.items()}
        except BaseException as err:  # every rank must reach the broadcast
            failure, payload = err, first_line(err)
    payload = trainer.strategy.broadcast(payload, src=0)
    if failure is not None:
        raise failure
    if isinstance(payload, str):
        raise QuantizationError(f"Quantization failed on global rank 0 ({payload}); its log has the details.")
    return quantized if trainer.is_global_zero else {n: export.deserialize(b) for n, b in payload.items()}


class QuantResults:
    """What both callbacks expose after ``fit``: the in-process int8 modules, their artifacts and the report."""

    quantized_modules: dict[str, torch.fx.GraphModule]
    report: QuantReport | None

    def __getstate__(self) -> dict[str, Any]:
        state = self.__dict__.copy()
        for key in ("_targets_of", "_dirpath_trainer"):  # weak references do not pickle (ddp_spawn): set where it lands
            if key in state:
                state[key] = None
        return state

    @property
    def quantized_model(self) -> torch.fx.GraphModule:
        """The int8 model (a ``GraphModule`` with the float submodule's call signature), after ``fit`` ends."""
        if not self.quantized_modules:
            why = "fit has not run, or was interrupted"
            if hasattr(self, "start_epoch"):
                why += ", or ended before QAT started (`start_epoch`), or `export=False`"
            raise RuntimeError(
                f"`{type(self).__name__}.quantized_model` holds the int8 model once `trainer.fit` has ended with one, "
                f"and there is none: {why}."
            )
        if len(self.quantized_modules) > 1:
            raise RuntimeError(
                f"Several submodules were quantized ({list(self.quantized_modules)}); use `quantized_modules[name]`."
            )
        return next(iter(self.quantized_modules.values()))

    @property
    def artifacts(self) -> dict[str, Path]:
        """Submodule name -> exported artifact path, after ``fit`` ends."""
        return dict(self.report.artifacts) if self.report else {}
