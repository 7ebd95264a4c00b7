"""Latency, size and load time of our int8 artifacts against fp32 and the peers, all measured in one run.

    python benchmarks/speed.py [--quick] [--out benchmarks/results]

For each net (``MobileNetV2Small`` and ``ResNetSmall`` from ``benchmarks/common.py`` at 1x28x28, random weights with
BatchNorm in eval mode holding non-trivial running statistics; EfficientNet-Lite0 with its ImageNet weights at
3x224x224), at batch 1 and 32, with 1 and 2 threads, the median latency of every route:

- ``fp32_eager``: the float ``nn.Module`` under ``torch.no_grad()``.
- ``fp32_compile``: ``torch.compile(model, dynamic=False)`` (mode "default", Inductor's defaults: no freezing, no
  max-autotune; one static graph per batch size, compiled before timing).
- ``x86_int8``: ``lightning_quant.quantize_ptq(backend="x86")`` -> ``save`` (``.pt2``) -> ``load``, called as a user
  calls it (input checks included).
- ``arm_int8``: the same with ``backend="arm"`` (ExecuTorch ``.pte`` lowered to XNNPACK, run here on x86).
- ``et_fp32``: the float program lowered to ExecuTorch/XNNPACK without quantization.
- ``ort_int8``: ONNX Runtime 1.x, ``quantize_static`` (QDQ, uint8 activations, int8 per-channel weights, MinMax
  calibration on the same calibration batches), CPU execution provider.
- ``fx_int8``: the legacy ``torch.ao.quantization`` FX flow (``prepare_fx``/``convert_fx``, x86 engine and qconfig).

Thread count: ``torch.set_num_threads`` (eager, compile, the ``.pt2``, FX), ``SessionOptions.intra_op_num_threads``
(ONNX Runtime; one session per count, ``inter_op_num_threads=1``) and ExecuTorch's ``_unsafe_reset_threadpool``
(XNNPACK's threadpool). Within one (net, threads, batch) configuration the routes are timed in interleaved rounds, in a
rotating order, so machine noise hits all alike; each round times enough calls to fill ~50 ms; the median round is
reported. Ratios are between figures of the same run.

Also: artifact sizes (and their ratio to the fp32 weights, ``lightning_quant.export.float_size_bytes``), fresh-load time
of each artifact (median of several loads), whether every op of each ``.pte`` is delegated to XNNPACK, QAT training
step time / fp32 step time (``benchmarks/qat_step.py``'s measurement: each in fresh processes, and interleaved in
one), PTQ wall time vs calibration size, and the figures that explain the batch-1 gap to ONNX Runtime (fixed cost of
one oneDNN int8 convolution call, Python overhead of the loaded artifact).

Writes ``speed.json`` (machine, settings, every figure), ``speed.md`` (:func:`render_markdown` of the JSON) and
``speed.png`` to ``--out``. ``--quick`` is a smoke test of every route and figure (one small net, batch 1 and 8, few
repeats; under 3 minutes on 2 cores). The full run takes about 10 minutes on 2 cores.
"""

from __future__ import annotations

import argparse
import contextlib
import copy
import json
import logging
import os
import statistics
import sys
import tempfile
import time
import warnings
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

ROOT = Path(__file__).resolve().parents[1]
if str(ROOT) not in sys.path:
    sys.path.insert(0, str(ROOT))

import torch  # noqa: E402
from torch import nn  # noqa: E402

import lightning_quant as lq  # noqa: E402
from benchmarks import common, qat_step  # noqa: E402
from lightning_quant import _torchao  # noqa: E402
from lightning_quant.capture import export as capture_export  # noqa: E402
from lightning_quant.export import float_size_bytes  # noqa: E402

ROUTES = {
    "fp32_eager": "fp32 eager",
    "fp32_compile": "fp32 torch.compile",
    "x86_int8": "int8 x86 .pt2 (ours)",
    "arm_int8": "int8 arm .pte (ours)",
    "et_fp32": "fp32 ExecuTorch XNNPACK",
    "ort_int8": "int8 ONNX Runtime",
    "fx_int8": "int8 torch.ao FX (legacy)",
}
#: routes whose artifact is a file (size, fresh-load time)
ARTIFACTS = {"x86_int8": ".pt2", "arm_int8": ".pte", "et_fp32": ".pte", "ort_int8": ".onnx", "fx_int8": ".pt"}

FULL = {
    "nets": ["mobilenetv2", "resnet", "efficientnet_lite0"],
    "batches": [1, 32],
    "threads": [1, 2],
    "round_s": 0.05,
    "rounds": 15,
    "rounds_large": 7,
    "calibration_samples": 256,
    "calibration_samples_large": 64,
    "loads": 5,
    "qat_nets": ["mobilenetv2", "resnet"],
    "qat_batch": 128,
    "qat_processes": 3,
    "qat_rounds": 8,
    "qat_steps": 3,
    "ptq_net": "mobilenetv2",
    "ptq_sizes": [128, 512, 1024, 3000],
}
QUICK = {
    **FULL,
    "nets": ["mobilenetv2"],
    "batches": [1, 8],
    "round_s": 0.01,
    "rounds": 3,
    "rounds_large": 2,
    "calibration_samples": 32,
    "loads": 2,
    "qat_nets": ["mobilenetv2"],
    "qat_batch": 16,
    "qat_processes": 1,
    "qat_rounds": 3,
    "qat_steps": 1,
    "ptq_sizes": [32, 96],
}
INPUT_SHAPES = {"mobilenetv2": (1, 28, 28), "resnet": (1, 28, 28), "efficientnet_lite0": (3, 224, 224)}


