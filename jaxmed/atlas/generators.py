"""One small generative model per feature node, all trained together: WGAN-GP (default) or VAE.

Every node `n` has its own generator `G_n: z -> crop` (and a critic `D_n`, or an encoder
`E_n`), trained on the crops of its own library only. The parameters of all nodes are stacked
along a leading node axis `[N, ...]` and one jitted step updates every node at once by
`jax.vmap` over that axis and over the batch's node axis, so nodes never see each other's
crops or parameters. `docs/atlas.md` gives the decisions in full; in short:

- Networks (`CropDecoder`, `CropCritic`, `CropEncoder`): DCGAN-like. The decoder maps `z` by a
  Dense layer to a `[r, r, 2^u w]` grid, then `u` times doubles it (nearest neighbour) and
  applies Conv 3x3 + LayerNorm + ReLU, halving the channels, and ends with Conv 3x3 + tanh in
  [-1, 1]. `u = max(1, floor(log2 s) - 2)` and `r = ceil(s / 2^u)`, so `4 <= r <= 8`; the
  `r 2^u >= s` output is cropped to its centre `s x s` (at most `2^u - 1` pixels cut), which
  makes every crop size `s >= 8` work. The critic and the encoder share one trunk, the mirror
  image: Conv 3x3 (w), then `u` stride-2 Conv 3x3 doubling the channels, LeakyReLU(0.2), no
  normalisation (the gradient penalty needs each score to depend on its own sample only),
  then Dense to the score (critic) or to `(mu, log sigma^2)` (encoder). The convolutions are
  `NodeConv`: `jaxmed.layers.Conv`'s parameters computed as one matrix product, which stays
  fast on CPU when vmapped over nodes (a vmapped convolution becomes a slow grouped one).
- WGAN-GP step: `critic_steps` critic updates (a `lax.scan`, unrolled) on fresh real crops
  each — the batch carries `critic_steps x B` crops per node — against fakes of the fixed
  generator, loss `mean D(fake) - mean D(real) + gp_weight * GP` (`jaxmed.losses.critic_loss`
  and `gradient_penalty`), then one generator update on `-mean D(G(z))` for B new latents.
  Adam(b1 = 0.5, b2 = 0.9) for both networks.
- VAE step: `z = mu + sigma * eps`, loss per crop = the squared error summed over its pixels
  in [-1, 1] (a Gaussian log-likelihood with variance 1/2, up to a constant) plus
  `kl_weight * KL(q(z|x) || N(0, I))`, averaged over the batch; Adam with its usual betas.
- Random numbers: the step key is `state.step_key()` and node `n` uses `fold_in(key, n)`
  (`node_keys`), so a resumed run, and a node trained alone (`node_update`), draw the same.
- Batches: `crop_batches` yields `{'crops': uint8 [R, N, s, s, 3]}` with the rows `R` leading,
  as `fit` splits every batch along its first axis over the devices; the step moves the node
  axis to the front itself.
- Metrics: `fit` logs scalars only, so each per-node quantity is logged as its mean over the
  nodes (`'loss'`, `'critic_loss'`, ...) and its maximum (`'loss_max'`, ...).
"""

from __future__ import annotations

import dataclasses
import math
from collections.abc import Callable, Sequence

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np
import optax

from jaxmed import losses
from jaxmed.training import TrainState, images_to_unit_range, make_batches

Array = jax.Array

__all__ = [
    "CropCritic",
    "CropDecoder",
    "CropEncoder",
    "GeneratorConfig",
    "NodeConv",
    "NodeGenerators",
    "crop_batches",
    "node_keys",
    "shifted_conv",
    "to_uint8",
    "upsampling_stages",
]

KINDS = ("wgan-gp", "vae")
_GAN_BETAS = (0.5, 0.9)  # Adam's (b1, b2) for both GAN networks, as in WGAN-GP
_MIN_CROP = 8


# ----------------------------------------------------------------------------
# Configuration
# ----------------------------------------------------------------------------


