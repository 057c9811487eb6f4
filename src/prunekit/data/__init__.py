"""Calibration and evaluation text: registered datasets, local files, the data directory."""

from . import austen, c4, gsm8k, kjv, ptb, wikitext2  # noqa: F401  (self-registering)
from .base import DataNotFoundError, JsonlFile, TextDataset, TextFile, data_dir, get_dataset
from .calibration import CalibConfig, CalibrationError, calibration_ids, sample_packed, sample_windows, tokenize

__all__ = [
    "CalibConfig", "CalibrationError", "DataNotFoundError", "JsonlFile", "TextDataset", "TextFile", "calibration_ids",
    "data_dir", "get_dataset", "sample_packed", "sample_windows", "tokenize",
]
