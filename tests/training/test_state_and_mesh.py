"""Train state (several optimisers, per-step keys), mesh helpers, CLI options."""

import argparse
import types

import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest

from jaxmed.training import (
    TrainState,
    add_training_args,
    fetch,
    fit_options,
    init_distributed,
    make_mesh,
    replicate,
    shard_batch,
)
from jaxmed.training._mesh import _processes_contiguous


def _gan_state():
    params = {"generator": {"w": jnp.ones(3)}, "critic": {"w": jnp.ones(2)}}
    tx = {"generator": optax.adam(0.1), "critic": optax.sgd(0.5)}
    return TrainState.create(params=params, tx=tx, rng=jax.random.PRNGKey(3)), tx


def test_several_optimisers_update_only_their_network():
    state, tx = _gan_state()
    new = state.apply_gradients(tx["critic"], {"w": jnp.array([1.0, -2.0])}, network="critic")
    np.testing.assert_allclose(new.params["critic"]["w"], [0.5, 2.0])  # sgd: w - 0.5 g
    np.testing.assert_array_equal(new.params["generator"]["w"], state.params["generator"]["w"])
    assert new.opt_state["generator"] is state.opt_state["generator"]
    assert int(new.step) == 0  # the loop, not the update, counts steps
    assert new.batch_stats == {}


def test_step_key_is_fold_in_of_the_step():
    state, _ = _gan_state()
    state = state.replace(step=jnp.array(7, jnp.int32))
    np.testing.assert_array_equal(state.step_key(),
                                  jax.random.fold_in(jax.random.PRNGKey(3), 7))
    assert not np.array_equal(state.step_key(), state.replace(step=state.step + 1).step_key())


def test_process_blocks_must_be_contiguous_and_ordered():
    dev = lambda p: types.SimpleNamespace(process_index=p)
    assert _processes_contiguous([dev(0), dev(0), dev(1), dev(1)])
    assert not _processes_contiguous([dev(0), dev(1), dev(0), dev(1)])
    assert not _processes_contiguous([dev(1), dev(1), dev(0), dev(0)])


def test_batch_is_split_and_state_replicated():
    mesh = make_mesh()
    n = jax.device_count()
    batch = shard_batch({"x": np.arange(2 * n * 3).reshape(2 * n, 3)}, mesh)
    assert batch["x"].shape == (2 * n, 3)
    assert len(batch["x"].sharding.device_set) == n
    assert batch["x"].addressable_shards[0].data.shape == (2, 3)
    state = replicate({"w": np.ones(4, np.float32)}, mesh)
    assert state["w"].sharding.is_fully_replicated
    np.testing.assert_array_equal(fetch(state)["w"], np.ones(4))


def test_common_options_and_fit_arguments():
    parser = add_training_args(argparse.ArgumentParser(), workdir="runs/x", steps=10,
                               batch_size=4, eval_every=0)
    args = parser.parse_args(["--steps", "20", "--keep", "5", "--no-progress"])
    options = fit_options(args)
    assert options == dict(workdir="runs/x", num_steps=20, log_every=50,
                           checkpoint_every=500, eval_every=20, keep=5, progress=False)
    assert args.batch_size == 4 and args.seed == 0 and args.coordinator_address is None
    init_distributed(args)  # single process: nothing to do
    with pytest.raises(SystemExit, match="coordinator"):
        init_distributed(parser.parse_args(["--num-processes", "2"]))
