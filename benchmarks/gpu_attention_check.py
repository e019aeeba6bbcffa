"""One-shot GPU check of SAM's relative-position attention: correctness and speed of the fused Triton
kernel and of torch SDPA against the float32 reference, at ViT-B 1024x1024 shapes.

    python benchmarks/gpu_attention_check.py --out DIR               # CUDA, bf16 (target: H200, <= 60 s)
    python benchmarks/gpu_attention_check.py --out DIR --device cpu  # dry run: tiny shapes, float32,
                                                                     # Triton interpreter

Shapes (batch 8, 12 heads, D = 64): global blocks B = 8, 64x64 tokens (N = 4096); windowed blocks
B = 8*25 windows, 14x14 tokens (N = 196). FLOPs = 4 * B * heads * N^2 * D (two matmuls). q, k, v are
views of one (B, N, 3, heads, D) projection and the output is laid out (B, N, heads, D), as in the
encoder.
The windowed shape also runs as a windowed block reading its windows in place from the 64x64 grid
(8 images, `grid in-place`: attention.image_window_attention's kernel mode), checked against the
reference on the padded windows. Times are the device's (attention.device_ms).
Every variant is run inside its own try/except: a failure is reported, not fatal. Writes
DIR/gpu_attention.json and prints a table last.
"""
import argparse
import json
import math
import os
import statistics
import sys
import time
import traceback
from pathlib import Path


def parse_args(argv=None):
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--out", required=True, type=Path, help="folder for gpu_attention.json")
    ap.add_argument("--device", default="cuda", choices=["cuda", "cpu"])
    ap.add_argument("--tiny", action="store_true", help="tiny shapes (implied by --device cpu)")
    ap.add_argument("--budget-s", type=float, default=45.0,
                    help="skip the remaining sweep configs once this much time has gone")
    return ap.parse_args(argv)


ARGS = parse_args() if __name__ == "__main__" else None
if ARGS is not None and ARGS.device == "cpu":
    # must be set before triton is imported (by torch or by us) for the interpreter to work
    os.environ["TRITON_INTERPRET"] = "1"

import torch


def _load_attention():
    """python/xctrt/gpu/attention.py loaded by path: it needs only torch (and Triton), so the check
    runs on a GPU machine whatever else of xctrt's dependencies is installed there."""
    import importlib.util
    path = Path(__file__).resolve().parents[1] / "python" / "xctrt" / "gpu" / "attention.py"
    spec = importlib.util.spec_from_file_location("xctrt_gpu_attention_check", path)
    mod = importlib.util.module_from_spec(spec)
    sys.modules[spec.name] = mod
    spec.loader.exec_module(mod)
    return mod


_att = _load_attention()
attention_reference, attention_sdpa, attention_triton = (
    _att.attention_reference, _att.attention_sdpa, _att.attention_triton)
empty_output = _att.empty_output
default_config, relative_offset_terms, triton_available, split_qkv = (
    _att.default_config, _att.relative_offset_terms, _att.triton_available, _att.split_qkv)

# name -> (B, heads, (H, W), D, how many of the B the float32 reference checks)
FULL_SHAPES = {
    "global": (8, 12, (64, 64), 64, 1),
    "windowed": (8 * 25, 12, (14, 14), 64, 8 * 25),
}
TINY_SHAPES = {
    "global": (2, 2, (8, 8), 16, 2),
    "windowed": (3, 2, (5, 3), 16, 3),
}
# the windowed shape read in place from the grid it tiles (attention.image_window_attention): images and
# their token grid; ViT-B at 1024x1024: 8 images of 64x64 tokens, 25 windows of 14x14 each (200, as above)
GRID_OF = {"full": (8, (64, 64)), "tiny": (2, (7, 5))}


def _cfg(bm, bn, nw, ns, maxnreg=None):
    return {"block_m": bm, "block_n": bn, "num_warps": nw, "num_stages": ns,
            **({"maxnreg": maxnreg} if maxnreg else {})}


