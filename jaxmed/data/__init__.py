"""Data layer: NIfTI reading and writing, group discovery, splits and synthetic datasets."""
