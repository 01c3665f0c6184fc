"""Evaluation over a held-out set: padded, sharded over the mesh, every host its own share.

Every system validates the same way: its `eval_step(state, batch)` returns per-example outputs
(`[B, ...]`: class scores, confusion matrices, maps), `evaluate_batches` runs it in jitted
global batches split over all devices, and the system reduces the outputs to metrics on the
host. The held-out examples are spread over processes in contiguous shares (`host_share`), so
each host reads and decodes only its own files; the last batch is padded by repeating rows,
and padded rows are marked invalid and dropped, so every batch has one shape and compiles once.
"""

from __future__ import annotations

import functools
from collections.abc import Callable, Iterator, Mapping
from typing import Any

import jax
import numpy as np
from jax.experimental import multihost_utils
from jax.sharding import Mesh

from jaxmed.training._mesh import batch_sharding, make_mesh, replicated_sharding, shard_batch

EvalStep = Callable[[Any, Mapping[str, jax.Array]], Mapping[str, jax.Array]]

# Batch entries added by `evaluate_batches`: the example's global index (-1 for padding).
INDEX = "index"


def host_share(count: int, process_index: int | None = None,
               process_count: int | None = None) -> slice:
    """The contiguous rows `[start, stop)` of `count` examples that this process evaluates
    (`np.array_split`'s shares: the first `count % P` processes hold one more)."""
    p = jax.process_index() if process_index is None else process_index
    n = jax.process_count() if process_count is None else process_count
    base, extra = divmod(count, n)
    start = p * base + min(p, extra)
    return slice(start, start + base + (p < extra))


@functools.cache
def _compiled(eval_step: EvalStep, mesh: Mesh):
    def step(state, batch):
        return {**eval_step(state, batch), INDEX: batch[INDEX]}

    return jax.jit(step, in_shardings=(replicated_sharding(mesh), batch_sharding(mesh)),
                   out_shardings=batch_sharding(mesh))


def evaluate_batches(eval_step: EvalStep, state: Any, local: Mapping[str, np.ndarray], *,
                     count: int, batch_size: int, mesh: Mesh | None = None
                     ) -> Iterator[dict[str, np.ndarray]]:
    """Run `eval_step` over every held-out example; yield each batch's valid outputs.

    **Arguments:**

    - `eval_step`: `(state, batch) -> {name: [B, ...]}`, pure (jitted here, cached per
      function and mesh). `batch` holds the arrays of `local` plus `'index'` `[B]` int32,
      the global example index, -1 on padded rows.
    - `state`: the replicated train state.
    - `local`: this process's share of the examples (`host_share(count)` of each array),
      numpy arrays with a common leading length.
    - `count`: the number of examples over all processes.
    - `batch_size`: the global batch; divisible by the device count.

    **Yields:** per batch, `{name: [n, ...]}` numpy arrays of the valid examples only (every
    process gets all of them), including `'index'`, so outputs can be matched to examples.
    """
    mesh = make_mesh() if mesh is None else mesh
    processes = jax.process_count()
    if batch_size % mesh.size:
        raise ValueError(f"evaluation batch {batch_size} is not divisible by the "
                         f"{mesh.size} devices")
    share = host_share(count)
    lengths = {len(v) for v in local.values()}
    if lengths != {share.stop - share.start}:
        raise ValueError(f"this process holds {sorted(lengths)} examples, its share of "
                         f"{count} is {share.stop - share.start}")
    per_host = batch_size // processes
    largest = host_share(count, 0).stop  # process 0's share is never smaller
    steps = -(-largest // per_host)
    index = np.arange(share.start, share.stop, dtype=np.int32)
    step_fn = _compiled(eval_step, mesh)
    for b in range(steps):
        rows = np.arange(b * per_host, (b + 1) * per_host)
        valid = rows < len(index)
        take = np.minimum(rows, max(len(index) - 1, 0))
        if len(index):
            batch = {k: np.asarray(v)[take] for k, v in local.items()}
        else:  # a process with no example (fewer examples than processes)
            batch = {k: np.zeros((per_host, *np.shape(v)[1:]), np.asarray(v).dtype)
                     for k, v in local.items()}
        batch[INDEX] = np.where(valid, index[take] if len(index) else -1, -1).astype(np.int32)
        host = _gather(step_fn(state, shard_batch(batch, mesh)), processes)
        keep = host[INDEX] >= 0
        yield {k: v[keep] for k, v in host.items()}


def evaluate(eval_step: EvalStep, state: Any, local: Mapping[str, np.ndarray], *,
             count: int, batch_size: int, mesh: Mesh | None = None) -> dict[str, np.ndarray]:
    """`evaluate_batches`' outputs of all examples, concatenated in example order:
    `{name: [count, ...]}` on every process."""
    parts = list(evaluate_batches(eval_step, state, local, count=count, batch_size=batch_size,
                                  mesh=mesh))
    joined = {k: np.concatenate([p[k] for p in parts]) for k in parts[0]}
    order = np.argsort(joined[INDEX], kind="stable")
    return {k: v[order] for k, v in joined.items()}


def _gather(outputs: dict[str, jax.Array], processes: int) -> dict[str, np.ndarray]:
    if processes == 1:
        return {k: np.asarray(v) for k, v in outputs.items()}
    return {k: np.asarray(v) for k, v in
            multihost_utils.process_allgather(outputs, tiled=True).items()}
