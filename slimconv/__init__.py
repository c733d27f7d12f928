"""slimconv: remove and parallelise transformer layers, exactly, from a YAML recipe."""

__version__ = "0.1.0"
