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


def _norm_row(v, mask, W_P, B_P, cols, C, eps):
    """LayerNorm of one row v (float32) over its C valid entries, with the affine weight and bias."""
    mean = tl.sum(v, axis=0) / C
    d = tl.where(mask, v - mean, 0.0)
    rstd = tl.rsqrt(tl.sum(d * d, axis=0) / C + eps)
    w = tl.load(W_P + cols, mask=mask, other=0).to(tl.float32)
    b = tl.load(B_P + cols, mask=mask, other=0).to(tl.float32)
    return d * rstd * w + b


def _ln_window_partition_kernel(X, Y, W_P, B_P, H, W, HP, WP, C, eps, WS: tl.constexpr, BLOCK_C: tl.constexpr):
    tok = tl.program_id(0)                     # one token of the padded grid (B, HP, WP), row-major
    b, r = tok // (HP * WP), tok % (HP * WP)
    h, w = r // WP, r % WP
    cols = tl.arange(0, BLOCK_C)
    mask = cols < C
    inside = (h < H) & (w < W)
    v = tl.load(X + ((b * H + h) * W + w).to(tl.int64) * C + cols, mask=mask & inside, other=0).to(tl.float32)
    out = tl.where(inside, _norm_row(v, mask, W_P, B_P, cols, C, eps), 0.0)
    nww = WP // WS
    win = (b * (HP // WS) + h // WS) * nww + w // WS
    dst = Y + ((win * WS + h % WS) * WS + w % WS).to(tl.int64) * C + cols
    tl.store(dst, out.to(Y.dtype.element_ty), mask=mask)


def _add_layer_norm_kernel(S_P, A_P, OUT_P, N_P, W_P, B_P, H, W, HP, WP, C, eps, WS: tl.constexpr,
                           BLOCK_C: tl.constexpr):
    tok = tl.program_id(0)                     # one token of the grid (B, H, W), row-major
    b, r = tok // (H * W), tok % (H * W)
    h, w = r // W, r % W
    cols = tl.arange(0, BLOCK_C)
    mask = cols < C
    if WS > 0:                                 # a is in window layout: the token's row in its window
        win = (b * (HP // WS) + h // WS) * (WP // WS) + w // WS
        a_row = (win * WS + h % WS) * WS + w % WS
    else:
        a_row = tok
    s = tl.load(S_P + tok.to(tl.int64) * C + cols, mask=mask, other=0)
    a = tl.load(A_P + a_row.to(tl.int64) * C + cols, mask=mask, other=0)
    x = (s.to(tl.float32) + a.to(tl.float32)).to(OUT_P.dtype.element_ty)   # rounded as torch's add
    tl.store(OUT_P + tok.to(tl.int64) * C + cols, x, mask=mask)
    n = _norm_row(tl.where(mask, x.to(tl.float32), 0.0), mask, W_P, B_P, cols, C, eps)
    tl.store(N_P + tok.to(tl.int64) * C + cols, n.to(N_P.dtype.element_ty), mask=mask)


if triton is not None:
    _norm_row = triton.jit(_norm_row)
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
        _ln_window_partition_kernel[(b * hp * wp,)](x, y, norm.weight, norm.bias, h, w, hp, wp, c, float(norm.eps),
                                                    WS=ws, BLOCK_C=triton.next_power_of_2(c))
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
        _add_layer_norm_kernel[(b * h * w,)](shortcut, a, x, n, norm.weight, norm.bias, h, w, hp, wp, c,
                                             float(norm.eps), WS=ws, BLOCK_C=triton.next_power_of_2(c))
    return x, n
