"""The ``lightning-quant`` command."""

from __future__ import annotations

import argparse
import sys
import time
from collections.abc import Sequence
from pathlib import Path
from typing import Any

from lightning_quant.config import first_line, speed_change


def _at_least(low: int) -> Any:
    """An argparse type: an integer >= ``low`` (a bad value is refused before any work, naming the flag)."""

    def parse(text: str) -> int:
        try:
            value = int(text)
        except ValueError:
            raise argparse.ArgumentTypeError(f"expected an integer, got {text!r}") from None
        if value < low:
            raise argparse.ArgumentTypeError(f"expected an integer >= {low}, got {value}")
        return value

    return parse


def _positive_float(text: str) -> float:
    try:
        value = float(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"expected a number, got {text!r}") from None
    if not value > 0:  # also refuses nan
        raise argparse.ArgumentTypeError(f"expected a number > 0, got {text}")
    return value


def _dim_sizes(text: str) -> dict[int, int]:
    """``--dynamic-dims 1=512[,2=64]``: each dynamic dimension and its largest size."""
    out = {}
    for item in (i.strip() for i in text.split(",") if i.strip()):
        dim, eq, size = item.partition("=")
        if not eq or not dim.strip().isdigit() or not size.strip().isdigit():
            raise argparse.ArgumentTypeError(f"expected DIM=LARGEST[,DIM=LARGEST], e.g. 1=512, got {text!r}")
        out[int(dim)] = int(size)
    if not out:
        raise argparse.ArgumentTypeError(f"expected DIM=LARGEST[,DIM=LARGEST], e.g. 1=512, got {text!r}")
    return out


def _backend_list(text: str) -> list[str]:
    from lightning_quant.config import resolve_backend

    names = [b.strip() for b in text.split(",") if b.strip()]
    if not names:
        raise argparse.ArgumentTypeError("expected one or more of x86, arm (comma-separated)")
    try:
        return list(dict.fromkeys(resolve_backend(b).name for b in names))
    except ValueError as err:
        raise argparse.ArgumentTypeError(str(err)) from None


def _demo(args: argparse.Namespace) -> int:
    import copy

    import lightning.pytorch as pl

    from lightning_quant import PTQCallback, QATCallback, _torchao
    from lightning_quant.demo import DemoData, LitClassifier

    _set_threads(args.threads)
    pl.seed_everything(args.seed, verbose=False)
    dm = DemoData(data_dir=args.data, batch_size=128, train_subset=args.train_subset, test_subset=args.test_subset)
    if args.data and dm.name != "fashion-mnist":
        print(
            f"error: --data {args.data!r} has no Fashion-MNIST IDX files (train-images-idx3-ubyte.gz, ...)",
            file=sys.stderr,
        )
        return 2
    backends = list(args.backends)
    if "arm" in backends and not _torchao.executorch_available():
        print('note: executorch is not installed, skipping ARM (pip install "lightning-quant[arm]")')
        backends.remove("arm")
    out = Path(args.out)
    trainer_kwargs = dict(accelerator="cpu", logger=False, enable_checkpointing=False, enable_model_summary=False)
    start = time.perf_counter()

    # 1. fp32 training, then PTQ for each backend when fit ends
    ptq = [
        PTQCallback(
            backend=b,
            num_calibration_samples=args.calibration_samples,
            dirpath=str(out / "ptq" / b),
            metric_suffix=f"_int8_{b}",
        )
        for b in backends
    ]
    print(
        f"lightning-quant demo: {dm.name}, {args.epochs} fp32 epoch(s) + {args.qat_epochs} QAT epoch(s), "
        f"backends {backends}, artifacts in {out}/"
    )
    model = LitClassifier(image_size=dm.image_size, lr=args.lr)
    trainer = pl.Trainer(max_epochs=args.epochs, callbacks=list(ptq), default_root_dir=str(out), **trainer_kwargs)
    trainer.fit(model, dm)
    reports = [cb.report for cb in ptq if cb.report]

    # 2. QAT fine-tuning of the trained float model, once per backend (from the same float weights)
    if args.qat_epochs > 0:
        for b in backends:
            qat = QATCallback(backend=b, start_epoch=0, dirpath=str(out / "qat" / b), metric_suffix=f"_int8_{b}")
            student = copy.deepcopy(model)
            student.hparams.lr = args.lr * args.qat_lr_scale
            tuner = pl.Trainer(max_epochs=args.qat_epochs, callbacks=[qat], default_root_dir=str(out), **trainer_kwargs)
            tuner.fit(student, dm)
            if qat.report:
                reports.append(qat.report)
    print()
    dm.setup()
    accuracy = f"{dm.name} test accuracy" + (f" ({len(dm.val_set)} images)" if args.test_subset else "")
    print(_demo_table(accuracy, reports))
    print(f"\ndone in {time.perf_counter() - start:.0f} s")
    return 0