def _quiet() -> None:
    """Silence the deprecation and exporter chatter of the peers (legacy torch.ao, the TorchScript ONNX exporter)."""
    warnings.filterwarnings("ignore", category=DeprecationWarning)
    warnings.filterwarnings("ignore", category=FutureWarning)
    warnings.filterwarnings("ignore", category=UserWarning)
    warnings.filterwarnings("ignore", message=".*torch.ao.quantization.*")
    for name in ("torch.onnx", "torch._dynamo", "torch._inductor", "torch.export", "executorch", "torchao"):
        logging.getLogger(name).setLevel(logging.ERROR)
    try:
        import onnxruntime as ort

        ort.set_default_logger_severity(3)
    except ImportError:
        pass


# --------------------------------------------------------------------------------------------------------- models


def make_net(name: str, seed: int = 0) -> nn.Module:
    """A benchmark net in eval mode: random weights and non-trivial BatchNorm statistics, or EfficientNet-Lite0."""
    if name == "efficientnet_lite0":
        return common.efficientnet_lite0()
    with torch.random.fork_rng():
        torch.manual_seed(seed)
        net = common.NETS[name](1, 10)
        for m in net.modules():
            if isinstance(m, nn.BatchNorm2d):
                m.running_mean.uniform_(-0.5, 0.5)
                m.running_var.uniform_(0.5, 2.0)
                m.weight.data.uniform_(0.5, 1.5)
                m.bias.data.uniform_(-0.2, 0.2)
    return net.eval()


def calibration_batches(shape: tuple[int, ...], samples: int, batch: int = 32, seed: int = 1) -> list[torch.Tensor]:
    g = torch.Generator().manual_seed(seed)
    out, left = [], samples
    while left > 0:
        n = min(batch, left)
        out.append(torch.randn(n, *shape, generator=g))
        left -= n
    return out


@contextlib.contextmanager
def timed(store: dict[str, Any], key: str) -> Iterator[None]:
    t = time.perf_counter()
    yield
    store[key] = round(time.perf_counter() - t, 3)


def _median_ms(fn: Callable[[], Any], n: int) -> float:
    times = []
    for _ in range(n):
        t = time.perf_counter()
        fn()
        times.append(time.perf_counter() - t)
    return statistics.median(times) * 1000


# --------------------------------------------------------------------------------------------------------- routes


class Route:
    """One way to run the model: ``call(x)`` for a batch, and what building it produced (file, timings, notes)."""

    def __init__(self, call: Callable[[torch.Tensor], Any] | None = None, **info: Any) -> None:
        self.call = call
        self.info = info

    def for_threads(self, threads: int) -> Callable[[torch.Tensor], Any]:
        assert self.call is not None
        return self.call


class ExecuTorchRoute(Route):
    """An ExecuTorch program, loaded again for each thread count.

    ``_unsafe_reset_threadpool`` frees the threadpool that XNNPACK delegates of already loaded programs still point to
    (running one afterwards crashed here), so a program is only run in the threadpool it was loaded under.
    """

    def __init__(self, load: Callable[[], Callable[[torch.Tensor], Any]], **info: Any) -> None:
        super().__init__(**info)
        self.load = load

    def for_threads(self, threads: int) -> Callable[[torch.Tensor], Any]:
        self.call = None  # drop the program loaded under the previous threadpool
        self.call = self.load()
        return self.call


class OrtRoute(Route):
    """ONNX Runtime: one session per thread count (the thread pool is fixed when the session is created)."""

    def __init__(self, path: Path, thread_counts: list[int], **info: Any) -> None:
        super().__init__(path=path, **info)
        self.sessions = {t: ort_session(path, t) for t in thread_counts}

    def for_threads(self, threads: int) -> Callable[[torch.Tensor], Any]:
        sess = self.sessions[threads]
        return lambda x: sess.run(None, {"x": x.numpy()})


def ort_session(path: Path, threads: int) -> Any:
    import onnxruntime as ort

    so = ort.SessionOptions()
    so.intra_op_num_threads = threads
    so.inter_op_num_threads = 1
    return ort.InferenceSession(str(path), so, providers=["CPUExecutionProvider"])


def build_ours(model: nn.Module, backend: str, calib: list[torch.Tensor], work: Path, max_batch: int) -> Route:
    info: dict[str, Any] = {}
    with timed(info, "quantize_s"):
        q = lq.quantize_ptq(model, calib, backend=backend, num_calibration_samples=10**9, max_batch_size=max_batch)
    path = work / f"{backend}_int8{'.pt2' if backend == 'x86' else '.pte'}"
    with timed(info, "export_s"):
        sidecar = lq.save(q, path)
    info["path"] = path
    if backend == "arm":
        info["undelegated_ops"] = sidecar["undelegated_ops"]
    if backend == "arm":
        return ExecuTorchRoute(lambda: lq.load(path), **info)
    return Route(lq.load(path), **info)


