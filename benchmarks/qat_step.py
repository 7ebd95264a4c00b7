"""QAT training-step cost as a ratio to the fp32 step.

    python benchmarks/qat_step.py [--nets smallcnn mobilenetv2 resnet] [--batch 128] [--threads 2] [--rounds 3]
                                  [--out benchmarks/results/qat_step.json]

One step = forward + cross-entropy + backward + SGD(momentum) update at 28x28 inputs, on the demo's SmallCNN and the
benchmark nets of ``benchmarks/common.py``; QAT is the PT2E ``prepare_qat_pt2e`` graph through ``QATGraph`` (x86).
Target: at most 1.5x. Two ways of measuring, both reported:

- **separate processes** (the target's figure): fp32 training and QAT training each in their own fresh Python process,
  as a user runs them; ``--rounds`` processes of each, alternating fp32/QAT so that machine noise hits both alike; the
  ratio of the medians. Each process times ``--repeats`` rounds of ``--steps`` steps after warm-up.
- **same process**: both models in one process, timed in interleaved rounds (the method of earlier runs). Here the
  fp32 steps reuse the larger heap that the QAT graph's allocations left behind, so they run with almost no page
  faults, which an fp32 training process of its own does not: the page-fault counts per step are reported for both
  methods to show it.

On glibc, tensors freed between steps go back to the kernel and come back as fresh zeroed pages; how often depends on
the allocator's state, which is why the two methods differ. ``--hugetlb`` adds a third, separate-process measurement
under ``GLIBC_TUNABLES=glibc.malloc.hugetlb=1`` (transparent huge pages for malloc: far fewer faults).
"""

from __future__ import annotations

import argparse
import json
import os
import resource
import statistics
import subprocess
import sys
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

ROOT = Path(__file__).resolve().parents[1]
if str(ROOT) not in sys.path:
    sys.path.insert(0, str(ROOT))

import torch  # noqa: E402
from torch.nn import functional as F  # noqa: E402

INPUT_SHAPE = (1, 28, 28)
HUGETLB_ENV = {"GLIBC_TUNABLES": "glibc.malloc.hugetlb=1"}


def make_net(name: str) -> torch.nn.Module:
    """A 28x28, 10-class net by name: the demo's ``smallcnn`` or a benchmark net (``mobilenetv2``, ``resnet``)."""
    if name == "smallcnn":
        from lightning_quant.demo import SmallCNN

        return SmallCNN()
    from benchmarks.common import NETS

    return NETS[name](1, 10)


def _step_fn(model: torch.nn.Module, x: torch.Tensor, y: torch.Tensor) -> Callable[[], None]:
    opt = torch.optim.SGD(model.parameters(), lr=0.01, momentum=0.9)

    def step() -> None:
        opt.zero_grad(set_to_none=True)
        F.cross_entropy(model(x), y).backward()
        opt.step()

    return step


def _time(fn: Callable[[], None], n: int) -> float:
    t = time.perf_counter()
    for _ in range(n):
        fn()
    return (time.perf_counter() - t) / n * 1000


def _faults() -> int:
    return resource.getrusage(resource.RUSAGE_SELF).ru_minflt


def _batch(batch: int) -> tuple[torch.Tensor, torch.Tensor]:
    g = torch.Generator().manual_seed(0)
    return torch.randn(batch, *INPUT_SHAPE, generator=g), torch.randint(0, 10, (batch,), generator=g)


def _model(name: str, kind: str, seed: int = 0) -> torch.nn.Module:
    torch.manual_seed(seed)
    model = make_net(name).train()
    if kind == "qat":
        from lightning_quant.config import QuantConfig
        from lightning_quant.qat_graph import QATGraph

        model = QATGraph(model, "model", QuantConfig(backend="x86")).train()
    return model


def _timed_rounds(steps: dict[str, Callable[[], None]], repeats: int, n: int) -> dict[str, dict[str, float]]:
    """Warm up, then ``repeats`` interleaved rounds of ``n`` steps; median ms per step and page faults per step."""
    for fn in steps.values():  # the first QAT call captures and prepares the graph
        for _ in range(3):
            fn()
    times: dict[str, list[float]] = {k: [] for k in steps}
    faults = dict.fromkeys(steps, 0)
    for _ in range(repeats):
        for k, fn in steps.items():
            before = _faults()
            times[k].append(_time(fn, n))
            faults[k] += _faults() - before
    return {k: {"step_ms": statistics.median(times[k]), "faults_per_step": faults[k] / (repeats * n)} for k in steps}


def worker(name: str, kind: str, batch: int, threads: int, repeats: int, steps: int) -> dict[str, float]:
    """One training process: ``kind`` (``fp32`` or ``qat``) alone, as a user's training run."""
    torch.set_num_threads(threads)
    x, y = _batch(batch)
    return _timed_rounds({kind: _step_fn(_model(name, kind), x, y)}, repeats, steps)[kind]


