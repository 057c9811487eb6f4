"""Saving compressed models (atomic, safetensors, reloadable with plain transformers)."""

from .atomic import OutputExistsError, atomic_folder, check_output_dir, reserve_output
from .save import REPORT_FILE, model_bytes, save_model

__all__ = ["REPORT_FILE", "OutputExistsError", "atomic_folder", "check_output_dir", "model_bytes", "reserve_output",
           "save_model"]
