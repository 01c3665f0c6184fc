"""The mapping GAN's fused step, its schedule, its batches and its validation, in-process.

- `MappingGan.train_step` under `jax.jit`: both networks change; with weight clipping the step
  equals k critic updates followed by one generator update written out in the test (Flax
  `apply` + optax Adam, a Python loop instead of the step's `lax.scan`), and every critic
  parameter ends inside ±clip.
- `critic_updates` (the VA-GAN schedule) and `StepBatches` (per-step batches, deterministic).
- `eval_step` through `jaxmed.training.evaluate` and `validation_metrics`: NCC against a NumPy
  Pearson correlation of the cropped maps, the Wasserstein estimate against the critic's
  scores of each group, in batches that split the groups unevenly and need padding.

States are filled from NumPy (no initialiser compiles); the program tests cover the real
initialisation.
"""

import dataclasses

import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest

from jaxmed.mapping_gan import data
from jaxmed.mapping_gan.config import MappingGanConfig
from jaxmed.mapping_gan.steps import GanConfig, build_mapping_gan, validation_metrics
from jaxmed.training import TrainState, evaluate

SHAPE = (8, 8, 8, 1)  # one volume (X, Y, Z, C)
# The program's options, tiny (as `python -m train.mapping_gan` would save them in config.json).
CONFIG = {**MappingGanConfig(generator_features=(4, 8), critic_widths=(4, 8), critic_growth=4,
                             critic_layers=1, critic_pooling_channels=4, critic_head=4, tt_rank=2,
                             generator_ema=0.0, lr_decay=0.0).to_dict(),
          "input_shape": SHAPE}
K, B = 2, 2  # critic updates per step, batch size


def _state(gan, example, seed=0) -> TrainState:
    """A step-0 state with the shapes of `gan.init_state`, values from NumPy: kernels and TT
    cores N(0, 1/fan-in) (fan-in: all but the last axis), norm scales 1, biases small."""
    rng = np.random.default_rng(seed)

    def fill(path, leaf):
        name = path[-1].key
        if name in ("scale", "var"):
            return jnp.ones(leaf.shape, leaf.dtype)
        if name == "mean":
            return jnp.zeros(leaf.shape, leaf.dtype)
        if name == "bias":
            return jnp.asarray(0.1 * rng.normal(size=leaf.shape), leaf.dtype)
        fan_in = max(np.prod(leaf.shape[:-1]), 1)
        return jnp.asarray(rng.normal(size=leaf.shape) / np.sqrt(fan_in), leaf.dtype)

    key = jax.random.key(0)
    g = jax.tree_util.tree_map_with_path(fill, jax.eval_shape(gan.generator.init, key, example))
    d = jax.tree_util.tree_map_with_path(fill, jax.eval_shape(gan.critic.init, key, example))
    tx = gan.config.optimizer()
    params = {"generator": g["params"], "critic": d["params"]}
    if gan.config.ema:  # as init_state: the average starts at the initial generator
        params["generator_ema"] = g["params"]
    return TrainState.create(params=params,
                             tx={"generator": tx, "critic": tx},
                             rng=jax.random.key_data(jax.random.key(seed)),
                             batch_stats={"generator": g["batch_stats"],
                                          "critic": d.get("batch_stats", {})})


def _batch(k=K, seed=1):
    rng = np.random.default_rng(seed)
    return {"negative": rng.uniform(-1, 1, (B, k, *SHAPE)).astype(np.float32),
            "positive": rng.uniform(-1, 1, (B, k + 1, *SHAPE)).astype(np.float32)}


def _adam_counts(state) -> dict[str, int]:
    """Optimiser updates applied to each network (optax Adam's `count`)."""
    return {name: int(opt[0].count) for name, opt in state.opt_state.items()}


def _flat(tree) -> dict[str, jax.Array]:
    leaves = jax.tree_util.tree_flatten_with_path(tree)[0]
    return {jax.tree_util.keystr(path): leaf for path, leaf in leaves}