def separate_processes(
    name: str,
    *,
    batch: int,
    threads: int,
    rounds: int,
    repeats: int,
    steps: int,
    env: dict[str, str] | None = None,
) -> dict[str, Any]:
    """fp32 and QAT steps each timed in fresh processes (``rounds`` of each, alternating); ratio of the medians."""
    runs: dict[str, list[dict[str, float]]] = {"fp32": [], "qat": []}
    for _ in range(rounds):
        for kind in runs:
            args = json.dumps([name, kind, batch, threads, repeats, steps])
            proc = subprocess.run(
                [sys.executable, str(Path(__file__).resolve()), "--worker", args],
                cwd=ROOT,
                env={**os.environ, **(env or {})},
                capture_output=True,
                text=True,
                check=False,
            )
            if proc.returncode != 0:
                raise RuntimeError(f"QAT step worker {args} failed:\n{proc.stderr[-3000:]}")
            runs[kind].append(json.loads(proc.stdout.strip().splitlines()[-1]))
    med = {k: statistics.median(r["step_ms"] for r in v) for k, v in runs.items()}
    return {
        "method": "separate processes",
        "env": env or {},
        "processes_each": rounds,
        "fp32_step_ms": round(med["fp32"], 3),
        "qat_step_ms": round(med["qat"], 3),
        "ratio": round(med["qat"] / med["fp32"], 3),
        "fp32_runs_ms": [round(r["step_ms"], 2) for r in runs["fp32"]],
        "qat_runs_ms": [round(r["step_ms"], 2) for r in runs["qat"]],
        "fp32_faults_per_step": round(statistics.median(r["faults_per_step"] for r in runs["fp32"])),
        "qat_faults_per_step": round(statistics.median(r["faults_per_step"] for r in runs["qat"])),
    }


def same_process(name: str, *, batch: int, threads: int, repeats: int, steps: int) -> dict[str, Any]:
    """fp32 and QAT steps in this process, in interleaved rounds; ratio of the medians."""
    torch.set_num_threads(threads)
    x, y = _batch(batch)
    fns = {kind: _step_fn(_model(name, kind), x, y) for kind in ("fp32", "qat")}
    r = _timed_rounds(fns, repeats, steps)
    return {
        "method": "same process",
        "fp32_step_ms": round(r["fp32"]["step_ms"], 3),
        "qat_step_ms": round(r["qat"]["step_ms"], 3),
        "ratio": round(r["qat"]["step_ms"] / r["fp32"]["step_ms"], 3),
        "fp32_faults_per_step": round(r["fp32"]["faults_per_step"]),
        "qat_faults_per_step": round(r["qat"]["faults_per_step"]),
    }


def measure(
    name: str, *, batch: int, threads: int, rounds: int, repeats: int, steps: int, hugetlb: bool = False
) -> dict[str, Any]:
    """Both methods (and the huge-page variant when asked) for one net; ``ratio`` is the separate-process one."""
    kw = {"batch": batch, "threads": threads, "repeats": repeats, "steps": steps}
    sep = separate_processes(name, rounds=rounds, **kw)
    out: dict[str, Any] = {
        "batch": batch,
        "threads": threads,
        "fp32_step_ms": sep["fp32_step_ms"],
        "qat_step_ms": sep["qat_step_ms"],
        "ratio": sep["ratio"],
        "separate_processes": sep,
        "same_process": same_process(name, **kw),
    }
    if hugetlb:
        out["separate_processes_hugetlb"] = separate_processes(name, rounds=rounds, env=HUGETLB_ENV, **kw)
    return out


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--nets", nargs="+", default=["smallcnn", "mobilenetv2", "resnet"])
    parser.add_argument("--batch", type=int, default=128)
    parser.add_argument("--threads", type=int, default=None, help="default: torch's default")
    parser.add_argument("--rounds", type=int, default=3, help="fresh processes of each kind (separate processes)")
    parser.add_argument("--repeats", type=int, default=10, help="timed rounds per measurement")
    parser.add_argument("--steps", type=int, default=3, help="steps per timed round")
    parser.add_argument("--hugetlb", action="store_true", help="also measure under glibc.malloc.hugetlb=1")
    parser.add_argument("--out", default="benchmarks/results/qat_step.json")
    parser.add_argument("--worker", help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.worker:
        print(json.dumps(worker(*json.loads(args.worker))))
        return
    from benchmarks.common import machine

    threads = args.threads or torch.get_num_threads()
    t0 = time.perf_counter()
    nets = {}
    for name in args.nets:
        print(f"[{time.perf_counter() - t0:5.0f} s] {name}", flush=True)
        nets[name] = measure(
            name,
            batch=args.batch,
            threads=threads,
            rounds=args.rounds,
            repeats=args.repeats,
            steps=args.steps,
            hugetlb=args.hugetlb,
        )
    result = {
        "benchmark": "qat_step",
        "backend": "x86",
        "target_ratio": 1.5,
        "settings": {k: v for k, v in vars(args).items() if k not in ("out", "worker")} | {"threads": threads},
        "machine": machine(),
        "nets": nets,
        "wall_s": round(time.perf_counter() - t0, 1),
    }
    print(json.dumps(nets, indent=2))
    out = Path(args.out)
    out.parent.mkdir(parents=True, exist_ok=True)
    out.write_text(json.dumps(result, indent=2) + "\n")


if __name__ == "__main__":
    main()
