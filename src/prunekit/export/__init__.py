"""Saving compressed models (atomic, safetensors, reloadable with plain transformers)."""

from .save import REPORT_FILE, OutputExistsError, atomic_folder, check_output_dir, model_bytes, save_model

__all__ = ["REPORT_FILE", "OutputExistsError", "atomic_folder", "check_output_dir", "model_bytes", "save_model"]
