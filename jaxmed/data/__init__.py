"""Data layer: readers with errors that name the file, splits, and the synthetic datasets.

- `split` (`train_val_split`, seeded and optionally stratified) and `transforms` (`pad_to_multiple`,
  `crop_back`): shared by every system.
- `nifti`, `synthetic_vagan`: NIfTI volumes and the VA-GAN protocol (`docs/mapping_gan.md`).
- `images`: 2-D image files; `synthetic_wsol`, `wsol_folder`: the localisation data
  (`docs/wsol.md`).
- `letterbox`, `segmentation_folder`, `synthetic_kidney`, `augment`: segmentation data
  (`docs/segmentation.md`).
- `slide`, `slide_writer`: whole-slide images, read lazily a tile at a time (`open_slide`,
  OpenSlide's interface) and written as tiled pyramidal TIFF; `synthetic_slide`, `annotations`:
  procedural H&E slides with known stains and QuPath GeoJSON regions (`docs/pathology.md`).
- `synthetic_lesions`: lesion images whose classes are made of known local features, with a
  mask per feature and lesion-free backgrounds, for the feature atlas (`docs/atlas.md`).
"""
