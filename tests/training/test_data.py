"""Input pipeline: deterministic order, per-host rows, exact resume."""

import itertools

import numpy as np
import pytest

from jaxmed.training import ArraySource, make_batches

N, B = 20, 8


def _source():
    return ArraySource(index=np.arange(N), image=np.arange(N * 3, dtype=np.float32).reshape(N, 3))


def _jitter(example, rng):
    return {**example, "image": example["image"] + rng.normal(size=3).astype(np.float32)}


def _take(dataset, n, state=None):
    it = iter(dataset)
    if state is not None:
        it.set_state(state)
    return [next(it) for _ in range(n)]


def test_every_epoch_is_a_new_permutation_of_all_examples():
    batches = _take(make_batches(_source(), 4, seed=3), 10)  # 40 examples = 2 epochs
    order = np.concatenate([b["index"] for b in batches])
    first, second = order[:N], order[N:]
    assert sorted(first) == list(range(N)) and sorted(second) == list(range(N))
    assert not np.array_equal(first, second)
    assert not np.array_equal(first, np.arange(N))


def test_same_seed_same_batches_other_seed_other_order():
    a = _take(make_batches(_source(), B, seed=1, transform=_jitter), 5)
    b = _take(make_batches(_source(), B, seed=1, transform=_jitter), 5)
    c = _take(make_batches(_source(), B, seed=2, transform=_jitter), 5)
    for x, y in zip(a, b):
        np.testing.assert_array_equal(x["index"], y["index"])
        np.testing.assert_array_equal(x["image"], y["image"])
    assert any(not np.array_equal(x["index"], z["index"]) for x, z in zip(a, c))


def test_hosts_take_contiguous_row_blocks_of_the_global_batch():
    """Host p of P loads rows [p*B/P, (p+1)*B/P): their concatenation is the
    single-process batch, augmentation included."""
    single = _take(make_batches(_source(), B, seed=5, transform=_jitter,
                                process_index=0, process_count=1), 6)
    hosts = [_take(make_batches(_source(), B, seed=5, transform=_jitter,
                                process_index=p, process_count=4), 6) for p in range(4)]
    for step, whole in enumerate(single):
        for key in ("index", "image"):
            joined = np.concatenate([hosts[p][step][key] for p in range(4)])
            np.testing.assert_array_equal(joined, whole[key])
        assert hosts[1][step]["index"].shape == (B // 4,)


def test_iterator_state_resumes_the_exact_sequence():
    dataset = make_batches(_source(), B, seed=7, transform=_jitter)
    uninterrupted = _take(dataset, 9)
    it = iter(dataset)
    for _ in range(4):
        next(it)
    state = it.get_state()
    resumed = _take(dataset, 5, state=state)
    for x, y in zip(resumed, uninterrupted[4:]):
        np.testing.assert_array_equal(x["index"], y["index"])
        np.testing.assert_array_equal(x["image"], y["image"])


def test_one_unshuffled_epoch_drops_the_incomplete_batch():
    batches = list(make_batches(_source(), B, seed=0, shuffle=False, num_epochs=1))
    assert len(batches) == N // B
    np.testing.assert_array_equal(np.concatenate([b["index"] for b in batches]),
                                  np.arange(N // B * B))


def test_batch_size_must_divide_over_hosts():
    with pytest.raises(ValueError, match="divisible"):
        make_batches(_source(), 6, seed=0, process_index=0, process_count=4)


def test_array_source_checks_lengths():
    with pytest.raises(ValueError, match="length"):
        ArraySource(a=np.zeros(3), b=np.zeros(4))
    assert list(itertools.islice(ArraySource(a=np.arange(2))[1].items(), 1)) == [("a", 1)]
