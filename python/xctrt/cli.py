"""Command line: xctrt segment | info | bench | phantom | simulate | evaluate | domain-shift."""
from __future__ import annotations

import argparse
import math
import os
import signal
import sys
import tempfile
import threading
import time
from pathlib import Path

from . import __version__
from .errors import XctrtError

STAGES = ("read", "tile", "infer", "stitch", "aggregate", "components", "write", "table")


def _int_from(least: int):
    """argparse type: an integer >= least (argparse turns the ValueError into one usage line)."""
    def parse(text: str) -> int:
        v = int(text)
        if v < least:
            raise argparse.ArgumentTypeError(f"must be an integer >= {least}, got {text}")
        return v
    parse.__name__ = f"integer >= {least}"
    return parse


def _finite(text: str) -> float:
    try:
        v = float(text)
    except ValueError:
        v = math.nan
    if not math.isfinite(v):
        raise argparse.ArgumentTypeError(f"must be a finite number, got {text}")
    return v


def _mm(text: str) -> float:
    """argparse type: one voxel side in mm, within the defect table's limits (cpp/crofton.hpp)."""
    from . import _core
    try:
        v = float(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"must be a number (mm), got {text}") from None
    try:
        _core.check_voxel_size((v, v, v))
    except ValueError as exc:
        raise argparse.ArgumentTypeError(f"{text}: {exc}") from None
    return v


COUNT, NONNEGATIVE = _int_from(1), _int_from(0)


def _voxel_size(values):
    if values is None:
        return None
    if len(values) == 1:
        return (values[0],) * 3
    if len(values) == 3:
        return tuple(values)
    raise XctrtError("--voxel-size takes one value (isotropic) or three (DZ DY DX), in mm")


def _add_run_options(p: argparse.ArgumentParser) -> None:
    p.add_argument("-m", "--model", default="default",
                   help="model package folder or .zip, or the name of an embedded one (default: %(default)s)")
    p.add_argument("--backend", default="auto", choices=["auto", "onnxruntime", "torch", "tensorrt"],
                   help="inference engine; auto = TensorRT when installed with a GPU, else ONNX Runtime")
    p.add_argument("--batch-size", type=COUNT, default=None,
                   help="tiles per engine call (default: 8 when the model runs on a GPU; on a CPU half the "
                        "inference threads, 1 to 8)")
    p.add_argument("--threads", type=NONNEGATIVE, default=0,
                   help="CPU threads for inference and kernels (0 or more than this process may use = all)")
    p.add_argument("--slab", type=COUNT, default=8, help="slices read and processed together (default: %(default)s)")
    p.add_argument("--window", type=_finite, nargs=2, metavar=("LO", "HI"),
                   help="grey values mapped to 0 and 1 (default: from the model: fixed or volume percentiles)")
    p.add_argument("--connectivity", type=int, default=26, choices=[6, 18, 26],
                   help="3D neighbourhood joining defect voxels (default: %(default)s)")
    p.add_argument("--min-voxels", type=NONNEGATIVE, default=1,
                   help="drop defects smaller than this many voxels from the table (porosity still counts every "
                        "pore voxel) (default: %(default)s)")
    p.add_argument("--device", default="cpu", choices=["cpu", "cuda"],
                   help="cpu: C++ stages on the host around the engine; cuda: model (torch) and every stage on "
                        "the GPU (default: %(default)s)")
    p.add_argument("--components", choices=["device", "host"],
                   help="with --device cuda: label the 3D defects on the GPU (device, the default there) or with "
                        "the C++ labeller on the host (host), leaving the GPU to the model; the same table either "
                        "way (with bench --gpu: time only this one; default: both)")
    p.add_argument("--precision", default="fp32", choices=["fp32", "bf16"],
                   help="bf16: the torch backend's matrix products and convolutions in bfloat16 (about half the "
                        "time on a GPU; probabilities differ by about 1e-2, so a few labels may too) "
                        "(default: %(default)s)")
    p.add_argument("--fill-enclosed-air", action="store_true",
                   help="relabel air the part encloses (not reaching the view's y/x sides) as material, in "
                        "labels.tif and the summary: on the released real test sets that air is mostly material "
                        "the model missed (benchmarks/RESULTS.md); a real closed cavity would be filled too")
    p.add_argument("--no-progress", action="store_true", help="no progress bar")


