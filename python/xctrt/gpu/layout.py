"""The ViT block's LayerNorms fused with the window layout copies and the residual add, in Triton.

segment-anything's Block runs, eagerly, per windowed block:
    norm1 -> pad -> window partition copy -> attention -> unpartition copy -> crop copy -> residual add -> norm2
Each arrow is a pass over the (B, H, W, C) activations (and the padded grid is 20 % larger at 1024²):
about 0.8 GB per windowed ViT-B block for a batch of 8. Two kernels do the same in two passes:

    ln_window_partition   x (B, H, W, C) -> LayerNorm(x) in SAM's padded window layout
                          (B * nWh * nWw, ws, ws, C), zeros on the padding (SAM pads after the norm)
    add_layer_norm        shortcut + y (y in window layout for a windowed block, then read back to the
                          grid and cropped) -> (that sum, LayerNorm of it)

Every element is computed as torch does it for a bf16 tensor: the sum in float32 rounded to the
tensor's dtype, the norm's statistics in float32 over the rounded values, the result rounded once;
the statistics' summation order differs from torch's kernel, so results agree to a rounding, not bit
for bit. torch.compile fuses the same chain itself, so the fast Block uses these only when eager.

torch tensors in, torch tensors out (CUDA; CPU tensors only under TRITON_INTERPRET=1, for tests).
"""
import types

import torch

from .attention import _interpret_env

try:
    import triton
    import triton.language as tl
except Exception:  # noqa: BLE001 - any failure to import means "no Triton"
    triton = None
    tl = types.SimpleNamespace(constexpr=int)  # only so the kernels' annotations evaluate

__all__ = ["add_layer_norm", "available", "ln_window_partition"]


def _norm_rows(v, cmask, W_P, B_P, cols, C, eps):
    """LayerNorm of the rows of v (BLOCK_T, BLOCK_C) float32 over their C valid columns (cmask), with
    the affine weight and bias."""
    mean = tl.sum(v, axis=1) / C
    d = tl.where(cmask[None, :], v - mean[:, None], 0.0)
    rstd = tl.rsqrt(tl.sum(d * d, axis=1) / C + eps)
    w = tl.load(W_P + cols, mask=cmask, other=0).to(tl.float32)
    b = tl.load(B_P + cols, mask=cmask, other=0).to(tl.float32)
    return d * rstd[:, None] * w[None, :] + b[None, :]


# Tokens per program. With one token (a row of C = 768) per program each program has little to load
# before its two reductions, and ViT-B's 33-39k programs per call wait on those: in the H200 profile of
# 2026-11-27 both kernels took about the same time per token (0.058 and 0.051 ms per call of a batch
# of 8), though the fused add moves twice the bytes per token (3.9 TB/s against the partition's 1.9).
# Several rows per program keep more loads in flight per thread, and load the weight and bias once.
TOKENS = 4


