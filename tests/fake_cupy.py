"""A NumPy-backed stand-in for CuPy, for the GPU post-processing tests on machines without a GPU.

It refuses what CuPy refuses and NumPy allows, so CPU tests catch code that would only fail on the
device: implicit conversion of a device array to NumPy (np.asarray, passing it to C++), host
arrays mixed into device expressions, and NumPy functions CuPy lacks. It also counts the points
where CuPy waits for the device (int()/bool() of an array, boolean-mask indexing, flatnonzero,
unique, labelling, copies to the host), so a test can bound the host syncs per slab, and the device operations (each
about one kernel launch on CuPy; the air labelling counts one though CuPy's takes a few), so a test
can bound those too.

install(monkeypatch) makes xctrt.gpu.post treat these arrays as CuPy arrays.
"""
from __future__ import annotations

import sys
import threading
import types

import numpy as np
import scipy.ndimage

syncs = 0   # host syncs so far; tests reset it
ops = 0   # device operations so far (kernel launches, roughly); tests reset it
stream_syncs = 0   # waits for one stream of cuda.Stream's (not counted in syncs)


def _sync() -> None:
    global syncs
    syncs += 1


def _op() -> None:
    global ops
    ops += 1


def _unwrap(x, strict: bool = True):
    if isinstance(x, ndarray):
        return x._a
    if strict and isinstance(x, np.ndarray) and x.ndim > 0:
        raise TypeError("a host NumPy array in a device expression (CuPy refuses it)")
    if isinstance(x, (list, tuple)):
        return type(x)(_unwrap(v, strict) for v in x)
    return x


def _wrap(r):
    if isinstance(r, np.ndarray):
        return ndarray(r)
    if isinstance(r, tuple):
        return tuple(_wrap(v) for v in r)
    if isinstance(r, np.generic):   # CuPy returns 0-d arrays, never NumPy scalars
        return ndarray(np.asarray(r))
    return r


class ndarray(np.lib.mixins.NDArrayOperatorsMixin):   # noqa: N801 - CuPy's name
    __array_priority__ = 100

    def __init__(self, a: np.ndarray):
        assert isinstance(a, np.ndarray)
        self._a = a

    shape = property(lambda self: self._a.shape)
    dtype = property(lambda self: self._a.dtype)
    ndim = property(lambda self: self._a.ndim)
    size = property(lambda self: self._a.size)
    nbytes = property(lambda self: self._a.nbytes)
    strides = property(lambda self: self._a.strides)
    flags = property(lambda self: self._a.flags)
    T = property(lambda self: ndarray(self._a.T))
    device = property(lambda self: _Device())
    stream = None   # the stream current where it was made (asarray of host data), None: the default one

    def __array__(self, *args, **kwargs):
        raise TypeError("Implicit conversion to a NumPy array is not allowed (CuPy): use .get()")

    def __array_ufunc__(self, ufunc, method, *inputs, **kwargs):
        _op()
        if "out" in kwargs:
            kwargs["out"] = tuple(_unwrap(o) for o in kwargs["out"])
        return _wrap(getattr(ufunc, method)(*(_unwrap(x) for x in inputs), **kwargs))

    def __array_function__(self, func, types_, args, kwargs):
        f = getattr(sys.modules[__name__], func.__name__, None)
        if f is None:
            raise TypeError(f"numpy.{func.__name__} has no device version in this stand-in")
        return f(*args, **kwargs)

    def __bool__(self):
        _sync()
        return bool(self._a)

    def __int__(self):
        _sync()
        return int(self._a)

    def __float__(self):
        _sync()
        return float(self._a)

    def __index__(self):
        _sync()
        return self._a.__index__()

    def __len__(self):
        return len(self._a)

    def __iter__(self):
        return (ndarray(self._a[i]) for i in range(len(self._a)))

    @staticmethod
    def _key(key):
        out = []
        for k in key if isinstance(key, tuple) else (key,):
            k = k._a if isinstance(k, ndarray) else k   # host index arrays are allowed (copied over)
            if isinstance(k, np.ndarray) and k.dtype == bool:
                _sync()   # a boolean mask: CuPy counts its True entries on the host
            out.append(k)
        return tuple(out)

    def __getitem__(self, key):
        key = self._key(key)
        if any(isinstance(k, np.ndarray) for k in key):   # a gather (basic slicing is a view)
            _op()
        return ndarray(np.asarray(self._a[key]))

    def __setitem__(self, key, value):
        _op()
        self._a[self._key(key)] = _unwrap(value, strict=False)

    def get(self) -> np.ndarray:
        _sync()   # a copy to the host waits for the device
        return self._a.copy()

    def item(self):
        _sync()
        return self._a.item()

    def __getattr__(self, name):   # astype, reshape, ravel, copy, view, any, sum, ...
        method = getattr(self._a, name)
        if not callable(method):
            raise AttributeError(name)

        def call(*args, **kwargs):
            if name in _LAUNCHING_METHODS:
                _op()
            return _wrap(method(*_unwrap(args), **{k: _unwrap(v) for k, v in kwargs.items()}))
        return call

    def __repr__(self):
        return f"fake_cupy.ndarray({self._a!r})"


