"""Batch extraction: outputs against an independent computation (OpenSlide's pixels), padding,
the index, resume after SIGKILL, process sharding (explicit and jax.distributed), bad slides,
refusals, and the slide lists."""

import csv
import os
import signal
import subprocess
import sys
import time

import numpy as np
import openslide
import pytest
import tifffile

from jaxmed.data.slide import open_slide
from jaxmed.data.slide_writer import write_slide
from jaxmed.data.synthetic_slide import make_synthetic_slide, write_synthetic_slide
from jaxmed.errors import InputDataError
from jaxmed.pathology.extract import (
    INDEX_COLUMNS,
    ExtractionReport,
    TilingOptions,
    extract_slides,
    list_slides,
    read_features,
    slide_stem,
)
from jaxmed.pathology.tiles import tile_grid
from jaxmed.pathology.tissue import tissue_mask
from tests.pathology.extract_worker import TILE, ToyFeaturizer, slide_offset
from tests.programs import ROOT, free_port

BATCH = 4
SIZE = (1024, 1024)
MPP = 2.0  # coarse pixels: the default tissue-area filters keep islands of a 1024^2 slide
STEMS = ("s0", "s1", "s2")


def write_test_slide(path, seed):
    design = make_synthetic_slide(SIZE, seed=seed, tissue_fraction=0.45)
    return write_synthetic_slide(path, design, tile=128, mpp=MPP, annotations=False)


def extract(slides, output, featurizer=None, **options):
    options = {"batch_size": BATCH, "readers": 2, "prefetch_batches": 2, "progress": False,
               **options}
    return extract_slides(slides, output, featurizer or ToyFeaturizer(), **options)


def index_rows(output):
    with open(output / "index.csv", newline="") as file:
        reader = csv.DictReader(file)
        assert tuple(reader.fieldnames) == INDEX_COLUMNS
        return list(reader)


def final_files(output):
    return sorted(p.name for p in output.iterdir() if not p.name.startswith("."))


def assert_same_features(a, b):
    """Two slides' HDF5 contents agree (every dataset exactly, attributes but the timings)."""
    a, b = read_features(a), read_features(b)
    assert sorted(a) == sorted(b)
    for name in a:
        if name != "attributes":
            np.testing.assert_array_equal(a[name], b[name], err_msg=name)
    timing = {"seconds", "prepare_seconds"}
    assert ({k: str(v) for k, v in a["attributes"].items() if k not in timing}
            == {k: str(v) for k, v in b["attributes"].items() if k not in timing})


@pytest.fixture(scope="module")
def slides(tmp_path_factory):
    folder = tmp_path_factory.mktemp("slides")
    return [write_test_slide(folder / f"{stem}.tiff", seed) for seed, stem in enumerate(STEMS)]


@pytest.fixture(scope="module")
def reference(slides, tmp_path_factory):
    """One uninterrupted run over the three slides."""
    output = tmp_path_factory.mktemp("reference")
    featurizer = ToyFeaturizer()
    report = extract(slides, output, featurizer)
    return output, report, featurizer


# ---------------------------------------------------------------------------------------------
# Outputs
# ---------------------------------------------------------------------------------------------

def test_outputs_equal_an_independent_computation(slides, reference):
    """Per tile: mean RGB (+ the slide's offset from prepare) and top-left pixel of OpenSlide's
    level-0 read at tile_grid's coordinates; per slide: the mean of the tile means."""
    output, report, featurizer = reference
    counts = []
    for path in slides:
        with open_slide(path) as slide:
            grid = tile_grid(tissue_mask(slide), slide.dimensions, tile_size=TILE)
        reader = openslide.OpenSlide(str(path))
        pixels = np.stack([np.asarray(reader.read_region((int(x), int(y)), 0, (TILE, TILE))
                                      .convert("RGB")) for x, y in grid.coords])
        reader.close()
        means = pixels.astype(np.float64).mean(axis=(1, 2)) + slide_offset(path.name)
        found = read_features(output / f"{slide_stem(path)}.h5")
        np.testing.assert_array_equal(found["coords"], grid.coords)
        assert found["coords"].dtype == np.int64
        np.testing.assert_allclose(found["mean"], means, rtol=1e-6)
        np.testing.assert_array_equal(found["corner"], pixels[:, 0, 0])
        np.testing.assert_allclose(found["slide_mean"], means.mean(axis=0), rtol=1e-6)
        attributes = found["attributes"]
        assert attributes["complete"] is True and attributes["tiles"] == len(grid)
        assert (attributes["slide"], attributes["stem"]) == (str(path), path.stem)
        assert attributes["tile_size"] == TILE
        np.testing.assert_array_equal(attributes["dimensions"], SIZE)
        np.testing.assert_array_equal(attributes["mpp"], (MPP, MPP))
        assert (attributes["mask_level"], attributes["mask_downsample"]) == (grid.mask_level,
                                                                             grid.mask_downsample)
        assert attributes["fingerprint"] == "toy-1" and attributes["widths"] == [8, 16]
        counts.append(len(grid))
    assert any(n % BATCH for n in counts), counts  # a padded last batch was dropped
    assert min(counts) > 2 * BATCH, counts  # several batches per slide
    assert report.done == 3 and report.skipped == report.failed == 0
    assert report.tiles == sum(counts)
    rows = index_rows(output)
    assert [(r["slide"], r["status"], int(r["tiles"]), r["error"]) for r in rows] == [
        (str(p), "ok", n, "") for p, n in zip(slides, counts, strict=True)]
    assert final_files(output) == ["index.csv", "s0.h5", "s1.h5", "s2.h5"]
    assert report.records == [{**r, "tiles": int(r["tiles"]), "seconds": float(r["seconds"])}
                              for r in rows]