def _leaves_changed(before, after) -> list[bool]:
    pairs = zip(jax.tree.leaves(before), jax.tree.leaves(after))
    return [not np.array_equal(a, b) for a, b in pairs]


# --------------------------------------------------------------------------- the fused step


def test_gradient_penalty_step_updates_both_networks_under_jit():
    gan = build_mapping_gan(CONFIG)
    state = _state(gan, jnp.zeros((1, *SHAPE)))
    new, metrics = jax.jit(gan.train_step)(state, _batch())

    assert all(_leaves_changed(state.params["generator"], new.params["generator"]))
    # Every critic weight changes. (Some biases legitimately do not: the score's bias cancels in
    # E_neg[D] - E_pos[D] and has no input gradient, and so does a hidden bias whose units are
    # active alike for both groups.)
    weights = {k: v for k, v in _flat(state.params["critic"]).items() if not k.endswith("['bias']")}
    after = _flat(new.params["critic"])
    assert [k for k, v in weights.items() if np.array_equal(v, after[k])] == []
    assert all(_leaves_changed(state.batch_stats["generator"], new.batch_stats["generator"]))
    # k critic updates, one generator update
    assert _adam_counts(new) == {"generator": 1, "critic": K}
    assert int(new.step) == 0  # the training loop advances it

    metrics = {k: float(v) for k, v in metrics.items()}
    assert {"loss", "critic_loss", "wasserstein", "gradient_penalty"} <= metrics.keys()
    assert all(np.isfinite(v) for v in metrics.values()), metrics
    assert metrics["gradient_penalty"] > 0
    np.testing.assert_allclose(metrics["critic_loss"],
                               -metrics["wasserstein"] + metrics["gradient_penalty"],
                               rtol=1e-5)
    np.testing.assert_allclose(metrics["loss"], metrics["generator_adversarial"]
                               + CONFIG["l1_weight"] * metrics["generator_l1"], rtol=1e-5)


def _reference_step(gan, state, batch, k):
    """k critic updates (clipped) then one generator update, written out with Flax and optax.

    Returns the expected new parameters, generator statistics and generator loss, plus the
    critic's parameters after its first update only.
    """
    cfg = gan.config
    tx = optax.adam(cfg.learning_rate, b1=0.0, b2=0.9)
    g_params, g_stats = state.params["generator"], state.batch_stats["generator"]
    d_params, d_opt = state.params["critic"], state.opt_state["critic"]

    def key_feature_map(params, x):  # training mode: batch statistics, updated running stats
        m, updates = gan.generator.apply({"params": params, "batch_stats": g_stats}, x, train=True,
                                         mutable=["batch_stats"])
        return m, updates["batch_stats"]

    history = []
    for i in range(k):
        negative, positive = batch["negative"][:, i], batch["positive"][:, i]
        fake = positive + key_feature_map(g_params, positive)[0]

        def critic_loss(params):  # -(E_neg[D] - E_pos[D(x + M(x))])
            def score(v):
                return gan.critic.apply({"params": params}, v, train=True)
            return jnp.mean(score(fake)) - jnp.mean(score(negative))

        updates, d_opt = tx.update(jax.grad(critic_loss)(d_params), d_opt, d_params)
        d_params = jax.tree.map(lambda p, u: jnp.clip(p + u, -cfg.clip, cfg.clip), d_params,
                                updates)
        history.append(d_params)

    positive = batch["positive"][:, k]

    def generator_loss(params):  # -E_pos[D(x + M(x))] + λ mean|M(x)|
        m, stats = key_feature_map(params, positive)
        score = gan.critic.apply({"params": d_params}, positive + m)
        return -jnp.mean(score) + cfg.l1_weight * jnp.mean(jnp.abs(m)), stats

    (loss, stats), grads = jax.value_and_grad(generator_loss, has_aux=True)(g_params)
    updates, _ = tx.update(grads, state.opt_state["generator"], g_params)
    return dict(generator=optax.apply_updates(g_params, updates), critic=d_params, stats=stats,
                loss=loss,
                critic_after_first=history[0])


