"""Streamed 3D connected components (xctrt._core.ComponentLabeller) against NumPy/SciPy and cc3d."""

import math
from pathlib import Path

import cc3d
import numpy as np
import pytest
import scipy.ndimage as ndi
from hypothesis import given, settings
from hypothesis import strategies as st

from conftest import crofton_reference, surface_distance_reference
from xctrt import _core

RANK = {6: 1, 18: 2, 26: 3}
INT_COLS = ["id", "voxels", "bbox_z0", "bbox_y0", "bbox_x0", "bbox_z1", "bbox_y1", "bbox_x1"]
FLOAT_COLS = ["volume", "equivalent_diameter", "centroid_z", "centroid_y", "centroid_x",
              "surface_area", "sphericity", "grey_mean", "grey_min", "grey_max", "surface_distance"]
ALL_COLS = INT_COLS + ["class", "touches_edge"] + FLOAT_COLS


# ---------------------------------------------------------------------------------------------
# Reference: scipy.ndimage.label per class value, every column computed in NumPy.

def reference(lab, img, classes=(2, 3), connectivity=26, voxel_size=(1.0, 1.0, 1.0),
              min_voxels=0):
    """Returns (table, id_volume) with components ordered by their first voxel's raster index."""
    Z, Y, X = lab.shape
    dz, dy, dx = (float(v) for v in voxel_size)
    struct = ndi.generate_binary_structure(3, RANK[connectivity])
    zz, yy, xx = np.indices(lab.shape)
    boundary = np.zeros(lab.shape, bool)
    boundary[0] = boundary[-1] = True
    boundary[:, 0] = boundary[:, -1] = True
    boundary[:, :, 0] = boundary[:, :, -1] = True
    grey = img.astype(np.float64)
    # Line crossings per Crofton direction and voxel: the neighbour one step along +v or -v is
    # outside the volume or has another label value (cpp/crofton.hpp).
    dirs, per_crossing = crofton_reference((dz, dy, dx))
    padded = np.pad(lab.astype(np.int16), 1, constant_values=-1)
    crossings = []
    for d in dirs:
        c = np.zeros(lab.shape, np.int64)
        for sgn in (1, -1):
            oz, oy, ox = (1 + sgn * int(v) for v in d)
            c += padded[oz:oz + Z, oy:oy + Y, ox:ox + X] != lab
        crossings.append(c)
    comps = []  # (first flat index, class, flat voxel indices, crossings per direction)
    for c in sorted(set(int(c) for c in classes)):
        mask = lab == c
        s, n = ndi.label(mask, struct)
        if n == 0:
            continue
        flat = s.ravel()
        order = np.argsort(flat, kind="stable")
        starts = np.searchsorted(flat[order], np.arange(1, n + 1))
        ends = np.append(starts[1:], flat.size)
        for k in range(n):
            idx = order[starts[k]:ends[k]]  # ascending flat indices (stable sort)
            f = np.array([int(cr.ravel()[idx].sum()) for cr in crossings])
            comps.append((int(idx[0]), c, idx, f))
    comps.sort(key=lambda t: t[0])

    ids = np.zeros(lab.shape, np.int32)
    rows = {k: [] for k in ALL_COLS}
    for first, c, idx, f in comps:
        n = idx.size
        if n < min_voxels:
            continue
        ids.ravel()[idx] = len(rows["id"]) + 1
        z, y, x = zz.ravel()[idx], yy.ravel()[idx], xx.ravel()[idx]
        vol = n * dz * dy * dx
        area = float(f @ per_crossing)
        g = grey.ravel()[idx]
        rows["id"].append(len(rows["id"]) + 1)
        rows["class"].append(c)
        rows["voxels"].append(n)
        rows["volume"].append(vol)
        rows["equivalent_diameter"].append(np.cbrt(6.0 * vol / math.pi))
        for name, v in zip("zyx", (z, y, x)):
            rows[f"bbox_{name}0"].append(int(v.min()))
            rows[f"bbox_{name}1"].append(int(v.max()))
            rows[f"centroid_{name}"].append(int(v.astype(np.int64).sum()) / n)
        rows["surface_area"].append(area)
        rows["sphericity"].append(np.cbrt(math.pi) * (6.0 * vol) ** (2.0 / 3.0) / area)
        rows["grey_mean"].append(g.sum() / n)
        rows["grey_min"].append(g.min())
        rows["grey_max"].append(g.max())
        rows["touches_edge"].append(bool(boundary.ravel()[idx].any()))
    rows["surface_distance"] = surface_distance_reference(lab, ids, (dz, dy, dx))
    dtypes = {"class": np.uint8, "touches_edge": bool}
    dtypes.update({k: np.int64 for k in INT_COLS})
    dtypes.update({k: np.float64 for k in FLOAT_COLS})
    table = {k: np.asarray(v, dtype=dtypes[k]).reshape(-1) for k, v in rows.items()}
    return table, ids


def assert_table_equal(got, ref):
    assert set(got) == set(ALL_COLS)
    n = len(ref["id"])
    for k in ALL_COLS:
        a = got[k]
        assert a.ndim == 1 and a.shape[0] == n, k
        assert a.dtype == ref[k].dtype, (k, a.dtype, ref[k].dtype)
        if k in FLOAT_COLS:
            # surface_distance: SciPy's distance transform can round a tie between two equally
            # distant air voxels the other way (one ulp); ours is the minimum of one formula.
            # surface_area, sphericity: the Crofton weights here come from SciPy's spherical
            # Voronoi, in C++ from our own (equal to ~1e-14), and the sums run in another order.
            np.testing.assert_allclose(a, ref[k], rtol=1e-12, atol=0, equal_nan=True, err_msg=k)
        else:
            np.testing.assert_array_equal(a, ref[k], err_msg=k)
    # Computed the same way in both, so these agree bit for bit.
    for k in ["volume", "centroid_z", "centroid_y", "centroid_x", "grey_min", "grey_max"]:
        np.testing.assert_array_equal(got[k], ref[k], err_msg=k)


def stream(lab, img, slabs, min_voxels=0, **kw):
    lb = _core.ComponentLabeller(shape=lab.shape, **kw)
    z = 0
    for d in slabs:
        lb.add_slab(lab[z:z + d], img[z:z + d])
        z += d
    assert z == lab.shape[0] and lb.slices_received == z
    return lb, lb.finish(min_voxels=min_voxels)


