"""`xctrt bench --gpu`: one random-weight SAM network, three ways, on one generated volume.

  naive     segment-anything as users run it: eager float32, one image at a time, probabilities
            back to the host, resize/aggregate/components/write on the CPU (our C++ pipeline)
  compiled  the same network in bf16 with its encoders through torch.compile (mode configurable),
            batched, same host pipeline
  ours      bf16, fused relative-position attention, CUDA graphs, batched; window/resize,
            aggregate and 3D components on the GPU (xctrt.gpu.pipeline)

All three read the same TIFF and write the same outputs. The anchors run on a prefix of the
volume (they are slow; their rate is per slice all the same), ours on all of it. Ours is also
checked against the naive run on shared slices (probabilities and labels).

Thresholds: random decoders have no meaning, so each class's threshold is set from the naive
model's probabilities on the first slices such that the defect classes cover ~1 % of voxels and
material ~60 %, as on a real part; the components stage then sees blobs, not noise.
"""
from __future__ import annotations

import copy
import gc
import platform
import tempfile
import time
from pathlib import Path

import numpy as np

from ..errors import XctrtError
from ..model import ClassSpec, ModelPackage
from ..timing import stalled_spans

CLASSES = (("material", 1), ("pore", 2), ("inclusion", 3))
COVER = {"material": 0.60, "pore": 0.01, "inclusion": 0.01}   # target voxel fractions for the thresholds


def bench_package(size: int, thresholds, name: str) -> ModelPackage:
    """An in-memory package describing the random network (no graphs: the engine is given)."""
    return ModelPackage(path=Path(f"<{name}>"), manifest={"name": name, "trained": False},
                        classes=[ClassSpec(i, n, float(t)) for (n, i), t in zip(CLASSES, thresholds)],
                        graphs=[], aggregation="priority", priority=[2, 1, 0], input_size=size,
                        input_mode="resize", overlap=0, blend="constant", pad="edge",
                        window={"mode": "fixed", "low": 0.0, "high": 65535.0})


