"""`jaxmed.data.split.train_val_split`: stratified and plain seeded splits."""

import numpy as np
import pytest

from jaxmed.data.split import train_val_split
from jaxmed.errors import InputDataError


def test_stratified_split_proportions_and_determinism():
    labels = np.array([1] * 50 + [0] * 30)
    np.random.default_rng(3).shuffle(labels)
    train, val = train_val_split(len(labels), 0.2, seed=7, labels=labels)
    assert np.intersect1d(train, val).size == 0
    np.testing.assert_array_equal(np.sort(np.concatenate([train, val])), np.arange(80))
    assert (labels[val] == 1).sum() == 10 and (labels[val] == 0).sum() == 6
    again = train_val_split(len(labels), 0.2, seed=7, labels=labels)
    np.testing.assert_array_equal(again[1], val)
    other = train_val_split(len(labels), 0.2, seed=8, labels=labels)
    assert not np.array_equal(other[1], val)


def test_stratified_split_small_groups():
    train, val = train_val_split(6, 0.2, seed=0, labels=[1, 1, 0, 0, 0, 2])
    labels = np.array([1, 1, 0, 0, 0, 2])
    for group in (0, 1):
        assert group in labels[train] and group in labels[val]
    assert 2 in labels[train] and 2 not in labels[val]
    train, val = train_val_split(4, 0.0, labels=[0, 1, 0, 1])
    assert val.size == 0 and train.size == 4


def test_plain_split_holds_out_a_rounded_fraction_of_one_permutation():
    train, val = train_val_split(10, 0.25, seed=3)
    order = np.random.default_rng(3).permutation(10)
    np.testing.assert_array_equal(val, np.sort(order[:2]))  # round(2.5) = 2
    np.testing.assert_array_equal(train, np.sort(order[2:]))
    assert len(train_val_split(10, 0.0, seed=3)[1]) == 1  # at least one held out


def test_plain_split_refuses_to_leave_no_training_example():
    with pytest.raises(InputDataError, match="too few"):
        train_val_split(1, 0.5)
