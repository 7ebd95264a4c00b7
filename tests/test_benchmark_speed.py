"""Smoke test of ``benchmarks/speed.py --quick``: every route and figure is there, finite and positive."""

from __future__ import annotations

import importlib.util
import json
import math
import os
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
PEERS = ("onnxruntime", "onnx", "executorch", "matplotlib")


def _run_speed(*args: str, timeout: int) -> None:
    """``benchmarks/speed.py`` in a process of its own; fails the test with its output if it fails."""
    proc = subprocess.run(
        [sys.executable, str(ROOT / "benchmarks" / "speed.py"), *args], cwd=ROOT, capture_output=True, text=True,
        timeout=timeout,
    )  # fmt: skip
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]


def _positive(value: object) -> bool:
    return isinstance(value, (int, float)) and math.isfinite(value) and value > 0


@pytest.mark.slow
@pytest.mark.skipif(
    any(importlib.util.find_spec(m) is None for m in PEERS), reason=f"needs the bench extra ({', '.join(PEERS)})"
)
def test_speed_quick(tmp_path: Path) -> None:
    _run_speed("--quick", "--out", str(tmp_path), timeout=900)
    results = json.loads((tmp_path / "speed.json").read_text())
    sys.path.insert(0, str(ROOT))
    from benchmarks import speed

    assert results["machine"]["cpu"]
    assert results["settings"]["threads"] == [1, 2]
    for name, net in results["nets"].items():
        assert net["errors"] == {}, (name, net["errors"])
        assert _positive(net["fp32_weight_bytes"])
        for threads in ("1", "2"):
            for batch in map(str, results["settings"]["batches"]):
                lat = net["latency_ms"][threads][batch]
                assert set(lat) == set(speed.ROUTES), (name, threads, batch, lat)
                assert all(_positive(v) for v in lat.values()), lat
        assert set(net["artifacts"]) == set(speed.ARTIFACTS)
        for route, a in net["artifacts"].items():
            assert _positive(a["size_bytes"]) and _positive(a["size_ratio"]) and _positive(a["load_ms"]), (route, a)
        for route in ("arm_int8", "et_fp32"):  # reported, not required: the delegation target is read from the JSON
            assert isinstance(net["artifacts"][route]["undelegated_ops"], list)
        anatomy = net["batch1_anatomy"]
        for key in ("qconv_call_us", "fixed_cost_ms", "artifact_ms", "runtime_ms"):
            assert _positive(anatomy[key]), (key, anatomy)
        assert isinstance(anatomy["python_overhead_ms"], float)  # paired difference: may be ~0 either way
    for q in results["qat_step"].values():
        assert _positive(q["fp32_step_ms"]) and _positive(q["qat_step_ms"]) and _positive(q["ratio"])
        sep, same = q["separate_processes"], q["same_process"]
        assert len(sep["fp32_runs_ms"]) == len(sep["qat_runs_ms"]) == results["settings"]["qat_processes"]
        assert sep["glibc_tunables"] == ["None"]  # the baseline runs with glibc's defaults
        if sep["big_malloc"] != ["null"]:  # glibc >= 2.33: the workers prove it, a large malloc is mmapped
            assert [json.loads(p)["mmapped"] for p in sep["big_malloc"]] == [True]
        assert len(same["fp32_runs_ms"]) == len(same["qat_runs_ms"]) == 1
        for m in (sep, same):
            assert _positive(m["fp32_step_ms"]) and _positive(m["qat_step_ms"]) and _positive(m["ratio"]), m
    points = results["ptq_time"]["points"]
    assert len(points) == len(results["settings"]["ptq_sizes"]) and all(_positive(p["seconds"]) for p in points)
    assert results["targets"] and all(isinstance(t["met"], bool) for t in results["targets"])
    md = (tmp_path / "speed.md").read_text()
    assert md == speed.render_markdown(results)
    assert all(label in md for label in speed.ROUTES.values())
    assert (tmp_path / "speed.png").stat().st_size > 10_000


def test_qat_step_worker_failure_names_the_worker():
    sys.path.insert(0, str(ROOT))
    from benchmarks import qat_step

    with pytest.raises(RuntimeError, match=r"QAT step worker .*no-such-net.* failed \(exit 1\)"):
        qat_step.separate_processes("no-such-net", processes=1, batch=2, threads=1, repeats=1, steps=1)


