"""Fill torch.compile's cache (TORCHINDUCTOR_CACHE_DIR) for the compiled anchor of `xctrt bench --gpu`,
as far as the time allows: the same network, weights dtype, batch and compile mode as the bench's
anchor (xctrt.gpu.bench.compiled_anchor) on one batch, in inference mode, nothing timed.

    python benchmarks/compile_warm.py [--batch 8] [--compile-mode max-autotune]

max-autotune did not finish compiling ViT-B in 305 s on an H200 (2026-11-26). Its autotuning results
and compiled kernels land in the cache as they are made, so a run stopped by its time limit still
leaves what it finished; benchmarks/gpu_throughput.sh brings the cache back, and a later call that
carries it compiles the anchor from there. What the bench times is the compiled program either way.
"""
from __future__ import annotations

import argparse
import sys
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "python"))


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--backbone", default="vit_b")
    ap.add_argument("--mode", default="paper", choices=["paper", "shared"])
    ap.add_argument("--batch", type=int, default=8)
    ap.add_argument("--compile-mode", default="max-autotune")
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--device", default="cuda", help="cuda (cpu only for a dry run)")
    args = ap.parse_args(argv)

    import torch

    from xctrt.gpu.bench import CLASSES, compiled_anchor
    from xctrt.gpu.sam import build_random_class_net

    cuda = args.device == "cuda"
    net = build_random_class_net(args.backbone, len(CLASSES), args.mode, seed=args.seed, device=args.device)
    comp = compiled_anchor(net, args.compile_mode, torch.bfloat16 if cuda else torch.float32)
    x = torch.rand(args.batch, 1, net.image_size, net.image_size, device=args.device)
    t0 = time.perf_counter()
    print(f"compiling {args.backbone} ({args.mode}, batch {args.batch}) with torch.compile({args.compile_mode})",
          flush=True)
    with torch.inference_mode():
        comp(x)
        if cuda:
            torch.cuda.synchronize()
    print(f"compiled in {time.perf_counter() - t0:.0f} s", flush=True)
    return 0


if __name__ == "__main__":
    sys.exit(main())
