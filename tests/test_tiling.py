"""xctrt._core tiling kernels against NumPy references with the same float32 operation order.

The build uses -ffp-contract=off, so every comparison below is exact (np.array_equal)
except the ramp round trip, where (w * p) / w need not give p back.
"""

import numpy as np
import pytest

from xctrt import _core

N_CASES = 200
DTYPES = (np.uint8, np.uint16, np.float32)


# ---------------------------------------------------------------- NumPy references


def ref_tile_starts(length, tile, overlap):
    if length <= tile:
        return np.zeros(1, np.int64)
    stride = tile - overlap
    n = -(-(length - tile) // stride) + 1
    return np.minimum(np.arange(n, dtype=np.int64) * stride, length - tile)


def ref_window(s, lo, hi):
    lo32 = np.float32(lo)
    scale = np.float32(np.float32(hi) - lo32)
    v = (s.astype(np.float32) - lo32) / scale
    return np.clip(v, np.float32(0), np.float32(1))


def ref_extract_tiles(s, tile, overlap, lo, hi, pad="edge"):
    w = ref_window(s, lo, hi)
    h_, w_ = w.shape
    padding = ((0, max(0, tile - h_)), (0, max(0, tile - w_)))
    w = np.pad(w, padding, mode="edge") if pad == "edge" else np.pad(w, padding, constant_values=0.0)
    ys, xs = ref_tile_starts(h_, tile, overlap), ref_tile_starts(w_, tile, overlap)
    view = np.lib.stride_tricks.sliding_window_view(w, (tile, tile))
    return np.ascontiguousarray(view[ys[:, None], xs[None, :]].reshape(-1, tile, tile))


def ref_w1d(tile, overlap, blend):
    if blend == "constant":
        return np.ones(tile, np.float32)
    i = np.arange(tile)
    return np.minimum(1.0, (np.minimum(i, tile - 1 - i) + 1) / (overlap + 1)).astype(np.float32)


def ref_stitch_tiles(tiles, height, width, overlap, blend="constant"):
    t_, k, tile, _ = tiles.shape
    w1 = ref_w1d(tile, overlap, blend)
    w2 = w1[:, None] * w1[None, :]
    acc = np.zeros((k, height, width), np.float32)
    wsum = np.zeros((height, width), np.float32)
    t = 0
    for y in ref_tile_starts(height, tile, overlap):
        for x in ref_tile_starts(width, tile, overlap):
            h, w = min(tile, height - y), min(tile, width - x)
            acc[:, y : y + h, x : x + w] += w2[:h, :w] * tiles[t, :, :h, :w]
            wsum[y : y + h, x : x + w] += w2[:h, :w]
            t += 1
    assert t == t_
    return acc / wsum


def ref_axis(n_in, n_out):
    src = (np.arange(n_out, dtype=np.float64) + 0.5) * (n_in / n_out) - 0.5
    src = np.maximum(src, 0.0)
    i0 = np.minimum(np.floor(src).astype(np.int64), n_in - 1)
    i1 = np.minimum(i0 + 1, n_in - 1)
    lam = (src - i0).astype(np.float32)
    return i0, i1, lam, np.float32(1) - lam


def ref_resize_bilinear(img, out_h, out_w):
    y0, y1, ly, hy = ref_axis(img.shape[-2], out_h)
    x0, x1, lx, hx = ref_axis(img.shape[-1], out_w)
    a = img[..., y0[:, None], x0[None, :]]
    b = img[..., y0[:, None], x1[None, :]]
    c = img[..., y1[:, None], x0[None, :]]
    d = img[..., y1[:, None], x1[None, :]]
    return hy[:, None] * (hx * a + lx * b) + ly[:, None] * (hx * c + lx * d)


# ---------------------------------------------------------------- random cases


def rand_len(rng):
    r = rng.random()
    if r < 0.15:
        return 1
    if r < 0.6:
        return int(rng.integers(2, 20))
    return int(rng.integers(20, 140))


def rand_tile_overlap(rng):
    tile = int(rng.choice([1, 2, 3, 5, 8, 16, 17, 32, 48, 64]))
    r = rng.random()
    overlap = 0 if r < 0.3 else tile - 1 if r < 0.55 else int(rng.integers(0, tile))
    return tile, overlap


def rand_slice(rng, h, w, dtype=None):
    dtype = dtype or DTYPES[rng.integers(3)]
    if dtype == np.uint8:
        s = rng.integers(0, 256, (h, w), dtype=np.uint8)
        lo = float(rng.uniform(-20, 200))
        hi = lo + float(rng.uniform(0.5, 200))
    elif dtype == np.uint16:
        s = rng.integers(0, 65536, (h, w), dtype=np.uint16)
        lo = float(rng.uniform(-100, 40000))
        hi = lo + float(rng.uniform(1, 30000))
    else:
        s = (rng.standard_normal((h, w)) * 3).astype(np.float32)
        lo = float(rng.uniform(-4, 1))
        hi = lo + float(rng.uniform(0.01, 6))
    if rng.random() < 0.3:  # integral windows hit exact 0 and 1
        lo, hi = float(np.floor(lo)), float(np.floor(lo)) + float(np.ceil(hi - lo))
    return s, lo, hi


# ---------------------------------------------------------------- exact agreement


@pytest.mark.parametrize("seed", range(N_CASES))
def test_tile_starts(seed):
    rng = np.random.default_rng(seed)
    tile, overlap = rand_tile_overlap(rng)
    length = int(rng.integers(1, 400)) if seed % 2 else rand_len(rng)
    got = _core.tile_starts(length, tile, overlap)
    assert got.dtype == np.int64
    np.testing.assert_array_equal(got, ref_tile_starts(length, tile, overlap))
    # The tiles cover the axis and stay inside it (unless the axis is shorter than a tile).
    covered = np.zeros(length, bool)
    for s in got:
        covered[s : s + tile] = True
    assert covered.all() and got[0] == 0
    if length >= tile:
        assert got[-1] == length - tile


@pytest.mark.parametrize("seed", range(N_CASES))
def test_window(seed):
    rng = np.random.default_rng(1000 + seed)
    s, lo, hi = rand_slice(rng, rand_len(rng), rand_len(rng))
    got = _core.window(s, lo, hi)
    assert got.dtype == np.float32 and got.shape == s.shape
    assert np.array_equal(got, ref_window(s, lo, hi))


@pytest.mark.parametrize("seed", range(N_CASES))
def test_extract_tiles(seed):
    rng = np.random.default_rng(2000 + seed)
    tile, overlap = rand_tile_overlap(rng)
    s, lo, hi = rand_slice(rng, rand_len(rng), rand_len(rng))
    pad = ("edge", "constant")[seed % 2]
    want = ref_extract_tiles(s, tile, overlap, lo, hi, pad)
    got = _core.extract_tiles(s, tile, overlap, lo, hi, pad=pad)
    assert got.dtype == np.float32 and got.shape == want.shape
    assert np.array_equal(got, want)


@pytest.mark.parametrize("seed", range(N_CASES))
def test_stitch_tiles(seed):
    rng = np.random.default_rng(3000 + seed)
    tile, overlap = rand_tile_overlap(rng)
    h, w, k = rand_len(rng), rand_len(rng), int(rng.integers(1, 5))
    n = len(ref_tile_starts(h, tile, overlap)) * len(ref_tile_starts(w, tile, overlap))
    tiles = rng.random((n, k, tile, tile), dtype=np.float32)
    blend = ("constant", "ramp")[seed % 2]
    got = _core.stitch_tiles(tiles, h, w, overlap, blend=blend)
    assert got.dtype == np.float32 and got.shape == (k, h, w)
    assert np.array_equal(got, ref_stitch_tiles(tiles, h, w, overlap, blend))


@pytest.mark.parametrize("seed", range(N_CASES))
def test_resize_bilinear(seed):
    rng = np.random.default_rng(4000 + seed)
    shape = (rand_len(rng), rand_len(rng))
    if seed % 3 == 0:
        shape = (int(rng.integers(1, 5)),) + shape
    img = (rng.standard_normal(shape) * 10).astype(np.float32)
    out_h, out_w = (1, 1) if seed % 17 == 0 else (rand_len(rng), rand_len(rng))
    got = _core.resize_bilinear(img, out_h, out_w)
    assert got.dtype == np.float32 and got.shape == shape[:-2] + (out_h, out_w)
    assert np.array_equal(got, ref_resize_bilinear(img, out_h, out_w))


# ---------------------------------------------------------------- round trip and layouts


@pytest.mark.parametrize("seed", range(40))
@pytest.mark.parametrize("blend", ["constant", "ramp"])
def test_round_trip(seed, blend):
    rng = np.random.default_rng(5000 + seed)
    tile, overlap = rand_tile_overlap(rng)
    s, lo, hi = rand_slice(rng, rand_len(rng), rand_len(rng))
    win = _core.window(s, lo, hi)
    tiles = _core.extract_tiles(s, tile, overlap, lo, hi, pad=("edge", "constant")[seed % 2])
    back = _core.stitch_tiles(tiles[:, None], *s.shape, overlap, blend=blend)[0]
    count = np.zeros(s.shape, np.int64)
    for y in ref_tile_starts(s.shape[0], tile, overlap):
        for x in ref_tile_starts(s.shape[1], tile, overlap):
            count[y : y + tile, x : x + tile] += 1
    if blend == "constant":
        # Exact where a pixel is covered by 1, 2 or 4 tiles; p+p+p (or more) rounds.
        exact = np.isin(count, (1, 2, 4))
        assert np.array_equal(back[exact], win[exact])
    # float32 sums of many overlapping tiles (overlap near tile - 1) drift with the count.
    assert (np.abs(back - win) <= 1e-6 + 2.0**-23 * count).all()


def test_large_slice_threads_and_out_buffer():
    rng = np.random.default_rng(6)
    s, lo, hi = rand_slice(rng, 700, 530, np.uint16)
    want = ref_extract_tiles(s, 128, 20, lo, hi)
    out = np.full(want.shape, np.nan, np.float32)
    results = []
    for threads in (1, 2):
        _core.set_num_threads(threads)
        got = _core.extract_tiles(s, 128, 20, lo, hi, out=out)
        assert got is out
        results.append(got.copy())
    probs = rng.random((want.shape[0], 3, 128, 128), dtype=np.float32)
    stitched = [(_core.set_num_threads(t), _core.stitch_tiles(probs, 700, 530, 20, "ramp"))[1] for t in (1, 2)]
    resized = [(_core.set_num_threads(t), _core.resize_bilinear(stitched[0], 1024, 333))[1] for t in (1, 2)]
    assert all(np.array_equal(r, want) for r in results)
    assert all(np.array_equal(r, ref_stitch_tiles(probs, 700, 530, 20, "ramp")) for r in stitched)
    assert all(np.array_equal(r, ref_resize_bilinear(stitched[0], 1024, 333)) for r in resized)


def test_strided_inputs():
    rng = np.random.default_rng(7)
    vol = rng.integers(0, 65536, (5, 40, 60), dtype=np.uint16)
    for s in (vol[:, 3, :], vol[2, :, ::3], vol[1, ::-1, ::-1], vol[2].T):
        assert np.array_equal(_core.window(s, 100, 60000), ref_window(s, 100, 60000))
        assert np.array_equal(_core.extract_tiles(s, 16, 4, 100, 60000), ref_extract_tiles(s, 16, 4, 100, 60000))
    probs = rng.random((4, 3, 8, 8), dtype=np.float32)
    tiles = probs.transpose(0, 1, 3, 2)
    assert np.array_equal(_core.stitch_tiles(tiles, 12, 12, 4, "ramp"), ref_stitch_tiles(tiles, 12, 12, 4, "ramp"))
    img = rng.random((30, 20), dtype=np.float32).T
    assert np.array_equal(_core.resize_bilinear(img, 7, 45), ref_resize_bilinear(img, 7, 45))


def test_defaults():
    s = np.arange(12, dtype=np.uint8).reshape(3, 4)
    t = _core.extract_tiles(s, 5, 1, 0, 11)  # pad="edge"
    assert np.array_equal(t[0, 4], t[0, 2]) and np.array_equal(t[0, :, 4], t[0, :, 3])
    t = _core.extract_tiles(s, 5, 1, 0, 11, pad="constant")
    assert (t[0, 3:] == 0).all() and (t[0, :, 4:] == 0).all()
    p = np.ones((1, 2, 5, 5), np.float32)
    assert np.array_equal(_core.stitch_tiles(p, 3, 4, 1), np.ones((2, 3, 4), np.float32))


# ---------------------------------------------------------------- errors


@pytest.mark.parametrize(
    "call",
    [
        lambda: _core.tile_starts(10, 4, 4),
        lambda: _core.tile_starts(10, 4, -1),
        lambda: _core.tile_starts(10, 0, 0),
        lambda: _core.tile_starts(0, 4, 1),
        lambda: _core.window(np.zeros((4, 4), np.int32), 0, 1),
        lambda: _core.window(np.zeros((4, 4), np.float64), 0, 1),
        lambda: _core.window(np.zeros((4, 4), bool), 0, 1),
        lambda: _core.window(np.zeros((2, 4, 4), np.uint8), 0, 1),
        lambda: _core.window(np.zeros((0, 4), np.uint8), 0, 1),
        lambda: _core.window(np.zeros((4, 4), np.uint8), 1, 1),
        lambda: _core.window(np.zeros((4, 4), np.uint8), 2, 1),
        lambda: _core.window(np.zeros((4, 4), np.uint8), float("nan"), 1),
        lambda: _core.extract_tiles(np.zeros((8, 8), np.uint16), 4, 4, 0, 1),
        lambda: _core.extract_tiles(np.zeros((8, 8), np.int16), 4, 1, 0, 1),
        lambda: _core.extract_tiles(np.zeros((8, 8), np.uint16), 4, 1, 1, 0),
        lambda: _core.extract_tiles(np.zeros((8, 8), np.uint16), 4, 1, 0, 1, pad="reflect"),
        lambda: _core.extract_tiles(np.zeros((8, 8), np.uint16), 4, 0, 0, 1, out=np.zeros((3, 4, 4), np.float32)),
        lambda: _core.extract_tiles(np.zeros((8, 8), np.uint16), 4, 0, 0, 1, out=np.zeros((4, 4, 4), np.float64)),
        lambda: _core.extract_tiles(np.zeros((8, 8), np.uint16), 4, 0, 0, 1, out=np.zeros((4, 4, 8), np.float32)[..., ::2]),
        lambda: _core.stitch_tiles(np.zeros((3, 1, 4, 4), np.float32), 8, 8, 0),
        lambda: _core.stitch_tiles(np.zeros((4, 1, 4, 4), np.float32), 8, 8, 4),
        lambda: _core.stitch_tiles(np.zeros((4, 1, 4, 5), np.float32), 8, 8, 0),
        lambda: _core.stitch_tiles(np.zeros((4, 4, 4), np.float32), 8, 8, 0),
        lambda: _core.stitch_tiles(np.zeros((4, 1, 4, 4), np.float64), 8, 8, 0),
        lambda: _core.stitch_tiles(np.zeros((4, 0, 4, 4), np.float32), 8, 8, 0),
        lambda: _core.stitch_tiles(np.zeros((4, 1, 4, 4), np.float32), 8, 8, 0, blend="gauss"),
        lambda: _core.resize_bilinear(np.zeros((4, 4), np.float32), 0, 3),
        lambda: _core.resize_bilinear(np.zeros((4, 4), np.float64), 3, 3),
        lambda: _core.resize_bilinear(np.zeros((4,), np.float32), 3, 3),
        lambda: _core.resize_bilinear(np.zeros((0, 4), np.float32), 3, 3),
    ],
)
def test_errors(call):
    with pytest.raises(ValueError):
        call()