@pytest.mark.slow
@pytest.mark.skipif(
    any(importlib.util.find_spec(m) is None for m in PEERS), reason=f"needs the bench extra ({', '.join(PEERS)})"
)
def test_allocator_benchmark_quick_run(tmp_path):
    sys.path.insert(0, str(ROOT))
    from benchmarks import allocator

    lib = allocator.find_allocator()
    if lib is None:
        pytest.skip("no malloc replacement to preload (`pip install cmeel-mimalloc`, in the bench extra)")
    subprocess.run(
        [sys.executable, str(ROOT / "benchmarks" / "allocator.py"), "--quick", "--out", str(tmp_path)],
        cwd=ROOT,
        check=True,
        capture_output=True,
        timeout=900,
    )
    results = json.loads((tmp_path / "allocator.json").read_text())
    assert results["library"] == lib
    seen = results["malloc"]
    assert seen["preloaded"]["malloc_from"] == lib
    assert "libc" in Path(seen["glibc"]["malloc_from"]).name
    assert seen["glibc_tuned"]["malloc_from"] == seen["glibc"]["malloc_from"]
    assert seen["glibc_tuned"]["big_malloc"] == {"mmapped": False, "kept": True}
    assert (
        "huge_pages_kb" in seen["thp"] and "of huge pages in the THP workers" in (tmp_path / "allocator.md").read_text()
    )
    row = results["nets"]["resnet"]["1"]
    for route in allocator.ROUTES:
        for alloc in allocator.ALLOCATORS:
            assert row[f"{route}_{alloc}_us"] > 0 and row[f"{route}_{alloc}_faults"] >= 0
        for alloc in ("glibc_tuned", "thp", "preloaded"):
            ratio = row[f"{route}_glibc_us"] / row[f"{route}_{alloc}_us"]
            assert row[f"{route}_{alloc}_speedup"] == pytest.approx(ratio, 1e-2)
    md = (tmp_path / "allocator.md").read_text()
    assert f"| {Path(lib).name} |" in md and "| resnet | 1 | int8 x86 .pt2 (ours) |" in md
    assert f"GLIBC_TUNABLES={allocator.TUNED_GLIBC}" in md


def test_tuned_glibc_keeps_a_large_malloc_off_mmap_and_in_its_heap():
    """What the benchmark checks in every glibc worker: the tunables took effect (glibc ignores unknown ones)."""
    code = "import json; from benchmarks.common import probe_big_malloc; print(json.dumps(probe_big_malloc()))"
    sys.path.insert(0, str(ROOT))
    from benchmarks import allocator

    seen = {}
    for alloc, env in allocator.allocator_envs("/nonexistent/libmalloc.so").items():
        if alloc != "preloaded":
            run = subprocess.run([sys.executable, "-c", code], cwd=ROOT, env=env, capture_output=True, text=True)
            assert run.returncode == 0, run.stderr[-2000:]
            seen[alloc] = json.loads(run.stdout.strip().splitlines()[-1])
    if seen["glibc"] is None:
        pytest.skip("no mallinfo2 (glibc < 2.33)")
    untuned = {"mmapped": True, "kept": False}
    assert seen == {"glibc": untuned, "glibc_tuned": {"mmapped": False, "kept": True}, "thp": untuned}
    with pytest.raises(RuntimeError, match="did not run with GLIBC_TUNABLES"):
        allocator._check_worker(
            "glibc_tuned", "/nonexistent/libmalloc.so", {"malloc_from": "/lib/libc.so.6", "big_malloc": seen["glibc"]}
        )


def test_a_preload_that_does_not_load_leaves_glibcs_malloc():
    """What the benchmark checks in every worker: ld.so ignores a library it cannot load and runs on."""
    code = "from benchmarks.allocator import malloc_owner; print(malloc_owner())"
    env = {**os.environ, "LD_PRELOAD": "/nonexistent/libmalloc.so"}
    out = subprocess.run([sys.executable, "-c", code], cwd=ROOT, env=env, capture_output=True, text=True, check=True)
    assert "libc" in Path(out.stdout.strip().splitlines()[-1]).name


