"""Validation of a built image: static checks on its rootfs, then a QEMU boot with testinfra."""