def _segmenter(args):
    from .pipeline import Segmenter
    return Segmenter(args.model, backend=args.backend, batch_size=args.batch_size, threads=args.threads,
                     connectivity=args.connectivity, min_voxels=args.min_voxels, slab=args.slab,
                     window=args.window, progress=not args.no_progress, device=args.device,
                     precision=args.precision, fill_enclosed_air=args.fill_enclosed_air,
                     components=args.components)


def cmd_segment(args) -> int:
    seg = _segmenter(args)
    res = seg.segment(args.volume, out_dir=args.output, voxel_size=_voxel_size(args.voxel_size))
    r = res.summary["result"]
    unit = r["unit"]
    print(f"{args.volume}: {res.summary['input']['shape']} in {res.summary['timing']['total_s']:.1f} s "
          f"({res.summary['timing']['slices_per_s']:.2f} slices/s, {seg.engine.name} on {seg.engine.device})")
    print(f"  porosity {r['porosity_percent']:.3f}% of the part; "
          + ", ".join(f"{n} {d['count']}" for n, d in r["defects"].items())
          + f" defects (sizes in {unit})")
    if r["enclosed_air_filled_voxels"]:
        print(f"  air enclosed by the part: {r['enclosed_air_filled_voxels']} voxels relabelled material "
              "(--fill-enclosed-air)")
    if r["enclosed_air_voxels"]:
        print(f"  air enclosed by the part: {r['enclosed_air_volume']:.4g} {unit}3 ({r['enclosed_air_voxels']} voxels; "
              "in neither porosity nor part; magenta in preview.png where it crosses the mid-planes)")
    near = [f"{n} {d[f'surface_distance_{unit}']['min']:.4g} {unit}" for n, d in r["defects"].items()
            if f"surface_distance_{unit}" in d]
    if near:
        print("  closest to the part surface: " + ", ".join(near))
    if unit != "mm":
        print(f"  note: voxel size {res.summary['input']['voxel_size_from']}; give it with --voxel-size")
    if not seg.package.trained:
        print("  note: the model is UNTRAINED (random weights); these labels mean nothing")
    for line in gpu_fallback_notes(res.summary):
        print(f"  note: {line}")
    for name, path in res.outputs.items():
        print(f"  wrote {path}")
    return 0


def gpu_fallback_notes(summary: dict) -> list[str]:
    """What the GPU path ran more slowly than it could, and why (from summary.json's timing)."""
    t = summary.get("timing", {})
    notes = {"cuda_graphs_not_used_because": "the model ran without CUDA graphs (slower): {}",
             "fused_kernels_not_used_because": "the step-by-step GPU pre/post-processing ran instead of the fused "
                                               "kernels (slower, same labels): {}",
             "gpu_labeller_kernels_not_used_because": "the components' per-voxel kernels ran on the host "
                                                      "(slower, same table): {}",
             "gpu_surface_search_not_used_because": "the distances to the surface were searched on the host "
                                                    "(slower, same values): {}"}
    return [text.format(t[key]) for key, text in notes.items() if t.get(key)]


def cmd_info(args) -> int:
    from . import _core
    from .backends import available_backends
    from .model import load_package
    pkg = load_package(args.model)
    print(pkg.describe())
    print(f"backends    {', '.join(available_backends())}")
    print(f"xctrt       {__version__}  (C++ kernels, OpenMP {'on' if _core.openmp else 'off'})")
    return 0


