"""Latent walks (step length, box, smooth heading), rendering a node's walk, and GIF/MP4 files
decoded back."""

import functools
import os

import imageio.v3 as iio
import jax
import numpy as np
import pytest

from jaxmed.atlas.generators import GeneratorConfig, NodeGenerators
from jaxmed.atlas.movies import latent_walk, render_walk, write_movie

# XLA:CPU compiles 2-3x faster without LLVM's optimisations (tiny networks).
_jit = functools.partial(jax.jit, compiler_options={"xla_backend_optimization_level": 0})


@pytest.mark.parametrize("latent_dim", [1, 4])
def test_latent_walk_steps_are_short_and_stay_in_the_box(latent_dim):
    walk = np.asarray(latent_walk(jax.random.PRNGKey(0), 400, latent_dim, step=0.2, bound=1.0))
    assert walk.shape == (400, latent_dim) and walk.dtype == np.float32
    steps = np.linalg.norm(np.diff(walk, axis=0), axis=1)
    assert steps.max() <= 0.2 + 1e-5
    assert np.median(steps) > 0.19  # it keeps moving (shorter only where it meets a wall)
    assert np.abs(walk).max() <= 1.0 + 1e-6
    # 400 steps of 0.2 in the box [-1, 1]: the walk must have hit a wall and come back.
    assert walk.max() > 0.8 and walk.min() < -0.8


def test_latent_walk_heading_changes_smoothly():
    walk = np.asarray(latent_walk(jax.random.PRNGKey(1), 60, 8, step=0.1, bound=50.0, turn=0.3))
    moves = np.diff(walk, axis=0)
    cosine = np.sum(moves[1:] * moves[:-1], axis=1) / np.sum(moves[:-1] ** 2, axis=1)
    assert cosine.min() > 0.8  # no wall inside 50: only the small turns
    straight = np.asarray(latent_walk(jax.random.PRNGKey(1), 20, 3, bound=50.0, turn=0.0))
    np.testing.assert_allclose(np.diff(straight, 2, axis=0), 0.0, atol=1e-5)


def test_latent_walk_rejects_bad_arguments():
    with pytest.raises(ValueError, match="num_frames"):
        latent_walk(jax.random.PRNGKey(0), 0, 4)
    with pytest.raises(ValueError, match="step"):
        latent_walk(jax.random.PRNGKey(0), 5, 4, step=0.0)


def test_render_walk_is_the_nodes_generator_along_the_walk():
    system = NodeGenerators(GeneratorConfig(kind="vae", crop_size=8, width=2, latent_dim=3),
                            num_nodes=2)
    state = _jit(system.init_state)()
    walk = latent_walk(jax.random.PRNGKey(2), 6, 3)
    frames = np.asarray(render_walk(system, state, 1, walk))
    assert frames.shape == (6, 8, 8, 3) and frames.dtype == np.uint8
    every_node = _jit(system.generate)(state, np.stack([walk, walk]))  # [2, T, s, s, 3]
    np.testing.assert_array_equal(frames, every_node[1])


def _frames(t=4, h=5, w=7):
    """Distinct frames (a GIF stores identical consecutive frames once) of odd sides."""
    frames = np.zeros((t, h, w, 3), np.uint8)
    for i in range(t):
        frames[i, :, :, 0] = 50 * i
        frames[i, : h // 2, :, 1] = 200
    return frames


def test_gif_decodes_to_the_enlarged_frames(tmp_path):
    frames = _frames()
    path = write_movie(frames, tmp_path / "walk.gif", fps=10, scale=3)
    movie = iio.imread(path, index=None)[..., :3]  # [T, 16, 22, 3]: 15 x 21 made even
    assert movie.shape == (4, 16, 22, 3)
    enlarged = np.repeat(np.repeat(frames, 3, axis=1), 3, axis=2)
    np.testing.assert_array_equal(movie[:, :15, :21], enlarged)
    np.testing.assert_array_equal(movie[:, 15, :21], enlarged[:, -1])  # edge pixels repeated
    assert iio.immeta(path)["duration"] == 100
    assert os.listdir(tmp_path) == ["walk.gif"]  # no temporary file left behind


# Reading starts ffmpeg by fork + exec, which JAX warns of (write_movie silences it itself).
@pytest.mark.filterwarnings(r"ignore:os\.fork\(\) was called:RuntimeWarning")
def test_mp4_decodes_to_the_enlarged_frames(tmp_path):
    frames = _frames(t=6)
    path = write_movie(frames, tmp_path / "movies" / "walk.mp4", fps=12, scale=3)
    movie = iio.imread(path, plugin="FFMPEG", index=None)
    meta = iio.immeta(path, plugin="FFMPEG")
    assert meta["fps"] == 12 and meta["codec"] == "h264" and meta["pix_fmt"].startswith("yuv420p")
    assert movie.shape == (6, 16, 22, 3)
    enlarged = np.repeat(np.repeat(frames, 3, axis=1), 3, axis=2).astype(np.int64)
    # H.264 in yuv420p is lossy, most at colour edges: compare the rows 3 or more pixels below
    # the edge closely and the mean colour above it.
    np.testing.assert_allclose(movie[:, 9:15, :21], enlarged[:, 9:15], atol=8)
    np.testing.assert_allclose(movie[:, :6, :21].mean(axis=(1, 2)),
                               enlarged[:, :6].mean(axis=(1, 2)), atol=8)
    assert os.listdir(tmp_path / "movies") == ["walk.mp4"]  # its folder made, no temporary left


def test_write_movie_refuses_other_suffixes_and_bad_frames(tmp_path):
    with pytest.raises(ValueError, match="must end in one of"):
        write_movie(_frames(), tmp_path / "walk.avi")
    with pytest.raises(ValueError, match="uint8"):
        write_movie(_frames().astype(np.float32), tmp_path / "walk.gif")
    assert os.listdir(tmp_path) == []
