"""Mapping-GAN losses against hand-computed numbers and per-sample NumPy/JAX references."""

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from jaxmed.losses import (
    clip_weights,
    critic_loss,
    generator_loss,
    gradient_penalty,
    random_interpolates,
    wasserstein_estimate,
)

NEG = jnp.array([1.0, 2.0, 6.0])  # mean 3
MAPPED = jnp.array([-1.0, 0.5])  # mean -0.25


def test_wasserstein_estimate_and_critic_loss_by_hand():
    assert float(wasserstein_estimate(NEG, MAPPED)) == pytest.approx(3.25)
    # The critic maximises E_neg D - E_pos D(y), so it minimises the negative.
    assert float(critic_loss(NEG, MAPPED)) == pytest.approx(-3.25)


def test_generator_loss_by_hand():
    m = jnp.array([[[1.0], [-2.0]], [[0.0], [3.0]]])  # |M| mean = 6 / 4 = 1.5
    loss, parts = generator_loss(MAPPED, m, l1_weight=10.0)
    assert float(parts["adversarial"]) == pytest.approx(0.25)
    assert float(parts["l1"]) == pytest.approx(1.5)
    assert float(loss) == pytest.approx(0.25 + 15.0)


def _eps(key, shape):
    """The documented draw: one U(0, 1) per sample, broadcast over the rest."""
    return np.asarray(jax.random.uniform(key, (shape[0],) + (1,) * (len(shape) - 1)))


def test_interpolates_use_one_eps_per_sample():
    shape, key = (6, 3, 4, 2), jax.random.key(3)
    real, fake = jnp.ones(shape), jnp.zeros(shape)
    x_hat = np.asarray(random_interpolates(real, fake, key))  # == eps broadcast
    per_sample = x_hat.reshape(shape[0], -1)
    np.testing.assert_array_equal(per_sample, per_sample[:, :1] * np.ones_like(per_sample))
    assert len(np.unique(per_sample[:, 0])) == shape[0]  # different samples, different eps
    assert np.all((per_sample >= 0) & (per_sample < 1))
    r, f = np.random.default_rng(0).normal(size=(2, *shape)).astype(np.float32)
    eps = _eps(key, shape)
    np.testing.assert_allclose(
        random_interpolates(jnp.asarray(r), jnp.asarray(f), key),
        eps * r + (1 - eps) * f,
        rtol=1e-6,
        atol=1e-6,
    )


def test_gradient_penalty_linear_critic_is_exact():
    rng = np.random.default_rng(1)
    w = rng.normal(size=(5, 4, 1)).astype(np.float32)
    critic = lambda v: jnp.sum(v * w, axis=(1, 2, 3)) + 0.7  # noqa: E731 -- grad = w everywhere
    real, fake = (jnp.asarray(rng.normal(size=(3, 5, 4, 1)), jnp.float32) for _ in range(2))
    expected = 10.0 * (np.linalg.norm(w) - 1.0) ** 2
    got = gradient_penalty(critic, real, fake, jax.random.key(0))
    np.testing.assert_allclose(got, expected, rtol=1e-5)
    np.testing.assert_allclose(gradient_penalty(critic, real, fake, jax.random.key(0), weight=2.5),
                               expected / 4, rtol=1e-5)


def test_gradient_penalty_nonlinear_critic_matches_per_sample_loop():
    rng = np.random.default_rng(2)
    shape = (4, 3, 3, 2)
    w1 = jnp.asarray(rng.normal(size=(2, 5)), jnp.float32)
    w2 = jnp.asarray(rng.normal(size=(5,)), jnp.float32)

    def one_score(v):  # v: [3, 3, 2], one sample
        return jnp.sum(jnp.tanh(v @ w1) @ w2) + jnp.sum(v**2) * 0.1

    critic = jax.vmap(one_score)
    real, fake = (rng.normal(size=shape).astype(np.float32) for _ in range(2))
    key = jax.random.key(7)
    eps = _eps(key, shape)
    norms = []
    for b in range(shape[0]):  # one sample at a time, gradient of that sample's own score
        x_hat = eps[b] * real[b] + (1 - eps[b]) * fake[b]
        norms.append(
            np.linalg.norm(np.asarray(jax.grad(one_score)(jnp.asarray(x_hat)), np.float64))
        )
    expected = 10.0 * np.mean((np.array(norms) - 1.0) ** 2)
    got = jax.jit(gradient_penalty, static_argnums=0)(
        critic, jnp.asarray(real), jnp.asarray(fake), key
    )
    np.testing.assert_allclose(got, expected, rtol=1e-5)


def test_gradient_penalty_param_gradients_finite_even_for_flat_critic():
    real, fake = jnp.ones((2, 3, 3, 1)), jnp.zeros((2, 3, 3, 1))

    def penalty(theta):
        # theta = 0 makes the critic constant: zero input gradient, where a bare sqrt gives NaN.
        return gradient_penalty(
            lambda v: theta * jnp.sum(v**2, axis=(1, 2, 3)), real, fake, jax.random.key(0)
        )

    assert float(penalty(0.0)) == pytest.approx(10.0)
    for theta in (0.0, 0.3):
        assert np.isfinite(jax.grad(penalty)(theta))


def test_gradient_penalty_bfloat16_inputs_finite():
    real = jnp.ones((2, 4, 4, 1), jnp.bfloat16)
    got = gradient_penalty(
        lambda v: jnp.sum(jnp.sin(v), axis=(1, 2, 3)), real, -real, jax.random.key(1)
    )
    assert got.dtype == jnp.float32 and np.isfinite(got)


def test_clip_weights_bounds_every_leaf():
    params = {
        "a": jnp.array([-1.0, 0.005, 2.0]),
        "b": {"c": jnp.full((2, 2), -0.5), "d": jnp.array(0.003)},
    }
    clipped = clip_weights(params, clip=0.01)
    assert jax.tree.structure(clipped) == jax.tree.structure(params)
    for leaf in jax.tree.leaves(clipped):
        assert float(jnp.max(jnp.abs(leaf))) <= 0.01
    np.testing.assert_allclose(clipped["a"], [-0.01, 0.005, 0.01])
    np.testing.assert_allclose(clipped["b"]["d"], 0.003)
