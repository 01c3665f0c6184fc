"""Window search, libraries, their files, distinct selection and purity against independent
references: NumPy loops for the box filter, brute-force Python searches for both window rules
and for greedy max–min, closed forms for overlap, purity and the overlay."""

import csv
import itertools

import jax
import numpy as np
import pytest
from matplotlib import colormaps

from jaxmed.atlas import library as library_module
from jaxmed.atlas.library import (
    INDEX_COLUMNS,
    Library,
    build_libraries,
    choose_distinct,
    greedy_max_min,
    library_overlap,
    library_purity,
    overlap_matrix,
    overlay,
    read_libraries,
    select_windows,
    window_means,
    write_libraries,
)
from jaxmed.errors import InputDataError


def _rng(seed=0):
    return np.random.default_rng(seed)


def _maps(shape, seed=0, levels=None):
    """Random heat maps in [0, 1]; with `levels`, multiples of 1/levels (dyadic: the window
    sums are exact, and plateaus and ties are common)."""
    values = _rng(seed).random(shape)
    if levels is not None:
        values = np.floor(values * levels) / levels
    return values.astype(np.float32)


# --- NumPy / Python references ----------------------------------------------------------------


def np_window_means(heat, size):
    """Loops over every window position, in float64."""
    h, w = heat.shape[-2:]
    out = np.zeros(heat.shape[:-2] + (h - size + 1, w - size + 1))
    for y in range(h - size + 1):
        for x in range(w - size + 1):
            out[..., y, x] = heat[..., y:y + size, x:x + size].astype(np.float64).mean((-2, -1))
    return out


def iou(a, b, size):
    (ya, xa), (yb, xb) = a, b
    inter = max(0, size - abs(ya - yb)) * max(0, size - abs(xa - xb))
    return inter / (2 * size * size - inter)


def brute_peaks(means, radius, min_score, k):
    """Every position compared with every other in its neighbourhood: a peak beats earlier
    (row-major) neighbours strictly and later ones or equals; the k best, ties row-major."""
    p, q = means.shape
    means = means.tolist()  # Python floats: exact, and fast to compare
    peaks = []
    for y, x in itertools.product(range(p), range(q)):
        if not means[y][x] > min_score:
            continue
        ok = True
        for yy, xx in itertools.product(range(max(0, y - radius), min(p, y + radius + 1)),
                                        range(max(0, x - radius), min(q, x + radius + 1))):
            if (yy, xx) == (y, x):
                continue
            earlier = (yy, xx) < (y, x)
            if means[yy][xx] > means[y][x] or (earlier and means[yy][xx] == means[y][x]):
                ok = False
        if ok:
            peaks.append((y, x))
    peaks.sort(key=lambda pos: (-means[pos[0]][pos[1]], pos))
    return peaks[:k]


def brute_mean(means, size, min_score, max_overlap, k):
    """Sequential non-maximum suppression over the sorted candidates."""
    p, q = means.shape
    candidates = [(y, x) for y, x in itertools.product(range(p), range(q))
                  if means[y, x] >= min_score]
    candidates.sort(key=lambda pos: (-means[pos], pos))
    taken = []
    for pos in candidates:
        if all(iou(pos, t, size) <= max_overlap for t in taken):
            taken.append(pos)
        if len(taken) == k:
            break
    return taken


def found(windows, index=()):
    """The valid windows of one map as [(y0, x0)], best first."""
    y0, x0, valid = (np.asarray(f)[index] for f in (windows.y0, windows.x0, windows.valid))
    assert list(valid) == sorted(valid, reverse=True)  # the valid slots are a prefix
    return [(int(y), int(x)) for y, x, v in zip(y0, x0, valid) if v]


# --- window means -----------------------------------------------------------------------------


