"""edgebake on the unit: the inference service, its updates and first boot."""

__version__ = "0.1.0"