def cmd_bench(args) -> int:
    if args.volume and args.shape:
        raise XctrtError("bench times either VOLUME or a generated volume of --shape, not both")
    if args.gpu:
        from .gpu import check_cuda, check_torch
        check_torch() if args.host_arrays else check_cuda()   # before the bench module imports torch
        from .gpu import bench
        if args.shape is None:
            args.shape = [1000, 1200, 1200]
        return bench.main(args)
    import numpy as np

    from .io import commit_json, output_file
    from .phantom import make_phantom
    staged = output_file(args.json) if args.json else None   # a bad --json fails before the benchmark
    seg = _segmenter(args)
    with tempfile.TemporaryDirectory(prefix="xctrt-bench-") as tmp:
        if args.volume:
            volume = args.volume
        else:
            args.shape = args.shape or [32, 512, 512]
            ph = make_phantom(tuple(args.shape), seed=0)
            volume = np.concatenate([ph.render(z, min(z + 16, args.shape[0]))[0]
                                     for z in range(0, args.shape[0], 16)])
        runs = []
        for _ in range(args.repeat):
            res = seg.segment(volume, out_dir=Path(tmp) / "out", keep_labels=False)
            runs.append(res.summary)
    best = min(runs, key=lambda s: s["timing"]["total_s"])
    t = best["timing"]
    z = best["input"]["shape"][0]
    print(f"volume {best['input']['shape']} {best['input']['dtype']}, model {seg.package.name}, "
          f"backend {seg.engine.name} on {seg.engine.device}, batch {seg.batch_size}, best of {args.repeat}")
    print(f"{'stage':<12}{'busy s':>10}{'ms/slice':>10}")
    for st in STAGES:
        s = t["stage_busy_s"].get(st, 0.0)
        print(f"{st:<12}{s:>10.3f}{1000 * s / z:>10.2f}")
    print(f"{'end to end':<12}{t['total_s']:>10.3f}{1000 * t['total_s'] / z:>10.2f}   "
          f"{t['slices_per_s']:.2f} slices/s")
    print("(stages overlap in four threads, so busy times can add up to more than end to end)")
    if staged is not None:
        print(f"wrote {commit_json(staged, {'runs': runs, 'best': best})}")
    return 0


def cmd_phantom(args) -> int:
    from .phantom import write_phantom
    t0 = time.perf_counter()
    write_phantom(args.output, tuple(args.shape), seed=args.seed, voxel_size=_voxel_size(args.voxel_size),
                  labels_path=args.labels, compression=None if args.uncompressed else "zlib")
    print(f"wrote {args.output} {tuple(args.shape)} uint16" + (f" and {args.labels}" if args.labels else "")
          + f" in {time.perf_counter() - t0:.1f} s")
    return 0


def cmd_simulate(args) -> int:
    from .simulate import SimConfig, simulate
    cfg = SimConfig(shape=tuple(args.shape), part=args.part, stl=args.stl, material=args.material,
                    inclusion=args.inclusion, pores_per_mm3=args.pores_per_mm3, pore_size=args.pore_size,
                    pore_mix=tuple(args.pore_mix), inclusions_per_mm3=args.inclusions_per_mm3,
                    inclusion_size=args.inclusion_size, views=args.views, geometry=args.geometry, kvp=args.kvp,
                    beam_filter=_filter_spec(args.beam_filter) if args.beam_filter else None,
                    mono_kev=args.mono, dose=args.dose, recon_filter=args.recon_filter, seed=args.seed,
                    voxel_size=args.voxel_size, dtype=args.dtype)
    s = simulate(args.output, cfg, workers=args.workers, progress=not args.no_progress)
    print(f"wrote {args.output}/image.tif ({s['config']['dtype']}) and labels.tif {tuple(s['shape'])}, "
          f"{s['config']['views']} {s['config']['geometry']}-beam views, {s['spectrum']['source']}, "
          f"porosity {s['porosity_percent']:.2f}% in {s['timing_s']['total']:.1f} s ({s['workers']} workers)")
    return 0


