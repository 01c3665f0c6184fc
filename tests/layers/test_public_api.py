"""The public layer API: import hygiene, NNX interop and the README example."""

import pathlib
import re
import subprocess
import sys

import jax
import numpy as np
from flax import nnx

import jaxmed.layers as L

README = pathlib.Path(__file__).resolve().parents[2] / "README.md"


def test_import_pulls_in_only_jax_flax_numpy():
    code = (
        "import sys\n"
        "before = set(sys.modules)\n"
        "import jaxmed.layers\n"
        "new = {m.split('.')[0] for m in set(sys.modules) - before}\n"
        "forbidden = {'nibabel', 'tifffile', 'zarr', 'torch', 'tensorly', 'optax', 'orbax',\n"
        "             'grain', 'tensorboardX', 'tqdm', 'scipy', 'skimage', 'cv2', 'PIL',\n"
        "             'matplotlib'}\n"
        "print(sorted(new & forbidden))\n"
    )
    out = subprocess.run([sys.executable, "-c", code], check=True, capture_output=True, text=True)
    assert out.stdout.strip() == "[]", out.stdout


def test_public_names_are_all_and_each_is_in_the_readme():
    """What `from jaxmed.layers import *` gives is what the package shows, and the README's
    layer paragraph names every one of them (a new layer is documented or this fails)."""
    public = {name for name in vars(L) if not name.startswith("_")} - {"annotations"}
    modules = {name for name in public if type(getattr(L, name)).__name__ == "module"}
    assert public - modules == set(L.__all__)
    text = README.read_text()
    paragraph = text[text.index("\nLayers: "):]
    paragraph = paragraph[:paragraph.index("\n\n")]
    missing = [name for name in L.__all__ if f"`{name}`" not in paragraph]
    assert not missing, f"README's layer paragraph does not name {missing}"


def _readme_python_blocks():
    text = README.read_text()
    section = text.split("## Using the layers in your own JAX code", 1)[1].split("\n## ", 1)[0]
    return re.findall(r"```python\n(.*?)```", section, flags=re.S)


def test_readme_layer_examples_run():
    blocks = _readme_python_blocks()
    assert len(blocks) >= 2, "README must show a Linen and an NNX example"
    for block in blocks:
        exec(compile(block, str(README), "exec"), {})


def _nnx_output(module, x, **call_kwargs):
    wrapped = nnx.bridge.ToNNX(module, rngs=nnx.Rngs(0))
    nnx.bridge.lazy_init(wrapped, x, **call_kwargs)
    return wrapped(x, **call_kwargs)


def test_every_module_works_through_nnx_bridge():
    x2 = jax.random.uniform(jax.random.key(1), (2, 8, 8, 16))
    x3 = jax.random.uniform(jax.random.key(2), (1, 4, 4, 4, 16))
    modules = [
        (L.TTDense((4, 4), (2, 4), ranks=3), x2),
        (L.TTConv((4, 4), (2, 4), ranks=3, kernel_size=(3, 3)), x2),
        (L.TTConv((4, 4), (2, 4), ranks=3, kernel_size=(3, 3, 3)), x3),
        (L.SecondOrderPooling(reduced_channels=4), x2),
        (L.ChannelAttention(reduction=4), x2),
        (L.SpatialAttention(kernel_size=3), x3),
        (L.CBAM(reduction=4, kernel_size=3), x2),
        (L.PyramidPooling(bins=(1, 2, 3)), x2),
        (L.ThresholdSuppression(), x3),
    ]
    for module, x in modules:
        y = _nnx_output(module, x)
        assert np.all(np.isfinite(np.asarray(y))), type(module).__name__
        assert y.shape[:-1] == x.shape[:-1], type(module).__name__
