"""`training.evaluate`: padded, sharded evaluation, each process holding its own share."""

import subprocess
import sys
import textwrap

import numpy as np
import pytest

from jaxmed import training
from tests.programs import ROOT, free_port


def _scaled(state, batch):
    # x: [B, 3] -> per-example outputs [B, 3] and [B]
    return {"y": batch["x"] * state["w"], "total": batch["x"].sum(-1)}


def _examples(count):
    return np.arange(count * 3, dtype=np.float32).reshape(count, 3)


@pytest.mark.parametrize("count, processes", [(10, 3), (2, 4), (7, 1), (0, 2)])
def test_host_shares_are_contiguous_and_cover_every_example_once(count, processes):
    shares = [training.host_share(count, p, processes) for p in range(processes)]
    rows = np.concatenate([np.arange(count)[s] for s in shares])
    np.testing.assert_array_equal(rows, np.arange(count))
    sizes = [s.stop - s.start for s in shares]
    assert max(sizes) - min(sizes) <= 1 and sizes == sorted(sizes, reverse=True)


@pytest.mark.parametrize("count", [1, 8, 13])
def test_outputs_match_the_examples_in_order_and_padding_is_dropped(count):
    x = _examples(count)
    state = training.replicate({"w": np.float32(2.0)}, training.make_mesh())
    outputs = training.evaluate(_scaled, state, {"x": x}, count=count, batch_size=8)
    assert sorted(outputs) == ["index", "total", "y"]
    np.testing.assert_array_equal(outputs["index"], np.arange(count))
    np.testing.assert_array_equal(outputs["y"], 2 * x)
    np.testing.assert_array_equal(outputs["total"], x.sum(-1))
    batches = list(training.evaluate_batches(_scaled, state, {"x": x}, count=count,
                                             batch_size=8))
    assert [len(b["index"]) for b in batches] == [min(8, count - 8 * i)
                                                  for i in range(-(-count // 8))]


def test_a_share_of_the_wrong_length_is_refused():
    state = training.replicate({"w": np.float32(1.0)}, training.make_mesh())
    with pytest.raises(ValueError, match="holds \\[4\\] examples, its share of 5 is 5"):
        training.evaluate(_scaled, state, {"x": _examples(4)}, count=5, batch_size=4)


_SCRIPT = textwrap.dedent("""
    import sys
    import numpy as np
    import jax
    if len(sys.argv) > 1:
        jax.distributed.initialize(sys.argv[1], 2, int(sys.argv[2]))
    from jaxmed import training
    from tests.training.test_evaluate import _examples, _scaled
    count = 21
    x = _examples(count)[training.host_share(count)]
    state = training.replicate({"w": np.float32(3.0)}, training.make_mesh())
    out = training.evaluate(_scaled, state, {"x": x}, count=count, batch_size=8)
    assert jax.device_count() == 8, jax.device_count()
    np.testing.assert_array_equal(out["index"], np.arange(count))
    np.testing.assert_array_equal(out["y"], 3 * _examples(count))
    print("ok", jax.process_index(), len(x))
""")


def _env(devices):
    return {"PYTHONPATH": str(ROOT), "JAX_PLATFORMS": "cpu", "PATH": "/usr/bin:/bin",
            "XLA_FLAGS": f"--xla_force_host_platform_device_count={devices}"}


def test_eight_devices_one_process():
    done = subprocess.run([sys.executable, "-c", _SCRIPT], cwd=ROOT, env=_env(8),
                          capture_output=True, text=True, timeout=300)
    assert done.returncode == 0, done.stderr[-3000:]
    assert done.stdout.split() == ["ok", "0", "21"]


def test_two_processes_each_pass_their_share_and_both_get_every_output():
    address = f"127.0.0.1:{free_port()}"
    procs = [subprocess.Popen([sys.executable, "-c", _SCRIPT, address, str(i)], cwd=ROOT,
                              env=_env(4), stdout=subprocess.PIPE, stderr=subprocess.PIPE,
                              text=True) for i in range(2)]
    results = [p.communicate(timeout=300) for p in procs]
    for proc, (out, err) in zip(procs, results):
        assert proc.returncode == 0, err[-3000:]
    lines = [[line for line in out.splitlines() if line.startswith("ok")] for out, _ in results]
    assert lines == [["ok 0 11"], ["ok 1 10"]]
