"""Where an int8 model goes: backend artifacts, their JSON sidecar, atomic writes, and loading them back.

Artifacts: ``.pt2`` AOTInductor package (x86), ``.pte`` ExecuTorch program lowered to XNNPACK (arm).
"""

from __future__ import annotations

import contextlib
import datetime
import hashlib
import io
import json
import math
import os
import platform
import shlex
import shutil
import subprocess
import tempfile
import warnings
import zipfile
from collections.abc import Iterator
from importlib.metadata import PackageNotFoundError, version
from pathlib import Path
from typing import Any

import torch
from torch import nn
from torch.utils._pytree import tree_flatten, tree_map, tree_unflatten, treespec_dumps, treespec_loads

from lightning_quant import _torchao
from lightning_quant.capture import ROUTE_ATTR, deepcopy, input_symbols, named_inputs, saved_bytes
from lightning_quant.capture import export as capture_export
from lightning_quant.config import BACKENDS, QuantizationError, first_line, resolve_backend
from lightning_quant.quantize import (
    META_KEY,
    contiguous_linear_inputs,
    fold_pads_into_depthwise_qconvs,
    own_constants_per_call,
    pad_single_channel_qconvs,
    qconv1d_as_qconv2d,
)

SIDECAR_FORMAT = 1


def sidecar_path(path: str | os.PathLike) -> Path:
    return Path(str(path) + ".json")


def _versions() -> dict[str, str | None]:
    out: dict[str, str | None] = {}
    for pkg in ("torch", "torchao", "executorch", "lightning", "lightning-quant"):
        try:
            out[pkg] = version(pkg)
        except PackageNotFoundError:
            out[pkg] = None
    return out


def sha256_file(path: str | os.PathLike) -> str:
    h = hashlib.sha256()
    with open(path, "rb") as f:
        for chunk in iter(lambda: f.read(1 << 20), b""):
            h.update(chunk)
    return h.hexdigest()


@contextlib.contextmanager
def atomic_path(path: Path) -> Iterator[Path]:
    """Yield a temporary path beside ``path``; move it over ``path`` only if the block succeeds."""
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(prefix=f".{path.stem}.", suffix=f".tmp{path.suffix}", dir=path.parent)
    os.close(fd)
    try:
        yield Path(tmp)
        umask = os.umask(0)
        os.umask(umask)
        os.chmod(tmp, 0o666 & ~umask)  # mkstemp creates 0600; artifacts are read by serving processes
        os.replace(tmp, path)
    finally:
        with contextlib.suppress(FileNotFoundError):
            os.unlink(tmp)


def json_text(data: dict[str, Any]) -> str:
    return json.dumps(data, indent=2, sort_keys=True) + "\n"


def write_json_atomic(path: Path, data: dict[str, Any] | str) -> None:
    """Write ``data`` (a dict, or its :func:`json_text`) to ``path`` atomically."""
    with atomic_path(path) as tmp:
        tmp.write_text(data if isinstance(data, str) else json_text(data))


def float_size_bytes(module: nn.Module) -> int:
    """Size of ``module``'s float state_dict as ``torch.save`` writes it.

    The whole state_dict, used by ``forward`` or not; the callbacks' size ratios count only what the captured graph
    reads (:func:`~lightning_quant.capture.used_state_bytes`).
    """
    # not a stand-in routed to by `forward`
    return saved_bytes({k: v for k, v in module.state_dict().items() if not k.startswith(ROUTE_ATTR + ".")})


def _symbolic_dims(ep: torch.export.ExportedProgram, n_inputs: int) -> list[dict[int, str]] | None:
    """For each flattened user input of ``ep``, its dynamic dims named ``batch``, ``dim1``, ``dim1_2``...

    None if the inputs do not line up. Inputs sharing a name must share that size at run time (the runtimes do not
    check it).
    """
    dims = input_symbols(ep)
    if len(dims) != n_inputs:
        return None
    names: dict[str, str] = {}  # export's symbols ("s77") -> stable names: "batch", "dim1", "dim1_2"...
    for found in dims:
        for i, symbol in found.items():
            if symbol not in names:
                base = "batch" if i == 0 else f"dim{i}"
                taken = sum(1 for n in names.values() if n == base or n.startswith(base + "_"))
                names[symbol] = base if not taken else f"{base}_{taken + 1}"
    return [{i: names[s] for i, s in found.items()} for found in dims]