def _assert_trees_close(got, expected, what):
    # Adam with β1 = 0 divides each gradient by its own running RMS, so float rounding (the step
    # maps the k minibatches in one batched call, the reference one by one) can move a
    # parameter by a few % of the learning rate; a wrong update moves it by about the rate.
    atol = 0.05 * CONFIG["learning_rate"]
    pairs = zip(jax.tree_util.tree_flatten_with_path(got)[0], jax.tree.leaves(expected))
    for (path, a), b in pairs:
        np.testing.assert_allclose(a, b, rtol=1e-4, atol=atol,
                                   err_msg=f"{what}{jax.tree_util.keystr(path)}")


def test_clip_step_is_k_critic_updates_then_a_generator_update():
    clip = 0.2  # large enough that the clipped critic still tells volumes apart
    gan = build_mapping_gan({**CONFIG, "lipschitz": "clip", "clip": clip})
    state, batch = _state(gan, jnp.zeros((1, *SHAPE))), _batch()
    assert max(float(jnp.abs(p).max()) for p in jax.tree.leaves(state.params["critic"])) > clip
    new, metrics = jax.jit(gan.train_step)(state, batch)
    expected = jax.jit(_reference_step, static_argnums=(0, 3))(gan, state, batch, K)

    _assert_trees_close(new.params["critic"], expected["critic"], "critic")
    _assert_trees_close(new.params["generator"], expected["generator"], "generator")
    _assert_trees_close(new.batch_stats["generator"], expected["stats"], "batch_stats")
    np.testing.assert_allclose(metrics["loss"], expected["loss"], rtol=1e-5)
    # The second critic update did something: one update would have left other parameters.
    assert any(_leaves_changed(expected["critic_after_first"], new.params["critic"]))
    assert _adam_counts(new) == {"generator": 1, "critic": K}

    leaves = [np.abs(np.asarray(p)) for p in jax.tree.leaves(new.params["critic"])]
    bound = np.float32(clip)  # the parameters' dtype
    assert all(p.max() <= bound for p in leaves)
    assert sum(int((p == bound).sum()) for p in leaves) > 10  # clipping was active
    assert {"loss", "critic_loss", "wasserstein"} <= metrics.keys()
    assert "gradient_penalty" not in metrics
    np.testing.assert_allclose(metrics["critic_loss"], -metrics["wasserstein"], rtol=1e-6)


# ----------------------------------------------------------------------- schedule and batches


def test_critic_updates_schedule():
    # VA-GAN defaults: 100 during the first 25 generator steps and every 100th, else 5.
    expected = {0: 100, 1: 100, 24: 100, 25: 5, 26: 5, 99: 5, 100: 100, 101: 5, 150: 5, 200: 100,
                1000: 100}
    for step, k in expected.items():
        assert data.critic_updates(step) == k, step
    schedule = dict(n_critic=3, n_critic_warmup=7, warmup_steps=2, warmup_every=10)
    got = [data.critic_updates(s, **schedule) for s in range(22)]
    assert got == [7, 7] + [3] * 8 + [7] + [3] * 9 + [7, 3]
    assert [data.critic_updates(s, n_critic=3, n_critic_warmup=7, warmup_steps=1, warmup_every=0)
            for s in range(4)] == [7, 3, 3, 3]  # warmup_every=0: no periodic warm-up


SCHEDULE = dict(n_critic=2, n_critic_warmup=4, warmup_steps=1, warmup_every=100)


def _groups(n_pos=6, n_neg=5, shape=(4, 4, 1)):
    """Every subject constant at its own id: positives 100 + i, negatives -(1 + i)."""
    pos = np.stack([np.full(shape, 100.0 + i, np.float32) for i in range(n_pos)])
    neg = np.stack([np.full(shape, -(1.0 + i), np.float32) for i in range(n_neg)])
    return pos, neg