def build_et_fp32(model: nn.Module, example: torch.Tensor, work: Path, max_batch: int) -> Route:
    info: dict[str, Any] = {}
    with timed(info, "export_s"):
        ep = capture_export(copy.deepcopy(model), (example,), {}, max_batch_size=max_batch, name="fp32")
        data, undelegated = _torchao.lower_to_executorch(ep)
    path = work / "et_fp32.pte"
    path.write_bytes(data)

    def load() -> Callable[[torch.Tensor], Any]:
        method = _torchao.load_executorch_method(str(path))
        return lambda x: method.execute([x])

    return ExecuTorchRoute(load, path=path, undelegated_ops=undelegated, **info)


def build_ort(
    model: nn.Module, example: torch.Tensor, calib: list[torch.Tensor], work: Path, threads: list[int]
) -> Route:
    from onnxruntime.quantization import CalibrationDataReader, QuantFormat, QuantType, quantize_static

    info: dict[str, Any] = {}
    fp32 = work / "ort_fp32.onnx"
    with timed(info, "export_s"):
        torch.onnx.export(
            copy.deepcopy(model),
            (example,),
            str(fp32),
            input_names=["x"],
            output_names=["y"],
            dynamic_axes={"x": {0: "batch"}, "y": {0: "batch"}},
            opset_version=17,
            dynamo=False,
        )
    pre = work / "ort_fp32_pre.onnx"
    try:  # ORT's recommended pre-processing (shape inference + graph optimization) before quantize_static
        from onnxruntime.quantization.shape_inference import quant_pre_process

        quant_pre_process(str(fp32), str(pre), skip_symbolic_shape=True)
        info["pre_process"] = True
    except Exception:  # noqa: BLE001 - optional step; quantize the plain export if it fails
        pre = fp32
        info["pre_process"] = False

    class Reader(CalibrationDataReader):
        def __init__(self) -> None:
            self.it = iter([{"x": b.numpy()} for b in calib])

        def get_next(self) -> dict | None:
            return next(self.it, None)

    path = work / "ort_int8.onnx"
    with timed(info, "quantize_s"):
        quantize_static(
            str(pre),
            str(path),
            Reader(),
            quant_format=QuantFormat.QDQ,
            activation_type=QuantType.QUInt8,
            weight_type=QuantType.QInt8,
            per_channel=True,
        )
    return OrtRoute(path, threads, **info)


def build_fx(model: nn.Module, example: torch.Tensor, calib: list[torch.Tensor], work: Path) -> Route:
    from torch.ao.quantization import get_default_qconfig_mapping
    from torch.ao.quantization.quantize_fx import convert_fx, prepare_fx

    torch.backends.quantized.engine = "x86"
    info: dict[str, Any] = {}
    with timed(info, "quantize_s"), torch.no_grad():
        prepared = prepare_fx(copy.deepcopy(model).eval(), get_default_qconfig_mapping("x86"), (example,))
        for b in calib:
            prepared(b)
        fx = convert_fx(prepared)
    path = work / "fx_int8.pt"
    torch.save(fx.state_dict(), path)  # the legacy flow has no standalone artifact: its int8 state dict
    return Route(fx, path=path, **info)


def build_routes(name: str, model: nn.Module, s: dict[str, Any], work: Path) -> tuple[dict[str, Route], dict]:
    shape = INPUT_SHAPES[name]
    large = name == "efficientnet_lite0"
    calib = calibration_batches(shape, s["calibration_samples_large" if large else "calibration_samples"])
    max_batch = max(32, *s["batches"])  # calibration batches are 32
    example = torch.randn(2, *shape)
    routes: dict[str, Route] = {"fp32_eager": Route(model)}
    errors: dict[str, str] = {}
    builders: dict[str, Callable[[], Route]] = {
        "fp32_compile": lambda: Route(torch.compile(model, dynamic=False)),
        "x86_int8": lambda: build_ours(model, "x86", calib, work, max_batch),
        "arm_int8": lambda: build_ours(model, "arm", calib, work, max_batch),
        "et_fp32": lambda: build_et_fp32(model, example, work, max_batch),
        "ort_int8": lambda: build_ort(model, example, calib, work, s["threads"]),
        "fx_int8": lambda: build_fx(model, example, calib, work),
    }
    for route, build in builders.items():
        t = time.perf_counter()
        try:
            routes[route] = build()
        except Exception as err:  # noqa: BLE001 - a peer failing on one net must not sink the whole run
            errors[route] = (
                f"{type(err).__name__}: {str(err).strip().splitlines()[0][:300] if str(err).strip() else ''}"
            )
            print(f"  {name}/{route}: FAILED {errors[route]}", flush=True)
            continue
        print(f"  {name}/{route}: built in {time.perf_counter() - t:.1f} s", flush=True)
    return routes, errors


