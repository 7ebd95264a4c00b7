"""int8 quantization for PyTorch Lightning: PTQ and QAT callbacks built on torchao's PT2E flow."""

from lightning_quant.capture import CaptureError
from lightning_quant.config import QuantConfig, QuantizationError
from lightning_quant.export import ArtifactError, ExportError, QuantizedArtifact, load, save
from lightning_quant.ptq import PTQCallback
from lightning_quant.qat import QATCallback, load_qat_checkpoint
from lightning_quant.qat_graph import QATGraph
from lightning_quant.quantize import quantize_ptq

__version__ = "0.1.0.dev0"

__all__ = [
    "ArtifactError",
    "CaptureError",
    "ExportError",
    "PTQCallback",
    "QATCallback",
    "QATGraph",
    "QuantConfig",
    "QuantizationError",
    "QuantizedArtifact",
    "__version__",
    "load",
    "load_qat_checkpoint",
    "quantize_ptq",
    "save",
]
