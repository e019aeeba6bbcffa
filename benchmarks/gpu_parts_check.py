"""Each part of the fast SAM forward on and off: encoder and decoder time per batch, in one GPU call.

    python benchmarks/gpu_parts_check.py --out DIR                # CUDA: ViT-B, bf16, batch 8 (~30 s)
    python benchmarks/gpu_parts_check.py --out DIR --device cpu   # dry run: tiny network, float32

One random-weight network in shared mode (one encoder, three decoder heads, as `xctrt bench`).
Variants: segment-anything as it is ("none", same weights dtype), every part of xctrt.gpu.sam.accelerate
("all"), every part but one, for each of FAST_PARTS, and every part with the per-shape choices fixed one
way (the windowed blocks partitioned or read in the grid, q/k/v in place or heads-major). On CUDA each variant's encoder and decoders are
replayed as CUDA graphs, as the runtime does, and timed by CUDA events (median of --reps); max |Δ| of
its probabilities against "none". Then the top kernels of the decoders with every part (the bench's
--profile lists the encoder's), and the encoder with every part at other batch sizes (--sweep): time per
image, TFLOP/s and peak torch memory, for the choice of the default batch. A variant that fails is
reported and the others go on.
Writes DIR/gpu_parts.json and prints a table last.
"""
from __future__ import annotations

import argparse
import copy
import sys
import time
import traceback
from pathlib import Path

import numpy as np

sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "python"))