@dataclasses.dataclass(frozen=True)
class GeneratorConfig:
    """The per-node generative model and its training.

    - `kind`: `'wgan-gp'` or `'vae'`.
    - `latent_dim`: dimension of `z ~ N(0, I)`.
    - `crop_size`: `s`, the side of the square RGB crops (`>= 8`).
    - `width`: channels of the full-resolution convolutions (doubled per halving).
    - `learning_rate`: Adam's rate; None: 1e-4 for the WGAN-GP, 1e-3 for the VAE.
    - `critic_steps`: WGAN-GP critic updates per generator update, each on its own real crops.
    - `gp_weight`: weight of the gradient penalty.
    - `kl_weight`: the beta of the VAE's KL term.
    - `seed`: seed of the initial parameters and of the steps' random numbers.
    """

    kind: str = "wgan-gp"
    latent_dim: int = 4
    crop_size: int = 16
    width: int = 32
    learning_rate: float | None = None
    critic_steps: int = 5
    gp_weight: float = 10.0
    kl_weight: float = 1.0
    seed: int = 0

    def __post_init__(self):
        if self.kind not in KINDS:
            raise ValueError(f"kind must be one of {KINDS}, got {self.kind!r}")
        if self.crop_size < _MIN_CROP:
            raise ValueError(f"crop_size must be at least {_MIN_CROP}, got {self.crop_size}")
        for name in ("latent_dim", "width", "critic_steps"):
            if getattr(self, name) < 1:
                raise ValueError(f"{name} must be a positive integer, got {getattr(self, name)}")
        if self.learning_rate is not None and not self.learning_rate > 0:
            raise ValueError(f"learning_rate must be positive, got {self.learning_rate}")
        for name in ("gp_weight", "kl_weight"):
            if not getattr(self, name) >= 0:
                raise ValueError(f"{name} must be non-negative, got {getattr(self, name)}")

    @property
    def rate(self) -> float:
        """The learning rate in use (`learning_rate` or the kind's default)."""
        if self.learning_rate is not None:
            return self.learning_rate
        return 1e-4 if self.kind == "wgan-gp" else 1e-3

    @property
    def minibatches(self) -> int:
        """Real minibatches one step consumes per node: `critic_steps` for the WGAN-GP, 1 for
        the VAE; pass it as `crop_batches(..., critic_steps=...)`."""
        return self.critic_steps if self.kind == "wgan-gp" else 1

    def optimizer(self) -> optax.GradientTransformation:
        """Adam for every network of a node (the GAN's with b1 = 0.5, b2 = 0.9)."""
        if self.kind == "wgan-gp":
            return optax.adam(self.rate, b1=_GAN_BETAS[0], b2=_GAN_BETAS[1])
        return optax.adam(self.rate)


# ----------------------------------------------------------------------------
# Networks
# ----------------------------------------------------------------------------


def shifted_conv(x: Array, kernel: Array, stride: int = 1) -> Array:
    """A 2-D 'SAME' convolution as one matrix product: `jaxmed.layers.conv(x, kernel, stride)`.

    The `kh kw` shifted (and strided) copies of the padded input are stacked along the
    channels, `[B, H', W', kh kw C]`, and multiplied by the kernel reshaped `[kh kw C, F]`.
    Vmapped over nodes (each with its own kernel) this stays a batched matrix product, where
    XLA:CPU turns a vmapped convolution into a grouped one: 14x slower for the gradient of 8
    nodes x 160 crops of 16 x 16 x 32 -> 64 channels (10.3 s vs 0.74 s, the latter equal to
    8 separate single-node convolutions).

    **Arguments:** `x` `[B, H, W, C]`; `kernel` `[kh, kw, C, F]`; `stride` int.

    **Returns:** `[B, ceil(H / stride), ceil(W / stride), F]`.
    """
    kh, kw, c, f = kernel.shape
    pads = jax.lax.padtype_to_pads(x.shape[1:3], (kh, kw), (stride, stride), "SAME")
    x = jnp.pad(x, ((0, 0), *pads, (0, 0)))
    out_h, out_w = (x.shape[1] - kh) // stride + 1, (x.shape[2] - kw) // stride + 1
    taps = [x[:, i:i + (out_h - 1) * stride + 1:stride, j:j + (out_w - 1) * stride + 1:stride]
            for i in range(kh) for j in range(kw)]
    patches = jnp.concatenate(taps, axis=-1)  # [B, H', W', kh kw C], tap (i, j) at (i kw + j) C
    return patches @ kernel.reshape(kh * kw * c, f)