def _ids(x):
    """(b, k, *S, C) batch of constant subjects -> (b, k) subject values."""
    flat = x.reshape(*x.shape[:2], -1)
    assert (flat == flat[..., :1]).all()
    return flat[..., 0]


def test_step_batches_shapes_groups_and_determinism():
    pos, neg = _groups()
    batches = data.StepBatches(pos, neg, 3, seed=5, schedule=SCHEDULE)
    warm, normal = batches[0], batches[7]
    assert warm["negative"].shape == (3, 4, 4, 4, 1) and warm["positive"].shape == (3, 5, 4, 4, 1)
    assert normal["negative"].shape == (3, 2, 4, 4, 1)
    assert normal["positive"].shape == (3, 3, 4, 4, 1)

    for step in (0, 7):
        again = data.StepBatches(pos.copy(), neg.copy(), 3, seed=5, schedule=SCHEDULE)[step]
        for name in ("negative", "positive"):
            np.testing.assert_array_equal(batches[step][name], again[name])
            np.testing.assert_array_equal(batches[step][name], batches[step][name])
    for other in (batches[8], data.StepBatches(pos, neg, 3, seed=6, schedule=SCHEDULE)[7]):
        assert not np.array_equal(normal["positive"], other["positive"])
        assert not np.array_equal(normal["negative"], other["negative"])

    for step in range(6):
        batch = batches[step]
        neg_ids, pos_ids = _ids(batch["negative"]), _ids(batch["positive"])
        assert set(neg_ids.ravel()) <= set(-(1.0 + np.arange(5)))
        assert set(pos_ids.ravel()) <= set(100.0 + np.arange(6))
        for ids in (*neg_ids.T, *pos_ids.T):  # each minibatch draws without replacement
            assert len(set(ids)) == len(ids)


def test_step_batches_larger_than_a_group_and_the_grain_stream():
    pos, neg = _groups(n_pos=2, n_neg=2)
    batch = data.StepBatches(pos, neg, 5, seed=0, schedule=SCHEDULE)[3]  # with replacement
    assert batch["negative"].shape == (5, 2, 4, 4, 1)
    assert batch["positive"].shape == (5, 3, 4, 4, 1)

    pos, neg = _groups()
    volumes = np.concatenate([pos, neg])
    images = data.Volumes(tuple(range(11)), (4, 4, 1), lambda i: volumes[i])
    split = data.Split((), np.array([1] * 6 + [0] * 5), images, None)
    source = data.StepBatches(pos, neg, 3, seed=5, schedule=SCHEDULE)
    stream = iter(data.step_batches(split, 3, 5, **SCHEDULE))
    for step in range(3):
        got = next(stream)
        np.testing.assert_array_equal(got["positive"], source[step]["positive"])
    position = stream.get_state()
    resumed = iter(data.step_batches(split, 3, 5, **SCHEDULE))
    resumed.set_state(position)
    for step in range(3, 5):  # a restored stream continues where it stopped
        np.testing.assert_array_equal(next(resumed)["negative"], source[step]["negative"])


# --------------------------------------------------------------------------------- validation


def _pearson(a, b):
    a, b = np.ravel(a).astype(np.float64), np.ravel(b).astype(np.float64)
    a, b = a - a.mean(), b - b.mean()
    return float(np.sum(a * b) / np.sqrt(np.sum(a * a) * np.sum(b * b)))


def _validation_set(gan, shape, positives, negatives, seed):
    """A state for inputs `shape` and random validation subjects, negatives and positives
    interleaved: `{'image', 'label', 'effect'}` (one-channel effects, zero for negatives)."""
    state = _state(gan, jnp.zeros((1, *shape)), seed=seed)
    rng = np.random.default_rng(seed + 1)
    count = positives + negatives
    label = np.zeros(count, np.int32)
    label[rng.permutation(count)[:positives]] = 1
    effect = rng.normal(size=(count, *shape[:-1], 1)).astype(np.float32)
    local = {"image": rng.uniform(-1, 1, (count, *shape)).astype(np.float32), "label": label,
             "effect": np.where(label[:, None, None, None] == 1, effect, 0.0)}
    return state, local


