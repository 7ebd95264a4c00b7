"""The ``lightning-quant`` command."""

from __future__ import annotations

import argparse
import sys
import time
from collections.abc import Sequence
from pathlib import Path


def _demo(args: argparse.Namespace) -> int:
    import copy

    import lightning.pytorch as pl
    import torch

    from lightning_quant import PTQCallback, QATCallback, _torchao
    from lightning_quant.demo import DemoData, LitClassifier

    torch.set_num_threads(args.threads or torch.get_num_threads())
    pl.seed_everything(args.seed, verbose=False)
    dm = DemoData(data_dir=args.data, batch_size=128, train_subset=args.train_subset)
    if args.data and dm.name != "fashion-mnist":
        print(
            f"error: --data {args.data!r} has no Fashion-MNIST IDX files (train-images-idx3-ubyte.gz, ...)",
            file=sys.stderr,
        )
        return 2
    backends = [b for b in args.backends.split(",") if b]
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
    print(_demo_table(dm.name, reports))
    print(f"\ndone in {time.perf_counter() - start:.0f} s")
    return 0


def _demo_table(dataset: str, reports: list) -> str:
    if not reports:
        return "no backend ran"
    first = reports[0]
    name = next(iter(first.artifacts))
    acc_key = "val_acc" if "val_acc" in first.metrics_fp32 else next(iter(first.metrics_fp32), None)
    fp32_size, _ = first.size_bytes[name]
    fp32_ms, _ = first.latency_ms[name]
    batch = first.batch_size[name]
    rows = [("model", f"{dataset} test accuracy", "vs fp32", "size", f"latency (batch {batch})", "vs fp32 eager")]
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
                f"{fp32_ms / q_ms:.2f}x faster",
            )
        )
    widths = [max(len(r[i]) for r in rows) for i in range(len(rows[0]))]
    return "\n".join("  ".join(c.ljust(w) for c, w in zip(r, widths)).rstrip() for r in rows)


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
    demo.add_argument("--epochs", type=int, default=2)
    demo.add_argument("--lr", type=float, default=0.05)
    demo.add_argument("--qat-epochs", type=int, default=1, help="QAT fine-tuning epochs per backend (0: PTQ only)")
    demo.add_argument("--qat-lr-scale", type=float, default=0.1, help="QAT learning rate = --lr times this")
    demo.add_argument("--backends", default="x86,arm", help="comma-separated: x86, arm")
    demo.add_argument("--calibration-samples", type=int, default=1024)
    demo.add_argument("--train-subset", type=int, default=None, help="train on the first N shuffled images only")
    demo.add_argument("--out", default="lightning_quant_demo", help="output folder for artifacts")
    demo.add_argument("--threads", type=int, default=None)
    demo.add_argument("--seed", type=int, default=0)
    demo.set_defaults(func=_demo)
    return parser


def main(argv: Sequence[str] | None = None) -> int:
    parser = build_parser()
    args = parser.parse_args(argv)
    try:
        return args.func(args)
    except (ValueError, TypeError, FileNotFoundError, ModuleNotFoundError, PermissionError) as err:
        print(f"error: {err}", file=sys.stderr)
        return 2


if __name__ == "__main__":
    sys.exit(main())
