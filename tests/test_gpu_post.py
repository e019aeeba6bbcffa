"""xctrt.gpu.post (array code for NumPy and CuPy) against the C++ kernels, on NumPy, bit for bit."""

import threading

import numpy as np
import pytest

from conftest import outside_air_reference, surface_distance_reference
from xctrt import _core
from xctrt.gpu import post
from xctrt.defects import mid_plane_runs

DTYPES = (np.uint8, np.uint16, np.float32)


def assert_same(got, ref):
    assert isinstance(got, np.ndarray) and got.dtype == ref.dtype and got.shape == ref.shape
    np.testing.assert_array_equal(got, ref)


def rand_slice(rng, shape, dtype):
    if dtype == np.uint8:
        s = rng.integers(0, 256, shape, dtype=np.uint8)
        lo = float(rng.uniform(-20, 200))
        hi = lo + float(rng.uniform(0.5, 200))
    elif dtype == np.uint16:
        s = rng.integers(0, 65536, shape, dtype=np.uint16)
        lo = float(rng.uniform(-100, 40000))
        hi = lo + float(rng.uniform(1, 30000))
    else:
        s = (rng.standard_normal(shape) * 3).astype(np.float32)
        lo = float(rng.uniform(-4, 1))
        hi = lo + float(rng.uniform(0.01, 6))
    if rng.random() < 0.3:  # integral windows hit exact 0 and 1
        lo, hi = float(np.floor(lo)), float(np.floor(lo)) + float(np.ceil(hi - lo))
    return s, lo, hi


# ---------------------------------------------------------------- window / resize / aggregate


@pytest.mark.parametrize("seed", range(60))
def test_window(seed):
    rng = np.random.default_rng(seed)
    s, lo, hi = rand_slice(rng, tuple(int(v) for v in rng.integers(1, 40, 2)), DTYPES[seed % 3])
    assert_same(post.window(s, lo, hi), _core.window(s, lo, hi))


def test_window_nan_and_errors():
    s = np.array([[np.nan, -1.0, 0.5, 2.0, np.inf]], np.float32)
    np.testing.assert_array_equal(post.window(s, 0.0, 1.0), _core.window(s, 0.0, 1.0))
    with pytest.raises(ValueError, match="hi > lo"):
        post.window(s, 1.0, 1.0)
    with pytest.raises(ValueError, match="dtype"):
        post.window(s.astype(np.float64), 0.0, 1.0)


@pytest.mark.parametrize("seed", range(60))
def test_resize_bilinear(seed):
    rng = np.random.default_rng(seed)
    h, w, oh, ow = (int(v) for v in rng.integers(1, 50, 4))
    c = int(rng.integers(1, 4))
    img = rng.standard_normal((c, h, w)).astype(np.float32)
    assert_same(post.resize_bilinear(img[0], oh, ow), _core.resize_bilinear(img[0], oh, ow))
    assert_same(post.resize_bilinear(img, oh, ow), _core.resize_bilinear(img, oh, ow))
    batch = np.stack([img, img[::-1] * np.float32(0.5)])
    assert_same(post.resize_bilinear(batch, oh, ow),
                np.stack([_core.resize_bilinear(np.ascontiguousarray(b), oh, ow) for b in batch]))


def rand_probs(rng, shape):
    p = rng.random(shape).astype(np.float32)
    if rng.random() < 0.5:  # a few levels: ties between channels and values on the thresholds
        p = (np.floor(p * 4) / 4).astype(np.float32)
    return p


@pytest.mark.parametrize("seed", range(60))
@pytest.mark.parametrize("mode", ["priority", "argmax"])
def test_aggregate(seed, mode):
    rng = np.random.default_rng(seed)
    k = int(rng.integers(1, 6))
    h, w = (int(v) for v in rng.integers(1, 30, 2))
    p = rand_probs(rng, (k, h, w))
    thr = rng.choice([0.0, 0.25, 0.5, 0.75, 1.0], k)
    ids = rng.permutation(np.arange(1, 7))[:k].astype(np.uint8)
    prio = rng.permutation(k)
    ref = _core.aggregate(p, thr, ids, prio, mode)
    assert_same(post.aggregate(p, thr, ids, prio, mode), ref)
    out = np.full((h, w), 99, np.uint8)
    assert post.aggregate(p, thr, ids, prio, mode, out) is out
    assert_same(out, ref)
    batch = np.stack([p, p[::-1].copy()])
    assert_same(post.aggregate(batch, thr, ids, prio, mode),
                np.stack([_core.aggregate(np.ascontiguousarray(b), thr, ids, prio, mode) for b in batch]))


def test_aggregate_errors():
    p = np.zeros((3, 4, 4), np.float32)
    for args, msg in [((p, [0.5] * 2, [1, 2, 3], [0, 1, 2]), "one entry"),
                      ((p, [0.5] * 3, [1, 2, 3], [0, 1, 1]), "every channel"),
                      ((p.astype(np.float64), [0.5] * 3, [1, 2, 3], [0, 1, 2]), "float32")]:
        with pytest.raises(ValueError, match=msg):
            post.aggregate(*args)
    with pytest.raises(ValueError, match="mode"):
        post.aggregate(p, [0.5] * 3, [1, 2, 3], [0, 1, 2], "vote")


# ---------------------------------------------------------------- tiles


@pytest.mark.parametrize("seed", range(40))
def test_tiles(seed):
    rng = np.random.default_rng(seed)
    tile = int(rng.choice([1, 3, 8, 16, 17]))
    overlap = int(rng.integers(0, tile))
    h, w = (int(v) for v in rng.integers(1, 60, 2))
    s, lo, hi = rand_slice(rng, (h, w), DTYPES[seed % 3])
    pad = "edge" if seed % 2 else "constant"
    assert_same(post.extract_tiles(s, tile, overlap, lo, hi, pad),
                _core.extract_tiles(s, tile, overlap, lo, hi, pad))
    nt = len(_core.tile_starts(h, tile, overlap)) * len(_core.tile_starts(w, tile, overlap))
    t = rng.random((nt, int(rng.integers(1, 4)), tile, tile)).astype(np.float32)
    for blend in ("constant", "ramp"):
        assert_same(post.stitch_tiles(t, h, w, overlap, blend), _core.stitch_tiles(t, h, w, overlap, blend))


# ---------------------------------------------------------------- components

def blobs(rng, shape, n=None):
    lab = np.ones(shape, np.uint8)
    zz, yy, xx = np.indices(shape)
    for _ in range(int(rng.integers(1, 8)) if n is None else n):
        c = rng.uniform(0, shape)
        r = rng.uniform(0.5, 4, 3)
        m = ((zz - c[0]) / r[0]) ** 2 + ((yy - c[1]) / r[1]) ** 2 + ((xx - c[2]) / r[2]) ** 2 <= 1
        lab[m] = rng.integers(2, 4)
    return lab


def noise(rng, shape):
    p = rng.dirichlet([3, 3, 1, 1])
    return rng.choice(4, size=shape, p=p).astype(np.uint8)


def image(rng, shape, dtype):
    if dtype == np.uint8:
        return rng.integers(0, 256, shape, dtype=np.uint8)
    if dtype == np.uint16:
        return rng.integers(0, 65536, shape, dtype=np.uint16)
    return rng.uniform(0, 1000, shape).astype(np.float32)


def slabs_of(Z, thick):
    if thick == "random":
        return None
    d = Z if thick == "whole" else thick
    return [min(d, Z - z) for z in range(0, Z, d)]


def run_both(lab, img, slabs, min_voxels=0, **kw):
    ref = _core.ComponentLabeller(lab.shape, **kw)
    got = post.ComponentLabeller(lab.shape, **kw)
    z = 0
    for d in slabs:
        ref.add_slab(lab[z:z + d], img[z:z + d])
        got.add_slab(lab[z:z + d], img[z:z + d])
        z += d
    assert got.slices_received == lab.shape[0]
    assert got.outside_air_voxels is None and ref.outside_air_voxels is None   # until finish()
    tables = got.finish(min_voxels), ref.finish(min_voxels)
    assert got.outside_air_voxels == ref.outside_air_voxels
    runs = [np.unique(lb.outside_air_runs(), axis=0) for lb in (got, ref)]   # the same runs, in any order
    assert runs[0].dtype == runs[1].dtype == np.int32
    np.testing.assert_array_equal(*runs)
    return tables


def assert_table_same(got, ref, float_image=False):
    assert list(got) == list(ref)
    for k in ref:
        assert got[k].dtype == ref[k].dtype, k
        if float_image and k == "grey_mean":  # float32 sums depend on the order (see post.py)
            np.testing.assert_allclose(got[k], ref[k], rtol=1e-12, err_msg=k)
        else:
            np.testing.assert_array_equal(got[k], ref[k], err_msg=k)


