"""The one train/validation split of every system: seeded, stratified when labels are given."""

from __future__ import annotations

from collections.abc import Sequence

import numpy as np

from jaxmed.errors import InputDataError


def train_val_split(count: int, val_fraction: float = 0.2, seed: int = 0, *,
                    labels: Sequence[int] | np.ndarray | None = None
                    ) -> tuple[np.ndarray, np.ndarray]:
    """Indices of `count` examples split into training and validation sets.

    With `labels` (stratified, e.g. by class or group), each group sends
    `round(n * val_fraction)` random members to validation, clamped to `[1, n - 1]` so a group
    with at least 2 members appears in both sets; a group of 1 stays in training (groups are
    drawn in sorted label order). Without labels, `max(1, round(count * val_fraction))`
    examples of one seeded permutation go to validation.

    **Arguments:**

    - `count`: number of examples.
    - `val_fraction`: in `[0, 1)`; 0 gives an empty validation set when stratified.
    - `seed`: seed of the permutation.
    - `labels`: `(count,)` group of each example, or None.

    **Returns:** `(train_idx, val_idx)`, disjoint sorted integer arrays covering `range(count)`.

    **Raises:** `InputDataError` when an unstratified split leaves no training example.
    """
    if not 0.0 <= val_fraction < 1.0:
        raise ValueError(f"val_fraction must be in [0, 1), got {val_fraction}")
    if labels is None:
        order = np.random.default_rng(seed).permutation(count)
        n_val = max(1, int(round(count * val_fraction)))
        if count - n_val < 1:
            raise InputDataError(f"{count} example(s) are too few to hold out {val_fraction:.0%}")
        return np.sort(order[n_val:]), np.sort(order[:n_val])
    labels = np.asarray(labels)
    if labels.shape != (count,):
        raise ValueError(f"labels must have shape ({count},), got {labels.shape}")
    rng = np.random.default_rng(seed)
    train, val = [np.empty(0, np.intp)], [np.empty(0, np.intp)]
    for group in np.unique(labels):
        members = rng.permutation(np.flatnonzero(labels == group))
        n = len(members)
        n_val = 0
        if n >= 2 and val_fraction > 0:
            n_val = min(max(int(np.floor(n * val_fraction + 0.5)), 1), n - 1)
        val.append(members[:n_val])
        train.append(members[n_val:])
    return np.sort(np.concatenate(train)), np.sort(np.concatenate(val))