def _critic_scores(gan, state, volumes):
    return np.asarray(jax.jit(gan.critic.apply)({"params": state.params["critic"]}, volumes))


def test_validation_ncc_is_pearson_on_the_cropped_maps():
    """2-D, two channels: M's channels are summed, padding cropped, NCC averaged per subject."""
    crop = (slice(1, 7), slice(2, 8))
    gan = build_mapping_gan({**CONFIG, "input_shape": (8, 8, 2)}, crop=crop)
    assert gan.crop == ((1, 7), (2, 8))
    state, val = _validation_set(gan, (8, 8, 2), positives=3, negatives=3, seed=3)
    outputs = evaluate(gan.eval_step, state, val, count=6, batch_size=4)  # 4 + 2 (padded)
    metrics = validation_metrics(outputs)
    np.testing.assert_array_equal(outputs["index"], np.arange(6))
    np.testing.assert_array_equal(outputs["label"], val["label"])

    variables = {"params": state.params["generator"], "batch_stats": state.batch_stats["generator"]}
    m = np.asarray(jax.jit(gan.generator.apply)(variables, val["image"]))  # inference mode
    pos = np.flatnonzero(val["label"] == 1)
    scores = [_pearson(m[i, 1:7, 2:8].sum(-1), val["effect"][i, 1:7, 2:8, 0]) for i in pos]
    np.testing.assert_allclose(outputs["ncc"][pos], scores, rtol=1e-5, atol=1e-6)
    np.testing.assert_allclose(metrics["val_ncc"], np.mean(scores), rtol=1e-5, atol=1e-6)
    assert len(set(np.round(scores, 6))) == 3  # three different subjects, not one repeated
    np.testing.assert_allclose(metrics["val_l1"], np.abs(m[pos]).mean(), rtol=1e-5)

    neg = np.flatnonzero(val["label"] == 0)
    wasserstein = (_critic_scores(gan, state, val["image"][neg]).mean()
                   - _critic_scores(gan, state, val["image"][pos] + m[pos]).mean())
    np.testing.assert_allclose(metrics["val_wasserstein"], wasserstein, rtol=1e-4, atol=1e-5)


def test_validation_is_the_same_in_any_batching():
    """2 positives, 5 negatives in batches of 1, 2, 4 and 8 (one padded batch): every subject
    of both groups counts once."""
    gan = build_mapping_gan({**CONFIG, "input_shape": (8, 8, 1)})
    state, val = _validation_set(gan, (8, 8, 1), positives=2, negatives=5, seed=5)
    results = {size: validation_metrics(evaluate(gan.eval_step, state, val, count=7,
                                                 batch_size=size)) for size in (1, 2, 4, 8)}
    assert set(results[1]) == {"val_ncc", "val_l1", "val_wasserstein"}
    for size, metrics in results.items():
        for name, value in results[8].items():
            np.testing.assert_allclose(metrics[name], value, rtol=1e-5, atol=1e-6,
                                       err_msg=f"{name}, batch {size}")
    without_truth = {k: v for k, v in val.items() if k != "effect"}
    metrics = validation_metrics(evaluate(gan.eval_step, state, without_truth, count=7,
                                          batch_size=4))
    assert set(metrics) == {"val_l1", "val_wasserstein"}


@pytest.mark.parametrize("bad", ["spectral", "none"])
def test_unknown_lipschitz_method_is_rejected(bad):
    with pytest.raises(ValueError, match="lipschitz"):
        build_mapping_gan({**CONFIG, "lipschitz": bad})