def decoder_overlap(torch, model, x, size: int, cuda: bool) -> dict:
    """Batch x then its reverse through OverlappedSteps and one after the other: the probabilities
    (identical: the same kernels on the same inputs) and, on CUDA, the device ms of 4 batches each way;
    then the decoder graph with the heads side by side (ClassNet.head_streams) against one after
    another: ms of 4 replays each way and the probabilities."""
    from xctrt.gpu.sam import GraphedStep, OverlappedSteps, best_device_ms, time_overlap

    encode = lambda t: tuple(model.encode(t))   # noqa: E731
    decode = lambda *e: model.decode(list(e), size)   # noqa: E731
    x2 = x.flip(0)
    res = {}
    with torch.inference_mode():
        if cuda:
            enc = GraphedStep(encode, x)
            dec = GraphedStep(decode, list(enc.static_out))
            steps = OverlappedSteps(encode, decode, enc, dec)
            res["ms_4_batches"] = time_overlap(steps, x)
            serial = []
            for xb in (x, x2):
                enc(xb)
                serial.append(dec(*enc.static_out).float().clone())
        else:
            steps = OverlappedSteps(encode, decode)
            serial = [decode(*encode(xb)).float() for xb in (x, x2)]
        steps.first(x)
        both = [steps.next(x2).float().clone(), steps.last().float().clone()]
        res["max_abs_diff_vs_serial"] = max(float((a - b).abs().max()) for a, b in zip(both, serial))
        if cuda and getattr(model, "head_streams", False) is None:
            model.head_streams = [torch.cuda.Stream() for _ in range(model.num_classes)]
            try:
                side = GraphedStep(decode, list(enc.static_out))
            finally:
                model.head_streams = None
            enc(x)
            one = dec(*enc.static_out).float().clone()
            res["heads_side_by_side"] = {
                "max_abs_diff": float((side(*enc.static_out).float() - one).abs().max()),
                "ms_4_replays": best_device_ms({"one after another": lambda: [dec(*enc.static_out) for _ in range(4)],
                                               "side by side": lambda: [side(*enc.static_out) for _ in range(4)]})}
    return res


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--out", required=True, type=Path)
    ap.add_argument("--device", default="cuda", choices=["cuda", "cpu"])
    ap.add_argument("--batch", type=int, default=8)
    ap.add_argument("--reps", type=int, default=10)
    ap.add_argument("--sweep", type=int, nargs="*", default=[4, 16],
                    help="other batch sizes to time the encoder with every part at (default: 4 16)")
    args = ap.parse_args(argv)
    from xctrt.io import commit_json, output_file

    import torch

    from xctrt.gpu.bench import CLASSES, profile_call, profile_ops, time_cuda
    from xctrt.gpu.sam import FAST_PARTS, GraphedStep, accelerate, build_random_class_net, encoder_flops

    cuda = args.device == "cuda"
    backbone, dtype = ("vit_b", torch.bfloat16) if cuda else ("tiny", torch.float32)
    net = build_random_class_net(backbone, len(CLASSES), "shared", seed=0, device=args.device)
    size = net.image_size
    x = torch.rand(args.batch, 1, size, size, generator=torch.Generator().manual_seed(0)).to(args.device)
    # (parts, choices fixed on the modules that make them: FastBlock.window_layout, FastAttention.qkv_layout)
    variants = {"none": (None, {}), "all": (FAST_PARTS, {})}
    variants.update({f"all but {p}": (tuple(q for q in FAST_PARTS if q != p), {}) for p in FAST_PARTS})
    variants.update({   # what each per-shape choice gives the whole encoder, replayed as graphs
        "all, windows in grid": (FAST_PARTS, {"window_layout": "grid"}),
        "all, windows partitioned": (FAST_PARTS, {"window_layout": "partitioned"}),
        "all, windows partitioned, q/k/v in place": (FAST_PARTS, {"window_layout": "partitioned",
                                                                  "qkv_layout": "in_place"}),
        "all, windows partitioned, q/k/v heads-major": (FAST_PARTS, {"window_layout": "partitioned",
                                                                     "qkv_layout": "heads_major"}),
        # the fused kernel's offset terms: every offset (two products) or only those read (a kernel)
        "all, offset terms products": (FAST_PARTS, {"offset_terms": "products"}),
        "all, offset terms kernel": (FAST_PARTS, {"offset_terms": "kernel"})})
    from xctrt.gpu import attention as att

    def timed(fn) -> float:
        if cuda:
            return time_cuda(torch, fn, reps=args.reps)
        times = []
        for _ in range(3):
            t0 = time.perf_counter()
            fn()
            times.append(time.perf_counter() - t0)
        return float(np.median(times))

    rows, ref, fast_all = {}, None, None
    for name, (parts, fixed) in variants.items():
        att.OFFSET_TERMS = fixed.get("offset_terms", "auto")   # a module setting, read as the graphs are captured
        try:
            m = copy.deepcopy(net).cast_weights(dtype)
            if parts is not None:
                m = accelerate(m, "auto", parts)
            for mod in m.modules():
                for attr, value in fixed.items():
                    if hasattr(type(mod), attr):
                        setattr(mod, attr, value)
            graphs_error = None
            with torch.inference_mode():
                if cuda:
                    try:
                        enc = GraphedStep(lambda t, m=m: tuple(m.encode(t)), x)
                        dec = GraphedStep(lambda *e, m=m: m.decode(list(e), size), list(enc.static_out))
                        encode, decode = (lambda: enc(x)), (lambda: dec(*enc.static_out))
                    except Exception as exc:   # noqa: BLE001 - segment-anything's own attention indexes
                        # with CPU tensors, which a capture refuses: that variant is timed eagerly
                        torch.cuda.synchronize()
                        graphs_error = f"{type(exc).__name__}: {exc}"[:200]
                        cuda_graphs = False
                    else:
                        cuda_graphs = True
                if not cuda or not cuda_graphs:
                    emb = m.encode(x)
                    encode, decode = (lambda: m.encode(x)), (lambda: m.decode(emb, size))
                row = {"encoder_ms": 1000 * timed(encode), "decoder_ms": 1000 * timed(decode),
                       "cuda_graphs": cuda and graphs_error is None, "cuda_graphs_error": graphs_error}
                probs = m(x).float()
            if parts is None:
                ref = probs
            row["max_abs_diff_vs_none"] = float((probs - ref).abs().max()) if ref is not None else None
            if name == "all":
                fast_all = m
        except Exception as exc:   # report and go on: one broken variant must not hide the others
            traceback.print_exc(limit=4)
            row = {"error": f"{type(exc).__name__}: {exc}"[:300]}
        rows[name] = row
        print(f"{name}: {row}", flush=True)
    att.OFFSET_TERMS = "auto"

    # the decoders beside the next batch's encoders (sam.OverlappedSteps, as the pipeline runs them where
    # that measures faster): 4 batches each way, and the same two batches' probabilities both ways
    overlap = {}
    if fast_all is not None:
        try:
            overlap = decoder_overlap(torch, fast_all, x, size, cuda)
        except Exception as exc:   # noqa: BLE001 - reported; the other numbers stand
            traceback.print_exc(limit=4)
            overlap = {"error": f"{type(exc).__name__}: {exc}"[:300]}
        print(f"decoders overlapped with the next batch's encoders: {overlap}", flush=True)

    decoder_profile, ops, sweep = [], {}, {}
    if fast_all is not None:
        with torch.inference_mode():
            emb = fast_all.encode(x)
        decoder_profile = profile_call(torch, lambda: fast_all.decode(emb, size), cuda, top=15)
        # the same passes by operator and input shape, eager (no graph): which layer_norm, copy or add costs
        for part, fn in (("decoder", lambda: fast_all.decode(emb, size)), ("encoder", lambda: fast_all.encode(x))):
            try:
                ops[part] = profile_ops(torch, fn, cuda, top=20)
            except Exception as exc:   # noqa: BLE001 - a profile is for reading; the timings above stand
                ops[part] = [{"error": f"{type(exc).__name__}: {exc}"[:300]}]
    result = {"device": torch.cuda.get_device_name() if cuda else "cpu", "torch": torch.__version__,
              "backbone": backbone, "batch": args.batch, "dtype": str(dtype).replace("torch.", ""),
              "variants": rows, "decoder_overlap": overlap,
              "decoder_profile_all_parts": decoder_profile, "ops_by_shape_all_parts": ops,
              "encoder_batch_sweep": sweep}
    args.out.mkdir(parents=True, exist_ok=True)
    save = lambda: commit_json(output_file(args.out / "gpu_parts.json"), result)  # noqa: E731 - renamed into place
    save()   # the variants are kept should the sweep below run out of the step's time
    if fast_all is not None:
        flops = encoder_flops(fast_all.models[0])
        for b in sorted({args.batch, *args.sweep}):
            try:
                xb = x[:1].repeat(b, 1, 1, 1)
                if cuda:
                    torch.cuda.synchronize()
                    torch.cuda.reset_peak_memory_stats()
                with torch.inference_mode():
                    if cuda:
                        enc = GraphedStep(lambda t: tuple(fast_all.encode(t)), xb)
                        dt = timed(lambda: enc(xb))
                        del enc
                    else:
                        dt = timed(lambda: fast_all.encode(xb))
                sweep[b] = {"encoder_ms_per_image": 1000 * dt / b, "encoder_tflops": flops * b / dt / 1e12,
                            "torch_peak_gib": torch.cuda.max_memory_allocated() / 2 ** 30 if cuda else None}
            except Exception as exc:   # e.g. out of memory at a large batch: the others still count
                traceback.print_exc(limit=4)
                sweep[b] = {"error": f"{type(exc).__name__}: {exc}"[:300]}
            print(f"encoder, every part, batch {b}: {sweep[b]}", flush=True)
            save()

    base = rows.get("all", {})
    print(f"\n{backbone}, batch {args.batch}, {result['dtype']}, {result['device']}: ms per batch "
          "(encoder / decoders of 3 heads); 'all but X' slower than 'all' = what part X gains")
    print("| variant | encoder ms | decoder ms | vs all (enc / dec) | max |Δ| vs none |\n|---|---|---|---|---|")
    for name, r in rows.items():
        if "error" in r:
            print(f"| {name} | failed: {r['error']} | | | |")
            continue
        rel = (f"{r['encoder_ms'] / base['encoder_ms']:.2f} / {r['decoder_ms'] / base['decoder_ms']:.2f}"
               if "encoder_ms" in base else "–")
        diff = "–" if r["max_abs_diff_vs_none"] is None else f"{r['max_abs_diff_vs_none']:.3g}"
        eager = " (eager: no CUDA graph)" if r.get("cuda_graphs_error") else ""
        print(f"| {name}{eager} | {r['encoder_ms']:.2f} | {r['decoder_ms']:.2f} | {rel} | {diff} |")
    for p in decoder_profile[:8]:
        print(f"    decoder {p['ms']:8.3f} ms {p['calls']:4d}x  {p['name'][:90]}")
    for part, rows_ in ops.items():
        for p in rows_[:12]:
            print(f"    {part} op {p['ms']:8.3f} ms {p['calls']:4d}x  {p['op']} {p['shapes']}" if "error" not in p
                  else f"    {part} ops: {p['error']}")
    print("\n| batch | encoder ms per image | TFLOP/s | torch peak GiB |\n|---|---|---|---|")
    for b, r in sweep.items():
        print(f"| {b} | failed: {r['error']} | | |" if "error" in r else
              f"| {b} | {r['encoder_ms_per_image']:.2f} | {r['encoder_tflops']:.1f} | "
              + ("–" if r["torch_peak_gib"] is None else f"{r['torch_peak_gib']:.2f}") + " |")
    return 0 if all("error" not in r for r in (*rows.values(), *sweep.values())) else 1


if __name__ == "__main__":
    sys.exit(main())
