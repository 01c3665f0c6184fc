"""Data layer: readers with errors that name the file, splits, and the synthetic datasets.

- `nifti`, `synthetic_vagan`: NIfTI volumes and the VA-GAN protocol (SPEC S0).
- `images`: 2-D image files; `synthetic_wsol`, `wsol_folder`: the localisation data (SPEC S1).
- `letterbox`, `segmentation_folder`, `synthetic_kidney`, `augment`: segmentation data (SPEC S4).
"""
