"""Evaluation metrics.

- `ncc`: normalised cross-correlation of a key feature map with the ground truth
  (`docs/mapping_gan.md`).
- `max_box_acc`, `BoxAccumulator`, `box_hits`, `MaxBoxAcc`: the WSOL localisation metric
  (MaxBoxAcc and MaxBoxAccV2), exact to the reference protocol and vectorised over thresholds
  (`docs/wsol.md`).
- `confusion_matrix`, `segmentation_scores`: per-class Dice and IoU from hard predictions,
  accumulated over a dataset by summing confusion matrices on the device
  (`docs/segmentation.md`).
"""

from jaxmed.metrics._ncc import ncc as ncc
from jaxmed.metrics._segmentation import confusion_matrix as confusion_matrix
from jaxmed.metrics._segmentation import segmentation_scores as segmentation_scores
from jaxmed.metrics._wsol import BoxAccumulator as BoxAccumulator
from jaxmed.metrics._wsol import MaxBoxAcc as MaxBoxAcc
from jaxmed.metrics._wsol import box_hits as box_hits
from jaxmed.metrics._wsol import max_box_acc as max_box_acc

__all__ = ["BoxAccumulator", "MaxBoxAcc", "box_hits", "confusion_matrix", "max_box_acc", "ncc",
           "segmentation_scores"]
