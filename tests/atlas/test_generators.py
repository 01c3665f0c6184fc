"""Per-node generators: vmap over nodes equals a loop, per-node learning (WGAN-GP and VAE),
shapes, the critic's per-sample independence, the crop batches, and resume through `fit`."""

import functools

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from jaxmed import training
from jaxmed.atlas.generators import (
    CropCritic,
    CropDecoder,
    GeneratorConfig,
    NodeConv,
    NodeGenerators,
    crop_batches,
    node_keys,
    shifted_conv,
    to_uint8,
    upsampling_stages,
)
from jaxmed.layers import Conv, conv
from jaxmed.training import fit, make_mesh

CROP = 12
COLOURS = np.array([[220, 30, 30], [30, 220, 30], [30, 30, 220]], np.float32)  # node n's colour
BATCH = 8


def _libraries(sizes=(40, 40, 40), seed=0):
    """Node n's library: `sizes[n]` crops of colour `COLOURS[n]` plus pixel noise."""
    rng = np.random.default_rng(seed)
    return [np.clip(COLOURS[n] + rng.normal(0, 20, (size, CROP, CROP, 3)), 0, 255)
            .astype(np.uint8) for n, size in enumerate(sizes)]


def _system(kind, **overrides):
    options = dict(kind=kind, crop_size=CROP, width=8, latent_dim=4, critic_steps=2,
                   learning_rate=2e-3 if kind == "wgan-gp" else 3e-3)
    return NodeGenerators(GeneratorConfig(**{**options, **overrides}), num_nodes=3)


# XLA:CPU compiles 2-3x faster without LLVM's optimisations; these tiny networks barely run
# slower for it.
_jit = functools.partial(jax.jit, compiler_options={"xla_backend_optimization_level": 0})


@functools.cache
def _compiled(kind):
    """(system, jitted init, jitted step, jitted generate), compiled once per kind."""
    system = _system(kind)
    return system, _jit(system.init_state), _jit(system.train_step), _jit(system.generate)


def _random_batch(libraries, rows, rng):
    """`{'crops': uint8 [rows, N, s, s, 3]}` drawn with replacement from each library."""
    return {"crops": np.stack([lib[rng.integers(0, len(lib), rows)] for lib in libraries],
                              axis=1)}


# ----------------------------------------------------------------------------- vmap = loop


def test_step_over_nodes_equals_each_node_alone():
    """The WGAN-GP (the VAE's step is vmapped by the same `train_step`)."""
    system, init, step, _ = _compiled("wgan-gp")
    state = init()
    batch = _random_batch(_libraries(), BATCH * system.config.minibatches,
                          np.random.default_rng(1))
    new_state, metrics = step(state, batch)

    alone = _jit(system.node_update)
    crops = training.images_to_unit_range(jnp.moveaxis(jnp.asarray(batch["crops"]), 1, 0))
    keys = node_keys(state.step_key(), system.num_nodes)
    losses = []
    for n in range(system.num_nodes):
        node = lambda tree: jax.tree.map(lambda leaf: leaf[n], tree)
        params, opt_state, node_metrics = alone(node(state.params), node(state.opt_state),
                                                crops[n], keys[n])
        jax.tree.map(functools.partial(np.testing.assert_allclose, rtol=2e-4, atol=2e-5),
                     params, node(new_state.params))
        jax.tree.map(functools.partial(np.testing.assert_allclose, rtol=2e-4, atol=2e-5),
                     opt_state, node(new_state.opt_state))
        losses.append(float(node_metrics["loss"]))
    np.testing.assert_allclose(metrics["loss"], np.mean(losses), rtol=1e-4, atol=1e-5)
    np.testing.assert_allclose(metrics["loss_max"], np.max(losses), rtol=1e-4, atol=1e-5)
    # The nodes do start apart (their own initial keys), so the comparison is not vacuous.
    first = state.params["generator"]["project"]["kernel"]
    assert not np.allclose(first[0], first[1])


def test_node_keys_fold_in_the_node_index():
    key = jax.random.PRNGKey(3)
    keys = node_keys(key, 4)
    for n in range(4):
        np.testing.assert_array_equal(keys[n], jax.random.fold_in(key, n))


# ----------------------------------------------------------------------------- learning


@pytest.mark.parametrize("kind,steps", [("wgan-gp", 80), ("vae", 60)])
def test_each_node_learns_its_own_colour(kind, steps):
    system, init, step, generate = _compiled(kind)
    libraries = _libraries()
    state = init()
    z = system.sample_latents(jax.random.PRNGKey(5), 32)
    mean_colour = lambda s: np.asarray(generate(s, z), np.float32).mean(axis=(1, 2, 3))  # [N, 3]
    before = np.linalg.norm(mean_colour(state) - COLOURS, axis=1)
    rng = np.random.default_rng(2)
    for _ in range(steps):
        state, metrics = step(state, _random_batch(libraries, BATCH * system.config.minibatches,
                                                   rng))
    assert np.isfinite(float(metrics["loss"]))
    after_colour = mean_colour(state)
    after = np.linalg.norm(after_colour - COLOURS, axis=1)
    # Per node: far closer to its own colour than at the start, and its colour's channel
    # dominates (a node trained on another node's crops would fail both).
    assert np.all(after < 0.35 * before), (before, after)
    np.testing.assert_array_equal(np.argmax(after_colour, axis=1), [0, 1, 2])


