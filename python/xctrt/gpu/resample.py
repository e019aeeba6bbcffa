"""The GPU stage's pre- and post-processing as fused Triton kernels, exact to _core.

resize mode (the model sees each slice resized to S x S):
    window_resize      raw slices (n, H, W) -> model input (n, 1, S, S) float32:
                       _core.window then _core.resize_bilinear, one pass
    resize_aggregate   probabilities (N, K, S, S) -> labels (N, h, w) uint8, and voxels per label value:
                       _core.resize_bilinear back to the slice size then _core.aggregate, one pass,
                       without the full-size float32 probabilities
tile mode (the model sees overlapping S x S tiles, the shipped packages):
    extract_tiles      raw slices (n, H, W) -> windowed tiles (n*T, 1, S, S): _core.extract_tiles per slice
    stitch_aggregate   tile probabilities (n*T, K, S, S) -> labels (n, h, w) uint8 and voxel counts:
                       _core.stitch_tiles then _core.aggregate, one pass per pixel over its covering tiles

The step-by-step versions (post.py: one CuPy kernel per float32 operation, a temporary array each,
and a Python loop over tiles for the stitching) moved about 20x the bytes these do and ran at a tenth
of the memory bandwidth on an H200 (0.2 ms and 0.4 ms per 1200x1200 slice in resize mode,
2026-11-26); at the 250 slices/s the issue asks for, a slice has 4 ms in all.

Exactness: each output pixel is computed with the same float32 operations in the same order as the
C++ (resize: horizontal pass on the two source rows, then vertical; stitch: covering tiles in tile
order, weight product, then the sum, then one division), each rounded on its own: the kernels are
launched with fp fusion off (no FMA, also for ptxas) and divisions are tl.div_rn (Triton's `/` is an
approximate division on NVIDIA). Recomputing a row's horizontal pass per output pixel gives the same
value as the C++'s stored one. The sm_90 compile test checks the machine code for FMAs; the
Triton-interpreter tests check the values against _core.

torch tensors in, torch tensors out (CUDA; CPU tensors only under TRITON_INTERPRET=1, for tests).
"""
import functools
import types

import numpy as np
import torch

from .. import _core
from .post import _axis, blend_weights

try:
    import triton
    import triton.language as tl
except Exception:  # noqa: BLE001 - any failure to import means "no Triton"
    triton = None
    tl = types.SimpleNamespace(constexpr=int)  # only so the kernels' annotations evaluate

__all__ = ["extract_tiles", "resize_aggregate", "stitch_aggregate", "window_resize"]

# Output tile per program: 4 rows of 256 pixels (a 1200-wide row is 5 programs wide).
BLOCK_Y, BLOCK_X, NUM_WARPS = 4, 256, 4
# Source kinds of window_resize (uint16 crosses to torch as int16: same bytes).
_SRC_KIND = {torch.float32: 0, torch.uint8: 1, torch.int16: 2}


def _src_value(ptr, off, mask, SRC: tl.constexpr):
    v = tl.load(ptr + off, mask=mask, other=0)
    if SRC == 2:   # uint16 bytes read as int16
        return (v.to(tl.int32) & 0xFFFF).to(tl.float32)
    return v.to(tl.float32)


def _windowed(v, lo, scale):
    w = tl.div_rn(v - lo, scale)
    w = tl.where(w < 0, 0.0, w)   # the C++ ternaries: NaN passes through
    return tl.where(w > 1, 1.0, w)


def _bilinear(a00, a01, a10, a11, hx, lx, hy, ly):
    """h*a + l*b along x on both source rows, then along y; every product and sum rounded apart."""
    t0 = hx * a00 + lx * a01
    t1 = hx * a10 + lx * a11
    return hy * t0 + ly * t1


def _axis_at(I0, I1, HW, LW, o, mask):
    """The resize axis at output positions o: source positions i0, i1 and their weights h, l."""
    return (tl.load(I0 + o, mask=mask, other=0), tl.load(I1 + o, mask=mask, other=0),
            tl.load(HW + o, mask=mask, other=0), tl.load(LW + o, mask=mask, other=0))


