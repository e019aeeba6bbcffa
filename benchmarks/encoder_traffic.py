"""Memory traffic of our ViT-B encoder (or decoder) forward, operator by operator, on the meta device.

    python benchmarks/encoder_traffic.py [--batch 8] [--backbone vit_b] [--part decoder --mode shared]

Nothing is computed: every operator of one batch through `xctrt.gpu.sam` (bf16 weights, the fused
attention) runs on meta tensors, and each one that allocates its output is charged the bytes of its
tensor inputs plus its output (views are free). Matrix products and the fused attention are listed
apart: their time is set by arithmetic. The rest, over the device's copy bandwidth, is the least
time the pointwise and layout work can take unless it is fused away. The operators that allocate
are counted too: on a GPU each is at least one kernel, and the decoder's kernels are small.
--part decoder counts the mask decoders of one mode (paper: one head per model, 3 models; shared:
3 heads on one model) from the encoders' outputs to the class probabilities at the input size.
"""
from __future__ import annotations

import argparse
import sys
from collections import defaultdict
from pathlib import Path

import torch
from torch.utils._python_dispatch import TorchDispatchMode
from torch.utils._pytree import tree_flatten

sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "python"))

from xctrt.gpu.sam import accelerate, build_random_class_net  # noqa: E402

ARITHMETIC = {"aten.linear.default", "aten.mm.default", "aten.mm.dtype", "aten.addmm.default", "aten.bmm.default",
              "aten._addmm_activation.default",
              "aten.convolution.default", "aten.conv2d.default", "xctrt.rel_pos_attention.default"}


def _bytes(t) -> int:
    return t.numel() * t.element_size() if isinstance(t, torch.Tensor) else 0


class TrafficCounter(TorchDispatchMode):
    def __init__(self):
        super().__init__()
        self.rows = defaultdict(lambda: [0, 0])   # operator -> [calls, bytes]

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        out = func(*args, **(kwargs or {}))
        ins = [a for a in tree_flatten((args, kwargs))[0] if isinstance(a, torch.Tensor)]
        shared = {a.untyped_storage()._cdata for a in ins}
        # an output on an input's storage is a view (meta tensors keep storage identity): it moves nothing
        outs = [o for o in tree_flatten(out)[0] if isinstance(o, torch.Tensor)
                and o.untyped_storage()._cdata not in shared]
        if outs and func is not torch.ops.aten.empty.memory_format:   # allocating moves nothing
            row = self.rows[str(func)]
            row[0] += 1
            row[1] += sum(map(_bytes, ins)) + sum(map(_bytes, outs))
            if func is torch.ops.xctrt.rel_pos_attention.default:
                # inside the operator (its fake runs here): the float32 offset terms, (B, NH, N, 2H-1) and
                # (B, NH, N, 2W-1), written by their two products and read back by the kernel
                q, h, w = args[0], args[5], args[6]
                row[1] += 2 * 4 * q.shape[0] * q.shape[1] * q.shape[2] * (2 * h - 1 + 2 * w - 1)
        return out


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--batch", type=int, default=8)
    ap.add_argument("--backbone", default="vit_b")
    ap.add_argument("--bandwidth", type=float, default=4.3e12, help="bytes/s (H200 copy, measured here)")
    ap.add_argument("--part", choices=("encoder", "decoder"), default="encoder")
    ap.add_argument("--mode", choices=("paper", "shared"), default="paper", help="for --part decoder")
    args = ap.parse_args(argv)
    counter = TrafficCounter()

    classes = 1 if args.part == "encoder" else 3
    net = build_random_class_net(args.backbone, classes, args.mode, device="meta")
    net = accelerate(net).cast_weights(torch.bfloat16)
    x = torch.empty(args.batch, 1, net.image_size, net.image_size, device="meta")
    with torch.inference_mode():
        if args.part == "encoder":
            with counter:
                net.encode(x)
        else:
            emb = net.encode(x)
            with counter:
                net.decode(emb, net.image_size)
    rows = sorted(counter.rows.items(), key=lambda kv: -kv[1][1])
    rest = sum(b for name, (_, b) in rows if name not in ARITHMETIC)
    ops = sum(calls for _, (calls, _) in rows)
    what = "" if args.part == "encoder" else f" decoders ({args.mode} mode, 3 classes)"
    print(f"{args.backbone}{what}, batch {args.batch}, bf16: pointwise and layout traffic {rest / 1e9:.2f} GB "
          f"= {rest / args.bandwidth * 1e3:.2f} ms at {args.bandwidth / 1e12:.1f} TB/s; {ops} operators that allocate")
    for name, (calls, b) in rows:
        if b >= (1e7 if args.part == "encoder" else 1e6):
            print(f"{b / 1e9:8.2f} GB {calls:5d}x  {name}{'   (arithmetic-bound)' if name in ARITHMETIC else ''}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