@pytest.mark.parametrize("size", [1, 4, 9])
def test_window_means_equal_loops(size):
    heat = _maps((2, 3, 9, 11), seed=size)
    means = np.asarray(jax.jit(window_means, static_argnums=1)(heat, size))
    assert means.shape == (2, 3, 9 - size + 1, 11 - size + 1)
    np.testing.assert_allclose(means, np_window_means(heat, size), rtol=1e-6, atol=1e-6)


def test_window_means_equal_on_equal_contents():
    """A plateau stays a plateau: equal windows get bit-equal means."""
    means = np.asarray(window_means(np.full((30, 30), 0.3, np.float32), 7))
    assert np.unique(means).size == 1


def test_window_larger_than_image_names_both_sizes():
    with pytest.raises(ValueError, match=r"13×13 pixels is larger than the 12×16 images"):
        window_means(np.zeros((12, 16)), 13)
    with pytest.raises(ValueError, match="larger than"):
        select_windows(np.zeros((2, 12, 12)), 13)
    with pytest.raises(ValueError, match="rule"):
        select_windows(np.zeros((12, 12)), 4, rule="maxima")


# --- window selection -------------------------------------------------------------------------


@pytest.mark.parametrize("levels", [None, 4, 2])
def test_peaks_equal_brute_force(levels):
    """Continuous maps and quantized ones (plateaus, ties), default and other radii, a min_score
    that leaves few or no windows."""
    heat = _maps((6, 14, 14), seed=1 if levels is None else levels, levels=levels)
    heat[5] = 0.25  # a constant map: one plateau, one peak at (0, 0)
    size, k = 5, 5
    for radius, min_score in ((None, 0.0), (1, 0.55), (4, 2.0)):
        windows = select_windows(heat, size, min_score=min_score, max_windows=k, radius=radius)
        means = np.asarray(window_means(heat, size))
        r = 3 if radius is None else radius  # ⌈5 / 2⌉
        for i in range(len(heat)):
            expected = brute_peaks(means[i], r, min_score, k)
            assert found(windows, i) == expected, (levels, radius, i)
            np.testing.assert_array_equal(np.asarray(windows.score[i])[:len(expected)],
                                          [means[i][pos] for pos in expected])
        if min_score > 1:
            assert not np.asarray(windows.valid).any()
    assert found(select_windows(heat[5], size, max_windows=k)) == [(0, 0)]


@pytest.mark.parametrize("levels", [None, 2])
def test_mean_rule_equals_brute_force(levels):
    heat = _maps((5, 13, 13), seed=7, levels=levels)
    size, k = 5, 4
    for min_score, max_overlap in ((0.4, 0.3), (0.5, 0.0), (0.0, 0.6), (1.5, 0.3)):
        windows = select_windows(heat, size, rule="mean", min_score=min_score, max_windows=k,
                                 max_overlap=max_overlap)
        means = np.asarray(window_means(heat, size))
        for i in range(len(heat)):
            assert found(windows, i) == brute_mean(means[i], size, min_score, max_overlap, k)
    assert not np.asarray(windows.valid).any()  # min_score 1.5: nothing is that hot


def test_min_score_is_inclusive_for_mean_and_strict_for_peaks():
    heat = _maps((13, 13), seed=8, levels=4)
    top = float(np.asarray(window_means(heat, 5)).max())
    assert found(select_windows(heat, 5, rule="mean", min_score=top, max_windows=2))
    assert not found(select_windows(heat, 5, rule="peaks", min_score=top, max_windows=2))


def test_stack_equals_per_map_calls_and_vmap():
    heat = _maps((3, 4, 16, 16), seed=3, levels=8)  # [n_nodes, B, H, W]
    for rule in ("peaks", "mean"):
        stack = select_windows(heat, 5, rule=rule, min_score=0.3, max_windows=3)
        assert stack.y0.shape == (3, 4, 3)
        mapped = jax.jit(jax.vmap(jax.vmap(
            lambda m: select_windows(m, 5, rule=rule, min_score=0.3, max_windows=3))))(heat)
        for n, b in itertools.product(range(3), range(4)):
            single = select_windows(heat[n, b], 5, rule=rule, min_score=0.3, max_windows=3)
            for field, one, vm in zip(stack._fields, single, mapped):
                np.testing.assert_array_equal(np.asarray(getattr(stack, field))[n, b], one)
                np.testing.assert_array_equal(np.asarray(vm)[n, b], one)


