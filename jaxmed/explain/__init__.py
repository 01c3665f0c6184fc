"""Explanations of a trained network's decisions.

- `cam`: class activation maps from the last conv features and a class's classifier weights.
- `grad_cam`: Grad-CAM at any named layer of a Linen model, for any output node; vmapped.
- `resize_maps`: OpenCV-exact cubic / linear resizing of maps (2-D and 3-D), jit-able.
- `normalize_cams`, `cam_mask`, `cam_boxes`: min-max normalisation, the binarised map, and the
  boxes of its contours as the WSOL protocol estimates them (`docs/wsol.md`).
- The protocol's conventions, shared with `jaxmed.metrics`' MaxBoxAcc: `cam_levels` (the uint8
  map and its maximum), `threshold_level` (the integer cut of a threshold), `contour_boxes`
  (a contour's box from its pixel extent) and `EMPTY_BOX` (the box when nothing is above the
  threshold).
"""

from jaxmed.explain._boxes import EMPTY_BOX as EMPTY_BOX
from jaxmed.explain._boxes import cam_boxes as cam_boxes
from jaxmed.explain._boxes import cam_levels as cam_levels
from jaxmed.explain._boxes import cam_mask as cam_mask
from jaxmed.explain._boxes import contour_boxes as contour_boxes
from jaxmed.explain._boxes import normalize_cams as normalize_cams
from jaxmed.explain._boxes import threshold_level as threshold_level
from jaxmed.explain._cam import cam as cam
from jaxmed.explain._cam import grad_cam as grad_cam
from jaxmed.explain._cam import resize_maps as resize_maps

__all__ = [
    "EMPTY_BOX",
    "cam",
    "cam_boxes",
    "cam_levels",
    "cam_mask",
    "contour_boxes",
    "grad_cam",
    "normalize_cams",
    "resize_maps",
    "threshold_level",
]
