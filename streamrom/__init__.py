"""streamrom: low-rank (ROM) compression of LLaMA-family models on a CPU, one decoder block in memory."""
from .calibration import CalibrationConfig
from .errors import InputError, OutputError, StreamromError, UsageError
from .evaluate import evaluate
from .loading import load
from .pipeline import CompressConfig, compress
from .report import Report

__version__ = "0.1.0"

__all__ = [
    "CalibrationConfig", "CompressConfig", "Report", "compress", "evaluate", "load",
    "StreamromError", "InputError", "OutputError", "UsageError", "__version__",
]
