"""Sparsity sweeps (above :mod:`prunekit.api`, like the CLI): the grid, the resumable results file,
the serial executor, knees, plots and the Markdown report."""

from .config import SweepConfig, cell_key
from .results import curves, knees, load_results, save_results
from .run import run_cell, run_sweep

__all__ = ["SweepConfig", "cell_key", "curves", "knees", "load_results", "run_cell", "run_sweep", "save_results"]
