"""The train state: one pytree holding everything a resumed run needs."""

from __future__ import annotations

from typing import Any, Mapping

import flax.struct
import jax
import jax.numpy as jnp
import optax


@flax.struct.dataclass
class TrainState:
    """Parameters, BatchNorm statistics, optimiser state(s), step and RNG key.

    A program with several networks (a GAN's generator and critic) keeps
    `params`, `batch_stats` and `opt_state` as dicts keyed by network name;
    `create` and `apply_gradients` accept that layout.

    **Fields:**

    - `step`: int32 `[]`, number of completed training steps. The loop advances
      it; `train_step` functions leave it alone.
    - `params`: parameter pytree (or dict of them).
    - `batch_stats`: BatchNorm running statistics (`{}` when unused).
    - `opt_state`: optax state, or a dict of them keyed like `params`.
    - `rng`: uint32 `[2]` base PRNG key; per-step keys come from `step_key`.
    """

    step: jax.Array
    params: Any
    batch_stats: Any
    opt_state: Any
    rng: jax.Array

    @classmethod
    def create(cls, *, params: Any, tx: optax.GradientTransformation
               | Mapping[str, optax.GradientTransformation], rng: jax.Array,
               batch_stats: Any = None) -> "TrainState":
        """A step-0 state.

        **Arguments:**

        - `params`: parameter pytree, or a dict of them when `tx` is a dict.
        - `tx`: one optax transformation, or a dict mapping each key of `params`
          to its own transformation (e.g. `{'generator': g_tx, 'critic': d_tx}`).
        - `rng`: uint32 `[2]` key (`jax.random.PRNGKey(seed)`).
        - `batch_stats`: BatchNorm statistics, if the model has any.
        """
        if isinstance(tx, Mapping):
            opt_state = {name: tx[name].init(params[name]) for name in tx}
        else:
            opt_state = tx.init(params)
        return cls(step=jnp.zeros((), jnp.int32), params=params,
                   batch_stats={} if batch_stats is None else batch_stats,
                   opt_state=opt_state, rng=rng)

    def step_key(self) -> jax.Array:
        """The PRNG key of the current step: `fold_in(rng, step)`.

        A resumed run therefore draws the same numbers at the same step.
        """
        return jax.random.fold_in(self.rng, self.step)

    def apply_gradients(self, tx: optax.GradientTransformation, grads: Any,
                        network: str | None = None) -> "TrainState":
        """One optimiser update of all params, or of `params[network]` only.

        **Arguments:**

        - `tx`: the transformation whose state is `opt_state` (or
          `opt_state[network]`).
        - `grads`: gradients shaped like the params being updated.
        - `network`: key into dict-valued `params`/`opt_state`, or None.

        **Returns:** the state with new params and optimiser state; `step` is
        unchanged (a GAN step may update the critic several times).
        """
        params = self.params if network is None else self.params[network]
        opt = self.opt_state if network is None else self.opt_state[network]
        updates, opt = tx.update(grads, opt, params)
        params = optax.apply_updates(params, updates)
        if network is None:
            return self.replace(params=params, opt_state=opt)
        return self.replace(params={**self.params, network: params},
                            opt_state={**self.opt_state, network: opt})