# --- libraries --------------------------------------------------------------------------------


def _inputs(seed=0, nodes=3, count=4, side=16):
    rng = _rng(seed)
    images = rng.integers(0, 256, (count, side, side, 3), dtype=np.uint8)
    heat = _maps((nodes, count, side, side), seed=seed + 1)
    activations = rng.normal(size=(count, nodes)).astype(np.float32)
    return images, heat, activations, activations > 0


def test_build_libraries_crops_the_activated_windows():
    images, heat, activations, activated = _inputs()
    activated[:, 2] = False  # node 2 activates nothing: an empty library
    names = [f"/data/{i}.png" for i in range(4)]
    libraries = build_libraries(images, heat, activations, activated, ["fc:0", "fc:1", "c:3"],
                                size=6, min_score=0.45, max_windows=3, image_names=names)
    windows = select_windows(heat, 6, min_score=0.45, max_windows=3)
    assert [lib.node for lib in libraries] == ["fc:0", "fc:1", "c:3"]
    assert len(libraries[2]) == 0 and libraries[2].crops.shape == (0, 6, 6, 3)
    for n, lib in enumerate(libraries[:2]):
        expected = sorted(
            ((-float(windows.score[n, b, j]), b, j) for b in range(4) for j in range(3)
             if activated[b, n] and windows.valid[n, b, j]))
        assert len(lib) == len(expected) > 0
        for i, (_, b, j) in enumerate(expected):
            y, x = int(windows.y0[n, b, j]), int(windows.x0[n, b, j])
            assert (lib.source[i], lib.y0[i], lib.x0[i], lib.size[i]) == (b, y, x, 6)
            assert lib.source_name[i] == names[b] and lib.activation[i] == activations[b, n]
            np.testing.assert_array_equal(lib.crops[i], images[b, y:y + 6, x:x + 6])
            np.testing.assert_array_equal(lib.heat[i], heat[n, b, y:y + 6, x:x + 6])
            assert lib.score[i] == windows.score[n, b, j]
    best = build_libraries(images, heat, activations, activated, ["fc:0", "fc:1", "c:3"],
                           size=6, min_score=0.45, max_windows=3, max_per_library=2)
    assert [len(lib) for lib in best] == [2, 2, 0]
    np.testing.assert_array_equal(best[0].score, libraries[0].score[:2])
    assert best[0].source_name[0] == f"image {best[0].source[0]}"


def test_build_libraries_bad_inputs():
    images, heat, activations, activated = _inputs()
    with pytest.raises(ValueError, match=r"17×17 pixels is larger than the 16×16 images"):
        build_libraries(images, heat, activations, activated, ["a", "b", "c"], size=17)
    with pytest.raises(ValueError, match="heat must be"):
        build_libraries(images, heat[:2], activations, activated, ["a", "b", "c"], size=4)
    with pytest.raises(ValueError, match="activated must be"):
        build_libraries(images, heat, activations, activated[:, :2], ["a", "b", "c"], size=4)


def test_overlay_blends_jet_half_and_half():
    crop = np.full((2, 2, 3), 100, np.uint8)
    heat = np.array([[0.0, 1.0], [-3.0, np.nan]])
    out = overlay(crop, heat)
    # jet(0) = (0, 0, 0.5), jet(1) = (0.5, 0, 0); out of range clips, NaN counts as 0
    np.testing.assert_array_equal(out[0, 0], [50, 50, 114])
    np.testing.assert_array_equal(out[0, 1], [114, 50, 50])
    np.testing.assert_array_equal(out[1, 0], out[0, 0])
    np.testing.assert_array_equal(out[1, 1], out[0, 0])
    mid = np.round(50 + 127.5 * np.asarray(colormaps["jet"](0.5)[:3]))
    np.testing.assert_array_equal(overlay(crop[:1, :1], np.full((1, 1), 0.5))[0, 0], mid)


