"""`python -m train.smoke` in subprocesses: 1 vs 8 devices, SIGTERM + resume,
two processes with `jax.distributed`.

All runs share one persistent compilation cache, so only the first run per
device layout pays XLA's compile time.
"""

import json
import os
import pathlib
import signal
import socket
import subprocess
import sys
import time

import numpy as np
import pytest

ROOT = pathlib.Path(__file__).resolve().parents[2]
STEPS = 24
ARGS = ["--steps", str(STEPS), "--log-every", "2", "--checkpoint-every", "8",
        "--eval-every", "8", "--num-train", "256", "--num-val", "64", "--no-progress"]
TIMEOUT = 240


@pytest.fixture(scope="module")
def cache_dir(tmp_path_factory):
    return tmp_path_factory.mktemp("jax_cache")


def _env(cache_dir, devices=1):
    env = dict(os.environ, JAX_PLATFORMS="cpu", JAX_COMPILATION_CACHE_DIR=str(cache_dir),
               XLA_FLAGS=f"--xla_force_host_platform_device_count={devices}")
    env["PYTHONPATH"] = os.pathsep.join([str(ROOT), env.get("PYTHONPATH", "")])
    return env


def _command(workdir, *extra):
    return [sys.executable, "-m", "train.smoke", "--workdir", str(workdir),
            "--save-params", str(workdir / "params.npz"), *ARGS, *extra]


def _run(workdir, cache_dir, *extra, devices=1):
    done = subprocess.run(_command(workdir, *extra), cwd=ROOT, env=_env(cache_dir, devices),
                          capture_output=True, text=True, timeout=TIMEOUT)
    assert done.returncode == 0, done.stderr[-3000:]
    return done


def _params(workdir):
    with np.load(workdir / "params.npz") as f:
        return dict(f)


def _steps_logged(workdir):
    path = workdir / "metrics.jsonl"
    if not path.exists():
        return []
    return [json.loads(line)["step"] for line in path.read_text().splitlines() if line.strip()]


@pytest.fixture(scope="module")
def reference(tmp_path_factory, cache_dir):
    """Uninterrupted single-device run: (workdir, final params)."""
    workdir = tmp_path_factory.mktemp("reference")
    done = _run(workdir, cache_dir)
    assert f"final step {STEPS}:" in done.stdout and "val_accuracy=" in done.stdout
    return workdir, _params(workdir)


def test_help_lists_every_option():
    done = subprocess.run([sys.executable, "-m", "train.smoke", "--help"], cwd=ROOT,
                          capture_output=True, text=True, timeout=TIMEOUT)
    assert done.returncode == 0
    for option in ("--workdir", "--steps", "--batch-size", "--seed", "--log-every",
                   "--checkpoint-every", "--eval-every", "--keep", "--progress",
                   "--coordinator-address", "--num-processes", "--process-id",
                   "--learning-rate", "--num-train", "--num-val", "--load-delay",
                   "--save-params"):
        assert option in done.stdout, option


def test_reference_run_outputs(reference):
    workdir, params = reference
    assert _steps_logged(workdir) == list(range(2, STEPS + 1, 2))
    assert sorted(os.listdir(workdir / "checkpoints")) == ["16", "24"]  # keep=2
    assert len(os.listdir(workdir / "best")) == 1
    assert os.listdir(workdir / "tensorboard")
    assert "['params']['Conv_0']['kernel']" in params


def test_eight_devices_match_one(reference, tmp_path, cache_dir):
    _run(tmp_path, cache_dir, devices=8)
    assert _params(tmp_path).keys() == reference[1].keys()
    _assert_params_close(tmp_path, reference[1])  # reductions split over 8 devices


