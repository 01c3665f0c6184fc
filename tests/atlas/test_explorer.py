"""The atlas explorer's server (`jaxmed.atlas.explorer`) on a tiny trained run, in process
through Starlette's test client: what the API returns against independent computations
(the generator, the classifier on pasted crops, a brute-force nearest-crop search), movies,
the library and source images, and that files are served only from the atlas folder and bad
requests get a 4xx with a message; then the `movie` and `serve` commands as subprocesses."""

import base64
import io
import signal
import subprocess
import sys

import imageio.v3 as iio
import jax.numpy as jnp
import numpy as np
import pytest
from PIL import Image
from starlette.testclient import TestClient

from jaxmed.atlas.check import paste
from jaxmed.atlas.config import ClassifierConfig
from jaxmed.atlas.data import load_data
from jaxmed.atlas.explorer import Explorer, explorer_app
from jaxmed.atlas.inference import load_atlas
from jaxmed.training import read_run_config
from tests.atlas.conftest import run_copy
from tests.programs import ROOT, failure_message, free_port, program_env


@pytest.fixture(scope="module")
def explorer(tmp, trainings):
    workdir = run_copy(tmp, trainings, "explorer_api")
    atlas = load_atlas(workdir)
    config = read_run_config(workdir, "python -m train.feature_atlas")
    return Explorer(atlas, load_data(ClassifierConfig.from_dict(config)))


@pytest.fixture(scope="module")
def client(explorer):
    with TestClient(explorer_app(explorer), raise_server_exceptions=False) as client:
        yield client


def _decode(data_url: str) -> np.ndarray:
    assert data_url.startswith("data:image/png;base64,")
    return np.asarray(Image.open(io.BytesIO(base64.b64decode(data_url.split(",", 1)[1]))))


def test_page_and_scripts_are_served_locally(client):
    page = client.get("/")
    assert page.status_code == 200 and "text/html" in page.headers["content-type"]
    for src in ("/static/app.js", "/static/style.css"):
        assert src in page.text
        assert client.get(src).status_code == 200
    assert "http://" not in page.text and "https://" not in page.text  # no CDN
    assert client.get("/static/nothing.js").status_code == 404


def test_atlas_lists_the_chosen_features(client, explorer):
    info = client.get("/api/atlas").json()
    assert [f["node"] for f in info["features"]] == explorer.atlas.nodes
    assert info["latent_dim"] == 4 and info["bound"] == 3.0
    report = {row["node"]: row for row in explorer.atlas.report}
    for card in info["features"]:
        assert card["crops"] == len(explorer.atlas.libraries[card["column"]])
        assert card["generated_rate"] == report[card["node"]]["generated_rate"]
        for urls in card["shown"]:
            assert client.get(urls["crop"]).status_code == 200
            assert client.get(urls["heat"]).status_code == 200


def test_generate_matches_the_generator_and_the_classifier(client, explorer):
    atlas = explorer.atlas
    node, z = atlas.nodes[-1], np.array([0.5, -1.25, 2.0, 0.0], np.float32)
    result = client.get("/api/generate", params={"node": node, "z": "0.5,-1.25,2,0"}).json()
    column = atlas.column(node)
    expected = np.asarray(atlas.generators.generate_node(atlas.generator_state, column,
                                                         jnp.asarray(z[None])))[0]
    image = _decode(result["image"])
    np.testing.assert_array_equal(image, expected)
    # The activation: the crop pasted into the node's contexts, read by the classifier.
    contexts = np.asarray(explorer._context_images[column])
    y0, x0 = np.asarray(explorer._context_y0[column]), np.asarray(explorer._context_x0[column])
    pasted = np.asarray(paste(jnp.asarray(contexts), jnp.asarray(np.stack([expected] * len(y0))),
                              jnp.asarray(y0), jnp.asarray(x0)))
    for k in range(len(y0)):  # the pasted window holds the crop, the rest is the context
        window = pasted[k, y0[k]:y0[k] + 8, x0[k]:x0[k] + 8]
        np.testing.assert_array_equal(window, expected)
    values, _ = atlas.reader.values(pasted)
    threshold = atlas.summary["thresholds"][node]
    assert result["activation"]["value"] == pytest.approx(values[:, column].mean(), rel=1e-5,
                                                          abs=1e-6)
    assert result["activation"]["rate"] == pytest.approx(np.mean(values[:, column] > threshold))
    # The nearest library crops: a brute-force search.
    crops = atlas.libraries[column].crops.astype(np.float64)
    distance = np.sqrt(((crops - expected) ** 2).mean(axis=(1, 2, 3)))
    nearest = [n["index"] for n in result["nearest"]]
    assert nearest == list(np.argsort(distance, kind="stable")[:len(nearest)])
    np.testing.assert_allclose([n["distance"] for n in result["nearest"]],
                               np.sort(distance)[:len(nearest)], rtol=1e-4)


