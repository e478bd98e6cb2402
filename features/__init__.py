"""Cached feature extraction: the encoder registry and crash-safe per-patient HDF5 bags."""
