"""Explanations of a trained network's decisions.

- `cam`: class activation maps from the last conv features and a class's classifier weights.
- `grad_cam`: Grad-CAM at any named layer of a Linen model, for any output node; vmapped.
- `resize_maps`: OpenCV-exact cubic / linear resizing of maps (2-D and 3-D), jit-able.
- `normalize_cams`, `cam_mask`, `cam_boxes`: min-max normalisation, the binarised map, and the
  boxes of its contours as the WSOL protocol estimates them.
"""

from jaxmed.explain._boxes import cam_boxes, cam_mask, normalize_cams
from jaxmed.explain._cam import cam, grad_cam, resize_maps

__all__ = ["cam", "cam_boxes", "cam_mask", "grad_cam", "normalize_cams", "resize_maps"]