def _input_spec(args: tuple, kwargs: dict, ep: torch.export.ExportedProgram) -> list[dict[str, Any]]:
    """One entry per flattened input: its name (``x``, ``args[0]``, ``mask``...), shape and dtype, or its constant.

    A shape holds None where ``ep`` (the exported program) has a dynamic dim (if its inputs do not line up with the
    call's: at dim 0, as before dynamic dims were recorded).
    """
    spec = []
    leaves = named_inputs(args, kwargs)
    symbolic = _symbolic_dims(ep, len(leaves))
    for k, (name, x) in enumerate(leaves):
        if isinstance(x, torch.Tensor):
            dynamic = symbolic[k] if symbolic is not None else {0: "batch"} if x.ndim else {}
            spec.append(
                {
                    "name": name,
                    "shape": [None if i in dynamic else d for i, d in enumerate(x.shape)],
                    "dtype": str(x.dtype).replace("torch.", ""),
                    **({"dynamic": {str(i): s for i, s in dynamic.items()}} if dynamic else {}),
                }
            )
        else:
            spec.append({"name": name, "constant": repr(x)})
    return spec


# --------------------------------------------------------------------------------------------------- compacting


# AOTInductor's wrapper is the model-independent runtime (model container, constant loading, input checks) around the
# kernel calls: at Inductor's default -O1 it deflates to ~108 KiB, half the int8 weights of a 200k-parameter model.
# These flags build it for size: -Os (it only sequences calls into oneDNN and the kernels, which stay at -O3) and hidden
# visibility (only the AOTI_API entry points the loader looks up stay exported). Inductor joins the level into the
# command line as `-{level}`, so it carries the extra flags, and builds its precompiled headers with them too. With the
# header overlay below the wrapper deflates to ~50 KiB; outputs and latency are unchanged.
_WRAPPER_SIZE_FLAGS = ("Os", "fvisibility=hidden", "fvisibility-inlines-hidden")

# The runtime's only use of std::regex (~40 KiB of code): parse_device_str's device-string check. The overlay header
# replaces it with a plain parser that accepts and rejects the same strings.
_DEVICE_REGEX = """  std::regex re("(cpu|cuda|xpu|mps)(:([0-9]+))?");
  std::smatch sm;
  bool matched = std::regex_match(device_str, sm, re);
"""
_DEVICE_PARSER = """  // lightning-quant: the full match of "(cpu|cuda|xpu|mps)(:([0-9]+))?" without std::regex
  struct Group {
    std::string s;
    bool matched = false;
    const std::string& str() const { return s; }
  };
  Group sm[4];
  const size_t colon = device_str.find(':');
  sm[1].s = device_str.substr(0, colon);
  sm[3].matched = colon != std::string::npos;
  if (sm[3].matched) {
    sm[3].s = device_str.substr(colon + 1);
  }
  bool matched = (sm[1].s == "cpu" || sm[1].s == "cuda" || sm[1].s == "xpu" || sm[1].s == "mps") &&
      (!sm[3].matched || (!sm[3].s.empty() && sm[3].s.find_first_not_of("0123456789") == std::string::npos));
"""
_MODEL_BASE_H = "torch/csrc/inductor/aoti_runtime/model_base.h"


def _regex_free_model_base() -> bytes | None:
    """Torch's ``aoti_runtime/model_base.h`` with its device-string regex replaced by a parser.

    None if this torch's header does not hold the expected regex; the package is then built with the stock header, only
    larger.
    """
    text = (Path(torch.__file__).parent / "include" / _MODEL_BASE_H).read_text()
    if text.count(_DEVICE_REGEX) != 1:
        return None
    return text.replace(_DEVICE_REGEX, _DEVICE_PARSER).encode()


def _header_overlay() -> Path | None:
    """The include folder holding :func:`_regex_free_model_base`, in Inductor's cache folder at a path fixed by it.

    A fixed path keeps the wrapper's compile command the same from one export to the next: Inductor keys its
    precompiled headers by that command, so they are built once per cache folder (~13 s here) and every later export
    compiles its wrapper and kernels ~4 s faster. The header is written atomically, so exports running at once (DDP
    ranks, test workers) share it. None (the stock header) where there is no overlay or the folder cannot be written.
    """
    from torch._inductor.runtime.cache_dir_utils import cache_dir

    data = _regex_free_model_base()
    if data is None:
        return None
    try:
        folder = Path(cache_dir()) / "lightning_quant" / f"aoti-header-overlay-{hashlib.sha256(data).hexdigest()[:16]}"
        header = folder / _MODEL_BASE_H
        if not (header.is_file() and header.read_bytes() == data):
            with atomic_path(header) as tmp:
                tmp.write_bytes(data)
    except OSError:
        return None
    return folder


def _aoti_size_configs() -> dict[str, Any]:
    """Inductor configs that build an AOTInductor package's wrapper for size (see ``_WRAPPER_SIZE_FLAGS``)."""
    flags = list(_WRAPPER_SIZE_FLAGS)
    overlay = _header_overlay()
    if overlay is not None:
        flags.append(f"I{shlex.quote(str(overlay))}")  # searched before torch's include folder
    return {"aot_inductor.compile_wrapper_opt_level": " -".join(flags), "aot_inductor.precompile_headers": True}