# --- on disk ----------------------------------------------------------------------------------


def _libraries():
    images, heat, activations, activated = _inputs(seed=4)
    activated[:, 1] = False
    return build_libraries(images, heat, activations, activated, ["fc:7", "block2/conv:1",
                                                                 "fc:9"],
                           size=5, min_score=0.4, max_windows=2,
                           image_names=["a.png", "b, with comma.png", "c.png", "d.png"])


def test_write_read_round_trip(tmp_path):
    libraries = _libraries()
    assert len(libraries[0]) > 0 and len(libraries[1]) == 0
    folder = write_libraries(libraries, tmp_path / "libraries")
    assert sorted(p.name for p in folder.iterdir()) == ["block2_conv_1", "fc_7", "fc_9",
                                                        "index.csv"]
    assert (folder / "fc_7" / "0_heat.png").is_file()
    np.testing.assert_array_equal(library_module.read_image(folder / "fc_7" / "0_heat.png"),
                                  overlay(libraries[0].crops[0], libraries[0].heat[0]))
    with open(folder / "index.csv", newline="") as file:
        rows = list(csv.DictReader(file))
    assert tuple(rows[0]) == INDEX_COLUMNS and rows[0]["file"] == "fc_7/0.png"
    back = read_libraries(folder)
    assert [lib.node for lib in back] == [lib.node for lib in libraries]
    for a, b in zip(libraries, back):
        assert len(a) == len(b) and a.crops.shape == b.crops.shape
        np.testing.assert_array_equal(a.crops, b.crops)
        np.testing.assert_allclose(a.heat, b.heat, atol=0.5 / 65535 + 1e-7)
        for column in ("source", "y0", "x0", "size", "score", "activation"):
            np.testing.assert_array_equal(getattr(a, column), getattr(b, column))
        assert a.source_name == b.source_name


def test_failed_write_leaves_the_previous_libraries(tmp_path, monkeypatch):
    libraries = _libraries()
    folder = write_libraries(libraries, tmp_path / "libraries")
    before = {p: p.read_bytes() for p in folder.rglob("*") if p.is_file()}
    calls = []

    def failing_writer(path, pixels):
        calls.append(path)
        if len(calls) == 4:
            raise OSError("disk full")
        return write_image(path, pixels)

    write_image = library_module.write_image
    monkeypatch.setattr(library_module, "write_image", failing_writer)
    changed = [lib.take(slice(None, None, -1)) for lib in libraries]  # other crops at each k
    with pytest.raises(OSError, match="disk full"):
        write_libraries(changed, folder)
    assert {p: p.read_bytes() for p in folder.rglob("*") if p.is_file()} == before
    assert sorted(p.name for p in tmp_path.iterdir()) == ["libraries"]  # no staging left
    monkeypatch.undo()
    write_libraries(changed, folder)
    np.testing.assert_array_equal(read_libraries(folder)[0].crops, changed[0].crops)


def test_write_refuses_a_foreign_folder(tmp_path):
    (tmp_path / "photos").mkdir()
    (tmp_path / "photos" / "holiday.png").write_bytes(b"")
    with pytest.raises(InputDataError, match="holds no index.csv"):
        write_libraries(_libraries(), tmp_path / "photos")
    assert (tmp_path / "photos" / "holiday.png").is_file()
    twins = [Library.empty("fc:1", 4), Library.empty("fc_1", 4)]
    with pytest.raises(ValueError, match="'fc:1' and 'fc_1'"):
        write_libraries(twins, tmp_path / "libraries")


