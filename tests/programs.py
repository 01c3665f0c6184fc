"""Running `python -m train.<name>` programs from tests, in subprocesses.

Nearly all of a tiny run's time is XLA compiling on 2 cores, so a test module starts its
independent runs together, sharing one persistent compilation cache, in phases: the first
pytest process (xdist worker) to need a phase starts it (`once`), and every process then waits
for the job's files (`Job.result`). The runs' folder, output and exit status are files in one
session-wide folder (`session_folder`).
"""

import fcntl
import json
import os
import pathlib
import signal
import socket
import subprocess
import sys
import time
import warnings

ROOT = pathlib.Path(__file__).resolve().parents[1]
TIMEOUT = 600
PNG_MAGIC = b"\x89PNG\r\n\x1a\n"


def session_folder(tmp_path_factory, name: str) -> pathlib.Path:
    """One folder for the whole session, shared by xdist workers (so the runs happen once)."""
    base = tmp_path_factory.getbasetemp()
    folder = (base.parent if "PYTEST_XDIST_WORKER" in os.environ else base) / name
    folder.mkdir(exist_ok=True)
    return folder


# Runs a command and then writes its exit status to a file (atomically), so that any pytest
# process, including another xdist worker, can wait for it.
_WRAPPER = ("import os, subprocess, sys; code = subprocess.call(sys.argv[2:]); "
            "open(sys.argv[1] + '.tmp', 'w').write(str(code)); "
            "os.replace(sys.argv[1] + '.tmp', sys.argv[1])")


class Job:
    """A subprocess whose output and exit status land in files `<folder>/<name>.*`."""

    def __init__(self, folder: pathlib.Path, name: str):
        self.name, self.proc = name, None
        self.files = {kind: folder / f"{name}.{kind}"
                      for kind in ("args", "stdout", "stderr", "status")}

    def start(self, args: list[str], env: dict) -> None:
        self.files["args"].write_text(json.dumps(args))
        with open(self.files["stdout"], "w") as out, open(self.files["stderr"], "w") as err:
            command = [sys.executable, "-c", _WRAPPER, str(self.files["status"]), *args]
            self.proc = subprocess.Popen(command, cwd=ROOT, env=env, stdout=out, stderr=err,
                                         start_new_session=True)

    def result(self) -> subprocess.CompletedProcess:
        deadline = time.monotonic() + TIMEOUT
        while not self.files["status"].exists():
            assert time.monotonic() < deadline, f"{self.name} did not finish in {TIMEOUT} s"
            time.sleep(0.2)
        return subprocess.CompletedProcess(json.loads(self.files["args"].read_text()),
                                           int(self.files["status"].read_text()),
                                           self.files["stdout"].read_text(),
                                           self.files["stderr"].read_text())

    def ok(self) -> subprocess.CompletedProcess:
        done = self.result()
        assert done.returncode == 0, (f"{self.name}: {' '.join(done.args)}\n--- stdout\n"
                                      f"{done.stdout[-3000:]}\n--- stderr\n{done.stderr[-5000:]}")
        return done

    def finish(self) -> None:
        """If this process started the job: wait for it, and end it (its process group) after
        the time limit."""
        if self.proc is None:
            return
        try:
            self.proc.wait(timeout=TIMEOUT)
        except subprocess.TimeoutExpired:
            os.killpg(self.proc.pid, signal.SIGKILL)
            self.proc.wait()


def once(shared: pathlib.Path, phase: str, launch) -> None:
    """Calls `launch()` in the first pytest process that gets here; xdist workers share `shared`."""
    with open(shared / f"{phase}.lock", "w") as lock:
        fcntl.flock(lock, fcntl.LOCK_EX)
        marker = shared / f"{phase}.started"
        if not marker.exists():
            launch()
            marker.touch()


def program_env(cache_dir: pathlib.Path, devices: int = 1) -> dict:
    # The non-partitionable threefry compiles the initialisers' random draws ~5x faster on
    # XLA:CPU (see tests/conftest.py): ~15 s less per cold run. Only the random values change.
    env = dict(os.environ, JAX_PLATFORMS="cpu", JAX_COMPILATION_CACHE_DIR=str(cache_dir),
               JAX_THREEFRY_PARTITIONABLE="false",
               XLA_FLAGS=f"--xla_force_host_platform_device_count={devices}")
    env["PYTHONPATH"] = os.pathsep.join([str(ROOT), env.get("PYTHONPATH", "")])
    return env


def metrics_rows(workdir: pathlib.Path) -> list[dict]:
    lines = (workdir / "metrics.jsonl").read_text().splitlines()
    return [json.loads(line) for line in lines if line.strip()]


def snapshot(folder: pathlib.Path) -> list[tuple]:
    """Every file and folder under `folder` with its size and modification time."""
    return sorted((str(p.relative_to(folder)), p.stat().st_size, p.stat().st_mtime_ns)
                  for p in folder.rglob("*"))




def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def start_two_processes(folder: pathlib.Path, name: str, args: list[str], env: dict) -> list[Job]:
    """Start `args` (a `python -m train.<name> ...` command line) as two `jax.distributed`
    processes on localhost, jobs `<name>.0` and `<name>.1`."""
    address = f"127.0.0.1:{free_port()}"
    jobs = []
    for i in range(2):
        job = Job(folder, f"{name}.{i}")
        job.start([*args, "--coordinator-address", address, "--num-processes", "2",
                   "--process-id", str(i)], env)
        jobs.append(job)
    return jobs


