"""The fused attention kernel's work per key tile, read from its sm_90 machine code: no GPU needed.

    python benchmarks/attention_sass.py [--source FILE] [--json OUT] [--grid] [--launch M N WARPS STAGES ...]

Compiles xctrt.gpu.attention's kernel for sm_90 (H100/H200) with the local Triton and its bundled ptxas,
for the ViT-B encoder's two shapes as the encoder calls them (global 64x64 and windowed 14x14 grids,
64-wide heads, 12 heads, batch 8; q, k, v views of the qkv projection, float32 offset terms), at the
default launch and every launch the CUDA path's tuning may pick. For each it counts the SASS
instructions of the loop over key tiles by kind, per thread and per score.

For 64-wide heads the scores' softmax work, not the tensor cores, bounds such a kernel on Hopper: one
key tile is 2 x 64 multiply-adds per score on the tensor cores, against one exp2 (MUFU, 16 per clock
and SM) and a handful of float32 instructions per score that the warps must issue one by one. Fewer
instructions per score is what this script measures; whether it turns into time only a GPU can say
(benchmarks/gpu_attention_check.py).

--source FILE takes the kernel from another copy of attention.py (e.g. an older commit's, written out
with `git show REV:python/xctrt/gpu/attention.py > FILE`) for a before/after comparison. --grid also
compiles the windowed launches as they read the windows in place from the 64x64 grid (the kernel's
WINDOWS mode, attention.image_window_attention). --launch adds a launch (BLOCK_M BLOCK_N warps stages)
the tuning does not try, for every shape whose key rows it fits.
"""
from __future__ import annotations

import argparse
import collections
import importlib.util
import json
import os
import re
import subprocess
import sys
import tempfile
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "python"))

# SASS opcodes by what they cost: float32 ALU work on scores, exp2, conversions to the dot's dtype,
# register moves, memory and the tensor cores
KINDS = {"fp32": ("FADD", "FFMA", "FMUL", "FMNMX", "FSEL"), "exp2": ("MUFU",), "convert": ("F2FP",),
         "move": ("MOV", "IMAD.MOV"), "memory": ("LDG", "LDGSTS", "LDS", "LDSM", "STS"),
         "tensor": ("HGMMA", "HMMA")}
SHAPES = (((64, 64), 64), ((14, 14), 64))   # ViT-B's global and windowed attention