def _compact_aoti_package(path: Path) -> None:
    """Shrink an AOTInductor package without changing what it computes.

    Strips its shared library's unneeded symbols and debug sections, drops the generated C++ sources (kept by Inductor
    for debugging, never read at load), and deflates the archive (loading reads deflated entries).
    """
    strip = shutil.which("strip")
    tmp = path.with_suffix(path.suffix + ".compact")
    with zipfile.ZipFile(path) as zin, zipfile.ZipFile(tmp, "w", zipfile.ZIP_DEFLATED, compresslevel=9) as zout:
        for info in zin.infolist():
            if info.filename.endswith(".cpp"):
                continue
            data = zin.read(info.filename)
            if info.filename.endswith(".so") and strip:
                with tempfile.TemporaryDirectory() as d:
                    so = Path(d) / "lib.so"
                    so.write_bytes(data)
                    if subprocess.run([strip, "--strip-unneeded", str(so)], capture_output=True).returncode == 0:
                        data = so.read_bytes()
            zout.writestr(info.filename, data)
    os.replace(tmp, path)


# ------------------------------------------------------------------------------------------------------- saving


@contextlib.contextmanager
def _one_thread() -> Iterator[None]:
    """Run the block with one intra-op thread, then restore the caller's count (also on error).

    Inductor prepacks each int8 weight (``onednn.qconv_prepack``, at freezing) into the blocked layout oneDNN picks for
    the exporting process's thread count, with the batch unknown. oneDNN's convolutions choose their weight layout by
    thread count and problem size, and PyTorch's int8 conv reorders a weight laid out otherwise on every call. With
    AMX (4th-generation Xeon and later) some of those reorders take a slow generic path: EfficientNet-Lite0 exported
    with 2 threads and run with 1 spent 42 ms of each 47 ms batch-1 call reordering four 1x1 conv weights (5.2 ms per
    call prepacked under one thread). Prepacked for one thread (the largest blocks, which oneDNN also picks wherever
    each thread has enough work), the layout no longer depends on the exporting process's thread count, and matched
    what oneDNN chose at batch 32 with 1 to 16 threads and at batch 1 with 1 thread (README, "Known limitations").
    """
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    try:
        yield
    finally:
        torch.set_num_threads(threads)


def _contiguous(x: Any) -> Any:
    return x.contiguous() if isinstance(x, torch.Tensor) else x


def _require_tensor_outputs(gm: torch.fx.GraphModule, name: str | None) -> None:
    """AOTInductor cannot return constants: refuse ``return y, None`` (or ``y, 3``) with a message, not a crash."""

    def walk(value: Any, where: str) -> None:
        if isinstance(value, torch.fx.Node):
            return
        if isinstance(value, (tuple, list)):
            for i, v in enumerate(value):
                walk(v, f"{where}[{i}]")
        elif isinstance(value, dict):
            for k, v in value.items():
                walk(v, f"{where}[{k!r}]")
        else:
            raise ValueError(
                f"The x86 export needs every output of {name or 'the model'!r} to be a tensor, but output{where} "
                f"(outputs in flattened order) is {value!r}, a constant AOTInductor cannot return. Return tensors "
                "only, or export for backend='arm'."
            )

    (output,) = (n for n in gm.graph.nodes if n.op == "output")
    walk(output.args[0], "")


@contextlib.contextmanager
def _compiler_errors(backend: str, name: str | None) -> Iterator[None]:
    """Say what failed, and what was kept, when the backend's compiler raises from deep inside torch."""
    try:
        yield
    except ModuleNotFoundError:  # the arm extra is missing: _torchao's message says what to install
        raise
    except Exception as err:
        what = f"submodule {name!r}" if name else "the model"
        compiler = "AOTInductor" if backend == "x86" else "ExecuTorch's XNNPACK lowering"
        raise ExportError(
            f"{compiler} could not compile the int8 program of {what} for backend {backend!r} "
            f"({first_line(err, 300)}). Nothing was written (an earlier artifact at the path is kept) and the "
            "float model is unchanged. The other backend compiles with another toolchain and may succeed; please "
            "report this failure with the model's layer types."
        ) from err


# Keys ``save`` writes into the sidecar itself; ``metadata`` may add others (and ``metrics``).
_SIDECAR_KEYS = (
    "format", "backend", "artifact", "file", "sha256", "size_bytes", "contains_native_code", "submodule", "inputs",
    "in_spec", "out_spec", "max_batch_size", "dynamic_dims", "num_calibration_samples", "observer",
    "weight_granularity", "bias_corrected_layers", "fp32_size_bytes", "versions", "machine", "created",
    "undelegated_ops", "parity_max_abs_diff",
)  # fmt: skip