def _ln_window_partition_kernel(X, Y, W_P, B_P, NTOK, H, W, HP, WP, C, eps, WS: tl.constexpr,
                                BLOCK_T: tl.constexpr, BLOCK_C: tl.constexpr):
    tok = tl.program_id(0) * BLOCK_T + tl.arange(0, BLOCK_T)   # tokens of the padded grid (B, HP, WP)
    live = tok < NTOK
    b, r = tok // (HP * WP), tok % (HP * WP)
    h, w = r // WP, r % WP
    cols = tl.arange(0, BLOCK_C)
    cmask = cols < C
    inside = (h < H) & (w < W) & live
    src = ((b * H + h) * W + w).to(tl.int64) * C
    v = tl.load(X + src[:, None] + cols[None, :], mask=inside[:, None] & cmask[None, :], other=0).to(tl.float32)
    out = tl.where(inside[:, None], _norm_rows(v, cmask, W_P, B_P, cols, C, eps), 0.0)
    win = (b * (HP // WS) + h // WS) * (WP // WS) + w // WS
    dst = ((win * WS + h % WS) * WS + w % WS).to(tl.int64) * C
    tl.store(Y + dst[:, None] + cols[None, :], out.to(Y.dtype.element_ty), mask=live[:, None] & cmask[None, :])


def _add_layer_norm_kernel(S_P, A_P, OUT_P, N_P, W_P, B_P, NTOK, H, W, HP, WP, C, eps, WS: tl.constexpr,
                           BLOCK_T: tl.constexpr, BLOCK_C: tl.constexpr):
    tok = tl.program_id(0) * BLOCK_T + tl.arange(0, BLOCK_T)   # tokens of the grid (B, H, W)
    live = tok < NTOK
    cols = tl.arange(0, BLOCK_C)
    cmask = cols < C
    m = live[:, None] & cmask[None, :]
    if WS > 0:                                 # a is in window layout: the token's row in its window
        b, r = tok // (H * W), tok % (H * W)
        h, w = r // W, r % W
        win = (b * (HP // WS) + h // WS) * (WP // WS) + w // WS
        a_row = (win * WS + h % WS) * WS + w % WS
    else:
        a_row = tok
    at = tok.to(tl.int64)[:, None] * C + cols[None, :]
    s = tl.load(S_P + at, mask=m, other=0)
    a = tl.load(A_P + a_row.to(tl.int64)[:, None] * C + cols[None, :], mask=m, other=0)
    x = (s.to(tl.float32) + a.to(tl.float32)).to(OUT_P.dtype.element_ty)   # rounded as torch's add
    tl.store(OUT_P + at, x, mask=m)
    n = _norm_rows(tl.where(m, x.to(tl.float32), 0.0), cmask, W_P, B_P, cols, C, eps)
    tl.store(N_P + at, n.to(N_P.dtype.element_ty), mask=m)


if triton is not None:
    _norm_rows = triton.jit(_norm_rows)
    _ln_window_partition_kernel = triton.jit(_ln_window_partition_kernel)
    _add_layer_norm_kernel = triton.jit(_add_layer_norm_kernel)


def available(x: torch.Tensor) -> bool:
    """Whether the kernels can run on x: Triton and a CUDA tensor (or the interpreter, for tests)."""
    return triton is not None and (x.is_cuda or _interpret_env())


def _padded(n: int, ws: int) -> int:
    return n + (ws - n % ws) % ws


def _check(x: torch.Tensor, norm: torch.nn.LayerNorm) -> int:
    if x.ndim != 4 or not x.is_contiguous():
        raise ValueError(f"x must be a contiguous (B, H, W, C) tensor, got {tuple(x.shape)}")
    c = x.shape[-1]
    if tuple(norm.normalized_shape) != (c,) or norm.weight is None or norm.bias is None:
        raise ValueError("norm must be an affine LayerNorm over the last dimension")
    return c


def ln_window_partition(x: torch.Tensor, norm: torch.nn.LayerNorm, ws: int) -> tuple[torch.Tensor, tuple[int, int]]:
    """segment-anything's window_partition(norm(x), ws): ((B * nW, ws, ws, C), (Hp, Wp))."""
    c = _check(x, norm)
    b, h, w, _ = x.shape
    hp, wp = _padded(h, ws), _padded(w, ws)
    y = torch.empty((b * (hp // ws) * (wp // ws), ws, ws, c), dtype=x.dtype, device=x.device)
    if y.numel():
        ntok = b * hp * wp
        _ln_window_partition_kernel[(triton.cdiv(ntok, TOKENS),)](
            x, y, norm.weight, norm.bias, ntok, h, w, hp, wp, c, float(norm.eps), WS=ws, BLOCK_T=TOKENS,
            BLOCK_C=triton.next_power_of_2(c))
    return y, (hp, wp)


def add_layer_norm(shortcut: torch.Tensor, a: torch.Tensor, norm: torch.nn.LayerNorm, ws: int = 0,
                   pad_hw: tuple[int, int] | None = None) -> tuple[torch.Tensor, torch.Tensor]:
    """(x, norm(x)) for x = shortcut + a, with a (B, H, W, C), or for ws > 0 in the window layout of
    ln_window_partition: segment-anything's shortcut + window_unpartition(a, ws, pad_hw, (H, W))."""
    c = _check(shortcut, norm)
    b, h, w, _ = shortcut.shape
    hp, wp = pad_hw if ws > 0 else (h, w)
    rows = b * hp * wp
    if not a.is_contiguous() or a.numel() != rows * c or a.dtype != shortcut.dtype:
        raise ValueError(f"a must be a contiguous {shortcut.dtype} tensor of {rows} rows of {c}")
    x, n = torch.empty_like(shortcut), torch.empty_like(shortcut)
    if x.numel():
        ntok = b * h * w
        _add_layer_norm_kernel[(triton.cdiv(ntok, TOKENS),)](
            shortcut, a, x, n, norm.weight, norm.bias, ntok, h, w, hp, wp, c, float(norm.eps), WS=ws,
            BLOCK_T=TOKENS, BLOCK_C=triton.next_power_of_2(c))
    return x, n
