"""Reference MaxBoxAcc / MaxBoxAccV2: the WSOL protocol (clovaai/wsolevaluation, BoxEvaluator)
written out image by image and threshold by threshold with OpenCV, as the yardstick for
`jaxmed.metrics._wsol` (tests compare curves; `benchmarks/wsol_metric_speed.py` times both).

Per image: normalise (``m -= m.min(); m /= m.max()`` in float64, constant or NaN → zeros), then
for each τ in ``np.arange(0, 1, interval)``: ``cv2.threshold(uint8(m · 255), int(τ · max),
255, THRESH_BINARY)``, ``cv2.findContours(RETR_TREE, CHAIN_APPROX_SIMPLE)``, the largest contour
by ``cv2.contourArea`` (V1) or all contours (V2), ``cv2.boundingRect`` → ``[x, y, min(x + w,
W - 1), min(y + h, H - 1)]``, ``[0, 0, 0, 0]`` when there is no contour; IoU on inclusive pixels;
correct when the best IoU over (boxes × ground-truth boxes) is ``>= δ``.

Needs OpenCV (``opencv-python-headless``, the test extra); jaxmed itself does not.
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any

import cv2
import numpy as np

from jaxmed.metrics import MaxBoxAcc


def _normalize(cam: np.ndarray) -> np.ndarray:
    cam = np.array(cam, dtype=np.float64)
    # The protocol fails on inf; we zero it.
    if not np.isfinite(cam).all() or cam.min() == cam.max():
        return np.zeros_like(cam)
    cam -= cam.min()
    cam /= cam.max()
    return cam


def _boxes_at(image: np.ndarray, threshold: float, multi_contour: bool) -> np.ndarray:
    height, width = image.shape
    _, binary = cv2.threshold(image, int(threshold * np.max(image)), 255, cv2.THRESH_BINARY)
    contours = cv2.findContours(binary, cv2.RETR_TREE, cv2.CHAIN_APPROX_SIMPLE)[-2]
    if len(contours) == 0:
        return np.array([[0, 0, 0, 0]])
    if not multi_contour:
        contours = [max(contours, key=cv2.contourArea)]
    boxes = []
    for contour in contours:
        x, y, w, h = cv2.boundingRect(contour)
        boxes.append([x, y, min(x + w, width - 1), min(y + h, height - 1)])
    return np.array(boxes)


def _iou(boxes: np.ndarray, gt: np.ndarray) -> np.ndarray:
    """(a, b) IoU on inclusive pixel coordinates."""
    a, b = boxes[:, None, :], gt[None, :, :]
    inter_x = np.minimum(a[..., 2], b[..., 2]) - np.maximum(a[..., 0], b[..., 0]) + 1
    inter_y = np.minimum(a[..., 3], b[..., 3]) - np.maximum(a[..., 1], b[..., 1]) + 1
    inter = np.maximum(0, inter_x) * np.maximum(0, inter_y)
    area_a = (a[..., 2] - a[..., 0] + 1) * (a[..., 3] - a[..., 1] + 1)
    area_b = (b[..., 2] - b[..., 0] + 1) * (b[..., 3] - b[..., 1] + 1)
    union = area_a + area_b - inter
    degenerate = union <= 0
    iou = inter / np.where(degenerate, 1, union)
    iou[degenerate] = 0
    return iou


def _gt_list(gt_boxes: Any, n: int) -> list[np.ndarray]:
    if not isinstance(gt_boxes, (list, tuple)):
        gt_boxes = np.asarray(gt_boxes).reshape(n, -1, 4)
    rows = [np.asarray(b).reshape(-1, 4) for b in gt_boxes]
    return [b[~(b == -1).all(axis=1)] for b in rows]


def reference_box_hits(
    cams: Any,
    gt_boxes: Any,
    *,
    iou_thresholds: Sequence[float] = (0.5, 0.7),
    cam_curve_interval: float = 0.001,
    multi_contour: bool = False,
) -> np.ndarray:
    """`(n_δ, n_τ)` counts of correct images; the loop the protocol runs."""
    cams = np.asarray(cams)
    thresholds = np.arange(0, 1, cam_curve_interval)
    hits = np.zeros((len(iou_thresholds), thresholds.size), np.int64)
    for cam, gt in zip(cams, _gt_list(gt_boxes, len(cams)), strict=True):
        image = (_normalize(cam) * 255).astype(np.uint8)
        best = np.array([_iou(_boxes_at(image, t, multi_contour), gt).max() for t in thresholds])
        for i, delta in enumerate(iou_thresholds):
            hits[i] += best >= delta
    return hits


def reference_max_box_acc(
    cams: Any,
    gt_boxes: Any,
    *,
    iou_thresholds: Sequence[float] = (0.5, 0.7),
    cam_curve_interval: float = 0.001,
    multi_contour: bool = False,
) -> MaxBoxAcc:
    """Same signature and result type as `jaxmed.metrics.max_box_acc`."""
    hits = reference_box_hits(cams, gt_boxes, iou_thresholds=iou_thresholds,
                              cam_curve_interval=cam_curve_interval, multi_contour=multi_contour)
    thresholds = np.arange(0, 1, cam_curve_interval)
    curve = hits * 100.0 / float(len(cams))
    return MaxBoxAcc(
        accuracy={float(d): float(curve[i].max()) for i, d in enumerate(iou_thresholds)},
        best_threshold={float(d): float(thresholds[curve[i].argmax()])
                        for i, d in enumerate(iou_thresholds)},
        curve=curve,
        thresholds=thresholds,
        num_images=len(cams),
    )