def _demo_table(accuracy: str, reports: list) -> str:
    if not reports:
        return "no backend ran"
    first = reports[0]
    name = next(iter(first.artifacts))
    acc_key = "val_acc" if "val_acc" in first.metrics_fp32 else next(iter(first.metrics_fp32), None)
    fp32_size, _ = first.size_bytes[name]
    fp32_ms, _ = first.latency_ms[name]
    batch = first.batch_size[name]
    rows = [("model", accuracy, "vs fp32", "size", f"latency (batch {batch})", "vs fp32 eager")]
    fp32_acc = first.metrics_fp32.get(acc_key, float("nan"))
    rows.append(("fp32 eager", f"{fp32_acc:.4f}", "", f"{fp32_size / 1024:.0f} KiB", f"{fp32_ms:.2f} ms", "1.00x"))
    for r in reports:
        acc = r.metrics_int8.get(acc_key, float("nan"))
        _, size = r.size_bytes[name]
        _, q_ms = r.latency_ms[name]
        rows.append(
            (
                f"{r.method} int8 {r.backend} ({r.artifacts[name].suffix})",
                f"{acc:.4f}",
                f"{acc - fp32_acc:+.4f}",
                f"{size / 1024:.0f} KiB ({size / fp32_size:.2f}x)",
                f"{q_ms:.2f} ms",
                speed_change(fp32_ms, q_ms),
            )
        )
    widths = [max(len(r[i]) for r in rows) for i in range(len(rows[0]))]
    return "\n".join("  ".join(c.ljust(w) for c, w in zip(r, widths)).rstrip() for r in rows)


# ----------------------------------------------------------------------------------------------- helpers


class CommandError(Exception):
    """Bad input to a subcommand: printed as one ``error:`` line, exit status 2."""


def _import_class(path: str, option: str, base: type) -> type:
    """``pkg.module.Class`` (or ``pkg.module:Class``) -> the class, checked to subclass ``base``."""
    import difflib
    import importlib
    import os

    if os.getcwd() not in sys.path and "" not in sys.path:
        sys.path.insert(0, os.getcwd())  # like `python -m`: the user's project modules import from where they stand
    module_name, sep, name = path.replace(":", ".").rpartition(".")
    if not sep or not module_name or not name:
        raise CommandError(f"{option} {path!r} is not a class path; expected `package.module.Class`.")
    try:
        module = importlib.import_module(module_name)
    except ModuleNotFoundError as err:
        raise CommandError(f"{option} {path!r}: cannot import {module_name!r} ({err}).") from None
    cls = getattr(module, name, None)
    if cls is None:
        names = [n for n, v in vars(module).items() if isinstance(v, type) and issubclass(v, base)]
        close = difflib.get_close_matches(name, names, n=3)
        hint = f" Did you mean {' or '.join(f'{module_name}.{c}' for c in close)}?" if close else ""
        raise CommandError(f"{option} {path!r}: module {module_name!r} has no class {name!r}.{hint}")
    if not (isinstance(cls, type) and issubclass(cls, base)):
        raise CommandError(f"{option} {path!r} is not a {base.__name__} subclass.")
    return cls


def _existing_file(path: str, option: str) -> Path:
    p = Path(path)
    if not p.is_file():
        raise CommandError(f"{option} {path!r} does not exist or is not a file.")
    return p


def _load_checkpoint(model_cls: type, ckpt: Path) -> Any:
    try:
        model = model_cls.load_from_checkpoint(str(ckpt), map_location="cpu")
    except Exception as err:  # unpickling, missing keys, hyper-parameters the class does not take...
        if _holds_qat_graphs(ckpt):
            raise CommandError(
                f"--ckpt {str(ckpt)!r} was written during quantization-aware training (it holds fake-quant graphs, not "
                f"a float {model_cls.__name__}): QATCallback exported its int8 model when fit ended. Pass a checkpoint "
                "saved before QAT started, or load this one in Python with `lightning_quant.load_qat_checkpoint`."
            ) from None
        raise CommandError(f"--ckpt {str(ckpt)!r}: not loadable as {model_cls.__name__} ({first_line(err)})") from None
    return model.eval()