def _aggregate_step(p, c, label, best, THR, IDS, ARGMAX: tl.constexpr):
    """One channel c of _core.aggregate: priority (channels visited lowest priority first, a later one
    overwrites) or argmax (channels in order, strict '>' keeps the lower channel on ties)."""
    take = p >= tl.load(THR + c)
    if ARGMAX:
        take = take & (p > best)
        best = tl.where(take, p, best)
    return tl.where(take, tl.load(IDS + c), label), best


def _store_labels(OUT_P, COUNTS, VALUES, label, m, oy, ox, o_n, W_OUT, NV: tl.constexpr):
    dst = OUT_P + tl.program_id(2).to(tl.int64) * o_n + (oy * W_OUT)[:, None] + ox[None, :]
    tl.store(dst, label.to(tl.uint8), mask=m)
    for j in tl.static_range(NV):   # voxels per label value, added up without a host sync
        v = tl.load(VALUES + j)
        tl.atomic_add(COUNTS + v, tl.sum(tl.sum(((label == v) & m).to(tl.int64), axis=1), axis=0), sem="relaxed")


def _window_resize_kernel(SRC_P, OUT_P, Y0, Y1, HY, LY, X0, X1, HX, LX, H_OUT, W_OUT, s_n, s_y, o_n, lo, scale,
                          SRC: tl.constexpr, BY: tl.constexpr, BX: tl.constexpr):
    oy = tl.program_id(1) * BY + tl.arange(0, BY)
    ox = tl.program_id(0) * BX + tl.arange(0, BX)
    my, mx = oy < H_OUT, ox < W_OUT
    y0, y1, hy, ly = _axis_at(Y0, Y1, HY, LY, oy, my)
    x0, x1, hx, lx = _axis_at(X0, X1, HX, LX, ox, mx)
    m = my[:, None] & mx[None, :]
    src = SRC_P + tl.program_id(2).to(tl.int64) * s_n
    r0, r1 = (y0 * s_y)[:, None], (y1 * s_y)[:, None]
    c0, c1 = x0[None, :], x1[None, :]
    a00 = _windowed(_src_value(src, r0 + c0, m, SRC), lo, scale)
    a01 = _windowed(_src_value(src, r0 + c1, m, SRC), lo, scale)
    a10 = _windowed(_src_value(src, r1 + c0, m, SRC), lo, scale)
    a11 = _windowed(_src_value(src, r1 + c1, m, SRC), lo, scale)
    out = _bilinear(a00, a01, a10, a11, hx[None, :], lx[None, :], hy[:, None], ly[:, None])
    dst = OUT_P + tl.program_id(2).to(tl.int64) * o_n + (oy * W_OUT)[:, None] + ox[None, :]
    tl.store(dst, out, mask=m)


def _resize_aggregate_kernel(P, OUT_P, COUNTS, THR, IDS, ORDER, VALUES, Y0, Y1, HY, LY, X0, X1, HX, LX,
                             H_OUT, W_OUT, p_n, p_c, p_y, o_n,
                             K: tl.constexpr, NV: tl.constexpr, ARGMAX: tl.constexpr,
                             BY: tl.constexpr, BX: tl.constexpr):
    oy = tl.program_id(1) * BY + tl.arange(0, BY)
    ox = tl.program_id(0) * BX + tl.arange(0, BX)
    my, mx = oy < H_OUT, ox < W_OUT
    y0, y1, hy, ly = _axis_at(Y0, Y1, HY, LY, oy, my)
    x0, x1, hx, lx = _axis_at(X0, X1, HX, LX, ox, mx)
    hy, ly, hx, lx = hy[:, None], ly[:, None], hx[None, :], lx[None, :]
    m = my[:, None] & mx[None, :]
    base = P + tl.program_id(2).to(tl.int64) * p_n
    r0, r1 = (y0 * p_y)[:, None], (y1 * p_y)[:, None]
    c0, c1 = x0[None, :], x1[None, :]
    label = tl.zeros((BY, BX), tl.int32)
    best = tl.full((BY, BX), float("-inf"), tl.float32)
    for j in tl.static_range(K):
        c = j if ARGMAX else tl.load(ORDER + (K - 1 - j))
        ch = base + c * p_c
        a00 = tl.load(ch + r0 + c0, mask=m, other=0).to(tl.float32)
        a01 = tl.load(ch + r0 + c1, mask=m, other=0).to(tl.float32)
        a10 = tl.load(ch + r1 + c0, mask=m, other=0).to(tl.float32)
        a11 = tl.load(ch + r1 + c1, mask=m, other=0).to(tl.float32)
        p = _bilinear(a00, a01, a10, a11, hx, lx, hy, ly)
        label, best = _aggregate_step(p, c, label, best, THR, IDS, ARGMAX)
    _store_labels(OUT_P, COUNTS, VALUES, label, m, oy, ox, o_n, W_OUT, NV)