def _filter_spec(values):
    try:
        return values[0], float(values[1])
    except ValueError:
        raise XctrtError(f"--beam-filter takes an element and a thickness in mm (e.g. Cu 0.5), got {' '.join(values)}")


def cmd_evaluate(args) -> int:
    from .evaluate import evaluate_volumes, format_report
    from .io import commit_json, output_file
    staged = output_file(args.json) if args.json else None   # a bad --json fails before the evaluation
    res = evaluate_volumes(args.pred, args.truth, connectivity=args.connectivity)
    print(format_report(res))
    if staged is not None:
        print(f"wrote {commit_json(staged, {'pred': args.pred, 'truth': args.truth, **res})}")
    return 0


def cmd_domain_shift(args) -> int:
    from .evaluate import domain_shift
    d = domain_shift(args.a, args.b, seed=args.seed)
    print(f"domain shift (Frechet distance of filter-bank patch features) {args.a} vs {args.b}: {d:.4f}")
    return 0


class _Parser(argparse.ArgumentParser):
    def error(self, message):  # one line, like every other xctrt error
        self.exit(2, f"xctrt: error: {message} (see '{self.prog} --help')\n")


def build_parser() -> argparse.ArgumentParser:
    ap = _Parser(prog="xctrt", description="Pore and inclusion segmentation for industrial XCT volumes.")
    ap.add_argument("--version", action="version", version=f"xctrt {__version__}")
    ap.add_argument("--debug", action="store_true", help="show tracebacks")
    sub = ap.add_subparsers(dest="command", required=True)

    p = sub.add_parser("segment", help="segment a volume into air/material/pore/inclusion and report defects",
                       description="Writes labels.tif (uint8: 0 air, 1 material, 2 pore, 3 inclusion; input "
                                   "geometry), defects.csv (one row per 3D defect), summary.json and preview.png.")
    p.add_argument("volume", help="multi-page/Big/OME-TIFF, folder of TIFF or PNG slices, or .npy (Z, Y, X)")
    p.add_argument("-o", "--output", default="xctrt-out", help="output folder (default: %(default)s)")
    p.add_argument("--voxel-size", type=_mm, nargs="+", metavar="MM",
                   help="voxel size in mm (one value or DZ DY DX); overrides the file's metadata")
    _add_run_options(p)
    p.set_defaults(func=cmd_segment)

    p = sub.add_parser("info", help="describe a model package and the available backends")
    p.add_argument("model", nargs="?", default="default", help="package folder, .zip or embedded name")
    p.set_defaults(func=cmd_info)

    p = sub.add_parser("bench", help="time every stage of segment on a volume (or a generated phantom)")
    p.add_argument("volume", nargs="?", help="volume to time (default: a generated phantom)")
    p.add_argument("--shape", type=COUNT, nargs=3, metavar=("Z", "Y", "X"),
                   help="generated volume (default: 32 512 512; with --gpu 1000 1200 1200)")
    p.add_argument("--repeat", type=COUNT, default=2, help="runs; the best is reported (default: %(default)s)")
    p.add_argument("--json", help="also save all runs as JSON here")
    g = p.add_argument_group("GPU comparison (--gpu): one random-weight SAM run naive, compiled and ours")
    g.add_argument("--gpu", action="store_true", help="compare on the CUDA device instead of timing a package")
    g.add_argument("--backbone", default="vit_b", choices=["vit_b", "vit_l", "vit_h", "tiny"])
    g.add_argument("--modes", nargs="+", default=["paper", "shared"], choices=["paper", "shared"])
    g.add_argument("--naive-slices", type=COUNT, default=16, help="slices the naive anchor runs (default: %(default)s)")
    g.add_argument("--compiled-slices", type=COUNT, default=96, help="slices the compiled anchor runs")
    g.add_argument("--compile-mode", default="max-autotune",
                   help="torch.compile mode of the compiled anchor, or 'none' to skip it (default: %(default)s)")
    g.add_argument("--attention", default="auto", choices=["auto", "triton", "sdpa", "reference"])
    g.add_argument("--compile-ours", default="none",
                   help="also torch.compile our encoders with this mode (default: %(default)s)")
    g.add_argument("--profile", action="store_true", help="record where our encoders' time goes (top kernels)")
    g.add_argument("--work", help="folder for the generated volume and outputs (default: a temporary one)")
    g.add_argument("--host-arrays", action="store_true",
                   help="run the GPU path's code on the host (NumPy, torch CPU): a dry run without a GPU")
    _add_run_options(p)
    p.set_defaults(func=cmd_bench)

    p = sub.add_parser("phantom", help="write a synthetic test volume (cylinder with pores and inclusions)")
    p.add_argument("output", help="image .tif to write")
    p.add_argument("--shape", type=COUNT, nargs=3, default=[64, 512, 512], metavar=("Z", "Y", "X"))
    p.add_argument("--labels", help="also write the true labels here")
    p.add_argument("--seed", type=NONNEGATIVE, default=0)
    p.add_argument("--voxel-size", type=_mm, nargs="+", default=[0.01], metavar="MM")
    p.add_argument("--uncompressed", action="store_true", help="write raw pages (fast for very large volumes)")
    p.set_defaults(func=cmd_phantom)

    p = sub.add_parser("simulate", help="simulate an XCT scan of an AM part (phantom, polychromatic projection, "
                                        "noise, FBP) with its true labels",
                       description="Writes OUT_DIR/image.tif (reconstructed volume), labels.tif (uint8: 0 air, "
                                   "1 material, 2 pore, 3 inclusion) and simulate.json (all parameters). Needs "
                                   "pip install 'xctrt[sim]'.")
    p.add_argument("output", help="output folder")
    p.add_argument("--shape", type=COUNT, nargs=3, default=[64, 512, 512], metavar=("Z", "Y", "X"))
    p.add_argument("--part", default="cylinder", choices=["cylinder", "block", "lattice", "overhang"],
                   help="part geometry (default: %(default)s; lattice = sheet gyroid in a cylindrical skin)")
    p.add_argument("--stl", metavar="FILE", help="voxelise this closed STL mesh (mm, centred) instead of --part")
    p.add_argument("--material", default="alsi10mg", choices=["alsi10mg", "ti64", "316l"])
    p.add_argument("--inclusion", default="ni", choices=["ni", "w"], help="dense inclusion metal")
    p.add_argument("--pores-per-mm3", type=float, default=20.0, help="pores per mm^3 of part (default: %(default)s)")
    p.add_argument("--pore-size", type=float, default=0.1, metavar="MM", help="mean pore diameter (default: %(default)s)")
    p.add_argument("--pore-mix", type=float, nargs=3, default=[0.5, 0.3, 0.2], metavar=("SPH", "ELL", "LOF"),
                   help="fractions of spherical, ellipsoidal, lack-of-fusion pores (default: 0.5 0.3 0.2)")
    p.add_argument("--inclusions-per-mm3", type=float, default=2.0, help="(default: %(default)s)")
    p.add_argument("--inclusion-size", type=float, default=0.06, metavar="MM", help="mean diameter (default: %(default)s)")
    p.add_argument("--views", type=int, default=360, help="projections (parallel: over 180 deg, fan: 360; default: %(default)s)")
    p.add_argument("--geometry", default="parallel", choices=["parallel", "fan"])
    p.add_argument("--kvp", type=float, default=160.0, help="tube voltage, W anode (default: %(default)s)")
    p.add_argument("--beam-filter", nargs=2, metavar=("ELEMENT", "MM"), help="pre-filter, e.g. Cu 0.5 (less cupping)")
    p.add_argument("--mono", type=float, metavar="KEV", help="monochromatic beam at KEV instead (no beam hardening)")
    p.add_argument("--dose", type=float, default=1e4,
                   help="photons per detector pixel per view, unattenuated; 0 = noiseless (default: %(default)g)")
    p.add_argument("--recon-filter", default="ramp", choices=["ramp", "shepp-logan", "cosine", "hamming", "hann"])
    p.add_argument("--dtype", default="uint16", choices=["uint16", "float32"],
                   help="uint16 grey (linear in mu, see simulate.json) or float32 mu in 1/mm (default: %(default)s)")
    p.add_argument("--seed", type=NONNEGATIVE, default=0)
    p.add_argument("--voxel-size", type=_mm, default=0.02, metavar="MM", help="isotropic (default: %(default)s)")
    p.add_argument("--workers", type=NONNEGATIVE, default=0, help="processes over slices (0 = all cores)")
    p.add_argument("--no-progress", action="store_true", help="no progress bar")
    p.set_defaults(func=cmd_simulate)

    p = sub.add_parser("evaluate", help="compare a label volume with the truth: IoU, layer-by-layer P/R/F1, "
                                        "3D object detection")
    p.add_argument("pred", help="predicted labels (e.g. OUT/labels.tif)")
    p.add_argument("truth", help="true labels, same shape")
    p.add_argument("--connectivity", type=int, default=26, choices=[6, 18, 26])
    p.add_argument("--json", help="also write the full result here")
    p.set_defaults(func=cmd_evaluate)

    p = sub.add_parser("domain-shift", help="how different two grey-value volumes look to a model (unitless; "
                                            "0 = same distribution)")
    p.add_argument("a")
    p.add_argument("b")
    p.add_argument("--seed", type=NONNEGATIVE, default=0, help="patch sampling seed")
    p.set_defaults(func=cmd_domain_shift)
    return ap


