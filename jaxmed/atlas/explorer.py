"""The atlas explorer (docs/atlas.md, "Explorer"): a local web page over a run's atlas, served
by `python -m train.feature_atlas serve`.

- `Explorer`: what the page asks for, without HTTP — the features' cards, a generated crop of
  a latent vector with its node's activation and nearest library crops, latent random walks,
  movies written into the atlas, a library's crops and their source images. Jitted once per
  kind of call for all nodes (the node is an argument, not a constant).
- `explorer_app`: the Starlette application: the page and its scripts (packaged beside this
  module, nothing from the network), a JSON API, and the atlas's files. Files are served only
  from inside the atlas folder; a bad request gets a 4xx with a JSON `{"error": message}`,
  an unexpected failure a 500 with a one-line message (never a traceback page).

The activation of the current image is read as in the activation check (`jaxmed.atlas.check`):
the crop is pasted over the windows of `contexts` images — source images of the node's library
at their crops' windows and neutral backgrounds — and the node is read there with the atlas's
rule; the page shows the node's mean value and the share of contexts that activate it, beside
the real crops' median share from the report.
"""

from __future__ import annotations

import base64
import io
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np
from PIL import Image
from starlette.applications import Starlette
from starlette.exceptions import HTTPException
from starlette.requests import Request
from starlette.responses import FileResponse, JSONResponse, Response
from starlette.routing import Route

from jaxmed.atlas.check import contexts, paste
from jaxmed.atlas.data import AtlasData, backgrounds
from jaxmed.atlas.inference import (
    CONTEXTS,
    LIBRARIES_DIR,
    TrainedAtlas,
    atlas_movie,
    atlas_walk,
)
from jaxmed.atlas.library import crop_file, node_folder
from jaxmed.atlas.movies import MOVIE_SUFFIXES
from jaxmed.errors import InputDataError

STATIC = Path(__file__).with_name("explorer_static")
BOUND = 3.0  # the sliders span the prior's ±3σ
NEAREST = 4
MOVIES_DIR = "movies/explorer"
MAX_FRAMES = 600
SHOWN = 4  # library crops on a feature's card


def png_bytes(image: np.ndarray) -> bytes:
    """uint8 `[H, W, 3]` (or `[H, W]`) -> PNG file bytes."""
    buffer = io.BytesIO()
    Image.fromarray(np.asarray(image)).save(buffer, format="PNG", compress_level=1)
    return buffer.getvalue()