@pytest.mark.parametrize("seed,thick", [(seed, thick) for seed in range(12) for thick in (1, 2, "random")])
def test_surface_distance_with_sparse_air(seed, thick):
    # Few air voxels, so the nearest one is often planes away, across slab borders, and air
    # components that reach the volume's sides only through another slab must be joined there.
    rng = np.random.default_rng(1000 + seed)
    shape = tuple(int(v) for v in rng.integers(4, 14, 3))
    lab = blobs(rng, shape)
    air = rng.random(shape) < rng.choice([0.002, 0.01, 0.05])
    air[tuple(rng.integers(0, s) for s in shape)] = True  # at least one
    # An air block that a slab border can cut, or air only in the first planes (the part below
    # it), whose last plane holds the air nearest to the defects.
    lo = [int(rng.integers(0, s)) for s in shape]
    if seed % 2:
        air[:] = False
        air[:max(1, lo[0] // 2)] = True
    else:
        air[lo[0]:lo[0] + int(rng.integers(1, 4)), lo[1]:lo[1] + int(rng.integers(1, 6)), lo[2]:] = True
    lab[air] = 0
    img = image(rng, shape, np.uint16)
    slabs = slabs_of(shape[0], thick) or [int(v) for v in np.diff(np.r_[0, np.sort(rng.integers(0, shape[0] + 1, 4)), shape[0]])]
    vs = tuple(rng.uniform(0.2, 2.0, 3))
    got, ref = run_both(lab, img, slabs, 0, classes=[2, 3], voxel_size=vs)
    assert_table_same(got, ref)
    want = surface_distance_reference(lab, _core.label_volume(lab, [2, 3], 26), vs)
    np.testing.assert_allclose(got["surface_distance"], want, rtol=1e-12, atol=0)
    cpp = _core.ComponentLabeller(shape, voxel_size=vs)
    cpp.add_slab(lab, img)
    with pytest.raises(RuntimeError, match="after finish"):
        cpp.outside_air_runs()
    cpp.finish()
    outside = outside_air_reference(lab)
    assert cpp.outside_air_voxels == int(outside.sum())
    drawn = np.zeros(shape, bool)
    for z, y, x0, x1 in cpp.outside_air_runs():
        assert not drawn[z, y, x0:x1 + 1].any()   # runs do not overlap
        drawn[z, y, x0:x1 + 1] = True
    np.testing.assert_array_equal(drawn, outside)


CASES = [(seed, conn, thick) for seed in range(12) for conn in (6, 18, 26)
         for thick in (1, 2, 3, "whole", "random")]


@pytest.mark.parametrize("seed,conn,thick", CASES)
def test_components_match_cpp(seed, conn, thick):
    rng = np.random.default_rng(seed * 31 + conn)
    shape = tuple(int(v) for v in rng.integers(1, 14, 3))
    lab = blobs(rng, shape) if seed % 2 else noise(rng, shape)
    dtype = DTYPES[seed % 3]
    img = image(rng, shape, dtype)
    slabs = slabs_of(shape[0], thick)
    if slabs is None:  # random thicknesses, empty slabs included
        slabs, z = [], 0
        while z < shape[0]:
            slabs.append(int(rng.integers(0, shape[0] - z + 1)))
            z += slabs[-1]
    classes = [[2, 3], [2], [1, 2, 3], [3, 0], []][seed % 5]
    vs = tuple(rng.uniform(0.1, 3.0, 3)) if seed % 3 else (1.0, 1.0, 1.0)
    min_voxels = int(rng.integers(0, 4))
    got, ref = run_both(lab, img, slabs, min_voxels, classes=classes, connectivity=conn, voxel_size=vs)
    assert_table_same(got, ref, dtype == np.float32)
    assert_same(post.label_volume(lab, classes, conn), _core.label_volume(lab, classes, conn))


@pytest.mark.parametrize("conn", [6, 18, 26])
def test_larger_blob_volume_many_slabs(conn):
    rng = np.random.default_rng(conn)
    shape = (40, 33, 29)
    lab = blobs(rng, shape, 60)
    img = image(rng, shape, np.uint16)
    for slabs in (slabs_of(40, 1), slabs_of(40, 7), [40]):
        got, ref = run_both(lab, img, slabs, 2, connectivity=conn)
        assert_table_same(got, ref)
        assert len(ref["id"]) > 10


def test_component_crossing_every_slab():
    # A helix of one inclusion through all planes, one voxel per plane joined diagonally, plus
    # a pore that only joins at the very end: provisional ids merge across all 30 slabs.
    Z, Y, X = 30, 9, 9
    lab = np.zeros((Z, Y, X), np.uint8)
    ring = [(2, 2), (2, 3), (3, 4), (4, 4), (5, 3), (5, 2), (4, 1), (3, 1)]
    for z in range(Z):
        y, x = ring[z % len(ring)]
        lab[z, y, x] = 3
        lab[z, 7, 7 - (z % 2)] = 2
    img = np.arange(lab.size, dtype=np.uint16).reshape(lab.shape)
    for conn in (6, 18, 26):
        got, ref = run_both(lab, img, [1] * Z, connectivity=conn)
        assert_table_same(got, ref)
    got26, _ = run_both(lab, img, [1] * Z, connectivity=26)
    assert list(got26["voxels"]) == [Z, Z]  # one helix, one zig-zag pore


def test_wrong_connectivity_differs():
    # Two voxels that touch only at a corner: one component with 26, two with 18 and 6.
    lab = np.zeros((2, 2, 2), np.uint8)
    lab[0, 0, 0] = lab[1, 1, 1] = 2
    img = np.zeros(lab.shape, np.uint8)
    got26 = post.ComponentLabeller(lab.shape, connectivity=26)
    got18 = post.ComponentLabeller(lab.shape, connectivity=18)
    for lb in (got26, got18):
        lb.add_slab(lab, img)
    assert len(got26.finish()["id"]) == 1 and len(got18.finish()["id"]) == 2
    ref26 = _core.label_volume(lab, [2, 3], 26)
    assert not np.array_equal(post.label_volume(lab, [2, 3], 18), ref26)
    assert np.array_equal(post.label_volume(lab, [2, 3], 26), ref26)


def test_empty_and_single_voxel():
    shape = (5, 6, 7)
    img = np.full(shape, 7, np.uint16)
    lab = np.ones(shape, np.uint8)
    got, ref = run_both(lab, img, [2, 2, 1])
    assert len(got["id"]) == 0
    assert_table_same(got, ref)
    lab[2, 3, 4] = 3
    got, ref = run_both(lab, img, [2, 2, 1])
    assert_table_same(got, ref)
    # One voxel crosses every Crofton line through it twice: 2 sum(factors) = 4 sum_k w_k / |v_k|.
    assert got["voxels"].tolist() == [1]
    assert got["surface_area"][0] == pytest.approx(2 * _core.crofton_factors((1, 1, 1)).sum(), rel=1e-12)
    assert got["surface_area"][0] == pytest.approx(3.00408, abs=1e-5)
    got, ref = run_both(lab, img, [5], min_voxels=2)
    assert len(got["id"]) == 0
    assert_table_same(got, ref)
    got, ref = run_both(lab[:1, :1, :1].copy() * 0 + 2, img[:1, :1, :1].copy(), [1])
    assert_table_same(got, ref)
    assert got["touches_edge"].tolist() == [True]


def test_repeat_finish_and_min_voxels():
    rng = np.random.default_rng(5)
    lab = blobs(rng, (12, 20, 20), 12)
    img = image(rng, lab.shape, np.uint8)
    lb = post.ComponentLabeller(lab.shape)
    ref = _core.ComponentLabeller(lab.shape)
    for z in range(0, 12, 5):
        lb.add_slab(lab[z:z + 5], img[z:z + 5])
        ref.add_slab(lab[z:z + 5], img[z:z + 5])
    for mv in (0, 5, 30, 0, 10 ** 6):
        assert_table_same(lb.finish(mv), ref.finish(mv))


def test_errors():
    lb = post.ComponentLabeller((3, 4, 5))
    lab = np.zeros((2, 4, 5), np.uint8)
    with pytest.raises(ValueError, match=r"labels must be \(z, 4, 5\)"):
        lb.add_slab(np.zeros((2, 5, 5), np.uint8), np.zeros((2, 5, 5), np.uint8))
    with pytest.raises(ValueError, match="same shape"):
        lb.add_slab(lab, np.zeros((1, 4, 5), np.uint8))
    with pytest.raises(ValueError, match="uint8 array"):
        lb.add_slab(lab.astype(np.int16), lab)
    with pytest.raises(ValueError, match="native uint8, uint16 or float32"):
        lb.add_slab(lab, lab.astype(np.float64))
    lb.add_slab(lab, lab)
    with pytest.raises(ValueError, match="too many slices"):
        lb.add_slab(lab, lab)
    with pytest.raises(ValueError, match="before all slices"):
        lb.finish()
    for kw, msg in [({"connectivity": 8}, "connectivity"), ({"classes": [300]}, "0..255"),
                    ({"voxel_size": (1, 0, 1)}, "voxel_size"), ({"voxel_size": (2000, 1, 1)}, "factor 1000")]:
        with pytest.raises(ValueError, match=msg):
            post.ComponentLabeller((3, 4, 5), **kw)


def test_slabs_of_2_31_voxels_are_refused():
    # CuPy's labelling and scatter kernels index with 32-bit ints: refused on the host too, so the
    # limit shows in tests; broadcast views, so nothing that size is allocated
    shape = (2, 32768, 32768)
    lab = np.broadcast_to(np.zeros((1, 1, 1), np.uint8), shape)
    img = np.broadcast_to(np.zeros((1, 1, 1), np.uint16), shape)
    with pytest.raises(ValueError, match="2\\*\\*31 voxels or more: send thinner slabs"):
        post.ComponentLabeller(shape).add_slab(lab, img)
    with pytest.raises(ValueError, match="below 2\\*\\*31 voxels"):
        post.label_volume(lab)


def test_component_table_binding_checks():
    cols = [np.zeros(2, np.int64)] * 4 + [np.zeros((2, 13), np.int64)] + [np.zeros(2)] * 3 + \
        [np.zeros(2, np.int32)] * 6 + [np.zeros(2, np.uint8), np.zeros(3, bool), np.zeros(2)]
    with pytest.raises(ValueError, match="one length"):
        _core.component_table(*cols)
    cols[-2] = np.zeros(2, bool)
    assert len(_core.component_table(*cols)["id"]) == 2
    for crossings in (np.zeros((2, 3), np.int64), np.zeros(26, np.int64)):
        cols[4] = crossings
        with pytest.raises(ValueError, match=r"\(n, 13\)"):
            _core.component_table(*cols)


# ---------------------------------------------------------------- the surface-distance search of the GPU kernel

def search_per_run(air, runs, comp, n_comp, exposed, vs):
    """Distances by air_tree + search_air_runs (the kernel's per-run search on the host)."""
    nodes, tree_air = _core.air_tree(air, vs)
    r6 = np.zeros((6, len(runs)), np.int32)
    r6[:4], r6[5] = runs.T, exposed
    best2 = np.full(n_comp, np.inf).view(np.uint64)
    _core.search_air_runs(nodes, tree_air, r6, comp.astype(np.int32), best2, vs)
    return np.sqrt(best2.view(np.float64))


@pytest.mark.parametrize("seed", range(8))
def test_per_run_search_gives_the_labellers_distances_bit_for_bit(seed):
    """The GPU kernel's search, one run at a time from a shared best, against the chunked host
    search of distance_to_surface: same bits, whatever the run order, with runs left out (-1)."""
    rng = np.random.default_rng(77 + seed)
    shape = tuple(int(v) for v in rng.integers(6, 30, 3))
    lab = blobs(rng, shape)
    lab[:, :2] = 0
    lab[rng.random(shape) < 0.05] = 0
    vs = (1.0, 1.0, 1.0) if seed == 0 else tuple(rng.uniform(0.1, 3.0, 3))
    lb = _core.ComponentLabeller(shape, voxel_size=vs)
    lb.add_slab(lab, image(rng, shape, np.uint16))
    want = lb.finish()["surface_distance"]
    air = lb.outside_air_runs()
    assert len(air) > 16 and len(want)    # a tree with inner nodes
    ids = _core.label_volume(lab, [2, 3], 26)
    z, y, x = np.nonzero(ids)
    runs = np.stack([z, y, x, x], 1).astype(np.int32)     # single-voxel runs, all sides exposed
    comp = ids[z, y, x].astype(np.int64) - 1
    order = rng.permutation(len(runs))
    runs, comp = runs[order], comp[order]
    extra = rng.integers(0, len(runs), 5)                 # runs of dropped components
    runs, comp = np.concatenate([runs, runs[extra]]), np.concatenate([comp, np.full(5, -1)])
    exposed = np.full(len(runs), 15, np.uint8)
    got = search_per_run(air, runs, comp, len(want), exposed, vs)
    assert got.tobytes() == want.tobytes()
    ref = _core.distance_to_surface(air, runs[:-5], comp[:-5], len(want), exposed=exposed[:-5], voxel_size=vs)
    assert ref.tobytes() == want.tobytes()


@pytest.mark.parametrize("seed", range(4))
def test_search_over_a_forest_gives_one_trees_bits(seed):
    """The outside air split into several trees (as the GPU labeller builds them slab by slab, with empty
    ones among them): the same distances, bit for bit, as one tree over all of it."""
    rng = np.random.default_rng(300 + seed)
    shape = (int(rng.integers(8, 24)), 26, 30)
    lab = blobs(rng, shape)
    lab[:, :2] = 0
    lab[rng.random(shape) < 0.05] = 0
    vs = tuple(rng.uniform(0.2, 2.5, 3))
    lb = _core.ComponentLabeller(shape, voxel_size=vs)
    lb.add_slab(lab, image(rng, shape, np.uint16))
    want = lb.finish()["surface_distance"]
    air = lb.outside_air_runs()
    ids = _core.label_volume(lab, [2, 3], 26)
    z, y, x = np.nonzero(ids)
    r6 = np.zeros((6, len(z)), np.int32)
    r6[:4], r6[5] = np.stack([z, y, x, x]), 15
    comp = (ids[z, y, x] - 1).astype(np.int32)
    cuts = np.sort(rng.integers(0, len(air), 4))
    parts = np.split(air[rng.permutation(len(air))], cuts)   # some may be empty
    forest = post.air_forest([_core.air_tree(p, vs) for p in parts])
    assert len(forest[1]) - 1 == sum(1 for p in parts if len(p)) >= 3
    best2 = np.full(len(want), np.inf).view(np.uint64)
    post.search_air_runs(forest, r6, comp, best2, vs)
    assert np.sqrt(best2.view(np.float64)).tobytes() == want.tobytes()
    nodes, node_start, tree_air, air_start = forest
    bad = [((nodes, tree_air, r6, comp, best2, vs, node_start, None), "both node_start and air_start"),
           ((nodes, tree_air, r6, comp, best2, vs, node_start[:-1], air_start[:-1]), "from 0 to"),
           ((nodes, tree_air, r6, comp, best2, vs, node_start[::-1].copy(), air_start), "from 0 to"),
           ((nodes, tree_air, r6, comp, best2, vs, node_start, air_start[:-1]), r"\(T \+ 1,\)")]
    swapped = air_start.copy()
    swapped[1] += 1   # tree 0 claims a run of tree 1: its nodes no longer describe it
    bad.append(((nodes, tree_air, r6, comp, best2, vs, node_start, swapped), "tree over these air runs"))
    for args, msg in bad:
        with pytest.raises(ValueError, match=msg):
            _core.search_air_runs(*args)


def test_outside_air_known_only_later_gets_its_own_tree():
    """Air that reaches the volume's sides only through a later slab is outside too: the labeller's
    slab trees hold the air on the sides slab by slab, finish() adds a tree of the rest, and the table
    and outside air are the C++ labeller's."""
    rng = np.random.default_rng(5)
    shape = (12, 24, 24)
    lab = np.ones(shape, np.uint8)
    lab[:, :2] = 0                               # outside air on one side, in every slab
    lab[2:6, 10:14, 10:14] = 0                   # a pocket in slabs 0-1 ...
    lab[5:9, 12, 12:] = 0                        # ... that reaches the x side through slabs 1-2 only
    lab[rng.random(shape) < 0.02] = 2
    lab[rng.random(shape) < 0.02] = 3
    img = image(rng, shape, np.uint16)
    got, ref = post.ComponentLabeller(shape, voxel_size=(0.5, 1.0, 1.5)), _core.ComponentLabeller(shape, voxel_size=(0.5, 1.0, 1.5))
    for z0 in range(0, 12, 4):
        got.add_slab(lab[z0:z0 + 4], img[z0:z0 + 4])
        ref.add_slab(lab[z0:z0 + 4], img[z0:z0 + 4])
    assert len(got._early_trees) == 3
    early = sum(len(r) for r in got._early_runs)
    assert_table_same(got.finish(1), ref.finish(1))
    air = got.outside_air_runs()
    assert got.surface_runs["outside_air"] == len(air) > early   # the pocket came later
    assert {tuple(r) for r in air} == {tuple(r) for r in ref.outside_air_runs()}
    assert got.outside_air_voxels == ref.outside_air_voxels
    # the preview's runs, picked slab by slab on the tree thread and from the late air: the C++ labeller's
    mid = got.outside_air_mid_runs()
    assert len(mid) == len({tuple(r) for r in mid})
    assert {tuple(r) for r in mid} == {tuple(r) for r in mid_plane_runs(ref.outside_air_runs(), shape)}
    assert any(r[0] in (2, 3) and r[2] <= 12 <= r[3] for r in mid)   # the pocket's late air, across x = 12
    detail = got.outside_air_detail
    assert detail["late_runs"] == len(air) - early and detail["air_components"] > 0
    assert detail["air_pairs"] > 0 and detail["air_runs"] >= len(air)   # the pocket joined across slabs


def test_table_columns_are_made_while_the_distances_are_searched(monkeypatch):
    """finish() makes the table's columns on a thread beside the surface search, not after it: here the
    search waits until the columns have begun (it would time out if they came after it), and the table,
    its distances filled in last, is still the C++ labeller's."""
    rng = np.random.default_rng(3)
    shape = (8, 16, 16)
    lab = rng.choice(np.array([0, 1, 2, 3], np.uint8), shape, p=[0.3, 0.5, 0.1, 0.1])
    img = image(rng, shape, np.uint16)
    got, ref = post.ComponentLabeller(shape, voxel_size=(0.5, 1.0, 2.0)), _core.ComponentLabeller(shape, voxel_size=(0.5, 1.0, 2.0))
    for z0 in (0, 4):
        got.add_slab(lab[z0:z0 + 4], img[z0:z0 + 4])
        ref.add_slab(lab[z0:z0 + 4], img[z0:z0 + 4])
    begun, component_table, search = threading.Event(), post._core.component_table, got._surface_distance

    def columns(*args):
        begun.set()
        return component_table(*args)

    def searched_beside_the_columns(*args):
        assert begun.wait(10), "the columns were not made while the distances were searched"
        return search(*args)

    monkeypatch.setattr(post._core, "component_table", columns)
    monkeypatch.setattr(got, "_surface_distance", searched_beside_the_columns)
    table = got.finish(1)
    assert_table_same(table, ref.finish(1))
    assert np.isfinite(table["surface_distance"]).any()
    assert [p[0] for p in got.table_spans] == ["table outside air", "table merge", "table surface", "table columns"]


def test_outside_air_detail_has_the_same_keys_without_air():
    rng = np.random.default_rng(9)
    shape = (6, 10, 12)
    details = []
    for lab in (np.ones(shape, np.uint8), rng.choice(np.array([0, 1, 2], np.uint8), shape)):   # no air; air
        lb = post.ComponentLabeller(shape)
        lb.add_slab(lab[:3], image(rng, (3,) + shape[1:], np.uint16))
        lb.add_slab(lab[3:], image(rng, (3,) + shape[1:], np.uint16))
        lb.finish()
        details.append(lb.outside_air_detail)
    assert set(details[0]) == set(details[1]) and details[0]["air_runs"] == details[0]["late_runs"] == 0
    assert details[1]["air_runs"] > 0


def test_mid_plane_runs_picks_the_runs_on_the_mid_planes():
    rng = np.random.default_rng(8)
    shape = (9, 10, 11)
    x0 = rng.integers(0, 11, 400)
    runs = np.stack([rng.integers(0, 9, 400), rng.integers(0, 10, 400), x0,
                     np.minimum(x0 + rng.integers(0, 4, 400), 10)], 1).astype(np.int32)
    want = [r for r in runs if r[0] == 4 or r[1] == 5 or r[2] <= 5 <= r[3]]
    got = mid_plane_runs(runs, shape)
    assert got.dtype == np.int32 and 0 < len(got) < len(runs)
    np.testing.assert_array_equal(got, np.array(want))
    assert mid_plane_runs(np.zeros((0, 4), np.int32), shape).shape == (0, 4)


def test_large_air_tree_splits_its_top_on_all_cores():
    """Over 2**18 outside-air runs: the tree's top nodes split with the parallel partition. Distances
    as SciPy's exact transform gives them, and the per-run search over air_tree agrees bit for bit."""
    rng = np.random.default_rng(3)
    shape, vs = (32, 192, 200), (0.7, 1.0, 1.3)
    lab = rng.choice(np.array([0, 0, 0, 1, 2, 3], np.uint8), shape)   # half air, nearly all of it outside
    lb = _core.ComponentLabeller(shape, voxel_size=vs)
    lb.add_slab(lab, image(rng, shape, np.uint16))
    want = lb.finish()["surface_distance"]
    air = lb.outside_air_runs()
    assert len(air) > 2 ** 18
    ids = _core.label_volume(lab, [2, 3], 26)
    np.testing.assert_allclose(want, surface_distance_reference(lab, ids, vs), rtol=1e-12, atol=0)
    z, y, x = np.nonzero(ids)
    runs = np.stack([z, y, x, x], 1).astype(np.int32)
    got = search_per_run(air, runs, ids[z, y, x].astype(np.int64) - 1, len(want), np.full(len(z), 15, np.uint8), vs)
    assert got.tobytes() == want.tobytes()


def test_surface_distance_benchmark_runs_and_agrees(tmp_path):
    """benchmarks/surface_distance.py on a small phantom: both searches, same bits, JSON written."""
    import json

    from conftest import load_benchmark
    bench = load_benchmark("surface_distance")
    out = tmp_path / "sd.json"
    assert bench.main(["--planes", "6", "--size", "160", "--repeats", "1", "--json", str(out)]) == 0
    r = json.loads(out.read_text())
    assert r["same_bits"] is True and r["components"] > 0 and r["defect_runs"] > r["components"] and r["air_runs"] > 0


def test_search_air_runs_refuses_what_would_send_it_out_of_bounds():
    air = np.array([[0, y, 0, 3] for y in range(40)], np.int32)
    nodes, tree_air = _core.air_tree(air)
    assert nodes.shape == (8, 40) and nodes.dtype == np.uint8 and tree_air.shape == (40, 4)
    runs = np.zeros((6, 2), np.int32)
    runs[:, 1] = [2, 45, 1, 1, 0, 15]
    comp = np.array([-1, 0], np.int32)
    best2 = np.full(1, np.inf).view(np.uint64)
    _core.search_air_runs(nodes, tree_air, runs, comp, best2)
    assert best2.view(np.float64)[0] == 2.0 ** 2 + 6.0 ** 2   # gaps z 2 and y 6 to the air at y = 39
    bad_nodes = nodes.copy()
    bad_nodes[3].view(np.int64)[1] = 41                   # hi past the air runs
    cases = [((bad_nodes, tree_air, runs, comp, best2), "tree over these air runs"),
             ((nodes[:2], tree_air, runs, comp, best2), "tree over these air runs"),
             ((nodes, tree_air, runs, np.array([-2, 0], np.int32), best2), "comp entries"),
             ((nodes, tree_air, runs, np.array([0, 1], np.int32), best2), "comp entries"),
             ((nodes, tree_air, runs, comp, np.zeros(1)), "uint64"),
             ((nodes, tree_air, runs[:4], comp, best2), r"\(6, n\)")]
    for args, msg in cases:
        with pytest.raises(ValueError, match=msg):
            _core.search_air_runs(*args)
    neg = runs.copy()
    neg[2, 1] = -1
    with pytest.raises(ValueError, match="voxel coordinates"):
        _core.search_air_runs(nodes, tree_air, neg, comp, best2)
    with pytest.raises(ValueError, match="x0 <= x1"):
        _core.air_tree(np.array([[0, 0, 3, 2]], np.int32))


def test_defect_voxels_host_twin_refuses_bad_input():
    """The host twin of the labeller's per-voxel kernel checks what the kernel takes on trust."""
    ext = np.zeros(2 * 4 * 5, np.uint8)
    ext[[0, 39]] = 2, 3
    e = np.array([0, 39], np.int64)
    nbr, stats, zyx, flags = _core.defect_voxels(ext, e, 0, 4, 5, 2, 0, True, 26)
    assert nbr.shape == (13, 2) and stats.shape == (2, 18) and zyx.tolist() == [[0, 0, 0], [1, 3, 4]]
    assert flags.dtype == np.uint8 and (flags & 48).tolist() == [48, 48]   # one-voxel runs: start and end
    for bad, match in (((ext, np.array([40]), 0, 4, 5, 2, 0, True, 26), "index the slab"),
                       ((ext, e, 0, 4, 5, 2, 0, True, 8), "connectivity"),
                       ((ext, e, 3, 4, 5, 2, 0, True, 26), "whole planes"),
                       ((ext, e, 0, 4, 5, 1, 0, True, 26), "whole planes"),
                       ((ext[:-1], e[:1], 0, 4, 5, 2, 0, True, 26), "whole planes")):
        with pytest.raises(ValueError, match=match):
            _core.defect_voxels(*bad)
    with pytest.raises(ValueError, match="index the plane"):
        _core.plane_crossings(ext[:20], np.array([20]), ext, 4, 5)


@pytest.mark.parametrize("source", sorted(post.NVRTC_SOURCES))
def test_kernels_compile_for_hopper(tmp_path, source):
    """Each kernel source as xctrt.gpu.post hands it to NVRTC, compiled by nvcc for sm_90 with the
    same options (no GPU needed to compile)."""
    import shutil
    import subprocess
    from pathlib import Path
    nvcc = shutil.which("nvcc")
    if nvcc is None:
        pytest.skip("no nvcc on this machine")
    options, kernels = post.NVRTC_SOURCES[source]
    out = tmp_path / "kernels.cubin"
    cmd = [nvcc, "-x", "cu", "-arch=sm_90", "-cubin", *options, "-o", str(out),
           str(Path(post.__file__).with_name(source))]
    r = subprocess.run(cmd, capture_output=True, text=True, timeout=300)
    assert r.returncode == 0, r.stderr
    assert all(k.encode() in out.read_bytes() for k in kernels)


_NVRTC_SCRIPT = """
import json, sys
from cuda.bindings import nvrtc
code, name, options = open(sys.argv[1], "rb").read(), sys.argv[2].encode(), [o.encode() for o in sys.argv[3:]]
_, prog = nvrtc.nvrtcCreateProgram(code, name, 0, [], [])
(err,) = nvrtc.nvrtcCompileProgram(prog, len(options), options)
_, size = nvrtc.nvrtcGetProgramLogSize(prog)
log = b" " * size
nvrtc.nvrtcGetProgramLog(prog, log)
ptx = b""
if err == nvrtc.nvrtcResult.NVRTC_SUCCESS:
    _, size = nvrtc.nvrtcGetPTXSize(prog)
    ptx = b" " * size
    nvrtc.nvrtcGetPTX(prog, ptx)
print(json.dumps({"ok": err == nvrtc.nvrtcResult.NVRTC_SUCCESS, "log": log.strip(b" \\x00\\n").decode(),
                  "ptx": ptx.decode(errors="replace")}))
"""


@pytest.mark.parametrize("source", sorted(post.NVRTC_SOURCES))
def test_kernels_compile_with_nvrtc(source):
    """Each kernel source through NVRTC itself, as CuPy's RawModule compiles it on the GPU machine, with
    the same options, for sm_90 (NVRTC needs no GPU): it compiles without a warning and has every kernel.
    In a process of its own: loading NVRTC's bindings here broke torch.load for the later tests."""
    import json
    import subprocess
    import sys
    from pathlib import Path
    pytest.importorskip("cuda.bindings.nvrtc")
    options, kernels = post.NVRTC_SOURCES[source]
    r = subprocess.run([sys.executable, "-c", _NVRTC_SCRIPT, str(Path(post.__file__).with_name(source)), source,
                        *options, "--gpu-architecture=compute_90"], capture_output=True, text=True, timeout=300)
    if r.returncode != 0 and ("nvrtc" in r.stderr.lower() and "load" in r.stderr.lower()):
        pytest.skip(f"NVRTC not usable here: {r.stderr.strip().splitlines()[-1]}")
    assert r.returncode == 0, r.stderr
    out = json.loads(r.stdout)
    assert out["ok"] and out["log"] == "", out["log"]
    assert all(f".entry {k}(" in out["ptx"] for k in kernels)


# ---------------------------------------------------------------- on a CuPy stand-in (tests/fake_cupy.py)
# The same functions with device arrays that refuse what CuPy refuses (implicit host conversion,
# host arrays in device expressions) and count host syncs: what would only fail on the GPU fails here.


def on_device(fc, fn, *args, **kwargs):
    """fn on stand-in device copies of the array arguments, its result brought back to the host."""
    out = fn(*(fc.asarray(a) if isinstance(a, np.ndarray) else a for a in args), **kwargs)
    assert isinstance(out, fc.ndarray), type(out)   # stayed on the device
    return post.to_host(out)


def test_pointwise_steps_on_a_cupy_stand_in(monkeypatch):
    import fake_cupy
    fc = fake_cupy.install(monkeypatch)
    rng = np.random.default_rng(0)
    for dtype in DTYPES:
        s, lo, hi = rand_slice(rng, (37, 41), dtype)
        assert_same(on_device(fc, post.window, s, lo, hi), post.window(s, lo, hi))
        for pad in ("edge", "constant"):
            assert_same(on_device(fc, post.extract_tiles, s, 16, 5, lo, hi, pad),
                        post.extract_tiles(s, 16, 5, lo, hi, pad))
    img = rng.standard_normal((2, 3, 20, 30)).astype(np.float32)
    assert_same(on_device(fc, post.resize_bilinear, img, 33, 17), post.resize_bilinear(img, 33, 17))
    p = rand_probs(rng, (2, 3, 20, 30))
    for mode in ("priority", "argmax"):
        args = (p, [0.5, 0.4, 0.6], [1, 2, 3], [2, 1, 0], mode)
        assert_same(on_device(fc, post.aggregate, *args), post.aggregate(*args))
    nt = len(_core.tile_starts(37, 16, 5)) * len(_core.tile_starts(41, 16, 5))
    t = rng.random((nt, 3, 16, 16)).astype(np.float32)
    for blend in ("constant", "ramp"):
        assert_same(on_device(fc, post.stitch_tiles, t, 37, 41, 5, blend), post.stitch_tiles(t, 37, 41, 5, blend))
    with pytest.raises(TypeError, match="Implicit conversion"):   # the stand-in refuses as CuPy does
        np.asarray(fc.asarray(img))


def test_concatenate_copies_many_arrays_one_by_one_on_the_device(monkeypatch):
    """More than 8 device arrays (a table over many slabs) are joined by copies, not by CuPy's own
    many-array kernel, which each process compiles per dtype and rank when its first table needs it."""
    import fake_cupy
    fc = fake_cupy.install(monkeypatch)
    rng = np.random.default_rng(2)
    for parts, axis in (([rng.integers(0, 9, int(n)) for n in rng.integers(0, 5, 12)], 0),
                        ([rng.random((3, int(n))).astype(np.float32) for n in rng.integers(1, 5, 9)], 1),
                        ([rng.integers(0, 9, (int(n), 4)).astype(np.int32) for n in rng.integers(0, 5, 3)], 0)):
        want = np.concatenate(parts, axis)
        joined = fc.concatenate
        if len(parts) > 8:
            monkeypatch.setattr(fc, "concatenate", lambda *a, **k: pytest.fail("CuPy's own concatenate"))
        got = post.concatenate([fc.asarray(p) for p in parts], axis)
        monkeypatch.setattr(fc, "concatenate", joined)
        assert isinstance(got, fc.ndarray) and got.dtype == want.dtype
        np.testing.assert_array_equal(post.to_host(got), want)
    with pytest.raises(ValueError, match="one dtype"):
        post.concatenate([fc.asarray(np.zeros(2, np.int32))] * 8 + [fc.asarray(np.zeros(2, np.int64))])


@pytest.mark.parametrize("conn", [6, 18, 26])
@pytest.mark.parametrize("slabs", [[12], [5, 0, 4, 3], [1] * 12], ids=["whole", "mixed", "ones"])
def test_components_on_a_cupy_stand_in(monkeypatch, conn, slabs):
    """Tables, outside air and label volume as on NumPy; host syncs stay a few dozen per slab (output
    sizes), never one per component or voxel."""
    import fake_cupy
    fc = fake_cupy.install(monkeypatch)
    rng = np.random.default_rng(conn)
    shape = (12, 30, 34)
    lab = noise(rng, shape)
    lab[:, :3] = 0                       # outside air, and air the part encloses (noise)
    img = image(rng, shape, np.uint16)
    got = post.ComponentLabeller(shape, (2, 3), conn, (0.5, 1.0, 2.0))
    ref = _core.ComponentLabeller(shape, [2, 3], conn, (0.5, 1.0, 2.0))
    fake_cupy.syncs, fake_cupy.ops, fake_cupy.launches, fake_cupy.stream_syncs, z = 0, 0, {}, 0, 0
    for d in slabs:
        got.add_slab(fc.asarray(lab[z:z + d]), fc.asarray(img[z:z + d]))
        ref.add_slab(lab[z:z + d], img[z:z + d])
        z += d
    nonempty = sum(1 for d in slabs if d)
    per_slab = fake_cupy.syncs / nonempty
    # 16-23 measured (19-26 before labeller_kernels.h, 23-33 before two jumps per check)
    assert per_slab <= 26, f"{per_slab:.1f} host syncs per slab"
    # device operations (kernel launches, roughly): 108-145 measured; ~700 when each neighbour, crossing and
    # run was an array operation of its own, before labeller_kernels.h
    assert fake_cupy.ops / nonempty <= 180, f"{fake_cupy.ops / nonempty:.0f} device operations per slab"
    # the slabs' outside-air trees went to the device on the host thread, on a stream of their own, so finish()
    # sends only the late air's tree
    trees = [f.result() for f in got._early_trees]
    assert len(trees) == nonempty
    assert all(isinstance(a, fc.ndarray) and a.stream is not None and a.stream.non_blocking for t in trees for a in t)
    assert fake_cupy.stream_syncs == nonempty   # each waited for there, before its future was done
    before = fake_cupy.syncs
    assert_table_same(got.finish(2), ref.finish(2))
    # the finish: the outside air's selection and copy, the merge's counts, its columns in one copy, the
    # search's result (5-6 measured; 21 when union-find rounds and one copy per column each synced)
    assert fake_cupy.syncs - before <= 8, f"{fake_cupy.syncs - before} host syncs in finish()"
    k = nonempty   # the kernels' paths: per slab and per boundary between slabs
    each_slab = ("xctrt_defect_voxels", "xctrt_defect_runs", "xctrt_air_sides", "xctrt_air_run_starts", "xctrt_air_runs",
                 "xctrt_air_label_init", "xctrt_air_label_merge", "xctrt_air_label_flatten", "xctrt_air_label_number",
                 "xctrt_component_stats")
    # the union-find: once per slab over its defect voxels and their neighbours, once more in finish() over the
    # components joined across slab boundaries (post._connect); the air's across slabs is joined on the host
    assert fake_cupy.launches == {"xctrt_search_air_runs": 1, **dict.fromkeys(each_slab, k),
                                  "xctrt_union_neighbours": k, "xctrt_find_roots": k + (k > 1),
                                  **({"xctrt_union_edges": 1} if k > 1 else {}),
                                  **(dict.fromkeys(("xctrt_plane_crossings", "xctrt_air_pairs"), k - 1) if k > 1 else {})}
    assert got.outside_air_voxels == ref.outside_air_voxels == int(outside_air_reference(lab).sum())
    assert_same(on_device(fc, post.label_volume, lab, (2, 3), conn), _core.label_volume(lab, [2, 3], conn))


@pytest.mark.parametrize("seed", range(40))
def test_air_label_kernels_number_the_air_as_scipy(monkeypatch, seed):
    """The GPU labeller's air labelling (union-find kernels, here their _core twins on the CuPy stand-in):
    the components and numbers scipy.ndimage.label gives, for slabs of every kind (all air, none, one
    plane, one row, long thin air); with AIR_LABEL = "cupyx", CuPy's own labelling (the stand-in's: SciPy)."""
    import fake_cupy
    from scipy import ndimage
    fc = fake_cupy.install(monkeypatch)
    rng = np.random.default_rng(seed)
    shape = [(1, 1, 1), (1, 1, 17), (1, 9, 1), (6, 1, 1), (3, 7, 5)][seed] if seed < 5 else \
        tuple(int(v) for v in rng.integers(1, 16, 3))
    air = rng.random(shape) < rng.uniform(0.05, 0.95)
    lab = np.where(air, 0, rng.integers(1, 4, shape)).astype(np.uint8) if seed % 9 else \
        np.full(shape, seed % 2, np.uint8)   # all air, or none
    if seed % 5 == 1:   # thin winding air: long paths through the union-find
        lab[...] = 1
        lab[:, ::2, :] = 0
        lab[:, 1::4, -1] = 0
        lab[:, 3::4, 0] = 0
    want, n_want = ndimage.label(lab == 0)
    for how in ("kernels", "cupyx"):
        monkeypatch.setattr(post, "AIR_LABEL", how)
        fake_cupy.launches = {}
        comp, n = post.air_label(fc.asarray(lab))
        assert isinstance(comp, fc.ndarray) and comp.dtype == np.int32 and comp.shape == shape
        assert_same(post.to_host(comp), want.astype(np.int32))
        assert n == n_want and isinstance(n, int)
        assert ("xctrt_air_label_merge" in fake_cupy.launches) == (how == "kernels")


def _find_steps(p, v):
    """labeller_kernels.h's forest_find as a GPU thread runs it on the shared forest p: a step per read or write."""
    u = p[v]
    yield
    while u != v:
        w = p[u]
        yield
        p[v] = w
        yield
        v = w
        u = p[v]
        yield
    return v


def _union_steps(p, a, b):
    """... and forest_union: the atomicMin is one step."""
    while True:
        a = yield from _find_steps(p, a)
        b = yield from _find_steps(p, b)
        if a == b:
            return
        a, b = max(a, b), min(a, b)
        old = p[a]
        p[a] = min(old, b)
        yield
        if old == a:
            return
        a = old


def _interleave(threads, rng) -> None:
    """One kernel's threads (generators), stepped in random order until all have ended (the most hostile
    schedule; a kernel ends before the next starts)."""
    threads = list(threads)
    while threads:
        i = int(rng.integers(len(threads)))
        try:
            next(threads[i])
        except StopIteration:
            threads[i] = threads[-1]
            threads.pop()


def _air_label_interleaved(lab: np.ndarray, rng) -> np.ndarray:
    """labeller_kernels.h's air labelling as GPU threads may run it: one generator per voxel and kernel, each
    step a read, a write or an atomicMin of the shared forest. Labels as air_label returns them."""
    n, (Y, X) = lab.size, lab.shape[1:]
    p = np.where(lab.reshape(-1) == 0, np.arange(n), -1)   # air_label_init

    def merge(v):
        if p[v] < 0:
            return
        left = v % X > 0 and p[v - 1] >= 0
        yield
        for nb, ok in ((v - 1, left), (v - X, (v // X) % Y > 0), (v - Y * X, v >= Y * X)):
            if ok and p[nb] >= 0 and not (nb != v - 1 and left and p[nb - 1] >= 0):   # the kernel's skip
                yield
                yield from _union_steps(p, v, nb)

    q, root = np.full(n, -1), np.zeros(n, np.int32)

    def flatten(v):
        if p[v] >= 0:
            q[v] = yield from _find_steps(p, v)
            root[v] = q[v] == v

    for kernel in (merge, flatten):
        _interleave((kernel(v) for v in range(n)), rng)
    rank = np.cumsum(root)
    return np.where(q >= 0, rank[q], 0).reshape(lab.shape)


@pytest.mark.parametrize("seed", range(30))
def test_air_label_kernels_give_scipy_under_any_thread_order(seed):
    """The air labelling's union-find is lock-free: threads find, halve paths and hook roots while others
    do. Under random interleavings of its steps its labels are still SciPy's (a root is its component's
    smallest index, however the hooks raced)."""
    from scipy import ndimage
    rng = np.random.default_rng(seed)
    shape = tuple(int(v) for v in rng.integers(1, 6, 3))
    lab = np.where(rng.random(shape) < rng.uniform(0.3, 0.9), 0, 1).astype(np.uint8)
    want = ndimage.label(lab == 0)[0]
    for _ in range(5):
        np.testing.assert_array_equal(_air_label_interleaved(lab, rng), want)


@pytest.mark.parametrize("seed", range(20))
def test_union_find_kernels_give_each_node_its_smallest_connected_node(monkeypatch, seed):
    """post._connect: the union-find kernels (every edge joined, then every node's root found), under
    random interleavings of their threads' steps and as their _core twins run them (on NumPy, and launched
    on the CuPy stand-in), give each node the smallest node of its component, as SciPy's components say."""
    import fake_cupy
    from scipy.sparse import coo_matrix
    from scipy.sparse.csgraph import connected_components
    rng = np.random.default_rng(seed)
    n = int(rng.integers(1, 40))
    m = int(rng.integers(0, 3 * n))
    a, b = rng.integers(0, n, m).astype(np.int32), rng.integers(0, n, m).astype(np.int32)
    if seed % 4 == 1:   # a long chain in shuffled order: deep trees for the finds to halve
        order = rng.permutation(n).astype(np.int32)
        a, b = order[:-1], order[1:]
    _, comp = connected_components(coo_matrix((np.ones(len(a)), (a, b)), shape=(n, n)), directed=False)
    want = np.array([np.flatnonzero(comp == c).min() for c in comp], np.int32)
    for _ in range(5):
        p, q = np.arange(n), np.full(n, -1)
        _interleave((_union_steps(p, int(x), int(y)) for x, y in zip(a, b)), rng)

        def find(v):
            q[v] = yield from _find_steps(p, v)
        _interleave((find(v) for v in range(n)), rng)
        np.testing.assert_array_equal(q, want)
    assert_same(post._connect(n, a, b), want)   # NumPy: the twins
    fc = fake_cupy.install(monkeypatch)
    fake_cupy.launches, fake_cupy.syncs = {}, 0
    got = post._connect(n, fc.asarray(a), fc.asarray(b))
    assert isinstance(got, fc.ndarray) and fake_cupy.syncs == 0   # no host sync on the device path
    assert_same(post.to_host(got), want)
    assert fake_cupy.launches == {"xctrt_find_roots": 1, **({"xctrt_union_edges": 1} if m else {})}


def _component_stats_warps(pid, stats, zyx, g, nloc, rng):
    """labeller_kernels.h's xctrt_component_stats as its warps run it: per warp of 32 voxels the lanes'
    shuffles (a lane reading past the warp's ends reads its own value), the run heads from the ballot, the
    segmented scans, and the atomics of each run's last lane; warps in random order."""
    n = len(pid)
    sums, mn, mx = np.zeros((nloc, 18)), np.full((nloc, 3), 2 ** 31 - 1, np.int32), np.full((nloc, 3), -1, np.int32)
    gsum, gmin, gmax = np.zeros(nloc), np.full(nloc, np.inf, np.float32), np.full(nloc, -np.inf, np.float32)
    lanes = np.arange(32)

    def up(v, d):   # __shfl_up_sync
        return np.where(lanes >= d, np.roll(v, d, axis=0), v) if v.ndim == 1 else \
            np.where((lanes >= d)[:, None], np.roll(v, d, axis=0), v)

    for w in rng.permutation((n + 31) // 32):
        i = w * 32 + lanes
        on = i < n
        c = np.where(on, pid[np.minimum(i, n - 1)], -1)
        before, after = up(c, 1), np.where(lanes < 31, np.roll(c, -1), c)
        heads = (lanes == 0) | (before != c)
        head = np.array([max(j for j in range(lane + 1) if heads[j]) for lane in lanes])
        tail = on & ((lanes == 31) | (after != c))

        def scan(v, op):
            for d in (1, 2, 4, 8, 16):
                take = lanes - d >= head
                v = np.where(take if v.ndim == 1 else take[:, None], op(v, up(v, d)), v)
            return v
        k = np.minimum(i, n - 1)
        srow = scan(np.where(on[:, None], stats[k], 0.0), np.add)
        lo = scan(np.where(on[:, None], zyx[k], 0), np.minimum)
        hi = scan(np.where(on[:, None], zyx[k], 0), np.maximum)
        for lane in np.flatnonzero(tail):
            sums[c[lane]] += srow[lane]
            mn[c[lane]] = np.minimum(mn[c[lane]], lo[lane])
            mx[c[lane]] = np.maximum(mx[c[lane]], hi[lane])
        if g is None:
            continue
        v = np.where(on, g[k], np.float32(0))
        s = scan(v.astype(np.float64), np.add)
        glo = scan(np.where(np.isnan(v), np.float32(np.inf), v), np.minimum)
        ghi = scan(np.where(np.isnan(v), np.float32(-np.inf), v), np.maximum)
        for lane in np.flatnonzero(tail):
            gsum[c[lane]] += s[lane]
            gmin[c[lane]] = min(gmin[c[lane]], glo[lane])
            gmax[c[lane]] = max(gmax[c[lane]], ghi[lane])
    return sums, mn, mx, gsum, gmin, gmax


@pytest.mark.parametrize("seed", range(12))
def test_component_stats_kernel_adds_each_run_once_in_its_warp(monkeypatch, seed):
    """The statistics kernel's warp reduction (runs of one component summed in the warp, one atomic per run)
    gives what adding voxel by voxel gives (its _core twin): sums, coordinate min/max, grey sum and min/max
    with NaN left out; for long runs, runs across warps, one component throughout, and a component's
    voxels apart (A A B A); on the stand-in post.component_stats launches the kernel once."""
    import fake_cupy
    rng = np.random.default_rng(seed)
    n, nloc = int(rng.integers(1, 300)), int(rng.integers(1, 12))
    pid = np.sort(rng.integers(0, nloc, n)).astype(np.int32) if seed % 3 == 0 else \
        np.repeat(rng.integers(0, nloc, n), rng.integers(1, 40, n))[:n].astype(np.int32)   # runs, and runs again
    if seed == 1:
        pid[:] = 0   # one component throughout: a run per warp
    n = len(pid)
    stats = rng.integers(0, 3, (n, 18)).astype(np.float64)
    zyx = rng.integers(0, 1000, (n, 3)).astype(np.int32)
    g = rng.integers(0, 65536, n).astype(np.float32)
    g[rng.random(n) < 0.1] = np.nan
    want = _core.component_stats(pid, stats, zyx, g, nloc)
    ref_sums = np.zeros((nloc, 18))
    np.add.at(ref_sums, pid, stats)
    assert_same(want[0], ref_sums)
    ok = ~np.isnan(g)
    assert_same(want[4][np.unique(pid[ok])], np.array([g[ok & (pid == c)].min() for c in np.unique(pid[ok])],
                                                       np.float32))
    for grey in (g, None):
        got = _component_stats_warps(pid, stats, zyx, grey, nloc, rng)
        ref = _core.component_stats(pid, stats, zyx, grey, nloc)
        for a, b in zip(got, ref):
            np.testing.assert_array_equal(a, b)
    fc = fake_cupy.install(monkeypatch)
    fake_cupy.launches = {}
    out = post.component_stats(fc.asarray(pid), fc.asarray(stats), fc.asarray(zyx), fc.asarray(g), nloc)
    assert fake_cupy.launches == {"xctrt_component_stats": 1}
    for key, b in zip(("sums", "min", "max", "gsum", "gmin", "gmax"), want):
        np.testing.assert_array_equal(post.to_host(out[key]), b)


def test_union_neighbours_joins_what_the_edge_list_would(monkeypatch):
    """post._connect_neighbours reads the edges from defect_voxels' neighbour table itself: the same roots as
    _connect over the edges listed from it (those in the slab, through the local index), on NumPy and on the
    CuPy stand-in, where it is one launch and no host sync; its twin refuses neighbours it cannot place."""
    import fake_cupy
    rng = np.random.default_rng(5)
    shape = (5, 9, 11)
    lab = noise(rng, shape)
    lab[0, :4] = 2   # runs and blocks of one label
    plane = shape[1] * shape[2]
    prev = noise(rng, shape[1:]).reshape(-1)
    for goff in (0, plane):   # the first slab, then one behind a previous slab's last plane
        ext = np.concatenate([prev, lab.reshape(-1)]) if goff else lab.reshape(-1)
        idx = np.flatnonzero(np.isin(lab.reshape(-1), (2, 3)))
        n = len(idx)
        nbr = _core.defect_voxels(ext, idx + goff, goff, shape[1], shape[2], shape[0], 0, False, 26)[0]
        local = np.full(lab.size, -1, np.int32)
        local[idx] = np.arange(n, dtype=np.int32)
        t = np.flatnonzero(nbr.reshape(-1) >= goff)
        want = post._connect(n, (t % n).astype(np.int32), local[nbr.reshape(-1)[t] - goff])
        assert len(np.unique(want)) < n   # some joined
        assert_same(post._connect_neighbours(n, nbr, goff, local), want)
        fc = fake_cupy.install(monkeypatch)
        fake_cupy.launches, fake_cupy.syncs = {}, 0
        got = post._connect_neighbours(n, fc.asarray(nbr), goff, fc.asarray(local))
        assert fake_cupy.syncs == 0 and fake_cupy.launches == {"xctrt_union_neighbours": 1, "xctrt_find_roots": 1}
        assert_same(post.to_host(got), want)
        monkeypatch.undo()
    with pytest.raises(ValueError, match="not in the defect list"):   # a neighbour whose place is unset
        _core.union_neighbours(np.arange(2, dtype=np.int32), np.array([[-1, 0]], np.int64), 0,
                               np.array([-1, 0], np.int32))
    with pytest.raises(ValueError, match="not in the defect list"):   # beyond the slab
        _core.union_neighbours(np.arange(2, dtype=np.int32), np.array([[-1, 9]], np.int64), 0,
                               np.array([1, 0], np.int32))
    with pytest.raises(ValueError, match=r"\(k, n\)"):
        _core.union_neighbours(np.arange(2, dtype=np.int32), np.zeros((1, 3), np.int64), 0, np.zeros(2, np.int32))


@pytest.mark.parametrize("rows", [0, 1, 7])
def test_to_host_all_copies_a_dict_of_device_arrays_in_one_sync(monkeypatch, rows):
    """The table's merged columns come to the host in one copy (finish() did one per column, each a host
    sync): every dtype and shape back as it was, aligned, in the dict's order; host arrays as they are."""
    import fake_cupy
    rng = np.random.default_rng(rows)
    cols = {"cls": rng.integers(0, 4, rows).astype(np.uint8), "voxels": rng.integers(0, 9, rows),
            "min": rng.integers(0, 9, (rows, 3)).astype(np.int32), "edge": rng.random(rows) < 0.5,
            "cross": rng.integers(0, 9, (rows, 13)), "gmin": rng.random(rows).astype(np.float32),
            "gsum": rng.random(rows)}
    assert all(a is cols[k] or np.shares_memory(a, cols[k]) for k, a in post.to_host_all(cols).items())
    fc = fake_cupy.install(monkeypatch)
    fake_cupy.syncs = 0
    got = post.to_host_all({k: fc.asarray(v) for k, v in cols.items()})
    assert fake_cupy.syncs == 1 and list(got) == list(cols)
    for k, v in cols.items():
        assert isinstance(got[k], np.ndarray) and got[k].flags.aligned
        assert_same(got[k], v)


def test_union_find_host_twins_refuse_what_would_send_them_out_of_bounds():
    with pytest.raises(ValueError, match="out of range"):
        _core.component_stats(np.array([0, 2], np.int32), np.zeros((2, 18)), np.zeros((2, 3), np.int32), None, 2)
    with pytest.raises(ValueError, match="one row per voxel"):
        _core.component_stats(np.array([0, 1], np.int32), np.zeros((2, 17)), np.zeros((2, 3), np.int32), None, 2)
    with pytest.raises(ValueError, match="one value per voxel"):
        _core.component_stats(np.array([0, 1], np.int32), np.zeros((2, 18)), np.zeros((2, 3), np.int32),
                              np.zeros(3, np.float32), 2)
    p = np.arange(4, dtype=np.int32)
    assert_same(_core.union_edges(p, np.array([3, 1], np.int32), np.array([1, 0], np.int32)),
                np.array([0, 0, 2, 1], np.int32))
    with pytest.raises(ValueError, match="out of range"):
        _core.union_edges(p, np.array([4], np.int32), np.array([0], np.int32))
    with pytest.raises(ValueError, match="out of range"):
        _core.union_edges(p, np.array([0], np.int32), np.array([-1], np.int32))
    with pytest.raises(ValueError, match="one length"):
        _core.union_edges(p, np.array([0, 1], np.int32), np.array([0], np.int32))
    for bad in (np.array([0, 2, 2, 3], np.int32), np.array([0, -1, 2, 3], np.int32)):   # above itself, or none
        with pytest.raises(ValueError, match="at or below"):
            _core.union_edges(bad, np.zeros(0, np.int32), np.zeros(0, np.int32))
        with pytest.raises(ValueError, match="at or below"):
            _core.find_roots(bad)


def test_air_label_host_twins_refuse_what_would_send_them_out_of_bounds():
    p = _core.air_label_init(np.array([0, 1, 0, 0], np.uint8))
    assert_same(p, np.array([0, -1, 2, 3], np.int32))
    with pytest.raises(ValueError, match="index <= its own"):
        _core.air_label_merge(np.array([0, 3, 2, 3], np.int32), 1, 4)   # a parent above its child
    with pytest.raises(ValueError, match="index <= its own"):
        _core.air_label_flatten(np.array([0, -2, 2, 3], np.int32))
    with pytest.raises(ValueError, match="whole planes"):
        _core.air_label_merge(p, 3, 1)
    with pytest.raises(ValueError, match="one value per voxel"):
        _core.air_label_number(p, np.zeros(3, np.int32))


def test_kernels_fall_back_to_the_host_when_nvrtc_refuses(monkeypatch):
    """A toolchain that cannot build the kernels: their host twins run instead (same table), once
    tried, and kernel_error() says why, for the run's summary."""
    import fake_cupy
    fc = fake_cupy.install(monkeypatch)
    monkeypatch.setattr(fake_cupy, "refuse_kernels", True)
    monkeypatch.setattr(post, "_kernels", {})
    rng = np.random.default_rng(8)
    shape = (6, 24, 26)
    lab = noise(rng, shape)
    lab[:, :3] = 0
    img = image(rng, shape, np.uint16)
    assert post.air_search_error() is None
    for _ in range(2):
        got, ref = post.ComponentLabeller(shape, voxel_size=(0.5, 1.0, 2.0)), _core.ComponentLabeller(shape, voxel_size=(0.5, 1.0, 2.0))
        got.add_slab(fc.asarray(lab), fc.asarray(img))
        ref.add_slab(lab, img)
        fake_cupy.launches = {}
        assert_table_same(got.finish(), ref.finish())
        assert fake_cupy.launches == {}
        assert "NVRTC_ERROR_COMPILATION" in post.air_search_error()
        assert "NVRTC_ERROR_COMPILATION" in post.kernel_error(post.LABELLER)
    from xctrt.cli import gpu_fallback_notes
    note = gpu_fallback_notes({"timing": {"gpu_surface_search_not_used_because": post.air_search_error(),
                                          "gpu_labeller_kernels_not_used_because": post.kernel_error(post.LABELLER)}})
    assert len(note) == 2 and note[0].startswith("the components' per-voxel kernels ran on the host")
    assert note[1].startswith("the distances to the surface were searched on the host")


@pytest.mark.parametrize("fill", [0, 1, 2])
def test_components_without_air_defects_or_part_on_a_cupy_stand_in(monkeypatch, fill):
    import fake_cupy
    fc = fake_cupy.install(monkeypatch)
    shape = (5, 9, 11)
    lab = np.full(shape, fill, np.uint8)
    img = image(np.random.default_rng(fill), shape, np.float32)
    got, ref = post.ComponentLabeller(shape), _core.ComponentLabeller(shape)
    got.add_slab(fc.asarray(lab), fc.asarray(img))
    ref.add_slab(lab, img)
    assert_table_same(got.finish(), ref.finish(), float_image=True)
    assert got.outside_air_voxels == ref.outside_air_voxels


def test_host_components_search_on_a_cupy_stand_in(monkeypatch):
    """The GPU path with its components on the host (C++) searches their table's distances with the
    device kernel: the labeller's exported runs go to the stand-in device, the kernel is launched once,
    and the distances are the labeller's own bit for bit."""
    import fake_cupy
    from types import SimpleNamespace

    from xctrt.defects import DefectCounter
    from xctrt.gpu.pipeline import GpuStage
    fc = fake_cupy.install(monkeypatch)
    monkeypatch.setattr(post, "_kernels", {})
    rng = np.random.default_rng(11)
    shape, vs = (8, 26, 30), (0.5, 1.0, 2.0)
    lab = noise(rng, shape)
    lab[:, :3] = 0
    img = image(rng, shape, np.uint16)
    ref = _core.ComponentLabeller(shape, voxel_size=vs)
    ref.add_slab(lab, img)
    want = ref.finish(1)
    stage = SimpleNamespace(xp=fc, cuda=False, postproc=None, voxel_size=vs, _search_times={})
    counter = DefectCounter(shape, vs, surface_search=lambda *a: GpuStage._surface_search(stage, *a))
    counter.add_slab(lab, img)
    fake_cupy.launches = {}
    got = counter.finish(1)
    assert fake_cupy.launches == {"xctrt_search_air_runs": 1}
    assert got["surface_distance"].tobytes() == want["surface_distance"].tobytes()
    assert np.isfinite(want["surface_distance"]).all() and len(want["id"]) > 10
    t = stage._search_times
    assert t["runs"]["outside_air"] == len(ref.outside_air_runs()) and t["runs"]["defect"] >= len(want["id"])
    assert t["surface_distance"] >= t["surface_tree"] >= 0
