"""Explanations of a trained network's decisions.

- `cam`: class activation maps from the last conv features and a class's classifier weights.
- `grad_cam`: Grad-CAM at any named layer of a Linen model, for any output node; vmapped.
- `layer_outputs`, `node_values`, `node_heatmaps`: a feature node `(layer, index)`'s value and
  its heat maps over images by Grad-CAM, CAM, guided back-propagation, deconvnet or guided
  Grad-CAM (`METHODS`), all (node, image) pairs in one vmapped, jit-able call; `guided_relu`
  and `deconvnet_relu`, the ReLUs with those methods' backward passes.
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
from jaxmed.explain._node_maps import METHODS as METHODS
from jaxmed.explain._node_maps import deconvnet_relu as deconvnet_relu
from jaxmed.explain._node_maps import guided_relu as guided_relu
from jaxmed.explain._node_maps import layer_outputs as layer_outputs
from jaxmed.explain._node_maps import node_heatmaps as node_heatmaps
from jaxmed.explain._node_maps import node_values as node_values

__all__ = [
    "EMPTY_BOX",
    "METHODS",
    "cam",
    "cam_boxes",
    "cam_levels",
    "cam_mask",
    "contour_boxes",
    "deconvnet_relu",
    "grad_cam",
    "guided_relu",
    "layer_outputs",
    "node_heatmaps",
    "node_values",
    "normalize_cams",
    "resize_maps",
    "threshold_level",
]