# --------------------------------------------------------------------------------------------------------- timing


def time_config(
    calls: dict[str, Callable[[], Any]], rounds: int, round_s: float, errors: dict[str, str]
) -> dict[str, float]:
    """Median per-call ms of each route, timed in ``rounds`` interleaved rounds (rotating order)."""
    inner = {}
    for route, fn in list(calls.items()):
        try:
            for _ in range(2):  # warm-up (compiles torch.compile's graph for this batch size)
                fn()
        except Exception as err:  # noqa: BLE001 - report the route as failed at this size, time the others
            errors[route] = f"{type(err).__name__}: {str(err).strip()[:300]}"
            print(f"    {route}: FAILED {errors[route]}", flush=True)
            del calls[route]
            continue
        one = _median_ms(fn, 3) / 1000
        inner[route] = max(1, min(1000, int(round_s / max(one, 1e-7))))
    samples: dict[str, list[float]] = {r: [] for r in calls}
    order = list(calls)
    for i in range(rounds):
        for route in order[i % len(order) :] + order[: i % len(order)]:
            fn, n = calls[route], inner[route]
            t = time.perf_counter()
            for _ in range(n):
                fn()
            samples[route].append((time.perf_counter() - t) / n * 1000)
    return {r: round(statistics.median(v), 4) for r, v in samples.items()}


def load_times(routes: dict[str, Route], n: int) -> dict[str, float]:
    """Median ms of a fresh load of each artifact (as a user loads it: ``lq.load``, ORT session, ET program)."""
    import onnxruntime as ort  # noqa: F401 - imported before timing

    loaders: dict[str, Callable[[], Any]] = {}
    for route in ("x86_int8", "arm_int8"):
        if route in routes:
            loaders[route] = functools_partial(lq.load, routes[route].info["path"])
    if "et_fp32" in routes:
        loaders["et_fp32"] = functools_partial(_torchao.load_executorch_method, str(routes["et_fp32"].info["path"]))
    if "ort_int8" in routes:
        loaders["ort_int8"] = functools_partial(ort_session, routes["ort_int8"].info["path"], 1)
    if "fx_int8" in routes:
        loaders["fx_int8"] = functools_partial(
            torch.load, routes["fx_int8"].info["path"], weights_only=False
        )  # our own file
    out = {}
    for route, fn in loaders.items():
        out[route] = round(_median_ms(fn, n), 2)
    return out


def functools_partial(fn: Callable[..., Any], *args: Any, **kwargs: Any) -> Callable[[], Any]:
    return lambda: fn(*args, **kwargs)


# ------------------------------------------------------------------------------------------------ batch-1 anatomy


def batch1_anatomy(model: nn.Module, x86: Route | None, threads: int = 1) -> dict[str, Any]:
    """What one batch-1 call of the ``.pt2`` costs, and why: Python wrapper vs runtime, fixed cost per oneDNN op.

    The fixed cost is measured on a tiny int8 convolution (16->16 channels, 4x4 input) through the same op the package
    calls (``onednn.qconv_pointwise``): its arithmetic takes nanoseconds, so its time is PyTorch's per-call overhead
    (the oneDNN primitive descriptor, scratchpad and scale tensors are rebuilt on every call).
    """
    _torchao.set_num_threads(threads)
    out: dict[str, Any] = {"threads": threads}
    x = torch.zeros(1, 16, 4, 4, dtype=torch.uint8).contiguous(memory_format=torch.channels_last)
    w = torch.randint(-127, 127, (16, 16, 1, 1), dtype=torch.int8)
    ws, wz, b = torch.full((16,), 0.01), torch.zeros(16, dtype=torch.int64), torch.zeros(16)
    packed = torch.ops.onednn.qconv_prepack(w, ws, 0.02, 0, [1, 1], [0, 0], [1, 1], 1, x.shape)

    def qconv() -> Any:
        return torch.ops.onednn.qconv_pointwise(
            x, 0.02, 0, packed, ws, wz, b, [1, 1], [0, 0], [1, 1], 1, 0.05, 0, torch.uint8, "none", [], ""
        )

    for _ in range(50):
        qconv()
    out["qconv_call_us"] = round(_median_ms(qconv, 2000) * 1000, 2)
    out["conv_linear_layers"] = sum(isinstance(m, (nn.Conv2d, nn.Linear)) for m in model.modules())
    out["fixed_cost_ms"] = round(out["qconv_call_us"] * out["conv_linear_layers"] / 1000, 3)
    if x86 is not None and x86.call is not None:
        art = x86.call
        shape = art.sidecar["inputs"][0]["shape"][1:]
        xin = torch.randn(1, *shape)
        loader = getattr(art.runner, "loader", None)
        if loader is None:
            for _ in range(20):
                art(xin)
            out["artifact_ms"] = round(_median_ms(lambda: art(xin), 500), 4)
        else:
            out.update(_paired_ms(lambda: art(xin), lambda: loader.boxed_run([xin]), 500))
    return out