def random_slabs(rng, Z):
    mode = rng.integers(0, 4)
    if mode == 0:
        return [Z]
    if mode == 1:
        return [1] * Z
    out, z = [], 0
    while z < Z:
        d = int(rng.integers(0 if mode == 2 else 1, Z - z + 1))  # mode 2 also sends empty slabs
        out.append(d)
        z += d
    return out


def random_image(rng, shape):
    kind = rng.integers(0, 3)
    if kind == 0:
        return rng.integers(0, 256, shape, dtype=np.uint8)
    if kind == 1:
        return rng.integers(0, 65536, shape, dtype=np.uint16)
    return rng.uniform(0, 1000, shape).astype(np.float32)


def random_labels(rng, shape):
    kind = rng.integers(0, 5)
    if kind == 0:  # sparse random defects of two kinds that touch each other
        p = rng.dirichlet([4, 4, 1, 1])
        return rng.choice(4, size=shape, p=p).astype(np.uint8)
    if kind == 1:  # dense: big tangled components, pore and inclusion adjacent
        return rng.integers(0, 4, shape, dtype=np.uint8)
    if kind == 2:  # blobs on material
        lab = np.ones(shape, np.uint8)
        zz, yy, xx = np.indices(shape)
        for _ in range(rng.integers(0, 6)):
            c = rng.uniform(0, shape)
            r = rng.uniform(0.5, 4, 3)
            m = ((zz - c[0]) / r[0]) ** 2 + ((yy - c[1]) / r[1]) ** 2 + ((xx - c[2]) / r[2]) ** 2 <= 1
            lab[m] = rng.integers(2, 4)
        return lab
    if kind == 3:  # uniform: all background or all one defect value
        return np.full(shape, rng.choice([0, 1, 2, 3]), np.uint8)
    return rng.integers(0, 8, shape, dtype=np.uint8)  # more label values than classes


CLASS_SETS = [[2, 3], [2, 3], [2, 3], [2], [3], [1, 2, 3], [0, 3], [2, 3, 5, 7, 1, 4], []]


def random_case(seed):
    rng = np.random.default_rng(seed)
    dims = [int(rng.integers(1, 13)) for _ in range(3)]
    for i in range(3):  # make degenerate axes common
        if rng.random() < 0.12:
            dims[i] = 1
    shape = tuple(dims)
    lab = random_labels(rng, shape)
    img = random_image(rng, shape)
    classes = CLASS_SETS[rng.integers(0, len(CLASS_SETS))]
    conn = int(rng.choice([6, 18, 26]))
    vs = tuple(float(v) for v in rng.uniform(0.1, 3.0, 3)) if rng.random() < 0.7 else (1.0, 1.0, 1.0)
    min_voxels = int(rng.integers(1, 6)) if rng.random() < 0.25 else 0
    return rng, lab, img, classes, conn, vs, min_voxels


# ---------------------------------------------------------------------------------------------

@pytest.mark.parametrize("seed", range(240))
def test_random_against_reference(seed):
    rng, lab, img, classes, conn, vs, min_voxels = random_case(seed)
    ref, ref_ids = reference(lab, img, classes, conn, vs, min_voxels)
    lb, got = stream(lab, img, random_slabs(rng, lab.shape[0]), min_voxels, classes=classes,
                     connectivity=conn, voxel_size=vs)
    assert_table_equal(got, ref)
    assert lb.n_provisional >= len(ref["id"])
    if min_voxels == 0:
        np.testing.assert_array_equal(_core.label_volume(lab, classes, conn), ref_ids)
        slab = int(rng.integers(1, lab.shape[0] + 3))
        assert_table_equal(_core.label_components(lab, img, classes, conn, vs, 0, slab), ref)


def cc3d_check(lab, classes, conn):
    v = np.where(np.isin(lab, classes), lab, 0).astype(np.uint8)
    cl, n = cc3d.connected_components(v, connectivity=conn, return_N=True)
    ids = _core.label_volume(lab, classes, conn)
    table = _core.label_components(lab, np.zeros(lab.shape, np.uint8), classes, conn)
    assert ids.dtype == np.int32 and ids.shape == lab.shape
    assert len(table["id"]) == n == ids.max()
    counts = cc3d.statistics(cl)["voxel_counts"][1:]
    np.testing.assert_array_equal(np.sort(table["voxels"]), np.sort(counts.astype(np.int64)))
    np.testing.assert_array_equal(np.bincount(ids.ravel(), minlength=n + 1)[1:], table["voxels"])
    # Same partition: the (cc3d, ours) label pairs form a bijection.
    assert ((cl == 0) == (ids == 0)).all()
    pairs = np.unique(np.stack([cl.ravel(), ids.ravel()]), axis=1)
    assert len(np.unique(pairs[0])) == len(np.unique(pairs[1])) == pairs.shape[1]


@pytest.mark.parametrize("seed", range(60))
def test_random_against_cc3d(seed):
    rng = np.random.default_rng(10_000 + seed)
    shape = tuple(int(v) for v in rng.integers(1, 24, 3))
    lab = random_labels(rng, shape)
    classes = [[2, 3], [2], [1, 2, 3], [2, 3, 5, 7, 1, 4]][seed % 4]
    cc3d_check(lab, classes, [6, 18, 26][seed % 3])


@pytest.mark.parametrize("conn", [6, 18, 26])
def test_blobs_larger_volume_against_cc3d(conn):
    rng = np.random.default_rng(conn)
    lab = np.ones((40, 64, 72), np.uint8)
    zz, yy, xx = np.ogrid[:40, :64, :72]
    for _ in range(60):
        c = rng.uniform(0, lab.shape)
        r = rng.uniform(1, 8, 3)
        m = ((zz - c[0]) / r[0]) ** 2 + ((yy - c[1]) / r[1]) ** 2 + ((xx - c[2]) / r[2]) ** 2 <= 1
        lab[m] = rng.integers(2, 4)
    cc3d_check(lab, [2, 3], conn)
    img = rng.integers(0, 65536, lab.shape, dtype=np.uint16)
    ref, _ = reference(lab, img, (2, 3), conn, (0.5, 0.7, 1.3))
    assert_table_equal(_core.label_components(lab, img, connectivity=conn,
                                              voxel_size=(0.5, 0.7, 1.3), slab=7), ref)