def test_other_latents_give_other_images(client, explorer):
    node = explorer.atlas.nodes[0]
    a, b = (_decode(client.get("/api/generate", params={"node": node, "z": z}).json()["image"])
            for z in ("0,0,0,0", "3,-3,3,-3"))
    assert a.shape == b.shape == (8, 8, 3) and not np.array_equal(a, b)


@pytest.mark.parametrize("params, text", [
    ({"node": "fc:0"}, "missing parameter 'z'"),
    ({"node": "nope:1", "z": "0,0,0,0"}, "is not a feature of this atlas"),
    ({"node": "NODE", "z": "0,0,0"}, "z must have 4 values, got 3"),
    ({"node": "NODE", "z": "0,0,0,7"}, "within ±3"),
    ({"node": "NODE", "z": "0,0,nan,0"}, "within ±3"),
    ({"node": "NODE", "z": "0,a,0,0"}, "parameter 'z': cannot read '0,a,0,0'"),
])
def test_bad_generate_requests_get_400(client, explorer, params, text):
    params = {k: v.replace("NODE", explorer.atlas.nodes[0]) for k, v in params.items()}
    response = client.get("/api/generate", params=params)
    assert response.status_code == 400 and text in response.json()["error"]


@pytest.mark.parametrize("path", [
    "/files/../config.json", "/files/%2e%2e/config.json", "/files/..%2fconfig.json",
    "/files/libraries/../../config.json", "/files/%2Fetc%2Fpasswd", "/files//etc/passwd",
    "/files/libraries/nothing.png", "/static/..%2F..%2Finference.py",
])
def test_no_file_outside_the_atlas_is_served(client, path):
    response = client.get(path)
    assert response.status_code == 404, response.text[:200]
    assert "seed" not in response.text and "root:" not in response.text


def test_walks_and_movies(client, explorer):
    node = explorer.atlas.nodes[0]
    walk = np.asarray(client.get("/api/walk", params={"node": node, "frames": 30, "step": 0.2,
                                                      "seed": 3}).json()["walk"])
    assert walk.shape == (30, 4) and np.all(np.abs(walk) <= 3.0 + 1e-6)
    assert np.all(np.linalg.norm(np.diff(walk, axis=0), axis=1) <= 0.2 + 1e-4)
    movie = client.post("/api/movie", params={"node": node, "format": "mp4", "frames": 9})
    assert movie.status_code == 200
    url = movie.json()["url"]
    path = explorer.atlas.atlas_dir / url.removeprefix("/files/")
    assert path.is_file() and path.parent.name == "explorer"
    assert iio.imread(path, index=None).shape[0] == 9
    assert client.get(url).content == path.read_bytes()
    for params, text in [({"format": "avi"}, "format must be one of gif, mp4"),
                         ({"frames": 1}, "frames must be in [2, 600]"),
                         ({"step": 0}, "step must be in (0, 3]"),
                         ({"fps": 1000}, "fps must be in [0.5, 60]")]:
        response = client.post("/api/movie", params={"node": node, **params})
        assert response.status_code == 400 and text in response.json()["error"]
    assert client.get("/api/movie", params={"node": node}).status_code == 405


