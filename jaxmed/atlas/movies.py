"""Movies of a node's generator: a smooth random walk through its latent prior, rendered to GIF
or MP4.

- `latent_walk`: a walk of constant speed whose heading turns a little every frame, reflected
  at the walls of the box `[-bound, bound]^latent_dim`; consecutive frames are at most `step`
  apart, so the decoded crops vary smoothly.
- `render_walk`: the crops of one node along a walk.
- `write_movie`: frames -> GIF (Pillow) or MP4 (H.264 through imageio-ffmpeg), enlarged by
  nearest neighbour so that small crops are viewable, written atomically.
"""

from __future__ import annotations

import os
import pathlib
import tempfile
import warnings

import imageio.v3 as iio
import jax
import jax.numpy as jnp
import numpy as np

from jaxmed.atlas.generators import NodeGenerators
from jaxmed.training import TrainState

Array = jax.Array

__all__ = ["MOVIE_SUFFIXES", "latent_walk", "render_walk", "write_movie"]

MOVIE_SUFFIXES = (".gif", ".mp4")


def _reflect(z: Array, bound: float) -> tuple[Array, Array]:
    """`z` folded into `[-bound, bound]` by mirror reflections at the walls, and where the
    reflection count is odd (there the heading must turn round). Folding is 1-Lipschitz, so it
    never lengthens a step."""
    period = jnp.mod(z + bound, 4.0 * bound)  # [0, 4 bound)
    flipped = period > 2.0 * bound
    return jnp.where(flipped, 4.0 * bound - period, period) - bound, flipped


def _unit(v: Array) -> Array:
    return v / jnp.maximum(jnp.linalg.norm(v), 1e-12)


def latent_walk(key: Array, num_frames: int, latent_dim: int, *, step: float = 0.1,
                bound: float = 3.0, turn: float = 0.3) -> Array:
    """A smooth random walk in the latent prior: `[num_frames, latent_dim]` float32.

    Frame 0 is a prior sample `N(0, I)` folded into the box `[-bound, bound]^latent_dim`; then
    every frame moves `step` along a unit heading `d`, which turns by `d <- unit(d + turn *
    eps / sqrt(latent_dim))` (`eps ~ N(0, I)`) and is mirrored at the box's walls. Hence
    `||z[t + 1] - z[t]|| <= step` (equal away from the walls) and every frame lies in the box.

    **Arguments:** `key` a PRNG key; `num_frames >= 1`; `latent_dim >= 1`; `step > 0` the
    distance between frames; `bound > 0` the box (3 keeps the walk where the prior has its
    mass); `turn >= 0` how quickly the heading changes (0: straight lines between the walls).
    """
    if num_frames < 1 or latent_dim < 1:
        raise ValueError(f"num_frames and latent_dim must be positive, got {num_frames} and "
                         f"{latent_dim}")
    if not (step > 0 and bound > 0 and turn >= 0):
        raise ValueError(f"need step > 0, bound > 0 and turn >= 0, got {step}, {bound}, {turn}")
    start_key, heading_key, turn_key = jax.random.split(key, 3)
    start, _ = _reflect(jax.random.normal(start_key, (latent_dim,)), bound)
    heading = _unit(jax.random.normal(heading_key, (latent_dim,)))
    turns = jax.random.normal(turn_key, (num_frames - 1, latent_dim)) * (turn / latent_dim ** 0.5)

    def advance(carry, eps):
        z, d = carry
        d = _unit(d + eps)
        z, flipped = _reflect(z + step * d, bound)
        return (z, jnp.where(flipped, -d, d)), z

    _, rest = jax.lax.scan(advance, (start, heading), turns)  # [T - 1, latent_dim]
    return jnp.concatenate([start[None], rest])


def render_walk(generators: NodeGenerators, state: TrainState, node: int, walk: Array) -> Array:
    """Node `node`'s crops along `walk` `[T, latent_dim]`: uint8 `[T, s, s, 3]`."""
    return generators.generate_node(state, node, jnp.asarray(walk, jnp.float32))


def _enlarge(frames: np.ndarray, scale: int) -> np.ndarray:
    """Nearest-neighbour `scale`x enlargement, then one edge row/column more where a side is odd
    (H.264 in yuv420p needs even sides)."""
    frames = np.repeat(np.repeat(frames, scale, axis=1), scale, axis=2)  # [T, sH, sW, 3]
    pad = ((0, 0), (0, frames.shape[1] % 2), (0, frames.shape[2] % 2), (0, 0))
    return np.pad(frames, pad, mode="edge")


def _write_mp4(path: str, frames: np.ndarray, fps: float) -> None:
    """H.264 in yuv420p through imageio-ffmpeg's ffmpeg process."""
    with warnings.catch_warnings():
        # JAX warns at every fork; subprocess forks and execs ffmpeg at once, without running
        # Python (or JAX) code in the child, so the deadlock it warns of cannot happen here.
        warnings.filterwarnings("ignore", message=r"os\.fork\(\) was called",
                                category=RuntimeWarning)
        # macro_block_size=2: the sides are already even, so imageio-ffmpeg resizes nothing.
        iio.imwrite(path, frames, plugin="FFMPEG", extension=".mp4", fps=fps, codec="libx264",
                    pixelformat="yuv420p", macro_block_size=2)


def write_movie(frames, path: str | os.PathLike, *, fps: float = 12, scale: int = 8
                ) -> pathlib.Path:
    """Writes `frames` as a looping GIF or an H.264 MP4, chosen by the suffix of `path`.

    Frames are enlarged `scale` times (nearest neighbour) and, where a side would be odd,
    extended by one edge pixel, for both formats. The movie is written to a temporary file
    beside `path` (its folder is created if need be) and renamed onto it, so a reader never
    sees half a movie. A GIF stores identical consecutive frames once, shown for their summed
    duration.

    **Arguments:** `frames` uint8 `[T, H, W, 3]`; `path` ending in `.gif` or `.mp4`; `fps`
    frames per second; `scale` a positive integer.

    **Returns:** `path` as a `pathlib.Path`.

    **Raises:** `ValueError` for another suffix or frames of the wrong shape or type.
    """
    path = pathlib.Path(path)
    suffix = path.suffix.lower()
    if suffix not in MOVIE_SUFFIXES:
        raise ValueError(f"{path}: a movie must end in one of {MOVIE_SUFFIXES}, got "
                         f"{path.suffix!r}")
    frames = np.asarray(frames)
    if frames.dtype != np.uint8 or frames.ndim != 4 or frames.shape[-1] != 3 or not len(frames):
        raise ValueError(f"{path}: frames must be uint8 [T, H, W, 3] with T >= 1, got "
                         f"{frames.dtype} {frames.shape}")
    if scale < 1 or not fps > 0:
        raise ValueError(f"{path}: need scale >= 1 and fps > 0, got {scale} and {fps}")
    frames = _enlarge(frames, int(scale))
    path.parent.mkdir(parents=True, exist_ok=True)
    handle, temporary = tempfile.mkstemp(suffix=suffix, prefix=f".{path.name}.",
                                         dir=path.parent)
    os.close(handle)
    try:
        if suffix == ".gif":
            iio.imwrite(temporary, frames, plugin="pillow", extension=suffix,
                        duration=1000.0 / fps, loop=0)
        else:
            _write_mp4(temporary, frames, fps)
        os.replace(temporary, path)
    except BaseException:
        os.unlink(temporary)
        raise
    return path