def _holds_qat_graphs(ckpt: Path) -> bool:
    from lightning.fabric.utilities.cloud_io import _load as pl_load

    from lightning_quant.qat_graph import is_captured_state

    try:
        state = pl_load(str(ckpt), map_location="cpu", weights_only=True).get("state_dict", {})
    except Exception:  # noqa: BLE001 - not a checkpoint at all: the caller reports the load error
        return False
    return any(k.endswith("._extra_state") and is_captured_state(v) for k, v in state.items())


def _datamodule(cls: type, args_json: str | None) -> Any:
    import json

    kwargs: Any = {}
    if args_json:
        try:
            kwargs = json.loads(args_json)
        except json.JSONDecodeError as err:
            raise CommandError(f"--datamodule-args is not valid JSON ({err}).") from None
        if not isinstance(kwargs, dict):
            raise CommandError(f"--datamodule-args must be a JSON object of keyword arguments, got {args_json!r}.")
    try:
        return cls(**kwargs)
    except TypeError as err:
        raise CommandError(f"--datamodule {cls.__name__}: {err}.") from None


def _set_threads(threads: int | None, executorch: bool = True) -> None:
    """``--threads`` for torch and (``executorch``) ExecuTorch's threadpool, which runs a ``.pte``.

    Before any ``.pte`` is loaded: the threadpool's reset frees the one loaded programs use.
    """
    import torch

    from lightning_quant import _torchao

    if threads is not None:
        if threads < 1:
            raise CommandError(f"--threads must be >= 1, got {threads}.")
        if executorch:
            _torchao.set_num_threads(threads)
        else:
            torch.set_num_threads(threads)


# ----------------------------------------------------------------------------------------------------- ptq


def _ptq(args: argparse.Namespace) -> int:
    import lightning.pytorch as pl
    from lightning.fabric.utilities.exceptions import MisconfigurationException

    from lightning_quant import PTQCallback
    from lightning_quant.capture import resolve_targets

    class DataModuleCalibration(PTQCallback):
        """Outside `fit` the trainer holds no train loader: take it from the datamodule (the documented override)."""

        def calibration_loader(self, trainer: pl.Trainer) -> Any:
            if self.config.calibration_data == "val":
                return super().calibration_loader(trainer)
            dm.setup("fit")
            return dm.train_dataloader()

    _set_threads(args.threads)
    model_cls = _import_class(args.model, "--model", pl.LightningModule)
    dm_cls = _import_class(args.datamodule, "--datamodule", pl.LightningDataModule)
    ckpt = _existing_file(args.ckpt, "--ckpt")
    if Path(args.out).expanduser().is_file():  # before the validation pass, not after it
        raise CommandError(f"--out {args.out!r} is a file; pass a folder for the artifacts.")
    callback = DataModuleCalibration(  # validates every quantization argument before any loading
        backend=args.backend,
        num_calibration_samples=args.calibration_samples,
        calibration_data=args.calibration_data,
        observer=args.observer,
        weight_granularity=args.weight_granularity,
        bias_correction=args.bias_correction,
        modules=args.modules.split(",") if args.modules else None,
        dirpath=args.out,
        max_batch_size=args.max_batch_size,
        dynamic_dims=args.dynamic_dims,
    )
    dm = _datamodule(dm_cls, args.datamodule_args)
    model = _load_checkpoint(model_cls, ckpt)
    resolve_targets(model, callback.config.modules)  # a wrong --modules fails before any data is loaded
    trainer = pl.Trainer(
        accelerator="cpu",
        devices=1,
        logger=False,
        enable_checkpointing=False,
        enable_model_summary=False,
        limit_val_batches=1,  # attaches the datamodule's val loader to the trainer (one batch checks the data)
        default_root_dir=args.out,
    )
    try:
        trainer.validate(model, datamodule=dm, verbose=False)
    except MisconfigurationException:
        raise
    except Exception as err:  # most often data that does not fit the model: say so in one line
        raise CommandError(
            f"{model_cls.__name__}.validation_step failed on {dm_cls.__name__}'s validation data ({first_line(err)}). "
            "Check that --model, --ckpt and --datamodule(-args) belong together."
        ) from None
    trainer.limit_val_batches = 1.0  # the fp32 and int8 metrics: on all of the validation data
    report = callback.quantize(trainer, model)
    for path in report.artifacts.values():
        print(f"wrote {path} (+ {path.name}.json)")
    return 0