def test_sigterm_then_resume_equals_uninterrupted_run_bitwise(reference, tmp_path, cache_dir):
    slow = ("--load-delay", "0.01")  # ~0.15 s per step: time to interrupt
    proc = subprocess.Popen(_command(tmp_path, *slow), cwd=ROOT, env=_env(cache_dir),
                            stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    try:
        deadline = time.monotonic() + TIMEOUT
        while not any(s >= 4 for s in _steps_logged(tmp_path)):
            assert proc.poll() is None and time.monotonic() < deadline, proc.communicate()
            time.sleep(0.05)
        proc.send_signal(signal.SIGTERM)
        out, err = proc.communicate(timeout=TIMEOUT)
    finally:
        proc.kill()
    assert proc.returncode == 0, err[-3000:]
    assert "Preempted (SIGTERM)" in out + err
    stopped_at = max(int(s) for s in os.listdir(tmp_path / "checkpoints"))
    assert 4 <= stopped_at < STEPS
    assert not (tmp_path / "params.npz").exists()  # the run stopped early

    resumed = _run(tmp_path, cache_dir, *slow)
    assert f"Resuming from step {stopped_at}" in resumed.stdout + resumed.stderr
    expected, got = reference[1], _params(tmp_path)
    for name in expected:  # same executable, same inputs: identical bits on CPU
        np.testing.assert_array_equal(got[name], expected[name], err_msg=name)
    logged = _steps_logged(tmp_path)
    assert logged == sorted(set(logged)) and logged[-1] == STEPS


def _free_port():
    with socket.socket() as s:
        s.bind(("localhost", 0))
        return s.getsockname()[1]


def _start_two_processes(workdir, cache_dir, *extra):
    address = f"localhost:{_free_port()}"
    return [subprocess.Popen(
        _command(workdir, "--coordinator-address", address, "--num-processes", "2",
                 "--process-id", str(i), *extra),
        cwd=ROOT, env=_env(cache_dir), stdout=subprocess.PIPE, stderr=subprocess.PIPE,
        text=True) for i in range(2)]


def _finish(procs):
    """[(stdout, stderr)] of each process, after asserting exit status 0."""
    try:
        outputs = [p.communicate(timeout=TIMEOUT) for p in procs]
    finally:
        for p in procs:
            p.kill()
    for p, (out, err) in zip(procs, outputs):
        assert p.returncode == 0, err[-3000:]
    return outputs


def _assert_params_close(workdir, expected):
    """Reductions split over devices or processes sum in another order, and Adam divides each
    gradient by its own running scale, so a parameter whose gradient is near zero can move by a
    few 1e-5 differently over 24 steps. One step more or less moves every parameter by about
    the learning rate (3e-3): the tolerance is well below that."""
    got = _params(workdir)
    for name in expected:
        np.testing.assert_allclose(got[name], expected[name], rtol=1e-4, atol=2e-4, err_msg=name)


def test_two_processes_match_one(reference, tmp_path, cache_dir):
    """Each process loads its own half of every global batch."""
    outputs = _finish(_start_two_processes(tmp_path, cache_dir))
    assert "final step" in outputs[0][0] and "final step" not in outputs[1][0]
    assert _steps_logged(tmp_path) == list(range(2, STEPS + 1, 2))  # process 0 only
    _assert_params_close(tmp_path, reference[1])


def test_sigterm_to_one_host_stops_both_at_one_step(reference, tmp_path, cache_dir):
    """JAX's preemption service: both processes save the same step and exit 0;
    the resumed two-process run still reproduces the single-process one."""
    slow = ("--load-delay", "0.01")
    procs = _start_two_processes(tmp_path, cache_dir, *slow)
    deadline = time.monotonic() + TIMEOUT
    while not any(s >= 4 for s in _steps_logged(tmp_path)):
        assert all(p.poll() is None for p in procs) and time.monotonic() < deadline
        time.sleep(0.05)
    procs[1].send_signal(signal.SIGTERM)
    outputs = _finish(procs)
    assert "Preempted (SIGTERM)" in outputs[0][0]
    stopped_at = max(int(s) for s in os.listdir(tmp_path / "checkpoints"))
    assert 4 <= stopped_at < STEPS

    outputs = _finish(_start_two_processes(tmp_path, cache_dir, *slow))
    assert f"Resuming from step {stopped_at}" in outputs[0][0]
    _assert_params_close(tmp_path, reference[1])
