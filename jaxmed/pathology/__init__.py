"""Whole-slide pathology: tissue, tiles and stain normalisation (`docs/pathology.md`).

- `tissue`: the tissue mask of a slide, found on a low-resolution level.
- `tiles`: the grid of tiles kept over the tissue, stored as CLAM-style HDF5 coordinates.
- `stain`: optical density, stain matrices (Macenko, Vahadane) and `StainNormalizer` (SPCN).
"""