class Explorer:
    """The explorer's work on a `TrainedAtlas` (`jaxmed.atlas.inference.load_atlas`).

    **Arguments:**

    - `atlas`: the run's atlas.
    - `data`: the run's images (the sources of the library crops; `load_data` of the run).
    - `bound`: the sliders' range, ± `bound` prior standard deviations.
    - `num_contexts`: images each generated crop is pasted into to read its node.
    """

    def __init__(self, atlas: TrainedAtlas, data: AtlasData, *, bound: float = BOUND,
                 num_contexts: int = CONTEXTS):
        self.atlas, self.data, self.bound = atlas, data, float(bound)
        self.latent_dim = atlas.generators.config.latent_dim
        rng = np.random.default_rng(atlas.seed)
        side = data.images.shape[1]
        grounds = backgrounds(num_contexts, side, atlas.seed)
        where = []
        for library in atlas.libraries:
            sources = np.asarray(data.images[np.asarray(library.source)])
            windows = np.stack([library.y0, library.x0], axis=1)
            where.append(contexts(sources, windows, grounds, num_contexts, rng))
        # [nodes, C, ...]: one jitted call serves every node, the node an index into these.
        self._context_images = jnp.asarray(np.stack([w.images for w in where]))
        self._context_y0 = jnp.asarray(np.stack([w.y0 for w in where]))
        self._context_x0 = jnp.asarray(np.stack([w.x0 for w in where]))
        self._library_crops = [jnp.asarray(lb.crops, jnp.float32) for lb in atlas.libraries]
        generators, reader = atlas.generators, atlas.reader

        @jax.jit
        def generate(state, column, z):
            return generators.generate_node(state, column, z[None])[0]

        @jax.jit
        def activation(column, crop):
            images = paste(self._context_images[column],
                           jnp.broadcast_to(crop, (num_contexts, *crop.shape)),
                           self._context_y0[column], self._context_x0[column])
            values, layer_max = reader._read(reader.variables, images)
            active = reader.decide(values, layer_max)
            return jnp.mean(values[:, column]), jnp.mean(active[:, column])

        self._generate, self._activation = generate, activation
        self._nearest = jax.jit(_nearest, static_argnames="k")

    # --- what the page shows ---

    def features(self) -> list[dict[str, Any]]:
        """One card per chosen node: library size, purity, check, a few crops' files."""
        report = {row["node"]: row for row in self.atlas.report}
        cards = []
        for column, library in enumerate(self.atlas.libraries):
            row = report.get(library.node, {})
            cards.append({
                "node": library.node, "column": column, "crops": len(library),
                "purity": row.get("purity"), "feature": row.get("feature"),
                "generated_rate": row.get("generated_rate"), "real_rate": row.get("real_rate"),
                "random_rate": row.get("random_rate"),
                "real_median_rate": row.get("real_median_rate"), "passes": row.get("passes"),
                "threshold": self.atlas.summary["thresholds"].get(library.node),
                "shown": [self._crop_urls(library.node, k)
                          for k in range(min(SHOWN, len(library)))],
            })
        return cards

    def info(self) -> dict[str, Any]:
        return {"latent_dim": self.latent_dim, "bound": self.bound,
                "rule": self.atlas.summary["options"]["rule"],
                "crop_size": int(self.atlas.libraries[0].crops.shape[1]),
                "features": self.features()}

    def generate(self, node: str, z: np.ndarray) -> dict[str, Any]:
        """The crop of latent `z` for `node`, as a base64 PNG, with the node's activation
        (mean value, share of contexts activated) and the nearest library crops."""
        column = self.atlas.column(node)
        z = self.check_latent(z)
        start = time.perf_counter()
        crop = self._generate(self.atlas.generator_state, column, jnp.asarray(z))
        value, rate = self._activation(column, crop)
        distances, order = self._nearest(self._library_crops[column], crop, k=min(
            NEAREST, len(self.atlas.libraries[column])))
        crop = np.asarray(crop)
        return {
            "node": node, "z": z.tolist(),
            "image": "data:image/png;base64," + base64.b64encode(png_bytes(crop)).decode(),
            "activation": {"value": float(value), "rate": float(rate)},
            "nearest": [{"index": int(k), "distance": float(d), **self._crop_urls(node, int(k))}
                        for d, k in zip(np.asarray(distances), np.asarray(order))],
            "server_ms": 1000.0 * (time.perf_counter() - start),
        }

    def walk(self, node: str, frames: int, step: float, seed: int) -> np.ndarray:
        """`[frames, latent_dim]` latents of a smooth random walk inside the sliders' box."""
        self._check_walk(node, frames, step)
        return atlas_walk(self.atlas, node, frames, step=step, seed=seed, bound=self.bound)

    def movie(self, node: str, suffix: str, frames: int, step: float, seed: int,
              fps: float = 12.0) -> Path:
        """Write a random walk's movie into the atlas's `movies/explorer/`; its path."""
        if suffix not in MOVIE_SUFFIXES:
            formats = ", ".join(s[1:] for s in MOVIE_SUFFIXES)
            raise InputDataError(f"format must be one of {formats}, got {suffix[1:]!r}")
        if not 0.5 <= fps <= 60:
            raise InputDataError(f"fps must be in [0.5, 60], got {fps}")
        self._check_walk(node, frames, step)
        name = f"{node_folder(node)}_walk_s{seed}_{frames}f{suffix}"
        return atlas_movie(self.atlas, node, self.atlas.atlas_dir / MOVIES_DIR / name,
                           frames=frames, step=step, seed=seed, fps=fps, bound=self.bound)

    def _check_walk(self, node: str, frames: int, step: float) -> None:
        self.atlas.column(node)
        _bounded_int("frames", frames, 2, MAX_FRAMES)
        if not 0.0 < step <= self.bound:
            raise InputDataError(f"step must be in (0, {self.bound:g}], got {step}")

    def library(self, node: str) -> list[dict[str, Any]]:
        """Every crop of `node`'s library with its source and window."""
        library = self.atlas.libraries[self.atlas.column(node)]
        return [{"index": k, "source": int(library.source[k]),
                 "source_name": library.source_name[k], "y0": int(library.y0[k]),
                 "x0": int(library.x0[k]), "size": int(library.size[k]),
                 "score": float(library.score[k]), "activation": float(library.activation[k]),
                 **self._crop_urls(node, k)} for k in range(len(library))]

    def source_image(self, node: str, index: int) -> np.ndarray:
        """The source image of crop `index` of `node`'s library with its window outlined."""
        library = self.atlas.libraries[self.atlas.column(node)]
        index = _bounded_int("index", index, 0, len(library) - 1)
        image = np.array(self.data.images[int(library.source[index])])
        y, x, s = int(library.y0[index]), int(library.x0[index]), int(library.size[index])
        colour = np.array([255, 230, 0], np.uint8)
        image[y, x:x + s] = image[y + s - 1, x:x + s] = colour
        image[y:y + s, x] = image[y:y + s, x + s - 1] = colour
        return image

    def check_latent(self, z: np.ndarray) -> np.ndarray:
        """`z` as float32 `[latent_dim]`, finite and inside ± `bound` (`InputDataError`
        otherwise)."""
        z = np.asarray(z, np.float32)
        if z.shape != (self.latent_dim,):
            raise InputDataError(f"z must have {self.latent_dim} values, got {z.size}")
        if not np.all(np.isfinite(z)) or np.any(np.abs(z) > self.bound + 1e-6):
            raise InputDataError(f"z must be finite and within ±{self.bound:g}, got "
                                 f"{z.tolist()}")
        return z

    def _crop_urls(self, node: str, k: int) -> dict[str, str]:
        base = f"/files/{LIBRARIES_DIR}/"
        return {"crop": base + crop_file(node, k), "heat": base + crop_file(node, k, "heat")}