# ------------------------------------------------------------------------------------------------- inspect


def _inspect(args: argparse.Namespace) -> int:
    import json

    from lightning_quant import export

    path = _existing_file(args.artifact, "ARTIFACT")
    sidecar = export.read_sidecar(path)
    sha_ok = export.sha256_file(path) == sidecar["sha256"]
    print(json.dumps(sidecar, indent=2, sort_keys=True) if args.json else _describe(path, sidecar, sha_ok=sha_ok))
    if not sha_ok:  # what `load` refuses: a script checking the exit status must see it
        written_for = sidecar.get("file")
        other = f" (its sidecar was written for {written_for})" if written_for not in (None, path.name) else ""
        print(f"error: {path.name} does not match the sha256 in its sidecar{other}", file=sys.stderr)
        return 1
    return 0


def _is_number(v: Any) -> bool:
    return isinstance(v, (int, float)) and not isinstance(v, bool)


def _number(v: Any, spec: str) -> str:
    """``v`` formatted with ``spec`` when it is a number; as written otherwise (a hand-edited sidecar)."""
    return format(v, spec) if _is_number(v) else str(v)


def _dim_letter(name: Any, k: int) -> str:
    """``N`` for the batch, ``L<dim>`` for another dynamic dim (``dim1_2`` -> ``L1_2``)."""
    if name is None or name == "batch" or k == 0:
        return "N"
    return "L" + str(name).removeprefix("dim")


