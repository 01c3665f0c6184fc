"""Input pipeline: deterministic, resumable, per-host global batches (grain).

Order is defined on *global* example indices, independent of the number of
processes: each epoch is a seeded permutation of `range(len(source))` (a new
one per epoch), consecutive runs of B indices form global batch 0, 1, ...,
and process p of P loads rows [p*B/P, (p+1)*B/P) of each. `shard_batch` then
assembles exactly the global batch a single-process run would see. The
iterator state (a small JSON dict) is saved in every checkpoint.
"""

from __future__ import annotations

from typing import Callable, Mapping, Protocol

import grain
import jax
import numpy as np

Example = Mapping[str, np.ndarray]
Transform = Callable[[Example, np.random.Generator], Example]


class RandomAccessSource(Protocol):
    """What `make_batches` reads: `len(source)` and `source[i]` -> dict."""

    def __len__(self) -> int: ...

    def __getitem__(self, index: int) -> Example: ...


class ArraySource:
    """A random-access source over equal-length in-memory arrays.

    **Arguments:**

    - `**arrays`: named arrays sharing their leading length N, e.g.
      `images=[N, H, W, C]`, `labels=[N]`.

    `source[i]` returns `{name: array[i]}`.
    """

    def __init__(self, **arrays: np.ndarray):
        lengths = {len(a) for a in arrays.values()}
        if len(lengths) != 1:
            raise ValueError(f"arrays differ in length: { {k: len(v) for k, v in arrays.items()} }")
        self.arrays = arrays
        self._length = lengths.pop()

    def __len__(self) -> int:
        return self._length

    def __getitem__(self, index: int) -> Example:
        return {name: a[index] for name, a in self.arrays.items()}


def make_batches(source: RandomAccessSource, global_batch_size: int, *,
                 seed: int, shuffle: bool = True, num_epochs: int | None = None,
                 transform: Transform | None = None,
                 process_index: int | None = None,
                 process_count: int | None = None,
                 num_threads: int = 2, prefetch: int = 4) -> grain.IterDataset:
    """This host's rows of every global batch, as a checkpointable grain dataset.

    **Arguments:**

    - `source`: random-access examples (dicts of numpy arrays).
    - `global_batch_size`: B, summed over all processes; divisible by P.
    - `seed`: shuffling and augmentation seed.
    - `shuffle`: permute examples (a new permutation every epoch).
    - `num_epochs`: None repeats forever (training); 1 for one pass
      (evaluation). Batches span epoch boundaries; an incomplete last batch
      is dropped.
    - `transform`: optional host-side augmentation `(example, rng) -> example`;
      `rng` is seeded by (seed, global batch index, row in global batch), so
      it is identical whatever the process count and after a resume.
    - `process_index`, `process_count`: default to `jax.process_index()` and
      `jax.process_count()`.
    - `num_threads`, `prefetch`: grain read threads and batches read ahead.

    **Returns:** a `grain.IterDataset` whose elements are dicts of stacked
    arrays `[B / P, ...]`; its iterators have `get_state()`/`set_state()`.
    """
    p = jax.process_index() if process_index is None else process_index
    n_proc = jax.process_count() if process_count is None else process_count
    if global_batch_size % n_proc:
        raise ValueError(f"global batch size {global_batch_size} is not divisible "
                         f"by the process count {n_proc}")
    local = global_batch_size // n_proc
    order = grain.MapDataset.range(len(source))
    if shuffle:
        order = order.shuffle(seed=seed)  # reseeded with the epoch number
    batches = order.repeat(num_epochs).batch(global_batch_size,
                                             drop_remainder=True)
    rows = slice(p * local, (p + 1) * local)

    def load(batch_index: int, indices: np.ndarray) -> dict[str, np.ndarray]:
        examples = [source[int(i)] for i in indices[rows]]
        if transform is not None:
            examples = [
                transform(ex, np.random.default_rng([seed, batch_index, p * local + j]))
                for j, ex in enumerate(examples)]
        return {k: np.stack([ex[k] for ex in examples]) for k in examples[0]}

    options = grain.ReadOptions(num_threads=num_threads, prefetch_buffer_size=prefetch)
    return batches.map_with_index(load).to_iter_dataset(options)
