"""`transfer_matching`: a warm start copies the arrays two networks share, by path."""

import jax.numpy as jnp
import numpy as np
import pytest

from jaxmed.errors import InputDataError
from jaxmed.training import transfer_matching


def _tree(conv, extra=None):
    params = {"conv": {"kernel": conv}, "classifier": {"kernel": jnp.ones((4, 2))}}
    if extra is not None:
        params["module"] = {"kernel": extra}
    return {"params": params, "batch_stats": {"conv": {"mean": jnp.full((4,), 3.0)}}}


def test_shared_paths_are_copied_and_new_ones_kept():
    target = _tree(jnp.zeros((3, 3, 1, 4)), extra=jnp.full((4, 4), 7.0))
    source = _tree(jnp.arange(36.0).reshape(3, 3, 1, 4))
    source["params"]["only_in_source"] = {"bias": jnp.ones(5)}
    source["batch_stats"]["conv"]["mean"] = jnp.full((4,), -1.0)
    merged, copied, kept = transfer_matching(target, source)
    assert sorted(copied) == ["batch_stats/conv/mean", "params/classifier/kernel",
                              "params/conv/kernel"]
    assert kept == ["params/module/kernel"]
    np.testing.assert_array_equal(merged["params"]["conv"]["kernel"],
                                  source["params"]["conv"]["kernel"])
    np.testing.assert_array_equal(merged["batch_stats"]["conv"]["mean"], -1.0)
    np.testing.assert_array_equal(merged["params"]["module"]["kernel"], 7.0)
    assert "only_in_source" not in merged["params"]


def test_dtype_follows_the_target_and_empty_collections_survive():
    target = {"params": {"w": jnp.zeros((2,), jnp.bfloat16)}, "batch_stats": {}}
    merged, copied, _ = transfer_matching(target, {"params": {"w": jnp.array([1.5, 2.5])}})
    assert merged["params"]["w"].dtype == jnp.bfloat16 and copied == ["params/w"]
    np.testing.assert_array_equal(np.asarray(merged["params"]["w"], np.float32), [1.5, 2.5])
    assert merged["batch_stats"] == {}


def test_shape_mismatch_names_the_source_and_the_path():
    with pytest.raises(InputDataError, match=r"run7: params/conv/kernel has shape \(3, 3, 1, 8\)"):
        transfer_matching(_tree(jnp.zeros((3, 3, 1, 4))), _tree(jnp.zeros((3, 3, 1, 8))),
                          source_name="run7")


def test_nothing_shared_is_an_error():
    with pytest.raises(InputDataError, match="shares no parameter"):
        transfer_matching({"params": {"a": jnp.zeros(2)}}, {"params": {"b": jnp.zeros(2)}})