def _describe(path: Path, sc: dict, sha_ok: bool) -> str:
    def kib(n: Any) -> str:
        return f"{n / 1024:.1f} KiB" if _is_number(n) else "?"

    def dims(i: dict) -> str:  # N: the batch; L1, L1_2...: other dynamic dims (as named in the sidecar)
        named = i.get("dynamic") or {}
        return ", ".join(
            str(d) if d is not None else _dim_letter(named.get(str(k)), k) for k, d in enumerate(i["shape"])
        )

    try:
        inputs = ", ".join(
            f"{i['name']}: {i['constant']}" if "constant" in i else f"{i['name']}: {i['dtype']}[{dims(i)}]"
            for i in sc.get("inputs", [])
        )
    except (TypeError, KeyError, AttributeError):  # a hand-edited sidecar: as written (`load` refuses it)
        inputs = str(sc.get("inputs"))
    limits = [f"N <= {sc.get('max_batch_size')}"]
    limits += [f"L{d} <= {n}" for d, n in sc.get("dynamic_dims") or () if isinstance(d, int)]
    size, fp32 = sc.get("size_bytes"), sc.get("fp32_size_bytes")
    sized = _is_number(size) and _is_number(fp32) and fp32
    ratio = f" ({size / fp32:.2f}x the fp32 weights, {kib(fp32)})" if sized else ""
    # `save` on a quantize_ptq/quantize_qat model has no callback to name the method: the observer tells it
    method = str(sc.get("method") or ("QAT" if sc.get("observer") == "qat" else "PTQ"))
    versions = sc.get("versions") if isinstance(sc.get("versions"), dict) else {}
    machine = sc.get("machine") if isinstance(sc.get("machine"), dict) else {}
    versions = ", ".join(f"{k} {v}" for k, v in versions.items() if v)
    rows = [
        ("file", f"{path}"),
        ("backend", f"{sc['backend']}: {sc.get('artifact', '')}"),
        ("method", method + (f", submodule {sc['submodule']!r}" if sc.get("submodule") else "")),
        ("size", f"{kib(size)}{ratio}"),
        ("sha256", f"{sc['sha256'][:16]}... ({'matches the file' if sha_ok else 'DOES NOT match the file'})"),
        ("inputs", f"{inputs} ({', '.join(limits)})"),
        (
            ("calibration", "none: quantization-aware training (QAT)")
            if sc.get("observer") == "qat"
            else ("calibration", f"{sc.get('num_calibration_samples')} samples, observer {sc.get('observer')}")
        ),
        (
            "weights",
            f"{sc.get('weight_granularity', 'per_channel')}"
            + (f", bias corrected in {sc['bias_corrected_layers']} layers" if sc.get("bias_corrected_layers") else ""),
        ),
        ("versions", versions),
        ("built on", f"{machine.get('platform', '?')}, {sc.get('created', '?')}"),
    ]
    if sc.get("contains_native_code"):
        rows.append(("note", "contains native code compiled for the exporting CPU; load only files you trust"))
    if sc.get("undelegated_ops"):
        rows.append(("undelegated", ", ".join(map(str, sc["undelegated_ops"]))))
    if "parity_max_abs_diff" in sc:
        parity = _number(sc["parity_max_abs_diff"], ".2e")
        rows.append(("reload parity", f"max |diff| {parity} vs the in-process int8 model"))
    lat = sc.get("latency_ms") if isinstance(sc.get("latency_ms"), dict) else {}
    if _is_number(lat.get("fp32")) and _is_number(lat.get("int8")) and lat["int8"]:
        rows.append(
            ("latency", f"fp32 {lat['fp32']:.3f} ms, int8 {lat['int8']:.3f} ms ({lat['fp32'] / lat['int8']:.2f}x)")
        )
    width = max(len(k) for k, _ in rows)
    lines = [f"{k.ljust(width)}  {v}" for k, v in rows]
    metrics = sc.get("metrics") if isinstance(sc.get("metrics"), dict) else {}
    int8 = metrics.get("int8") if isinstance(metrics.get("int8"), dict) else {}
    base_name = next((k for k in metrics if k != "int8"), None)
    base = metrics.get(base_name) if isinstance(metrics.get(base_name), dict) else {}
    if base or int8:
        names = list(dict.fromkeys([*base, *int8]))
        table = [("metric", base_name or "", "int8", "delta")]
        for n in names:
            b, q = base.get(n), int8.get(n)
            delta = f"{q - b:+.4f}" if _is_number(b) and _is_number(q) else ""
            cells = ["-" if v is None else _number(v, ".4f") for v in (b, q)]
            table.append((str(n), *cells, delta))
        widths = [max(len(r[i]) for r in table) for i in range(4)]
        lines += [""] + ["  ".join(c.ljust(w) for c, w in zip(r, widths)).rstrip() for r in table]
    return "\n".join(lines)


# --------------------------------------------------------------------------------------------------- bench


def _example_inputs(sidecar: dict, batch: int) -> tuple[tuple, dict]:
    import ast

    import torch
    from torch.utils._pytree import tree_unflatten, treespec_loads

    leaves: list[Any] = []
    for spec in sidecar["inputs"]:
        if "constant" in spec:
            try:
                leaves.append(ast.literal_eval(spec["constant"]))
            except (ValueError, SyntaxError):
                raise CommandError(
                    f"input {spec['name']!r} was exported as the constant {spec['constant']}, which bench cannot "
                    "rebuild; time the artifact from Python instead."
                ) from None
            continue
        shape = [batch if d is None else d for d in spec["shape"]]
        dtype = getattr(torch, spec["dtype"])
        x = torch.randn(shape, dtype=dtype) if dtype.is_floating_point else torch.zeros(shape, dtype=dtype)
        leaves.append(x)
    args, kwargs = tree_unflatten(leaves, treespec_loads(sidecar["in_spec"]))
    return tuple(args), dict(kwargs)