def _extract_tiles_kernel(SRC_P, OUT_P, YS, XS, H, W, NX, T, s_n, s_y, lo, scale,
                          SRC: tl.constexpr, EDGE: tl.constexpr, S: tl.constexpr, BY: tl.constexpr,
                          BX: tl.constexpr):
    tile = tl.program_id(0)                      # n*T tiles (axis 0: no 65535 limit), slice after slice
    i, t = tile // T, tile % T
    y0, x0 = tl.load(YS + t // NX), tl.load(XS + t % NX)
    r = tl.program_id(1) * BY + tl.arange(0, BY)
    c = tl.program_id(2) * BX + tl.arange(0, BX)
    m = (r < S)[:, None] & (c < S)[None, :]
    rows, cols = y0 + r, x0 + c                  # beyond the slice only where it is smaller than a tile
    inside = (rows < H)[:, None] & (cols < W)[None, :]
    rows, cols = tl.minimum(rows, H - 1), tl.minimum(cols, W - 1)   # 'edge': the last row / column
    src = SRC_P + i.to(tl.int64) * s_n
    v = _windowed(_src_value(src, (rows * s_y)[:, None] + cols[None, :], m, SRC), lo, scale)
    if not EDGE:                                 # 'constant': 0 after the window
        v = tl.where(inside, v, 0.0)
    dst = OUT_P + tile.to(tl.int64) * (S * S) + (r * S)[:, None] + c[None, :]
    tl.store(dst, v, mask=m)


def _stitch_aggregate_kernel(P, OUT_P, COUNTS, THR, IDS, ORDER, VALUES, YS, XS, YF, YC, XF, XC, W1,
                             H_OUT, W_OUT, NX, T, p_t, p_c, p_y, o_n,
                             K: tl.constexpr, NV: tl.constexpr, ARGMAX: tl.constexpr, RAMP: tl.constexpr,
                             MAXC: tl.constexpr, BY: tl.constexpr, BX: tl.constexpr):
    oy = tl.program_id(1) * BY + tl.arange(0, BY)
    ox = tl.program_id(0) * BX + tl.arange(0, BX)
    my, mx = oy < H_OUT, ox < W_OUT
    m = my[:, None] & mx[None, :]
    # the tiles covering each row (and column): a run of tile rows from YF, YC of them
    yf, yc = tl.load(YF + oy, mask=my, other=0), tl.load(YC + oy, mask=my, other=0)
    xf, xc = tl.load(XF + ox, mask=mx, other=0), tl.load(XC + ox, mask=mx, other=0)
    first = tl.program_id(2).to(tl.int64) * T
    label = tl.zeros((BY, BX), tl.int32)
    best = tl.full((BY, BX), float("-inf"), tl.float32)
    for j in tl.static_range(K):
        c = j if ARGMAX else tl.load(ORDER + (K - 1 - j))
        acc = tl.zeros((BY, BX), tl.float32)
        wsum = tl.zeros((BY, BX), tl.float32)
        for a in tl.static_range(MAXC):          # tile order: tile row outer, tile column inner
            ty = yf + a
            ok_y = my & (a < yc)
            ly = oy - tl.load(YS + ty, mask=ok_y, other=0)
            wy = tl.load(W1 + ly, mask=ok_y, other=0)
            for b in tl.static_range(MAXC):
                tx = xf + b
                ok_x = mx & (b < xc)
                lx = ox - tl.load(XS + tx, mask=ok_x, other=0)
                ok = ok_y[:, None] & ok_x[None, :]
                t = first + (ty * NX)[:, None] + tx[None, :]
                p = tl.load(P + t * p_t + c * p_c + (ly * p_y)[:, None] + lx[None, :], mask=ok,
                            other=0).to(tl.float32)
                if RAMP:
                    w2 = wy[:, None] * tl.load(W1 + lx, mask=ok_x, other=0)[None, :]
                    acc = tl.where(ok, acc + w2 * p, acc)
                    wsum = tl.where(ok, wsum + w2, wsum)
                else:
                    acc = tl.where(ok, acc + p, acc)
                    wsum = tl.where(ok, wsum + 1.0, wsum)
        p = tl.div_rn(acc, tl.where(m, wsum, 1.0))
        label, best = _aggregate_step(p, c, label, best, THR, IDS, ARGMAX)
    _store_labels(OUT_P, COUNTS, VALUES, label, m, oy, ox, o_n, W_OUT, NV)


if triton is not None:
    _src_value, _windowed, _bilinear, _axis_at, _aggregate_step, _store_labels = (
        triton.jit(f) for f in (_src_value, _windowed, _bilinear, _axis_at, _aggregate_step, _store_labels))
    _window_resize_kernel, _resize_aggregate_kernel, _extract_tiles_kernel, _stitch_aggregate_kernel = (
        triton.jit(f) for f in (_window_resize_kernel, _resize_aggregate_kernel, _extract_tiles_kernel,
                                _stitch_aggregate_kernel))

_TABLES: dict = {}


def _on_device(device, *arrays: np.ndarray) -> list[torch.Tensor]:
    """Small host tables (thresholds, resize axes, tile starts...) on the device, made once per content.
    A copy from pageable host memory makes the host wait for the stream's queued work: per batch,
    that would keep the host from queueing the next slab while the GPU is busy."""
    out = []
    for a in arrays:
        a = np.ascontiguousarray(a)
        key = (a.dtype.str, a.shape, a.tobytes(), str(device))
        if key not in _TABLES:
            _TABLES[key] = torch.from_numpy(a.copy()).to(device)
        out.append(_TABLES[key])
    return out


@functools.lru_cache(maxsize=None)   # called per batch: not even the host tables are remade
def _axes(n_in: int, n_out: int, device: torch.device) -> tuple[torch.Tensor, ...]:
    """_core's resize axis on the device: source rows i0, i1 (int32), weights hw, lw (float32)."""
    i0, i1, lw, hw = _axis(n_in, n_out)
    return tuple(_on_device(device, i0.astype(np.int32), i1.astype(np.int32), hw.astype(np.float32),
                            lw.astype(np.float32)))


def _launch(kernel, grid, *args, **meta):
    kernel[grid](*args, **meta, BY=BLOCK_Y, BX=BLOCK_X, num_warps=NUM_WARPS, enable_fp_fusion=False)


def _source(raw: torch.Tensor, lo: float, hi: float) -> tuple:
    """Checked slices and window: (raw with unit column stride, lo and hi - lo as float32 values, as the
    C++ computes them, as Python floats for the launch)."""
    if raw.ndim != 3 or raw.dtype not in _SRC_KIND:
        raise ValueError(f"raw must be (n, H, W) float32, uint8 or int16 (uint16 bytes), got {tuple(raw.shape)} "
                         f"{raw.dtype}")
    lo32, hi32 = np.float32(lo), np.float32(hi)
    if not hi32 > lo32:
        raise ValueError("window needs hi > lo")
    return (raw if raw.stride(2) == 1 else raw.contiguous()), float(lo32), float(np.float32(hi32 - lo32))


def window_resize(raw: torch.Tensor, lo: float, hi: float, size: int, out: torch.Tensor | None = None) -> torch.Tensor:
    """Slices (n, H, W) float32, uint8 or int16 (= uint16 bytes) -> (n, 1, size, size) float32 model input,
    equal to _core.resize_bilinear(_core.window(slice, lo, hi), size, size) per slice."""
    if triton is None:
        raise RuntimeError("window_resize needs Triton")
    raw, lo, scale = _source(raw, lo, hi)
    n, h, w = raw.shape
    if out is None:
        out = torch.empty((n, 1, size, size), dtype=torch.float32, device=raw.device)
    if out.shape != (n, 1, size, size) or out.dtype != torch.float32 or not out.is_contiguous():
        raise ValueError(f"out must be a contiguous float32 (n, 1, {size}, {size}) tensor")
    if n == 0:
        return out
    y0, y1, hy, ly = _axes(h, size, raw.device)
    x0, x1, hx, lx = _axes(w, size, raw.device)
    grid = (triton.cdiv(size, BLOCK_X), triton.cdiv(size, BLOCK_Y), n)
    _launch(_window_resize_kernel, grid, raw, out, y0, y1, hy, ly, x0, x1, hx, lx, size, size,
            raw.stride(0), raw.stride(1), size * size, lo, scale, SRC=_SRC_KIND[raw.dtype])
    return out


def _aggregation_args(probs: torch.Tensor, out: torch.Tensor, n_out: int, thresholds, label_ids, priority,
                      mode: str, counts: torch.Tensor | None):
    """Checked aggregation arguments on the device: ([thresholds, ids, channel order, counted label
    values], counts, meta-parameters K, NV, ARGMAX)."""
    if probs.ndim != 4 or not probs.is_floating_point():
        raise ValueError(f"probs must be (N, K, S, S) floating point, got {tuple(probs.shape)} {probs.dtype}")
    k = probs.shape[1]
    if out.ndim != 3 or out.shape[0] != n_out or out.dtype != torch.uint8 or not out.is_contiguous():
        raise ValueError(f"out must be a contiguous uint8 ({n_out}, h, w) tensor")
    thr = np.asarray(thresholds, np.float32).reshape(-1)
    ids = np.asarray(label_ids).reshape(-1).astype(np.uint8)
    if thr.size != k or ids.size != k:
        raise ValueError("thresholds and label_ids need one entry per class channel")
    if mode == "priority":
        order = np.asarray(priority, np.int64).reshape(-1)
        if sorted(order.tolist()) != list(range(k)):
            raise ValueError("priority must list every channel once")
    elif mode == "argmax":
        order = np.arange(k)
    else:
        raise ValueError("mode must be 'priority' or 'argmax'")
    if counts is not None and (counts.shape != (256,) or counts.dtype != torch.int64):
        raise ValueError("counts must be an int64 (256,) tensor")
    dev = probs.device
    values = np.unique(np.concatenate([[0], ids])).astype(np.int32)
    small = _on_device(dev, thr, ids.astype(np.int32), order.astype(np.int32), values)
    if counts is None:
        counts = torch.zeros(256, dtype=torch.int64, device=dev)
    return small, counts, dict(K=k, NV=int(values.size), ARGMAX=mode == "argmax")


def resize_aggregate(probs: torch.Tensor, out: torch.Tensor, thresholds, label_ids, priority,
                     mode: str = "priority", counts: torch.Tensor | None = None) -> torch.Tensor:
    """Probabilities (N, K, S, S) (float32, or bf16/fp16 read as float32) -> labels in `out` (N, h, w)
    uint8, equal to _core.aggregate(_core.resize_bilinear(probs, h, w), ...) per image.

    counts: optional int64 (256,) tensor; the voxels of each label value (0 and the label ids) are added
    to it on the device.
    """
    if triton is None:
        raise RuntimeError("resize_aggregate needs Triton")
    small, counts, meta = _aggregation_args(probs, out, probs.shape[0] if probs.ndim == 4 else -1, thresholds,
                                            label_ids, priority, mode, counts)
    n, _, s_h, s_w = probs.shape
    if n == 0:
        return out
    if probs.stride(3) != 1:
        probs = probs.contiguous()
    h, w = out.shape[1:]
    y0, y1, hy, ly = _axes(s_h, h, probs.device)
    x0, x1, hx, lx = _axes(s_w, w, probs.device)
    grid = (triton.cdiv(w, BLOCK_X), triton.cdiv(h, BLOCK_Y), n)
    _launch(_resize_aggregate_kernel, grid, probs, out, counts, *small, y0, y1, hy, ly, x0, x1, hx, lx, h, w,
            probs.stride(0), probs.stride(1), probs.stride(2), h * w, **meta)
    return out


def _tiling(h: int, w: int, tile: int, overlap: int) -> tuple[np.ndarray, np.ndarray]:
    """Tile starts along y and x (int32), as _core.tile_starts."""
    return (_core.tile_starts(h, tile, overlap).astype(np.int32), _core.tile_starts(w, tile, overlap).astype(np.int32))


def _cover(starts: np.ndarray, length: int, tile: int) -> tuple[np.ndarray, np.ndarray]:
    """Per pixel along one axis: the first tile covering it and how many do (a run, starts ascending)."""
    pos = np.arange(length)[:, None]
    covers = (pos >= starts[None, :]) & (pos < starts[None, :] + tile)
    return covers.argmax(1).astype(np.int32), covers.sum(1).astype(np.int32)


def extract_tiles(raw: torch.Tensor, tile: int, overlap: int, lo: float, hi: float, pad: str = "edge") -> torch.Tensor:
    """Slices (n, H, W) float32, uint8 or int16 (= uint16 bytes) -> windowed tiles (n*T, 1, tile, tile)
    float32, slice after slice, each slice's equal to _core.extract_tiles(slice, tile, overlap, lo, hi, pad)."""
    if triton is None:
        raise RuntimeError("extract_tiles needs Triton")
    if pad not in ("edge", "constant"):
        raise ValueError("pad must be 'edge' or 'constant'")
    raw, lo, scale = _source(raw, lo, hi)
    n, h, w = raw.shape
    ys, xs = _tiling(h, w, tile, overlap)
    ny, nx = len(ys), len(xs)
    out = torch.empty((n * ny * nx, 1, tile, tile), dtype=torch.float32, device=raw.device)
    if n == 0:
        return out
    grid = (n * ny * nx, triton.cdiv(tile, BLOCK_Y), triton.cdiv(tile, BLOCK_X))
    _launch(_extract_tiles_kernel, grid, raw, out, *_on_device(raw.device, ys, xs), h, w, nx, ny * nx,
            raw.stride(0), raw.stride(1), lo, scale, SRC=_SRC_KIND[raw.dtype], EDGE=pad == "edge", S=tile)
    return out


def stitch_aggregate(probs: torch.Tensor, out: torch.Tensor, overlap: int, blend: str, thresholds, label_ids,
                     priority, mode: str = "priority", counts: torch.Tensor | None = None) -> torch.Tensor:
    """Tile probabilities (n*T, K, tile, tile) in extract_tiles order -> labels in `out` (n, h, w) uint8,
    each slice's equal to _core.aggregate(_core.stitch_tiles(its tiles, h, w, overlap, blend), ...).

    counts: as for resize_aggregate.
    """
    if triton is None:
        raise RuntimeError("stitch_aggregate needs Triton")
    if blend not in ("constant", "ramp"):
        raise ValueError("blend must be 'constant' or 'ramp'")
    n = out.shape[0] if out.ndim == 3 else -1
    small, counts, meta = _aggregation_args(probs, out, n, thresholds, label_ids, priority, mode, counts)
    nt, _, tile, tile_w = probs.shape
    h, w = out.shape[1:]
    ys, xs = _tiling(h, w, tile, overlap)
    ny, nx = len(ys), len(xs)
    if tile != tile_w or nt != n * ny * nx:
        raise ValueError(f"got {nt} tiles of {tile}x{tile_w}; {n} slices of {h}x{w} have {n * ny * nx} square ones")
    if n == 0:
        return out
    if probs.stride(3) != 1:
        probs = probs.contiguous()
    (yf, yc), (xf, xc) = _cover(ys, h, tile), _cover(xs, w, tile)
    ys, xs, *cover, w1 = _on_device(probs.device, ys, xs, yf, yc, xf, xc, blend_weights(tile, overlap, blend))
    grid = (triton.cdiv(w, BLOCK_X), triton.cdiv(h, BLOCK_Y), n)
    _launch(_stitch_aggregate_kernel, grid, probs, out, counts, *small, ys, xs, *cover, w1, h, w, nx, ny * nx,
            probs.stride(0), probs.stride(1), probs.stride(2), h * w, RAMP=blend == "ramp",
            MAXC=int(max(yc.max(), xc.max())), **meta)
    return out
