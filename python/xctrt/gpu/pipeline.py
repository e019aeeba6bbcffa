"""The GPU compute stage of Segmenter: slab in host memory -> labels, with everything on the device.

    host slab (pinned) --copy stream--> device --compute stream--> window + resize (post.py)
        -> encoder (one CUDA graph per batch) -> decoders -> resize back + aggregate (post.py)
        --post stream--> 3D components (post.ComponentLabeller)   and   --download stream--> labels to host

Four CUDA streams so that copies, the model and the component labelling of the previous slab
overlap: each waits on the event that says its own slab's labels are ready, never on later work. The
components run on a thread of their own (their host syncs would hold up the queueing of the next
slab's model work); `submit` returns the slabs labelled and on the host so far, in order, and the
Segmenter's reader and writer threads keep disk reads and TIFF encoding off the main thread.

On a machine without CUDA the same code runs on the CPU with NumPy (tests, dry runs): the maths
are identical, only nothing overlaps.
"""
from __future__ import annotations

import queue
import threading
import time
import weakref
from collections import deque
from contextlib import nullcontext

import numpy as np

from .. import _core
from ..defects import DefectCounter
from ..errors import XctrtError
from ..timing import TABLE_SURFACE_KEYS, StageTimer
from . import cuda_array_module, post, resample

# where the GPU path labels the components: on the device (CuPy) or on the host (C++)
COMPONENTS = ("device", "host")
# At most this many planes per call of the device labeller (slabs waiting for it are joined up to it):
# the post check's whole-volume timing labels 64-plane slabs (RESULTS.md), memory measured there.
LABEL_PLANES = 64


# model -> {(batch, input size, device): {"steps": captured GraphedSteps, "user": weakref to the stage
# replaying them, or None}}: captured once per process, reused by later stages of the same model
_GRAPHS: weakref.WeakKeyDictionary = weakref.WeakKeyDictionary()


def kept_graphs(model, key, stage, capture):
    """(entry, steps): the graphs kept for (model, key) if no live stage holds them, else capture()'s,
    kept if none were. A plant pipeline segments volume after volume with one Segmenter: its later
    runs skip the warm-up and capture. The holder gives them back with entry["user"] = None once its
    replays have finished (GpuStage.finish); a stage that died without doing so frees them too."""
    # a bound method (TorchEngine.torch_model) is a new object at each access: key on its object
    owner, key = getattr(model, "__self__", model), (getattr(model, "__func__", None), *key)
    try:
        cached = _GRAPHS.setdefault(owner, {})
    except TypeError:   # a model that takes no weak reference: its graphs are not kept
        cached = {}
    entry = cached.get(key)
    if entry is not None and (entry["user"] is None or entry["user"]() is None):
        if entry["user"] is not None and getattr(stage, "cuda", False):
            # its holder died without finish(): replays of it may still be queued on that stage's stream,
            # reading the graphs' static inputs this stage is about to overwrite
            import torch
            torch.cuda.synchronize()
        entry["user"] = weakref.ref(stage)
        return entry, entry["steps"]
    steps = capture()
    if entry is not None:   # held by another live stage: these graphs are this stage's own
        return None, steps
    entry = cached[key] = {"steps": steps, "user": weakref.ref(stage)}
    return entry, steps


def _pinned_host_stats(torch) -> dict | None:
    """torch's pinned host allocator so far: blocks made, microseconds spent making them, bytes held;
    None where this torch keeps no such statistics."""
    try:
        stats = torch.cuda.host_memory_stats()
    except Exception:   # noqa: BLE001 - an older torch, or none kept: nothing to report
        return None
    return {"blocks": int(stats.get("num_host_alloc", 0)), "alloc_us": float(stats.get("host_alloc_time.total", 0)),
            "bytes": int(stats.get("allocated_bytes.current", 0))}


class _Clock(StageTimer):
    """Per-stage busy time: CUDA events on the stage's stream (read once the slab is finished), or
    the host clock on the CPU, where every call has finished when it returns. Each span is kept too,
    in host perf_counter seconds (`spans`, for the run's timeline): on CUDA placed by its start event's
    time after an origin event that was waited for, so device and host spans share one clock."""

    def __init__(self, torch, cuda: bool):
        super().__init__()   # its lock: marked by the main thread and by the components thread
        self.torch, self.cuda = torch, cuda
        self._pending: list[tuple[str, object, object]] = []
        if cuda:
            self._origin = torch.cuda.Event(enable_timing=True)
            self._origin.record()
            self._origin.synchronize()
            self._origin_host = time.perf_counter()

    def mark(self, stream=None):
        if not self.cuda:
            return time.perf_counter()
        ev = self.torch.cuda.Event(enable_timing=True)
        ev.record(stream)
        return ev

    def span(self, stage: str, start, end) -> None:
        if not self.cuda:
            self.record(stage, start, end)
            return
        with self._lock:
            self._pending.append((stage, start, end))

    def collect(self) -> None:
        """Add the spans whose end events have completed."""
        done = []
        with self._lock:
            pending, self._pending = self._pending, []
            for p in pending:
                (done if p[2].query() else self._pending).append(p)
        for stage, a, b in done:
            t = self._origin_host + self._origin.elapsed_time(a) / 1000.0
            self.record(stage, t, t + a.elapsed_time(b) / 1000.0)

    def finish(self) -> dict[str, float]:
        with self._lock:
            pending = list(self._pending)
        for _, _, b in pending:
            b.synchronize()
        self.collect()
        with self._lock:
            return dict(self.seconds)


