"""Sparsity sweeps (beside :mod:`prunekit.pipeline`: every cell is one ``pipeline.run``): the grid, the
resumable results file, the serial executor, knees, plots and the Markdown report."""

from .config import SweepConfig, cell_key
from .results import curves, knees, load_results, save_results
from .run import cell_spec, run_cell, run_sweep

__all__ = ["SweepConfig", "cell_key", "cell_spec", "curves", "knees", "load_results", "run_cell", "run_sweep",
           "save_results"]