class NodeConv(nn.Module):
    """A 3 x 3 'SAME' convolution by `shifted_conv`, with the parameters and initialisation of
    `jaxmed.layers.Conv` (`kernel` `[3, 3, C, features]` LeCun normal, `bias` zeros).

    **Call** `(x)`: `[B, H, W, C]` -> `[B, ceil(H / strides), ceil(W / strides), features]`.
    """

    features: int
    strides: int = 1

    @nn.compact
    def __call__(self, x: Array) -> Array:
        kernel = self.param("kernel", nn.initializers.lecun_normal(),
                            (3, 3, x.shape[-1], self.features))
        bias = self.param("bias", nn.initializers.zeros_init(), (self.features,))
        return shifted_conv(x, kernel, self.strides) + bias


def upsampling_stages(crop_size: int) -> int:
    """`u`, the number of 2x stages between the `r x r` grid and the crop: `max(1, floor(log2
    s) - 2)`, so that `r = ceil(s / 2^u)` lies in [4, 8]."""
    return max(1, int(math.floor(math.log2(crop_size))) - 2)


class CropDecoder(nn.Module):
    """The generator (and the VAE's decoder): latents `[B, latent_dim]` -> crops `[B, s, s, 3]`
    in [-1, 1] (see the module docstring for the layers)."""

    crop_size: int
    width: int

    @nn.compact
    def __call__(self, z: Array) -> Array:
        stages = upsampling_stages(self.crop_size)
        grid = -(-self.crop_size // 2 ** stages)  # r = ceil(s / 2^u)
        channels = self.width * 2 ** stages
        x = nn.Dense(grid * grid * channels, name="project")(z)
        x = nn.relu(nn.LayerNorm(name="project_norm")(x))
        x = x.reshape(z.shape[0], grid, grid, channels)  # [B, r, r, 2^u w]
        for i in range(1, stages + 1):
            x = jnp.repeat(jnp.repeat(x, 2, axis=1), 2, axis=2)  # nearest 2x: [B, 2h, 2w, C]
            x = NodeConv(self.width * 2 ** (stages - i), name=f"up{i}")(x)
            x = nn.relu(nn.LayerNorm(name=f"up{i}_norm")(x))
        x = jnp.tanh(NodeConv(3, name="to_rgb")(x))  # [B, r 2^u, r 2^u, 3]
        start = (x.shape[1] - self.crop_size) // 2
        return x[:, start:start + self.crop_size, start:start + self.crop_size]


class _Trunk(nn.Module):
    """Conv 3x3 (w), then `u` stride-2 Conv 3x3 doubling the channels, LeakyReLU(0.2), no
    normalisation: `[B, s, s, 3] -> [B, F]`, each row a function of its own sample only."""

    crop_size: int
    width: int

    @nn.compact
    def __call__(self, x: Array) -> Array:
        x = nn.leaky_relu(NodeConv(self.width, name="stem")(x), 0.2)
        for i in range(1, upsampling_stages(self.crop_size) + 1):
            x = NodeConv(self.width * 2 ** i, strides=2, name=f"down{i}")(x)
            x = nn.leaky_relu(x, 0.2)
        return x.reshape(x.shape[0], -1)


class CropCritic(nn.Module):
    """The WGAN-GP critic: crops `[B, s, s, 3]` in [-1, 1] -> scores `[B]`."""

    crop_size: int
    width: int

    @nn.compact
    def __call__(self, x: Array) -> Array:
        features = _Trunk(self.crop_size, self.width, name="trunk")(x)
        return nn.Dense(1, name="score")(features)[:, 0]


class CropEncoder(nn.Module):
    """The VAE's encoder: crops `[B, s, s, 3]` -> `(mu, log_variance)`, each `[B, latent_dim]`."""

    crop_size: int
    width: int
    latent_dim: int

    @nn.compact
    def __call__(self, x: Array) -> tuple[Array, Array]:
        features = _Trunk(self.crop_size, self.width, name="trunk")(x)
        moments = nn.Dense(2 * self.latent_dim, name="moments")(features)
        return moments[:, :self.latent_dim], moments[:, self.latent_dim:]


def to_uint8(crops: Array) -> Array:
    """Crops in [-1, 1] -> uint8 in [0, 255] (the inverse of `images_to_unit_range`, rounded)."""
    return jnp.clip(jnp.round((crops + 1.0) * 127.5), 0, 255).astype(jnp.uint8)


def node_keys(key: Array, num_nodes: int) -> Array:
    """Node `n`'s key of a step: `fold_in(key, n)`, stacked `[num_nodes, 2]`."""
    return jax.vmap(lambda n: jax.random.fold_in(key, n))(jnp.arange(num_nodes))


# ----------------------------------------------------------------------------
# The system
# ----------------------------------------------------------------------------


def _update(tx: optax.GradientTransformation, params, opt_state, grads):
    updates, opt_state = tx.update(grads, opt_state, params)
    return optax.apply_updates(params, updates), opt_state


@dataclasses.dataclass(frozen=True)
class NodeGenerators:
    """The generative models of `num_nodes` nodes, trained together (see the module docstring).

    The state's `params` (and `opt_state`) hold `{'generator': ..., 'critic': ...}` (WGAN-GP)
    or `{'generator': ..., 'encoder': ...}` (VAE), every leaf with a leading node axis
    `[num_nodes, ...]`; `params['generator']` decodes latents in both kinds.
    """

    config: GeneratorConfig
    num_nodes: int

    def __post_init__(self):
        if self.num_nodes < 1:
            raise ValueError(f"num_nodes must be positive, got {self.num_nodes}")

    @property
    def decoder(self) -> CropDecoder:
        return CropDecoder(self.config.crop_size, self.config.width)

    @property
    def critic(self) -> CropCritic:
        return CropCritic(self.config.crop_size, self.config.width)

    @property
    def encoder(self) -> CropEncoder:
        c = self.config
        return CropEncoder(c.crop_size, c.width, c.latent_dim)

    # ------------------------------------------------------------------ state

    def init_node(self, key: Array) -> dict:
        """One node's parameters from its key (`{'generator', 'critic' | 'encoder'}`)."""
        g_key, other_key = jax.random.split(key)
        z, s = jnp.zeros((1, self.config.latent_dim)), self.config.crop_size
        params = {"generator": self.decoder.init(g_key, z)["params"]}
        crop = jnp.zeros((1, s, s, 3))
        if self.config.kind == "wgan-gp":
            params["critic"] = self.critic.init(other_key, crop)["params"]
        else:
            params["encoder"] = self.encoder.init(other_key, crop)["params"]
        return params

    def init_state(self) -> TrainState:
        """A step-0 state: node `n` initialised from `fold_in(init_key, n)` (jit-compatible)."""
        init_key, rng = jax.random.split(jax.random.PRNGKey(self.config.seed))
        params = jax.vmap(self.init_node)(node_keys(init_key, self.num_nodes))
        tx = self.config.optimizer()
        # Built per node so that every optimiser leaf (Adam's count too) has the node axis.
        opt_state = jax.vmap(lambda p: {name: tx.init(p[name]) for name in p})(params)
        return TrainState(step=jnp.zeros((), jnp.int32), params=params, batch_stats={},
                          opt_state=opt_state, rng=rng)

    # ------------------------------------------------------------------- step

    @property
    def train_step(self):
        """`(state, batch) -> (state, metrics)` for `jaxmed.training.fit`.

        `batch = {'crops': uint8 [R, N, s, s, 3]}` (`crop_batches`): R = `critic_steps` x B
        rows for the WGAN-GP (critic update j reads rows [j B, (j + 1) B)), R = B for the VAE.
        `metrics`: each per-node quantity's mean over the nodes and its maximum (`*_max`);
        `'loss'` is the generator's loss (WGAN-GP) or the VAE's loss.
        """

        def step(state: TrainState, batch) -> tuple[TrainState, dict[str, Array]]:
            crops = images_to_unit_range(jnp.moveaxis(batch["crops"], 1, 0))  # [N, R, s, s, 3]
            keys = node_keys(state.step_key(), self.num_nodes)
            params, opt_state, metrics = jax.vmap(self.node_update)(
                state.params, state.opt_state, crops, keys)
            state = state.replace(params=params, opt_state=opt_state)
            summary = {name: jnp.mean(v) for name, v in metrics.items()}
            summary.update({f"{name}_max": jnp.max(v) for name, v in metrics.items()})
            return state, summary

        return step

    def node_update(self, params, opt_state, crops: Array, key: Array):
        """One node's training step, what `train_step` vmaps over the nodes.

        **Arguments:** the node's `params` and `opt_state` (no node axis), its real `crops`
        `[R, s, s, 3]` in [-1, 1] and its key (`node_keys(state.step_key(), N)[n]`).

        **Returns:** `(params, opt_state, metrics)`, `metrics` a dict of scalars.
        """
        if self.config.kind == "wgan-gp":
            return self._gan_update(params, opt_state, crops, key)
        return self._vae_update(params, opt_state, crops, key)

    def _gan_update(self, params, opt_state, crops: Array, key: Array):
        c, tx = self.config, self.config.optimizer()
        if crops.shape[0] % c.critic_steps:
            raise ValueError(f"a batch of {crops.shape[0]} crops per node does not split into "
                             f"critic_steps={c.critic_steps} minibatches; build it with "
                             f"crop_batches(..., critic_steps={c.critic_steps})")
        real = crops.reshape(c.critic_steps, -1, *crops.shape[1:])  # [k, B, s, s, 3]
        k, b = real.shape[:2]
        fake_key, gp_key, g_key = jax.random.split(key, 3)
        # The generator is fixed during the critic updates: all k fake minibatches up front.
        z = jax.random.normal(fake_key, (k * b, c.latent_dim))
        fakes = self.decoder.apply({"params": params["generator"]}, z)
        fakes = jax.lax.stop_gradient(fakes).reshape(real.shape)  # [k, B, s, s, 3]

        def critic_update(carry, inputs):
            critic, opt = carry
            (_, parts), grads = jax.value_and_grad(self._critic_loss, has_aux=True)(
                critic, *inputs)
            return _update(tx, critic, opt, grads), parts

        # Unrolled: XLA:CPU runs convolutions inside a while loop several times slower.
        (critic, critic_opt), parts = jax.lax.scan(
            critic_update, (params["critic"], opt_state["critic"]),
            (real, fakes, jax.random.split(gp_key, k)), unroll=True)
        g_z = jax.random.normal(g_key, (b, c.latent_dim))
        g_loss, g_grads = jax.value_and_grad(self._generator_loss)(
            params["generator"], critic, g_z)
        generator, generator_opt = _update(tx, params["generator"], opt_state["generator"],
                                           g_grads)
        metrics = {"loss": g_loss, **{name: v[-1] for name, v in parts.items()}}
        return ({"generator": generator, "critic": critic},
                {"generator": generator_opt, "critic": critic_opt}, metrics)

    def critic_score(self, critic_params) -> Callable[[Array], Array]:
        """`crops [B, s, s, 3] -> scores [B]` of one node's critic."""
        return lambda x: self.critic.apply({"params": critic_params}, x)

    def _critic_loss(self, critic_params, real: Array, fake: Array, key: Array):
        score = self.critic_score(critic_params)
        w_loss = losses.critic_loss(score(real), score(fake))  # mean D(fake) - mean D(real)
        gp = losses.gradient_penalty(score, real, fake, key, self.config.gp_weight)
        return w_loss + gp, {"critic_loss": w_loss + gp, "wasserstein": -w_loss,
                             "gradient_penalty": gp}

    def _generator_loss(self, generator_params, critic_params, z: Array) -> Array:
        fake = self.decoder.apply({"params": generator_params}, z)
        return -jnp.mean(self.critic_score(critic_params)(fake))

    def _vae_update(self, params, opt_state, crops: Array, key: Array):
        tx = self.config.optimizer()
        (_, metrics), grads = jax.value_and_grad(self._vae_loss, has_aux=True)(
            params, crops, key)
        new = {name: _update(tx, params[name], opt_state[name], grads[name]) for name in params}
        return ({name: p for name, (p, _) in new.items()},
                {name: o for name, (_, o) in new.items()}, metrics)

    def _vae_loss(self, params, x: Array, key: Array):
        mu, log_var = self.encoder.apply({"params": params["encoder"]}, x)  # [B, latent_dim]
        z = mu + jnp.exp(0.5 * log_var) * jax.random.normal(key, mu.shape)
        x_hat = self.decoder.apply({"params": params["generator"]}, z)  # [B, s, s, 3]
        reconstruction = jnp.mean(jnp.sum(jnp.square(x_hat - x), axis=(1, 2, 3)))
        kl = jnp.mean(0.5 * jnp.sum(jnp.square(mu) + jnp.exp(log_var) - 1.0 - log_var, axis=-1))
        loss = reconstruction + self.config.kl_weight * kl
        return loss, {"loss": loss, "reconstruction": reconstruction, "kl": kl}

    # ------------------------------------------------------------- sampling

    def sample_latents(self, key: Array, m: int) -> Array:
        """`m` prior samples `z ~ N(0, I)` per node: `[num_nodes, m, latent_dim]`."""
        return jax.random.normal(key, (self.num_nodes, m, self.config.latent_dim))

    def generate(self, state: TrainState, z: Array) -> Array:
        """Every node's crops for its latents: `z [N, M, latent_dim]` -> uint8 `[N, M, s, s, 3]`
        (jit-compatible)."""
        decode = lambda p, zn: self.decoder.apply({"params": p}, zn)
        return to_uint8(jax.vmap(decode)(state.params["generator"], z))

    def generate_node(self, state: TrainState, node: int, z: Array) -> Array:
        """One node's crops: `z [M, latent_dim]` -> uint8 `[M, s, s, 3]` (jit-compatible)."""
        params = jax.tree.map(lambda p: p[node], state.params["generator"])
        return to_uint8(self.decoder.apply({"params": params}, z))


# ----------------------------------------------------------------------------
# Input
# ----------------------------------------------------------------------------


class _NodeCrops:
    """Record `i` = `{'crops': [N, s, s, 3]}` holding `libraries[n][perm_n[i] % len_n]` per node,
    `perm_n` a fixed seeded permutation of `range(L)`, `L` the largest library's size."""

    def __init__(self, libraries: Sequence[np.ndarray], seed: int):
        self.libraries = libraries
        self.length = max(len(lib) for lib in libraries)
        self.perms = [np.random.default_rng([seed, n]).permutation(self.length)
                      for n in range(len(libraries))]

    def __len__(self) -> int:
        return self.length

    def __getitem__(self, index: int) -> dict[str, np.ndarray]:
        crops = [lib[perm[index] % len(lib)] for lib, perm in zip(self.libraries, self.perms)]
        return {"crops": np.stack(crops)}


def crop_batches(libraries: Sequence[np.ndarray], batch_size: int, *, seed: int,
                 critic_steps: int = 1):
    """The generators' training batches: resumable (`make_batches`) and per node.

    One epoch is `L` records, `L` the largest library's size; record `i` gives node `n` its
    crop `libraries[n][perm_n(i) % len_n]` (`perm_n` a seeded permutation of `range(L)`), so
    within every epoch each crop of each library is drawn (the smaller ones repeat), and the
    records come in a new seeded order every epoch.

    **Arguments:**

    - `libraries`: per node, its crops uint8 `[n_i, s, s, 3]` (sizes may differ, `s` not).
    - `batch_size`: B, crops per node per minibatch.
    - `seed`: order seed.
    - `critic_steps`: minibatches per step (`GeneratorConfig.minibatches`).

    **Returns:** a grain dataset of `{'crops': uint8 [critic_steps x B, N, s, s, 3]}`.

    **Raises:** `ValueError` for no library, an empty library (naming its index) or libraries
    whose crops differ in shape or are not uint8 RGB.
    """
    if not libraries:
        raise ValueError("no crop libraries given")
    libraries = [np.asarray(lib) for lib in libraries]
    for n, lib in enumerate(libraries):
        if len(lib) == 0:
            raise ValueError(f"crop library {n} is empty: every node needs at least one crop")
        if lib.dtype != np.uint8 or lib.ndim != 4 or lib.shape[-1] != 3:
            raise ValueError(f"crop library {n} must be uint8 [n, s, s, 3], got {lib.dtype} "
                             f"{lib.shape}")
        if lib.shape[1:] != libraries[0].shape[1:]:
            raise ValueError(f"crop library {n} holds crops of shape {lib.shape[1:]}, "
                             f"library 0 of shape {libraries[0].shape[1:]}")
    if batch_size < 1 or critic_steps < 1:
        raise ValueError(f"batch_size and critic_steps must be positive, got {batch_size} and "
                         f"{critic_steps}")
    return make_batches(_NodeCrops(libraries, seed), batch_size * critic_steps, seed=seed)