class GpuCounter:
    """The components thread's view of the components: already counted on the device, so add_slab does
    nothing and finish() asks the stage."""

    counts_in_stage = True   # add_slab is a no-op: finish() may start once the stage has flushed

    def __init__(self, stage: GpuStage):
        self.stage = stage

    def add_slab(self, labels, image) -> None:
        pass

    @property
    def class_voxels(self) -> np.ndarray:
        return self.stage.host_class_voxels()

    def finish(self, min_voxels: int = 1, on_outside_air=None) -> dict:
        """on_outside_air(): called as soon as outside_air_runs() are known, before the rest of the table
        (the pipeline draws the preview meanwhile)."""
        return self.stage.finish(max(0, int(min_voxels)), on_outside_air)

    @property
    def outside_air_voxels(self) -> int | None:
        return self.stage.labeller.outside_air_voxels

    def outside_air_runs(self) -> np.ndarray:
        return self.stage.labeller.outside_air_runs()

    def outside_air_mid_runs(self) -> np.ndarray:
        return self.stage.labeller.outside_air_mid_runs()


class GpuStage:
    """Labels for slabs on a CUDA device (or, without one, the CPU), components included.

    model: a ClassNet-like object with encode(x) -> embeddings and decode(embeddings, size) ->
    float32 probabilities (N, K, S, S) for x float32 (N, 1, S, S) in [0, 1] on the device, or any
    callable x -> probabilities (then encoder and decoder are timed as one stage, "model").
    """

    FUSED_ON_CPU = False   # the fused kernels on CPU tensors: only under the Triton interpreter (tests)
    # a split model's decoders beside the next batch's encoders (sam.OverlappedSteps): "auto" where
    # timing at capture says it is faster (CUDA graphs); "on" also runs the order eagerly (tests); "off"
    DECODER_OVERLAP = "auto"
    # a ClassNet's decoder heads side by side on streams of their own inside the decoder graphs
    # (ClassNet.head_streams): "auto" where timing at capture says it is faster, "on", "off"
    DECODER_HEADS = "auto"

    def __init__(self, model, input_size: int, thresholds, label_ids, priority, aggregation: str,
                 shape, voxel_size, connectivity: int = 26, classes=(2, 3), *, batch_size: int,
                 device: str = "cuda", graphs: bool = True, input_mode: str = "resize", overlap: int = 0,
                 blend: str = "constant", pad: str = "edge", grey_dtype=None, components: str = "device"):
        """batch_size: images per model call; no default here (the Segmenter's is
        pipeline.default_batch_size). grey_dtype: the volume's grey values (uint8, uint16 or float32),
        whose fused preprocessing the self-check compiles and checks; None: all three.
        components: "device", labelled here on the GPU (post.ComponentLabeller, CuPy), or "host", by the
        C++ labeller on the Segmenter's components thread from the labels downloaded for labels.tif: the
        same table, and the GPU left to the model (COMPONENTS)."""
        if components not in COMPONENTS:
            raise ValueError(f"components must be one of {', '.join(COMPONENTS)}, not {components!r}")
        import torch

        self.torch = torch
        self.cuda = device.startswith("cuda")
        if self.cuda and not torch.cuda.is_available():
            raise XctrtError("the GPU path needs a CUDA device; torch sees none")
        self.device = torch.device(device)
        self.xp = cuda_array_module() if self.cuda else np
        self.memory_used_max = 0   # device memory in use (all allocators and the CUDA context), sampled per slab
        self._pinned_at_start = _pinned_host_stats(torch) if self.cuda else None
        self.cupy_pool_bytes = None   # what CuPy's pool held at the end, before finish() gave it back
        self.model, self.size, self.batch = model, int(input_size), int(batch_size)
        if input_mode not in ("resize", "tile"):
            raise ValueError(f"input_mode must be 'resize' or 'tile', not {input_mode!r}")
        self.tiled, self.overlap, self.blend, self.pad = input_mode == "tile", int(overlap), blend, pad
        self.split = hasattr(model, "encode") and hasattr(model, "decode")
        self.thresholds = np.asarray(thresholds, np.float32)
        self.ids = np.asarray(label_ids, np.uint8)
        self.priority = np.asarray(priority, np.int64)
        self.aggregation = aggregation
        self.host_components = components == "host"
        self.labeller = None if self.host_components else post.ComponentLabeller(
            tuple(shape), classes=tuple(classes), connectivity=connectivity, voxel_size=tuple(voxel_size))
        # on CUDA the fused Triton pre- and post-processing kernels of resample.py (window+resize or tile
        # extraction; resize or stitching + aggregation), after a self-check against the step-by-step
        # functions; fused_error says why they are not used
        self.fused = (self.cuda or self.FUSED_ON_CPU) and resample.triton is not None
        self.fused_error, checked = None, None   # checked: when the self-check began and ended
        if self.fused:
            t0 = time.perf_counter()
            self.fused_error = self._check_fused(grey_dtype)
            checked = (t0, time.perf_counter())
        self.fused = self.fused and self.fused_error is None
        self.class_voxels = torch.zeros(256, dtype=torch.int64, device=self.device) if self.fused else \
            self.xp.zeros(256, self.xp.int64)
        if self.cuda:   # zeroed on the default stream, added to on the compute stream
            torch.cuda.synchronize()
        self.clock = _Clock(torch, self.cuda)
        if checked:   # in every run's time, before its first slab: in the timeline
            self.clock.add_span("fused_check", *checked)
        self.gaps = _Clock(torch, self.cuda)   # compute stream idle between slabs (waiting for the host or the copy in)
        self._last_end = None                  # event at the end of the previous slab's compute work
        self._held = None   # decoders overlapped: (slab, first index, images) of the batch not yet decoded
        # main thread's wait for the components thread (back-pressure, flush); None: components on the host
        self.main_components_s = None if self.host_components else 0.0
        self.voxel_size = tuple(float(v) for v in voxel_size)
        self.counter = DefectCounter(shape, voxel_size, connectivity, tuple(classes),
                                     surface_search=self._surface_search) if self.host_components \
            else GpuCounter(self)
        self._search_times: dict = {}   # host components: the last table's search on the device
        self._downloading: deque = deque()   # host components: slabs whose labels are on their way to the host
        # The components of each slab are labelled on a thread of their own: the labeller's host syncs
        # would otherwise hold up the main thread, which then queues no model work meanwhile. At most
        # two slabs wait for it (their labels and grey values stay on the device until labelled).
        self._to_label: queue.Queue = queue.Queue(maxsize=2)
        self.label_calls: list[int] = []   # slabs per labeller call (more than one when it fell behind)
        self._labelled: queue.Queue = queue.Queue()
        self._label_error: BaseException | None = None
        self._labeller_thread: threading.Thread | None = None
        self._steps = None
        self._graph_entry = None   # the kept graphs this stage holds (_GRAPHS), given back by finish()
        self.capture_s = 0.0
        self.graph_error = None   # why the model runs eagerly although graphs were asked for
        if self.cuda:
            self.compute = torch.cuda.Stream()
            self.copy = torch.cuda.Stream()       # slabs in
            self.download = torch.cuda.Stream()   # labels out: behind its own slab, not ahead of the next copy in
            # high priority: the labeller's many small kernels, each followed by a host sync, would
            # otherwise queue behind the encoder's GEMM blocks that fill every SM
            self.postproc = torch.cuda.Stream(priority=-1)
            if graphs:
                t0 = time.perf_counter()
                try:
                    self._steps = self._capture()
                except Exception as exc:   # e.g. a converted graph that syncs with the host: run it eagerly
                    # a failure inside torch.cuda.graph surfaces as capture_end's error: the cause first
                    why = f"{type(exc).__name__}: {exc}"
                    if isinstance(exc.__context__, Exception):
                        why = f"{type(exc.__context__).__name__}: {exc.__context__} (then {why})"
                    self.graph_error = why[:300]
                    torch.cuda.synchronize()
                # warm-up runs (first kernel compiles, a compiled model's compile) and the capture: start-up
                # time inside the run's total, reported apart from the per-slab stages
                self.capture_s = time.perf_counter() - t0
                self.clock.add_span("capture", t0, t0 + self.capture_s)   # for the timeline
        self._overlap = self._overlapped()

    def _check_fused(self, grey_dtype=None) -> str | None:
        """The mode's two fused kernels once on small random slabs against the step-by-step functions
        (post.py), bit for bit: None if they agree, else what went wrong (a Triton that cannot compile
        them, a difference). The preprocessing for each grey dtype a volume may have (each compiles its
        own kernel)."""
        torch, xp = self.torch, self.xp
        rng = np.random.default_rng(0)
        shape = (2, self.size + self.size // 2 + 3, self.size + 5) if self.tiled else (2, 37, 53)   # 2x2 tiles
        sources = [(rng.integers(0, 65535, shape, endpoint=True).astype(np.uint16), 300.0, 52000.0),
                   (rng.integers(0, 255, shape, endpoint=True).astype(np.uint8), 10.0, 200.0),
                   ((rng.standard_normal(shape) * 3).astype(np.float32), -2.0, 2.5)]
        sources = [s for s in sources if grey_dtype is None or s[0].dtype == np.dtype(grey_dtype)] or sources[:1]
        n, h, w = shape
        try:
            for raw, lo, hi in sources:
                src, img = torch.from_numpy(_as_int16(raw)).to(self.device), xp.asarray(raw)
                x = self._preprocess(src, img, lo, hi, fused=True)
                want_x = self._preprocess(src, img, lo, hi, fused=False)
                if not np.array_equal(post.to_host(_to_xp(xp, x))[:, 0], post.to_host(want_x), equal_nan=True):
                    return f"the fused preprocessing ({raw.dtype}) differs from the step-by-step functions (post.py)"
            # K channels in [0, 1) of the model's output size, a third of them on the quarter steps (ties and
            # values on a threshold), whatever the grey dtype checked above. Drawn on the device: the check
            # runs in every run's time, and NumPy took 24 ms (best of 3) on the 2-core VM to draw
            # 2 x 3 x 1024 x 1024 of them (benchmarks/host_tail_costs.py).
            g = torch.Generator(device=self.device).manual_seed(0)
            probs = torch.rand((x.shape[0], len(self.ids)) + tuple(x.shape[2:]), generator=g, device=self.device)
            probs[..., ::3] = torch.floor(probs[..., ::3] * 4) / 4
            labels = torch.empty(shape, dtype=torch.uint8, device=self.device)
            counts = torch.zeros(256, dtype=torch.int64, device=self.device)
            self._aggregate_fused(probs, labels, counts)
            want = post.to_host(self._aggregate_steps(_to_xp(xp, probs).copy(), n, h, w))
            if not np.array_equal(post.to_host(_to_xp(xp, labels)), want):
                return "the fused aggregation differs from the step-by-step functions (post.py)"
            if not np.array_equal(counts.cpu().numpy(), np.bincount(want.ravel(), minlength=256)):
                return "the fused aggregation's voxel counts differ from its labels"
        except Exception as exc:   # noqa: BLE001 - any failure: run the step-by-step functions instead
            return f"{type(exc).__name__}: {exc}"[:300]
        return None

    # ---------------------------------------------------------------- before and after the model

    def _preprocess(self, src, img, lo: float, hi: float, fused: bool):
        """A slab (n, H, W) -> the model's inputs: n resized slices, or every slice's tiles in row-major
        order, slice after slice. src: the slab as a torch tensor (uint16 as int16), img: as an xp array.
        Fused: (N, 1, S, S) torch float32; step by step: (N, S, S) xp float32."""
        if fused:
            return (resample.extract_tiles(src, self.size, self.overlap, lo, hi, self.pad) if self.tiled
                    else resample.window_resize(src, lo, hi, self.size))
        if self.tiled:
            return self.xp.concatenate([post.extract_tiles(s, self.size, self.overlap, lo, hi, self.pad) for s in img])
        return post.resize_bilinear(post.window(img, lo, hi), self.size, self.size)

    def _aggregate_fused(self, probs, labels, counts=None) -> None:
        """Probabilities (torch: one batch in resize mode, the slab's tiles in tile mode) -> labels (torch
        uint8) in place, voxels per label value added to counts."""
        agg = (self.thresholds, self.ids, self.priority, self.aggregation)
        if self.tiled:
            resample.stitch_aggregate(probs, labels, self.overlap, self.blend, *agg, counts=counts)
        else:
            resample.resize_aggregate(probs, labels, *agg, counts=counts)

    def _aggregate_steps(self, probs, n: int, h: int, w: int):
        """The slab's probabilities (xp float32) -> labels (n, h, w), step by step."""
        if self.tiled:
            per = probs.shape[0] // n
            full = self.xp.stack([post.stitch_tiles(probs[i * per:(i + 1) * per], h, w, self.overlap, self.blend)
                                  for i in range(n)])
        else:
            full = post.resize_bilinear(probs, h, w)
        return post.aggregate(full, self.thresholds, self.ids, self.priority, self.aggregation)

    # ---------------------------------------------------------------- model steps

    def _capture(self):
        """CUDA graphs at the batch size: one for the encoders and one for the decoders of a split model,
        and, where it measured faster on the device, one that runs a batch's decoders beside the next
        batch's encoders (sam.OverlappedSteps); one for the whole model otherwise. Kept with the model
        for later stages (kept_graphs)."""
        from .sam import GraphedStep, OverlappedSteps, time_overlap

        torch = self.torch

        def capture():
            with torch.inference_mode(), torch.cuda.stream(self.compute):
                x = torch.rand(self.batch, 1, self.size, self.size, device=self.device)
                if not self.split:
                    steps = (GraphedStep(self.model, x),)
                else:
                    encode = lambda t: tuple(self.model.encode(t))   # noqa: E731
                    decode = lambda *e: self.model.decode(list(e), self.size)   # noqa: E731
                    enc = GraphedStep(encode, x)
                    dec = GraphedStep(decode, list(enc.static_out))
                    dec, heads = self._capture_heads(enc, dec, decode)
                    overlap, choice = None, {"chosen": "serial"}
                    if self.DECODER_OVERLAP != "off":
                        try:
                            overlap = OverlappedSteps(encode, decode, enc, dec)
                            _same_probabilities(self._overlap_probs(overlap, enc, dec, x), "the overlapped graph")
                            if self.DECODER_OVERLAP == "auto":
                                choice["ms"] = time_overlap(overlap, x)
                                # the simpler order unless the overlap gains more than timing noise
                                if not choice["ms"]["overlapped"] < 0.98 * choice["ms"]["serial"]:
                                    overlap = None
                        except Exception as exc:   # noqa: BLE001 - a capture that fails: one after the other
                            choice["error"] = f"{type(exc).__name__}: {exc}"[:300]
                            overlap = None
                            torch.cuda.synchronize()
                    if overlap is not None:
                        choice["chosen"] = "overlapped"
                    if heads is not None:   # the graphs hold the forks now; eager calls take the heads in turn
                        self.model.head_streams = None
                    steps = (enc, dec, overlap, choice, heads)
            torch.cuda.synchronize()
            return steps

        self._graph_entry, steps = kept_graphs(self.model, (self.batch, self.size, str(self.device)), self, capture)
        return steps

    def _capture_heads(self, enc, dec, decode):
        """(decoder graph, how its heads run): the heads of a ClassNet with more than one side by side,
        each on a stream of its own inside the graph (ClassNet.head_streams), where 4 replays measure
        faster than one head after another; model.head_streams stays set for the graphs captured after
        (the overlap's), and _capture clears it. None: a model without heads to run side by side."""
        from .sam import GraphedStep, best_device_ms

        torch, model = self.torch, self.model
        if self.DECODER_HEADS == "off" or getattr(model, "head_streams", False) is not None \
                or getattr(model, "num_classes", 1) < 2:
            return dec, None
        heads = {"chosen": "one after another"}
        try:
            model.head_streams = [torch.cuda.Stream() for _ in range(model.num_classes)]
            side = GraphedStep(decode, list(enc.static_out))
            _same_probabilities((side(*enc.static_out).clone(), dec(*enc.static_out)), "the heads side by side")
            if self.DECODER_HEADS == "auto":
                def replays(step):
                    return lambda: [step(*enc.static_out) for _ in range(4)]
                heads["ms"] = best_device_ms({"one after another": replays(dec), "side by side": replays(side)})
                # the simpler graph unless side by side gains more than timing noise
                if not heads["ms"]["side by side"] < 0.98 * heads["ms"]["one after another"]:
                    side = None
            if side is not None:
                dec, heads["chosen"] = side, "side by side"
        except Exception as exc:   # noqa: BLE001 - a capture that fails: one head after another
            heads["error"] = f"{type(exc).__name__}: {exc}"[:300]
            torch.cuda.synchronize()
        if heads["chosen"] != "side by side":
            model.head_streams = None
        return dec, heads

    @staticmethod
    def _overlap_probs(overlap, enc, dec, x):
        """(overlapped, one after the other) probabilities of the batch x, by the captured graphs."""
        overlap.first(x)
        got = overlap.next(x).clone()   # x's decoders, beside x's encoders again
        overlap.last()
        enc(x)
        return got, dec(*enc.static_out)

    @property
    def decoder_heads(self) -> dict | None:
        """How a ClassNet's decoder heads ran in the decoder graphs: {"chosen": "side by side" (each on a
        stream of its own) or "one after another", "ms": device ms of 4 replays each way, timed at
        capture, "error": why side by side could not be captured}; None where no such choice was made."""
        return self._steps[4] if self._steps is not None and len(self._steps) > 4 else None

    def _overlapped(self):
        """The OverlappedSteps that run this stage's batches, or None: one batch after the other."""
        if not self.split:
            return None
        if self._steps is not None:
            return self._steps[2] if len(self._steps) > 2 else None
        if self.DECODER_OVERLAP != "on":   # without graphs only when asked (tests): nothing overlaps eagerly
            return None
        from .sam import OverlappedSteps
        return OverlappedSteps(self.model.encode, lambda *e: self.model.decode(list(e), self.size))

    @property
    def pinned_host(self) -> dict | None:
        """Pinned host blocks torch's caching allocator made since this stage began ("blocks_made", each a
        cudaHostAlloc, which holds the driver's lock while the pages are locked: other threads' launches
        wait) and the ms they took; the pool's size at the end ("pool_gib"). None off CUDA, or where torch
        keeps no such statistics. Each slab's pinning is a "pin" span of the timeline."""
        now = _pinned_host_stats(self.torch) if self._pinned_at_start is not None else None
        if now is None:
            return None
        before = self._pinned_at_start
        return {"blocks_made": now["blocks"] - before["blocks"],
                "making_ms": round((now["alloc_us"] - before["alloc_us"]) / 1000.0, 3),
                "pool_gib": round(now["bytes"] / 2 ** 30, 3)}

    @property
    def decoder_overlap(self) -> dict | None:
        """How a split model's decoders ran: {"chosen": "overlapped" (beside the next batch's encoders)
        or "serial", "ms": device ms of 4 batches each way, timed at capture, "error": why the overlap
        could not be captured}; None for a model that is not split."""
        if self._steps is not None and len(self._steps) > 3:
            return self._steps[3]
        return {"chosen": "overlapped" if self._overlap else "serial"} if self.split else None

    def _padded(self, x):
        """The graphs' batch is fixed: the last, smaller batch is padded with zeros."""
        n = x.shape[0]
        return x if n == self.batch else self.torch.cat([x, x.new_zeros((self.batch - n,) + tuple(x.shape[1:]))])

    def _encode(self, x):
        if self._steps is None:
            return self.model.encode(x)
        return list(self._steps[0](self._padded(x)))

    def _decode(self, emb, n):
        if self._steps is None:
            return self.model.decode(emb, self.size)
        return self._steps[1](*emb)[:n]

    def _whole(self, x):
        if self._steps is None:
            return self.model(x)
        return self._steps[0](self._padded(x))[:x.shape[0]]

    # ---------------------------------------------------------------- per batch

    def _model_batches(self, x, slab):
        """(slab, first index, images, probabilities) per batch of x, in order; each consumed before the
        next is made (graph outputs are reused). With the decoders overlapped a batch's probabilities
        come out of the call that encodes the batch after it, so the first batch yielded may be the
        previous slab's last, and this slab's last stays held (self._held) for the next submit, or for
        _drain at the end."""
        clock, overlap = self.clock, self._overlap
        for b in range(0, x.shape[0], self.batch):
            xb = x[b:b + self.batch]
            t0 = clock.mark()
            if overlap is not None:
                if self._held is None:
                    overlap.first(self._padded(xb))
                    clock.span("encoder", t0, clock.mark())
                else:
                    p = overlap.next(self._padded(xb))
                    clock.span("model", t0, clock.mark())   # the batch before's decoders beside these encoders
                    yield (*self._held, p)
                self._held = (slab, b, xb.shape[0])
            elif self.split:
                emb = self._encode(xb)
                t1 = clock.mark()
                p = self._decode(emb, xb.shape[0])
                t2 = clock.mark()
                clock.span("encoder", t0, t1)
                clock.span("decoder", t1, t2)
                yield slab, b, xb.shape[0], p
            else:
                p = self._whole(xb)
                clock.span("model", t0, clock.mark())
                yield slab, b, xb.shape[0], p

    def _take_batch(self, slab: dict, b: int, n: int, p) -> None:
        """One batch's probabilities (n images from index b; a padded batch's extra rows cut off here)
        into its slab's labels (fused, resize mode), probabilities (fused tile mode) or list of them
        (step by step)."""
        xp, clock = self.xp, self.clock
        p = p[:n]
        expect = (n, len(self.ids), self.size, self.size)
        if tuple(p.shape) != expect:
            raise XctrtError(f"the model returned {tuple(p.shape)}, expected {expect}")
        if self.fused and self.tiled:
            slab["probs"][b:b + n] = p
        elif self.fused:   # straight from the graph's output, before the next batch reuses it
            t0 = clock.mark()
            self._aggregate_fused(p, slab["labels"][b:b + n], self.class_voxels)
            clock.span("aggregate", t0, clock.mark())
        else:
            slab["probs"].append(_to_xp(xp, p.float()).copy())

    def _end_slab(self, slab: dict) -> tuple:
        """A slab whose batches are all taken: its labels (aggregated here in tile mode and step by step)
        on their way to the host; the item for the components (or the host's download queue). On the
        compute stream, as the model work before it."""
        torch, xp, clock = self.torch, self.xp, self.clock
        labels, probs = slab["labels"], slab.pop("probs")
        if self.fused and self.tiled:
            t0 = clock.mark()
            self._aggregate_fused(probs, labels, self.class_voxels)
            clock.span("aggregate", t0, clock.mark())
        elif not self.fused:
            t0 = clock.mark()
            probs = probs[0] if len(probs) == 1 else xp.concatenate(probs)
            labels = self._aggregate_steps(probs, *slab["shape"])
            for v in {0, *self.ids.tolist()}:   # counts stay on the device: no host sync here
                self.class_voxels[v] += xp.count_nonzero(labels == v)
            clock.span("aggregate", t0, clock.mark())
        del probs
        labels = _to_xp(xp, labels)
        z0, host_slab, img = slab["z0"], slab["slab"], slab["img"]
        if not self.cuda:
            return z0, host_slab, labels, None, labels, img, None
        ready = clock.mark(self.compute)
        t0 = time.perf_counter()
        out = torch.empty(slab["shape"], dtype=torch.uint8, pin_memory=True)
        clock.record("pin", t0, time.perf_counter())   # a new pinned block holds up the other threads' launches
        with torch.cuda.stream(self.download):
            self.download.wait_event(ready)
            t0 = clock.mark(self.download)
            out.copy_(_to_torch(torch, labels), non_blocking=True)
            t1 = clock.mark(self.download)
        clock.span("d2h", t0, t1)
        copied = torch.cuda.Event()
        copied.record(self.download)
        return z0, host_slab, out, copied, labels, img, ready

    def _pass_on(self, items: list) -> list[tuple[int, np.ndarray, np.ndarray]]:
        """Ended slabs to the components (or the host's download queue); the slabs finished meanwhile."""
        if self.cuda:
            free, total = self.torch.cuda.mem_get_info()
            self.memory_used_max = max(self.memory_used_max, total - free)
        if self.host_components:
            self._downloading.extend(items)
            return self._downloaded()
        for item in items:
            self._hand_over(item)
        return self._collect()

    def _drain(self) -> list:
        """The held batch's decoders (the decoders overlapped: the last slab's last batch) and the end of
        its slab: [item], or [] when nothing is held."""
        if self._held is None:
            return []
        slab, b, n = self._held
        self._held = None
        torch, clock = self.torch, self.clock
        with torch.inference_mode(), (torch.cuda.stream(self.compute) if self.cuda else nullcontext()), \
                _xp_stream(self.xp, self.compute if self.cuda else None):
            t0 = clock.mark()
            p = self._overlap.last()
            clock.span("decoder", t0, clock.mark())
            self._take_batch(slab, b, n, p)
            return [self._end_slab(slab)]

    # ---------------------------------------------------------------- per slab

    def submit(self, z0: int, slab: np.ndarray, window) -> list[tuple[int, np.ndarray, np.ndarray]]:
        """Queue one slab (z, Y, X) host array; return the slabs finished meanwhile, in order."""
        torch, xp, clock = self.torch, self.xp, self.clock
        lo, hi = (float(w) for w in window)
        n, h, w = slab.shape
        ended = []
        with torch.inference_mode():
            if self.cuda:
                t0 = time.perf_counter()
                host = torch.from_numpy(_as_int16(np.ascontiguousarray(slab))).pin_memory()
                clock.record("pin", t0, time.perf_counter())
                with torch.cuda.stream(self.copy):
                    t0 = clock.mark(self.copy)
                    dev = host.to(self.device, non_blocking=True)
                    t1 = clock.mark(self.copy)
                clock.span("h2d", t0, t1)
                self.compute.wait_stream(self.copy)
                start = clock.mark(self.compute)
                if self._last_end is not None:
                    self.gaps.span("compute_idle", self._last_end, start)
                dev.record_stream(self.compute)     # read there and by the components: not reused before
                if not self.host_components:
                    dev.record_stream(self.postproc)
                ctx = torch.cuda.stream(self.compute)
            else:
                dev = np.ascontiguousarray(slab)
                ctx = nullcontext()
            with ctx, _xp_stream(xp, self.compute if self.cuda else None):
                img = _to_xp(xp, dev)
                if img.dtype != slab.dtype:
                    img = img.view(slab.dtype)
                t0 = clock.mark()
                src = dev if self.cuda else _to_torch(torch, _as_int16(dev))
                x = self._preprocess(src, img, lo, hi, self.fused)
                x = _to_torch(torch, x).reshape(x.shape[0], 1, self.size, self.size)
                t1 = clock.mark()
                clock.span("preprocess", t0, t1)
                this = {"z0": z0, "slab": slab, "img": img, "shape": (n, h, w), "probs": [],
                        "labels": torch.empty((n, h, w), dtype=torch.uint8, device=self.device) if self.fused
                        else None}
                if self.fused and self.tiled:   # a slice's tiles may span batches: all of the slab's, float32
                    this["probs"] = torch.empty((x.shape[0], len(self.ids), self.size, self.size), device=self.device)
                for part, b, nb, p in self._model_batches(x, this):
                    self._take_batch(part, b, nb, p)
                    if part is not this:   # the previous slab's last batch (decoders overlapped): it is complete
                        ended.append(self._end_slab(part))
                if self._held is None or self._held[0] is not this:
                    ended.append(self._end_slab(this))
                if self.cuda:
                    self._last_end = clock.mark(self.compute)
        return self._pass_on(ended)

    # ---------------------------------------------------------------- components on the host

    def _surface_search(self, air, runs, comp, n: int) -> np.ndarray:
        """The host table's distances to the part surface, searched where the GPU labeller searches
        them: the kd-tree of the outside air built on the host, one CUDA thread per defect run on the
        device (post.search_air_runs; NumPy: its host twin). The same bits as the labeller's own search."""
        t0 = time.perf_counter()
        tree = _core.air_tree(air, self.voxel_size)   # air: not empty (DefectCounter.finish)
        built_s = time.perf_counter() - t0
        with _xp_stream(self.xp, self.postproc if self.cuda else None):
            d, tree_s = post.surface_distances(self.xp, [tree], runs, comp, n, self.voxel_size)
        tree_s += built_s
        self._search_times = {"surface_distance": time.perf_counter() - t0, "surface_tree": tree_s,
                              "runs": {"outside_air": len(air), "defect": int(runs.shape[1])}}
        if self.cuda:   # after the stage gave its pool back (flush): the search's blocks too, for the next volume
            self.xp.get_default_memory_pool().free_all_blocks()
        return d

    def _downloaded(self, wait: bool = False) -> list[tuple[int, np.ndarray, np.ndarray]]:
        """The slabs whose labels have reached the host, in order, for the Segmenter's components thread.
        The oldest is waited for while more than two are on their way (or all, with wait): the model work
        of the newer ones is queued by then. Their device labels stay referenced until copied."""
        done = []
        while self._downloading:
            z0, slab, out, copied = self._downloading[0][:4]
            if copied is not None:
                if not (wait or len(self._downloading) > 2 or copied.query()):
                    break
                copied.synchronize()
            self._downloading.popleft()
            done.append((z0, slab, out.numpy() if copied is not None else np.asarray(out)))
        if done:
            self.clock.collect()   # the stage times of finished slabs (the labeller thread does this otherwise)
        return done

    # ---------------------------------------------------------------- components, on their own thread

    def _hand_over(self, item) -> None:
        """Queue a submitted slab (or None: no more) for the components thread."""
        if self._labeller_thread is None:
            self._labeller_thread = threading.Thread(target=self._label_slabs, name="xctrt-components",
                                                     daemon=True)
            self._labeller_thread.start()
        t0 = time.perf_counter()
        while True:
            self._raise_label_error()
            try:
                self._to_label.put(item, timeout=0.1)
                break
            except queue.Full:
                pass
        self.main_components_s += time.perf_counter() - t0

    def _label_slabs(self) -> None:
        """The components thread. When it falls behind, the slabs waiting for it are labelled in one
        call of at most LABEL_PLANES planes: each call costs kernel launches and host syncs that wait
        behind the model's kernels whatever its size (on an H200 a 32-plane slab took 0.05-0.16 s beside
        the encoder; 1000 planes alone, 0.48 s)."""
        torch, xp, clock = self.torch, self.xp, self.clock
        nothing = object()
        pending = nothing   # a slab taken from the queue that did not fit the last call (or the end, None)
        try:
            while True:
                item = self._to_label.get() if pending is nothing else pending
                pending = nothing
                if item is None:
                    return
                items, planes = [item], item[4].shape[0]
                limit = min(LABEL_PLANES, post.max_slab_planes(*item[4].shape[1:]))
                while True:
                    try:
                        nxt = self._to_label.get_nowait()
                    except queue.Empty:
                        break
                    if nxt is None or planes + nxt[4].shape[0] > limit:
                        pending = nxt
                        break
                    items.append(nxt)
                    planes += nxt[4].shape[0]
                with (torch.cuda.stream(self.postproc) if self.cuda else nullcontext()), \
                        _xp_stream(xp, self.postproc if self.cuda else None):
                    for it in items:
                        if it[6] is not None:
                            # the components wait for these slabs' labels only, never for later model work
                            self.postproc.wait_event(it[6])
                    t0 = clock.mark(self.postproc if self.cuda else None)
                    if len(items) == 1:
                        labels, img = item[4], item[5]
                    else:
                        labels = xp.concatenate([it[4] for it in items])
                        img = xp.concatenate([it[5] for it in items])
                    self.labeller.add_slab(labels, img)
                    clock.span("components", t0, clock.mark(self.postproc if self.cuda else None))
                self.label_calls.append(len(items))
                if self.cuda:
                    # CuPy's pool may hand labels/img memory to the compute stream once they are dropped below
                    self.postproc.synchronize()
                del labels, img
                for it in items:
                    z0, slab, out, copied = it[:4]
                    if self.cuda:
                        copied.synchronize()
                        out = out.numpy()
                    else:
                        out = np.asarray(out)
                    self._labelled.put((z0, slab, out))
                del item, items, it
                clock.collect()
        except BaseException as exc:   # handed to the main thread at its next submit or flush
            self._label_error = exc

    def _raise_label_error(self) -> None:
        if self._label_error is not None:
            raise self._label_error

    def _collect(self) -> list[tuple[int, np.ndarray, np.ndarray]]:
        """The slabs labelled so far, in order, without waiting."""
        self._raise_label_error()
        done = []
        while True:
            try:
                done.append(self._labelled.get_nowait())
            except queue.Empty:
                return done

    def close(self) -> None:
        """After a failed run: stop the components thread without labelling what still waits (it ends
        the call it is in), then the labeller's own threads; none of them outlives the run."""
        self._downloading.clear()
        self._held = None
        thread, self._labeller_thread = self._labeller_thread, None
        if thread is not None:
            while True:
                try:
                    self._to_label.get_nowait()
                except queue.Empty:
                    break
            self._to_label.put_nowait(None)   # room: the queue was just emptied, and only this thread puts
            thread.join()
        if self.labeller is not None:
            self.labeller.close()

    def flush(self) -> list[tuple[int, np.ndarray, np.ndarray]]:
        """Wait for the components of every submitted slab; return the slabs not yet handed back."""
        done = self._pass_on(self._drain())
        if self.host_components:   # their components come after, on the Segmenter's components thread
            done += self._downloaded(wait=True)
            self._release()
            return done
        if self._labeller_thread is None:
            return done
        self._hand_over(None)
        t0 = time.perf_counter()
        while self._labeller_thread.is_alive():
            self._labeller_thread.join(timeout=0.1)
        self._labeller_thread = None
        self.main_components_s += time.perf_counter() - t0
        return done + self._collect()

    def finish(self, min_voxels: int = 0, on_outside_air=None) -> dict:
        """The defect table (same columns and values as the C++ labeller's)."""
        if self.cuda:
            self.torch.cuda.synchronize()
        with _xp_stream(self.xp, self.postproc if self.cuda else None):   # timed by the pipeline ("table")
            table = self.labeller.finish(min_voxels=min_voxels, on_outside_air=on_outside_air)
        self._release()
        return table

    def _release(self) -> None:
        """Once every replay and download has finished: the graphs to the next stage, CuPy's pool emptied."""
        if self.cuda:
            self.torch.cuda.synchronize()
        if self._graph_entry is not None:   # every replay has finished: the next stage may use the graphs
            self._graph_entry["user"] = None
            self._graph_entry = None
        if self.cuda:
            # CuPy's pool keeps freed blocks per stream, and the next stage (the next volume) has new
            # streams: left cached, they would stay out of reach of its CuPy work and of torch's allocator
            pool = self.xp.get_default_memory_pool()
            self.cupy_pool_bytes = pool.total_bytes()
            pool.free_all_blocks()

    def host_class_voxels(self) -> np.ndarray:
        if self.fused:
            return self.class_voxels.cpu().numpy()
        return np.asarray(self.class_voxels.get() if self.cuda else self.class_voxels)

    def stage_seconds(self) -> dict[str, float]:
        return {**self.clock.finish(), **({"capture": self.capture_s} if self.capture_s else {})}

    def timeline(self) -> list[tuple[str, float, float]]:
        """The stage spans (host perf_counter seconds) of the device streams, or of the host where the
        stage runs on the CPU, the compute stream's idle spans between slabs ("compute_idle"), and the
        parts of the device labeller's table ("table outside air", "table merge", ...)."""
        self.clock.finish()
        self.gaps.finish()
        return self.clock.spans + self.gaps.spans + (list(self.labeller.table_spans) if self.labeller is not None else [])

    def table_surface(self) -> dict:
        """For summary.json's timing, the last table's distance-to-surface search: its seconds in all
        and before the search on the device (outside air to the host, kd-tree built there and sent
        back; with the device labeller also the outside air's own part, and the merge of the slabs'
        components and the table's columns before and after it), the outside-air runs (the tree) and
        defect runs (the searches) it worked on, and why it ran on the host if it did."""
        lb, why = self.labeller, post.air_search_error() if self.cuda else None
        if lb is None:   # components on the host: the search of their table, if it has run
            t = self._search_times
            if not t:
                return dict.fromkeys(TABLE_SURFACE_KEYS)
            return {"table_parts_s": {k: round(t[k], 4) for k in ("surface_distance", "surface_tree")},
                    "table_surface_runs": dict(t["runs"]), "gpu_surface_search_not_used_because": why,
                    "outside_air_detail": None}
        return {"table_parts_s": {"surface_distance": round(lb.surface_distance_s, 4),
                                  "surface_tree": round(lb.surface_tree_s, 4),
                                  "surface_outside_air": round(lb.outside_air_s, 4),
                                  "resolve_components": round(lb.resolve_s, 4),
                                  "table_columns": round(lb.columns_s, 4)},
                "table_surface_runs": dict(lb.surface_runs), "gpu_surface_search_not_used_because": why,
                "outside_air_detail": dict(lb.outside_air_detail)}

    @property
    def labeller_kernels_error(self) -> str | None:
        """Why the device labeller's per-voxel kernels ran on the host instead (None: on the GPU, or unused)."""
        return post.kernel_error(post.LABELLER) if self.cuda and self.labeller is not None else None

    def compute_idle_s(self) -> float | None:
        """Seconds the compute stream sat idle between slabs, waiting for the host to queue the next slab
        or for its copy to the device (None on the CPU)."""
        return self.gaps.finish().get("compute_idle", 0.0) if self.cuda else None


def _same_probabilities(pair, what: str, tol: float = 1e-2) -> None:
    """Raise unless the two probability tensors agree within tol: a graph that runs the same kernels in
    another order or on other streams must give what one after the other gives (a difference beyond a
    rounding means a missing dependency); checked once, when it is captured."""
    from .attention import close_to

    # probabilities are at most 1, so close_to's bound is tol itself
    close_to(*pair, tol, f"{what} gave other probabilities than one after the other")


def _xp_stream(xp, torch_stream):
    """Make CuPy queue its kernels on the given torch stream (no-op for NumPy)."""
    if torch_stream is None or xp is np:
        return nullcontext()
    return xp.cuda.ExternalStream(torch_stream.cuda_stream)


def _as_int16(a: np.ndarray) -> np.ndarray:
    """uint16 crosses to torch as int16 (same bytes): torch and DLPack handle int16 everywhere."""
    return a.view(np.int16) if a.dtype == np.uint16 else a


def _to_xp(xp, t):
    if isinstance(t, (np.ndarray, xp.ndarray)):   # already an array of xp (or of the host)
        return t
    return xp.from_dlpack(t) if xp is not np else t.numpy()


def _to_torch(torch, a):
    return torch.from_dlpack(a) if not isinstance(a, np.ndarray) else torch.from_numpy(np.ascontiguousarray(a))