def _check_metadata(metadata: Any) -> None:
    if metadata is None:
        return
    if not isinstance(metadata, dict) or not all(isinstance(k, str) for k in metadata):
        raise TypeError(f"Expected argument `metadata` to be a dict with str keys, but got {type(metadata).__name__}.")
    reserved = sorted(set(metadata) & set(_SIDECAR_KEYS))
    if reserved:
        raise ValueError(
            f"Expected argument `metadata` to leave the sidecar's own keys alone, but it sets {reserved}; rename them."
        )
    try:
        json.dumps(metadata, sort_keys=True)  # as the sidecar is written
    except (TypeError, ValueError) as err:
        raise TypeError(
            f"Expected argument `metadata` to hold JSON values (str, numbers, bools, None, lists, dicts), but {err}; "
            "convert tensors with `.item()` or `.tolist()`."
        ) from None


# ------------------------------------------------------------------------------------------------------ parity


def max_abs_diff(a: Any, b: Any) -> float:
    """Max |a - b| over the tensors of two outputs; ``inf`` where only one side is NaN or infinite."""
    la = [x for x in tree_flatten(a)[0] if isinstance(x, torch.Tensor)]
    lb = [x for x in tree_flatten(b)[0] if isinstance(x, torch.Tensor)]
    worst = 0.0
    for x, y in zip(la, lb):
        x, y = x.float(), y.float()
        same = (x == y) | (x.isnan() & y.isnan())
        d = torch.where(same, 0.0, torch.nan_to_num((x - y).abs(), nan=math.inf))
        worst = max(worst, float(d.max())) if d.numel() else worst
    return worst


#: reload parity beyond this fraction of the outputs' range is reported (runtimes differ by int8 rounding steps)
PARITY_WARN_FRACTION = 0.1


def parity_is_off(diff: float, want: Any) -> bool:
    """Whether an artifact's max |diff| from the in-process outputs ``want`` is beyond int8 rounding differences."""
    return diff > max(PARITY_WARN_FRACTION * _spread(want), PARITY_WARN_FRACTION / 10 * _magnitude(want), 1e-3)


def _magnitude(out: Any) -> float:
    """The largest finite |value| over the floating-point tensors of ``out``."""
    floats = [x for x in tree_flatten(out)[0] if torch.is_tensor(x) and x.is_floating_point() and x.numel()]
    return max((float(torch.nan_to_num(x.abs(), nan=0.0, posinf=0.0).max()) for x in floats), default=0.0)


def _spread(out: Any) -> float:
    """The largest max - min over the floating-point tensors of ``out`` (0.0 when there are none)."""
    floats = [x for x in tree_flatten(out)[0] if torch.is_tensor(x) and x.is_floating_point() and x.numel()]
    ranges = [float(x.max() - x.min()) for x in floats]
    return max((r for r in ranges if r == r), default=0.0)  # NaN outputs have no range