# launch configs tried besides the default (default_config: global 64x64 w4 s3, windowed 128x64 w8 s2);
# key tiles of 64 / 128 / 256 slots hold 4 / 8 / 16 padded 16-slot rows of a 14x14 window. The uncapped
# ones compile for sm_90 without spills (Triton 3.8's ahead-of-time compiler, benchmarks/attention_sass.py).
# Since badc3e7 the global default takes 139 registers there (three 4-warp programs per SM; 170 and two
# before). The launches capped at 128 registers fit four 4-warp or two 8-warp programs per SM, for one
# spilled value per key tile: whether more programs hide the key loop's latency better only the GPU
# says. They are among the CUDA path's tuned launches too (attention.TUNED_LAUNCHES).
FULL_SWEEP = {
    "global": [_cfg(64, 64, 4, 2), _cfg(64, 64, 4, 2, 128), _cfg(128, 64, 8, 2), _cfg(128, 64, 8, 2, 128),
               _cfg(128, 64, 8, 3, 128), _cfg(64, 128, 8, 2), _cfg(128, 128, 8, 2)],
    "windowed": [_cfg(64, 64, 4, 2), _cfg(64, 32, 4, 2), _cfg(64, 128, 8, 2), _cfg(128, 128, 8, 2),
                 _cfg(64, 256, 8, 2), _cfg(64, 256, 4, 2)],
}
TINY_SWEEP = {
    "global": [_cfg(16, 16, 4, 1), _cfg(32, 16, 4, 1), _cfg(16, 32, 4, 1)],
    "windowed": [_cfg(16, 16, 4, 1)],
}


def make_inputs(b, nh, hw, d, dtype, device, seed):
    """Fresh random q, k, v (views of one projection), the offset terms from random rel_pos tables, and
    the projection and tables themselves."""
    g = torch.Generator(device="cpu").manual_seed(seed)
    h, w = hw
    n = h * w
    qkv = torch.randn(b, n, 3, nh, d, generator=g).to(device=device, dtype=dtype)
    q, k, v = qkv.permute(2, 0, 3, 1, 4).unbind(0)
    rel_pos_h = (0.2 * torch.randn(2 * h - 1, d, generator=g)).to(device)
    rel_pos_w = (0.2 * torch.randn(2 * w - 1, d, generator=g)).to(device)
    off_h, off_w = relative_offset_terms(q, rel_pos_h, rel_pos_w, hw)   # float32, as the encoder makes them
    return q, k, v, off_h, off_w, (qkv, rel_pos_h, rel_pos_w)


def sync(device):
    if device == "cuda":
        torch.cuda.synchronize()