def _nearest(crops: jax.Array, crop: jax.Array, k: int) -> tuple[jax.Array, jax.Array]:
    """The `k` library crops nearest `crop` (root-mean-square pixel distance): distances and
    indices, nearest first."""
    diff = crops - crop.astype(jnp.float32)[None]
    distance = jnp.sqrt(jnp.mean(diff * diff, axis=(1, 2, 3)))
    negative, order = jax.lax.top_k(-distance, k)
    return -negative, order


def _bounded_int(name: str, value: int, low: int, high: int) -> int:
    if not low <= value <= high:
        raise InputDataError(f"{name} must be in [{low}, {high}], got {value}")
    return int(value)


# ----------------------------------------------------------------------------
# HTTP
# ----------------------------------------------------------------------------


def explorer_app(explorer: Explorer) -> Starlette:
    """The explorer's web application (serve it with uvicorn)."""
    atlas_dir = explorer.atlas.atlas_dir.resolve()
    static = {p.name: p for p in STATIC.iterdir() if p.is_file()}

    def query(request: Request, name: str, parse: Callable[[str], Any] = str,
              default: Any = None) -> Any:
        text = request.query_params.get(name)
        if text is None:
            if default is None:
                raise InputDataError(f"missing parameter {name!r}")
            return default
        try:
            return parse(text)
        except ValueError:
            raise InputDataError(f"parameter {name!r}: cannot read {text!r}") from None

    def latent(text: str) -> np.ndarray:
        return np.array([float(v) for v in text.split(",")], np.float32)

    async def page(request: Request) -> Response:
        return FileResponse(static["index.html"], media_type="text/html")

    async def static_file(request: Request) -> Response:
        path = static.get(request.path_params["name"])
        if path is None:
            raise HTTPException(404, f"no such file: {request.path_params['name']}")
        return FileResponse(path)

    async def atlas_file(request: Request) -> Response:
        relative = request.path_params["path"]
        path = (atlas_dir / relative).resolve()
        if not path.is_relative_to(atlas_dir) or not path.is_file():
            raise HTTPException(404, f"no such file in the atlas: {relative}")
        return FileResponse(path)

    async def info(request: Request) -> Response:
        return JSONResponse(explorer.info())

    async def generate(request: Request) -> Response:
        return JSONResponse(explorer.generate(query(request, "node"),
                                              query(request, "z", latent)))

    async def walk(request: Request) -> Response:
        z = explorer.walk(query(request, "node"), query(request, "frames", int, 120),
                          query(request, "step", float, 0.1), query(request, "seed", int, 0))
        return JSONResponse({"walk": np.round(z, 5).tolist()})

    async def movie(request: Request) -> Response:
        suffix = "." + query(request, "format", str, "gif")
        path = explorer.movie(query(request, "node"), suffix,
                              query(request, "frames", int, 72), query(request, "step", float, 0.1),
                              query(request, "seed", int, 0), query(request, "fps", float, 12.0))
        relative = path.resolve().relative_to(atlas_dir).as_posix()
        return JSONResponse({"url": f"/files/{relative}", "name": path.name})

    async def library(request: Request) -> Response:
        return JSONResponse({"crops": explorer.library(query(request, "node"))})

    async def source(request: Request) -> Response:
        image = explorer.source_image(query(request, "node"), query(request, "index", int))
        return Response(png_bytes(image), media_type="image/png")

    async def bad_input(request: Request, error: Exception) -> Response:
        return JSONResponse({"error": str(error)}, status_code=400)

    async def http_error(request: Request, error: HTTPException) -> Response:
        return JSONResponse({"error": error.detail}, status_code=error.status_code)

    async def server_error(request: Request, error: Exception) -> Response:
        message = f"{type(error).__name__}: {error}".splitlines()[0]
        return JSONResponse({"error": f"internal error ({message})"}, status_code=500)

    routes = [Route("/", page), Route("/static/{name}", static_file),
              Route("/files/{path:path}", atlas_file), Route("/api/atlas", info),
              Route("/api/generate", generate), Route("/api/walk", walk),
              Route("/api/movie", movie, methods=["POST"]), Route("/api/library", library),
              Route("/api/source", source)]
    return Starlette(routes=routes, exception_handlers={
        InputDataError: bad_input, HTTPException: http_error, Exception: server_error})


def warm_up(explorer: Explorer) -> float:
    """Compile the per-request calls before the first request; seconds taken."""
    start = time.perf_counter()
    explorer.generate(explorer.atlas.nodes[0], np.zeros(explorer.latent_dim, np.float32))
    return time.perf_counter() - start

