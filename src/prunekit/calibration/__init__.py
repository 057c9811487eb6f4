"""Calibration forwards: the state-restoring context, block-0 capture, the sequential engine."""

from .context import BlockInputs, calibration_forward_context, capture_block_inputs
from .engine import BlockEvent, peak_rss_mb, run_sequential

__all__ = ["BlockEvent", "BlockInputs", "calibration_forward_context", "capture_block_inputs", "peak_rss_mb", "run_sequential"]