def synthetic_volume(path: Path, shape, seed: int = 0, device: str = "cuda", chunk: int = 50) -> None:
    """A uint16 XCT-like volume written as an uncompressed TIFF: a cylinder of material with spherical
    pores (dark) and inclusions (bright), noise on top. Made on the device, chunk by chunk."""
    import torch

    from ..io import write_volume_tiff

    z, y, x = shape
    g = torch.Generator(device="cpu").manual_seed(seed)
    n = max(8, z * y * x // 4_000_000)
    centres = torch.rand(n, 3, generator=g) * torch.tensor([z, y, x])
    radii = 2 + torch.rand(n, generator=g) * 6
    kinds = torch.rand(n, generator=g) < 0.8          # 80 % pores, 20 % inclusions
    yy, xx = torch.meshgrid(torch.arange(y, device=device), torch.arange(x, device=device), indexing="ij")
    inside = ((yy - y / 2) ** 2 + (xx - x / 2) ** 2) < (0.42 * min(y, x)) ** 2

    def pages():
        for z0 in range(0, z, chunk):
            z1 = min(z, z0 + chunk)
            v = torch.where(inside, 30000.0, 6000.0).expand(z1 - z0, y, x).clone()
            zz = torch.arange(z0, z1, device=device).view(-1, 1, 1)
            for c, r, pore in zip(centres.tolist(), radii.tolist(), kinds.tolist()):
                if c[0] + r < z0 or c[0] - r >= z1:
                    continue
                d2 = (zz - c[0]) ** 2 + (yy - c[1]) ** 2 + (xx - c[2]) ** 2
                v[d2 < r * r] = 12000.0 if pore else 55000.0
            v += torch.randn(v.shape, device=device, generator=torch.Generator(device=device).manual_seed(seed + z0)) * 1500
            yield from v.clamp_(0, 65535).to(torch.int32).cpu().numpy().astype(np.uint16)

    write_volume_tiff(path, pages(), shape, np.uint16, None, compression=None)


def matmul_peak(torch, n: int = 8192, reps: int = 10) -> float:
    """Measured bf16 matrix-product rate (TFLOP/s) on random data: the % of peak below uses it."""
    a = torch.randn(n, n, device="cuda", dtype=torch.bfloat16)
    b = torch.randn(n, n, device="cuda", dtype=torch.bfloat16)
    return 2 * n ** 3 / time_cuda(torch, lambda: a @ b, reps=reps, warmup=3) / 1e12


def time_cuda(torch, fn, reps: int = 10, warmup: int = 3) -> float:
    """Median seconds of fn() by CUDA events."""
    for _ in range(warmup):
        fn()
    times = []
    for _ in range(reps):
        s, e = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
        s.record()
        fn()
        e.record()
        e.synchronize()
        times.append(s.elapsed_time(e) / 1000)
    return float(np.median(times))


def check_attention(torch, device) -> dict:
    """Fused kernel vs float32 reference on fresh random ViT-B-shaped inputs; 'triton' if it passes."""
    from . import attention as A

    out = {}
    for hw, b in (((64, 64), 2), ((14, 14), 8)):
        n, d, nh = hw[0] * hw[1], 64, 12
        # views of one projection, as the encoder passes them
        q, k, v = torch.randn(b, n, 3, nh, d, device=device, dtype=torch.bfloat16).permute(2, 0, 3, 1, 4).unbind(0)
        ph, pw = (0.3 * torch.randn(2 * s - 1, d, device=device, dtype=torch.bfloat16) for s in hw)
        ref = A.attention(q.float(), k.float(), v.float(), ph.float(), pw.float(), hw, d ** -0.5, impl="reference")
        for impl in ("triton", "sdpa"):
            try:
                # triton at its default launch: the launch tuning belongs to the encoder's first call,
                # at the real batch
                launch = A.default_config(hw, d) if impl == "triton" else {}
                o = A.attention(q, k, v, ph, pw, hw, d ** -0.5, impl=impl, **launch).float()
                err = float((o - ref).norm() / ref.norm())
                out[f"{impl} {hw[0]}x{hw[1]}"] = err
            except Exception as exc:     # report, then fall back
                out[f"{impl} {hw[0]}x{hw[1]}"] = f"{type(exc).__name__}: {exc}"[:300]
    ok = all(isinstance(out[f"triton {s}"], float) and out[f"triton {s}"] < 2e-2 for s in ("64x64", "14x14"))
    out["chosen"] = "triton" if ok else "sdpa"
    return out


def profile_encoder(torch, net, x, top: int = 30) -> list[dict]:
    """Where the encoders' time goes: kernels (CUDA) or operators (CPU) of one forward, by total time."""
    return profile_call(torch, lambda: net.encode(x), x.is_cuda, top)


def _profiled(torch, fn, cuda: bool, operators: bool = False):
    """torch.profiler's record of one fn() call after two warm-up calls: the device's kernels (CUDA) or
    the operators (CPU); with `operators` the operators and their input shapes on CUDA too."""
    from torch.profiler import ProfilerActivity, profile

    acts = [ProfilerActivity.CPU] * (operators or not cuda) + [ProfilerActivity.CUDA] * cuda
    with torch.inference_mode():
        for _ in range(2):
            fn()
        if cuda:
            torch.cuda.synchronize()
        with profile(activities=acts, record_shapes=operators) as prof:
            fn()
            if cuda:
                torch.cuda.synchronize()
    return prof


def profile_call(torch, fn, cuda: bool, top: int = 30) -> list[dict]:
    """Kernels (CUDA) or operators (CPU) of one fn() call by total time, after two warm-up calls."""
    prof = _profiled(torch, fn, cuda)
    attr = ("device_time_total", "cuda_time_total") if cuda else ("cpu_time_total",)
    rows = []
    for e in prof.key_averages():
        t = next((getattr(e, a) for a in attr if hasattr(e, a)), 0.0)
        if t > 0:
            rows.append({"name": e.key, "ms": t / 1000.0, "calls": int(e.count)})
    return sorted(rows, key=lambda r: -r["ms"])[:top]


def profile_ops(torch, fn, cuda: bool, top: int = 20) -> list[dict]:
    """The operators of one fn() call with their input shapes, by the device time of the kernels each
    launched itself (CPU time on the CPU), after two warm-up calls: which call of a kernel name costs what
    (profile_call sums a name over all its shapes: one layer_norm kernel serves rows of 5 tokens and of
    131,072 pixels alike)."""
    prof = _profiled(torch, fn, cuda, operators=True)
    attr = ("self_device_time_total", "self_cuda_time_total") if cuda else ("self_cpu_time_total",)
    rows = []
    for e in prof.key_averages(group_by_input_shape=True):
        t = next((getattr(e, a) for a in attr if hasattr(e, a)), 0.0)
        if t > 0 and not e.key.startswith("Memcpy") and not e.key.startswith("Memset"):
            rows.append({"op": e.key, "shapes": str(e.input_shapes)[:160], "ms": t / 1000.0, "calls": int(e.count)})
    return sorted(rows, key=lambda r: -r["ms"])[:top]


def fast_net(net, attention_impl: str, xb, dtype):
    """(our fast copy of `net` in `dtype`, {part: error} left out). Each part of accelerate() must run one
    batch here: a part that fails on this machine (a kernel its toolchain will not build, say) is left
    out and named, so that one GPU session still measures the rest."""
    import torch

    from .sam import FAST_PARTS, accelerate

    def forward(parts):
        fast = accelerate(copy.deepcopy(net), attention_impl, parts).cast_weights(dtype)
        with torch.inference_mode():
            fast(xb)
        return fast

    try:
        return forward(FAST_PARTS), {}
    except Exception:   # noqa: BLE001 - find which part fails, each on its own
        if xb.is_cuda:   # unless the fault broke the CUDA context: then this raises the real error
            torch.cuda.synchronize()
    dropped = {}
    for part in FAST_PARTS:
        try:
            forward((part,))
        except Exception as exc:   # noqa: BLE001
            dropped[part] = f"{type(exc).__name__}: {exc}"[:300]
    if not dropped:   # every part alone runs, all together do not: report it rather than guess
        forward(FAST_PARTS)
    return forward(tuple(p for p in FAST_PARTS if p not in dropped)), dropped


def compiled_anchor(net, compile_mode: str, dtype):
    """The torch.compile anchor: a copy of segment-anything's ClassNet in `dtype` with its encoders
    through torch.compile(mode=compile_mode), as the published anchor does (the decoders are ~1 % of
    the work and would add their own autotuning); the batch is fixed: no symbolic shapes.
    benchmarks/compile_warm.py builds the same, to fill the compile cache ahead of a timed run."""
    import torch

    comp_net = copy.deepcopy(net).cast_weights(dtype)
    for m in comp_net.models:
        m.image_encoder = torch.compile(m.image_encoder, mode=compile_mode, dynamic=False)
    return comp_net


# NVIDIA's datasheet bf16 tensor-core peaks without sparsity (half the "with sparsity" figures), TFLOP/s,
# by device name (the first entry the name contains). The "% of bf16 peak" follows the measured
# rate (matmul_peak, ~780 on an H200); the datasheet figure is reported beside it.
DATASHEET_BF16_DENSE_TFLOPS = (("H200 NVL", 835.5), ("H200", 989.5), ("H100 NVL", 835.5), ("H100 PCIe", 756.5),
                               ("H100", 989.5))


def datasheet_bf16_peak(device_name: str) -> float | None:
    return next((v for k, v in DATASHEET_BF16_DENSE_TFLOPS if k in device_name), None)


def _stage_row(summary: dict) -> dict:
    t = summary["timing"]
    return {"slices": summary["input"]["shape"][0], "total_s": t["total_s"], "slices_per_s": t["slices_per_s"],
            "stage_busy_s": t["stage_busy_s"], "main_thread_s": t["main_thread_s"],
            "gpu_compute_idle_s": t["gpu_compute_idle_s"], "table_parts_s": t.get("table_parts_s"),
            "table_surface_runs": t.get("table_surface_runs"), "gpu_labeller_calls": t.get("gpu_labeller_calls"),
            "outside_air_detail": t.get("outside_air_detail"), "garbage_collector": t.get("garbage_collector"),
            "decoder_overlap": t.get("decoder_overlap"), "decoder_heads": t.get("decoder_heads"),
            "pinned_host": t.get("pinned_host"),
            # spans held up far past their kind's median (a process-wide stall shows in every thread's)
            "stalls": stalled_spans(summary["timeline"]) if summary.get("timeline") else None,
            "timeline": summary.get("timeline")}


def profile_labeller(torch, labels_path: Path, volume_path: Path, planes: int, slab: int, cuda: bool,
                     top: int = 30) -> dict:
    """Where the device labeller's time goes on a run's own labels, alone on the device: the first `planes`
    planes of its labels.tif and of the volume, added in slabs of `slab` planes, then finish(). Each
    add_slab and the finish timed (device synced after each, best of three passes), and the kernels of one
    more pass by total device time (profile_call); on the GPU the add_slab times again with CuPy's own air
    labelling (post.AIR_LABEL = "cupyx") in place of the labeller's kernels. Wall time well above the
    kernels' sum: the labeller waits on the host (syncs, launches), not on the device. On the host
    (NumPy) the times only: no kernels."""
    from ..defects import DEFECT_CLASSES
    from ..io import open_volume
    from . import post

    xp = np
    if cuda:
        import cupy as xp
    parts = []
    for path in (labels_path, volume_path):
        src = open_volume(path)
        try:
            parts.append(src.read(0, min(planes, src.shape[0])))
        finally:
            src.close()
    labels, grey = parts
    slabs = [(xp.asarray(labels[z:z + slab]), xp.asarray(grey[z:z + slab])) for z in range(0, len(labels), slab)]

    def sync():
        if cuda:
            torch.cuda.synchronize()   # the whole device: CuPy's stream too

    def one_pass() -> list[float]:
        sync()
        t = [time.perf_counter()]
        lb = post.ComponentLabeller(labels.shape, tuple(DEFECT_CLASSES))
        for lab, img in slabs:
            lb.add_slab(lab, img)
            sync()
            t.append(time.perf_counter())
        lb.finish(1)
        sync()
        t.append(time.perf_counter())
        return list(np.diff(t))

    def best_of_3() -> np.ndarray:
        return np.array([one_pass() for _ in range(3)]).min(axis=0)

    times = best_of_3()
    out = {"planes": len(labels), "slab": slab, "add_slab_s": [round(float(v), 4) for v in times[:-1]],
           "finish_s": round(float(times[-1]), 4), "kernels": profile_call(torch, one_pass, cuda, top) if cuda else []}
    if cuda:   # the same with CuPy's own air labelling in place of the labeller's kernels
        before, post.AIR_LABEL = post.AIR_LABEL, "cupyx"
        try:
            out["add_slab_s_cupyx_air_label"] = [round(float(v), 4) for v in best_of_3()[:-1]]
        finally:
            post.AIR_LABEL = before
    return out


def run(shape=(1000, 1200, 1200), backbone: str = "vit_b", modes=("paper", "shared"), batch: int = 8,
        slab: int = 32, naive_slices: int = 16, compiled_slices: int = 96, compile_mode: str | None = "max-autotune",
        attention_impl: str = "auto", volume: str | None = None, work: str | None = None,
        device: str = "cuda", seed: int = 0, compile_ours: str | None = None, profile: bool = False,
        components=("device", "host"), log=print, on_mode=None) -> dict:
    """on_mode(res), if given, is called with the results so far after each mode, so a run stopped
    by a time limit keeps the modes it finished. components: where ours labels the 3D components, one
    timed run each on the same volume: the first is "ours", the others "ours-host" or "ours-device"."""
    import torch

    from .. import _core
    from ..backends import TorchModuleEngine
    from ..pipeline import Segmenter
    from .sam import GraphedStep, build_random_class_net, encoder_flops

    cuda = device == "cuda"
    if cuda and not torch.cuda.is_available():
        raise XctrtError("xctrt bench --gpu needs a CUDA device; torch sees none")
    gpu_device = "cuda" if cuda else "host-arrays"
    tmp = Path(work or tempfile.mkdtemp(prefix="xctrt-gpu-bench-"))
    tmp.mkdir(parents=True, exist_ok=True)
    res: dict = {"date": time.strftime("%Y-%m-%d %H:%M:%S UTC", time.gmtime()), "host": platform.node(),
                 "device": torch.cuda.get_device_name() if cuda else "cpu", "torch": torch.__version__,
                 "shape": list(shape), "backbone": backbone, "batch": batch, "slab": slab, "compile_ours": compile_ours,
                 "compile_mode": compile_mode, "components": list(components), "modes": {}}
    if cuda:
        res["matmul_bf16_tflops"] = matmul_peak(torch)
        log(f"bf16 matmul peak (measured): {res['matmul_bf16_tflops']:.0f} TFLOP/s")
        res["attention_check"] = check_attention(torch, device)
        chosen = res["attention_check"]["chosen"] if attention_impl == "auto" else attention_impl
        log(f"attention check: {res['attention_check']}")
    else:
        chosen = "sdpa" if attention_impl == "auto" else attention_impl
    res["attention_impl"] = chosen
    vol = Path(volume) if volume else tmp / "volume.tif"
    if not vol.exists():
        t0 = time.perf_counter()
        synthetic_volume(vol, shape, seed, device=device)
        res["volume_write_s"] = time.perf_counter() - t0
        log(f"volume {shape} written in {res['volume_write_s']:.1f} s")
    from ..io import open_volume
    src = open_volume(vol)
    try:
        shape = src.shape
        head = src.read(0, min(shape[0], max(naive_slices, compiled_slices if compile_mode else 0, 2 * slab + 1, 4)))
    finally:
        src.close()

    for mode in modes:
        r: dict = {}
        res["modes"][mode] = r
        net = build_random_class_net(backbone, len(CLASSES), mode, seed=seed, device=device)
        size = net.image_size
        r["encoder_tflop_per_image"] = encoder_flops(net.models[0]) / 1e12
        r["encoder_passes_per_slice"] = len(net.models)
        # thresholds from the naive model's probabilities on the first slices (see the module notes)
        naive = TorchModuleEngine(net, device=device, batch=1, name="naive-fp32-eager")
        lo, hi = 0.0, 65535.0
        x = np.stack([_core.resize_bilinear(_core.window(s, lo, hi), size, size) for s in head[:4]])[:, None]
        xb = torch.from_numpy(np.repeat(x[:1], batch, 0)).to(device)   # one batch for the timings below
        p = naive.run(x)
        thr = [float(np.quantile(p[:, i], 1 - COVER[n])) for i, (n, _) in enumerate(CLASSES)]
        r["thresholds"] = thr
        pkg = bench_package(size, thr, f"random-{backbone}-{mode}")
        common = dict(batch_size=batch, slab=slab, progress=False, window=(lo, hi))

        # naive anchor
        seg = Segmenter(pkg, engine=naive, **common)
        s = seg.segment(head[:naive_slices], out_dir=tmp / f"naive-{mode}", keep_labels=True)
        r["naive"] = _stage_row(s.summary)
        naive_labels = s.labels
        log(f"[{mode}] naive: {r['naive']['slices_per_s']:.2f} slices/s")
        if cuda:
            with torch.inference_mode():
                r["naive"]["model_s_per_image"] = time_cuda(torch, lambda: net(xb[:1]), reps=5, warmup=2)
                r["naive"]["encoder_s_per_image"] = time_cuda(torch, lambda: net.encode(xb[:1]), reps=5, warmup=2)

        # ours
        fast, dropped = fast_net(net, chosen, xb, torch.bfloat16 if cuda else torch.float32)
        if dropped:
            r["fast_parts_dropped"] = dropped
            log(f"[{mode}] left out of the fast forward, failing here: {dropped}")
        if compile_ours:   # fuses the encoders' pointwise work around the fused attention; compiled by the
            for m in fast.models:   # agreement run below, before the timed one
                m.image_encoder = torch.compile(m.image_encoder, mode=compile_ours, dynamic=False)
        if profile:
            r["ours_profile"] = profile_encoder(torch, fast, xb)
            log(f"[{mode}] ours encoder, top kernels (one batch of {batch}, "
                f"{'torch.compile ' + compile_ours if compile_ours else 'eager'}):")
            for row in r["ours_profile"][:12]:
                log(f"    {row['ms']:8.3f} ms  {row['calls']:5d}x  {row['name'][:90]}")
        eng = TorchModuleEngine(fast, device=device, name=f"xctrt-gpu-{chosen}")
        # same slices as the naive run: labels agreement (bf16 vs float32). The peak counts from here: this
        # run captures the CUDA graphs, whose working memory the timed run's replays reuse unseen; the naive
        # float32 network is not ours, so it leaves the device first (the compiled anchor takes it back)
        if cuda:
            net.cpu()
            gc.collect()
            torch.cuda.empty_cache()
            torch.cuda.reset_peak_memory_stats()
        seg = Segmenter(pkg, engine=eng, device=gpu_device, **common)
        s = seg.segment(head[:naive_slices], keep_labels=True)
        agreement = float((s.labels == naive_labels).mean())
        # one-time start-up of this engine in a process (warm-up, first kernel compiles, tuning, graph
        # capture), paid by this first run; the timed run below reuses the captured graphs, as a plant
        # pipeline segmenting volume after volume does (the compiled anchor's compile is left out too)
        first_capture_s = s.summary["timing"]["stage_busy_s"].get("capture")
        # That run's slices fit one slab: the device labeller's kernels that join components across slabs
        # and the surface search's build compile on their first use (CuPy keeps them on disk, so a machine
        # pays it once). An untimed run over two slabs and a slice pays it here, as a pipeline's first
        # volume would; on 2026-11-27 a fresh H200 lost 4.6 s of a timed run to it (RESULTS.md).
        t0 = time.perf_counter()
        seg = Segmenter(pkg, engine=eng, device=gpu_device, **common)
        seg.segment(head[:2 * slab + 1], out_dir=tmp / f"warm-up-{mode}", keep_labels=False)
        warm_up_s = time.perf_counter() - t0
        for i, where in enumerate(components):
            run_name = "ours" if i == 0 else f"ours-{where}"
            t0 = time.perf_counter()
            seg = Segmenter(pkg, engine=eng, device=gpu_device, components=where, **common)
            s = seg.segment(vol, out_dir=tmp / f"{run_name}-{mode}", keep_labels=False)
            o = r[run_name] = _stage_row(s.summary)
            o["components"] = where
            o["wall_s_with_setup"] = time.perf_counter() - t0
            o["first_run_capture_s"] = first_capture_s
            o["warm_up_run_s"] = warm_up_s   # the untimed run over two slabs above (kernel compiles, if any)
            o["defects"] = {k: v["count"] for k, v in s.summary["result"]["defects"].items()}
            for k in ("gpu_memory_used_max_gib", "cuda_graphs_not_used_because", "fused_kernels_not_used_because",
                      "gpu_labeller_kernels_not_used_because", "gpu_surface_search_not_used_because"):
                o[k] = s.summary["timing"][k]
            if cuda:
                o["torch_peak_gib"] = torch.cuda.max_memory_allocated() / 2 ** 30
                o["torch_reserved_peak_gib"] = torch.cuda.max_memory_reserved() / 2 ** 30
                o["cupy_pool_gib"] = s.summary["timing"]["gpu_cupy_pool_gib"]   # at the run's end
            if i:   # the same volume and model: the same defects, wherever they were counted
                o["same_defects_as_ours"] = o["defects"] == r["ours"]["defects"]
            log(f"[{mode}] {run_name} (components on the {where}): {o['slices_per_s']:.1f} slices/s end to end, "
                f"stages { {k: round(v, 2) for k, v in o['stage_busy_s'].items()} }")
            s = None
        if profile and components[0] == "device":   # the labeller alone on ours' labels: kernels, host waits
            lp = r["ours"]["labeller_profile"] = profile_labeller(
                torch, tmp / f"ours-{mode}" / "labels.tif", vol, 3 * slab, slab, cuda)
            log(f"[{mode}] device labeller alone, {lp['planes']} planes of ours' labels: add_slab "
                f"{lp['add_slab_s']} s"
                + (f" (with CuPy's air labelling {lp['add_slab_s_cupyx_air_label']} s)" if lp.get(
                    "add_slab_s_cupyx_air_label") else "")
                + f", finish {lp['finish_s']} s" + ("; top kernels:" if lp["kernels"] else ""))
            for row in lp["kernels"][:10]:
                log(f"    {row['ms']:8.3f} ms  {row['calls']:5d}x  {row['name'][:90]}")
        r["ours"]["label_agreement_vs_naive"] = agreement
        with torch.inference_mode():   # in batches of the run's size: a compiled encoder (dynamic=False)
            xt = torch.from_numpy(x).to(device)   # would compile again for any other batch size
            xt = torch.cat([xt, xt.new_zeros(((-len(x)) % batch,) + xt.shape[1:])])
            pf = torch.cat([fast(c) for c in xt.split(batch)])[:len(x)].float().cpu().numpy()
        r["ours"]["prob_max_abs_diff_vs_naive"] = float(np.abs(pf - p).max())
        r["ours"]["prob_mean_abs_diff_vs_naive"] = float(np.abs(pf - p).mean())
        if cuda:
            with torch.inference_mode():
                enc = GraphedStep(lambda t: tuple(fast.encode(t)), xb)
                dt = time_cuda(torch, lambda: enc(xb), reps=10)
            passes = len(fast.models)
            r["ours"]["encoder_s_per_image"] = dt / batch
            tflops = r["encoder_tflop_per_image"] * passes * batch / dt
            r["ours"]["encoder_tflops"] = tflops
            r["ours"]["encoder_percent_of_peak"] = 100 * tflops / res["matmul_bf16_tflops"]
            sheet = datasheet_bf16_peak(res["device"])
            r["ours"]["encoder_percent_of_datasheet_peak"] = 100 * tflops / sheet if sheet else None
            log(f"[{mode}] ours encoder: {batch * passes / dt:.0f} img/s, {tflops:.0f} TFLOP/s "
                f"({r['ours']['encoder_percent_of_peak']:.0f}% of measured peak)")
            enc = None
        fast = eng = seg = None   # free the device memory before the next run

        # compiled anchor (last: its compile time is the least predictable)
        if compile_mode and mode == modes[0]:
            net.to(device)
            comp_net = compiled_anchor(net, compile_mode, torch.bfloat16 if cuda else torch.float32)
            eng = TorchModuleEngine(comp_net, device=device, batch=batch, name=f"compiled-{compile_mode}")
            t0 = time.perf_counter()
            with torch.inference_mode():
                comp_net(xb)
                if cuda:
                    torch.cuda.synchronize()
            r["compiled_compile_s"] = time.perf_counter() - t0
            seg = Segmenter(pkg, engine=eng, **common)
            s = seg.segment(head[:compiled_slices], out_dir=tmp / f"compiled-{mode}", keep_labels=False)
            r["compiled"] = _stage_row(s.summary)
            if cuda:
                with torch.inference_mode():
                    r["compiled"]["model_s_per_image"] = time_cuda(torch, lambda: comp_net(xb), reps=5) / batch
            log(f"[{mode}] compiled ({compile_mode}): {r['compiled']['slices_per_s']:.1f} slices/s, "
                f"compile {r['compiled_compile_s']:.0f} s")
            comp_net = eng = seg = None
        net = naive = xb = None
        if chosen == "triton":   # the attention launches the first calls chose (tuned per shape on CUDA)
            from .attention import qkv_layout_choices, tuned_choices
            res["attention_launches"] = tuned_choices()
            res["attention_qkv_layouts"] = qkv_layout_choices()
        if cuda:   # give both pools back, so the next mode's memory figures are its own
            gc.collect()   # a finished GPU stage and its counter hold each other (and the model and its graphs)
            torch.cuda.empty_cache()
            import cupy
            cupy.get_default_memory_pool().free_all_blocks()
        if on_mode is not None:
            on_mode(res)
    return res


def comparisons(res: dict):
    """(mode, run, record, × naive, × compiled or None) for every run in a result, in table order."""
    for mode, r in res["modes"].items():
        naive = r["naive"]["slices_per_s"]
        comp = r.get("compiled", {}).get("slices_per_s")
        for run in ("naive", "compiled", "ours", "ours-host", "ours-device"):
            if run in r:
                v = r[run]["slices_per_s"]
                yield mode, run, r[run], v / naive, (v / comp if comp else None)


def table(res: dict) -> str:
    """The short summary printed last."""
    rows = [f"{res['device']}  {res['date']}  volume {res['shape']}  {res['backbone']}  batch {res['batch']}  "
            f"attention {res['attention_impl']}"]
    rows.append(f"{'mode':<8}{'run':<10}{'slices/s':>10}{'x naive':>9}{'x compiled':>11}{'enc TFLOP/s':>12}{'% peak':>8}")
    for mode, run, x, x_naive, x_comp in comparisons(res):
        rows.append(f"{mode:<8}{run:<10}{x['slices_per_s']:>10.1f}{x_naive:>9.1f}"
                    f"{(x_comp if x_comp is not None else float('nan')):>11.2f}"
                    f"{x.get('encoder_tflops', float('nan')):>12.0f}"
                    f"{x.get('encoder_percent_of_peak', float('nan')):>8.0f}")
    return "\n".join(rows)


def main(args) -> int:
    from ..io import commit_json, output_file
    from ..pipeline import default_batch_size
    if args.json:
        output_file(args.json)   # a bad --json fails before the benchmark
    save = (lambda res: commit_json(output_file(args.json), res)) if args.json else None
    batch = args.batch_size or default_batch_size("cuda")   # the GPU path's default, kept in one place
    res = run(shape=tuple(args.shape), backbone=args.backbone, modes=tuple(args.modes), batch=batch,
              slab=args.slab, naive_slices=args.naive_slices, compiled_slices=args.compiled_slices,
              compile_mode=None if args.compile_mode == "none" else args.compile_mode,
              attention_impl=args.attention, volume=args.volume, work=args.work,
              device="cuda" if not args.host_arrays else "cpu",
              compile_ours=None if args.compile_ours == "none" else args.compile_ours, profile=args.profile,
              components=(args.components,) if args.components else ("device", "host"), on_mode=save)
    print(table(res))
    return 0
