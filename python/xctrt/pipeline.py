"""read -> window/tile -> infer in batches -> stitch -> aggregate -> components + write.

Four threads joined by bounded queues: a reader prefetches slabs, the caller's thread runs
tiling and inference, a components thread runs the connected components (on the host; the GPU
path may count them on the device instead) and then the defect table, and a writer streams
compressed label pages to disk. Memory is a few slabs, whatever the volume size.
"""
from __future__ import annotations

import datetime as _dt
import math
import os
import platform
import queue
import threading
import time
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, field
from pathlib import Path
from typing import Callable

import numpy as np

from . import __version__, _core
from .backends import make_engine
from .cpus import usable_cpus
from .defects import DefectCounter, outside_air_masks, summarise, write_table_csv
from .errors import XctrtError
from .io import (ArraySource, SliceFolderSource, StagedOutputs, TiffSource, VolumeSource, open_volume,
                 write_json, write_volume_tiff)
from .model import ModelPackage, load_package
from .preview import ENCLOSED, mark_enclosed_air, write_preview
from .timing import TABLE_SURFACE_KEYS, CollectorWatch, StageTimer

DEVICES = ("cpu", "cuda", "host-arrays")
OUTPUTS = ("labels.tif", "defects.csv", "preview.png", "summary.json")  # summary.json last: it marks a finished run
_END = object()


@dataclass
class SegmentResult:
    labels: np.ndarray | None            # (Z, Y, X) uint8 when kept in memory
    defects: dict[str, np.ndarray]       # per-defect columns (see defects.csv)
    summary: dict
    outputs: dict[str, Path] = field(default_factory=dict)


def _timeline(origin: float, stage_spans, main_spans) -> list[list]:
    """summary.json's timeline: [stage, start s, end s] since the run began, by start; the main
    thread's spans named "main ..."."""
    rows = [[stage, round(a - origin, 4), round(b - origin, 4)] for stage, a, b in stage_spans]
    rows += [["main " + stage, round(a - origin, 4), round(b - origin, 4)] for stage, a, b in main_spans]
    return sorted(rows, key=lambda r: (r[1], r[2]))


def _get(q: queue.Queue, failed: threading.Event):
    while True:
        try:
            return q.get(timeout=0.1)
        except queue.Empty:
            if failed.is_set():
                raise _StageFailed


def _put(q: queue.Queue, item, failed: threading.Event) -> None:
    while True:
        if failed.is_set():
            raise _StageFailed
        try:
            q.put(item, timeout=0.1)
            return
        except queue.Full:
            continue


class _StageFailed(Exception):
    pass


def _voxel_size(source, given) -> tuple[tuple[float, float, float], str]:
    """(dz, dy, dx) and where it came from: given, the file's metadata, or unknown (1 voxel)."""
    if given is not None:
        try:   # one number: isotropic, as on the command line
            vs = (float(given),) * 3 if np.ndim(given) == 0 else tuple(float(v) for v in given)
        except (TypeError, ValueError):
            raise XctrtError(f"voxel size must be one number or three (dz, dy, dx) in mm, got {given!r}") from None
        vs_from = "given"
    elif source.voxel_size is not None:
        vs, vs_from = source.voxel_size, "file metadata"
    else:
        note = source.voxel_size_note
        vs, vs_from = (1.0, 1.0, 1.0), f"unknown ({note + '; ' if note else ''}sizes in voxels)"
    where = f"{source.path}: " if vs_from == "file metadata" else ""   # then the file is the culprit
    if len(vs) != 3:
        raise XctrtError(f"{where}voxel size must be three numbers (dz, dy, dx) in mm, got {vs}")
    try:
        _core.check_voxel_size(vs)   # the defect table's limits (cpp/crofton.hpp)
    except ValueError as exc:
        raise XctrtError(f"{where}voxel size {vs} ({vs_from}) is not one the defect table takes: {exc}; "
                         "give the right one with --voxel-size") from None
    return vs, vs_from


def _same_file(a: Path, b: Path) -> bool:
    try:
        return os.path.samefile(a, b)
    except OSError:   # one of them does not exist (yet)
        return False


