"""Post-processing written once for NumPy (CPU, tests) and CuPy (GPU), exact to xctrt._core.

Every function takes its array module from its input (`array_module`): NumPy arrays run on the
CPU, CuPy arrays on the GPU, with the same code. The only CuPy-specific lines are the shims
`array_module`, `scatter_min`, `scatter_max`, `scatter_add`, `segment_sum`, `air_label` and `to_host`
below, and the kernels compiled from C++ that _core is built from too (NVRTC_SOURCES: the labeller's
per-voxel and per-run kernels, the surface-distance search), which run as their _core twins on NumPy.

Exactness. _core is built with -ffp-contract=off, so each float32 operation rounds on its own.
Here every float32 step is a separate ufunc call writing a float32 array (on CuPy: one kernel
each, never a fused ElementwiseKernel, which NVRTC would contract into FMA), in the C++ order.
Component statistics are integers accumulated exactly (float64 segment sums only where
every partial sum is an integer below 2**53, checked in ComponentLabeller.__init__), and the
derived table columns come from the same C++ builder (`_core.component_table`); the distance
to the part surface from the same search code (air_search.h, the C++ search's core) over the same
air and defect runs, found here on the device, and compiled without FMA. The one
exception: for float32 images grey_mean is the C++ value up to rounding (the C++ sum order
follows its runs and provisional ids); uint8/uint16 images give it bit for bit.

Components (ComponentLabeller), per slab of nz planes with n defect voxels (n ~ 1-3 % of the
slab on CT parts), bytes moved on the device:
  - foreground: LUT gather of the labels + flatnonzero (a scan)     ~ 6 B/voxel of the slab
  - slab plus the carried previous plane (ext): one copy            ~ 2 B/voxel; the dense
    local index map is written only at defect voxels and read only at matching neighbours
  - everything else works on the n compact defect voxels: one kernel (labeller_kernels.h) reads
    each one's neighbourhood: 13/9/3 backward neighbours (edges), 26 for the surface area's line
    crossings (13 Crofton directions, both signs), exposed sides and x-run ends; then union-find
    (two kernels: every edge joined, every root found) and the statistics rows summed per component
    (one kernel, runs of a component added up in their warp first) ~ 0.5 kB per defect voxel
  - the part's outside, for the surface distance: air components (a 6-connected labelling of the
    slab: union-find kernels on the GPU, SciPy on NumPy; joined across slab boundaries in finish)
    and their x-runs
                                                                    ~ 20-30 B/voxel of the slab
So a 1000x1200x1200 volume with 2 % defects moves ~12 GB over the label volume and ~15 GB
over the compact lists: a few tens of ms at H200 bandwidth; launch overhead and the host
synchronisations (a flatnonzero or a count per step that sizes an array) dominate, all the more
beside the encoder, whose long GEMM kernels each launch waits behind (~60-65 array operations and
~10 host syncs per slab, benchmarks/labeller_launches.py; ~700 when every neighbour was one of its own), hence slabs
of 32-128 planes (below 2**31 voxels each: CuPy's labelling and scatter kernels index with 32-bit
ints). aggregate: per channel a compare and a select, ~8 B/voxel (~25 for K=3).
The distance to the part surface is searched in kd-trees over the air outside the part, built on the
host (_core.air_tree): the air whose component is on the volume's y/x sides in its own slab is outside
whatever comes later, so each slab's such runs go to the host at once and get their tree on a host
thread while later slabs are labelled; finish() finds the rest of the outside air (components joined
to those across slabs), builds its tree while the components are merged, and searches the forest on
the device: one thread per defect run, each starting from its component's best so far and lowering
it atomically (search_air_runs). A search is slower for a pore near the centre of a round part,
where most of the surface is almost equally far.
Only the previous slab's last plane (labels, provisional ids) and per-provisional-component
statistics are carried between slabs; finish() merges provisional components. The defect runs and
the air not yet known to be outside are kept as compact lists on the device until finish().
"""
from __future__ import annotations

import threading
import time
from concurrent.futures import ThreadPoolExecutor

import numpy as np

from .. import _core
from ..defects import mid_plane_runs

try:  # CuPy is optional: without it everything runs on NumPy.
    import cupy as _cupy
    import cupyx as _cupyx
except ImportError:  # pragma: no cover - depends on the machine
    _cupy = _cupyx = None


# ------------------------------------------------------------------ CuPy shims (the only ones)

def array_module(a):
    """numpy or cupy, whichever owns `a`."""
    if _cupy is not None and isinstance(a, _cupy.ndarray):
        return _cupy
    return np


def concatenate(arrays, axis: int = 0):
    """xp.concatenate of a list of arrays of one dtype. On CuPy, more than 8 arrays are copied one by one:
    CuPy joins more than 8 small arrays in a kernel of its own, compiled per dtype and rank when first
    used, so a process's first table over more slabs than its warm-up had compiled several (the
    bench's first timed run on an H200: 0.4-0.6 s in each of the outside air and the components' merge).
    The copies use the kernel every run has compiled already."""
    xp = array_module(arrays[0])
    if xp is np or len(arrays) <= 8:
        return xp.concatenate(arrays, axis)
    if len({a.dtype for a in arrays}) != 1:
        raise ValueError("concatenate takes arrays of one dtype")
    shape = list(arrays[0].shape)
    shape[axis] = sum(int(a.shape[axis]) for a in arrays)
    out = xp.empty(tuple(shape), arrays[0].dtype)
    at, where = 0, [slice(None)] * len(shape)
    for a in arrays:
        where[axis] = slice(at, at + int(a.shape[axis]))
        out[tuple(where)] = a
        at += int(a.shape[axis])
    return out


def scatter_min(a, idx, v) -> None:
    """a[idx] = min(a[idx], v) with repeated indices, in place (numpy.minimum.at)."""
    if isinstance(a, np.ndarray):
        np.minimum.at(a, idx, v)
    else:
        _cupyx.scatter_min(a, idx, v)


def scatter_max(a, idx, v) -> None:
    if isinstance(a, np.ndarray):
        np.maximum.at(a, idx, v)
    else:
        _cupyx.scatter_max(a, idx, v)


def scatter_add(a, idx, v) -> None:
    """a[idx] += v with repeated indices, in place (numpy.add.at)."""
    if isinstance(a, np.ndarray):
        np.add.at(a, idx, v)
    else:
        _cupyx.scatter_add(a, idx, v)


def segment_sum(ids, n: int, weights=None):
    """float64 sums of `weights` (1 without; one value or one row per id) per id in 0..n-1: (n,) or (n, k).

    cupy.bincount syncs twice (a sign check and a max) and refuses empty input; a scatter-add
    into n zeros does neither, and takes rows in one kernel. Exact for integer sums below 2**53
    in any order.
    """
    rows = weights is not None and weights.ndim == 2
    if isinstance(ids, np.ndarray):
        if rows:
            out = np.empty((n, weights.shape[1]))
            for c in range(weights.shape[1]):
                out[:, c] = np.bincount(ids, weights[:, c], minlength=n)
            return out
        return np.bincount(ids, weights, minlength=n).astype(np.float64, copy=False)
    out = _cupy.zeros((n, weights.shape[1]) if rows else n, np.float64)
    _cupyx.scatter_add(out, ids, 1.0 if weights is None else weights)
    return out


