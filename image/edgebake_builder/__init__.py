"""edgebake image builder: recipe + model -> flashable, validated appliance image."""

__version__ = "0.1.0"