@given(
    shape=st.tuples(st.integers(1, 7), st.integers(1, 7), st.integers(1, 7)),
    conn=st.sampled_from([6, 18, 26]),
    seed=st.integers(0, 2**32 - 1),
    slab=st.integers(1, 9),
)
@settings(max_examples=60, deadline=None)
def test_hypothesis_against_reference(shape, conn, seed, slab):
    rng = np.random.default_rng(seed)
    lab = rng.integers(0, 4, shape, dtype=np.uint8)
    img = rng.integers(0, 256, shape, dtype=np.uint8)
    ref, ids = reference(lab, img, (2, 3), conn)
    assert_table_equal(_core.label_components(lab, img, connectivity=conn, slab=slab), ref)
    np.testing.assert_array_equal(_core.label_volume(lab, [2, 3], conn), ids)


# ---------------------------------------------------------------------------------------------
# Hand-made cases.

def test_single_voxel_values():
    lab = np.zeros((3, 4, 5), np.uint8)
    lab[1, 2, 3] = 2
    img = np.full(lab.shape, 7, np.uint16)
    img[1, 2, 3] = 1000
    t = _core.label_components(lab, img, voxel_size=(2.0, 3.0, 5.0))
    assert list(t["id"]) == [1] and t["class"][0] == 2 and t["voxels"][0] == 1
    assert t["volume"][0] == 30.0
    # Two crossings along each of the 13 directions.
    np.testing.assert_allclose(t["surface_area"][0], 2 * crofton_reference((2.0, 3.0, 5.0))[1].sum(), rtol=1e-12)
    assert (t["bbox_z0"][0], t["bbox_y0"][0], t["bbox_x0"][0]) == (1, 2, 3)
    assert (t["bbox_z1"][0], t["bbox_y1"][0], t["bbox_x1"][0]) == (1, 2, 3)
    assert (t["centroid_z"][0], t["centroid_y"][0], t["centroid_x"][0]) == (1.0, 2.0, 3.0)
    assert t["grey_mean"][0] == t["grey_min"][0] == t["grey_max"][0] == 1000.0
    assert not t["touches_edge"][0]
    assert t["surface_distance"][0] == 2.0  # air all round: the nearest is one z step away


def test_surface_distance_by_hand():
    # A part filling the volume but for an air gap at x = 0..1; voxels 0.5 x 0.3 x 0.2 mm.
    lab = np.ones((5, 9, 12), np.uint8)
    lab[:, :, :2] = 0
    lab[2, 4, 7] = 2          # 6 steps in x from the air at x = 1
    lab[0:2, 1, 10] = 3       # 9 steps in x; the volume edges are not air
    lab[4, 8, 2] = 2          # next to the air: one voxel
    lab[3, 6, 5:7] = 3        # a run: its x = 5 end is 4 steps away
    vs = (0.5, 0.3, 0.2)
    t = _core.label_components(lab, np.zeros(lab.shape, np.uint8), voxel_size=vs)
    by_first = {(int(z), int(y), int(x)): d for z, y, x, d in
                zip(t["bbox_z0"], t["bbox_y0"], t["bbox_x0"], t["surface_distance"])}
    assert by_first == {(2, 4, 7): 6 * 0.2, (0, 1, 10): 9 * 0.2, (4, 8, 2): 0.2, (3, 6, 5): 4 * 0.2}
    # Air the part encloses (a cavity, or the dark rim a model draws round a pore) is not the
    # part's outside; air connected to the volume's edge is.
    lab[2, 4, 9] = 0
    lab[2, 3:6, 6:9][lab[2, 3:6, 6:9] == 1] = 0  # a rim of air round the pore at (2, 4, 7)
    t = _core.label_components(lab, np.zeros(lab.shape, np.uint8), voxel_size=vs)
    assert t["surface_distance"][t["bbox_x0"] == 7][0] == 6 * 0.2
    lab[2, 4, 2:6] = 0  # a channel from the outside to the rim: now it is outside too
    t = _core.label_components(lab, np.zeros(lab.shape, np.uint8), voxel_size=vs)
    assert t["surface_distance"][t["bbox_x0"] == 7][0] == 0.2
    # A vertical channel, enclosed in every plane it crosses: closed at both ends it is a cavity,
    # and reaching the first plane does not make it outside (the part runs through that plane);
    # once it leaves the part into the air round it (a tunnel in plane 0 to the air at x < 2) it
    # is outside, as a cooling channel would be, though no plane at its side shows it open.
    lab2 = np.ones_like(lab)
    lab2[:, :, :2] = 0
    lab2[0:4, 7, 9] = 0
    lab2[2, 7, 10] = 2  # next to the channel, 9 x steps from the air at x = 1
    t = _core.label_components(lab2, np.zeros(lab.shape, np.uint8), voxel_size=vs)
    assert t["surface_distance"][t["bbox_x0"] == 10][0] == 9 * 0.2
    lab2[0, 7, 2:9] = 0
    t = _core.label_components(lab2, np.zeros(lab.shape, np.uint8), voxel_size=vs)
    assert t["surface_distance"][t["bbox_x0"] == 10][0] == 0.2
    # Without any air there is no surface to measure from.
    t = _core.label_components(np.where(lab == 0, 1, lab).astype(np.uint8), np.zeros(lab.shape, np.uint8))
    assert len(t["id"]) == 4 and np.isnan(t["surface_distance"]).all()