def _where(path: Path) -> str:
    """A path as summary.json records it: absolute, so the record still says which file after a cd;
    "<array>" for an in-memory volume."""
    return str(path) if str(path).startswith("<") else str(Path(path).absolute())


def _read_only(a: np.ndarray) -> np.ndarray:
    v = a.view()
    v.flags.writeable = False
    return v


def default_batch_size(engine_device: str, threads: int = 0) -> int:
    """Tiles per engine call when none is given. On a GPU 8. On a CPU half the inference threads (0: every
    CPU this process may use), 1 to 8: there a bigger batch does not parallelise better but leaves the caches, and on 2
    cores the shipped model segments 1.2-1.3x faster at batch 1 than at 8, with the same labels
    (benchmarks/RESULTS.md); more cores get bigger batches, since one tile's later stages are too small
    to keep many threads busy (not measured)."""
    if engine_device != "cpu":
        return 8
    return min(8, max(1, (threads or usable_cpus()) // 2))


class Segmenter:
    """Segment XCT volumes with a model package.

    >>> seg = Segmenter("default", backend="onnxruntime")
    >>> result = seg.segment("part.tif", out_dir="out/")      # files, as the CLI does
    >>> result = seg.segment(volume_array)                    # in memory: result.labels, result.defects
    """

    def __init__(self, model: str | Path | ModelPackage | None = None, backend: str = "auto",
                 batch_size: int | None = None,
                 threads: int = 0, connectivity: int = 26, min_voxels: int = 1, slab: int = 8,
                 window: tuple[float, float] | None = None, progress: bool = True, device: str = "cpu",
                 engine=None, precision: str = "fp32", fill_enclosed_air: bool = False,
                 components: str | None = None):
        """device "cpu": window/tile/stitch/aggregate/components in C++ on the host around the engine.
        device "cuda": all of it on the GPU (xctrt.gpu: torch model, CuPy stages), needs the torch
        backend; "host-arrays": that GPU path's code with NumPy and torch on the host (tests, dry runs).
        batch_size: tiles per engine call; None: 8 where the model runs on a GPU, on a CPU half the
        inference threads, 1 to 8 (default_batch_size).
        engine: a ready Engine instead of one built from the package (benchmarks).
        precision: "fp32", or "bf16" for the torch backend (its matrix products in bfloat16).
        fill_enclosed_air: relabel air the part encloses (label 0 not reaching the view's y/x sides) as
        material, in the labels, labels.tif and the summary; what that air is in the released test sets'
        labels: benchmarks/RESULTS.md. Known only once the whole volume went through the components, so
        labels.tif is rewritten and on_slab cannot be used with it.
        components: where the GPU path labels the 3D components: "device" (the default there: CuPy on the
        GPU) or "host" (the C++ labeller, from the labels downloaded for labels.tif, leaving the GPU to the
        model); the same table either way. The CPU path labels on the host."""
        if components not in (None, "device", "host"):
            raise XctrtError(f"components must be 'device' or 'host', not {components!r}")
        if components == "device" and device == "cpu":
            raise XctrtError("components on the device need --device cuda: the CPU path labels them on the host")
        self.components = components or ("host" if device == "cpu" else "device")
        self.package = model if isinstance(model, ModelPackage) else load_package(model)
        if device not in DEVICES:
            raise XctrtError(f"device must be one of {', '.join(DEVICES)}, not {device!r}")
        if device != "cpu" and engine is None and backend not in ("torch", "auto"):
            raise XctrtError(f"--device cuda runs the model with torch; backend {backend!r} cannot")
        self.device = device
        if device == "cuda":
            from .gpu import check_cuda
            check_cuda()
        threads = 0 if threads is None else threads   # None, as 0: all
        for name, v in (("batch_size", batch_size), ("slab", slab), ("threads", threads),
                        ("min_voxels", min_voxels), ("connectivity", connectivity)):
            if not (v is None and name == "batch_size" or isinstance(v, (int, np.integer))
                    and not isinstance(v, bool)):
                raise XctrtError(f"{name} must be a whole number, not {v!r}")
        if window is not None and (np.shape(window) != (2,) or not all(
                isinstance(w, (int, float, np.integer, np.floating)) and math.isfinite(w) for w in window)
                or not float(window[0]) < float(window[1])):
            raise XctrtError(f"intensity window must be two finite numbers low < high, not {window!r}")
        if (batch_size is not None and batch_size < 1) or slab < 1:
            raise XctrtError("batch size and slab depth must be at least 1")
        if connectivity not in (6, 18, 26):
            raise XctrtError(f"connectivity must be 6, 18 or 26, not {connectivity}")
        if threads < 0 or min_voxels < 0:
            raise XctrtError(f"threads and min_voxels must be >= 0, got {threads} and {min_voxels}")
        # more threads than this process may run on only adds switching (and once exhausted the
        # machine's threads): count them as all, and record what ran
        threads = 0 if threads > usable_cpus() else threads
        if threads:
            _core.set_num_threads(threads)
        self.engine = engine if engine is not None else make_engine(
            self.package, "torch" if device != "cpu" else backend, threads, precision,
            torch_device="cpu" if device == "host-arrays" else None)   # host arrays: the model on the host too
        if device != "cpu" and getattr(self.engine, "torch_model", None) is None:
            raise XctrtError(f"engine {self.engine.name} cannot run on the GPU path (no torch model)")
        self.batch_size = batch_size or default_batch_size(self.engine.device, threads)
        self.threads, self.slab = threads, slab
        self.connectivity, self.min_voxels, self.window, self.progress = connectivity, min_voxels, window, progress
        if not isinstance(fill_enclosed_air, bool):
            raise XctrtError(f"fill_enclosed_air must be True or False, not {fill_enclosed_air!r}")
        self.fill_enclosed_air = fill_enclosed_air
        pkg = self.package
        self._thresholds = np.array([c.threshold for c in pkg.classes], np.float32)
        self._ids = np.array([c.id for c in pkg.classes], np.uint8)
        self._priority = np.array(pkg.priority, np.int64)
        self.class_names = {c.id: c.name for c in pkg.classes}

    # -------------------------------------------------------------- stages

    def intensity_window(self, source: VolumeSource) -> tuple[float, float]:
        """Raw grey values mapped to 0 and 1: user override, else the manifest (fixed or percentiles
        of evenly spaced sample slices, so the whole volume is never read for it)."""
        if self.window is not None:
            return float(self.window[0]), float(self.window[1])
        w = self.package.window
        if w["mode"] == "fixed":
            return float(w["low"]), float(w["high"])
        sample = source.sample_slices(16)[:, ::2, ::2]
        lo, hi = (float(v) for v in np.percentile(sample, [float(w["low"]), float(w["high"])]))
        if not hi > lo:  # a flat volume: any window works, keep it valid
            hi = lo + 1.0
        return lo, hi

    def labels_for_slab(self, slab: np.ndarray, window: tuple[float, float], timer: StageTimer | None = None
                        ) -> np.ndarray:
        """Class labels for consecutive slices (z, Y, X) of a kernel dtype."""
        timer = timer or StageTimer()
        pkg, eng = self.package, self.engine
        size, ov = pkg.input_size, pkg.overlap
        lo, hi = window
        z, h, w = slab.shape
        tiled = pkg.input_mode == "tile"
        per_slice = len(_core.tile_starts(h, size, ov)) * len(_core.tile_starts(w, size, ov)) if tiled else 1
        group = max(1, self.batch_size // per_slice)  # whole slices per engine call, to fill batches
        k = len(pkg.classes)
        out = np.empty((z, h, w), np.uint8)
        for g0 in range(0, z, group):
            g1 = min(z, g0 + group)
            with timer("tile"):
                if tiled:
                    tiles = np.concatenate([_core.extract_tiles(slab[i], size, ov, lo, hi, pkg.pad)
                                            for i in range(g0, g1)])
                else:
                    tiles = np.stack([_core.resize_bilinear(_core.window(slab[i], lo, hi), size, size)
                                      for i in range(g0, g1)])
                x = tiles[:, None]
            with timer("infer"):
                probs = [eng.run(np.ascontiguousarray(x[b:b + self.batch_size]))
                         for b in range(0, len(x), self.batch_size)]
                probs = probs[0] if len(probs) == 1 else np.concatenate(probs)
            if probs.shape != (len(x), k, size, size) or probs.dtype != np.float32:
                raise XctrtError(f"{pkg.path}: the model returned {probs.dtype} {probs.shape}, "
                                 f"expected float32 {(len(x), k, size, size)}")
            for j, i in enumerate(range(g0, g1)):
                p = probs[j * per_slice:(j + 1) * per_slice]
                with timer("stitch"):
                    full = (_core.stitch_tiles(p, h, w, ov, pkg.blend) if tiled
                            else _core.resize_bilinear(p[0], h, w))
                with timer("aggregate"):
                    _core.aggregate(full, self._thresholds, self._ids, self._priority, pkg.aggregation, out[i])
        return out

    def _compute_stage(self, shape, voxel_size, timer, grey_dtype=None):
        if self.device != "cpu":
            from .gpu.pipeline import GpuStage
            from .gpu.post import max_slab_planes
            z, y, x = shape
            most = max_slab_planes(y, x)
            if min(self.slab, z) > most:
                raise XctrtError(f"slabs of {self.slab} slices of {y}x{x} reach 2**31 voxels, more than the GPU "
                                 "path's kernels index; " + (f"use --slab {most} or less" if most else
                                                             "slices this large need --device cpu"))
            pkg = self.package
            return GpuStage(self.engine.torch_model, pkg.input_size, self._thresholds, self._ids, self._priority,
                            pkg.aggregation, shape, voxel_size, self.connectivity, batch_size=self.batch_size,
                            device="cuda" if self.device == "cuda" else "cpu", input_mode=pkg.input_mode,
                            overlap=pkg.overlap, blend=pkg.blend, pad=pkg.pad, grey_dtype=grey_dtype,
                            components=self.components)
        return _CpuStage(self, DefectCounter(shape, voxel_size, self.connectivity), timer)

    @staticmethod
    def _fill_enclosed_air(outside_runs, shape, labels_all, staged, voxel_size) -> None:
        """Air the part encloses becomes material (1) in labels_all and labels.tif. labels.tif, already
        written by then, is rewritten page by page beside itself and swapped in."""
        masks = outside_air_masks(outside_runs, shape)

        def fill(page, outside):
            page[(page == 0) & ~outside] = 1
            return page

        if staged is None:
            for z, outside in enumerate(masks):
                fill(labels_all[z], outside)
            return
        with staged.write("labels.tif") as tmp:   # the same temporary name the writer thread used
            new = tmp.with_name(tmp.name + ".fill")
            try:
                with TiffSource(tmp) as src:
                    pages = (fill(labels_all[z] if labels_all is not None else src.read(z, z + 1)[0], outside)
                             for z, outside in enumerate(masks))
                    write_volume_tiff(new, pages, shape, np.uint8, voxel_size)
                os.replace(new, tmp)
            finally:
                if new.exists():
                    new.unlink()

    # -------------------------------------------------------------- driver

    def segment(self, volume, out_dir: str | Path | None = None, voxel_size: tuple[float, float, float] | None = None,
                on_slab: Callable[[int, np.ndarray, np.ndarray], None] | None = None,
                keep_labels: bool | None = None) -> SegmentResult:
        """Segment a path (TIFF stack, slice folder, .npy), an array (Z, Y, X) or a VolumeSource.

        out_dir: write labels.tif, defects.csv, preview.png, summary.json there (atomically).
        on_slab(z0, image_slab, label_slab): called for every slab in order, e.g. to stream labels on; on
        the components thread, with read-only arrays: the grey values as the engine reads them (uint8, uint16
        or float32: other types converted) and the uint8 labels.
        keep_labels: return the label volume in memory (default: only when no out_dir is given).
        """
        if on_slab is not None and not callable(on_slab):
            raise XctrtError(f"on_slab must be a function (z0, image, labels), not {on_slab!r}")
        if on_slab is not None and self.fill_enclosed_air:
            raise XctrtError("on_slab streams labels before fill_enclosed_air can know which air the part encloses "
                             "(that needs the whole volume): use one or the other")
        if not isinstance(volume, (np.ndarray, VolumeSource, str, os.PathLike)):
            raise XctrtError(f"volume must be an array (Z, Y, X), a path or a VolumeSource, not "
                             f"{type(volume).__name__}")
        own = not isinstance(volume, VolumeSource)
        source = (ArraySource(volume) if isinstance(volume, np.ndarray) else
                  volume if isinstance(volume, VolumeSource) else open_volume(volume))
        staged = None
        try:
            vs = _voxel_size(source, voxel_size)  # cheap: checked before the output folder is made
            out = Path(out_dir) if out_dir is not None else None
            if out is not None and isinstance(source, SliceFolderSource) and _same_file(out, source.path):
                # labels.tif and preview.png there would be read as slices by the next run
                raise XctrtError(f"{out}: is the input slice folder; write the outputs to another folder (-o)")
            staged = StagedOutputs(out, OUTPUTS, create=True) if out is not None else None
            with CollectorWatch() as collector:
                return self._segment(source, staged, vs, on_slab,
                                     keep_labels if keep_labels is not None else out is None, collector)
        except BaseException:
            if staged:
                staged.discard()
            raise
        finally:
            if own:
                source.close()

    def _segment(self, source, staged, voxel_size, on_slab, keep_labels, collector: CollectorWatch) -> SegmentResult:
        t_start = time.perf_counter()
        timer = StageTimer()
        Z, Y, X = source.shape
        vs, vs_from = voxel_size
        unit = "vox" if vs_from.startswith("unknown") else "mm"
        with timer("read"):
            window = self.intensity_window(source)
        labels_all = np.empty(source.shape, np.uint8) if keep_labels else None
        planes = {"z": None, "y": ([], []), "x": ([], [])}
        failed = threading.Event()
        errors: list[BaseException] = []
        q_in: queue.Queue = queue.Queue(maxsize=2)

        def guarded(work):
            """A thread's body: its failure is the run's error and stops the other threads."""
            def run():
                try:
                    work()
                except _StageFailed:
                    pass
                except BaseException as exc:
                    errors.append(exc)
                    failed.set()
            return run

        @guarded
        def reader():
            it = source.slabs(self.slab)
            while True:
                with timer("read"):
                    item = next(it, _END)
                _put(q_in, item, failed)
                if item is _END:
                    return

        # The first slabs are read while the stage is made (on the GPU its kernels' self-check and its
        # graphs: 0.06 s before the first read in the H200's shared-mode run, benchmarks/RESULTS.md).
        read_thread = threading.Thread(target=reader, name="xctrt-read", daemon=True)
        read_thread.start()
        try:
            stage = self._compute_stage(source.shape, vs, timer, source.dtype)
        except BaseException:
            failed.set()   # the reader stops at its next slab
            read_thread.join()
            raise
        counter = stage.counter
        q_out: queue.Queue = queue.Queue(maxsize=2)     # labelled slabs, to the components thread
        q_write: queue.Queue = queue.Queue(maxsize=2)   # their labels, to the writer thread
        made = {}   # the table, when the components thread makes it
        bar = _progress(Z, self.progress)

        @guarded
        def components():
            # A counter of its own (C++, without the GIL) labels here while the writer encodes the
            # TIFF, and makes the table once the last slab is in, while labels.tif is still written
            while True:
                item = _get(q_out, failed)
                if item is _END:
                    break
                z0, img, lab = item
                with timer("components"):
                    counter.add_slab(lab, img)
                if Z // 2 in range(z0, z0 + len(lab)):
                    planes["z"] = (img[Z // 2 - z0].copy(), lab[Z // 2 - z0].copy())
                for key, sl in (("y", np.s_[:, Y // 2, :]), ("x", np.s_[:, :, X // 2])):
                    planes[key][0].append(img[sl].copy())
                    planes[key][1].append(lab[sl].copy())
                if labels_all is not None:
                    labels_all[z0:z0 + len(lab)] = lab
                if on_slab is not None:   # read-only: img may be the caller's own array, lab is what gets written
                    on_slab(z0, _read_only(img), _read_only(lab))
                bar.update(len(lab))
                _put(q_write, lab, failed)
            _put(q_write, _END, failed)
            if not counter.counts_in_stage:
                with timer("table"):
                    made["table"] = counter.finish(self.min_voxels)

        last_slab = []   # when the writer took the last slab: what follows it is the run's to wait for

        def pages():
            written = 0
            while True:
                with timer("write_wait"):
                    lab = _get(q_write, failed)
                if lab is _END:
                    return
                t = time.perf_counter()
                written += len(lab)
                if written == Z:   # tifffile asks for no page past the last: the loop ends inside this slab
                    last_slab.append(t)
                yield from lab
                if written < Z:   # the last slab's is write_close
                    timer.add_span("write", t, time.perf_counter())   # this slab's encoding and disk time (its batch)

        @guarded
        def write():
            if staged is not None:
                with staged.write("labels.tif") as tmp:
                    write_volume_tiff(tmp, pages(), (Z, Y, X), np.uint8, vs if unit == "mm" else None,
                                      batch_pages=self.slab)   # each slab compressed as it comes
            else:
                for _ in pages():
                    pass
            if last_slab:
                timer.add_span("write_close", last_slab[0], time.perf_counter())   # its batch, the file closed

        def writer():
            t0 = time.perf_counter()
            write()
            # encoding + disk time: the writer thread's life minus waiting for labels
            s = timer.seconds
            s["write"] = time.perf_counter() - t0 - s.pop("write_wait", 0.0)

        def draw_preview(outside):
            """preview.png: the mid-planes, with the air the part encloses in its own colour (or as the
            material it became). Needs every slab through the components thread."""
            pz = planes["z"]
            py_ = (np.concatenate(planes["y"][0]), np.concatenate(planes["y"][1]))
            px = (np.concatenate(planes["x"][0]), np.concatenate(planes["x"][1]))
            mid = mark_enclosed_air({"z": pz, "y": py_, "x": px}, outside, (Z, Y, X),
                                    1 if self.fill_enclosed_air else ENCLOSED)
            with staged.write("preview.png") as tmp:
                write_preview(tmp, mid, window, vs,
                              self.class_names, f"{source.path.name}  {Z}x{Y}x{X}  model {self.package.name}"
                              + ("" if self.package.trained else " (UNTRAINED)"))

        # Where the stage makes the table (the device labeller), the preview is drawn on a thread of its
        # own while the table is made: it needs only the outside air on the mid-planes, which the table
        # finds first. defects.csv is formatted (C++, without the GIL) and written on another as soon as
        # the table is made, while the preview may still be drawn. Both threads are waited for before
        # the run returns or fails, so a failed run leaves no file written after its outputs were discarded.
        preview_pool = ThreadPoolExecutor(1, thread_name_prefix="xctrt-preview")
        csv_pool = ThreadPoolExecutor(1, thread_name_prefix="xctrt-csv")
        early_preview, csv_written = [], []

        def start_preview():
            def job():
                threads[1].join()   # the components thread, done with the mid-planes
                if not failed.is_set():
                    with timer("preview"):
                        draw_preview(counter.outside_air_mid_runs())
            early_preview.append(preview_pool.submit(job))

        def start_csv(table):
            def job():
                if not failed.is_set():
                    # formatted and written together ("csv"); "csv_write": the seconds inside its writes
                    # (a disk behind on labels.tif's writes may hold them back)
                    with timer("csv"), staged.write("defects.csv") as tmp:
                        timer.add_seconds("csv_write", write_table_csv(tmp, table, unit))
            csv_written.append(csv_pool.submit(job))

        threads = [read_thread,
                   threading.Thread(target=components, name="xctrt-host-components", daemon=True),
                   threading.Thread(target=writer, name="xctrt-write", daemon=True)]
        for t in threads[1:]:
            t.start()
        ok = False
        main = StageTimer()   # where this thread's time goes: waiting for the reader, in the stage, for the writer
        try:
            while True:
                item = None
                with main("wait_read"):
                    while item is None:
                        if failed.is_set():
                            raise _StageFailed
                        try:
                            item = q_in.get(timeout=0.1)
                        except queue.Empty:
                            pass
                if item is _END:
                    with main("stage"):
                        finished = stage.flush()
                    with main("wait_write"):
                        for done in finished:
                            _put(q_out, done, failed)
                        _put(q_out, _END, failed)
                    if counter.counts_in_stage:   # every slab is counted: the table while labels.tif is written
                        with timer("table"), main("table"):
                            made["table"] = counter.finish(self.min_voxels, on_outside_air=start_preview
                                                           if staged is not None else None)
                        if staged is not None:
                            start_csv(made["table"])
                    break
                z0, slab = item
                with main("stage"):
                    finished = stage.submit(z0, slab, window)
                with main("wait_write"):
                    for done in finished:
                        _put(q_out, done, failed)
            for t in threads[1:]:
                t.join()
            ok = True
        except _StageFailed:
            pass
        finally:
            if not ok:
                failed.set()  # stops the other stages; their own errors are in `errors`
                stage.close()
            for t in threads:
                t.join()
            bar.close()
        try:
            if errors:
                raise errors[0]

            table = made["table"]
            with timer("table"):
                # the air outside the part, for the fill (the preview wants only its runs on the mid-planes)
                has_labels = labels_all is not None or staged is not None
                outside = counter.outside_air_runs() if self.fill_enclosed_air and has_labels else None
            class_voxels, filled = counter.class_voxels, None
            if self.fill_enclosed_air:
                filled = int(class_voxels[0]) - int(counter.outside_air_voxels)   # all the air the part encloses
                if has_labels:   # with none kept or written, only the counts change
                    with timer("fill"):
                        self._fill_enclosed_air(outside, (Z, Y, X), labels_all, staged, vs if unit == "mm" else None)
                class_voxels = class_voxels.copy()
                class_voxels[0] -= filled
                class_voxels[1] += filled
            for k, v in stage.stage_seconds().items():
                timer.seconds[k] += v
            if staged is not None:   # the table, the preview and defects.csv count in the run's time
                with timer("report"):
                    if not csv_written:
                        start_csv(table)
                    if early_preview:
                        early_preview[0].result()   # drawn while the table was made (its error, if any, here)
                    else:
                        draw_preview(outside if outside is not None else counter.outside_air_mid_runs())
                    csv_written[0].result()   # its error, if any, here
            elapsed = time.perf_counter() - t_start
            summary = {
                "input": {"path": _where(source.path), "shape": [Z, Y, X], "dtype": str(source.file_dtype),
                          "voxel_size_mm": list(vs) if unit == "mm" else None, "voxel_size_from": vs_from},
                "model": {"name": self.package.name, "path": _where(self.package.path), "trained": self.package.trained,
                          "manifest_sha256": self.package.manifest_sha256,
                          "files_sha256": self.package.manifest.get("files", {})},
                "run": {"backend": self.engine.name, "device": self.engine.device, "pipeline": self.device,
                        "routed_adapters": getattr(self.engine, "routed_adapters", None),
                        "matmul_resizes": getattr(self.engine, "matmul_resizes", None),
                        "batch_size": self.batch_size, "components": self.components,
                        "threads": self.threads, "slab": self.slab, "connectivity": self.connectivity,
                        "min_voxels": self.min_voxels, "fill_enclosed_air": self.fill_enclosed_air,
                        "intensity_window": list(window),
                        "date": _dt.datetime.now(_dt.timezone.utc).isoformat(timespec="seconds"),
                        "host": platform.node(), "versions": _versions()},
                "timing": {"total_s": elapsed, "slices_per_s": Z / elapsed if elapsed > 0 else None,
                           "gpu_memory_used_max_gib": stage.memory_used_max / 2 ** 30 if stage.memory_used_max else None,
                           "gpu_cupy_pool_gib": stage.cupy_pool_bytes / 2 ** 30 if stage.cupy_pool_bytes else None,
                           "cuda_graphs_not_used_because": stage.graph_error,
                           "decoder_overlap": stage.decoder_overlap,
                           "decoder_heads": stage.decoder_heads,
                           "pinned_host": stage.pinned_host,
                           "fused_kernels_not_used_because": stage.fused_error,
                           "gpu_labeller_kernels_not_used_because": stage.labeller_kernels_error,
                           "main_thread_s": {**{k: round(v, 4) for k, v in main.seconds.items()},
                                             **({"stage_components": round(stage.main_components_s, 4)}
                                                if stage.main_components_s is not None else {})},
                           "gpu_compute_idle_s": stage.compute_idle_s(),
                           # the device labeller's calls and the slabs they took (more slabs than calls: it fell behind)
                           "gpu_labeller_calls": {"calls": len(stage.label_calls), "slabs": sum(stage.label_calls)}
                           if stage.label_calls else None,
                           **stage.table_surface(),
                           "stage_busy_s": {k: round(v, 4) for k, v in timer.seconds.items()},
                           # Python's garbage collector during the run (its full passes are "gc" in the timeline)
                           "garbage_collector": collector.summary()},
                "result": {**summarise(table, class_voxels, vs, unit, {**self.class_names}, counter.outside_air_voxels),
                           "enclosed_air_filled_voxels": filled},
            }
            outputs = {}
            if staged is not None:
                summary["outputs"] = list(OUTPUTS)
            # last, as it is long (one line per span in the file): every span of the stages (the host threads',
            # the device streams'), then the main thread's ("main ..."), in seconds since the run began
            summary["timeline"] = _timeline(t_start, timer.spans + stage.timeline() + collector.spans, main.spans)
            if staged is not None:
                with staged.write("summary.json") as tmp:
                    write_json(tmp, summary, rows_key="timeline")
                outputs = staged.commit()
            return SegmentResult(labels_all, table, summary, outputs)

        except BaseException:
            failed.set()   # a preview or CSV job not yet begun returns at once
            raise
        finally:
            preview_pool.shutdown(wait=True)
            csv_pool.shutdown(wait=True)

class _CpuStage:
    """Labels slab by slab on the host (C++ kernels); components run later, on the components thread."""

    memory_used_max = cupy_pool_bytes = None   # what the GPU stage also reports: nothing to say on the host
    graph_error = fused_error = labeller_kernels_error = main_components_s = label_calls = decoder_overlap = \
        decoder_heads = pinned_host = None

    @staticmethod
    def compute_idle_s():
        return None

    @staticmethod
    def table_surface():   # the C++ labeller's search is not timed or counted apart from the table
        return dict.fromkeys(TABLE_SURFACE_KEYS)

    def __init__(self, seg: Segmenter, counter: DefectCounter, timer: StageTimer):
        self.seg, self.counter, self.timer = seg, counter, timer

    def submit(self, z0, slab, window):
        return [(z0, slab, self.seg.labels_for_slab(slab, window, self.timer))]

    def flush(self):
        return []

    def close(self):
        pass

    def stage_seconds(self) -> dict[str, float]:
        return {}

    @staticmethod
    def timeline() -> list:   # every stage of the CPU pipeline is timed by the run's own timer
        return []


def _versions() -> dict:
    import onnxruntime
    import tifffile
    return {"xctrt": __version__, "numpy": np.__version__, "onnxruntime": onnxruntime.__version__,
            "tifffile": tifffile.__version__, "python": platform.python_version(), "openmp": bool(_core.openmp)}


class _NoBar:
    def update(self, n):
        pass

    def close(self):
        pass


def _progress(total: int, enabled: bool):
    if not enabled:
        return _NoBar()
    from tqdm import tqdm
    # disable=None: no bar when stderr is not a terminal (logs, pipes), where it would stay as
    # extra lines around the one-line error
    return tqdm(total=total, unit="slice", desc="segment", dynamic_ncols=True, leave=False, disable=None)
