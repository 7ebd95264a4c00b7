"""int8 quantization for PyTorch Lightning: PTQ and QAT callbacks built on torchao's PT2E flow.

The names below are imported on first use: a serving process that only calls :func:`load` imports torch and the
artifact loader, not Lightning (or torchao), which the callbacks need.
"""

from __future__ import annotations

import importlib
import importlib.util
from typing import TYPE_CHECKING, Any

__version__ = "0.1.0.dev0"

#: public name -> the module that defines it
_EXPORTS = {
    "ArtifactError": "lightning_quant.export",
    "CaptureError": "lightning_quant.capture",
    "ExportError": "lightning_quant.export",
    "PTQCallback": "lightning_quant.ptq",
    "QATCallback": "lightning_quant.qat",
    "QATGraph": "lightning_quant.qat_graph",
    "QuantConfig": "lightning_quant.config",
    "QuantizationError": "lightning_quant.config",
    "QuantizedArtifact": "lightning_quant.export",
    "load": "lightning_quant.export",
    "load_qat_checkpoint": "lightning_quant.qat",
    "quantize_ptq": "lightning_quant.quantize",
    "save": "lightning_quant.export",
}

__all__ = sorted([*_EXPORTS, "__version__"])

if TYPE_CHECKING:  # static names for type checkers and IDEs
    from lightning_quant.capture import CaptureError  # noqa: F401
    from lightning_quant.config import QuantConfig, QuantizationError  # noqa: F401
    from lightning_quant.export import ArtifactError, ExportError, QuantizedArtifact, load, save  # noqa: F401
    from lightning_quant.ptq import PTQCallback  # noqa: F401
    from lightning_quant.qat import QATCallback, load_qat_checkpoint  # noqa: F401
    from lightning_quant.qat_graph import QATGraph  # noqa: F401
    from lightning_quant.quantize import quantize_ptq  # noqa: F401


def __getattr__(name: str) -> Any:
    module = _EXPORTS.get(name)
    if module is None:  # a submodule, as `import lightning_quant; lightning_quant.config` found it before
        if name.isidentifier() and not name.startswith("__") and importlib.util.find_spec(f"{__name__}.{name}"):
            return importlib.import_module(f"{__name__}.{name}")  # binds it in this namespace
        raise AttributeError(f"module 'lightning_quant' has no attribute {name!r}")
    value = getattr(importlib.import_module(module), name)
    globals()[name] = value  # later lookups skip this function
    return value


def __dir__() -> list[str]:
    return sorted({*globals(), *_EXPORTS})