def save(quantized: torch.fx.GraphModule, path: str | os.PathLike, *, metadata: dict[str, Any] | None = None) -> dict:
    """Export an int8 model from :func:`~lightning_quant.quantize_ptq` (or a callback) to its backend's artifact.

    ``x86`` writes an AOTInductor package (``.pt2``; oneDNN int8 kernels compiled once, here, for this CPU's ISA;
    loads with plain ``torch``). ``arm`` writes an ExecuTorch program lowered to XNNPACK (``.pte``). Next to it goes
    ``<path>.json``: backend, versions, input spec, sha256 and ``metadata``. Each file is written atomically, the
    sidecar first: an error before the artifact's final rename leaves any earlier artifact at ``path`` in place (with
    the new sidecar if only that rename failed: ``load`` then refuses the pair on its sha256 rather than run it).

    Returns:
        The sidecar dict.
    """
    info = getattr(quantized, "meta", {}).get(META_KEY)
    if not isinstance(quantized, torch.fx.GraphModule) or info is None:
        raise TypeError(
            "Expected argument `quantized` to be an int8 model returned by `lightning_quant.quantize_ptq` or a "
            f"callback's `quantized_model`, but got {type(quantized).__name__}."
        )
    backend = BACKENDS[info["backend"]]
    if not isinstance(path, (str, os.PathLike)):
        raise TypeError(f"Expected argument `path` to be a file path, but got {type(path).__name__}.")
    path = Path(path).expanduser()
    if path.suffix != backend.suffix:
        raise ValueError(
            f"Expected argument `path` to end with {backend.suffix!r} for backend {backend.name!r}, "
            f"but got {str(path)!r}."
        )
    if path.is_dir():
        raise ValueError(f"Expected argument `path` to name a file, but {str(path)!r} is a folder.")
    if sidecar_path(path).is_dir():
        raise ValueError(
            f"Expected the sidecar path {str(sidecar_path(path))!r} to be free for the artifact's metadata, but it is "
            "a folder. Move it, or save under another name."
        )
    for parent in path.parents:
        if parent.exists() and not parent.is_dir():
            raise ValueError(f"Expected argument `path` to lie in a folder, but {str(parent)!r} is a file.")
    _check_metadata(metadata)
    # The artifact is called with contiguous tensors (QuantizedArtifact.forward): export it for them. Example inputs
    # recorded in another memory format (channels_last) would compile the program for their strides.
    args, kwargs = tree_map(_contiguous, info["example_inputs"])
    reference = quantized
    if backend.name == "x86":
        _require_tensor_outputs(quantized, info["name"])
        quantized = deepcopy(quantized)
        fold_pads_into_depthwise_qconvs(quantized)
        qconv1d_as_qconv2d(quantized)
        pad_single_channel_qconvs(quantized)
        contiguous_linear_inputs(quantized)
    else:
        quantized = deepcopy(quantized)
        own_constants_per_call(quantized)
    ep = capture_export(
        quantized,
        args,
        kwargs,
        max_batch_size=info["max_batch_size"],
        name=info["name"],
        dynamic_dims=info.get("dynamic_dims"),
    )
    extra: dict[str, Any] = {}
    with atomic_path(path) as tmp:
        if backend.name == "x86":
            # Inductor freezes (and so prepacks int8 weights) only with grad off
            with torch.no_grad(), _compiler_errors("x86", info["name"]), _one_thread():
                configs = {"freezing": True, **_aoti_size_configs()}
                torch._inductor.aoti_compile_and_package(ep, package_path=str(tmp), inductor_configs=configs)
            _compact_aoti_package(tmp)
        else:
            with _compiler_errors(backend.name, info["name"]):
                data, undelegated = _torchao.lower_to_executorch(ep)
            tmp.write_bytes(data)
            extra["undelegated_ops"] = undelegated
        digest = sha256_file(tmp)
        size = tmp.stat().st_size
        sidecar = {
            "format": SIDECAR_FORMAT,
            "backend": backend.name,
            "artifact": backend.artifact,
            "file": path.name,
            "sha256": digest,
            "size_bytes": size,
            "contains_native_code": backend.name == "x86",
            "submodule": info["name"],
            "inputs": _input_spec(args, kwargs, ep),
            "in_spec": treespec_dumps(ep.call_spec.in_spec),
            "out_spec": treespec_dumps(ep.call_spec.out_spec),
            "max_batch_size": info["max_batch_size"],
            "dynamic_dims": [list(p) for p in info.get("dynamic_dims") or ()],
            "num_calibration_samples": info.get("num_calibration_samples"),
            "observer": info.get("observer"),
            "weight_granularity": info.get("weight_granularity", "per_channel"),
            "bias_corrected_layers": info.get("bias_corrected_layers", 0),
            "fp32_size_bytes": info.get("fp32_size_bytes"),
            "versions": _versions(),
            "machine": {"platform": platform.platform(), "processor": platform.machine()},
            "created": datetime.datetime.now(datetime.timezone.utc).isoformat(timespec="seconds"),
            "metrics": {},
            **extra,
            **(metadata or {}),
        }
        sidecar["parity_max_abs_diff"] = _reload_parity(tmp, sidecar, reference, args, kwargs)
        # the sidecar is written before the artifact replaces an earlier one: if writing it fails, the earlier
        # artifact stays
        write_json_atomic(sidecar_path(path), json_text(sidecar))
    return sidecar


def _reload_parity(path: Path, sidecar: dict, reference: nn.Module, args: tuple, kwargs: dict) -> float:
    """Run the written artifact on the example inputs against the in-process model; warn when they disagree.

    Compilers have had silent bugs here (wrong strides for one-channel int8 convs): this is the last point at which the
    artifact can be compared with what it was compiled from.
    """
    runner = _open_runner(path, sidecar["backend"])
    with torch.no_grad():
        want = reference(*args, **kwargs)
        diff = max_abs_diff(QuantizedArtifact(runner, sidecar, path)(*args, **kwargs), want)
    if parity_is_off(diff, want):
        warnings.warn(
            f"The exported artifact for {sidecar['submodule']!r} ({sidecar['file']}) differs from the in-process int8 "
            f"model by up to {diff:.3g} on the example inputs, where its outputs span {_spread(want):.3g}; the "
            f"{sidecar['backend']!r} runtime usually agrees within a few int8 steps. Check the artifact's outputs on "
            "your data before deploying it, and please report this with the model's structure.",
            stacklevel=3,
        )
    return diff


def serialize(quantized: torch.fx.GraphModule) -> tuple[bytes, bytes]:
    """An in-process int8 model as bytes (its ``torch.export`` program, its capture details), to send to other ranks."""
    info = quantized.meta[META_KEY]
    ep = capture_export(
        quantized,
        *info["example_inputs"],
        max_batch_size=info["max_batch_size"],
        name=info["name"],
        dynamic_dims=info.get("dynamic_dims"),
    )
    program, meta = io.BytesIO(), io.BytesIO()
    torch.export.save(ep, program)
    torch.save(info, meta)
    return program.getvalue(), meta.getvalue()