def _paired_ms(artifact: Callable[[], Any], runtime: Callable[[], Any], n: int) -> dict[str, float]:
    """Median ms of a call of ``artifact`` and of ``runtime``, and the median of their paired differences.

    Single calls of the two alternate (their order too), so a slow stretch of the shared machine hits both sides of a
    pair: the wrapper's cost, ~10 µs, is read from the pairs, not from two medians taken at different times (which
    on EfficientNet-Lite0 once gave a negative wrapper cost).
    """
    for _ in range(20):
        artifact()
        runtime()
    a, r = [], []
    for i in range(n):
        for fn, ts in ((artifact, a), (runtime, r)) if i % 2 == 0 else ((runtime, r), (artifact, a)):
            t = time.perf_counter()
            fn()
            ts.append(time.perf_counter() - t)
    return {
        "artifact_ms": round(statistics.median(a) * 1000, 4),
        "runtime_ms": round(statistics.median(r) * 1000, 4),
        "python_overhead_ms": round(statistics.median(x - y for x, y in zip(a, r)) * 1000, 4),
    }


# --------------------------------------------------------------------------------------------------- QAT and PTQ


def qat_step_ratio(name: str, s: dict[str, Any], threads: int) -> dict[str, Any]:
    """QAT (fake-quant) training step / fp32 step on a benchmark net: ``benchmarks/qat_step.py``'s measurement.

    The ratio is from fp32 and QAT each in fresh processes (as a user trains); the same-process figure is kept too.
    """
    return qat_step.measure(
        name,
        batch=s["qat_batch"],
        threads=threads,
        processes=s["qat_processes"],
        repeats=s["qat_rounds"],
        steps=s["qat_steps"],
    )


def ptq_time(s: dict[str, Any], threads: int) -> dict[str, Any]:
    """Wall time of ``quantize_ptq`` (capture, calibrate, convert) vs calibration samples, for one small net."""
    _torchao.set_num_threads(threads)
    name = s["ptq_net"]
    model = make_net(name)
    points = []
    for n in s["ptq_sizes"]:
        calib = calibration_batches(INPUT_SHAPES[name], n, seed=2)
        t = time.perf_counter()
        lq.quantize_ptq(model, calib, backend="x86", num_calibration_samples=n)
        points.append({"samples": n, "seconds": round(time.perf_counter() - t, 3)})
    return {"net": name, "backend": "x86", "observer": "histogram", "threads": threads, "points": points}


# ------------------------------------------------------------------------------------------------------------ run


def bench_net(name: str, s: dict[str, Any], work: Path) -> dict[str, Any]:
    _torchao.set_num_threads(max(s["threads"]))
    model = make_net(name)
    shape = INPUT_SHAPES[name]
    with torch.no_grad():
        routes, errors = build_routes(name, model, s, work / name)
    res: dict[str, Any] = {
        "input_shape": list(shape),
        "params": sum(p.numel() for p in model.parameters()),
        "fp32_weight_bytes": float_size_bytes(model),
        "errors": errors,
        "build": {r: {k: v for k, v in rt.info.items() if k.endswith("_s")} for r, rt in routes.items() if rt.info},
        "latency_ms": {},
    }
    rounds = s["rounds_large"] if name == "efficientnet_lite0" else s["rounds"]
    g = torch.Generator().manual_seed(3)
    for threads in s["threads"]:
        _torchao.set_num_threads(threads)
        res["latency_ms"][str(threads)] = {}
        for batch in s["batches"]:
            x = torch.randn(batch, *shape, generator=g)
            calls = {}
            for r, rt in routes.items():
                fn = rt.for_threads(threads)
                calls[r] = functools_partial(fn, x)
            with torch.no_grad():
                med = time_config(calls, rounds, s["round_s"], errors)
            res["latency_ms"][str(threads)][str(batch)] = med
            print(f"  {name} threads={threads} batch={batch}: " + ", ".join(f"{k} {v:.3f}" for k, v in med.items()))
    for rt in routes.values():
        if isinstance(rt, ExecuTorchRoute):
            rt.call = None  # never outlive the threadpool they were loaded under
    _torchao.set_num_threads(1)
    loads = load_times(routes, s["loads"])
    artifacts = {}
    for r in ARTIFACTS:
        if r not in routes:
            continue
        size = routes[r].info["path"].stat().st_size
        artifacts[r] = {
            "size_bytes": size,
            "size_ratio": round(size / res["fp32_weight_bytes"], 4),
            "load_ms": loads.get(r),
        }
        if "undelegated_ops" in routes[r].info:
            artifacts[r]["undelegated_ops"] = routes[r].info["undelegated_ops"]
    res["artifacts"] = artifacts
    res["batch1_anatomy"] = batch1_anatomy(model, routes.get("x86_int8"))
    return res


