"""`jaxmed.data.transforms`: padding to a network's multiple and cropping back."""

import numpy as np
import pytest

from jaxmed.data.transforms import crop_back, pad_to_multiple


def _noise(shape):
    return np.random.default_rng(0).normal(size=shape).astype(np.float32)


@pytest.mark.parametrize(
    "shape, multiple", [((5, 7, 9, 2), 4), ((3, 8, 1, 1), (2, 8, 4)), ((17, 11, 13, 3), 8)]
)
def test_pad_crop_round_trip(shape, multiple):
    x = _noise(shape)
    padded, slices = pad_to_multiple(x, multiple)
    multiples = (multiple,) * 3 if isinstance(multiple, int) else multiple
    for axis, m in enumerate(multiples):
        n, p = shape[axis], padded.shape[axis]
        assert p % m == 0 and n <= p < n + m
        before, after = slices[axis].start, p - slices[axis].stop
        assert before == (p - n) // 2 and after - before in (0, 1)
    assert padded.shape[3] == shape[3]
    np.testing.assert_array_equal(crop_back(padded, slices), x)
    batch = np.stack([padded, padded + 1])
    np.testing.assert_array_equal(crop_back(batch, slices), np.stack([x, x + 1]))