def deserialize(data: tuple[bytes, bytes]) -> torch.fx.GraphModule:
    """Inverse of :func:`serialize` (``weights_only`` loading)."""
    _torchao.register_quantized_ops()
    program, meta = data
    gm = torch.export.load(io.BytesIO(program)).module()
    gm.meta[META_KEY] = torch.load(io.BytesIO(meta), weights_only=True)
    return gm


def update_sidecar(path: str | os.PathLike, **fields: Any) -> dict:
    """Merge ``fields`` into the sidecar of ``path`` (dict values are merged one level deep)."""
    sc = sidecar_path(path)
    data = json.loads(sc.read_text())
    for k, v in fields.items():
        data[k] = {**data.get(k, {}), **v} if isinstance(v, dict) and isinstance(data.get(k), dict) else v
    write_json_atomic(sc, data)
    return data


# ------------------------------------------------------------------------------------------------------ loading


class ArtifactError(QuantizationError):
    """An artifact or its sidecar is missing, corrupt, or not what was asked for."""


class ExportError(QuantizationError):
    """The backend's compiler (AOTInductor, ExecuTorch's XNNPACK lowering) failed on an int8 program."""


def read_sidecar(path: str | os.PathLike) -> dict:
    path = Path(path).expanduser()
    if path.is_dir():
        raise ArtifactError(f"Expected argument `path` to be an artifact file, but {str(path)!r} is a folder.")
    if not path.is_file():
        raise FileNotFoundError(f"Expected argument `path` to be an artifact file, but {str(path)!r} does not exist.")
    sc = sidecar_path(path)
    if not sc.is_file():
        raise ArtifactError(
            f"The artifact {str(path)!r} has no sidecar {sc.name!r}; lightning-quant writes both side by side. Copy "
            "the sidecar with the artifact."
        )
    try:
        data = json.loads(sc.read_text())
    except json.JSONDecodeError as err:
        raise ArtifactError(f"The sidecar {str(sc)!r} is not valid JSON ({err}).") from None
    if not isinstance(data, dict) or data.get("backend") not in BACKENDS or "sha256" not in data:
        raise ArtifactError(f"The sidecar {str(sc)!r} is not a lightning-quant sidecar (no backend/sha256).")
    return data


def _check_call_spec(data: dict, path: Path) -> None:
    """Refuse a sidecar that lacks, or garbles, what calling its artifact reads."""
    bad = [k for k, kind in _SIDECAR_TYPES.items() if not _has_type(data.get(k), kind)]
    if not bad:
        try:
            treespec_loads(data["in_spec"]), treespec_loads(data["out_spec"])
        except Exception:
            bad = ["in_spec/out_spec"]
    if bad:
        raise ArtifactError(
            f"The sidecar {str(sidecar_path(path))!r} lacks or has invalid {bad}: it was edited or written by another "
            "version. Re-export the artifact (its sidecar describes how to call it)."
        )


# What loading and calling an artifact read from its sidecar.
_SIDECAR_TYPES = {"in_spec": str, "out_spec": str, "inputs": list, "max_batch_size": int}


def _has_type(value: Any, kind: type) -> bool:
    return isinstance(value, kind) and not isinstance(value, bool)


