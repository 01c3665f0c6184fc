"""Device mesh and the two placements a data-parallel run needs.

Every array in a run is either *replicated* (train state, metrics) or
*sharded along the batch* (input batches). The mesh has one axis, ``'data'``,
over all devices of all processes; each process owns one contiguous block of
it, so the rows a host loads land at the same place in the global batch as in
a single-process run.
"""

from __future__ import annotations

from typing import Any

import jax
import numpy as np
from jax.sharding import AxisType, Mesh, NamedSharding
from jax.sharding import PartitionSpec as P

DATA_AXIS = "data"


def make_mesh(axis: str = DATA_AXIS) -> Mesh:
    """A 1-D mesh over every device of every process.

    **Arguments:**

    - `axis`: name of the data-parallel mesh axis.

    **Returns:** a `Mesh` of shape `(jax.device_count(),)` whose axis is `Auto`
    (XLA propagates shardings), with each process's devices contiguous and in
    process order.
    """
    mesh = jax.make_mesh((jax.device_count(),), (axis,), (AxisType.Auto,))
    if _processes_contiguous(mesh.devices.ravel()):
        return mesh
    # make_mesh may interleave hosts for a faster ring; the row-block layout of
    # global batches (host p holds rows [p*B/P, (p+1)*B/P)) needs them in order.
    devices = sorted(jax.devices(), key=lambda d: (d.process_index, d.id))
    return Mesh(np.array(devices), (axis,), axis_types=(AxisType.Auto,))


def _processes_contiguous(devices) -> bool:
    owners = [d.process_index for d in devices]
    blocks = [p for i, p in enumerate(owners) if i == 0 or owners[i - 1] != p]
    return blocks == sorted(set(owners))


def batch_sharding(mesh: Mesh) -> NamedSharding:
    """Leading (batch) axis split over the mesh's data axis."""
    return NamedSharding(mesh, P(mesh.axis_names[0]))


def replicated_sharding(mesh: Mesh) -> NamedSharding:
    """A full copy on every device."""
    return NamedSharding(mesh, P())


def shard_batch(local_batch: Any, mesh: Mesh) -> Any:
    """Assemble host-local rows into global batch arrays.

    **Arguments:**

    - `local_batch`: pytree of numpy arrays `[B / P, ...]`, this process's rows
      (P = process count).
    - `mesh`: mesh from `make_mesh`.

    **Returns:** the same pytree of `jax.Array`s `[B, ...]`, split over devices
    along the batch axis; B must be divisible by the number of devices.
    """
    sharding = batch_sharding(mesh)
    return jax.tree.map(
        lambda x: jax.make_array_from_process_local_data(sharding, np.asarray(x)),
        local_batch)


def replicate(tree: Any, mesh: Mesh) -> Any:
    """Copy a pytree (same values on every process) to every device of `mesh`.

    **Arguments:**

    - `tree`: pytree of numpy or jax arrays, identical on all processes.

    **Returns:** the pytree as fully replicated global `jax.Array`s.
    """
    sharding = replicated_sharding(mesh)

    def place(x):
        x = np.asarray(x)
        return jax.make_array_from_process_local_data(sharding, x, x.shape)

    return jax.tree.map(place, tree)


def fetch(tree: Any) -> Any:
    """Host copy of a pytree of replicated arrays (also in multi-process runs).

    **Returns:** the pytree with numpy arrays (0-d for scalars).
    """
    def to_host(x):
        if isinstance(x, jax.Array):
            return np.asarray(x.addressable_data(0))
        return np.asarray(x)

    return jax.tree.map(to_host, tree)