def targets(results: dict[str, Any]) -> list[dict[str, Any]]:
    """Each target of issue 6 per net (and thread count), with the measured figure and met/missed."""
    out = []
    big = str(max(results["settings"]["batches"]))
    for name, net in results["nets"].items():
        for threads, by_batch in net["latency_ms"].items():
            b = by_batch.get(big, {})
            x86 = b.get("x86_int8")

            def ratio(other: str, lat: dict[str, float] = b, ours: float | None = x86) -> float | None:
                return round(lat[other] / ours, 2) if ours and lat.get(other) else None

            where = f"{name}, {threads} thread{'s' if threads != '1' else ''}"
            for other, want in (("fp32_eager", 3.0), ("fp32_compile", 2.0)):
                r = ratio(other)
                out.append(
                    {
                        "target": f"x86 int8 >= {want:g}x faster than {ROUTES[other]}, batch {big}",
                        "where": where,
                        "measured": r,
                        "met": r is not None and r >= want,
                    }
                )
            for batch, lat in by_batch.items():
                r = round(lat["ort_int8"] / lat["x86_int8"], 2) if lat.get("ort_int8") and lat.get("x86_int8") else None
                out.append(
                    {
                        "target": f"x86 int8 at least as fast as ONNX Runtime int8, batch {batch}",
                        "where": where,
                        "measured": r,
                        "met": r is not None and r >= 1.0,
                    }
                )
                ours = {k: lat[k] for k in ("x86_int8", "arm_int8") if lat.get(k)}  # the .pte runs on x86 too
                best = min(ours, key=ours.get) if ours else None
                r = round(lat["ort_int8"] / ours[best], 2) if best and lat.get("ort_int8") else None
                out.append(
                    {
                        "target": f"our fastest int8 artifact on x86 (.pt2, or the .pte via ExecuTorch) at least as "
                        f"fast as ONNX Runtime int8, batch {batch}",
                        "where": where,
                        "measured": f"{r:.2f}× ({ROUTES[best]})" if r is not None else None,
                        "met": r is not None and r >= 1.0,
                    }
                )
                r = round(lat["et_fp32"] / lat["arm_int8"], 2) if lat.get("et_fp32") and lat.get("arm_int8") else None
                out.append(
                    {
                        "target": f"arm .pte int8 faster than ExecuTorch fp32, batch {batch}",
                        "where": where,
                        "measured": r,
                        "met": r is not None and r > 1.0,
                    }
                )
        arm = net["artifacts"].get("arm_int8")
        out.append(
            {
                "target": "arm .pte: every op delegated to XNNPACK",
                "where": name,
                "measured": ", ".join(arm["undelegated_ops"]) or "all delegated" if arm else None,
                "met": bool(arm) and not arm["undelegated_ops"],
            }
        )
        for r in ("x86_int8", "arm_int8"):
            a = net["artifacts"].get(r)
            out.append(
                {
                    "target": f"{ROUTES[r]} size <= 0.3x fp32 weights",
                    "where": name,
                    "measured": a["size_ratio"] if a else None,
                    "met": bool(a) and a["size_ratio"] <= 0.3,
                }
            )
    return out


def run(s: dict[str, Any], out: Path, quick: bool) -> dict[str, Any]:
    _quiet()
    t0 = time.perf_counter()
    results: dict[str, Any] = {
        "benchmark": "speed",
        "quick": quick,
        "machine": common.machine(),
        "settings": {k: v for k, v in s.items()},
        "routes": ROUTES,
        "torch_compile": {"mode": "default", "dynamic": False, "freezing": False},
        "nets": {},
    }
    with tempfile.TemporaryDirectory(prefix="lq-speed-") as tmp:
        work = Path(tmp)
        for name in s["nets"]:
            print(f"[{time.perf_counter() - t0:6.0f} s] {name}", flush=True)
            (work / name).mkdir()
            results["nets"][name] = bench_net(name, s, work)
            torch._dynamo.reset()
    _torchao.set_num_threads(max(s["threads"]))
    results["executorch_threads_after_reset"] = _torchao.executorch_threads()
    print(f"[{time.perf_counter() - t0:6.0f} s] QAT step", flush=True)
    results["qat_step"] = {n: qat_step_ratio(n, s, max(s["threads"])) for n in s["qat_nets"]}
    print(f"[{time.perf_counter() - t0:6.0f} s] PTQ time", flush=True)
    results["ptq_time"] = ptq_time(s, max(s["threads"]))
    results["wall_s"] = round(time.perf_counter() - t0, 1)
    write(results, out)
    print(f"[{results['wall_s']:6.0f} s] wrote {out}/speed.json, speed.md, speed.png")
    return results


def write(results: dict[str, Any], out: Path) -> None:
    """``results`` with its targets judged, as ``speed.json``, ``speed.md`` and ``speed.png`` in ``out``."""
    results["targets"] = targets(results)
    out.mkdir(parents=True, exist_ok=True)
    (out / "speed.json").write_text(json.dumps(results, indent=2) + "\n")
    (out / "speed.md").write_text(render_markdown(results))
    plot(results, out / "speed.png")


# ------------------------------------------------------------------------------------------------------- reporting


def _ms(v: float | None) -> str:
    if v is None:
        return "—"
    return f"{v:.3f}" if v < 1 else f"{v:.2f}" if v < 100 else f"{v:.0f}"


def _faults(m: dict[str, Any]) -> str:
    if "fp32_faults_per_step" not in m:
        return "—"
    return f"{m['fp32_faults_per_step']:,} / {m['qat_faults_per_step']:,}"


