"""Helpers for the VM test: a cached Debian root, the baked image, the NoCloud seed and qemu."""
