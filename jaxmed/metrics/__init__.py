"""Evaluation metrics.

- `ncc`: normalised cross-correlation of a key feature map with the ground truth (SPEC S0).
- `max_box_acc`, `BoxAccumulator`, `box_hits`, `MaxBoxAcc`: the WSOL localisation metric
  (MaxBoxAcc and MaxBoxAccV2), exact to the reference protocol and vectorised over thresholds
  (SPEC S1).
- `confusion_matrix`, `segmentation_scores`: per-class Dice and IoU from hard predictions,
  accumulated over a dataset by summing confusion matrices on the device (SPEC S4).
"""

from jaxmed.metrics._ncc import ncc
from jaxmed.metrics._segmentation import confusion_matrix, segmentation_scores
from jaxmed.metrics._wsol import BoxAccumulator, MaxBoxAcc, box_hits, max_box_acc

__all__ = ["BoxAccumulator", "MaxBoxAcc", "box_hits", "confusion_matrix", "max_box_acc", "ncc",
           "segmentation_scores"]
