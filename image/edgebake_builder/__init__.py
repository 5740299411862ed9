"""edgebake image builder: recipe + model -> flashable, validated appliance image."""

from edgebake_runtime import __version__

__all__ = ["__version__"]