def test_allocator_worker_failure_names_the_worker(tmp_path):
    sys.path.insert(0, str(ROOT))
    from benchmarks import allocator

    with pytest.raises(RuntimeError, match=r"allocator benchmark worker .* failed \(exit 1\)"):
        allocator.measure(tmp_path, "/nonexistent/libmalloc.so", allocator.QUICK)  # no artifacts in tmp_path


def test_batch1_anatomy_reads_the_wrapper_cost_from_paired_calls(monkeypatch):
    sys.path.insert(0, str(ROOT))
    from benchmarks import speed

    clock = [0.0]

    def advance(seconds: float):
        def call():
            clock[0] += seconds

        return call

    monkeypatch.setattr(speed.time, "perf_counter", lambda: clock[0])
    got = speed._paired_ms(advance(0.003), advance(0.001), 11)
    assert got == {"artifact_ms": 3.0, "runtime_ms": 1.0, "python_overhead_ms": 2.0}


@pytest.mark.slow
def test_qat_step_measures_under_the_glibc_settings_it_names(monkeypatch):
    sys.path.insert(0, str(ROOT))
    from benchmarks import qat_step

    # measure() adds a separate-process measurement per glibc setting asked for, each under its own environment
    def separate(name, *, processes, env=None, **kw):
        return {"env": env, "fp32_step_ms": 1.0, "qat_step_ms": 1.0, "ratio": 1.0}

    with monkeypatch.context() as m:
        m.setattr(qat_step, "separate_processes", separate)
        m.setattr(qat_step, "same_process", lambda name, **kw: {})
        kw = {"batch": 2, "threads": 1, "processes": 1, "repeats": 1, "steps": 1}
        assert "separate_processes_tuned" not in qat_step.measure("smallcnn", **kw)
        got = qat_step.measure("smallcnn", **kw, hugetlb=True, tuned=True)
    assert got["separate_processes"]["env"] is None  # the baseline: glibc's defaults
    assert got["separate_processes_hugetlb"]["env"] == qat_step.HUGETLB_ENV
    assert got["separate_processes_tuned"]["env"] == qat_step.TUNED_ENV
    assert qat_step.HUGETLB_ENV["GLIBC_TUNABLES"] in qat_step.TUNED_ENV["GLIBC_TUNABLES"]

    # the workers run under the setting, and prove that glibc took it
    tuned = qat_step.separate_processes(
        "smallcnn", processes=1, env=qat_step.TUNED_ENV, batch=2, threads=1, repeats=1, steps=1
    )
    assert tuned["glibc_tunables"] == [qat_step.TUNED_ENV["GLIBC_TUNABLES"]]
    if tuned["big_malloc"] != ["null"]:  # glibc >= 2.33
        assert tuned["big_malloc"] == [json.dumps({"kept": True, "mmapped": False})]
    assert _positive(tuned["fp32_step_ms"]) and _positive(tuned["qat_step_ms"]), tuned


def test_render_judges_the_targets_again_from_the_stored_results(tmp_path):
    """``speed.py --render`` rewrites targets, table and plot from ``speed.json`` without measuring anything."""
    stored = json.loads((ROOT / "benchmarks" / "results" / "speed.json").read_text())
    net = next(iter(stored["nets"].values()))
    lat = net["latency_ms"]["1"]["1"]
    lat.update(x86_int8=0.5, arm_int8=0.1, ort_int8=0.2)  # the .pte runs faster than ORT, the .pt2 slower
    stored["targets"] = []
    (tmp_path / "speed.json").write_text(json.dumps(stored))
    _run_speed("--render", "--out", str(tmp_path), timeout=300)
    by_target = {(t["target"], t["where"]): t for t in json.loads((tmp_path / "speed.json").read_text())["targets"]}
    where = f"{next(iter(stored['nets']))}, 1 thread"
    x86 = by_target[("x86 int8 at least as fast as ONNX Runtime int8, batch 1", where)]
    assert (x86["measured"], x86["met"]) == (0.4, False)
    ours = by_target[
        ("our fastest int8 artifact on x86 (.pt2, or the .pte via ExecuTorch) at least as fast as ONNX Runtime int8, "
         "batch 1", where)
    ]  # fmt: skip
    assert (ours["measured"], ours["met"]) == ("2.00× (int8 arm .pte (ours))", True)
    assert "| 2.00× (int8 arm .pte (ours)) | met |" in (tmp_path / "speed.md").read_text()
    assert (tmp_path / "speed.png").stat().st_size > 0
