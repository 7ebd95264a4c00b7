"""x86 int8 latency under glibc's malloc and under a preloaded allocator, ONNX Runtime int8 beside it.

    python benchmarks/allocator.py [--lib PATH] [--quick] [--out benchmarks/results]

At batch 1 our ``.pt2`` spends most of its time around the convolutions, not in them: ``perf`` over 50,000 batch-1
calls of the MobileNetV2-style artifact (1 thread) put 42% of the samples in glibc's malloc/free (oneDNN scratchpads
and descriptors and the output tensors, allocated and freed at every call; ``malloc_consolidate`` alone 7%), 35% in
``libtorch_cpu`` (oneDNN primitive-descriptor creation and cache lookups, PyTorch's qconv setup) and 13% in oneDNN's
JIT kernels (``perf record -g python -c "..."`` around a loop of ``lightning_quant.load(path)(x)`` calls, started
after load and warm-up; ``perf report --sort dso,symbol``). Another allocator changes the first part without
touching the artifact; this measures by how much.

At batch 32 on EfficientNet-Lite0 the cost is elsewhere: ``perf`` (50 calls, 1 thread) put 46% of the samples in
oneDNN's JIT kernels, 17% in the package's own kernels (the input quantize, four pads, the final mean) and 33% in the
Linux kernel, faulting in fresh pages (19,000-27,000 minor faults per call, ~100 MB): glibc serves each large
activation with ``mmap`` and unmaps it when freed, or trims the heap top it was carved from, so the next call faults
it in again. ``GLIBC_TUNABLES=glibc.malloc.mmap_max=0:glibc.malloc.trim_threshold=<large>`` keeps them in the heap
(no extra library); setting the trim threshold alone was worse here (it turns off glibc's adaptive mmap threshold:
70,000 faults per call, one-off check). PyTorch's ``THP_MEM_ALLOC_ENABLE=1`` leaves glibc as it is but has tensors of
2 MiB and more ``madvise``'d as transparent huge pages: the same memory faults in 2 MiB at a time.

Builds our x86 ``.pt2`` and ONNX Runtime int8 for each net (the MobileNetV2- and ResNet-style nets and
EfficientNet-Lite0, with ``benchmarks/speed.py``'s builders and calibration), then times both at batch 1 and 32 with
1 thread in fresh worker processes: ``processes`` (a setting) under each allocator (glibc, glibc with
``TUNED_GLIBC``, glibc with ``THP_ENV``, ``LD_PRELOAD=<lib>``), in alternating order; within a worker the two routes
alternate in rounds, and each round also counts the process's minor page faults. Medians over all rounds of all
processes of each kind. The default library is mimalloc from the ``cmeel-mimalloc`` wheel (in the ``bench`` extra),
else the first of jemalloc/tcmalloc/mimalloc that ``ldconfig`` lists.
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

ROOT = Path(__file__).resolve().parents[1]
if str(ROOT) not in sys.path:
    sys.path.insert(0, str(ROOT))

from benchmarks.common import (  # noqa: E402
    THP_ENV,
    TUNED_GLIBC,
    probe_big_malloc,
    probe_tensor_huge_pages,
    run_json_worker,
    thp_mode,
)

ROUTES = ("x86_int8", "ort_int8")
ROUTE_NAMES = {"x86_int8": "int8 x86 .pt2 (ours)", "ort_int8": "int8 ONNX Runtime"}
ALLOCATORS = ("glibc", "glibc_tuned", "thp", "preloaded")
_LDCONFIG_NAMES = ("libjemalloc.so", "libtcmalloc_minimal.so", "libtcmalloc.so", "libmimalloc.so")

FULL: dict[str, Any] = {
    "nets": ["mobilenetv2", "resnet", "efficientnet_lite0"],
    "batches": [1, 32],
    "processes": 4,  # per allocator; even, so that the alternating order is balanced
    "rounds": 5,
}
QUICK: dict[str, Any] = {"nets": ["resnet"], "batches": [1], "processes": 1, "rounds": 2}


def find_allocator() -> str | None:
    """A malloc replacement to preload: mimalloc from the ``cmeel-mimalloc`` wheel, else one ``ldconfig`` lists."""
    from importlib import metadata

    try:
        files = metadata.files("cmeel-mimalloc") or []
    except metadata.PackageNotFoundError:
        files = []
    found = sorted(str(f.locate()) for f in files if f.name.startswith("libmimalloc.so"))
    if found:
        return str(Path(found[0]).resolve())
    try:
        listing = subprocess.run(["ldconfig", "-p"], capture_output=True, text=True, check=False).stdout
    except OSError:
        return None
    arch = {"x86_64": "x86-64", "aarch64": "AArch64"}.get(platform.machine())  # skip other ABIs' copies (i386...)
    for name in _LDCONFIG_NAMES:
        for line in listing.splitlines():
            if line.strip().startswith(name) and "=>" in line and (arch is None or arch in line):
                return line.split("=>")[-1].strip()
    return None


def malloc_owner() -> str | None:
    """The shared object this process's ``malloc`` comes from (``/proc/self/maps``): proof that a preload took effect.

    ld.so skips an ``LD_PRELOAD`` it cannot load with a message on stderr and runs on with glibc's malloc.
    """
    import ctypes

    addr = ctypes.cast(ctypes.CDLL(None).malloc, ctypes.c_void_p).value
    try:
        with open("/proc/self/maps") as f:
            for line in f:
                parts = line.split()
                lo, hi = (int(v, 16) for v in parts[0].split("-"))
                if lo <= addr < hi and len(parts) >= 6:
                    return os.path.realpath(parts[5])
    except OSError:
        return None
    return None


def _calls_per_round(name: str, batch: int) -> int:
    """About 50-150 ms of calls per round."""
    if name == "efficientnet_lite0":
        return 30 if batch == 1 else 2
    return 300 if batch == 1 else 30


def worker(work: str, nets: list[str], batches: list[int], rounds: int) -> dict[str, Any]:
    """Time our ``.pt2`` and ONNX Runtime at each batch with 1 thread; median µs per call over ``rounds`` rounds."""
    import resource

    import torch

    import lightning_quant as lq
    from benchmarks.speed import INPUT_SHAPES, ort_session

    torch.set_num_threads(1)
    out: dict[str, Any] = {
        "ld_preload": os.environ.get("LD_PRELOAD"),
        "glibc_tunables": os.environ.get("GLIBC_TUNABLES"),
        "malloc_from": malloc_owner(),
        "big_malloc": probe_big_malloc(),
        "huge_pages_kb": probe_tensor_huge_pages(),
        "nets": {},
    }
    for name in nets:
        ours = lq.load(Path(work) / name / "x86_int8.pt2")
        sess = ort_session(Path(work) / name / "ort_int8.onnx", 1)
        out["nets"][name] = {}
        for batch in batches:
            x = torch.randn(batch, *INPUT_SHAPES[name], generator=torch.Generator().manual_seed(batch))
            xn = x.numpy()
            calls = {
                "x86_int8": lambda x=x, ours=ours: ours(x),
                "ort_int8": lambda xn=xn, sess=sess: sess.run(None, {"x": xn}),
            }
            n = _calls_per_round(name, batch)
            times: dict[str, list[float]] = {k: [] for k in calls}
            faults: dict[str, list[float]] = {k: [] for k in calls}
            with torch.no_grad():
                for fn in calls.values():
                    for _ in range(n):
                        fn()
                for r in range(rounds):
                    for k in calls if r % 2 == 0 else reversed(list(calls)):
                        f = resource.getrusage(resource.RUSAGE_SELF).ru_minflt
                        t = time.perf_counter()
                        for _ in range(n):
                            calls[k]()
                        times[k].append((time.perf_counter() - t) / n * 1e6)
                        faults[k].append((resource.getrusage(resource.RUSAGE_SELF).ru_minflt - f) / n)
            out["nets"][name][str(batch)] = {"us": times, "faults": faults}
    return out


def build(work: Path, nets: list[str]) -> None:
    """Our x86 ``.pt2`` and ONNX Runtime int8 for each net under ``work/<net>/`` (speed.py's builders)."""
    import torch

    from benchmarks import speed

    speed._quiet()
    for name in nets:
        folder = work / name
        folder.mkdir(parents=True, exist_ok=True)
        model = speed.make_net(name)
        samples = speed.FULL["calibration_samples_large" if name == "efficientnet_lite0" else "calibration_samples"]
        calib = speed.calibration_batches(speed.INPUT_SHAPES[name], samples)
        speed.build_ours(model, "x86", calib, folder, 32)
        speed.build_ort(model, torch.randn(2, *speed.INPUT_SHAPES[name]), calib, folder, [1])


def allocator_envs(lib: str) -> dict[str, dict[str, str]]:
    """The workers' environments: glibc as configured by default, glibc with ``TUNED_GLIBC``, ``lib`` preloaded."""
    base = {
        k: v
        for k, v in os.environ.items()
        if k not in ("LD_PRELOAD", "GLIBC_TUNABLES", *THP_ENV)
        and not k.startswith("MALLOC_")  # glibc's older tuning variables
    }
    return {
        "glibc": base,
        "glibc_tuned": {**base, "GLIBC_TUNABLES": TUNED_GLIBC},
        "thp": {**base, **THP_ENV},
        "preloaded": {**base, "LD_PRELOAD": lib},
    }


def _check_worker(alloc: str, lib: str, r: dict[str, Any]) -> None:
    """Raise unless the worker ran the allocator it was started for (a preload or a tunable can fail silently)."""
    preloaded = r["malloc_from"] == os.path.realpath(lib)
    if alloc == "preloaded" and not preloaded:
        raise RuntimeError(
            f"a preloaded worker's malloc came from {r['malloc_from']}, not {lib}: LD_PRELOAD did not apply"
        )
    if alloc != "preloaded" and preloaded:
        raise RuntimeError(f"a {alloc} worker's malloc came from {lib}: an LD_PRELOAD leaked into its environment")
    probe = r["big_malloc"]
    if alloc == "glibc_tuned" and probe != {"mmapped": False, "kept": True}:
        raise RuntimeError(
            f"a glibc_tuned worker did not run with GLIBC_TUNABLES={TUNED_GLIBC}: 64 MiB malloc/free probe {probe} "
            "(wanted no mmap, memory kept; None: this glibc has no mallinfo2 to check with)"
        )
    if alloc in ("glibc", "thp") and probe is not None and not probe["mmapped"]:
        raise RuntimeError(
            f"a {alloc} worker's malloc is tuned by something else here: 64 MiB malloc/free probe {probe}"
        )


def measure(work: Path, lib: str, s: dict[str, Any]) -> tuple[dict[str, Any], dict[str, dict[str, Any]]]:
    """Workers under each of ``ALLOCATORS``, alternating order; per net, batch and route: median µs and faults per call.

    Each round's figure is the mean of one round's calls; the median is over the rounds of all workers of an allocator.
    Every worker reports where its ``malloc`` came from (and the tuned ones that glibc took the tunables), and a
    preload or tunable that did not apply is an error. Returns the figures by net and batch, and per allocator what its
    first worker reported about its ``malloc`` (where it came from, the 64 MiB probe).
    """
    envs = allocator_envs(lib)
    payload = json.dumps([str(work), s["nets"], s["batches"], s["rounds"]])
    rounds: dict[str, dict[str, dict[str, dict[str, dict[str, list[float]]]]]] = {a: {} for a in ALLOCATORS}
    owners: dict[str, dict[str, Any]] = {}
    for i in range(s["processes"]):
        for alloc in ALLOCATORS if i % 2 == 0 else ALLOCATORS[::-1]:  # balanced over an even number of processes
            r = run_json_worker(Path(__file__), payload, envs[alloc], "allocator benchmark")
            _check_worker(alloc, lib, r)
            owners.setdefault(
                alloc,
                {"malloc_from": r["malloc_from"], "big_malloc": r["big_malloc"], "huge_pages_kb": r["huge_pages_kb"]},
            )
            for name, per_batch in r["nets"].items():
                for batch, got in per_batch.items():
                    for what, per_route in got.items():
                        for route, vals in per_route.items():
                            slot = rounds[alloc].setdefault(name, {}).setdefault(batch, {}).setdefault(route, {})
                            slot.setdefault(what, []).extend(vals)
    out: dict[str, Any] = {}
    for name in s["nets"]:
        out[name] = {}
        for batch in map(str, s["batches"]):
            row: dict[str, Any] = {}
            for alloc in ALLOCATORS:
                for route in ROUTES:
                    got = rounds[alloc][name][batch][route]
                    row[f"{route}_{alloc}_us"] = round(statistics.median(got["us"]), 1)
                    row[f"{route}_{alloc}_faults"] = round(statistics.median(got["faults"]), 1)
            for alloc in ALLOCATORS[1:]:
                for route in ROUTES:
                    row[f"{route}_{alloc}_speedup"] = round(row[f"{route}_glibc_us"] / row[f"{route}_{alloc}_us"], 3)
            for alloc in ALLOCATORS:  # >1: ours faster than ONNX Runtime
                row[f"x86_vs_ort_{alloc}"] = round(row[f"ort_int8_{alloc}_us"] / row[f"x86_int8_{alloc}_us"], 3)
            out[name][batch] = row
    return out, owners


def render_markdown(results: dict[str, Any]) -> str:
    m = results["machine"]
    lib = Path(results["library"]).name
    s = results["settings"]
    lines = [
        "## Batch latency with another malloc (`benchmarks/allocator.py`)",
        "",
        f"Measured on {m['cpu']} ({m['logical_cpus']} logical CPUs), torch {m['versions']['torch']}, onnxruntime "
        f"{m['versions']['onnxruntime']}, {results['libc']}; 1 thread; µs per call and minor page faults per call "
        f"(in brackets), median of {s['rounds']} rounds in each of {s['processes']} fresh process(es) per allocator "
        f"(in alternating order). glibc tuned: `GLIBC_TUNABLES={TUNED_GLIBC}`; THP: glibc with PyTorch's "
        f"`{_thp_setting()}` (transparent huge pages for tensors of 2 MiB and more; the kernel's THP mode here: "
        f"{results.get('thp_mode')}; a fresh 64 MiB tensor got {_huge_pages(results)} of huge pages in the THP "
        f"workers); `{lib}` is preloaded with "
        "`LD_PRELOAD`. The artifacts are the same files in every column. Speed-up: vs glibc. Ratio vs ONNX "
        "Runtime (same allocator): above 1, ours is faster. The allocators run in different processes, minutes "
        "apart: where ONNX Runtime's own speed-up is far from 1× the shared machine's speed drifted between them, "
        "and the ratios vs ONNX Runtime, measured within each process, are the figures to read.",
        "",
        f"| net | batch | route | glibc | glibc tuned | speed-up | THP | speed-up | {lib} | speed-up | vs ONNX "
        f"Runtime: glibc, tuned, THP, {lib} |",
        "|---|---|---|---|---|---|---|---|---|---|---|",
    ]
    for name, per_batch in results["nets"].items():
        for batch, row in per_batch.items():
            for route in ROUTES:
                cells = [f"{row[f'{route}_{a}_us']:.0f} ({row[f'{route}_{a}_faults']:,.0f})" for a in ALLOCATORS]
                vs = " / ".join(f"{row[f'x86_vs_ort_{a}']:.2f}×" for a in ALLOCATORS) if route == "x86_int8" else ""
                others = " | ".join(
                    f"{c} | {row[f'{route}_{a}_speedup']:.2f}×" for c, a in zip(cells[1:], ALLOCATORS[1:])
                )
                lines.append(f"| {name} | {batch} | {ROUTE_NAMES[route]} | {cells[0]} | {others} | {vs} |")
    lines += [
        "",
        "Why it matters. At batch 1 each int8 conv call of the `.pt2` allocates and frees oneDNN scratchpads and "
        "descriptors and its output, and the time goes into glibc's malloc/free themselves (the `perf` profiles are "
        "in `benchmarks/allocator.py`'s docstring); ONNX Runtime plans its memory once per session. Only another "
        "allocator helps there: start the serving process with `LD_PRELOAD=/path/to/libmimalloc.so` "
        "(`pip install cmeel-mimalloc` puts it under `site-packages/cmeel.prefix/lib/`; your distribution's "
        "jemalloc or tcmalloc are the usual alternatives, not measured here). With large activations (batch 32 at "
        "224×224) glibc instead returns each freed activation to the kernel and the next call faults it back in; "
        f"`GLIBC_TUNABLES={TUNED_GLIBC}` in the serving process's environment stops that without a new library "
        "(the process keeps its peak memory, as it does with mimalloc). PyTorch's own "
        f"`{_thp_setting()}` leaves glibc as it is and has tensors of 2 MiB and more faulted in as huge pages: "
        "compare its column before using it, since it also moves those tensors to 2 MiB-aligned allocations that "
        "glibc maps and unmaps afresh, which can add faults where glibc had reused its heap.",
        "",
        f"Wall time {results['wall_s']:.0f} s.",
    ]
    return "\n".join(lines) + "\n"


def _huge_pages(results: dict[str, Any]) -> str:
    kb = results.get("malloc", {}).get("thp", {}).get("huge_pages_kb")
    return "?" if kb is None else f"{kb / 1024:.0f} MiB"


def _thp_setting() -> str:
    return " ".join(f"{k}={v}" for k, v in THP_ENV.items())


def run(s: dict[str, Any], lib: str, out: Path, quick: bool) -> dict[str, Any]:
    import platform

    from benchmarks.common import machine

    t0 = time.perf_counter()
    with tempfile.TemporaryDirectory(prefix="lq_allocator_") as tmp:
        work = Path(tmp)
        build(work, s["nets"])
        nets, owners = measure(work, lib, s)
    results = {
        "benchmark": "allocator",
        "quick": quick,
        "library": lib,
        "malloc": owners,
        "libc": " ".join(platform.libc_ver()),
        "thp_mode": thp_mode(),
        "settings": s,
        "machine": machine(),
        "nets": nets,
        "wall_s": round(time.perf_counter() - t0, 1),
    }
    out.mkdir(parents=True, exist_ok=True)
    (out / "allocator.json").write_text(json.dumps(results, indent=2) + "\n")
    (out / "allocator.md").write_text(render_markdown(results))
    return results


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--lib", help="allocator library to preload (default: found by find_allocator)")
    parser.add_argument("--quick", action="store_true", help="one net, batch 1, one process per allocator")
    parser.add_argument("--out", default=str(ROOT / "benchmarks" / "results"), help="output folder")
    parser.add_argument("--worker", help=argparse.SUPPRESS)
    args = parser.parse_args(argv)
    if args.worker:
        print(json.dumps(worker(*json.loads(args.worker))))
        return
    lib = args.lib or find_allocator()
    if not lib:
        raise SystemExit("No allocator library to preload: `pip install cmeel-mimalloc`, or pass --lib PATH.")
    if not Path(lib).is_file():
        raise SystemExit(f"--lib {lib!r} is not a file.")
    lib = str(Path(lib).resolve())  # the workers run in the repository root
    if any(c in lib for c in " :"):
        raise SystemExit(f"--lib {lib!r}: LD_PRELOAD splits paths at spaces and colons; use a path without them.")
    run(QUICK if args.quick else FULL, lib, Path(args.out), args.quick)


if __name__ == "__main__":
    main()
