"""QAT training-step cost as a ratio to the fp32 step, measured in the same process run.

    python benchmarks/qat_step.py [--batch 128] [--repeats 30] [--threads N] [--out benchmarks/results/qat_step.json]

One step = forward + cross-entropy + backward + SGD(momentum) update, on the demo's SmallCNN (28x28 inputs). The fp32
and fake-quant (PT2E ``prepare_qat_pt2e`` through ``QATGraph``) steps are timed in interleaved rounds so that machine
noise hits both alike; the ratio of medians is reported. Target: at most 1.5x.
"""

from __future__ import annotations

import argparse
import json
import platform
import statistics
import time
from pathlib import Path

import torch
from torch.nn import functional as F

from lightning_quant.config import QuantConfig
from lightning_quant.demo import SmallCNN
from lightning_quant.qat_graph import QATGraph


def _step_fn(model: torch.nn.Module, x: torch.Tensor, y: torch.Tensor):
    opt = torch.optim.SGD(model.parameters(), lr=0.01, momentum=0.9)

    def step() -> None:
        opt.zero_grad(set_to_none=True)
        F.cross_entropy(model(x), y).backward()
        opt.step()

    return step


def _time(fn, n: int) -> float:
    t = time.perf_counter()
    for _ in range(n):
        fn()
    return (time.perf_counter() - t) / n * 1000


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--batch", type=int, default=128)
    parser.add_argument("--repeats", type=int, default=30, help="interleaved rounds")
    parser.add_argument("--steps", type=int, default=5, help="steps per round")
    parser.add_argument("--threads", type=int, default=None)
    parser.add_argument("--backend", default="x86")
    parser.add_argument("--out", default="benchmarks/results/qat_step.json")
    args = parser.parse_args()
    if args.threads:
        torch.set_num_threads(args.threads)
    torch.manual_seed(0)
    x, y = torch.randn(args.batch, 1, 28, 28), torch.randint(0, 10, (args.batch,))

    fp32 = SmallCNN().train()
    qat_float = SmallCNN().train()
    qat = QATGraph(qat_float, "model", QuantConfig(backend=args.backend)).train()
    steps = {"fp32": _step_fn(fp32, x, y), "qat": _step_fn(qat, x, y)}
    for fn in steps.values():  # warm-up (the first QAT call captures and prepares the graph)
        for _ in range(3):
            fn()
    times: dict[str, list[float]] = {k: [] for k in steps}
    for _ in range(args.repeats):
        for k, fn in steps.items():
            times[k].append(_time(fn, args.steps))
    med = {k: statistics.median(v) for k, v in times.items()}
    result = {
        "benchmark": "qat_step",
        "model": "SmallCNN (demo), 1x28x28",
        "batch": args.batch,
        "threads": torch.get_num_threads(),
        "backend": args.backend,
        "fp32_step_ms": round(med["fp32"], 3),
        "qat_step_ms": round(med["qat"], 3),
        "ratio": round(med["qat"] / med["fp32"], 3),
        "target_ratio": 1.5,
        "machine": {"processor": platform.processor() or platform.machine(), "torch": torch.__version__},
    }
    print(json.dumps(result, indent=2))
    out = Path(args.out)
    out.parent.mkdir(parents=True, exist_ok=True)
    out.write_text(json.dumps(result, indent=2) + "\n")


if __name__ == "__main__":
    main()