@pytest.mark.parametrize("min_voxels", [0, 3])
def test_surface_search_elsewhere_gives_the_labellers_own_bits(min_voxels):
    """finish(surface_distance=False) + surface_search_inputs() + the per-run search (the GPU kernel's
    host twin) over air_tree: the same distances, bit for bit, as the labeller's own search, also
    through DefectCounter(surface_search=...); the outside air is counted either way."""
    from xctrt.defects import DefectCounter
    rng = np.random.default_rng(7)
    lab = np.ones((9, 40, 50), np.uint8)
    yy, xx = np.mgrid[:40, :50]
    lab[:, (yy - 20) ** 2 + (xx - 25) ** 2 > 17 ** 2] = 0   # a cylinder with air round it
    inner = lab == 1
    lab[inner & (rng.random(lab.shape) < 0.06)] = 2
    lab[inner & (rng.random(lab.shape) < 0.04)] = 3
    lab[inner & (rng.random(lab.shape) < 0.02)] = 0     # enclosed air: not the surface
    img = rng.integers(0, 65535, lab.shape, dtype=np.uint16)
    vs = (0.5, 0.3, 0.2)

    def labeller():
        lb = _core.ComponentLabeller(shape=lab.shape, voxel_size=vs)
        for z0 in range(0, 9, 4):
            lb.add_slab(lab[z0:z0 + 4], img[z0:z0 + 4])
        return lb
    own = labeller()
    want = own.finish(min_voxels=min_voxels)
    other = labeller()
    with pytest.raises(RuntimeError, match="after finish"):
        other.surface_search_inputs()
    got = other.finish(min_voxels=min_voxels, surface_distance=False)
    assert np.isnan(got["surface_distance"]).all() and len(got["id"]) == len(want["id"]) > 20
    for k in want:
        if k != "surface_distance":
            np.testing.assert_array_equal(got[k], want[k], err_msg=k)
    air, runs, comp = other.surface_search_inputs()
    assert other.outside_air_voxels == own.outside_air_voxels > 0
    assert air.dtype == runs.dtype == comp.dtype == np.int32 and runs.shape == (6, len(comp))
    np.testing.assert_array_equal(air, own.outside_air_runs())
    # the outside air is made once and kept: a second finish searches it again, in the same order
    assert own.finish(min_voxels=min_voxels)["surface_distance"].tobytes() == want["surface_distance"].tobytes()
    np.testing.assert_array_equal(own.outside_air_runs(), air)
    np.testing.assert_array_equal(runs[4], comp)
    assert comp.min() >= -1 and comp.max() == len(want["id"]) - 1
    assert (comp == -1).any() == (min_voxels > 1)
    # every kept defect voxel is in one run of its component
    assert np.bincount(comp[comp >= 0], weights=(runs[3] - runs[2] + 1)[comp >= 0]).tolist() == \
        want["voxels"].tolist()
    nodes, tree_air = _core.air_tree(air, vs)
    best2 = np.full(len(want["id"]), np.inf).view(np.uint64)
    _core.search_air_runs(nodes, tree_air, runs, comp, best2, vs)
    assert np.sqrt(best2.view(np.float64)).tobytes() == want["surface_distance"].tobytes()

    def search(a, r, c, n):
        nodes, tree_air = _core.air_tree(a, vs)
        b2 = np.full(n, np.inf).view(np.uint64)
        _core.search_air_runs(nodes, tree_air, r, c, b2, vs)
        return np.sqrt(b2.view(np.float64))
    counter = DefectCounter(lab.shape, vs, surface_search=search)
    counter.add_slab(lab, img)
    table = counter.finish(min_voxels)
    assert table["surface_distance"].tobytes() == want["surface_distance"].tobytes()
    assert counter.outside_air_voxels == own.outside_air_voxels
    # without outside air the search is not asked and the column stays NaN, as the labeller leaves it
    calls = []
    counter = DefectCounter(lab.shape, vs, surface_search=lambda *a: calls.append(a))
    counter.add_slab(np.where(lab == 0, 1, lab).astype(np.uint8), img)
    assert np.isnan(counter.finish(min_voxels)["surface_distance"]).all() and not calls


def test_surface_distance_in_csv_and_summary():
    from xctrt.defects import DefectCounter, summarise, table_to_csv
    lab = np.ones((4, 10, 12), np.uint8)
    lab[:, :, 0] = 0                      # outside air along x = 0
    lab[1, 5, 4] = 2                      # 4 x steps in
    lab[2, 2:4, 8:10] = 3                 # 8 x steps in
    img = np.zeros(lab.shape, np.uint16)
    counter = DefectCounter(lab.shape, (0.5, 0.25, 0.125))
    counter.add_slab(lab, img)
    table = counter.finish()
    rows = table_to_csv(table, "mm").decode().splitlines()
    assert rows[0].endswith(",surface_distance_mm")
    assert [r.rsplit(",", 1)[1] for r in rows[1:]] == ["0.5", "1"]
    s = summarise(table, counter.class_voxels, (0.5, 0.25, 0.125), "mm", {1: "material", 2: "pore", 3: "inclusion"})
    assert s["defects"]["pore"]["surface_distance_mm"] == {"min": 0.5, "median": 0.5}
    assert s["defects"]["inclusion"]["surface_distance_mm"] == {"min": 1.0, "median": 1.0}
    # No outside air: the cells are empty and the summary has no entry.
    lab[:, :, 0] = 1
    counter = DefectCounter(lab.shape, (0.5, 0.25, 0.125))
    counter.add_slab(lab, img)
    table = counter.finish()
    assert [r.rsplit(",", 1)[1] for r in table_to_csv(table, "mm").decode().splitlines()[1:]] == ["", ""]
    s = summarise(table, counter.class_voxels, (0.5, 0.25, 0.125), "mm", {1: "material", 2: "pore", 3: "inclusion"})
    assert "surface_distance_mm" not in s["defects"]["pore"]


@pytest.mark.parametrize("conn", [6, 18, 26])
def test_chunks_of_planes_give_the_same_table_however_the_slabs_fall(conn):
    """The labeller works on chunks of 16 planes (their runs' own statistics side by side, then the
    union-find in z order): one slab of 37 planes (chunks 16, 16, 5), slabs of 5 and of 1, and slabs
    straddling the chunks give the same table bit for bit (grey sums included) and match cc3d."""
    rng = np.random.default_rng(conn)
    lab = rng.choice(np.array([0, 1, 2, 3], np.uint8), size=(37, 23, 41), p=[0.1, 0.6, 0.15, 0.15])
    img = (rng.random(lab.shape) * 1000).astype(np.float32)

    def table(slabs):
        lb = _core.ComponentLabeller(shape=lab.shape, connectivity=conn, voxel_size=(0.5, 0.3, 0.2))
        z = 0
        for n in slabs:
            lb.add_slab(lab[z:z + n], img[z:z + n])
            z += n
        assert z == len(lab)
        return lb.finish(min_voxels=0)
    want = table([37])
    for slabs in ([5] * 7 + [2], [1] * 37, [15, 17, 5], [16, 16, 5], [3, 30, 4]):
        got = table(slabs)
        for k in want:
            assert got[k].tobytes() == want[k].tobytes(), (slabs, k)
    ref = cc3d.connected_components(np.where(lab >= 2, lab, 0), connectivity=conn)
    assert len(want["id"]) == ref.max()
    assert sorted(want["voxels"].tolist()) == sorted(np.bincount(ref.ravel())[1:].tolist())