class QuantizedArtifact(nn.Module):
    """A loaded int8 artifact, callable like the module it was exported from.

    Checks inputs against the sidecar (dtype, non-batch dims, batch <= ``max_batch_size``) since the compiled runtimes
    do not.
    """

    def __init__(self, runner: Any, sidecar: dict, path: Path, verified: bool = True) -> None:
        super().__init__()
        self.runner = runner
        self.sidecar = sidecar
        self.path = path
        self.verified = verified  # how `load` checked the file: copies load it again the same way
        self.backend = sidecar["backend"]
        self._in_spec = treespec_loads(sidecar["in_spec"])
        self._out_spec = treespec_loads(sidecar["out_spec"])
        kw_spec = self._in_spec.children()[1] if self._in_spec.num_children == 2 else None
        self._kwarg_names = list(kw_spec.context) if kw_spec is not None and kw_spec.context else []
        args_spec = self._in_spec.children()[0] if self._in_spec.num_children == 2 else None
        self._num_args = args_spec.num_children if args_spec is not None else None
        # x86: call the AOTI loader directly. Its Python wrapper (``AOTICompiledModel.__call__``) re-parses the call
        # spec's JSON and flattens the inputs again on every call (with our checks, ~70 us per call: 0.07 of 0.62 ms
        # for a small net at batch 1; ~10 us without it).
        loader = getattr(runner, "loader", None) if self.backend == "x86" else None
        self._run = loader.boxed_run if loader is not None else runner

    def __reduce__(self) -> tuple:
        # the runtimes cannot be pickled or copied: a copy (``copy.deepcopy``, ``pickle``, ``torch.save``) loads the
        # file again, by path
        return _load_again, (str(self.path), self.backend, self.verified)

    def __repr__(self) -> str:
        return f"{type(self).__name__}({str(self.path)!r}, backend={self.backend!r})"

    def train(self, mode: bool = True) -> QuantizedArtifact:
        self.training = mode  # a compiled inference program: the flag moves, nothing else
        return self

    def _check(self, leaves: list[Any]) -> None:
        spec = self.sidecar["inputs"]
        if len(leaves) != len(spec):
            raise ValueError(f"{self.path.name} expects {len(spec)} inputs, but got {len(leaves)}.")
        sizes: dict[str, dict[str, int]] = {}  # symbol -> input name -> its size there
        dim_of: dict[str, int] = {}
        for i, (x, s) in enumerate(zip(leaves, spec)):
            if "constant" in s:
                if repr(x) != s["constant"]:
                    raise ValueError(
                        f"{self.path.name}: input `{s.get('name', i)}` was exported as the constant {s['constant']}, "
                        f"but got {x!r}; "
                        "non-tensor arguments are baked into the artifact. Export again with that value."
                    )
                continue
            if not isinstance(x, torch.Tensor):
                raise TypeError(
                    f"{self.path.name}: input `{s.get('name', i)}` must be a Tensor, but got {type(x).__name__}."
                )
            if x.device.type != "cpu":
                raise ValueError(
                    f"{self.path.name}: input `{s.get('name', i)}` must be on the CPU (int8 artifacts run on "
                    f"CPUs), but it is on {x.device}; pass `x.cpu()`."
                )
            shape = list(x.shape)
            want = s["shape"]
            if len(shape) != len(want) or any(w is not None and w != d for w, d in zip(want, shape)):
                fixed = [j for j, w in enumerate(want) if w is not None and j > 0]
                pad = f" (dims {fixed} are fixed: see `dynamic_dims`)" if len(shape) > 1 and fixed else ""
                raise ValueError(
                    f"{self.path.name}: input `{s.get('name', i)}` must have shape {want} (None = batch or a dynamic "
                    f"dim), got {shape}{pad}."
                )
            if str(x.dtype).replace("torch.", "") != s["dtype"]:
                raise TypeError(
                    f"{self.path.name}: input `{s.get('name', i)}` must be {s['dtype']}, but got {x.dtype}."
                )
            # sidecars written before dynamic dims were recorded name none (and hold None at dim 0 of every tensor,
            # batched or not): their inputs are checked one by one, as they were
            for d, symbol in (s.get("dynamic") or {}).items():
                sizes.setdefault(symbol, {})[s.get("name", str(i))] = x.shape[int(d)]
                dim_of[symbol] = int(d)
            if want and want[0] is None and x.shape[0] == 0 and self.backend == "arm":
                raise ValueError(
                    f"{self.path.name}: batch 0 is empty; the arm runtime (XNNPACK) needs at least 1 sample."
                )
            if want and want[0] is None and x.shape[0] > self.sidecar["max_batch_size"]:
                raise ValueError(
                    f"{self.path.name}: batch {x.shape[0]} exceeds the exported max_batch_size "
                    f"{self.sidecar['max_batch_size']}; split the batch or export with a larger `max_batch_size`."
                )
        largest = {d: n for d, n in self.sidecar.get("dynamic_dims") or ()}
        for symbol, by_name in sizes.items():  # inputs exported with one size there; the x86 runtime does not check
            d, listed = dim_of[symbol], ", ".join(f"`{k}` {v}" for k, v in by_name.items())
            if len(set(by_name.values())) > 1:
                what = "one batch size" if d == 0 else f"one size in dim {d} (exported as one dynamic size)"
                raise ValueError(f"{self.path.name}: the inputs must share {what}, but got {listed}.")
            n = next(iter(by_name.values()))
            if d > 0 and d in largest and not 2 <= n <= largest[d]:
                raise ValueError(
                    f"{self.path.name}: dim {d} takes sizes from 2 to {largest[d]} (`dynamic_dims`), but got {listed}."
                )

    def _missing_keywords(self, args: tuple, kwargs: dict[str, Any]) -> None:
        missing = [k for k in self._kwarg_names if k not in kwargs]
        if not missing:
            return
        constants = {s.get("name"): s["constant"] for s in self.sidecar["inputs"] if "constant" in s}
        hint = ", ".join(f"{k}={constants[k]}" if k in constants else k for k in missing)
        if self._num_args is not None and len(args) > self._num_args:
            n = self._num_args
            raise TypeError(
                f"{self.path.name} takes {n} positional argument{'s' * (n != 1)} and the keyword arguments "
                f"{self._kwarg_names}, as in the call it was exported from, but got {len(args)} positional: pass "
                f"{hint} by keyword."
            )
        missing_are = f"{missing} {'is' if len(missing) == 1 else 'are'} missing"
        why = (
            " (a non-tensor argument is baked into the artifact with the value it had at capture, not its default)"
            if any(k in constants for k in missing)
            else ""
        )
        raise TypeError(
            f"{self.path.name} was exported with the keyword arguments {self._kwarg_names} and needs them all, but "
            f"{missing_are}: pass {hint} by keyword{why}."
        )

    def forward(self, *args: Any, **kwargs: Any) -> Any:
        if kwargs:
            expected = self._kwarg_names
            unknown = sorted(set(kwargs) - set(expected))
            if unknown:
                raise TypeError(
                    f"{self.path.name} got unexpected keyword arguments {unknown}; it was exported with {expected}."
                )
            kwargs = {k: kwargs[k] for k in expected if k in kwargs}
            leaves, _ = tree_flatten((args, kwargs))
        elif all(isinstance(a, torch.Tensor) for a in args):
            leaves = list(args)  # what tree_flatten((args, {})) gives, without its cost
        else:
            leaves, _ = tree_flatten((args, kwargs))
        if self._kwarg_names and not all(k in kwargs for k in self._kwarg_names):
            self._missing_keywords(args, kwargs)
        self._check(leaves)
        inputs = [x.detach().contiguous() if isinstance(x, torch.Tensor) else x for x in leaves]
        if self.backend == "x86":  # constants are baked in; the program takes the tensors
            outputs = self._run([x for x in inputs if isinstance(x, torch.Tensor)])
        else:  # an ExecuTorch program keeps its (checked) constants among its inputs
            outputs = self.runner.execute(inputs)
        return tree_unflatten(list(outputs), self._out_spec)