def _x(v: float | None) -> str:
    return "—" if v is None else f"{v:.2f}×"


def render_markdown(results: dict[str, Any]) -> str:
    """The results as markdown tables (also the README's "Performance" section)."""
    m = results["machine"]
    s = results["settings"]
    lines = [
        f"Measured by `python benchmarks/speed.py`{' --quick' if results.get('quick') else ''} in one run "
        f"({results.get('wall_s', 0) / 60:.0f} min) on {m['cpu']} ({m['logical_cpus']} logical CPUs; "
        f"{', '.join(m['cpu_flags'])}), torch {m['versions'].get('torch')}, executorch "
        f"{m['versions'].get('executorch')}, onnxruntime {m['versions'].get('onnxruntime')}. Median of "
        f"{s['rounds']} interleaved rounds per configuration ({s['rounds_large']} for EfficientNet-Lite0); threads set "
        "per runtime (`torch.set_num_threads`, ORT `intra_op_num_threads`, ExecuTorch's threadpool). The machine is "
        "shared: compare ratios within a table rather than single figures. `fp32 torch.compile` is "
        "`torch.compile(model, dynamic=False)` (default mode, no freezing).",
        "",
    ]
    for name, net in results["nets"].items():
        shape = "×".join(map(str, net["input_shape"]))
        lines += [
            f"#### {name} ({shape}, {net['params'] / 1e6:.2f} M parameters): latency in ms (speed-up vs fp32 eager)",
            "",
        ]
        cols = [(t, b) for t in net["latency_ms"] for b in net["latency_ms"][t]]
        lines.append("| route | " + " | ".join(f"batch {b}, {t} thr" for t, b in cols) + " |")
        lines.append("|---|" + "---|" * len(cols))
        for route, label in ROUTES.items():
            cells = []
            for t, b in cols:
                lat = net["latency_ms"][t][b]
                v, base = lat.get(route), lat.get("fp32_eager")
                cells.append(f"{_ms(v)} ({base / v:.1f}×)" if v and base and route != "fp32_eager" else _ms(v))
            lines.append(f"| {label} | " + " | ".join(cells) + " |")
        if net.get("errors"):
            lines += ["", *(f"- {ROUTES[r]} failed on this net: `{e}`" for r, e in net["errors"].items())]
        lines.append("")
    lines += [
        "#### Artifacts: size (vs fp32 weights), fresh load (1 thread), XNNPACK delegation",
        "",
        "| net | fp32 weights | " + " | ".join(ROUTES[r] for r in ARTIFACTS) + " |",
        "|---|---|" + "---|" * len(ARTIFACTS),
    ]
    for name, net in results["nets"].items():
        cells = []
        for r in ARTIFACTS:
            a = net["artifacts"].get(r)
            if not a:
                cells.append("—")
                continue
            cell = f"{a['size_bytes'] / 1024:.0f} KiB ({a['size_ratio']:.2f}×), load {_ms(a['load_ms'])} ms"
            if "undelegated_ops" in a:
                cell += (
                    ", all ops delegated" if not a["undelegated_ops"] else f", outside XNNPACK: {a['undelegated_ops']}"
                )
            cells.append(cell)
        lines.append(f"| {name} | {net['fp32_weight_bytes'] / 1024:.0f} KiB | " + " | ".join(cells) + " |")
    lines += [
        "",
        "ONNX Runtime's size is the QDQ `.onnx` file; the legacy FX flow has no standalone artifact, so its size is "
        "its int8 `state_dict` (loading it still needs the model code and `prepare_fx`/`convert_fx`).",
        "",
    ]
    anat = {n: net["batch1_anatomy"] for n, net in results["nets"].items() if net.get("batch1_anatomy")}
    if anat:
        lines += [
            "#### Why ONNX Runtime wins at batch 1 (1 thread)",
            "",
            "| net | x86 `.pt2` call | of which runtime | Python wrapper | one oneDNN int8 conv call, 16→16 ch 4×4 "
            "| conv/linear layers | fixed cost (layers × call) | ONNX Runtime int8 |",
            "|---|---|---|---|---|---|---|---|",
        ]
        for n, a in anat.items():
            ort_ms = results["nets"][n]["latency_ms"].get("1", {}).get("1", {}).get("ort_int8")
            lines.append(
                f"| {n} | {_ms(a.get('artifact_ms'))} ms | {_ms(a.get('runtime_ms'))} ms | "
                f"{_ms(a.get('python_overhead_ms'))} ms | {a['qconv_call_us']:.1f} µs | {a['conv_linear_layers']} | "
                f"{_ms(a['fixed_cost_ms'])} ms | {_ms(ort_ms)} ms |"
            )
        lines += [
            "",
            "The `.pt2` runs one oneDNN int8 kernel per conv/linear layer (Inductor fuses quantize, bias, ReLU6 "
            "and the residual add into them). PyTorch's `onednn::qconv_pointwise` rebuilds the oneDNN primitive "
            "descriptor, scratchpad and scale/zero-point memories on every call, a fixed cost of tens of µs that "
            "does not shrink with the input: at batch 1 on a small net it is most of the latency, while ONNX "
            "Runtime and XNNPACK build their kernels once, at session/program load. At batch 32 the arithmetic "
            "dominates and the fixed cost fades.",
            "",
        ]
    if results.get("qat_step"):
        lines += [
            "#### QAT training step vs fp32 step (x86 fake-quant, forward + backward + SGD)",
            "",
            "Ratio of medians; target at most 1.5×. Separate processes: fp32 training and QAT training each in fresh "
            "processes, as a user runs them (alternating, several of each); on glibc both pay page faults (memory "
            "freed between steps comes back from the kernel as fresh pages). Same process: both models in one "
            "process, interleaved (the method of earlier runs); there the two models' allocations interfere, and the "
            "fp32 steps fault far less than the QAT steps. `benchmarks/qat_step.py --hugetlb --tuned` also measures "
            "each alone with few or no faults on either side.",
            "",
            "| net | batch | threads | fp32 step | QAT step | ratio, separate processes | page faults/step "
            "fp32 / QAT | same process: fp32, QAT | ratio, same process | page faults/step fp32 / QAT |",
            "|---|---|---|---|---|---|---|---|---|---|",
        ]
        for n, q in results["qat_step"].items():
            sep, same = q.get("separate_processes", {}), q.get("same_process", {})
            lines.append(
                f"| {n} | {q['batch']} | {q['threads']} | {_ms(q['fp32_step_ms'])} ms | {_ms(q['qat_step_ms'])} ms | "
                f"{q['ratio']:.2f}× | {_faults(sep)} | {_ms(same.get('fp32_step_ms'))} ms, "
                f"{_ms(same.get('qat_step_ms'))} ms | {_x(same.get('ratio'))} | {_faults(same)} |"
            )
        lines.append("")
    p = results.get("ptq_time")
    if p:
        lines += [
            f"#### PTQ wall time vs calibration samples ({p['net']}, {p['backend']}, {p['observer']} observer, "
            f"{p['threads']} threads; capture + calibrate + convert, without the export)",
            "",
            "| samples | " + " | ".join(str(pt["samples"]) for pt in p["points"]) + " |",
            "|---|" + "---|" * len(p["points"]),
            "| seconds | " + " | ".join(f"{pt['seconds']:.1f}" for pt in p["points"]) + " |",
            "",
        ]
    tg = results.get("targets", [])
    if tg:
        lines += ["#### Targets", "", "| target | where | measured | met |", "|---|---|---|---|"]
        for t in tg:
            meas = t["measured"]
            meas = _x(meas) if isinstance(meas, float) and "size" not in t["target"] else meas
            meas = f"{meas:.2f}× fp32" if isinstance(meas, float) else ("—" if meas is None else meas)
            lines.append(f"| {t['target']} | {t['where']} | {meas} | {'met' if t['met'] else '**missed**'} |")
        lines.append("")
    return "\n".join(lines)