_LAUNCHING_METHODS = {"astype", "copy", "sum", "any", "all", "max", "min", "cumsum", "fill"}


def _device_function(name: str, syncs_: bool = False):
    host = getattr(np, name)

    def f(*args, **kwargs):
        if name != "empty":
            _op()
        if syncs_:
            _sync()
        return _wrap(host(*_unwrap(args), **{k: _unwrap(v) for k, v in kwargs.items()}))
    f.__name__ = name
    return f


for _name in ("where stack concatenate take cumsum zeros ones empty full zeros_like arange maximum minimum isnan "
              "ascontiguousarray broadcast_to clip sqrt exp floor add multiply divide count_nonzero pad").split():
    globals()[_name] = _device_function(_name)
for _name in ("flatnonzero", "unique", "nonzero"):   # their output size is read on the host
    globals()[_name] = _device_function(_name, syncs_=True)


def argsort(a, axis=-1, kind=None):
    if kind not in (None, "stable"):
        raise ValueError(f"kind={kind!r}: CuPy's sorts are stable only")
    return _wrap(np.argsort(_unwrap(a), axis=axis, kind="stable"))


def asarray(a, dtype=None):
    if isinstance(a, ndarray) and dtype is None:
        return a
    out = ndarray(np.array(_unwrap(a, strict=False), dtype=dtype))
    if not isinstance(a, ndarray):   # a copy to the device: queued on this thread's current stream
        out.stream = getattr(_current, "stream", None)
    return out


array = asarray


def asnumpy(a) -> np.ndarray:
    if isinstance(a, ndarray):
        _sync()   # a copy to the host waits for the device
        return a._a.copy()
    return np.asarray(a)


_current = threading.local()   # this thread's current stream (cuda.Stream as a context)


class _Device:
    """cupy.cuda.Device: the one device here; as a context, made current (nothing to do)."""
    id = 0

    def __enter__(self):
        return self

    def __exit__(self, *exc):
        return False


class _Stream:
    """cupy.cuda.Stream: work queued on it runs at once here; as a context it is the thread's current
    stream (device copies made meanwhile note it, ndarray.stream); synchronize() waits for it alone, which
    stream_syncs counts apart from syncs (the labeller's host thread syncs its own stream, off its path)."""

    def __init__(self, null: bool = False, non_blocking: bool = False, ptds: bool = False):
        self.non_blocking = non_blocking
        self._outer = []

    def __enter__(self):
        self._outer.append(getattr(_current, "stream", None))
        _current.stream = self
        return self

    def __exit__(self, *exc):
        _current.stream = self._outer.pop()
        return False

    def synchronize(self) -> None:
        global stream_syncs
        stream_syncs += 1


cuda = types.SimpleNamespace(Device=lambda device=None: _Device(), Stream=_Stream)


int8, uint8, int16, uint16, int32, uint32, int64, float32, float64 = (
    np.int8, np.uint8, np.int16, np.uint16, np.int32, np.uint32, np.int64, np.float32, np.float64)