def load(path: str | os.PathLike, *, backend: str | None = None, verify: bool = True) -> QuantizedArtifact:
    """Load an artifact written by :func:`save` (or a callback) as a ready-to-run module.

    Args:
        path: the ``.pt2`` or ``.pte`` file (its ``.json`` sidecar must sit beside it).
        backend: if given, refuse an artifact for another backend.
        verify: check the file's sha256 against the sidecar before loading (refuses truncated or altered files).

    Raises:
        FileNotFoundError: ``path`` does not exist.
        ArtifactError: missing/invalid sidecar, checksum mismatch, or an artifact for another backend.
    """
    if not isinstance(path, (str, os.PathLike)):
        raise TypeError(f"Expected argument `path` to be a file path, but got {type(path).__name__}.")
    if not isinstance(verify, bool):
        raise TypeError(f"Expected argument `verify` to be a bool, but got {verify!r}.")
    wanted = resolve_backend(backend).name if backend is not None else None
    path = Path(path).expanduser()
    sidecar = read_sidecar(path)
    if wanted is not None and wanted != sidecar["backend"]:
        raise ArtifactError(
            f"{path.name} is an {sidecar['backend']!r} artifact, but backend={backend!r} was asked for. Export for "
            f"that backend, or load it without `backend=`."
        )
    # a .pte is read into memory once: the sha256 is that of the bytes the runtime loads, and rewriting the file in
    # place later (`cp new.pte model.pte`) cannot pull the program out from under a running service
    data = path.read_bytes() if sidecar["backend"] == "arm" else None
    digest = hashlib.sha256(data).hexdigest() if data is not None else sha256_file(path) if verify else None
    if verify and digest != sidecar["sha256"]:
        written_for = sidecar.get("file")
        if isinstance(written_for, str) and written_for != path.name:
            why = f"the sidecar {sidecar_path(path).name} was written for {written_for}, or this file was altered"
        else:
            why = "the file is truncated or was altered"
        raise ArtifactError(
            f"{path.name} does not match the sha256 in its sidecar: {why}. Re-export it; only load artifacts you trust "
            "(an x86 package contains native code)."
        )
    runner = _open_runner(path, sidecar["backend"], data)
    _check_call_spec(sidecar, path)
    return QuantizedArtifact(runner, sidecar, path.absolute(), verified=verify)


def _load_again(path: str, backend: str, verify: bool = True) -> QuantizedArtifact:
    return load(path, backend=backend, verify=verify)


def _open_runner(path: Path, backend: str, data: bytes | None = None) -> Any:
    """The backend's runtime for ``path``: an AOTInductor model, or an ExecuTorch method (from ``data`` if given)."""
    if backend == "x86":
        try:
            return torch._inductor.aoti_load_package(str(path))
        except Exception as err:
            raise ArtifactError(f"Could not load the AOTInductor package {path.name}: {err}") from err
    data = path.read_bytes() if data is None else data
    # ExecuTorch aborts the process (no Python exception) on some files that are not programs: check the header first
    if not (data[4:6] == b"ET" and data[6:8].isdigit()):
        raise ArtifactError(
            f"Could not load the ExecuTorch program {path.name}: it is not an ExecuTorch program (no 'ET' file "
            "identifier in its header). Re-export it, or load the file its sidecar was written for."
        )
    try:
        return _torchao.load_executorch_method(data)
    except ModuleNotFoundError:
        raise
    except Exception as err:
        raise ArtifactError(f"Could not load the ExecuTorch program {path.name}: {err}") from err
