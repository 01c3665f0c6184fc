"""The whole-slide feature network: ResNet-18 with spatial attention after the stem and the
last layer."""

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from jaxmed.models.attention_resnet import AttentionResNet, AttentionResNet18

# torchvision's resnet18 without its fc layer (11 689 512 - 513 000), plus two spatial
# attention modules (a 7x7x2 kernel and a BatchNorm scale and bias each).
RESNET18_FEATURES = 11_176_512
ATTENTION = 2 * (7 * 7 * 2 + 2)


def _count(params):
    return sum(int(np.prod(p.shape)) for p in jax.tree.leaves(params))


def test_seed_sizes_by_eval_shape():
    model = AttentionResNet18(num_classes=3)
    x = jnp.zeros((4, 576, 576, 3))
    variables = jax.eval_shape(model.init, jax.random.PRNGKey(0), x)
    head = 512 * 256 + 256 + 256 * 3 + 3
    assert _count(variables["params"]) == RESNET18_FEATURES + ATTENTION + head
    out = jax.eval_shape(lambda v, x: model.apply(v, x), variables, x)
    assert out["features"].shape == (4, 512)
    assert out["score"].shape == (4,)
    assert out["attention"].shape == (4, 18, 18, 1)
    assert out["logits"].shape == (4, 3)
    features_only = AttentionResNet18()
    out = jax.eval_shape(lambda v, x: features_only.apply(v, x),
                         {**variables, "params": {k: v for k, v in variables["params"].items()
                                                  if k not in ("hidden", "head")}}, x)
    assert "logits" not in out


def _small(**kw):
    return AttentionResNet18(width=4, num_classes=3, hidden=8, **kw)


def test_score_is_the_mean_of_the_last_attention_map():
    model = _small()
    x = jax.random.normal(jax.random.PRNGKey(1), (2, 64, 64, 3))
    variables = jax.jit(model.init)(jax.random.PRNGKey(0), x)
    apply = jax.jit(model.apply)
    # At initialisation the attention BatchNorm scales are 0: the gate is sigmoid(0) = 0.5.
    out = apply(variables, x)
    np.testing.assert_allclose(out["score"], 0.5, rtol=1e-6)
    # With a moved scale the map depends on the image and the score is its mean.
    params = jax.tree_util.tree_map_with_path(
        lambda p, v: v + 1.0 if "norm" in jax.tree_util.keystr(p) and "attention" in
        jax.tree_util.keystr(p) and "scale" in jax.tree_util.keystr(p) else v,
        variables["params"])
    out = apply({**variables, "params": params}, x)
    a = np.asarray(out["attention"])
    assert a.shape == (2, 2, 2, 1) and a.std() > 0
    np.testing.assert_allclose(out["score"], a.mean(axis=(1, 2, 3)), rtol=1e-6)
    assert np.all((a > 0) & (a < 1))


def test_features_are_the_pooled_gated_last_layer():
    model = _small()
    x = jax.random.normal(jax.random.PRNGKey(2), (2, 64, 64, 3))
    variables = jax.jit(model.init)(jax.random.PRNGKey(0), x)
    out, inter = jax.jit(lambda v, x: model.apply(v, x, capture_intermediates=True))(variables, x)
    gated = inter["intermediates"]["attention"]["__call__"][0][0]  # [B, 2, 2, 32]
    np.testing.assert_allclose(out["features"], gated.mean(axis=(1, 2)), rtol=1e-5)
    assert out["features"].shape == (2, 32)


def test_gradients_reach_every_parameter_after_training_moves_the_gates():
    model = _small()
    x = jax.random.normal(jax.random.PRNGKey(3), (4, 32, 32, 3))
    labels = jnp.array([0, 1, 2, 0])
    variables = jax.jit(model.init)(jax.random.PRNGKey(0), x)
    params = jax.tree.map(lambda v: v, variables["params"])
    params["attention"]["norm"]["scale"] = jnp.ones_like(params["attention"]["norm"]["scale"])

    def loss(p):
        out, _ = model.apply({"params": p, "batch_stats": variables["batch_stats"]}, x,
                             train=True, mutable=["batch_stats"])
        logp = jax.nn.log_softmax(out["logits"])
        return -jnp.mean(logp[jnp.arange(4), labels]) + out["score"].mean()

    loss = jax.jit(loss)
    grads = jax.jit(jax.grad(loss))(params)
    assert all(np.all(np.isfinite(g)) for g in jax.tree.leaves(grads))
    assert float(jnp.abs(grads["attention"]["conv"]["kernel"]).sum()) > 0
    assert float(jnp.abs(grads["layer1"]["block0"]["conv1"]["kernel"]).sum()) > 0
    # Finite differences on one entry of the last attention kernel.
    eps = 1e-3
    bumped = jax.tree.map(lambda v: v, params)
    kernel = params["attention"]["conv"]["kernel"]
    bumped["attention"]["conv"]["kernel"] = kernel.at[3, 3, 0, 0].add(eps)
    lowered = jax.tree.map(lambda v: v, params)
    lowered["attention"]["conv"]["kernel"] = kernel.at[3, 3, 0, 0].add(-eps)
    numeric = (loss(bumped) - loss(lowered)) / (2 * eps)
    np.testing.assert_allclose(grads["attention"]["conv"]["kernel"][3, 3, 0, 0], numeric,
                               rtol=2e-2, atol=1e-4)


@pytest.mark.parametrize("shape", [(2, 32, 32, 3), (1, 16, 32, 32, 1)])
def test_bfloat16_and_3d(shape):
    model = _small(dtype=jnp.bfloat16)
    x = jnp.ones(shape)
    variables = jax.jit(model.init)(jax.random.PRNGKey(0), x)
    out = jax.jit(model.apply)(variables, x)
    assert out["features"].dtype == jnp.bfloat16
    assert out["score"].dtype == jnp.float32
    assert out["logits"].shape == (shape[0], 3)


def test_stage_sizes_are_checked():
    with pytest.raises(ValueError, match="4 layers"):
        AttentionResNet(stage_sizes=(2, 2, 2)).init(jax.random.PRNGKey(0),
                                                    jnp.zeros((1, 32, 32, 3)))