def test_read_errors_name_the_file(tmp_path):
    folder = tmp_path / "libraries"
    with pytest.raises(InputDataError, match=r"index\.csv: no such file"):
        read_libraries(folder)
    write_libraries(_libraries(), folder)
    index = folder / "index.csv"
    text = index.read_text()
    lines = text.splitlines()

    index.write_text("node,file\n" + "\n".join(lines[1:]))
    with pytest.raises(InputDataError, match=r"index\.csv: the first line must be the header"):
        read_libraries(folder)
    index.write_text("\n".join(lines[:2] + [lines[2].replace(",5,", ",five,", 1)]))
    with pytest.raises(InputDataError, match=r"index\.csv, line 3: bad value"):
        read_libraries(folder)
    index.write_text("\n".join(lines[:2] + ["fc:7,fc_7/1.png,0"]))
    with pytest.raises(InputDataError, match=r"index\.csv, line 3: 3 fields, expected 9"):
        read_libraries(folder)
    index.write_bytes(b"\xff\xfe\x00garbage")
    with pytest.raises(InputDataError, match=r"index\.csv"):
        read_libraries(folder)
    index.write_text(text)
    (folder / "fc_7" / "1.png").unlink()
    with pytest.raises(InputDataError, match=r"fc_7/1\.png: no such file"):
        read_libraries(folder)
    (folder / "fc_7" / "1.png").write_bytes(b"not a png")
    with pytest.raises(InputDataError, match=r"fc_7/1\.png: cannot read"):
        read_libraries(folder)


# --- distinct libraries -----------------------------------------------------------------------


def _library(node, windows, size=8):
    """A library of crops at `windows` = [(source, y0, x0)] (the pixels do not matter here)."""
    n = len(windows)
    source, y0, x0 = (np.array([w[i] for w in windows], np.int64).reshape(n) for i in range(3))
    return Library(node, np.zeros((n, size, size, 3), np.uint8), np.zeros((n, size, size)),
                   source, [f"image {s}" for s in source], y0, x0, np.full(n, size),
                   np.ones(n, np.float32), np.ones(n, np.float32))


def test_library_overlap_closed_forms():
    a = _library("a", [(0, 0, 0), (1, 4, 4), (2, 0, 0)])
    assert library_overlap(a, a) == 1.0
    assert library_overlap(a, _library("d", [(3, 0, 0), (0, 20, 20)])) == 0.0
    # (0, 2, 0) overlaps a's (0, 0, 0) with IoU 48/80 = 0.6 ≥ 0.5: matched; (0, 3, 0) with
    # IoU 40/88 < 0.5; (1, 4, 4) is the same window; (2, 0, 0) is in another image than b's.
    b = _library("b", [(0, 2, 0), (1, 4, 4), (5, 0, 0), (0, 0, 4)])
    # a: (0,0,0) and (1,4,4) matched -> 2; b: (0,2,0), (1,4,4) -> 2 (IoU of (0,0,4): 0.33)
    assert library_overlap(a, b) == library_overlap(b, a) == 4 / 7
    assert library_overlap(a, _library("c", [(0, 3, 0)])) == 0.0
    assert library_overlap(Library.empty("e", 8), Library.empty("f", 8)) == 0.0
    # 6-pixel windows 2 rows apart: IoU 24/48, exactly the 0.5 that still matches
    assert library_overlap(_library("g", [(0, 0, 0)], 6), _library("h", [(0, 2, 0)], 6)) == 1
    matrix = overlap_matrix([a, b, Library.empty("e", 8)])
    np.testing.assert_array_equal(matrix, [[1, 4 / 7, 0], [4 / 7, 1, 0], [0, 0, 0]])


