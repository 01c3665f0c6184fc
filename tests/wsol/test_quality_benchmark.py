"""`benchmarks/wsol_quality.py --resume`: finished runs are kept, unfinished ones continue, runs
whose options changed start afresh — so a benchmark of hours survives interruptions. (Without
`--resume` every run starts afresh, as the first invocation here shows on an empty directory.)"""

import json
import pathlib
import subprocess
import sys

ROOT = pathlib.Path(__file__).resolve().parents[2]
TINY = ["--image-size", "32", "--synthetic-images", "48", "--widths", "4,4,4,4,4",
        "--conv6-width", "8", "--batch-size", "8", "--figures", "0"]
RUNS = {"CAM": "none", "1 module (conv5_3)": "conv5_3",
        "2 modules (conv4_3, conv5_3)": "conv4_3+conv5_3"}


def _bench(workdir, *options):
    done = subprocess.run(
        [sys.executable, "benchmarks/wsol_quality.py", "--seeds", "1", "--steps", "2",
         "--workdir", str(workdir), *options, "--", *TINY],
        cwd=ROOT, capture_output=True, text=True, timeout=900)
    assert done.returncode == 0, done.stderr[-3000:]
    return done.stdout


def _row(stdout, variant):
    return next(line for line in stdout.splitlines() if line.strip().startswith(variant))


def test_resume_keeps_finished_continues_unfinished_and_redoes_changed(tmp_path):
    first = _bench(tmp_path, "--resume")
    assert "not trained again" not in first
    records = {name: tmp_path / d / "seed0" / "benchmark.json" for name, d in RUNS.items()}
    saved = {name: json.loads(path.read_text()) for name, path in records.items()}
    for record in saved.values():
        assert set(record) == {"options", "metrics", "seconds"} and record["seconds"] > 0
        assert 0 <= record["metrics"]["val_top1"] <= 100

    # CAM: interrupted after its last checkpoint; 1 module: run with other options; 2 modules: done.
    cam, one, two = records.values()
    cam.write_text(json.dumps({"options": saved["CAM"]["options"]}))
    changed = {**saved["1 module (conv5_3)"], "options": ["--steps", "7"]}
    one.write_text(json.dumps(changed))
    one_checkpoint = one.parent / "config.json"
    two_mtime = two.stat().st_mtime_ns
    marker = one.parent / "stale.txt"
    marker.write_text("from the run with other options")

    second = _bench(tmp_path, "--resume")
    assert second.count("not trained again") == 1 and str(two.parent) in second
    assert two.stat().st_mtime_ns == two_mtime
    continued = json.loads(cam.read_text())  # resumed at its final step: evaluated, time unknown
    assert continued["metrics"] == saved["CAM"]["metrics"] and continued["seconds"] is None
    assert _row(second, "CAM").split()[-1] == "-"
    redone = json.loads(one.read_text())  # started afresh in an emptied directory
    assert redone["options"] == saved["1 module (conv5_3)"]["options"] and redone["seconds"] > 0
    assert not marker.exists() and one_checkpoint.is_file()
    for variant in RUNS:  # same seed, data and steps: the same numbers
        assert _row(second, variant).split()[:-1] == _row(first, variant).split()[:-1]
