"""SIGTERM (preemption notice) → stop at an agreed step."""

from __future__ import annotations

import signal
import warnings

import jax
from jax.experimental import multihost_utils


class PreemptionWatcher:
    """Tells the loop when to save and stop after a SIGTERM.

    Single process: a SIGTERM handler sets a flag that the loop reads after
    each step. Multi-process (after `jax.distributed.initialize`): JAX's
    preemption service already catches SIGTERM on any host and agrees on one
    step at which every host stops (`reached_preemption_sync_point`), so that
    all hosts save the same checkpoint.

    Use as a context manager; the previous signal handler is restored on exit.
    """

    def __init__(self):
        self._requested = False
        self._previous = None
        self._use_jax_service = jax.distributed.is_initialized() and _service_enabled()

    def __enter__(self) -> "PreemptionWatcher":
        if not self._use_jax_service:
            self._previous = signal.signal(signal.SIGTERM, self._on_sigterm)
        return self

    def __exit__(self, *exc) -> None:
        if self._previous is not None:
            signal.signal(signal.SIGTERM, self._previous)
            self._previous = None

    def _on_sigterm(self, signum, frame) -> None:
        del signum, frame
        self._requested = True

    def should_stop(self, step: int) -> bool:
        """Call once after every step (same steps on every host)."""
        if self._use_jax_service:
            return multihost_utils.reached_preemption_sync_point(step)
        return self._requested


def _service_enabled() -> bool:
    try:
        multihost_utils.reached_preemption_sync_point(-1)
    except RuntimeError:
        if jax.process_count() > 1:
            warnings.warn("JAX preemption service disabled: SIGTERM is handled per "
                          "process, hosts may stop at different steps.")
        return False
    return True