def test_value_counts_match_bincount_across_slabs():
    """The labeller's voxels per label value (DefectCounter.class_voxels) equal NumPy's bincount, over
    slabs of several blocks of its count (2**20 bytes), odd sizes and all 256 values."""
    from xctrt.defects import DefectCounter
    rng = np.random.default_rng(3)
    lab = rng.integers(0, 4, (7, 301, 1003), dtype=np.uint8)   # 2.1 M voxels: blocks and a tail
    lab[2, 5, :256] = np.arange(256, dtype=np.uint8)
    lab[4:6, 100:200, 7:900] = 1                                # long runs of one value
    img = np.zeros(lab.shape, np.uint16)
    counter = DefectCounter(lab.shape, (1.0, 1.0, 1.0))
    assert counter.class_voxels.tolist() == [0] * 256
    for z0, z1 in ((0, 1), (1, 5), (5, 7)):
        counter.add_slab(lab[z0:z1], img[z0:z1])
        assert counter.class_voxels.tolist() == np.bincount(lab[:z1].ravel(), minlength=256).tolist()
    assert counter.class_voxels.dtype == np.int64 and counter.class_voxels.sum() == lab.size
    # a refused slab counts nothing
    with pytest.raises(ValueError):
        counter.add_slab(lab[:1], img[:1])
    assert counter.class_voxels.sum() == lab.size


def test_enclosed_air_in_summary():
    """Air that does not reach the view's y/x sides is enclosed: in neither porosity nor the part."""
    from xctrt.defects import DefectCounter, summarise
    lab = np.ones((6, 12, 14), np.uint8)
    lab[:, :, :2] = 0                      # outside air along x = 0, 1
    lab[2:4, 4:7, 5:9] = 0                 # a closed cavity: 2 * 3 * 4 = 24 voxels
    lab[1, 6, 2:5] = 0                     # a channel from the outside air: outside too
    lab[0, 3:5, 9:11] = 0                  # cut by the first plane: still enclosed (4 voxels)
    lab[3, 9, 9] = 2
    vs = (0.5, 0.25, 0.125)
    counter = DefectCounter(lab.shape, vs)
    counter.add_slab(lab, np.zeros(lab.shape, np.uint16))
    assert counter.outside_air_voxels is None
    table = counter.finish()
    assert counter.outside_air_voxels == 6 * 12 * 2 + 3
    s = summarise(table, counter.class_voxels, vs, "mm", {1: "material", 2: "pore", 3: "inclusion"},
                  counter.outside_air_voxels)
    assert s["enclosed_air_voxels"] == 28
    assert s["enclosed_air_volume"] == pytest.approx(28 * 0.5 * 0.25 * 0.125)
    assert s["porosity_percent"] == pytest.approx(100 / (lab.size - 6 * 12 * 2 - 3 - 28))
    assert summarise(table, counter.class_voxels, vs, "mm", {2: "pore"})["enclosed_air_voxels"] is None


def test_distance_to_surface_binding():
    air = np.array([[0, 0, 0, 0], [5, 5, 5, 5], [7, 2, 20, 30]], np.int32)  # runs z, y, x0, x1
    runs = np.array([[0, 0, 3, 9], [5, 5, 1, 2], [5, 9, 5, 5]], np.int32)
    vs = (1.0, 2.0, 1.0)
    d = _core.distance_to_surface(air, runs, np.array([0, 1, 1]), 3, voxel_size=vs)
    np.testing.assert_array_equal(d[:2], [3.0, 3.0])  # run 2 is 3 x steps from (5, 5, 5); run 3 is 8 mm
    assert np.isnan(d[2])  # a component without runs
    assert np.isnan(_core.distance_to_surface(np.zeros((0, 4), np.int32), runs, np.zeros(3, np.int64), 1)).all()
    # Air runs are intervals: the gap to [20, 30] from x = 9 is 11, from x = 2 it is 18.
    d = _core.distance_to_surface(air[2:], runs[:2], np.array([0, 1]), 2, voxel_size=vs)
    np.testing.assert_array_equal(d, [np.sqrt(7 ** 2 + 4 ** 2 + 11 ** 2), np.sqrt(2 ** 2 + 6 ** 2 + 18 ** 2)])
    # Exposed sides let the search skip air a run cannot face: the third run says it has no
    # voxel exposed towards -y, so the air at y = 0, 2 and 5 (below its y = 9) is not looked at...
    comp = np.array([0, 1, 2])
    full = _core.distance_to_surface(air, runs, comp, 3, voxel_size=vs)
    assert full.tolist() == [3.0, 3.0, 8.0]
    flags = np.array([15, 15, 15 & ~4], np.uint8)
    d = _core.distance_to_surface(air, runs, comp, 3, exposed=flags, voxel_size=vs)
    assert d[:2].tolist() == [3.0, 3.0] and d[2] > 8.0  # ...which is only right for a true flag
    for args, msg in [((air[:, :3], runs, np.zeros(3, np.int64), 1), "air"),
                      ((air, runs[:, :3], np.zeros(3, np.int64), 1), "runs"),
                      ((air, runs, np.zeros(2, np.int64), 1), "one component per run"),
                      ((air, runs, np.array([0, 1, 2]), 2), "0..n_comp-1"),
                      ((air, runs[:, [0, 1, 3, 2]], np.zeros(3, np.int64), 1), "x0 <= x1"),
                      ((air[:, [0, 1, 3, 2]], runs, np.zeros(3, np.int64), 1), "x0 <= x1"),
                      ((-air, runs, np.zeros(3, np.int64), 1), ">= 0|x0 <= x1"),
                      ((air, -runs, np.zeros(3, np.int64), 1), "x0 <= x1|>= 0")]:
        with pytest.raises(ValueError, match=msg):
            _core.distance_to_surface(*args)
    for flags, msg in [(np.zeros(2, np.uint8), "one flag set per run"), (np.full(3, 15), "uint8")]:
        with pytest.raises(ValueError, match=msg):
            _core.distance_to_surface(air, runs, comp, 3, exposed=flags)
    with pytest.raises(TypeError):  # keyword-only: a voxel size must not land in `exposed`
        _core.distance_to_surface(air, runs, comp, 3, vs)