def _bench(args: argparse.Namespace) -> int:
    import torch

    from lightning_quant import _torchao, export
    from lightning_quant._report import median_ms

    if (args.model is None) != (args.ckpt is None):
        raise CommandError("--model and --ckpt go together: both give the float baseline, or neither.")
    if args.batch < 1 or args.repeats < 1:
        raise CommandError(f"--batch and --repeats must be >= 1, got {args.batch} and {args.repeats}.")
    path = _existing_file(args.artifact, "ARTIFACT")
    is_pte = export.read_sidecar(path)["backend"] == "arm"
    _set_threads(args.threads, executorch=is_pte)
    baseline = None
    if args.model is not None:
        import lightning.pytorch as pl

        from lightning_quant.capture import get_submodule

        model_cls = _import_class(args.model, "--model", pl.LightningModule)
        ckpt = _existing_file(args.ckpt, "--ckpt")
    artifact = export.load(path, backend=args.backend)
    sidecar = artifact.sidecar
    if args.batch > sidecar["max_batch_size"]:
        raise CommandError(f"--batch {args.batch} exceeds the artifact's max_batch_size {sidecar['max_batch_size']}.")
    call_args, call_kwargs = _example_inputs(sidecar, args.batch)
    if args.model is not None:
        model = _load_checkpoint(model_cls, ckpt)
        try:
            baseline = get_submodule(model, sidecar["submodule"])
        except (AttributeError, ValueError, LookupError) as err:
            raise CommandError(
                f"--model {args.model}: the artifact was exported from submodule {sidecar['submodule']!r}, which "
                f"{model_cls.__name__} lacks ({err})."
            ) from None
    int8_ms = median_ms(artifact, *call_args, repeats=args.repeats, **call_kwargs)
    threads = _torchao.executorch_threads() if is_pte else torch.get_num_threads()  # what ran it
    print(f"{path.name} ({sidecar['backend']}), batch {args.batch}, {threads} thread(s), median of {args.repeats} runs")
    print(f"int8 artifact  {int8_ms:9.3f} ms")
    if baseline is not None:
        fp32_ms = median_ms(baseline, *call_args, repeats=args.repeats, **call_kwargs)
        print(f"fp32 model     {fp32_ms:9.3f} ms  ({args.model}, submodule {sidecar['submodule']!r})")
        print(f"int8 is {speed_change(fp32_ms, int8_ms)} than fp32")
    return 0


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="lightning-quant", description="int8 quantization for PyTorch Lightning.")
    sub = parser.add_subparsers(dest="command", required=True)
    demo = sub.add_parser(
        "demo",
        help="train a small CNN on real data, quantize it (PTQ and QAT) for x86 and ARM, print fp32 vs int8",
        description="Train a small CNN on Fashion-MNIST (Debian's dataset-fashion-mnist, or --data), else on "
        "scikit-learn's digits; then PTQ and a QAT fine-tune to int8 for x86 (.pt2) and ARM (.pte), and print the "
        "comparison.",
    )
    demo.add_argument("--data", default=None, help="folder with Fashion-MNIST *-ubyte.gz files")
    demo.add_argument("--epochs", type=_at_least(1), default=2)
    demo.add_argument("--lr", type=_positive_float, default=0.05)
    demo.add_argument(
        "--qat-epochs", type=_at_least(0), default=1, help="QAT fine-tuning epochs per backend (0: PTQ only)"
    )
    demo.add_argument("--qat-lr-scale", type=_positive_float, default=0.1, help="QAT learning rate = --lr times this")
    demo.add_argument("--backends", type=_backend_list, default="x86,arm", help="comma-separated: x86, arm")
    demo.add_argument("--calibration-samples", type=_at_least(1), default=1024)
    demo.add_argument("--train-subset", type=_at_least(1), default=None, help="train on N random training images only")
    demo.add_argument("--test-subset", type=_at_least(1), default=None, help="evaluate on N random test images only")
    demo.add_argument("--out", default="lightning_quant_demo", help="output folder for artifacts")
    demo.add_argument("--threads", type=_at_least(1), default=None)
    demo.add_argument("--seed", type=int, default=0)
    demo.set_defaults(func=_demo)

    from lightning_quant.config import BACKENDS, CALIBRATION_DATA, OBSERVERS, WEIGHT_GRANULARITIES

    backends = ", ".join(f"{b.name} ({b.suffix})" for b in BACKENDS.values())
    ptq = sub.add_parser(
        "ptq",
        help="quantize a trained checkpoint (post-training) and export it",
        formatter_class=argparse.RawDescriptionHelpFormatter,
        description="Load a LightningModule checkpoint (load_from_checkpoint), calibrate it on a\n"
        "LightningDataModule's data by running its own validation_step, convert to int8, export the\n"
        "backend's artifact with its JSON sidecar, and report fp32 vs int8 metrics on the datamodule's\n"
        "validation set.",
        epilog="example:\n  lightning-quant ptq --model lightning_quant.demo.LitClassifier "
        "--datamodule lightning_quant.demo.DemoData \\\n      --ckpt last.ckpt --backend x86 --out int8/",
    )
    ptq.add_argument("--model", required=True, metavar="CLASS_PATH", help="LightningModule class, e.g. pkg.mod.Model")
    ptq.add_argument("--datamodule", required=True, metavar="CLASS_PATH", help="LightningDataModule class")
    ptq.add_argument("--datamodule-args", metavar="JSON", help="its keyword arguments, e.g. '{\"batch_size\": 64}'")
    ptq.add_argument("--ckpt", required=True, metavar="PATH", help="the trained checkpoint")
    ptq.add_argument("--backend", default="x86", help=f"{backends}; aliases fbgemm, qnnpack... (default x86)")
    ptq.add_argument("--calibration-samples", type=_at_least(1), default=1024, metavar="N", help="default 1024")
    ptq.add_argument("--calibration-data", default="train", help=f"{' or '.join(CALIBRATION_DATA)} (default train)")
    ptq.add_argument("--observer", default="histogram", help=f"{', '.join(OBSERVERS)} (default histogram)")
    ptq.add_argument(
        "--weight-granularity", default="per_channel", help=f"{' or '.join(WEIGHT_GRANULARITIES)} (default per_channel)"
    )
    ptq.add_argument(
        "--bias-correction",
        action=argparse.BooleanOptionalAction,
        default=True,
        help="remove the mean output shift of int8 weights, measured on the calibration data (default on)",
    )
    ptq.add_argument("--modules", default=None, help="comma-separated submodules to quantize (default: picked)")
    ptq.add_argument(
        "--max-batch-size", type=_at_least(2), default=1024, metavar="N", help="largest batch the artifact takes"
    )
    ptq.add_argument(
        "--dynamic-dims",
        type=_dim_sizes,
        default=None,
        metavar="DIM=LARGEST",
        help="x86: other dims that vary, with their largest size, e.g. 1=512 for text lengths",
    )
    ptq.add_argument("--out", default="quantized", metavar="DIR", help="output folder (default ./quantized)")
    ptq.add_argument("--threads", type=int, default=None)
    ptq.set_defaults(func=_ptq)

    inspect = sub.add_parser(
        "inspect",
        help="print an artifact's sidecar: backend, versions, metrics, sizes",
        description="Print what the JSON sidecar next to an artifact records (backend, inputs, sizes, versions, "
        "fp32 vs int8 metrics and latencies) and whether the file still matches its sha256.",
    )
    inspect.add_argument("artifact", metavar="ARTIFACT", help="a .pt2 or .pte file written by lightning-quant")
    inspect.add_argument("--json", action="store_true", help="print the raw sidecar JSON")
    inspect.set_defaults(func=_inspect)

    bench = sub.add_parser(
        "bench",
        help="time an artifact, optionally against its float model",
        description="Time the artifact on random inputs shaped as its sidecar records. The float model is not in the "
        "artifact: give --model and --ckpt to time it too (the same submodule, same inputs) and print the ratio.",
    )
    bench.add_argument("artifact", metavar="ARTIFACT", help="a .pt2 or .pte file written by lightning-quant")
    bench.add_argument("--batch", type=int, default=1, metavar="N", help="batch size (default 1)")
    bench.add_argument("--threads", type=int, default=None, metavar="N", help="torch threads (default: torch's)")
    bench.add_argument("--repeats", type=int, default=20, metavar="N", help="timed runs; the median is shown")
    bench.add_argument("--backend", default=None, help="refuse an artifact for another backend")
    bench.add_argument("--model", default=None, metavar="CLASS_PATH", help="LightningModule for the fp32 baseline")
    bench.add_argument("--ckpt", default=None, metavar="PATH", help="its checkpoint")
    bench.set_defaults(func=_bench)
    return parser


def main(argv: Sequence[str] | None = None) -> int:
    parser = build_parser()
    args = parser.parse_args(argv)
    from lightning.fabric.utilities.exceptions import MisconfigurationException

    from lightning_quant.config import QuantizationError

    try:
        return args.func(args)
    except (
        CommandError,
        QuantizationError,
        MisconfigurationException,
        ValueError,
        TypeError,
        FileNotFoundError,
        ModuleNotFoundError,
        PermissionError,
    ) as err:
        print(f"error: {err}", file=sys.stderr)
        return 2


if __name__ == "__main__":
    sys.exit(main())