def encoder_signature(names, hw, d, dtype="bf16", heads=12, batch=8, launch=None, grid=None):
    """(signature, constexprs, attrs) for Triton's ahead-of-time compile of the kernel (argument names
    `names`) as the encoder launches it: q, k, v views of a (B, N, 3, NH, D) projection, the offset
    terms off_h (NH, 2H-1, B*N) and off_w (NH, B*N, L) underneath with L = 2W-1 padded to 8 (see
    attention.relative_offset_terms), the output (B, N, NH, D) underneath. grid=(IH, IW): the windows
    hw read in place from an IH x IW grid's projection (attention.image_window_attention), N = IH*IW.
    Pointers are 16-byte aligned and integers divisible by 16 marked so, as the launcher specialises
    them at run time. launch = (BLOCK_M, BLOCK_N) or None for the tile sizes' constexprs left out."""
    from xctrt.gpu import attention as A
    h, w = hw
    n = h * w if grid is None else grid[0] * grid[1]
    const = dict(SQD=1, SKD=1, SVD=1, SOD=1, SGWK=1, KH=h, KW=w, KWP=A._next_pow2(w), HEAD_D=d,
                 BLOCK_D=max(16, A._next_pow2(d)), WINDOWS=grid is not None)
    if launch is not None:
        const.update(BLOCK_M=launch[0], BLOCK_N=launch[1])
    c = heads * d
    lh, lw = 2 * h - 1, (2 * w - 1) + (-(2 * w - 1) % 8)
    ints = dict(sqb=n * 3 * c, sqh=d, sqn=3 * c, skb=n * 3 * c, skh=d, skn=3 * c, svb=n * 3 * c, svh=d,
                svn=3 * c, sghb=n, sghh=lh * batch * n, sghn=1, sghk=batch * n, sgwb=n * lw, sgwh=batch * n * lw,
                sgwn=lw, sob=n * c, soh=d, son=c, N=h * w, NH=heads)
    if grid is None:
        ints.update(IH=0, IW=0, NWX=0, NWIN=0, PADTOK=0)
    else:
        nwx = -(-grid[1] // w)
        ints.update(IH=grid[0], IW=grid[1], NWX=nwx, NWIN=-(-grid[0] // h) * nwx, PADTOK=batch * n)
    pointers = ("Q", "K", "V", "GH", "GW", "O")
    expected = set(const) | set(ints) | set(pointers) | {"qk_scale", "bias_scale", "BLOCK_M", "BLOCK_N"}
    if set(names) != expected:
        raise ValueError(f"the kernel's arguments changed: {sorted(set(names) ^ expected)}")
    sig = {nm: (f"*{dtype}" if nm in ("Q", "K", "V", "O") else "*fp32" if nm in ("GH", "GW") else "fp32"
                if nm.endswith("scale") else "constexpr" if nm in const else "i32") for nm in names}
    div16 = [nm for nm in names if nm in pointers or ints.get(nm, 1) % 16 == 0]
    attrs = {(names.index(nm),): [["tt.divisibility", 16]] for nm in div16}
    return sig, const, attrs


def _tool(name: str) -> str:
    import triton
    return os.path.join(os.path.dirname(triton.__file__), "backends", "nvidia", "bin", name)


def compile_sm90(fn, hw, d, launch, dtype="bf16", grid=None):
    """fn (a triton.jit kernel) compiled for sm_90 at launch = (BLOCK_M, BLOCK_N, warps, stages[, maxnreg])."""
    import triton
    from triton.backends.compiler import GPUTarget
    from triton.compiler import ASTSource
    sig, const, attrs = encoder_signature(fn.arg_names, hw, d, dtype, launch=launch[:2], grid=grid)
    src = ASTSource(fn=fn, signature=sig, constexprs={(fn.arg_names.index(k),): v for k, v in const.items()},
                    attrs=attrs)
    cap = launch[4] if len(launch) > 4 else None
    return triton.compile(src, target=GPUTarget("cuda", 90, 32),
                          options={"num_warps": launch[2], "num_stages": launch[3], **({"maxnreg": cap} if cap else {})})


def cuobjdump(kern, flag: str) -> str:
    """cuobjdump's output (flag: -sass, -res-usage) for a compiled kernel."""
    with tempfile.NamedTemporaryFile(suffix=".cubin", delete=False) as f:
        f.write(kern.asm["cubin"])
    try:
        return subprocess.run([_tool("cuobjdump"), flag, f.name], capture_output=True, text=True,
                              check=True).stdout
    finally:
        os.unlink(f.name)


_INSTRUCTION = re.compile(r"\s+/\*([0-9a-f]{4,})\*/\s+(?:@!?U?P\w+\s+)?([A-Z][A-Z0-9_.]*)([^;]*);")


def key_loop(sass: str) -> collections.Counter:
    """Opcodes (with their first modifier, e.g. IMAD.MOV) of the longest loop in the SASS: the
    instructions from a backward branch's target to the branch. For this kernel that is the loop over
    key tiles (the only loop; software pipelining keeps it one body)."""
    code = [(int(m.group(1), 16), m.group(2), m.group(3)) for m in map(_INSTRUCTION.match, sass.splitlines()) if m]
    best: list[str] = []
    for addr, op, rest in code:
        target = re.search(r"0x([0-9a-f]+)", rest) if op.startswith("BRA") else None
        if target and int(target.group(1), 16) < addr:
            body = [o for a, o, _ in code if int(target.group(1), 16) <= a <= addr]
            best = body if len(body) > len(best) else best
    return collections.Counter(".".join(op.split(".")[:2]) if op.startswith("IMAD.MOV") else op.split(".")[0]
                               for op in best)


def programs_per_sm(registers: int, warps: int, shared: int) -> int:
    """How many programs of this size an sm_90 SM holds at once: 64K registers (allocated per warp in
    units of 256), 228 KB of shared memory (1 KB of it reserved per program), 64 warps."""
    regs_per_warp = -(-registers * 32 // 256) * 256
    return min(65536 // (regs_per_warp * warps), 233472 // (shared + 1024), 64 // warps)


def tile_report(kern, launch) -> dict:
    """The key loop's instructions per thread by kind (KINDS), in all and per score of a key tile."""
    counts = key_loop(cuobjdump(kern, "-sass"))
    bm, bn, warps = launch[:3]
    scores = bm * bn / (32 * warps)   # scores of one key tile per thread
    row = {"instructions": sum(counts.values()), "scores_per_thread": scores}
    for kind, ops in KINDS.items():
        row[kind] = sum(counts[o] for o in ops)
    row["per_score"] = {k: round(row[k] / scores, 2) for k in ("instructions", "fp32", "exp2", "move")}
    row["spills_in_loop"] = counts["LDL"] + counts["STL"]
    # (scores per thread assume one warp group per 64 query rows; with more warps than the tile has
    # rows for, Triton splits the key tile between warp groups and the per-score figures are high)
    m = re.search(r"REG:(\d+).*?STACK:(\d+)", cuobjdump(kern, "-res-usage"))
    if m:
        row.update(registers=int(m.group(1)), spill_stack=int(m.group(2)))
        row["programs_per_sm"] = programs_per_sm(int(m.group(1)), warps, kern.metadata.shared)
    row["opcodes"] = dict(counts.most_common())
    return row


def load_attention(source: str | None):
    """xctrt.gpu.attention, or the module in the file `source` (another version of it)."""
    if source is None:
        from xctrt.gpu import attention
        return attention
    spec = importlib.util.spec_from_file_location("attention_under_test", source)
    mod = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(mod)
    return mod


def main(argv=None) -> dict:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--source", help="attention.py to take the kernel from (default: this checkout's)")
    ap.add_argument("--json", help="write the report here too")
    ap.add_argument("--grid", action="store_true", help="also the windowed launches reading the 64x64 grid in place")
    ap.add_argument("--launch", nargs=4, type=int, action="append", default=[], metavar=("M", "N", "WARPS", "STAGES"),
                    help="another launch to compile (repeatable)")
    args = ap.parse_args(argv)
    import triton
    A = load_attention(args.source)
    fn = triton.jit(A._attn_fwd)
    report = {"triton": triton.__version__, "source": args.source or "python/xctrt/gpu/attention.py",
              "launches": {}}
    print(f"Triton {triton.__version__}, sm_90, kernel from {report['source']}")
    print(f"{'shape':<12} {'launch (M, N, warps, stages, cap)':<30} {'loop instr':>10} {'fp32':>5} {'exp2':>5} "
          f"{'move':>5} {'per score: instr / fp32':>24} {'regs':>5} {'per SM':>6}")
    for hw, d in SHAPES:
        cfg = A.default_config(hw, d)
        first = (cfg["block_m"], cfg["block_n"], cfg["num_warps"], cfg["num_stages"], cfg.get("maxnreg"))
        # (an older attention.py's launches are 4-tuples, without the register cap)
        extra = [tuple(t) + (None,) for t in args.launch if t[1] >= A._next_pow2(hw[1])]
        launches = sorted({tuple(t) + (None,) * (5 - len(t)) for t in (first, *A.tuned_launches_for(hw, d), *extra)},
                          key=lambda t: tuple(x or 0 for x in t))
        grids = (None, (64, 64)) if args.grid and hw == (14, 14) else (None,)
        for launch, grid in ((t, g) for t in launches for g in grids):
            row = tile_report(compile_sm90(fn, hw, d, launch, grid=grid), launch)
            name = f"{hw[0]}x{hw[1]}/{d}" + (" grid" if grid else "")
            report["launches"][f"{name} {launch}"] = row
            if not row["instructions"]:   # one key tile covers the grid: straight-line code, no loop
                print(f"{name:<12} {str(launch):<30} {'one key tile, no loop':>40} {row.get('registers', '?'):>35}")
                continue
            print(f"{name:<12} {str(launch):<30} {row['instructions']:>10} {row['fp32']:>5} {row['exp2']:>5} "
                  f"{row['move']:>5} {row['per_score']['instructions']:>15} / {row['per_score']['fp32']:<6} "
                  f"{row.get('registers', '?'):>5} {row.get('programs_per_sm', '?'):>6}")
    if args.json:
        Path(args.json).write_text(json.dumps(report, indent=1))
    return report


if __name__ == "__main__":
    main()