class Terminated(KeyboardInterrupt):
    """SIGTERM (timeout, systemd, kill), raised in the main thread so a run cleans up as after Ctrl-C."""


_main_pid = None   # the process whose main() installed the SIGTERM handler


def _raise_terminated(signum, frame):
    if os.getpid() != _main_pid:   # a process forked from main() that kept this handler: end as SIGTERM would
        signal.signal(signal.SIGTERM, signal.SIG_DFL)
        os.kill(os.getpid(), signal.SIGTERM)
        return
    raise Terminated()


def main(argv=None) -> int:
    global _main_pid
    args = build_parser().parse_args(argv)
    if threading.current_thread() is threading.main_thread():
        _main_pid = os.getpid()   # here, not at import: a process may import xctrt, then fork and call main()
        previous = signal.signal(signal.SIGTERM, _raise_terminated)
    try:
        return args.func(args)
    except XctrtError as exc:
        print(f"xctrt: error: {exc}", file=sys.stderr)
        return 2
    except Terminated:
        print("xctrt: terminated; no outputs were written", file=sys.stderr)
        return 128 + signal.SIGTERM
    except KeyboardInterrupt:
        print("xctrt: interrupted; no outputs were written", file=sys.stderr)
        return 130
    except BrokenPipeError:   # stdout piped into `head` and closed: end quietly, as SIGPIPE ends Unix tools
        os.dup2(os.open(os.devnull, os.O_WRONLY), sys.stdout.fileno())   # no second error at exit
        return 128 + getattr(signal, "SIGPIPE", 13)   # (Windows has no SIGPIPE; 13 elsewhere)
    except Exception as exc:
        if args.debug:
            raise
        msg = str(exc).splitlines()[0] if str(exc) else ""
        print(f"xctrt: internal error: {type(exc).__name__}: {msg} (rerun with --debug for details)", file=sys.stderr)
        return 3
    finally:
        if threading.current_thread() is threading.main_thread():
            signal.signal(signal.SIGTERM, previous)


if __name__ == "__main__":
    sys.exit(main())