def test_distance_binding_many_runs():
    # Above 65,536 runs the binding checks and copies them on all cores: same answers, and one
    # bad run anywhere still fails the whole call.
    n = 70_000
    runs = np.zeros((n, 4), np.int32)
    runs[:, 0], runs[:, 1], runs[:, 2], runs[:, 3] = np.arange(n) % 50, 5, 3, 4
    comp = (runs[:, 0] // 8).astype(np.int64)  # component k: planes 8k .. 8k + 7
    air = np.array([[0, 0, 0, 9]], np.int32)  # one air row at z = 0, y = 0
    d = _core.distance_to_surface(air, runs, comp, 7)
    # Component k's nearest run is in plane 8k: 8k planes and 5 rows from the air.
    np.testing.assert_array_equal(d, np.sqrt((8.0 * np.arange(7)) ** 2 + 25.0))
    bad = runs.copy()
    bad[n // 2, 1] = -1
    with pytest.raises(ValueError, match=">= 0"):
        _core.distance_to_surface(air, bad, comp, 7)
    bad_comp = comp.copy()
    bad_comp[-1] = 7
    with pytest.raises(ValueError, match="0..n_comp-1"):
        _core.distance_to_surface(air, runs, bad_comp, 7)
    many_air = np.tile(air, (n, 1))
    many_air[n - 1, 2:] = [5, 4]
    with pytest.raises(ValueError, match="x0 <= x1"):
        _core.distance_to_surface(many_air, runs, comp, 7)


def box_crossings(shape):
    """Crossings of a box of voxels along each Crofton direction, by hand: a voxel whose
    neighbour along +v is outside the box, or along -v; per sign that is every voxel but the
    prod(n_i - |v_i|) whose neighbour is inside."""
    n = np.array(shape)
    return np.array([2 * (n.prod() - np.prod(n - np.abs(d))) for d in _core.crofton_directions()])


def test_cube_crossings_by_hand_and_edge():
    lab = np.zeros((6, 6, 6), np.uint8)
    lab[1:4, 1:4, 1:4] = 3
    t = _core.label_components(lab, np.zeros(lab.shape, np.float32))
    # 3-cube: 18 crossings along an axis, 30 along a face diagonal, 38 along a space diagonal.
    assert sorted(set(box_crossings((3, 3, 3)).tolist())) == [18, 30, 38]
    area = box_crossings((3, 3, 3)) @ crofton_reference((1.0, 1.0, 1.0))[1]
    assert t["voxels"][0] == 27
    np.testing.assert_allclose(t["surface_area"][0], area, rtol=1e-12)
    lab[0, 2, 2] = 3  # now touches z = 0, on the volume's face
    t = _core.label_components(lab, np.zeros(lab.shape, np.float32))
    assert t["touches_edge"][0] and t["surface_area"][0] > area


@pytest.mark.parametrize("radius", [5, 6, 7, 10, 20])
@pytest.mark.parametrize("offset", [0.0, 0.5, 0.3])
def test_ball_sphericity_near_one(radius, offset):
    # Voxel-face area reads a ball ~1.5x too large (sphericity ~0.66); Crofton's is within a few %
    # either way, so sphericity can exceed 1.
    n = 2 * radius + 5
    c = (n - 1) / 2 + offset
    z, y, x = np.ogrid[:n, :n, :n]
    lab = (((z - c) ** 2 + (y - c) ** 2 + (x - c) ** 2) <= radius ** 2).astype(np.uint8) * 2
    t = _core.label_components(lab, lab)
    assert 0.97 <= t["sphericity"][0] <= 1.03
    np.testing.assert_allclose(t["surface_area"][0], 4 * math.pi * radius ** 2, rtol=0.05)  # faces: +50 %


def test_ball_sphericity_anisotropic_voxels():
    # A ball of radius 12 mm in voxels 2 x 1 x 1 mm: the same shape, half the planes.
    z, y, x = np.ogrid[:14, :30, :30]
    lab = ((((z - 6.5) * 2) ** 2 + (y - 14.5) ** 2 + (x - 14.5) ** 2) <= 144).astype(np.uint8) * 2
    t = _core.label_components(lab, lab, voxel_size=(2.0, 1.0, 1.0))
    assert 0.97 <= t["sphericity"][0] <= 1.03


def test_crofton_factors_against_scipy_voronoi():
    for vs in [(1.0, 1.0, 1.0), (2.0, 1.0, 1.0), (0.5, 1.3, 0.7), (10.0, 1.0, 1.0), (0.01, 0.01, 0.01)]:
        dirs, ref = crofton_reference(vs)
        assert _core.crofton_directions().tolist() == dirs.tolist()
        np.testing.assert_allclose(_core.crofton_factors(vs), ref, rtol=1e-12)
    # Strongly anisotropic voxels crowd the directions along the long axis (absolute tolerances
    # once broke the cells there: up to 7 % off in area at 1000:1).
    rng = np.random.default_rng(0)
    sizes = [(100.0, 1.0, 1.0), (1000.0, 1.0, 1.0), (1.0, 1.0, 1e-3), (1.0, 30.0, 1000.0)]
    sizes += [tuple(np.exp(rng.uniform(0, np.log(1000), 3))) for _ in range(20)]
    for vs in sizes:
        if max(vs) > 1000 * min(vs):
            continue
        np.testing.assert_allclose(_core.crofton_factors(vs), crofton_reference(vs)[1], rtol=1e-5, err_msg=str(vs))
    for bad, msg in [((1.0, 0.0, 1.0), "positive"), ((1.0, 1.0, np.inf), "positive"),
                     ((1001.0, 1.0, 1.0), "factor 1000"), ((1e300,) * 3, "1e-6 to 1e4"),
                     ((1e-300,) * 3, "1e-6 to 1e4"), ((2e4, 1e4, 1e4), "1e-6 to 1e4")]:
        for check in (_core.check_voxel_size, _core.crofton_factors,
                      lambda vs: _core.ComponentLabeller((2, 2, 2), voxel_size=vs)):
            with pytest.raises(ValueError, match=msg):
                check(bad)
    _core.check_voxel_size((1000.0, 1.0, 1.0))   # the limits themselves are allowed
    _core.check_voxel_size((1e-6, 1e-6, 1e-6))
    _core.check_voxel_size((1e4, 1e4, 1e4))


def test_pore_and_inclusion_touching_are_separate():
    lab = np.zeros((1, 1, 6), np.uint8)
    lab[0, 0] = [2, 2, 3, 3, 2, 0]
    t = _core.label_components(lab, np.arange(6, dtype=np.uint8).reshape(lab.shape))
    assert list(t["class"]) == [2, 3, 2] and list(t["voxels"]) == [2, 2, 1]
    assert list(t["grey_mean"]) == [0.5, 2.5, 4.0]
    np.testing.assert_array_equal(_core.label_volume(lab)[0, 0], [1, 1, 2, 2, 3, 0])


@pytest.mark.parametrize("conn,expected", [(6, 2), (18, 1), (26, 1)])
def test_connectivity_edge_neighbours(conn, expected):
    lab = np.zeros((2, 2, 2), np.uint8)
    lab[0, 0, 0] = lab[1, 1, 0] = 2  # share an edge
    assert len(_core.label_components(lab, lab, connectivity=conn)["id"]) == expected


@pytest.mark.parametrize("conn,expected", [(6, 2), (18, 2), (26, 1)])
def test_connectivity_corner_neighbours(conn, expected):
    lab = np.zeros((2, 2, 2), np.uint8)
    lab[0, 0, 0] = lab[1, 1, 1] = 2  # share a corner only
    assert len(_core.label_components(lab, lab, connectivity=conn)["id"]) == expected


def test_u_shape_merges_across_slabs_and_keeps_first_voxel_id():
    # Two arms started separately join in a later slab; the component keeps the earlier arm's id.
    lab = np.zeros((5, 3, 7), np.uint8)
    lab[0, 1, 5] = 2  # a lone pore, first in raster order
    lab[1:4, 1, 1] = 2
    lab[1:4, 1, 4] = 2
    lab[3, 1, 1:5] = 2
    lab[4, 0, 0] = 3
    img = np.zeros(lab.shape, np.uint8)
    lb, t = stream(lab, img, [1, 1, 1, 2], connectivity=6)
    assert list(t["voxels"]) == [1, 8, 1] and list(t["class"]) == [2, 2, 3]
    assert lb.n_provisional == 4
    ref, ids = reference(lab, img, (2, 3), 6)
    assert_table_equal(t, ref)
    np.testing.assert_array_equal(_core.label_volume(lab, [2, 3], 6), ids)


def test_min_voxels_and_repeat_finish():
    rng = np.random.default_rng(5)
    lab = rng.integers(0, 4, (6, 7, 8), dtype=np.uint8)
    img = rng.integers(0, 256, lab.shape, dtype=np.uint8)
    lb, full = stream(lab, img, [6], connectivity=6)
    big = lb.finish(min_voxels=3)
    keep = full["voxels"] >= 3
    assert np.array_equal(big["id"], np.arange(1, keep.sum() + 1))
    for k in ALL_COLS:
        if k != "id":
            np.testing.assert_array_equal(big[k], full[k][keep], err_msg=k)
    assert_table_equal(lb.finish(), full)
    assert len(lb.finish(min_voxels=10**9)["id"]) == 0


def test_all_defect_and_empty():
    img = np.zeros((4, 5, 6), np.uint8)
    t = _core.label_components(np.full((4, 5, 6), 2, np.uint8), img)
    assert list(t["voxels"]) == [120] and t["touches_edge"][0]
    np.testing.assert_allclose(t["surface_area"][0], box_crossings((4, 5, 6)) @ crofton_reference((1, 1, 1))[1],
                               rtol=1e-12)
    t = _core.label_components(np.ones((4, 5, 6), np.uint8), img)
    assert all(len(v) == 0 for v in t.values()) and set(t) == set(ALL_COLS)
    assert t["id"].dtype == np.int64 and t["touches_edge"].dtype == bool


def test_non_contiguous_inputs():
    rng = np.random.default_rng(3)
    lab = rng.integers(0, 4, (9, 8, 7), dtype=np.uint8)
    img = rng.integers(0, 65536, lab.shape, dtype=np.uint16)
    ref = _core.label_components(lab, img, slab=4)
    labT = np.ascontiguousarray(lab.transpose(2, 1, 0)).transpose(2, 1, 0)
    imgT = np.asfortranarray(img)
    assert not labT.flags.c_contiguous
    assert_table_equal(_core.label_components(labT, imgT, slab=4), ref)
    np.testing.assert_array_equal(_core.label_volume(labT), _core.label_volume(lab))


def test_n_provisional_read_only():
    lb = _core.ComponentLabeller((1, 1, 3))
    assert lb.n_provisional == 0 and lb.shape == (1, 1, 3)
    lb.add_slab(np.array([[[2, 0, 2]]], np.uint8), np.zeros((1, 1, 3), np.uint8))
    assert lb.n_provisional == 2
    with pytest.raises(AttributeError):
        lb.n_provisional = 5


# ---------------------------------------------------------------------------------------------
# Errors.

def test_errors():
    Z, Y, X = 4, 5, 6
    lab = np.zeros((Z, Y, X), np.uint8)
    img = np.zeros((Z, Y, X), np.uint8)
    lb = _core.ComponentLabeller((Z, Y, X))
    for bad_lab in (lab.astype(np.int16), lab.astype(np.float32), lab.astype(bool)):
        with pytest.raises(ValueError, match="uint8"):
            lb.add_slab(bad_lab, img)
    for bad_img in (img.astype(np.int32), img.astype(np.float64), img.astype(">u2")):
        with pytest.raises(ValueError, match="image"):
            lb.add_slab(lab, bad_img)
    with pytest.raises(ValueError):
        lb.add_slab(lab[:, :, :-1], img[:, :, :-1])  # wrong X
    with pytest.raises(ValueError):
        lb.add_slab(lab[0], img[0])  # 2-D
    with pytest.raises(ValueError):
        lb.add_slab(lab, img[:2])  # image shape differs
    assert lb.slices_received == 0
    lb.add_slab(lab[:3], img[:3])
    with pytest.raises(ValueError, match="finish"):
        lb.finish()
    with pytest.raises(ValueError, match="too many slices"):
        lb.add_slab(lab[:2], img[:2])
    lb.add_slab(lab[3:], img[3:])
    with pytest.raises(ValueError, match="too many slices"):
        lb.add_slab(lab[:1], img[:1])
    with pytest.raises(ValueError):
        lb.finish(min_voxels=-1)
    assert len(lb.finish()["id"]) == 0

    for conn in (0, 4, 8, 27):
        with pytest.raises(ValueError, match="connectivity"):
            _core.ComponentLabeller((Z, Y, X), connectivity=conn)
        with pytest.raises(ValueError, match="connectivity"):
            _core.label_components(lab, img, connectivity=conn)
        with pytest.raises(ValueError, match="connectivity"):
            _core.label_volume(lab, [2, 3], conn)
    with pytest.raises(ValueError):
        _core.ComponentLabeller((0, Y, X))
    with pytest.raises(ValueError):
        _core.ComponentLabeller((Z, Y, X), classes=[256])
    with pytest.raises(ValueError):
        _core.ComponentLabeller((Z, Y, X), classes=[-1])
    with pytest.raises(ValueError):
        _core.ComponentLabeller((Z, Y, X), voxel_size=(1.0, 0.0, 1.0))
    with pytest.raises(ValueError):
        _core.label_components(lab, img, slab=0)
    with pytest.raises(ValueError):
        _core.label_components(lab[0], img[0])
    with pytest.raises(ValueError, match="uint8"):
        _core.label_volume(lab.astype(np.int32))


def test_table_csv_matches_a_cell_by_cell_reference():
    # table_to_csv formats in C++ (_core.table_csv); benchmarks/table_csv.py's reference formats each
    # cell on its own through Python and the csv module, on a table with the edge values in it.
    from conftest import load_benchmark
    from xctrt.defects import csv_columns, table_to_csv
    bench = load_benchmark("table_csv")
    t = bench.random_table(5000)    # several blocks of rows, formatted on all cores
    for unit in ("mm", "vox"):
        assert table_to_csv(t, unit) == bench.reference_csv(t, unit).encode()
    empty = {k: v[:0] for k, v in t.items()}
    assert table_to_csv(empty, "mm") == (",".join(h for _, h in csv_columns("mm")) + "\n").encode()
    with pytest.raises(ValueError, match="one length"):
        _core.table_csv([np.zeros(2), np.zeros(3)], "gg")
    with pytest.raises(ValueError, match="unknown column kind"):
        _core.table_csv([np.zeros(2)], "x")
    with pytest.raises(ValueError, match="one kind per column"):
        _core.table_csv([np.zeros(2)], "gg")
    assert _core.table_csv([(np.array([1, 0, 1]), ["pore", "inclusion"]), np.arange(3)], "sd") == \
        b"inclusion,0\npore,1\ninclusion,2\n"
    assert _core.table_csv([np.arange(2)], "d", "n\n") == b"n\n0\n1\n"
    for codes in ([0, 2], [-1, 0]):
        with pytest.raises(ValueError, match="code out of range"):
            _core.table_csv([(np.array(codes), ["a", "b"])], "s")


def test_table_csv_write_streams_the_same_bytes_and_reports_a_failed_write(tmp_path):
    # write_table_csv writes each block of rows as it is formatted, in order: the file holds table_to_csv's
    # bytes exactly, for one block, many, and none; a full disk (/dev/full) is an OSError naming the file
    import errno
    import os

    from conftest import load_benchmark
    from xctrt.defects import table_to_csv, write_table_csv
    bench = load_benchmark("table_csv")
    t = bench.random_table(9000)    # five blocks of 2048 rows, the last one short
    for rows in (9000, 2048, 1, 0):
        part = {k: v[:rows] for k, v in t.items()}
        path = tmp_path / f"{rows}.csv"
        write_s = write_table_csv(path, part, "mm")
        assert path.read_bytes() == table_to_csv(part, "mm") and write_s >= 0.0
    if os.path.exists("/dev/full"):
        with pytest.raises(OSError, match="No space left") as info:
            write_table_csv(Path("/dev/full"), t, "mm")
        assert info.value.errno == errno.ENOSPC and info.value.filename == "/dev/full"
    written, err, _ = _core.table_csv_write(-1, [np.arange(3)], "d", "n\n")   # not a file: EBADF, nothing written
    assert (written, err) == (0, errno.EBADF)
    with pytest.raises(ValueError, match="one length"):   # the columns are checked before anything is written
        _core.table_csv_write(-1, [np.zeros(2), np.zeros(3)], "gg")


@pytest.mark.parametrize("labels", ["phantom", "speckle"])
def test_host_components_benchmark_runs_and_checks_itself(labels, tmp_path):
    # benchmarks/host_components.py on a small volume: its own checks (counts equal bincount's, the
    # table the same with and without the counts) pass, and the JSON says what was run
    import json

    from conftest import load_benchmark
    bench = load_benchmark("host_components")
    out = tmp_path / "r.json"
    assert bench.main(["--labels", labels, "--planes", "12", "--size", "256", "--slab", "5", "--repeats", "1",
                       "--json", str(out)]) == 0
    r = json.loads(out.read_text())
    assert r["labels"] == labels and r["planes"] == 12 and r["same_counts"] and r["same_table"]
    assert r["defects"] > 0 and r["csv_bytes"] > 100 * r["defects"]
    assert set(r["seconds"]) == {"counter", "bincount", "labeller", "finish", "finish_without_surface", "csv"}
    if labels == "speckle":   # nearly all defects single voxels, ~SPECKLE_FRACTION of the part per class
        part = np.pi * (0.45 * 256) ** 2 * 12   # ~370 defects expected: +-20 % is 4 standard deviations
        assert 0.8 < r["defects"] / (2 * bench.SPECKLE_FRACTION * part) < 1.2
