"""Read-only analyses of a model (spectra, allocations) and their plots."""