def test_learning_rate_decays_linearly_to_zero():
    config = GanConfig(learning_rate=1e-3, decay_start=100, decay_end=300)
    rates = [float(config.rate(s)) for s in (0, 100, 200, 250, 300, 400)]
    np.testing.assert_allclose(rates, [1e-3, 1e-3, 5e-4, 2.5e-4, 0.0, 0.0], atol=1e-12)
    assert float(GanConfig(learning_rate=2e-4).rate(10**6)) == pytest.approx(2e-4)
    with pytest.raises(ValueError, match="decay_start < decay_end"):
        GanConfig(decay_start=10, decay_end=10)


def test_step_uses_the_rate_of_its_generator_step():
    """Halfway through the decay every update is half as large as at the full rate: Adam's
    first update is lr * g / |g| per parameter, so the ratio is exact."""
    gan = build_mapping_gan({**CONFIG, "lr_decay_start": 0, "lr_decay_end": 2})
    state, batch = _state(gan, jnp.zeros((1, *SHAPE))), _batch()
    full = build_mapping_gan(CONFIG)
    halfway = state.replace(step=jnp.asarray(1, jnp.int32))
    new, metrics = jax.jit(gan.train_step)(halfway, batch)
    ref, _ = jax.jit(full.train_step)(halfway, batch)
    assert float(metrics["learning_rate"]) == pytest.approx(CONFIG["learning_rate"] / 2)
    def moved(after):
        pairs = zip(jax.tree.leaves(after.params["generator"]),
                    jax.tree.leaves(state.params["generator"]))
        return np.array([np.abs(np.asarray(a) - np.asarray(b)).max() for a, b in pairs])

    np.testing.assert_allclose(moved(new), moved(ref) / 2, rtol=1e-3)


def test_generator_average_follows_its_formula_and_serves_inference():
    gan = build_mapping_gan({**CONFIG, "generator_ema": 0.9})
    state, batch = _state(gan, jnp.zeros((1, *SHAPE))), _batch()
    assert "generator_ema" in state.params and "generator_ema" not in state.opt_state
    state = state.replace(step=jnp.asarray(100, jnp.int32))  # past the warm-up: decay = 0.9
    new, _ = jax.jit(gan.train_step)(state, batch)
    decay = float(gan.config.ema_decay(100))
    assert decay == pytest.approx(0.9) and float(gan.config.ema_decay(0)) == pytest.approx(0.1)
    for a0, p1, a1 in zip(jax.tree.leaves(state.params["generator_ema"]),
                          jax.tree.leaves(new.params["generator"]),
                          jax.tree.leaves(new.params["generator_ema"])):
        np.testing.assert_allclose(a1, decay * np.asarray(a0) + (1 - decay) * np.asarray(p1),
                                   rtol=1e-6, atol=1e-7)
    # Inference maps come from the average, training-mode maps from the live generator.
    x = batch["positive"][:, 0]
    average_only = new.replace(params={**new.params, "generator": state.params["generator"]})
    np.testing.assert_allclose(gan.key_feature_map(new, x), gan.key_feature_map(average_only, x),
                               rtol=1e-6)
    live = gan.generator.apply({"params": new.params["generator"],
                                "batch_stats": new.batch_stats["generator"]},
                               x, train=False)
    assert not np.allclose(gan.key_feature_map(new, x), live)
    without = build_mapping_gan({**CONFIG, "generator_ema": 0.0})
    assert "generator_ema" not in _state(without, jnp.zeros((1, *SHAPE))).params


def test_unrolling_the_critic_loop_changes_nothing():
    """A warm-up-sized k runs as a loop over unrolled chunks; the updates are the same."""
    gan = build_mapping_gan({**CONFIG, "n_critic": 2})
    assert gan.unroll_critic == 2
    state, batch = _state(gan, jnp.zeros((1, *SHAPE))), _batch(k=4)
    chunked, _ = jax.jit(gan.train_step)(state, batch)
    looped, _ = jax.jit(dataclasses.replace(gan, unroll_critic=1).train_step)(state, batch)
    _assert_trees_close(chunked.params, looped.params, "params")