def brute_greedy(distance, sizes, k, candidates):
    """At each step, every remaining candidate scored by its minimum distance to the chosen
    ones, then compared with every other candidate pairwise by the tie rules."""
    chosen = []
    for _ in range(min(k, len(candidates))):
        left = [i for i in candidates if i not in chosen]
        scores = {i: (min(distance[i][j] for j in chosen) if chosen else 0.0) for i in left}
        for i in left:
            beaten = False
            for j in left:
                better = (scores[j] > scores[i]
                          or (scores[j] == scores[i] and sizes[j] > sizes[i])
                          or (scores[j] == scores[i] and sizes[j] == sizes[i] and j < i))
                beaten |= better
            if not beaten:
                chosen.append(i)
                break
    return chosen


def test_greedy_max_min_equals_brute_force():
    rng = _rng(5)
    for trial in range(40):
        n = int(rng.integers(1, 8))
        raw = rng.integers(0, 3, (n, n)) / 2 if trial % 2 else rng.random((n, n))  # ties
        distance = np.triu(raw, 1) + np.triu(raw, 1).T
        sizes = rng.integers(1, 4, n)
        candidates = [i for i in range(n) if rng.random() < 0.8]
        k = int(rng.integers(1, n + 2))
        expected = brute_greedy(distance, sizes, k, candidates)
        assert greedy_max_min(distance, sizes, k, candidates) == expected
    with pytest.raises(ValueError, match="k must be positive"):
        greedy_max_min(np.zeros((2, 2)), [1, 1], 0)


def test_choose_distinct_skips_copies_and_small_libraries():
    a = _library("a", [(0, 0, 0), (1, 0, 0), (2, 0, 0)])
    copy = _library("copy", [(0, 0, 0), (1, 0, 0), (2, 0, 0)])
    half = _library("half", [(0, 0, 0), (5, 0, 0)])
    other = _library("other", [(6, 0, 0), (7, 0, 0)])
    tiny = _library("tiny", [(9, 0, 0)])
    libraries = [copy, a, half, other, tiny]
    # the largest first (copy and a tie in size: the lower index), then the most distant
    assert choose_distinct(libraries, 2) == [0, 3]
    assert choose_distinct(libraries, 3, min_size=2) == [0, 3, 2]
    assert choose_distinct(libraries, 9, min_size=2) == [0, 3, 2, 1]
    assert choose_distinct(libraries, 2, min_size=4) == []


# --- purity -----------------------------------------------------------------------------------


def test_library_purity_closed_form():
    masks = np.zeros((3, 2, 20, 20), bool)  # [N, F, H, W]
    masks[0, 0, 0:4, 0:4] = True  # "spiculated": 16 pixels in the corner of image 0
    masks[0, 1, 0:2, 0:5] = True  # "rim": 10 pixels there
    masks[1, 1, 10:20, 10:20] = True
    masks[2, 0, 0:1, 0:9] = True  # 9 pixels: below 10 % of an 10×10 window
    lib = _library("n", [(0, 0, 0), (1, 10, 10), (1, 8, 8), (2, 0, 0), (0, 10, 0)],
                   size=10)
    purity, feature, per_crop = library_purity(lib, masks, ["spiculated", "rim"])
    assert per_crop == ["spiculated", "rim", "rim", "none", "none"]
    assert (purity, feature) == (2 / 5, "rim")
    purity, feature, per_crop = library_purity(lib, masks, ["spiculated", "rim"], min_cover=0.09)
    assert per_crop[3] == "spiculated" and (purity, feature) == (2 / 5, "spiculated")  # tie
    assert library_purity(lib.take([4]), masks, ["spiculated", "rim"]) == (0.0, "none",
                                                                          ["none"])
    purity, feature, per_crop = library_purity(Library.empty("n", 10), masks, ["a", "b"])
    assert np.isnan(purity) and (feature, per_crop) == ("none", [])
    with pytest.raises(ValueError, match="F = 3"):
        library_purity(lib, masks, ["a", "b", "c"])