# cupyx: the scatter functions post.py uses and cupyx.scipy.ndimage.label
cupyx = types.ModuleType("cupyx")


def _scatter(ufunc):
    def f(a, idx, v):
        if not isinstance(a, ndarray):
            raise TypeError("cupyx.scatter_* takes a cupy.ndarray")
        _op()
        ufunc.at(a._a, _unwrap(idx), _unwrap(v))
    return f


cupyx.scatter_add, cupyx.scatter_min, cupyx.scatter_max = _scatter(np.add), _scatter(np.minimum), _scatter(np.maximum)
cupyx.scipy = types.ModuleType("cupyx.scipy")
cupyx.scipy.ndimage = types.ModuleType("cupyx.scipy.ndimage")


def _label(mask):
    if not isinstance(mask, ndarray):
        raise TypeError("cupyx.scipy.ndimage.label takes a cupy.ndarray")
    _sync()   # returns the count as a Python int
    _op()
    lab, n = scipy.ndimage.label(mask._a)
    return ndarray(lab.astype(np.int32)), int(n)


cupyx.scipy.ndimage.label = _label


# RawModule: the kernels xctrt compiles with NVRTC, each run here by its host twin in xctrt._core,
# built from the same C++ source (test_gpu_post.py compiles that source for the GPU with nvcc).
launches = {}   # kernel name -> launches so far; tests reset it
refuse_kernels = False   # True: RawModule refuses to build, as NVRTC does on a toolchain that cannot


def _check_launch(name, grid, block, args, want, n):
    if not all(type(a) is t for a, t in zip(args, want)) or len(args) != len(want):   # CuPy passes Python
        raise TypeError(f"{name} arguments: {[type(a).__name__ for a in args]}")    # scalars with other widths
    if grid[0] * block[0] < n:
        raise ValueError(f"a launch of {grid[0]} x {block[0]} threads for {n} items")


def _search_air_runs(grid, block, args):
    if len(args) == 9:   # the one-tree launch of post.py before 589589e (benchmarks/labeller_launches.py --source)
        runs, n, comp, nodes, air, wz, wy, wx, best2 = args
        args = (runs, n, comp, nodes, ndarray(np.array([0, len(nodes)], np.int64)), air,
                ndarray(np.array([0, len(air)], np.int64)), np.int32(1), wz, wy, wx, best2)
    _check_launch("xctrt_search_air_runs", grid, block, args,
                  (ndarray, np.int64, ndarray, ndarray, ndarray, ndarray, ndarray, np.int32, np.float64, np.float64,
                   np.float64, ndarray), int(args[1]))
    runs, n, comp, nodes, node_start, air, air_start, trees, wz, wy, wx, best2 = args
    if (runs.dtype, comp.dtype, best2.dtype, node_start.dtype, air_start.dtype) != (
            np.int32, np.int32, np.uint64, np.int64, np.int64) or runs.shape != (6, n) \
            or node_start.shape != (trees + 1,) or air_start.shape != (trees + 1,):
        raise TypeError("xctrt_search_air_runs needs runs (6, n) int32, comp int32, best2 uint64, starts (T + 1,) int64")
    from xctrt import _core
    _core.search_air_runs(nodes._a, air._a, runs._a, comp._a, best2._a, (float(wz), float(wy), float(wx)),
                          node_start._a, air_start._a)


def _kernel_twin(name, types, twin, outputs, dtypes, n_at=None):
    """A launch of one of the labeller's kernels: checks the arguments as the kernel reads them (types,
    thread count args[n_at], by default the first int64, array dtypes), then writes its _core twin's
    outputs into `outputs` (positions); the twin returns None where the sizes passed do not fit the arrays."""
    n_at = types.index(np.int64) if n_at is None else n_at

    def launch(grid, block, args):
        _check_launch(name, grid, block, args, types, int(args[n_at]))
        arrays = [a for a in args if isinstance(a, ndarray)]
        if [a.dtype for a in arrays] != [np.dtype(d) for d in dtypes] or not all(a.flags.c_contiguous for a in arrays):
            raise TypeError(f"{name}: array dtypes {[str(a.dtype) for a in arrays]}, want {dtypes}")
        out = twin(*args)
        if out is None:
            raise ValueError(f"{name}: the sizes passed do not fit the arrays")
        out = out if isinstance(out, tuple) else (out,)
        for pos, src in zip(outputs, out):
            if args[pos].shape != src.shape:
                raise ValueError(f"{name}: output {args[pos].shape} for {src.shape}")
            args[pos]._a[...] = src
    return launch