def plot(results: dict[str, Any], path: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    nets = list(results["nets"])
    fig, axes = plt.subplots(1, len(nets), figsize=(6 * len(nets), 4.5), squeeze=False)
    for ax, name in zip(axes[0], nets):
        lat = results["nets"][name]["latency_ms"]
        cols = [(t, b) for t in lat for b in lat[t]]
        width = 0.8 / len(ROUTES)
        for i, route in enumerate(ROUTES):
            ys = [lat[t][b]["fp32_eager"] / lat[t][b][route] if lat[t][b].get(route) else float("nan") for t, b in cols]
            ax.bar([j + i * width for j in range(len(cols))], ys, width, label=ROUTES[route])
        ax.set_xticks([j + 0.4 - width / 2 for j in range(len(cols))])
        ax.set_xticklabels([f"b{b}\n{t} thr" for t, b in cols])
        ax.set_yscale("log")
        ax.axhline(1.0, color="black", lw=0.8)
        ax.set_title(name)
        ax.set_ylabel("speed-up vs fp32 eager (log)")
    axes[0][0].legend(fontsize=7, loc="upper left")
    fig.suptitle(f"{results['machine']['cpu']}")
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--quick", action="store_true", help="smoke test of every route (under 3 minutes)")
    parser.add_argument("--out", default=str(ROOT / "benchmarks" / "results"))
    parser.add_argument(
        "--render",
        action="store_true",
        help="measure nothing: judge the targets and write the table and plot again "
        "from <out>/speed.json (after a change to how they are reported)",
    )
    args = parser.parse_args(argv)
    if args.render:
        write(json.loads((Path(args.out) / "speed.json").read_text()), Path(args.out))
        return
    settings = dict(QUICK if args.quick else FULL)
    run(settings, Path(args.out), args.quick)


if __name__ == "__main__":
    main()
    # Skip interpreter teardown: with ExecuTorch, ONNX Runtime and Inductor loaded in one process, a runtime's static
    # destructors have crashed at exit (SIGSEGV after everything was written). The results are on disk by now.
    sys.stdout.flush()
    sys.stderr.flush()
    os._exit(0)
