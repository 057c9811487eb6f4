"""One file per structured criterion; each registers itself in ``prunekit.registry.STRUCTURED``."""