def _core_fn(name):
    def f(*args):
        from xctrt import _core
        return getattr(_core, name)(*args)
    return f


I64, I32, U8 = np.int64, np.int32, "uint8"
_AIR_LABEL_TWINS = {   # the air labelling's kernels: types, twin, outputs, array dtypes
    "xctrt_air_label_init": ((ndarray, I64, ndarray), lambda lab, n, p: _core_fn("air_label_init")(lab._a)
                             if lab.shape == p.shape == (n,) else None, (2,), (U8, "int32")),
    "xctrt_air_label_merge": ((ndarray, I64, I32, I32), lambda p, n, Y, X: _core_fn("air_label_merge")(
        p._a, int(Y), int(X)) if p.shape == (n,) else None, (0,), ("int32",)),
    "xctrt_air_label_flatten": ((ndarray, I64, ndarray, ndarray), lambda p, n, root, q: _core_fn("air_label_flatten")(
        p._a) if p.shape == root.shape == q.shape == (n,) else None, (0, 2, 3), ("int32", U8, "int32")),
    "xctrt_air_label_number": ((ndarray, ndarray, I64, ndarray), lambda p, rank, n, comp: _core_fn(
        "air_label_number")(p._a, rank._a) if p.shape == rank.shape == comp.shape == (n,) else None, (3,),
                               ("int32", "int32", "int32")),
}
_TWINS = {**{name: _kernel_twin(name, *how) for name, how in _AIR_LABEL_TWINS.items()},
          "xctrt_search_air_runs": _search_air_runs,
          "xctrt_component_stats": _kernel_twin(
              "xctrt_component_stats",
              (ndarray, ndarray, ndarray, ndarray, I32, I64, ndarray, ndarray, ndarray, ndarray, ndarray, ndarray),
              lambda pid, stats, zyx, g, has_g, n, sums, *out: _core_fn("component_stats")(
                  pid._a, stats._a, zyx._a, g._a if has_g else None, sums.shape[0]) if pid.shape == (n,) else None,
              tuple(range(6, 12)),
              ("int32", "float64", "int32", "float32", "float64", "int32", "int32", "float64", "float32", "float32")),
          "xctrt_union_edges": _kernel_twin(
              "xctrt_union_edges", (ndarray, ndarray, ndarray, I64),
              lambda p, a, b, m: _core_fn("union_edges")(p._a, a._a, b._a) if a.shape == b.shape == (m,) else None,
              (0,), ("int32", "int32", "int32")),
          "xctrt_union_neighbours": _kernel_twin(
              "xctrt_union_neighbours", (ndarray, ndarray, I64, I64, I64, ndarray),
              lambda p, nbr, m, n, goff, local: _core_fn("union_neighbours")(p._a, nbr._a, int(goff), local._a)
              if nbr.size == m and nbr.ndim == 2 and p.shape == (n,) == nbr.shape[1:] else None,
              (0,), ("int32", "int64", "int32")),
          "xctrt_find_roots": _kernel_twin(
              "xctrt_find_roots", (ndarray, I64, ndarray),
              lambda p, n, q: _core_fn("find_roots")(p._a) if p.shape == q.shape == (n,) else None,
              (0, 2), ("int32", "int32")),
          "xctrt_defect_voxels": _kernel_twin(
              "xctrt_defect_voxels",
              (ndarray, ndarray, I64, I64, I64, I64, I32, I32, I32, I32, I32, I32, ndarray, ndarray, ndarray, ndarray),
              lambda ext, e, n, plane, ext_len, goff, Y, X, Z, z0, last, rank, *out: _core_fn("defect_voxels")(
                  ext._a, e._a, int(goff), int(Y), int(X), int(Z), int(z0), bool(last), {1: 6, 2: 18, 3: 26}[int(rank)])
              if e.shape == (n,) and plane == Y * X and ext_len == ext.size else None,
              (12, 13, 14, 15), (U8, "int64", "int64", "float64", "int32", U8)),
          "xctrt_plane_crossings": _kernel_twin(
              "xctrt_plane_crossings", (ndarray, ndarray, I64, ndarray, I32, I32, ndarray),
              lambda p_lab, p_idx, m, lab, Y, X, out: _core_fn("plane_crossings")(
                  p_lab._a, p_idx._a, lab._a[:int(Y) * int(X)], int(Y), int(X))
              if p_idx.shape == (m,) and p_lab.size == Y * X else None,
              (6,), (U8, "int64", U8, "float64")),
          "xctrt_defect_runs": _kernel_twin(
              "xctrt_defect_runs", (ndarray, I64, ndarray, ndarray, ndarray, ndarray),
              lambda s, nr, zyx, pid, flags, runs: _core_fn("defect_runs")(s._a, zyx._a, pid._a, flags._a),
              (5,), ("int64", "int32", "int32", U8, "int32")),
          "xctrt_air_run_starts": _kernel_twin(
              "xctrt_air_run_starts", (ndarray, I64, I32, ndarray),
              lambda comp, n, X, out: _core_fn("air_run_starts")(comp._a) if comp.shape[2] == X else None,
              (3,), ("int32", U8)),
          "xctrt_air_runs": _kernel_twin(
              "xctrt_air_runs", (ndarray, I64, ndarray, ndarray, I32, I32, I32, I64, ndarray, ndarray),
              lambda s, nr, comp, edge, Y, X, z0, base, runs, ids: _core_fn("air_runs")(
                  s._a, comp._a, edge._a, int(z0), int(base)) if comp.shape[1:] == (Y, X) else None,
              (8, 9), ("int64", "int32", U8, "int32", "int64")),
          "xctrt_air_sides": _kernel_twin(
              "xctrt_air_sides", (ndarray, I64, I32, I32, ndarray),
              lambda comp, ns, Y, X, edge: _core_fn("air_sides")(comp._a, edge.size - 1)
              if comp.shape[1:] == (Y, X) and ns == comp.shape[0] * (2 * X + 2 * Y) else None, (4,), ("int32", U8)),
          "xctrt_air_pairs": _kernel_twin(
              "xctrt_air_pairs", (ndarray, I64, ndarray, I64, I64, ndarray),
              lambda last, lb, first, fb, plane, key: _core_fn("air_pairs")(last._a, int(lb), first._a, int(fb))
              if last.size == first.size == plane else None, (5,), ("int32", "int32", "int64"), n_at=4)}


class RawModule:
    def __init__(self, code: str, options=()):
        self.code, self.options = code, tuple(options)

    def get_function(self, name: str):
        if refuse_kernels:
            raise RuntimeError(f"NVRTC_ERROR_COMPILATION: {name} (refused by the stand-in)")
        if f" {name}(" not in self.code or name not in _TWINS:
            raise KeyError(f"no kernel {name} in this module")

        def launch(grid, block, args):
            _op()
            launches[name] = launches.get(name, 0) + 1
            _TWINS[name](grid, block, args)
        return launch


def install(monkeypatch) -> types.ModuleType:
    """Let xctrt.gpu.post take this module for CuPy (undone with the monkeypatch fixture)."""
    from xctrt.gpu import post
    me = sys.modules[__name__]
    monkeypatch.setattr(post, "_cupy", me)
    monkeypatch.setattr(post, "_cupyx", cupyx)
    for name, mod in (("cupyx", cupyx), ("cupyx.scipy", cupyx.scipy), ("cupyx.scipy.ndimage", cupyx.scipy.ndimage)):
        monkeypatch.setitem(sys.modules, name, mod)
    return me
