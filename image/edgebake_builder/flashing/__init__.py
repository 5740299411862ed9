"""`invoke flash`: write cards for units, refuse disks that must not be written."""