def time_ms(fn, device, warmup, reps):
    """Median milliseconds of fn(): on the GPU the device's time (attention.device_ms, the host's launches
    left out, as the encoder's CUDA graphs run it), on the CPU perf_counter's."""
    for _ in range(warmup):
        fn()
    sync(device)
    if device == "cuda":
        times = [_att.device_ms(fn, runs=3) for _ in range(max(1, reps // 3))]
    else:
        times = []
        for _ in range(reps):
            t = time.perf_counter()
            fn()
            times.append((time.perf_counter() - t) * 1e3)
    return statistics.median(times)


def errors(out, ref):
    out, ref = out.float(), ref.float()
    rel = ((out - ref).norm() / ref.norm()).item()
    return rel, (out - ref).abs().max().item()


def short_error(exc):
    lines = traceback.format_exception_only(type(exc), exc)
    return " ".join(s.strip() for s in lines)[-400:]


def cfg_label(cfg):
    return (f"{cfg['block_m']}x{cfg['block_n']} w{cfg['num_warps']} s{cfg['num_stages']}"
            + (f" r{cfg['maxnreg']}" if cfg.get("maxnreg") else ""))


def run_shape(name, shape, sweep, args, dtype, tol, t0, seed):
    b, nh, hw, d, n_check = shape
    n = hw[0] * hw[1]
    device = args.device
    flops = 4.0 * b * nh * n * n * d
    warmup, reps = (10, 30) if device == "cuda" else (1, 2)
    res = {"B": b, "heads": nh, "hw": list(hw), "N": n, "D": d, "flops": flops, "checked_batches": n_check,
           "variants": []}
    try:
        q, k, v, rel_h, rel_w, (qkv, rel_pos_h, rel_pos_w) = make_inputs(b, nh, hw, d, dtype, device, seed)
        scale = d ** -0.5
        sl = slice(0, n_check)
        ref = attention_reference(q[sl], k[sl], v[sl], rel_h[sl], rel_w[sl], hw, scale)  # float32 maths
    except Exception as exc:  # noqa: BLE001 - report and go on
        res["error"] = short_error(exc)
        return res

    def variant(label, fn, cfg=None, check=True):
        row = {"variant": label, "config": cfg_label(cfg) if cfg else "", "launch": cfg}
        try:
            if check:
                out = fn()
                sync(device)
                rel, mx = errors(out[sl], ref)
                row.update(rel_err=rel, max_abs_err=mx, check="PASS" if rel < tol else "FAIL")
                del out
            ms = time_ms(fn, device, warmup, reps)
            row.update(ms=ms, tflops=flops / (ms * 1e-3) / 1e12)
        except Exception as exc:  # noqa: BLE001
            row["error"] = short_error(exc)
            row["check"] = "ERROR"
        res["variants"].append(row)
        return row

    if triton_available():
        base = default_config(hw, d)
        # poisoned output buffer: an element the kernel fails to write shows up as NaN in the check
        out_buf = empty_output(q).fill_(float("nan"))
        variant("triton", lambda: attention_triton(q, k, v, rel_h, rel_w, hw, scale, out=out_buf, **base), base)
        if device == "cuda":   # no launch given: what the encoder runs, tuned on its first call
            out_buf.fill_(float("nan"))
            row = variant("triton-tuned", lambda: attention_triton(q, k, v, rel_h, rel_w, hw, scale, out=out_buf))
            row["config"] = "; ".join(f"{c}" for c in _att.tuned_choices().values())[-120:]
        # the encoder's two ways from the projection (choose_qkv_layout picks the faster per shape): q, k,
        # v read in place, or copied heads-major first; offset terms and kernel (tuned on CUDA) included
        for layout in _att.QKV_LAYOUTS:
            def from_projection(lay=layout):
                qq, kk, vv = split_qkv(qkv, lay)
                oh, ow = relative_offset_terms(qq, rel_pos_h, rel_pos_w, hw)
                return attention_triton(qq, kk, vv, oh, ow, hw, scale)
            variant(f"qkv {layout.replace('_', '-')}", from_projection)

        def in_place_offsets_kernel():   # only the offsets read (attention.offset_terms_triton)
            qq, kk, vv = split_qkv(qkv, "in_place")
            return attention_triton(qq, kk, vv, *_att.offset_terms_triton(qq, rel_pos_h, rel_pos_w, hw), hw, scale)
        variant("qkv in-place, offsets kernel", in_place_offsets_kernel)
        res["heads_major_copy"] = copy_ab(qkv, device, warmup, reps)
        res["offset_terms"] = offsets_ab(split_qkv(qkv, "in_place")[0], rel_pos_h, rel_pos_w, hw, None,
                                         device, warmup, reps)
        if name == "windowed":
            images_grid = GRID_OF["tiny" if args.tiny or device == "cpu" else "full"]
            for way in ("products", "kernel"):
                res["variants"].append(grid_variant(images_grid, nh, hw, d, dtype, device, tol, warmup, reps,
                                                    seed, offsets=way))
        for cfg in sweep:
            if cfg == base:
                continue
            if time.perf_counter() - t0 > args.budget_s:
                res["variants"].append({"variant": "triton-sweep", "config": cfg_label(cfg), "launch": cfg,
                                        "check": "SKIP", "error": "time budget"})
                continue
            out_buf.fill_(float("nan"))
            variant("triton-sweep", lambda c=cfg: attention_triton(q, k, v, rel_h, rel_w, hw, scale,
                                                                   out=out_buf, **c), cfg)
    else:
        res["variants"].append({"variant": "triton", "check": "ERROR", "error": "triton not importable"})

    variant("sdpa", lambda: attention_sdpa(q, k, v, rel_h, rel_w, hw, scale))
    # speed-of-light reference only: SDPA without any mask (other maths, so no check)
    variant("sdpa-nobias", lambda: torch.nn.functional.scaled_dot_product_attention(q, k, v, scale=scale),
            check=False)

    ok = [r for r in res["variants"] if r["variant"].startswith("triton") and r.get("check") == "PASS"]
    if ok:
        best = min(ok, key=lambda r: r["ms"])
        res["best_triton"] = {"config": best["config"], "launch": best["launch"], "ms": best["ms"],
                              "tflops": best["tflops"]}
    return res


def grid_variant(images_grid, nh, hw, d, dtype, device, tol, warmup, reps, seed, offsets="products"):
    """The windows read where they lie in their grid (the kernel's WINDOWS mode, what a windowed block
    runs when FastBlock picks "grid"): from a random projection of the grid's tokens and its padding row,
    offset terms and kernel (tuned on CUDA), against the float32 reference on window_partition's copies of
    the same projection, the padding row standing in for every padding token. A row like the others.
    offsets: "products" (every offset term) or "kernel" (only those read, offset_terms_triton)."""
    images, (ih, iw) = images_grid
    wh, ww = hw
    nwy, nwx = -(-ih // wh), -(-iw // ww)
    n, c3 = wh * ww, 3 * nh * d
    row = {"variant": "grid in-place" + (", offsets kernel" if offsets == "kernel" else ""),
           "config": f"{images}x{ih}x{iw} grid", "launch": None}
    terms = _att.offset_terms_triton if offsets == "kernel" else relative_offset_terms
    try:
        g = torch.Generator(device="cpu").manual_seed(seed + 7)
        proj = torch.randn(images * ih * iw + 1, c3, generator=g).to(device=device, dtype=dtype)
        rel_pos_h, rel_pos_w = ((0.2 * torch.randn(2 * s - 1, d, generator=g)).to(device) for s in hw)
        scale = d ** -0.5

        def run():
            q, k, v = proj[:-1].view(images, ih * iw, 3, nh, d).permute(2, 0, 3, 1, 4).unbind(0)
            off_h, off_w = terms(q, rel_pos_h, rel_pos_w, hw, grid=(ih, iw))
            return attention_triton(q, k, v, off_h, off_w, hw, scale, grid=(ih, iw))

        out = run().transpose(1, 2).float()   # (images, IH*IW, NH, D)
        # the reference: the padded grid's windows, every padding token the padding row
        full = proj[-1].float().expand(images, nwy * wh, nwx * ww, c3).clone()
        full[:, :ih, :iw] = proj[:-1].float().view(images, ih, iw, c3)
        win = full.view(images, nwy, wh, nwx, ww, c3).permute(0, 1, 3, 2, 4, 5).reshape(-1, n, 3, nh, d)
        q, k, v = win.permute(2, 0, 3, 1, 4).unbind(0)
        ref = attention_reference(q, k, v, *relative_offset_terms(q, rel_pos_h, rel_pos_w, hw), hw, scale)
        ref = ref.transpose(1, 2).reshape(images, nwy, nwx, wh, ww, nh, d).permute(0, 1, 3, 2, 4, 5, 6)
        ref = ref.reshape(images, nwy * wh, nwx * ww, nh, d)[:, :ih, :iw].reshape(images, ih * iw, nh, d)
        rel, mx = errors(out, ref)
        row.update(rel_err=rel, max_abs_err=mx, check="PASS" if rel < tol else "FAIL")
        del out, ref, full, win
        ms = time_ms(run, device, warmup, reps)
        row.update(ms=ms, tflops=4.0 * images * nwy * nwx * nh * n * n * d / (ms * 1e-3) / 1e12)
    except Exception as exc:  # noqa: BLE001
        row.update(error=short_error(exc), check="ERROR")
    return row


def offsets_ab(q, rel_pos_h, rel_pos_w, hw, grid, device, warmup, reps):
    """The offset terms two ways: every offset (relative_offset_terms, two matrix products) and only those
    the fused kernel reads (offset_terms_triton); ms of each, and the largest difference on the offsets
    read (float32 sums in another order: a rounding)."""
    res = {}
    try:
        ways = {"products": lambda: relative_offset_terms(q, rel_pos_h, rel_pos_w, hw, grid=grid),
                "kernel": lambda: _att.offset_terms_triton(q, rel_pos_h, rel_pos_w, hw, grid=grid)}
        (ph, pw), (kh, kw) = ways["products"](), ways["kernel"]()
        rh, rw = _att.relative_bias_terms(ph, pw, hw)   # what the kernel reads, by offset
        xh, xw = _att.relative_bias_terms(kh, kw, hw)
        res["max_abs_diff_read"] = max(float((rh - xh).abs().max()), float((rw - xw).abs().max()))
        for name, fn in ways.items():
            res[name] = {"ms": time_ms(fn, device, warmup, reps)}
    except Exception as exc:  # noqa: BLE001 - report and go on
        res["error"] = short_error(exc)
    return res


def copy_ab(qkv, device, warmup, reps):
    """The heads-major copy of the projection two ways: torch's permute().contiguous() (element by
    element) and permuted_copy (8-byte words); ms, GB/s (read + written) and whether the bits agree."""
    dims, moved = (2, 3, 0, 1, 4), 2 * qkv.numel() * qkv.element_size()
    ways = {"torch": lambda: qkv.permute(dims).contiguous(), "words": lambda: _att.permuted_copy(qkv, dims)}
    res = {}
    try:
        res["same_bits"] = bool(torch.equal(ways["torch"]().view(torch.uint8), ways["words"]().view(torch.uint8)))
        for name, fn in ways.items():
            ms = time_ms(fn, device, warmup, reps)
            res[name] = {"ms": ms, "GB_per_s": moved / (ms * 1e-3) / 1e9}
    except Exception as exc:  # noqa: BLE001 - report and go on
        res["error"] = short_error(exc)
    return res


def fmt(x, spec):
    return format(x, spec) if isinstance(x, (int, float)) and math.isfinite(x) else "-"


def print_table(report):
    print()
    print(f"{'shape':9} {'variant':16} {'config':20} {'ms':>9} {'TFLOP/s':>8} {'rel_err':>9}  check")
    for name, res in report["shapes"].items():
        if "error" in res:
            print(f"{name:9} ERROR {res['error']}")
        for r in res["variants"]:
            print(f"{name:9} {r['variant']:16} {r.get('config', ''):20} {fmt(r.get('ms'), '9.3f')} "
                  f"{fmt(r.get('tflops'), '8.4g')} {fmt(r.get('rel_err'), '9.2e')}  {r.get('check', '')}"
                  + (f"  {r['error']}" if r.get("error") else ""))
        cp = res.get("heads_major_copy", {})
        if "torch" in cp and "words" in cp:
            print(f"{name:9} heads-major copy: torch {cp['torch']['ms']:.3f} ms ({cp['torch']['GB_per_s']:.0f} GB/s), "
                  f"words {cp['words']['ms']:.3f} ms ({cp['words']['GB_per_s']:.0f} GB/s), same bits {cp['same_bits']}")
        elif cp.get("error"):
            print(f"{name:9} heads-major copy: {cp['error']}")
        ot = res.get("offset_terms", {})
        if "products" in ot and "kernel" in ot:
            print(f"{name:9} offset terms: products {ot['products']['ms']:.3f} ms, kernel (offsets read) "
                  f"{ot['kernel']['ms']:.3f} ms, max |diff| read {ot['max_abs_diff_read']:.2e}")
        elif ot.get("error"):
            print(f"{name:9} offset terms: {ot['error']}")
        if "best_triton" in res:
            b = res["best_triton"]
            print(f"{name:9} best triton: {b['config']} {b['ms']:.3f} ms {b['tflops']:.4g} TFLOP/s")
    print(f"total {report['elapsed_s']:.1f} s on {report['device_name']}")


def main(args):
    t0 = time.perf_counter()
    args.out.mkdir(parents=True, exist_ok=True)
    if args.device == "cuda" and not torch.cuda.is_available():
        print("CUDA is not available; use --device cpu for a dry run", file=sys.stderr)
        return 2
    tiny = args.tiny or args.device == "cpu"
    # bf16 on the GPU; float32 on the CPU dry run (the interpreter's tl.dot cannot multiply bf16)
    dtype = torch.bfloat16 if args.device == "cuda" else torch.float32
    tol = 1e-2 if dtype == torch.bfloat16 else 1e-4
    shapes, sweep = (TINY_SHAPES, TINY_SWEEP) if tiny else (FULL_SHAPES, FULL_SWEEP)
    try:
        import triton
        triton_version = triton.__version__
    except Exception:  # noqa: BLE001
        triton_version = None
    report = {
        "device": args.device,
        "device_name": torch.cuda.get_device_name() if args.device == "cuda" else "cpu (Triton interpreter)",
        "torch": torch.__version__, "triton": triton_version, "dtype": str(dtype).replace("torch.", ""),
        "tolerance_rel": tol, "tiny": tiny, "triton_interpret": os.environ.get("TRITON_INTERPRET"),
        "shapes": {},
    }
    for i, (name, shape) in enumerate(shapes.items()):
        res = run_shape(name, shape, sweep.get(name, []), args, dtype, tol, t0, seed=100 + i)
        report["shapes"][name] = res
        if args.device == "cuda":
            torch.cuda.empty_cache()
        print(f"[{time.perf_counter() - t0:6.1f} s] {name} done", flush=True)
    report["tuned_choices"] = _att.tuned_choices()
    report["elapsed_s"] = time.perf_counter() - t0
    (args.out / "gpu_attention.json").write_text(json.dumps(report, indent=2))
    print_table(report)
    # the step passes on our kernel's checks (its windows read in the grid among them); SDPA's (bf16 with a
    # materialised bias) are in the JSON only
    checks = [r.get("check") for res in report["shapes"].values() for r in res["variants"]
              if r["variant"] in ("triton", "grid in-place")]
    return 0 if checks and all(c == "PASS" for c in checks) else 1


if __name__ == "__main__":
    sys.exit(main(ARGS))
