"""QAT training-step cost as a ratio to the fp32 step.

    python benchmarks/qat_step.py [--nets smallcnn mobilenetv2 resnet] [--batch 128] [--threads N] [--processes 3]
                                  [--hugetlb] [--tuned] [--out benchmarks/results/qat_step.json]

One step = forward + cross-entropy + backward + SGD(momentum) update at 28x28 inputs, on the demo's SmallCNN and the
benchmark nets of ``benchmarks/common.py``; QAT is the PT2E ``prepare_qat_pt2e`` graph through ``QATGraph`` (x86).
Target: at most 1.5x. Every measurement runs in fresh worker processes; two methods, both reported:

- **separate processes** (the target's figure): fp32 training and QAT training each in their own process, as a user
  runs them; ``--processes`` of each, in alternating order so that drifting machine load hits both alike; the ratio of
  the medians. Each process times ``--repeats`` rounds of ``--steps`` steps after warm-up.
- **same process**: both models in one process, timed in interleaved rounds (the method of earlier runs). There the
  two models' allocations interfere: the fp32 steps fault less and the QAT steps more than in processes of their own.

On glibc, tensors freed between steps go back to the kernel and come back as fresh zeroed pages; how often depends on
the allocator's state, so page faults per step are reported for every figure, with the glibc version and the
transparent-huge-page mode. The baseline runs without ``GLIBC_TUNABLES``; ``--hugetlb`` adds a separate-process
measurement under ``GLIBC_TUNABLES=glibc.malloc.hugetlb=1`` (glibc >= 2.35: transparent huge pages for malloc, far
fewer faults); ``--tuned`` one with huge pages and memory kept in the heap (``TUNED_ENV``: no mmap'd chunks, no
trimming; almost no faults).
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import resource
import statistics
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

from benchmarks.common import TUNED_GLIBC, machine, probe_big_malloc, run_json_worker  # noqa: E402

INPUT_SHAPE = (1, 28, 28)
HUGETLB_ENV = {"GLIBC_TUNABLES": "glibc.malloc.hugetlb=1"}
TUNED_ENV = {"GLIBC_TUNABLES": f"glibc.malloc.hugetlb=1:{TUNED_GLIBC}"}


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


def worker(name: str, kinds: list[str], batch: int, threads: int, repeats: int, steps: int) -> dict[str, Any]:
    """One training process: ``kinds`` (``["fp32"]``, ``["qat"]`` or both, interleaved) timed in it."""
    # first, while the heap is fresh (later a free chunk could serve it): whether glibc took the tunables
    probe = probe_big_malloc()
    torch.set_num_threads(threads)
    x, y = _batch(batch)
    result: dict[str, Any] = _timed_rounds({k: _step_fn(_model(name, k), x, y) for k in kinds}, repeats, steps)
    result["glibc_tunables"] = os.environ.get("GLIBC_TUNABLES")
    result["big_malloc"] = probe
    return result


def _run_worker(name: str, kinds: list[str], kw: dict[str, int], env: dict[str, str]) -> dict[str, Any]:
    args = json.dumps([name, kinds, kw["batch"], kw["threads"], kw["repeats"], kw["steps"]])
    base = {k: v for k, v in os.environ.items() if k != "GLIBC_TUNABLES"}  # the baseline runs with glibc's defaults
    return run_json_worker(Path(__file__).resolve(), args, {**base, **env}, "QAT step")


def _summary(method: str, fp32: list[dict[str, float]], qat: list[dict[str, float]], **extra: Any) -> dict[str, Any]:
    med = {k: statistics.median(r["step_ms"] for r in runs) for k, runs in (("fp32", fp32), ("qat", qat))}
    out = {
        "method": method,
        **extra,
        "fp32_step_ms": round(med["fp32"], 3),
        "qat_step_ms": round(med["qat"], 3),
        "ratio": round(med["qat"] / med["fp32"], 3),
    }
    for kind, runs in (("fp32", fp32), ("qat", qat)):
        out[f"{kind}_runs_ms"] = [round(r["step_ms"], 2) for r in runs]
        out[f"{kind}_faults_per_step"] = round(statistics.median(r["faults_per_step"] for r in runs))
    return out


def separate_processes(name: str, *, processes: int, env: dict[str, str] | None = None, **kw: int) -> dict[str, Any]:
    """fp32 and QAT steps each timed in fresh processes, ``processes`` of each; ratio of the medians.

    The order alternates (fp32 then QAT, QAT then fp32, ...) so that drifting machine load hits both alike.
    ``kw``: ``batch``, ``threads``, ``repeats``, ``steps``.
    """
    env = env or {}
    runs: dict[str, list[dict[str, Any]]] = {"fp32": [], "qat": []}
    for i in range(processes):
        for kind in ("fp32", "qat") if i % 2 == 0 else ("qat", "fp32"):
            r = _run_worker(name, [kind], kw, env)
            runs[kind].append({**r[kind], "glibc_tunables": r["glibc_tunables"], "big_malloc": r["big_malloc"]})
    tunables = sorted({str(r["glibc_tunables"]) for v in runs.values() for r in v})
    probes = sorted({json.dumps(r["big_malloc"], sort_keys=True) for v in runs.values() for r in v})
    extra = {"env": env, "processes_each": processes, "glibc_tunables": tunables, "big_malloc": probes}
    return _summary("separate processes", runs["fp32"], runs["qat"], **extra)


def same_process(name: str, **kw: int) -> dict[str, Any]:
    """fp32 and QAT steps interleaved in one fresh process; ratio of the medians (``kw``: as in separate_processes)."""
    r = _run_worker(name, ["fp32", "qat"], kw, {})
    return _summary("same process", [r["fp32"]], [r["qat"]])


def measure(
    name: str,
    *,
    batch: int,
    threads: int,
    processes: int,
    repeats: int,
    steps: int,
    hugetlb: bool = False,
    tuned: bool = False,
) -> dict[str, Any]:
    """Both methods (and the glibc variants when asked) for one net; ``ratio`` is the separate-process one."""
    kw = {"batch": batch, "threads": threads, "repeats": repeats, "steps": steps}
    sep = separate_processes(name, processes=processes, **kw)
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
        out["separate_processes_hugetlb"] = separate_processes(name, processes=processes, env=HUGETLB_ENV, **kw)
    if tuned:
        out["separate_processes_tuned"] = separate_processes(name, processes=processes, env=TUNED_ENV, **kw)
    return out


def allocator() -> dict[str, Any]:
    """What the page-fault figures depend on: glibc's version, the transparent-huge-page mode, inherited tunables."""
    thp = Path("/sys/kernel/mm/transparent_hugepage/enabled")
    return {
        "libc": " ".join(platform.libc_ver()),
        "transparent_hugepage": thp.read_text().strip() if thp.exists() else None,
        "inherited_glibc_tunables": os.environ.get("GLIBC_TUNABLES"),
        # passed on to the workers as they are: another allocator, or glibc's own MALLOC_*_ settings
        "ld_preload": os.environ.get("LD_PRELOAD"),
        "malloc_env": {k: v for k, v in os.environ.items() if k.startswith("MALLOC_")},
    }


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--nets", nargs="+", default=["smallcnn", "mobilenetv2", "resnet"])
    parser.add_argument("--batch", type=int, default=128)
    parser.add_argument("--threads", type=int, default=None, help="default: torch's default")
    parser.add_argument("--processes", type=int, default=3, help="fresh processes of each kind (separate processes)")
    parser.add_argument("--repeats", type=int, default=10, help="timed rounds per measurement")
    parser.add_argument("--steps", type=int, default=3, help="steps per timed round")
    parser.add_argument("--hugetlb", action="store_true", help="also measure under glibc.malloc.hugetlb=1")
    parser.add_argument(
        "--tuned", action="store_true", help="also measure under hugetlb=1 with mmap_max=0 and no heap trimming"
    )
    parser.add_argument("--out", default="benchmarks/results/qat_step.json")
    parser.add_argument("--worker", help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.worker:
        print(json.dumps(worker(*json.loads(args.worker))))
        return
    threads = args.threads or torch.get_num_threads()
    t0 = time.perf_counter()
    nets = {}
    for name in args.nets:
        print(f"[{time.perf_counter() - t0:5.0f} s] {name}", flush=True)
        nets[name] = measure(
            name,
            batch=args.batch,
            threads=threads,
            processes=args.processes,
            repeats=args.repeats,
            steps=args.steps,
            hugetlb=args.hugetlb,
            tuned=args.tuned,
        )
    result = {
        "benchmark": "qat_step",
        "backend": "x86",
        "target_ratio": 1.5,
        "settings": {k: v for k, v in vars(args).items() if k not in ("out", "worker")} | {"threads": threads},
        "machine": machine(),
        "allocator": allocator(),
        "nets": nets,
        "wall_s": round(time.perf_counter() - t0, 1),
    }
    print(json.dumps(nets, indent=2))
    out = Path(args.out)
    out.parent.mkdir(parents=True, exist_ok=True)
    out.write_text(json.dumps(result, indent=2) + "\n")


if __name__ == "__main__":
    main()