# ----------------------------------------------------------------------------- shapes


@pytest.mark.parametrize("kind", ["wgan-gp", "vae"])
@pytest.mark.parametrize("crop_size", [12, 13, 16, 24])
def test_generate_shapes(kind, crop_size):
    system = NodeGenerators(GeneratorConfig(kind=kind, crop_size=crop_size, width=4,
                                            latent_dim=3), num_nodes=2)
    state = jax.eval_shape(system.init_state)
    assert all(leaf.shape[0] == 2 for leaf in jax.tree.leaves((state.params, state.opt_state)))
    z = jax.ShapeDtypeStruct((2, 5, 3), jnp.float32)
    out = jax.eval_shape(system.generate, state, z)
    assert out.shape == (2, 5, crop_size, crop_size, 3) and out.dtype == jnp.uint8
    node = jax.eval_shape(functools.partial(system.generate_node, node=1), state,
                          z=jax.ShapeDtypeStruct((7, 3), jnp.float32))
    assert node.shape == (7, crop_size, crop_size, 3) and node.dtype == jnp.uint8


def test_upsampling_grid_covers_the_crop_with_little_cut():
    for s in range(8, 130):
        u = upsampling_stages(s)
        grid = -(-s // 2 ** u)
        assert 4 <= grid <= 8 and s <= grid * 2 ** u < s + 2 ** u, s


def test_generate_matches_the_decoder_and_generate_node():
    system, init, _, generate = _compiled("vae")
    state = init()
    z = system.sample_latents(jax.random.PRNGKey(0), 6)
    crops = np.asarray(generate(state, z))
    assert crops.dtype == np.uint8 and crops.shape == (3, 6, CROP, CROP, 3)
    assert crops.max() > crops.min()
    decode = _jit(lambda params, z: CropDecoder(CROP, 8).apply({"params": params}, z))
    one_node = _jit(system.generate_node)
    for n in range(3):
        params = jax.tree.map(lambda leaf: leaf[n], state.params["generator"])
        unit = np.asarray(decode(params, z[n]), np.float64)
        expected = np.clip(np.round((unit + 1) * 127.5), 0, 255)
        assert np.abs(crops[n].astype(np.int64) - expected).max() <= 1
        np.testing.assert_array_equal(one_node(state, n, z[n]), crops[n])


def test_to_uint8_maps_the_unit_range_onto_bytes():
    out = to_uint8(jnp.array([-2.0, -1.0, 0.0, 1.0, 3.0]))
    np.testing.assert_array_equal(out, [0, 0, 128, 255, 255])
    assert out.dtype == jnp.uint8


# ----------------------------------------------------------------------------- networks


@pytest.mark.parametrize("size,stride", [(12, 1), (13, 1), (12, 2), (13, 2), (3, 2)])
def test_shifted_conv_equals_the_convolution(size, stride):
    x = jax.random.normal(jax.random.PRNGKey(0), (2, size, size, 5))
    kernel = jax.random.normal(jax.random.PRNGKey(1), (3, 3, 5, 4))
    expected = conv(x, kernel, stride, precision=jax.lax.Precision.HIGHEST)
    out = shifted_conv(x, kernel, stride)
    assert out.shape == expected.shape
    np.testing.assert_allclose(out, expected, rtol=1e-4, atol=1e-4)


def test_node_conv_has_the_parameters_of_conv():
    x = jnp.ones((1, 8, 8, 3))
    ours = NodeConv(6, strides=2).init(jax.random.PRNGKey(0), x)
    theirs = Conv(6, (3, 3), strides=2).init(jax.random.PRNGKey(0), x)
    jax.tree.map(np.testing.assert_array_equal, ours, theirs)
    np.testing.assert_allclose(NodeConv(6, strides=2).apply(ours, x),
                               Conv(6, (3, 3), strides=2).apply(theirs, x), rtol=1e-5, atol=1e-5)



def test_critic_has_no_cross_sample_coupling():
    """The gradient penalty takes per-sample gradients as the gradient of the summed scores:
    exact only if each score depends on its own crop alone."""
    critic = CropCritic(CROP, 4)
    x = jax.random.uniform(jax.random.PRNGKey(0), (4, CROP, CROP, 3), minval=-1, maxval=1)
    params = _jit(critic.init)(jax.random.PRNGKey(1), x)
    score = lambda v: critic.apply(params, v)

    def gradients_and_scores(x):
        batch_grad = jax.grad(lambda v: jnp.sum(score(v)))(x)
        alone = jax.vmap(jax.grad(lambda v: score(v[None])[0]))(x)  # one crop at a time
        return batch_grad, alone, score(x.at[0].set(0.0)), score(x)

    batch_grad, alone, moved, scores = _jit(gradients_and_scores)(x)
    np.testing.assert_allclose(batch_grad, alone, rtol=1e-5, atol=1e-6)
    # Changing one crop leaves the other scores exactly as they were.
    np.testing.assert_array_equal(moved[1:], scores[1:])
    assert moved[0] != scores[0]


# ----------------------------------------------------------------------------- crop batches


def _take(batches, count):
    it = iter(batches)
    return [next(it)["crops"] for _ in range(count)]


def test_crop_batches_shapes_and_unequal_libraries():
    libraries = _libraries(sizes=(3, 10, 7))
    batches = _take(crop_batches(libraries, 4, seed=0, critic_steps=2), 5)
    assert all(b.shape == (8, 3, CROP, CROP, 3) and b.dtype == np.uint8 for b in batches)
    # One epoch is 10 records (the largest library): every crop of every library is drawn.
    epoch = np.concatenate(_take(crop_batches(libraries, 5, seed=0), 2))  # [10, N, s, s, 3]
    for n, lib in enumerate(libraries):
        drawn = {lib_index for crop in epoch[:, n]
                 for lib_index in np.flatnonzero((lib == crop).all(axis=(1, 2, 3)))}
        assert drawn == set(range(len(lib))), n
        # ... and node n only ever gets its own library's crops.
        assert all((lib == crop).all(axis=(1, 2, 3)).any() for crop in epoch[:, n])


def test_crop_batches_are_determined_by_the_seed():
    libraries = _libraries(sizes=(5, 9, 6))
    first = _take(crop_batches(libraries, 3, seed=4), 4)
    np.testing.assert_array_equal(first, _take(crop_batches(libraries, 3, seed=4), 4))
    assert not np.array_equal(first, _take(crop_batches(libraries, 3, seed=5), 4))


def test_crop_batches_rejects_bad_libraries():
    libraries = _libraries(sizes=(4, 4, 4))
    with pytest.raises(ValueError, match="library 1 is empty"):
        crop_batches([libraries[0], libraries[1][:0], libraries[2]], 2, seed=0)
    with pytest.raises(ValueError, match="library 2 holds crops of shape"):
        crop_batches([libraries[0], libraries[1], libraries[2][:, :8, :8]], 2, seed=0)
    with pytest.raises(ValueError, match="uint8"):
        crop_batches([libraries[0].astype(np.float32)], 2, seed=0)
    with pytest.raises(ValueError, match="no crop libraries"):
        crop_batches([], 2, seed=0)


def test_config_rejects_bad_values():
    with pytest.raises(ValueError, match="kind"):
        GeneratorConfig(kind="gan")
    with pytest.raises(ValueError, match="crop_size"):
        GeneratorConfig(crop_size=6)
    assert GeneratorConfig().rate == 1e-4 and GeneratorConfig(kind="vae").rate == 1e-3
    assert GeneratorConfig().minibatches == 5 and GeneratorConfig(kind="vae").minibatches == 1


def test_a_batch_that_does_not_split_into_critic_minibatches_is_refused():
    system, init, _, _ = _compiled("wgan-gp")
    batch = _random_batch(_libraries(), 5, np.random.default_rng(0))
    with pytest.raises(ValueError, match="critic_steps=2"):
        jax.eval_shape(system.train_step, jax.eval_shape(init), batch)


# ----------------------------------------------------------------------------- resume


def test_resume_through_fit_equals_a_straight_run(tmp_path):
    """The VAE, cheaper to compile; both kinds keep the same kind of state and step keys."""
    system, init, step, _ = _compiled("vae")
    libraries = _libraries(sizes=(6, 9, 5))

    def batches():
        return crop_batches(libraries, BATCH, seed=3, critic_steps=system.config.minibatches)

    mesh = make_mesh()
    run = functools.partial(fit, workdir=str(tmp_path / "run"), init_state=init(),
                            train_step=system.train_step, log_every=1, checkpoint_every=2,
                            mesh=mesh, progress=False)
    run(train_data=batches(), num_steps=4)
    resumed = run(train_data=batches(), num_steps=6)
    assert resumed.step == 6 and "loss_max" in resumed.metrics

    state, it = init(), iter(batches())  # the same six steps without checkpoints
    for _ in range(6):
        state, _ = step(state, next(it))
        state = state.replace(step=state.step + 1)
    jax.tree.map(functools.partial(np.testing.assert_allclose, rtol=1e-5, atol=1e-6),
                 training.fetch(resumed.state), training.fetch(state))
    records = training.read_metrics(str(tmp_path / "run"))
    assert [r["step"] for r in records] == [1, 2, 3, 4, 5, 6]
