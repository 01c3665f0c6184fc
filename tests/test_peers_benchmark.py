"""The peer benchmark's helpers and PyTorch networks (`benchmarks/peers.py`,
`benchmarks/_torch_peers.py`, `benchmarks/_timing.py`).

The PyTorch networks must be the same networks as ours: same parameter count and the same
output shapes, checked on tiny configurations (parameter counts from `jax.eval_shape`, so
nothing is compiled). Skipped without torch (the optional `peers` extra).
"""

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from benchmarks._timing import achieved, compiled_flops, matmul_peak_flops


def _params_and_output(model, shape):
    x = jnp.zeros(shape, jnp.float32)
    variables = jax.eval_shape(lambda: model.init(jax.random.PRNGKey(0), x))
    out = jax.eval_shape(lambda v: model.apply(v, x, train=False), variables)
    count = sum(int(np.prod(p.shape)) for p in jax.tree.leaves(variables["params"]))
    return count, out


def _channels_first(shape):
    return (shape[0], shape[-1], *shape[1:-1])


def test_matmul_peak_is_positive_and_cached():
    peak = matmul_peak_flops(n=256, repeats=2)
    assert peak > 0
    assert matmul_peak_flops(n=256, repeats=2) == peak


def test_compiled_flops_of_a_matmul_is_2n3():
    n = 128
    a = jnp.ones((n, n), jnp.float32)
    compiled = jax.jit(jnp.matmul).lower(a, a).compile()
    flops = compiled_flops(compiled)
    assert flops == pytest.approx(2 * n**3, rel=0.01)
    gflops, mfu = achieved(flops, 1.0)
    assert gflops == pytest.approx(flops / 1e9) and mfu > 0
    assert achieved(None, 1.0) == ("", "")


@pytest.mark.parametrize("kw", [
    dict(depth=50, width=4, output_stride=8),
    dict(depth=18, width=4, output_stride=16, aux_head=True),
])
def test_segmentation_peer(kw):
    torch = pytest.importorskip("torch")
    from benchmarks import _torch_peers as tp
    from jaxmed.models.segmentation import SegmentationNet

    shape = (2, 33, 33, 3)
    count, out = _params_and_output(SegmentationNet(num_classes=3, **kw), shape)
    peer = tp.segmentation_net(num_classes=3, **kw).eval()
    assert tp.count_params(peer) == count
    with torch.inference_mode():
        peer_out = peer(torch.zeros(_channels_first(shape)))
    assert set(peer_out) == set(out)
    for name in out:
        assert tuple(peer_out[name].shape) == _channels_first(out[name].shape)


def test_vgg_cam_peer():
    torch = pytest.importorskip("torch")
    from benchmarks import _torch_peers as tp
    from jaxmed.models.vgg_cam import VGGCAM

    widths, shape = (4, 8, 8, 16, 16), (2, 32, 32, 3)
    count, out = _params_and_output(VGGCAM(7, widths=widths, conv6_width=24), shape)
    peer = tp.vgg_cam(num_classes=7, widths=widths, conv6_width=24).eval()
    assert tp.count_params(peer) == count
    with torch.inference_mode():
        peer_out = peer(torch.zeros(_channels_first(shape)))
    assert tuple(peer_out["logits"].shape) == out["logits"].shape
    assert tuple(peer_out["features"].shape) == _channels_first(out["features"].shape)


@pytest.mark.parametrize("nsp", [2, 3])
def test_unet_peer(nsp):
    torch = pytest.importorskip("torch")
    from benchmarks import _torch_peers as tp
    from jaxmed.models.mapping_gan import UNet

    shape = (2, *(8,) * nsp, 1)
    count, out = _params_and_output(UNet(features=(4, 8, 8)), shape)
    peer = tp.unet(features=(4, 8, 8), nsp=nsp).eval()
    assert tp.count_params(peer) == count
    with torch.inference_mode():
        peer_out = peer(torch.zeros(_channels_first(shape)))
    assert tuple(peer_out.shape) == _channels_first(out.shape)


def test_dense_critic_peer():
    torch = pytest.importorskip("torch")
    from benchmarks import _torch_peers as tp
    from jaxmed.models.mapping_gan import Critic

    kw = dict(widths=(4, 8), growth_rate=4, layers_per_block=2, reduced_channels=4,
              head_features=4)
    shape = (2, 8, 8, 8, 1)
    count, out = _params_and_output(Critic(kind="dense", norm="layer", **kw), shape)
    peer = tp.dense_critic(**kw, input_size=shape[1:-1])
    assert tp.count_params(peer) == count
    x = torch.rand(_channels_first(shape), requires_grad=True)
    score = peer(x)
    assert tuple(score.shape) == out.shape
    # The gradient penalty differentiates the critic twice.
    (grad,) = torch.autograd.grad(score.sum(), x, create_graph=True)
    grad.square().sum().backward()
