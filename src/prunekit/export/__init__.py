"""Saving compressed models (atomic, safetensors): plain HF folders, low-rank folders, the compressed format."""

from .atomic import OutputExistsError, atomic_folder, check_output_dir, reserve_output
from .formats import SAVE_FORMATS, save_folder
from .save import REPORT_FILE, model_bytes, save_model

__all__ = ["REPORT_FILE", "SAVE_FORMATS", "OutputExistsError", "atomic_folder", "check_output_dir", "model_bytes",
           "reserve_output", "save_folder", "save_model"]