AIR_LABEL = "kernels"   # how air_label labels on the GPU: "kernels" (labeller_kernels.h) or "cupyx" (CuPy's)


def air_label(lab):
    """The air's components in a C-contiguous (z, Y, X) uint8 slab of labels (air: 0), 6-connected: (int32
    labels 1..count, in the raster order of each component's first voxel as scipy.ndimage.label numbers
    them, 0 elsewhere; count). On the GPU the labeller's union-find kernels (labeller_kernels.h); CuPy's
    cupyx.scipy.ndimage.label where NVRTC refused them, or where AIR_LABEL says "cupyx" (benchmarks)."""
    if isinstance(lab, np.ndarray):
        from scipy import ndimage
        return ndimage.label(lab == 0)  # its default structure: the 6 face neighbours
    k = _labeller_kernels(lab) if AIR_LABEL == "kernels" else None
    if k is None:
        import cupyx.scipy.ndimage
        return cupyx.scipy.ndimage.label(lab == 0)
    n = int(lab.size)
    comp = _cupy.empty(n, np.int32)
    if not n:
        return comp.reshape(lab.shape), 0
    forest, root = _cupy.empty(n, np.int32), _cupy.empty(n, np.uint8)
    grid, Y, X = _blocks(n), np.int32(lab.shape[1]), np.int32(lab.shape[2])
    k["xctrt_air_label_init"](*grid, (lab.reshape(-1), np.int64(n), forest))
    k["xctrt_air_label_merge"](*grid, (forest, np.int64(n), Y, X))
    k["xctrt_air_label_flatten"](*grid, (forest, np.int64(n), root, comp))   # comp: each voxel's root first
    rank = _cupy.cumsum(root, dtype=np.int32)   # each root's number (1..) at its index
    k["xctrt_air_label_number"](*grid, (comp, rank, np.int64(n), comp))
    return comp.reshape(lab.shape), int(rank[-1])   # the count: a host sync


def search_air_runs(forest, runs, comp, best2, voxel_size) -> None:
    """Lower best2 (uint64 bits of each component's smallest squared distance to the outside air)
    in place from the defect runs (6, n) int32 and their components comp (n,) int32, over a forest of
    kd-trees (air_forest): on the host _core.search_air_runs, on the GPU the CUDA kernel compiled from
    the same C++ (air_search.h), one thread per run."""
    nodes, node_start, air, air_start = forest
    if isinstance(best2, np.ndarray):
        _core.search_air_runs(nodes, air, runs, comp, best2, voxel_size, node_start, air_start)
        return
    n = runs.shape[1]
    if not n:
        return
    kernels = _nvrtc("air_search.h")
    if kernels is None:   # NVRTC refused the kernel: the host twin, same bits, slower (air_search_error says why)
        host = to_host(best2)
        _core.search_air_runs(to_host(nodes), to_host(air), to_host(runs), to_host(comp), host, voxel_size,
                              to_host(node_start), to_host(air_start))
        best2[...] = _cupy.asarray(host)
        return
    kernels["xctrt_search_air_runs"](*_blocks(n), (runs, np.int64(n), comp, nodes, node_start, air, air_start,
                                                    np.int32(node_start.size - 1), *map(np.float64, voxel_size),
                                                    best2))


def air_forest(trees, xp=np) -> tuple:
    """kd-trees over air runs (each (nodes, air) as _core.air_tree returns them, on the host or already on
    xp's device) one after the other, as the search takes them, on xp's device: (nodes (k, 40) uint8,
    node_start (T + 1,) int64, air (m, 4) int32, air_start)."""
    trees = [t for t in trees if len(t[1])]
    node_start = xp.asarray(np.cumsum([0] + [len(t[0]) for t in trees], dtype=np.int64))
    air_start = xp.asarray(np.cumsum([0] + [len(t[1]) for t in trees], dtype=np.int64))
    nodes = concatenate([xp.asarray(t[0]) for t in trees]) if trees else xp.zeros((0, 40), np.uint8)
    air = concatenate([xp.asarray(t[1]) for t in trees]) if trees else xp.zeros((0, 4), np.int32)
    return nodes, node_start, air, air_start


def surface_distances(xp, trees, runs, comp, n: int, voxel_size) -> tuple[np.ndarray, float]:
    """Each of n components' distance to the part surface, from kd-trees over the air outside the part
    (each (nodes, air) as _core.air_tree builds them on the host, or a future of one being built
    elsewhere) and the defect runs (6, n_runs) with their components (n_runs,) (-1: left out), on
    xp's device: the trees sent there, then search_air_runs. Returns the (n,) float64 distances on
    the host and the seconds until the search began (the wait for the trees and their upload)."""
    t0 = time.perf_counter()
    forest = air_forest([t.result() if hasattr(t, "result") else t for t in trees], xp)
    tree_s = time.perf_counter() - t0
    best2 = xp.full(n, np.inf).view(np.uint64)
    if len(forest[2]):
        search_air_runs(forest, xp.asarray(runs), xp.asarray(comp), best2, voxel_size)
    return np.sqrt(to_host(best2).view(np.float64)), tree_s


# Compiled as _core is built: every double operation rounded on its own (no FMA contraction).
AIR_SEARCH_OPTIONS = ("--fmad=false", "-DXCTRT_AIR_SEARCH_KERNEL")   # the source is C++11: any default dialect
LABELLER = "labeller_kernels.h"
LABELLER_OPTIONS = ("-DXCTRT_LABELLER_KERNELS",)   # integers only: no rounding to agree on
# The C++ sources in this package that NVRTC compiles (and _core is built from): options, kernels.
NVRTC_SOURCES = {"air_search.h": (AIR_SEARCH_OPTIONS, ("xctrt_search_air_runs",)),
                 LABELLER: (LABELLER_OPTIONS, ("xctrt_defect_voxels", "xctrt_plane_crossings", "xctrt_defect_runs",
                                               "xctrt_air_run_starts", "xctrt_air_runs", "xctrt_air_sides",
                                               "xctrt_air_pairs", "xctrt_air_label_init", "xctrt_air_label_merge",
                                               "xctrt_air_label_flatten", "xctrt_air_label_number", "xctrt_union_edges",
                                               "xctrt_find_roots", "xctrt_union_neighbours", "xctrt_component_stats"))}
_kernels = {}   # source -> {"functions": {name: kernel} or None, "error": why NVRTC refused it, or None}


def kernel_error(source: str) -> str | None:
    """Why `source`'s kernels run on the host instead of the GPU (None while they run on the GPU)."""
    return _kernels.get(source, {}).get("error")


def air_search_error() -> str | None:
    """Why the surface-distance search runs on the host instead of the GPU (None while it runs on the GPU)."""
    return kernel_error("air_search.h")


def _nvrtc(source: str) -> dict | None:
    """`source`'s CUDA kernels by name, compiled by NVRTC on first use; None for good once that failed
    (a toolchain that will not build them: their host twins in _core instead, same values, slower)."""
    k = _kernels.setdefault(source, {"functions": None, "error": None})
    if k["functions"] is None and k["error"] is None:
        from pathlib import Path
        options, names = NVRTC_SOURCES[source]
        try:
            module = _cupy.RawModule(code=Path(__file__).with_name(source).read_text(), options=options)
            k["functions"] = {name: module.get_function(name) for name in names}
        except Exception as exc:  # noqa: BLE001 - any refusal: the host twins
            k["error"] = f"{type(exc).__name__}: {exc}"[:300]
    return k["functions"]


