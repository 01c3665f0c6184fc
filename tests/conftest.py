"""Test-wide JAX settings.

XLA:CPU takes ~2.5 s to compile each partitionable-threefry `jax.random.normal` on arrays of
rank >= 3 (0.3 s without), and parameter initialisers call it for every kernel. The tests
compare against references built from the drawn values, never against fixed random numbers,
so the faster non-partitionable generator changes no assertion. Training subprocesses started
by tests keep JAX's default.
"""

import jax

jax.config.update("jax_threefry_partitionable", False)