def test_every_batch_is_padded_to_the_batch_size_and_input_wait_is_measured(reference):
    _, report, featurizer = reference
    assert len(featurizer.seen) == sum(-(-r["tiles"] // BATCH) for r in report.records)
    assert set(featurizer.seen) == {((BATCH, TILE, TILE, 3), np.dtype(np.uint8), 1)}
    assert 0 < report.input_wait_seconds < report.seconds


def test_a_rerun_skips_complete_slides_and_changes_nothing(slides, reference, tmp_path):
    output, _, _ = reference
    before = sorted((p.name, p.stat().st_mtime_ns) for p in output.glob("*.h5"))
    featurizer = ToyFeaturizer()
    report = extract(slides, output, featurizer)
    assert (report.done, report.skipped, report.failed, report.tiles) == (0, 3, 0, 0)
    assert featurizer.seen == []
    assert sorted((p.name, p.stat().st_mtime_ns) for p in output.glob("*.h5")) == before
    assert [r["status"] for r in index_rows(output)] == ["ok"] * 3


def test_files_of_another_model_or_tiling_are_refused_before_any_work(slides, reference):
    output, _, _ = reference
    before = sorted((p.name, p.stat().st_mtime_ns) for p in output.rglob("*"))
    other = ToyFeaturizer(fingerprint="toy-2")
    with pytest.raises(InputDataError, match="s0.h5: features made by another model; use a "
                                             "new --output"):
        extract(slides, output, other)
    with pytest.raises(InputDataError, match="s0.h5: tiles found with other options"):
        extract(slides, output, tiling=TilingOptions(min_corners=4))
    assert other.seen == []
    assert sorted((p.name, p.stat().st_mtime_ns) for p in output.rglob("*")) == before


# ---------------------------------------------------------------------------------------------
# Resume after a kill, several processes
# ---------------------------------------------------------------------------------------------

def worker_env(devices=1):
    return {"PYTHONPATH": str(ROOT), "JAX_PLATFORMS": "cpu", "PATH": os.environ["PATH"],
            "XLA_FLAGS": f"--xla_force_host_platform_device_count={devices}"}


def worker(output, slides, *extra):
    return [sys.executable, "-m", "tests.pathology.extract_worker", str(output),
            *map(str, slides), *extra]


def test_resume_after_sigkill_loses_only_the_slide_in_progress(slides, reference, tmp_path):
    """The worker finishes s0, then hangs preparing s1 and is killed: s0's file and row survive,
    nothing stands under a final name for s1, and the rerun equals an uninterrupted run."""
    output = tmp_path / "out"
    proc = subprocess.Popen(worker(output, slides, "--hold", "s1"), cwd=ROOT, env=worker_env(),
                            stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    try:
        deadline = time.monotonic() + 120
        while not ((output / "index.csv").exists() and index_rows(output)):
            assert proc.poll() is None, proc.communicate()[1][-3000:]
            assert time.monotonic() < deadline, "the worker did not finish its first slide"
            time.sleep(0.1)
        time.sleep(0.3)  # it is now preparing s1, forever
    finally:
        proc.send_signal(signal.SIGKILL)
        proc.communicate()
    assert final_files(output) == ["index.csv", "s0.h5"]
    assert [(r["slide"], r["status"]) for r in index_rows(output)] == [(str(slides[0]), "ok")]
    (output / ".s1.h5.x1.partial").write_bytes(b"half")  # as a kill while writing leaves
    (output / ".records" / ".s2.json.x2.partial").write_bytes(b"{")

    report = extract(slides, output)
    assert (report.done, report.skipped, report.failed) == (2, 1, 0)
    assert final_files(output) == final_files(reference[0])
    for stem in STEMS:
        assert_same_features(output / f"{stem}.h5", reference[0] / f"{stem}.h5")
    assert ([(r["slide"], r["status"], r["tiles"]) for r in index_rows(output)]
            == [(r["slide"], r["status"], r["tiles"]) for r in index_rows(reference[0])])
    assert not list(output.rglob("*.partial"))


def test_two_processes_take_disjoint_halves_and_the_index_lists_all(slides, reference,
                                                                    tmp_path):
    output = tmp_path / "out"
    first = extract(slides, output, process_index=0, process_count=2)
    assert [r["slide"] for r in index_rows(output)] == [str(slides[0]), str(slides[2])]
    second = extract(slides, output, process_index=1, process_count=2)
    assert [r["slide"] for r in first.records] == [str(slides[0]), str(slides[2])]
    assert [r["slide"] for r in second.records] == [str(slides[1])]
    assert first.done + second.done == 3 and first.skipped == second.skipped == 0
    assert ([(r["slide"], r["status"]) for r in index_rows(output)]
            == [(str(p), "ok") for p in slides])
    for stem in STEMS:
        assert_same_features(output / f"{stem}.h5", reference[0] / f"{stem}.h5")


def test_two_jax_distributed_processes_share_the_slides(slides, reference, tmp_path):
    """Two hosts of 2 devices each: every batch is split over the host's own 2 devices."""
    output = tmp_path / "out"
    address = f"127.0.0.1:{free_port()}"
    procs = [subprocess.Popen(worker(output, slides, "--coordinator", address, "--process-id",
                                     str(i)), cwd=ROOT, env=worker_env(devices=2),
                              stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
             for i in range(2)]
    results = [p.communicate(timeout=300) for p in procs]
    for proc, (_, err) in zip(procs, results, strict=True):
        assert proc.returncode == 0, err[-3000:]
    reports = [[line for line in out.splitlines() if line.startswith("report")]
               for out, _ in results]
    tiles = [r["tiles"] for r in reference[1].records]
    # process, done, skipped, failed, tiles, devices of every batch, total devices
    assert reports == [[f"report 0 2 0 0 {tiles[0] + tiles[2]} [2] 4"],
                       [f"report 1 1 0 0 {tiles[1]} [2] 4"]]
    assert ([(r["slide"], r["status"]) for r in index_rows(output)]
            == [(str(p), "ok") for p in slides])
    for stem in STEMS:
        assert_same_features(output / f"{stem}.h5", reference[0] / f"{stem}.h5")


# ---------------------------------------------------------------------------------------------
# Bad slides
# ---------------------------------------------------------------------------------------------

@pytest.fixture(scope="module")
def bad_slides(slides, tmp_path_factory):
    folder = tmp_path_factory.mktemp("bad")
    truncated = write_test_slide(folder / "truncated.tiff", 1)
    truncated.write_bytes(truncated.read_bytes()[:5000])
    damaged = write_test_slide(folder / "damaged.tiff", 0)
    with tifffile.TiffFile(damaged) as tif:  # level 0's tiles overwritten: read errors
        page = tif.pages[0]
        spans = list(zip(page.dataoffsets, page.databytecounts, strict=True))
    with open(damaged, "r+b") as file:
        for offset, count in spans:
            file.seek(offset)
            file.write(b"\x00" * count)
    stripped = write_slide(folder / "stripped.tiff", np.full((512, 512, 3), 200, np.uint8),
                           layout="stripped", compression="zlib")
    rng = np.random.default_rng(0)
    glass = write_slide(folder / "glass.tiff",
                        rng.integers(244, 250, (1024, 1024, 3)).astype(np.uint8),
                        compression="zlib", mpp=MPP, tile=128)
    return {"truncated": truncated, "damaged": damaged, "missing": folder / "missing.svs",
            "stripped": stripped, "glass": glass}


def test_bad_slides_are_recorded_and_the_run_goes_on(slides, bad_slides, reference, tmp_path):
    output = tmp_path / "out"
    report = extract([*bad_slides.values(), slides[1]], output)
    assert (report.done, report.failed, report.skipped) == (1, 5, 0)
    rows = {r["slide"]: r for r in index_rows(output)}
    assert rows[str(slides[1])]["status"] == "ok"
    expected = {"truncated": "truncated or damaged", "damaged": "cannot be decoded",
                "missing": "slide file not found", "stripped": "not tiled",
                "glass": "no tissue tiles"}
    for name, words in expected.items():
        row = rows[str(bad_slides[name])]
        assert row["status"] == "failed" and row["tiles"] == "0", row
        assert row["error"].startswith(str(bad_slides[name])) and words in row["error"], row
        assert "\n" not in row["error"]
    assert final_files(output) == ["index.csv", "s1.h5"]
    assert_same_features(output / "s1.h5", reference[0] / "s1.h5")

    records = sorted((p.name, p.stat().st_mtime_ns) for p in (output / ".records").iterdir())
    again = extract([*bad_slides.values(), slides[1]], output)
    assert (again.done, again.skipped, again.failed) == (0, 1, 5)  # failures not retried
    assert sorted((p.name, p.stat().st_mtime_ns)
                  for p in (output / ".records").iterdir()) == records
    retried = extract([*bad_slides.values(), slides[1]], output, retry_failed=True)
    assert (retried.done, retried.skipped, retried.failed) == (0, 1, 5)
    assert sorted((p.name, p.stat().st_mtime_ns)
                  for p in (output / ".records").iterdir()) != records


class _BuggyFeaturizer(ToyFeaturizer):
    def prepare(self, slide, grid):
        raise TypeError("a bug, not a bad slide")


def test_a_programming_error_propagates(slides, tmp_path):
    with pytest.raises(TypeError, match="a bug"):
        extract(slides, tmp_path / "out", _BuggyFeaturizer())


def test_bad_options_are_refused(slides, tmp_path):
    class NoFingerprint(ToyFeaturizer):
        def attributes(self):
            return {"widths": 1}

    class Reserved(ToyFeaturizer):
        def attributes(self):
            return {"fingerprint": "x", "tiles": 3}

    with pytest.raises(ValueError, match="'fingerprint'"):
        extract(slides, tmp_path / "a", NoFingerprint())
    with pytest.raises(ValueError, match=r"names the engine writes: \['tiles'\]"):
        extract(slides, tmp_path / "b", Reserved())
    with pytest.raises(ValueError, match="batch_size"):
        extract(slides, tmp_path / "c", batch_size=0)
    assert not (tmp_path / "a").exists()
    report = extract([], tmp_path / "d")
    assert report == ExtractionReport(0, 0, 0, 0, report.seconds, 0.0, [])


# ---------------------------------------------------------------------------------------------
# Slide lists
# ---------------------------------------------------------------------------------------------

def test_list_slides_reads_folders_text_files_csv_and_lists(tmp_path):
    folder = tmp_path / "slides"
    folder.mkdir()
    for name in ("b.svs", "a.tiff", "c.ome.tif", "d.TIF", "notes.txt", ".hidden.tif", "e.ndpi"):
        (folder / name).write_bytes(b"")
    assert [p.name for p in list_slides(folder)] == ["a.tiff", "b.svs", "c.ome.tif", "d.TIF",
                                                     "e.ndpi"]
    assert slide_stem(folder / "c.ome.tif") == "c" and slide_stem("x/d.TIF") == "d"
    text = tmp_path / "list.txt"
    text.write_text(f"# the cohort\nslides/b.svs\n\n  {folder / 'a.tiff'}\n# done\n")
    assert list_slides(text) == [tmp_path / "slides/b.svs", folder / "a.tiff"]
    table = tmp_path / "list.csv"
    table.write_text("path,label\nslides/a.tiff,1\nslides/missing.svs,0\n")
    assert list_slides(table) == [folder / "a.tiff", folder / "missing.svs"]
    assert list_slides(["x/1.svs", "y/2.svs"]) == [tmp_path.__class__("x/1.svs"),
                                                   tmp_path.__class__("y/2.svs")]
    assert list_slides(folder / "a.tiff") == [folder / "a.tiff"]


def test_list_slides_errors_name_the_problem(tmp_path):
    with pytest.raises(InputDataError, match="nowhere: no such folder or file"):
        list_slides(tmp_path / "nowhere")
    (tmp_path / "empty").mkdir()
    with pytest.raises(InputDataError, match="empty: the folder holds no slide"):
        list_slides(tmp_path / "empty")
    table = tmp_path / "list.csv"
    table.write_text("file,label\na.svs,1\n")
    with pytest.raises(InputDataError, match="list.csv: the CSV has no 'slide' or 'path'"):
        list_slides(table)
    comments = tmp_path / "list.txt"
    comments.write_text("# nothing\n\n")
    with pytest.raises(InputDataError, match="list.txt: lists no slide"):
        list_slides(comments)
    with pytest.raises(InputDataError, match="two slides with the stem 'a'"):
        list_slides(["one/a.svs", "two/a.tiff"])
    with pytest.raises(InputDataError, match="two slides with the stem 'a'"):
        extract_slides(["one/a.svs", "two/a.tiff"], tmp_path / "out", ToyFeaturizer())