def test_library_and_source_images(client, explorer):
    node = explorer.atlas.nodes[0]
    library = explorer.atlas.libraries[0]
    crops = client.get("/api/library", params={"node": node}).json()["crops"]
    assert len(crops) == len(library)
    for k in (0, len(library) - 1):
        png = np.asarray(Image.open(io.BytesIO(client.get(crops[k]["crop"]).content)))
        np.testing.assert_array_equal(png, library.crops[k])
        assert crops[k]["y0"] == library.y0[k] and crops[k]["source_name"] == library.source_name[k]
    source = client.get("/api/source", params={"node": node, "index": 0})
    image = np.asarray(Image.open(io.BytesIO(source.content)))
    y, x = int(library.y0[0]), int(library.x0[0])
    assert image.shape == (32, 32, 3) and tuple(image[y, x]) == (255, 230, 0)
    # Inside the outline, the source image's pixels: the library crop.
    np.testing.assert_array_equal(image[y + 1:y + 7, x + 1:x + 7], library.crops[0][1:7, 1:7])
    assert client.get("/api/source", params={"node": node, "index": 10**6}).status_code == 400


def test_unexpected_failures_are_a_json_500(explorer, monkeypatch):
    def broken(*args):
        raise RuntimeError("disk on fire\nsecond line")

    monkeypatch.setattr(explorer, "generate", broken)
    with TestClient(explorer_app(explorer), raise_server_exceptions=False) as client:
        response = client.get("/api/generate", params={"node": "fc:0", "z": "0,0,0,0"})
    assert response.status_code == 500
    assert response.json() == {"error": "internal error (RuntimeError: disk on fire)"}


def _atlas_command(*args: str) -> list[str]:
    return [sys.executable, "-m", "train.feature_atlas", *args]


def test_movie_command(tmp, trainings):
    workdir = run_copy(tmp, trainings, "explorer_movie")
    node = load_atlas(workdir).nodes[0]
    env = program_env(tmp / "jax_cache")
    done = subprocess.run(_atlas_command("movie", "--workdir", str(workdir), "--node", node,
                                         "--output", str(tmp / "walk.mp4"), "--frames", "7"),
                          cwd=ROOT, env=env, capture_output=True, text=True, timeout=300)
    assert done.returncode == 0, done.stderr[-2000:]
    assert iio.imread(tmp / "walk.mp4", index=None).shape[0] == 7
    bad = subprocess.run(_atlas_command("movie", "--workdir", str(workdir), "--node", node,
                                        "--output", str(tmp / "walk.avi")),
                         cwd=ROOT, env=env, capture_output=True, text=True, timeout=300)
    assert bad.returncode == 2 and "must end in .gif or .mp4" in bad.stderr
    unknown = subprocess.run(_atlas_command("movie", "--workdir", str(workdir), "--node",
                                            "fc:99", "--output", str(tmp / "x.gif")),
                             cwd=ROOT, env=env, capture_output=True, text=True, timeout=300)
    assert "'fc:99' is not a feature of this atlas" in failure_message(unknown)


def test_serve_stops_cleanly_on_ctrl_c_and_refuses_a_busy_port(tmp, trainings):
    workdir = run_copy(tmp, trainings, "explorer_api")
    env = program_env(tmp / "jax_cache")
    port = free_port()
    server = subprocess.Popen(_atlas_command("serve", "--workdir", str(workdir), "--port",
                                             str(port)), cwd=ROOT, env=env,
                              stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    try:
        line = server.stdout.readline()
        assert f"http://127.0.0.1:{port}/" in line, line + server.stderr.read()
        busy = subprocess.run(_atlas_command("serve", "--workdir", str(workdir), "--port",
                                             str(port)), cwd=ROOT, env=env,
                              capture_output=True, text=True, timeout=300)
        assert busy.returncode == 2 and f"cannot listen on 127.0.0.1:{port}" in busy.stderr
        server.send_signal(signal.SIGINT)
        out, err = server.communicate(timeout=60)
    finally:
        server.kill()
    assert server.returncode == 0 and "explorer stopped" in out and "Traceback" not in err