def checkpoint_arrays(workdir: pathlib.Path, kind: str = "checkpoints") -> dict:
    """`{'/'-joined path: numpy array}` of the newest checkpoint in `workdir/<kind>` (the
    train state: params, batch_stats, opt_state, ...)."""
    import jax
    import numpy as np
    import orbax.checkpoint as ocp

    steps = sorted((p for p in (workdir / kind).iterdir() if p.name.isdigit()),
                   key=lambda p: int(p.name))
    assert steps, f"no checkpoint in {workdir / kind}"
    path = steps[-1].resolve() / "state"
    checkpointer = ocp.PyTreeCheckpointer()
    # Onto this process's first device: the saved shardings name the devices of the run, which
    # a multi-process run's checkpoint has more of than this process.
    sharding = jax.sharding.SingleDeviceSharding(jax.devices()[0])
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")  # no _CHECKPOINT_METADATA beside a bare state
        saved = checkpointer.metadata(path).item_metadata.tree
        restore_args = jax.tree.map(lambda _: ocp.ArrayRestoreArgs(sharding=sharding), saved)
        tree = checkpointer.restore(path, args=ocp.args.PyTreeRestore(restore_args=restore_args))

    def walk(node, prefix=""):
        if isinstance(node, dict):
            for k, v in node.items():
                yield from walk(v, f"{prefix}/{k}" if prefix else str(k))
        elif isinstance(node, list | tuple | np.ndarray) and np.asarray(node).dtype == object:
            for i, v in enumerate(node):  # e.g. optax's chained states
                yield from walk(v, f"{prefix}/{i}")
        elif node is not None:  # None: an empty optimiser state
            yield prefix, np.asarray(node)

    return dict(walk(tree))


def assert_same_arrays(a: dict, b: dict, *, rtol: float = 1e-5, atol: float = 1e-6) -> None:
    """Two `checkpoint_arrays` results hold the same paths and (close) values."""
    import numpy as np

    assert sorted(a) == sorted(b)
    for path in a:
        np.testing.assert_allclose(a[path], b[path], rtol=rtol, atol=atol, err_msg=path)


def failure_message(done: subprocess.CompletedProcess) -> str:
    """The last line of a failed program's stderr, checked to be a clean `error: ...` line."""
    assert done.returncode != 0, done.stdout[-2000:]
    message = done.stderr.strip().splitlines()[-1] if done.stderr.strip() else ""
    assert message.startswith("error: ") and "Traceback" not in done.stderr, done.stderr[-3000:]
    return message


def parser_options(parser) -> list[str]:
    """Every long option string of an argparse parser (`--help` excluded)."""
    return sorted({o for action in parser._actions for o in action.option_strings
                   if o.startswith("--") and o != "--help"})


def assert_help_lists(module: str, parser, command: str | None = None, *,
                      readme_section: str | None = None) -> None:
    """`python -m <module> [command] --help` succeeds and names every option of `parser`
    (the parser the program builds); with `readme_section`, the README's section of that
    title names each of them too (the common training and distributed options are described
    once, in "What a run writes", and are not required there)."""
    args = [sys.executable, "-m", module, *([command] if command else []), "--help"]
    done = subprocess.run(args, cwd=ROOT, capture_output=True, text=True, timeout=TIMEOUT)
    assert done.returncode == 0, done.stderr
    options = parser_options(parser)
    assert options, "the parser has no options"
    missing = [o for o in options if o not in done.stdout]
    assert not missing, f"--help does not list {missing}"
    if readme_section is not None:
        section = readme_text(readme_section)
        common = set(parser_options(_common_parser()))
        absent = [o for o in options if o not in common and o not in section]
        assert not absent, f"README section {readme_section!r} does not mention {absent}"


def readme_text(title: str) -> str:
    """The README's section headed `### <title>` (up to the next heading)."""
    text = (ROOT / "README.md").read_text()
    start = text.index(f"### {title}\n")
    end = min((i for i in (text.find("\n#", start + 4),) if i != -1), default=len(text))
    return text[start:end]


def _common_parser():
    import argparse

    from jaxmed.training import add_training_args

    return add_training_args(argparse.ArgumentParser(), workdir="w", steps=1, batch_size=1)


def assert_resumed(job: Job, workdir: pathlib.Path, saved_step: int, steps: int) -> None:
    """The job continued `workdir` from its checkpoint at `saved_step` to `steps`, and the
    metrics log holds each step once."""
    done = job.ok()
    assert f"Resuming from step {saved_step}" in done.stdout + done.stderr
    assert [r["step"] for r in metrics_rows(workdir)] == list(range(1, steps + 1))


def assert_usage_error(done: subprocess.CompletedProcess, text: str) -> str:
    """A program that stopped on a usage error: exit status 2, no traceback, and `text` in the
    last line of its stderr (returned)."""
    assert done.returncode == 2 and "Traceback" not in done.stderr, done.stderr[-3000:]
    message = done.stderr.strip().splitlines()[-1]
    assert text in message, message
    return message


def assert_runs_match(workdir: pathlib.Path, other: pathlib.Path, metrics: list[str]) -> None:
    """Two runs (e.g. two processes and one process with as many devices) end with the same
    train state and logged the same validation `metrics` at the same steps."""
    assert_same_arrays(checkpoint_arrays(workdir), checkpoint_arrays(other))
    rows = [[r["step"], *(r[k] for k in metrics)] for r in metrics_rows(workdir) if metrics[0] in r]
    expected = [[r["step"], *(r[k] for k in metrics)] for r in metrics_rows(other)
                if metrics[0] in r]
    assert rows and rows == expected, (rows, expected)