def _blocks(n: int, block: int = 128) -> tuple[tuple[int], tuple[int]]:
    return ((n + block - 1) // block,), (block,)


def _labeller_kernels(a) -> dict | None:
    """The labeller's CUDA kernels for device array `a`; None for NumPy arrays, or where NVRTC refused them."""
    return None if isinstance(a, np.ndarray) else _nvrtc(LABELLER)


def _host_twin(fn, *args):
    """fn (a kernel's twin in _core) on host copies of the arguments; its arrays back where they came from."""
    device = _cupy is not None and any(isinstance(a, _cupy.ndarray) for a in args)
    out = fn(*(to_host(a) if device and isinstance(a, _cupy.ndarray) else a for a in args))
    if not device:
        return out
    return tuple(map(_cupy.asarray, out)) if isinstance(out, tuple) else _cupy.asarray(out)


# The labeller's kernels (labeller_kernels.h), one thread per item; on NumPy, or where NVRTC refused
# them, their twins in _core (kernel_error(LABELLER) says why).

def defect_voxels(ext, e, goff: int, shape, z0: int, last: bool, connectivity: int):
    """What the labeller needs of each defect voxel of a slab: ext is the previous slab's last plane (goff
    values, or none) and the slab's labels, e (n,) int64 the defect voxels' indices in it. Returns nbr
    (k, n) int64 (its k earlier neighbours' ext indices where they have its label value, else -1), stats
    (n, 18) float64 rows, zyx (n, 3) int32, flags (n,) uint8."""
    Z, Y, X = shape
    k = _labeller_kernels(ext)
    if k is None:
        return _host_twin(_core.defect_voxels, ext, e, goff, Y, X, Z, z0, bool(last), connectivity)
    n = int(e.size)
    rank = {6: 1, 18: 2, 26: 3}[connectivity]
    nbr = _cupy.empty(({1: 3, 2: 9, 3: 13}[rank], n), np.int64)
    stats = _cupy.empty((n, _STAT_COLS), np.float64)
    zyx = _cupy.empty((n, 3), np.int32)
    flags = _cupy.empty(n, np.uint8)
    if n:
        k["xctrt_defect_voxels"](*_blocks(n), (
            ext, e, np.int64(n), np.int64(Y * X), np.int64(ext.size), np.int64(goff), np.int32(Y), np.int32(X),
            np.int32(Z), np.int32(z0), np.int32(bool(last)), np.int32(rank), nbr, stats, zyx, flags))
    return nbr, stats, zyx, flags


def component_stats(pid, stats, zyx, g, nloc: int) -> dict:
    """A slab's components' statistics from its defect voxels (pid (n,) int32 0..nloc-1, their statistics
    rows, coordinates and grey values g, or None): sums (nloc, 18) float64, min and max (nloc, 3) int32,
    and with g gsum (nloc,) float64, gmin and gmax float32 (NaN left out, as the C++ labeller leaves it).
    One kernel: the voxels of a run of one component add up within their warp before their atomics, which
    for a component of millions of voxels would otherwise serialise on its few addresses."""
    k = _labeller_kernels(pid)
    if k is None:
        out = _host_twin(_core.component_stats, pid, stats, zyx, g, nloc)
    else:
        n = int(pid.size)
        out = (_cupy.zeros((nloc, _STAT_COLS), np.float64), _cupy.full((nloc, 3), _I32_MAX, np.int32),
               _cupy.full((nloc, 3), -1, np.int32), _cupy.zeros(nloc, np.float64),
               _cupy.full(nloc, np.inf, np.float32), _cupy.full(nloc, -np.inf, np.float32))
        if n:
            gg = g if g is not None else _cupy.zeros(1, np.float32)
            k["xctrt_component_stats"](*_blocks(n), (pid, stats, zyx, gg, np.int32(g is not None), np.int64(n), *out))
    keys = ("sums", "min", "max") + (("gsum", "gmin", "gmax") if g is not None else ())
    return dict(zip(keys, out))


def plane_crossings(p_lab, p_idx, lab, Y: int, X: int):
    """The deferred +z line crossings of the previous slab's last plane (p_lab) at its defect voxels
    p_idx (m,) int64, now that the next plane (lab's first) has come: (m, 18) float64 statistics rows."""
    k = _labeller_kernels(p_lab)
    if k is None:
        return _host_twin(_core.plane_crossings, p_lab, p_idx, lab[:Y * X], Y, X)
    m = int(p_idx.size)
    out = _cupy.empty((m, _STAT_COLS), np.float64)
    if m:
        k["xctrt_plane_crossings"](*_blocks(m), (p_lab, p_idx, np.int64(m), lab, np.int32(Y), np.int32(X), out))
    return out


def defect_runs(s, zyx, pid, flags):
    """The slab's defect x-runs from their first voxels s in its defect list (each ends at the next voxel
    flagged as a run's end): (6, nr) int32 z, y, x0, x1, provisional component, exposed sides (any of
    its voxels')."""
    k = _labeller_kernels(s)
    if k is None:
        return _host_twin(_core.defect_runs, s, zyx, pid, flags)
    nr = int(s.size)
    runs = _cupy.empty((6, nr), np.int32)
    if nr:
        k["xctrt_defect_runs"](*_blocks(nr), (s, np.int64(nr), zyx, pid, flags, runs))
    return runs


def air_run_starts(comp):
    """Flat uint8, 1 where an air x-run starts in comp (z, Y, X), a slab's air components (1.., 0 not air)."""
    k = _labeller_kernels(comp)
    if k is None:
        return _host_twin(_core.air_run_starts, comp)
    n = int(comp.size)
    out = _cupy.empty(n, np.uint8)
    if n:
        k["xctrt_air_run_starts"](*_blocks(n), (comp, np.int64(n), np.int32(comp.shape[2]), out))
    return out


def air_runs(s, comp, edge, z0: int, base: int):
    """The air x-runs starting at flat voxels s of comp: ((nr, 5) int32 z (+ z0), y, x0, x1, 1 where their
    component is on the volume's sides (edge, as air_sides gives it), (nr,) int64 their components' ids
    + base)."""
    k = _labeller_kernels(s)
    if k is None:
        return _host_twin(_core.air_runs, s, comp, edge, z0, base)
    nr = int(s.size)
    runs, ids = _cupy.empty((nr, 5), np.int32), _cupy.empty(nr, np.int64)
    if nr:
        k["xctrt_air_runs"](*_blocks(nr), (s, np.int64(nr), comp, edge, np.int32(comp.shape[1]),
                                           np.int32(comp.shape[2]), np.int32(z0), np.int64(base), runs, ids))
    return runs, ids


def air_sides(comp, n: int):
    """(n + 1,) uint8: 1 for the air components of comp (1..n) on the volume's y/x sides."""
    k = _labeller_kernels(comp)
    if k is None:
        return _host_twin(_core.air_sides, comp, n)
    nz, Y, X = comp.shape
    edge = _cupy.zeros(n + 1, np.uint8)
    sides = nz * (2 * X + 2 * Y)
    if sides:
        k["xctrt_air_sides"](*_blocks(sides), (comp, np.int64(sides), np.int32(Y), np.int32(X), edge))
    return edge


def air_pairs(last, last_base: int, first, first_base: int):
    """Per plane position, the air components meeting across a slab boundary as keys a * 2**31 + b (ids
    + bases; a from `last`, the previous slab's last plane of components, b from `first`), 0 where none."""
    k = _labeller_kernels(last)
    if k is None:
        return _host_twin(_core.air_pairs, last, last_base, first, first_base)
    plane = int(last.size)
    key = _cupy.empty(plane, np.int64)
    if plane:
        k["xctrt_air_pairs"](*_blocks(plane), (last, np.int64(last_base), first, np.int64(first_base),
                                               np.int64(plane), key))
    return key


def to_host(a) -> np.ndarray:
    """A NumPy array of `a` (copied from the device for CuPy arrays)."""
    if _cupy is not None and isinstance(a, _cupy.ndarray):
        return _cupy.asnumpy(a)
    return np.asarray(a)


def to_host_all(arrays: dict) -> dict:
    """to_host of each array of a dict, device arrays in one copy: one host sync instead of one per array
    (each, in a run's tail, may also wait for the GIL held by the run's other threads). The widest
    items go first, so every array's bytes stay aligned in the shared host buffer."""
    if _cupy is None or not any(isinstance(v, _cupy.ndarray) for v in arrays.values()):
        return {k: np.asarray(v) for k, v in arrays.items()}
    order = sorted(arrays, key=lambda k: -arrays[k].dtype.itemsize)
    flat = [_cupy.ascontiguousarray(arrays[k]).reshape(-1).view(np.uint8) for k in order]
    host = _cupy.asnumpy(concatenate(flat))
    out, at = {}, 0
    for k, f in zip(order, flat):
        out[k] = host[at:at + f.size].view(arrays[k].dtype).reshape(arrays[k].shape)
        at += f.size
    return {k: out[k] for k in arrays}


# ------------------------------------------------------------------ window / resize / aggregate

_SLICE_DTYPES = (np.uint8, np.uint16, np.float32)


def window(slice, lo, hi):
    """clip((float32(x) - lo) / (hi - lo), 0, 1) in float32, like _core.window (any leading dims)."""
    xp = array_module(slice)
    if slice.ndim < 2:
        raise ValueError("slice must be a 2-D array (or a stack of them)")
    if slice.dtype not in _SLICE_DTYPES:
        raise ValueError(f"slice dtype must be uint8, uint16 or float32, got {slice.dtype}")
    lo32, hi32 = np.float32(lo), np.float32(hi)
    if not hi32 > lo32:
        raise ValueError("window needs hi > lo")
    scale = np.float32(hi32 - lo32)
    v = (slice.astype(np.float32) - lo32) / scale  # a true division, as in C++
    # The C++ ternaries: NaN passes through, unlike a min/max pair on some backends.
    v = xp.where(v < 0, np.float32(0), v).astype(np.float32, copy=False)
    return xp.where(v > 1, np.float32(1), v).astype(np.float32, copy=False)


def _axis(n_in: int, n_out: int):
    """make_axis of tiling.cpp on the host: double source coordinates, float32 weights."""
    scale = float(n_in) / float(n_out)
    src = (np.arange(n_out, dtype=np.float64) + 0.5) * scale - 0.5
    src = np.maximum(src, 0.0)
    i0 = np.minimum(np.floor(src).astype(np.int64), n_in - 1)
    i1 = np.minimum(i0 + 1, n_in - 1)
    lw = (src - i0.astype(np.float64)).astype(np.float32)
    hw = np.float32(1.0) - lw
    return i0, i1, lw, hw


def resize_bilinear(img, out_h: int, out_w: int):
    """Half-pixel bilinear resize of float32 (..., H, W), like _core.resize_bilinear."""
    xp = array_module(img)
    if img.ndim not in (2, 3, 4):
        raise ValueError("img must be (H, W), (C, H, W) or (N, C, H, W)")
    if img.dtype != np.float32:
        raise ValueError(f"img must be float32, got {img.dtype}")
    h, w = img.shape[-2:]
    if h < 1 or w < 1 or img.size == 0:
        raise ValueError("img must not be empty")
    if out_h < 1 or out_w < 1:
        raise ValueError("out_h and out_w must be >= 1")
    y0, y1, ly, hy = (xp.asarray(a) for a in _axis(h, out_h))
    x0, x1, lx, hx = (xp.asarray(a) for a in _axis(w, out_w))
    # Horizontal pass on the source rows, then vertical: h*a + l*b, each op rounded to float32.
    t = xp.add(xp.multiply(hx, img[..., x0]), xp.multiply(lx, img[..., x1]))
    a = xp.multiply(hy[:, None], t[..., y0, :])
    b = xp.multiply(ly[:, None], t[..., y1, :])
    return xp.add(a, b)


def aggregate(probs, thresholds, label_ids, priority, mode="priority", out=None):
    """Probabilities (K, H, W) or (N, K, H, W) -> uint8 labels (H, W) or (N, H, W), like _core.aggregate.

    priority: channel indices, highest first; the first channel with p >= threshold wins.
    argmax: the most probable channel with p >= threshold (lower channel on ties); none -> 0.
    """
    xp = array_module(probs)
    if probs.ndim not in (3, 4):
        raise ValueError("probs must be (K, H, W) or (N, K, H, W)")
    if probs.dtype != np.float32:
        raise ValueError(f"probs must be float32, got {probs.dtype}")
    cax = probs.ndim - 3
    k = probs.shape[cax]
    thr = to_host(thresholds).astype(np.float32).reshape(-1)
    ids = to_host(label_ids).reshape(-1).astype(np.uint8)
    if thr.size != k or ids.size != k:
        raise ValueError("thresholds and label_ids need one entry per class channel")
    shape = probs.shape[:cax] + probs.shape[cax + 1:]
    chan = (lambda c: probs[c]) if cax == 0 else (lambda c: probs[:, c])
    o = xp.zeros(shape, np.uint8)
    if mode == "priority":
        order = [int(c) for c in to_host(priority).reshape(-1)]
        if len(order) != k or sorted(order) != list(range(k)):
            raise ValueError("priority must list every channel once")
        for c in reversed(order):  # lowest priority first; higher ones overwrite
            o = xp.where(chan(c) >= thr[c], ids[c], o).astype(np.uint8, copy=False)
    elif mode == "argmax":
        best = xp.full(shape, -np.inf, np.float32)
        for c in range(k):  # strict '>' keeps the lower channel on ties
            v = chan(c)
            take = (v >= thr[c]) & (v > best)
            best = xp.where(take, v, best)
            o = xp.where(take, ids[c], o).astype(np.uint8, copy=False)
    else:
        raise ValueError("mode must be 'priority' or 'argmax'")
    if out is None:
        return o
    if out.dtype != np.uint8 or out.shape != shape or not out.flags.c_contiguous:
        raise ValueError("out must be a C-contiguous uint8 array shaped like one probability map")
    out[...] = o
    return out


# ------------------------------------------------------------------ tiles

def extract_tiles(slice, tile: int, overlap: int, lo, hi, pad: str = "edge"):
    """Windowed tiles (T, tile, tile) float32 in row-major tile order, like _core.extract_tiles."""
    xp = array_module(slice)
    if slice.ndim != 2:
        raise ValueError("slice must be a 2-D array")
    if pad not in ("edge", "constant"):
        raise ValueError("pad must be 'edge' or 'constant'")
    h, w = slice.shape
    ys, xs = _core.tile_starts(h, tile, overlap), _core.tile_starts(w, tile, overlap)
    win = window(slice, lo, hi)
    grow = ((0, max(0, tile - h)), (0, max(0, tile - w)))
    win = xp.pad(win, grow, mode="edge") if pad == "edge" else xp.pad(win, grow, mode="constant")
    r = np.arange(tile)
    rows = xp.asarray(ys[:, None] + r)  # (ny, tile)
    cols = xp.asarray(xs[:, None] + r)  # (nx, tile)
    t = win[rows[:, None, :, None], cols[None, :, None, :]]
    return xp.ascontiguousarray(t.reshape(-1, tile, tile))


def blend_weights(tile: int, overlap: int, blend: str) -> np.ndarray:
    """stitch_tiles' per-axis tile weights (float32, as tiling.cpp): 1, or for 'ramp' rising linearly over
    the overlap from each tile edge."""
    i = np.arange(tile)
    if blend == "ramp":
        return np.minimum(1.0, (np.minimum(i, tile - 1 - i) + 1) / float(overlap + 1)).astype(np.float32)
    return np.ones(tile, np.float32)


def stitch_tiles(tiles, height: int, width: int, overlap: int, blend: str = "constant"):
    """(T, K, tile, tile) float32 -> (K, height, width) weighted mean, like _core.stitch_tiles.

    Tiles are added in tile order, as the C++ does per pixel, so the float32 sums agree.
    """
    xp = array_module(tiles)
    if tiles.ndim != 4 or tiles.shape[2] != tiles.shape[3]:
        raise ValueError("tiles must be (T, K, tile, tile)")
    if tiles.dtype != np.float32:
        raise ValueError("tiles must be float32")
    nt, k, tile, _ = tiles.shape
    if blend not in ("constant", "ramp"):
        raise ValueError("blend must be 'constant' or 'ramp'")
    ys, xs = _core.tile_starts(height, tile, overlap), _core.tile_starts(width, tile, overlap)
    if nt != len(ys) * len(xs):
        raise ValueError(f"got {nt} tiles, a {height}x{width} slice has {len(ys) * len(xs)}")
    w1 = blend_weights(tile, overlap, blend)
    w2 = xp.asarray(w1[:, None] * w1[None, :])  # wy * w1d[c], float32 as in C++
    acc = xp.zeros((k, height, width), np.float32)
    wsum = xp.zeros((height, width), np.float32)
    t = 0
    for y in ys:
        for x in xs:
            h, w = min(tile, height - y), min(tile, width - x)
            acc[:, y:y + h, x:x + w] += w2[:h, :w] * tiles[t, :, :h, :w]
            wsum[y:y + h, x:x + w] += w2[:h, :w]
            t += 1
    return xp.divide(acc, wsum)


# ------------------------------------------------------------------ 3D components

def _connect(n: int, a, b):
    """Union-find over n nodes joined by edges (a, b) (device or host arrays): each node's root, the
    smallest node of its component. On the GPU two kernels (labeller_kernels.h: every edge joined, the
    larger root hooked under the smaller; then every node's root found), with no host sync; elsewhere
    their _core twins. (Rounds of hooking and pointer jumping ended each check in a host sync: 5 or more
    per call, each waiting behind whatever the device was doing.)"""
    a = a.astype(np.int32, copy=False)
    b = b.astype(np.int32, copy=False)
    k = _labeller_kernels(a)
    if k is None:
        return _host_roots(_host_twin(_core.union_edges, np.arange(n, dtype=np.int32), a, b))
    p, m = _cupy.arange(n, dtype=np.int32), int(a.size)
    if m:
        k["xctrt_union_edges"](*_blocks(m), (p, a, b, np.int64(m)))
    return _device_roots(k, p)


def _connect_neighbours(n: int, nbr, goff: int, local):
    """_connect over a slab's n defect voxels, each joined to its earlier neighbours in the slab: nbr (k, n)
    as defect_voxels gives it (ext indices, >= goff in the slab), local the voxel indices' places in the
    defect list. The kernel reads the edges from nbr itself: no list of them is made (two host syncs and
    a few passes over k x n values fewer per slab)."""
    k = _labeller_kernels(nbr)
    if k is None:
        return _host_roots(_host_twin(_core.union_neighbours, np.arange(n, dtype=np.int32), nbr, goff, local))
    p, m = _cupy.arange(n, dtype=np.int32), int(nbr.size)
    if m:
        k["xctrt_union_neighbours"](*_blocks(m), (p, nbr, np.int64(m), np.int64(n), np.int64(goff), local))
    return _device_roots(k, p)


def _host_roots(p):
    """Each node's root in forest p, by the find_roots kernel's _core twin."""
    return _host_twin(_core.find_roots, p)[1]


def _device_roots(k, p):
    """Each node's root in device forest p, by the find_roots kernel."""
    n = int(p.size)
    root = _cupy.empty(n, np.int32)
    if n:
        k["xctrt_find_roots"](*_blocks(n), (p, np.int64(n), root))
    return root


def _rank_roots(xp, parent):
    """Component number per node (0.. in order of the roots), the roots, and the count."""
    n = parent.shape[0]
    is_root = parent == xp.arange(n, dtype=parent.dtype)
    roots = xp.flatnonzero(is_root)
    rank = xp.cumsum(is_root, dtype=np.int32) - 1
    return rank[parent], roots, int(roots.size)


_I32_MAX = np.iinfo(np.int32).max
# A defect voxel's statistics row (labeller_kernels.h, kStatCols): 1, z, y, x, the line crossings per
# Crofton direction (the surface area, see cpp/crofton.hpp), edge; and its flags' bit for a voxel that
# starts an x-run (kFlagRunStart; the run ends at the next voxel flagged kFlagRunEnd).
_STAT_COLS, _STAT_CROSS, _STAT_EDGE = 18, slice(4, 17), 17
_RUN_START = 16


def max_slab_planes(Y: int, X: int) -> int:
    """The most planes of Y x X a slab may have: CuPy's labelling and scatter kernels index with
    32-bit ints, so a slab stays below 2**31 voxels (0: not even one plane fits)."""
    return _I32_MAX // (Y * X)


class ComponentLabeller:
    """Streamed 3D connected components with per-component statistics, like _core.ComponentLabeller.

    add_slab(labels, image) takes (z, Y, X) slabs in z order (NumPy or CuPy arrays); finish()
    returns the same table (dict of 1-D NumPy columns) as the C++ labeller. A voxel takes part
    if its label is in `classes`; neighbours join only if their label values are equal.
    """

    def __init__(self, shape, classes=(2, 3), connectivity=26, voxel_size=(1.0, 1.0, 1.0)):
        shape = tuple(int(s) for s in shape)
        if len(shape) != 3 or any(s <= 0 or s > _I32_MAX for s in shape):
            raise ValueError("shape entries must be positive and below 2**31")
        if connectivity not in (6, 18, 26):
            raise ValueError(f"connectivity must be 6, 18 or 26, got {connectivity}")
        vs = tuple(float(v) for v in voxel_size)
        _core.check_voxel_size(vs)   # the table's limits, checked before any work
        self._lut = np.zeros(256, bool)
        for c in classes:
            if not 0 <= int(c) <= 255:
                raise ValueError(f"classes must be label values in 0..255, got {c}")
            self._lut[int(c)] = True
        nvox = shape[0] * shape[1] * shape[2]
        # Coordinate and uint16 grey sums go through float64 segment sums: exact below 2**53.
        if nvox * max(max(shape), 65535) >= 2 ** 53:
            raise ValueError("volume too large for exact float64 sums")
        self.shape, self.connectivity, self.voxel_size = shape, connectivity, vs
        self._z = 0
        self._xp = None
        self._nprov = 0
        self._slabs = []  # per-slab statistics of its provisional components
        self._cross = []  # (previous-slab id, this-slab id) pairs of provisional components
        self._prev = None  # last plane: labels, defect indices in the plane, their ids
        self._keep = None  # label_volume: (flat voxel index, provisional id) per slab
        self._surface = True  # find the distance to the part surface (defect runs, outside air)
        self._runs = []  # (z, y, x0, x1, provisional id, exposed sides) of every defect x-run, per slab
        # Air, for the part's outside (_add_air): per slab its x-runs (z, y, x0, x1, on the sides) and their air
        # component (global ids 1..), where the slabs are; the components on the volume's edge and the pairs
        # joined across the slab boundary (keys a * 2**31 + b; 0 joins nothing), on the host; the last
        # plane's components (slab numbering) and their base for the next slab.
        self._air_runs, self._air_id, self._air_edge, self._air_pairs = [], [], [], []
        self._air_n = 0
        self._air_last = None
        # The air known to be outside as its slab arrives (its component is on the volume's sides there):
        # its host runs per slab, and their kd-trees, built on a host thread while later slabs are labelled
        # (and sent to the device there, on CuPy: _air_tree); _air_runs flags those runs, and finish() finds
        # which of the rest is outside too.
        self._early_runs, self._early_trees = [], []
        self._early_mid = []   # ... and those of them on the mid-planes (for the preview), picked there too
        self._late_runs = None  # the rest of the outside air, found by finish()
        self._tree_pool = None
        self._device = self._tree_stream = None   # CuPy: the slabs' device; the host thread's stream there
        self.surface_distance_s = 0.0  # time of the last finish()'s surface distances, in all
        self.surface_tree_s = 0.0  # the part before the search: outside air to the host, the wait for its kd-tree
        #                            (built on a host thread while the components are merged) and its upload
        self.outside_air_s = 0.0   # of that: the outside air resolved here (union-find of the air) and on the host
        self.outside_air_detail = {}   # ... its parts: seconds of the union-find, the selection, the copy; sizes
        self.resolve_s = 0.0   # the last finish()'s merge of the slabs' components, their columns to the host
        self.columns_s = 0.0   # ... and its table's columns made from them (_core.component_table)
        self.surface_runs = {"outside_air": 0, "defect": 0}   # what the last finish()'s search worked on
        self.table_spans = []   # the last finish()'s parts: (name, start, end), perf_counter seconds
        self.outside_air_voxels = None  # air voxels outside the part, after finish()
        self._outside_parts = None  # their (m, 4) host x-runs in parts, kept by finish() for outside_air_runs()
        self._outside_runs = None   # ... joined on the first outside_air_runs()
        self._outside_lock = threading.Lock()

    @property
    def slices_received(self) -> int:
        return self._z

    @property
    def n_provisional(self) -> int:
        return self._nprov

    def add_slab(self, labels, image) -> None:
        Z, Y, X = self.shape
        if labels.ndim != 3 or labels.shape[1:] != (Y, X):
            raise ValueError(f"labels must be (z, {Y}, {X})")
        if image is None or image.ndim != 3 or image.shape != labels.shape:
            raise ValueError("image must have the same shape as labels")
        if image.dtype not in _SLICE_DTYPES:
            raise ValueError(f"image must be a native uint8, uint16 or float32 array, got dtype {image.dtype}")
        self._add(labels, image)

    def _add(self, labels, image) -> None:
        Z, Y, X = self.shape
        nz = labels.shape[0]
        if self._z + nz > Z:
            raise ValueError(f"too many slices: {self._z} received, this slab has {nz}, the volume has {Z}")
        if labels.dtype != np.uint8:
            raise ValueError(f"labels must be a uint8 array, got dtype {labels.dtype}")
        xp = array_module(labels)
        if self._xp is None:
            self._xp = xp
            self._lut = xp.asarray(self._lut)
            if xp is not np:
                self._device = labels.device
        elif xp is not self._xp:
            raise ValueError("every slab must live on the same device (NumPy or CuPy) as the first")
        if nz == 0:
            return
        plane = Y * X
        if nz > max_slab_planes(Y, X):
            raise ValueError(f"a slab of {nz} planes of {Y}x{X} has 2**31 voxels or more: send thinner slabs")
        lab = xp.ascontiguousarray(labels).reshape(-1)
        z0 = self._z
        last = z0 + nz == Z
        prev = self._prev
        # The slab behind the previous slab's last plane: one array for every neighbour gather.
        ext = xp.concatenate([prev[0], lab]) if prev is not None else lab
        goff = plane if prev is not None else 0

        idx = xp.flatnonzero(xp.take(self._lut, lab))  # defect voxels, raster order (host sync)
        n = int(idx.size)
        e = idx + goff  # index into ext
        L = lab[idx]
        # Per voxel, one kernel (labeller_kernels.h): its matching earlier neighbours, its statistics row
        # (1, z, y, x, crossings per Crofton direction, edge), coordinates, exposed sides and run ends.
        nbr, stats, zyx, flags = defect_voxels(ext, e, goff, self.shape, z0, last, self.connectivity)

        # Joined to their earlier neighbours with the same label value, in the slab.
        local = xp.empty(nz * plane, np.int32)  # dense local index, read only at defects
        local[idx] = xp.arange(n, dtype=np.int32)
        pid, roots, nloc = _rank_roots(xp, _connect_neighbours(n, nbr, goff, local))
        first = self._nprov
        if first + nloc > _I32_MAX:
            raise ValueError("too many provisional components for 32-bit ids")

        if prev is not None:
            p_lab, p_idx, p_ids, p_st = prev
            p_map = xp.empty(plane, np.int32)
            p_map[p_idx] = p_ids
            flat = nbr.reshape(-1)
            across = xp.flatnonzero((flat >= 0) & (flat < goff))   # neighbours in the previous plane
            if across.size:
                pairs = xp.stack([p_map[flat[across]], pid[across % n] + np.int32(first)])
                self._cross.append(xp.unique(pairs.astype(np.int64)[0] * 2 ** 31 + pairs[1]))
            # Crossings of the previous plane along +(1, dy, dx), deferred until its next plane
            # (this one) arrived.
            if p_idx.size:
                scatter_add(p_st["sums"], p_ids - np.int32(p_st["first"]), plane_crossings(p_lab, p_idx, lab, Y, X))

        # Grey min/max in float32: every image dtype taken (_SLICE_DTYPES) is exact in it; sums (the
        # statistics rows: exact integers, see __init__) in float64.
        g = xp.asarray(image).reshape(-1)[idx].astype(np.float32) if image is not None else None
        st = {"first": first, "n": nloc, **component_stats(pid, stats, zyx, g, nloc), "cls": L[roots]}
        self._slabs.append(st)
        if self._surface:
            self._collect_runs(flags, zyx, pid + np.int32(first))
            self._add_air(lab.reshape(nz, Y, X), z0, last)
        if self._keep is not None:
            self._keep.append((idx + z0 * plane, pid + np.int32(first)))

        self._nprov += nloc
        self._z += nz
        if not last:
            tail = n - int(xp.count_nonzero(idx >= (nz - 1) * plane))  # last plane's defects
            self._prev = (lab[(nz - 1) * plane:].copy(), idx[tail:] - (nz - 1) * plane,
                          pid[tail:] + np.int32(first), st)
        else:
            self._prev = None

    def _collect_runs(self, flags, zyx, pid) -> None:
        """The slab's x-runs with their exposed sides, the same list as the C++ labeller keeps."""
        xp = self._xp
        # x-runs: maximal stretches of one label value along a row, their ends flagged per voxel
        self._runs.append(defect_runs(xp.flatnonzero(flags & _RUN_START), zyx, pid, flags))

    def _add_air(self, lab, z0: int, last: bool) -> None:
        """The slab's air runs and their components, as the C++ labeller's add_air(): the part's
        outside is the air connected (6-neighbours) to the volume's sides (y or x at the edge),
        decided in finish()."""
        xp = self._xp
        comp, n = air_label(lab)
        n, base = int(n), self._air_n   # this slab's components 1..n are ids base + 1.. of the volume
        edge = air_sides(comp, n)
        pairs = xp.unique(air_pairs(*self._air_last, comp[0], base)) if self._air_last is not None else None
        self._air_last = None if last else (comp[-1].copy(), base)
        runs, ids = air_runs(xp.flatnonzero(air_run_starts(comp)), comp, edge, z0, base)
        # runs on the volume's sides here are outside for good, whatever later slabs join to them:
        # picked here and copied to the host at once, their tree built there while later slabs come.
        # (Not all runs to the host and picked there: for a random network's ~2.7 M air runs per slab,
        # ~6 % of them early, that copied 54 MB and NumPy's selection took 26 ms of this thread on the
        # 2-core VM: benchmarks/host_tail_costs.py.)
        # With them, in the same copy, the components on the sides and the pairs joined across the slab
        # boundary (air meeting there): finish() joins the air's components on the host, in one union-find
        # of ~100k components (a random network's), not on the device, where it ends in syncs.
        parts = {"early": runs[xp.flatnonzero(runs[:, 4])][:, :4], "edge": edge}
        host = to_host_all(parts if pairs is None else {**parts, "pairs": pairs})
        early = np.ascontiguousarray(host["early"])
        self._air_edge.append(np.flatnonzero(host["edge"]) + base)
        if pairs is not None:
            self._air_pairs.append(host["pairs"])
        if len(early):
            if self._tree_pool is None:
                self._tree_pool = ThreadPoolExecutor(1, thread_name_prefix="xctrt-air-tree")
            self._early_runs.append(early)
            self._early_trees.append(self._tree_pool.submit(self._air_tree, early))
            self._early_mid.append(self._tree_pool.submit(mid_plane_runs, early, self.shape))
        self._air_runs.append(runs)
        self._air_id.append(ids)
        self._air_n += n

    def close(self) -> None:
        """After a failed run (finish() never called): stop the thread that builds the outside air's
        kd-trees, its queued builds dropped. finish() does this itself."""
        pool, self._tree_pool = self._tree_pool, None
        if pool is not None:
            pool.shutdown(wait=True, cancel_futures=True)

    def _air_tree(self, air: np.ndarray) -> tuple:
        """The kd-tree (nodes, air) over a slab's early outside-air runs (_core.air_tree), built on the host
        thread. On CuPy it is sent to the device there as well, on a stream of its own, while later slabs
        come: finish() then sends only the late air's tree. (It joined and sent all of them: ~5 M runs and
        their nodes for a random network, within the 0.05 s between the outside air and the search on the
        H200, benchmarks/RESULTS.md, 2026-11-28.)"""
        tree = _core.air_tree(air, self.voxel_size)
        xp = self._xp
        if xp is np:
            return tree
        with self._device:
            if self._tree_stream is None:
                self._tree_stream = xp.cuda.Stream(non_blocking=True)
            with self._tree_stream:
                tree = tuple(xp.asarray(a) for a in tree)
            self._tree_stream.synchronize()   # done before the future is: any stream may read it then
        return tree

    def _outside_air(self):
        """(m, 4) z, y, x0, x1 of the air runs outside the part that were not on the volume's sides
        in their own slab (those are in _early_runs): the runs whose component joins one that was.
        Its parts' seconds (connect_s: the components joined on the host and the verdict per component sent
        to the device; select_s: the runs picked there, ending in a host sync) and sizes go to
        outside_air_detail."""
        xp = self._xp
        if not self._air_n:   # the same keys as with air, for summary.json
            self.outside_air_detail = {"connect_s": 0.0, "select_s": 0.0, "air_components": 0, "air_pairs": 0,
                                       "air_runs": 0}
            return xp.zeros((0, 4), np.int32)
        t0 = time.perf_counter()
        n = self._air_n + 1  # ids 1..air_n; 0 unused
        pairs = np.concatenate(self._air_pairs) if self._air_pairs else np.zeros(0, np.int64)
        root = _connect(n, pairs >> 31, pairs & _I32_MAX)   # host arrays: on the host, no device syncs
        outside = np.zeros(n, bool)
        outside[root[np.concatenate(self._air_edge)]] = True
        outside = xp.asarray(outside[root])   # per component: is it outside the part
        t1 = time.perf_counter()
        runs = concatenate(self._air_runs)
        keep = xp.flatnonzero(outside[concatenate(self._air_id)] & (runs[:, 4] == 0))   # not in _early_runs
        late = runs[keep, :4]   # its gather is in the copy's time: flatnonzero synced before it
        self.outside_air_detail = {"connect_s": round(t1 - t0, 4), "select_s": round(time.perf_counter() - t1, 4),
                                   "air_components": n - 1, "air_pairs": int(pairs.size),
                                   "air_runs": int(runs.shape[0])}
        return late

    def outside_air_runs(self) -> np.ndarray:
        """After finish(): (m, 4) int32 x-runs z, y, x0, x1 of the air outside the part (as the C++ labeller's,
        in another order). Joined from their parts on the first call (any thread)."""
        with self._outside_lock:
            if self._outside_parts is None:
                raise RuntimeError("outside_air_runs() comes after finish()")
            if self._outside_runs is None:
                self._outside_runs = np.concatenate(self._outside_parts) if self._outside_parts \
                    else np.zeros((0, 4), np.int32)
            return self._outside_runs

    def outside_air_mid_runs(self) -> np.ndarray:
        """After finish(): those of outside_air_runs() on the volume's mid-planes (defects.mid_plane_runs),
        all the preview reads; picked slab by slab on the host thread, so no join of millions of runs."""
        if self._late_runs is None:
            raise RuntimeError("outside_air_mid_runs() comes after finish()")
        return np.concatenate([f.result() for f in self._early_mid] + [mid_plane_runs(self._late_runs, self.shape)])

    def _outside_air_late(self) -> np.ndarray:
        """The outside air found in finish(): (m, 4) host runs; with those of the slabs, counted."""
        t0 = time.perf_counter()
        late = self._outside_air()
        t1 = time.perf_counter()
        late = np.ascontiguousarray(to_host(late), dtype=np.int32)
        self.outside_air_s = time.perf_counter() - t0
        self.outside_air_detail.update(to_host_s=round(self.outside_air_s - (t1 - t0), 4), late_runs=len(late))
        self._late_runs = late
        parts = self._early_runs + ([late] if len(late) else [])
        self._outside_parts, self._outside_runs = parts, None
        self.outside_air_voxels = sum(int((a[:, 3].astype(np.int64) - a[:, 2] + 1).sum()) for a in parts)
        self.surface_runs = {"outside_air": sum(len(a) for a in parts),
                             "defect": sum(int(r.shape[1]) for r in self._runs)}
        return late

    def _surface_distance(self, late_tree, final, n_kept: int) -> np.ndarray:
        """Distance of each kept component to the part surface: to the nearest voxel of the air
        outside the part. The kd-trees over that air (built on the host thread: one per slab for the air
        on the volume's sides there, `late_tree` for the rest; futures of _core.air_tree) are searched
        where the defect runs are (search_air_runs), exact to _core.distance_to_surface. surface_tree_s:
        the outside air and the wait for the trees and their upload, the parts of the finish before the
        search."""
        xp = self._xp
        trees = self._early_trees + ([late_tree] if late_tree is not None else [])
        if not trees or not self._runs:
            self.surface_tree_s = self.outside_air_s
            return np.full(n_kept, np.nan)
        runs = concatenate(self._runs, axis=1)
        comp = final[runs[4]] - np.int32(1)   # -1: a run of a component min_voxels dropped
        d, tree_s = surface_distances(xp, trees, runs, comp, n_kept, self.voxel_size)
        self.surface_tree_s = self.outside_air_s + tree_s
        return d

    def _resolve(self, min_voxels: int):
        """Merged statistics of the kept components (dict of device columns) and the final id
        (1.., 0 = dropped) of every provisional component."""
        xp = self._xp
        n = self._nprov
        if self._cross:
            pairs = concatenate(self._cross)
            root = _connect(n, pairs >> 31, pairs & _I32_MAX)
        else:
            root = xp.arange(n, dtype=np.int32)
        comp, roots, nc = _rank_roots(xp, root)
        cols = {k: concatenate([s[k] for s in self._slabs]) for k in self._slabs[0]
                if k not in ("first", "n")}
        sums = segment_sum(comp, nc, cols["sums"]).astype(np.int64)   # exact: integers below 2**53
        m = {"voxels": sums[:, 0], "sz": sums[:, 1], "sy": sums[:, 2], "sx": sums[:, 3],
             "cross": sums[:, _STAT_CROSS], "edge": sums[:, _STAT_EDGE] > 0}
        m["min"] = xp.full((nc, 3), _I32_MAX, np.int32)
        scatter_min(m["min"], comp, cols["min"])
        m["max"] = xp.full((nc, 3), -1, np.int32)
        scatter_max(m["max"], comp, cols["max"])
        m["cls"] = cols["cls"][roots]
        if "gsum" in cols:
            m["gsum"] = segment_sum(comp, nc, cols["gsum"])
            m["gmin"] = xp.full(nc, np.inf, np.float32)
            scatter_min(m["gmin"], comp, cols["gmin"])
            m["gmax"] = xp.full(nc, -np.inf, np.float32)
            scatter_max(m["gmax"], comp, cols["gmax"])
        keep = m["voxels"] >= min_voxels
        new_id = xp.where(keep, xp.cumsum(keep, dtype=np.int32), 0).astype(np.int32)
        kept = xp.flatnonzero(keep)   # one host sync, not one per column
        return {k: v[kept] for k, v in m.items()}, new_id[comp]

    def _columns(self, h: dict) -> tuple[dict, float, float]:
        """The table from the merged columns on the host (_core.component_table), its surface distances
        left NaN, and when it began and ended (perf_counter seconds)."""
        t0 = time.perf_counter()
        lo, hi = h["min"], h["max"]
        table = _core.component_table(
            h["voxels"], h["sz"], h["sy"], h["sx"], h["cross"], h["gsum"], h["gmin"], h["gmax"],
            lo[:, 0], lo[:, 1], lo[:, 2], hi[:, 0], hi[:, 1], hi[:, 2], h["cls"], h["edge"],
            np.full(len(h["voxels"]), np.nan), self.voxel_size)
        return table, t0, time.perf_counter()

    def finish(self, min_voxels: int = 0, on_outside_air=None) -> dict:
        """The table (dict of NumPy columns), identical to _core.ComponentLabeller.finish.
        on_outside_air(): called as soon as outside_air_runs() are known, before the components are
        merged (work that needs only the outside air may start meanwhile, on a thread of its own)."""
        if self._z != self.shape[0]:
            raise ValueError(f"finish() before all slices arrived: {self._z} of {self.shape[0]}")
        if min_voxels < 0:
            raise ValueError("min_voxels must be >= 0")
        # The outside air first: what of it was not known slab by slab gets its kd-tree on the host
        # thread (C++, without the GIL) while the slabs' components are merged here, on the device
        # (mostly waits on host syncs).
        spans = self.table_spans = []   # (part, start, end) in perf_counter seconds, for the run's timeline
        t0 = time.perf_counter()
        late = self._outside_air_late()
        spans.append(("table outside air", t0, t0 + self.outside_air_s))
        if on_outside_air is not None:
            on_outside_air()
        pool = self._tree_pool or ThreadPoolExecutor(1, thread_name_prefix="xctrt-air-tree")
        columns_pool = ThreadPoolExecutor(1, thread_name_prefix="xctrt-table-columns")
        try:
            late_tree = pool.submit(_core.air_tree, late, self.voxel_size) if len(late) else None
            t1 = time.perf_counter()
            m, final = self._resolve(int(min_voxels))
            h = to_host_all(m)
            self.resolve_s = time.perf_counter() - t1
            spans.append(("table merge", t1, t1 + self.resolve_s))
            if "gsum" not in h:
                raise ValueError("finish() needs the grey images: use add_slab(labels, image)")
            # The table's columns (C++, without the GIL) are made on a thread while the surface distances are
            # searched on the device; the distances, their last column, are filled in after.
            columns = columns_pool.submit(self._columns, h)
            t2 = time.perf_counter()
            dist = self._surface_distance(late_tree, final, len(h["voxels"]))
            spans.append(("table surface", t2, time.perf_counter()))
            # in the finish's time: the outside air, then what the trees and search took beyond the merge
            self.surface_distance_s = (t1 - t0) + (spans[-1][2] - t2)
            table, c0, c1 = columns.result()
        finally:
            pool.shutdown(wait=True)
            columns_pool.shutdown(wait=True)
            self._tree_pool = None
        self.columns_s = c1 - c0
        spans.append(("table columns", c0, c1))
        table["surface_distance"][:] = dist
        return table


def label_volume(labels, classes=(2, 3), connectivity=26):
    """int32 component ids per voxel (0 = background), identical to _core.label_volume."""
    if labels.ndim != 3:
        raise ValueError("labels must be a 3-D (Z, Y, X) array")
    if labels.size > _I32_MAX:   # one scatter over the whole volume: CuPy's kernels index with 32-bit ints
        raise ValueError("label_volume holds the whole volume: below 2**31 voxels only")
    xp = array_module(labels)
    lb = ComponentLabeller(labels.shape, classes, connectivity)
    lb._keep = []
    lb._surface = False
    lb._add(labels, None)
    _, final = lb._resolve(0)
    out = xp.zeros(labels.size, np.int32)
    for idx, prov in lb._keep:
        out[idx] = final[prov]
    return out.reshape(labels.shape)
