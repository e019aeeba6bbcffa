"""The ViT block's LayerNorms fused with the window layout copies and the residual add, in Triton.

segment-anything's Block runs, eagerly, per windowed block:
    norm1 -> pad -> window partition copy -> attention -> unpartition copy -> crop copy -> residual add -> norm2
Each arrow is a pass over the (B, H, W, C) activations (and the padded grid is 20 % larger at 1024²):
about 0.8 GB per windowed ViT-B block for a batch of 8. Two kernels do the same in two passes:

    ln_window_partition   x (B, H, W, C) -> LayerNorm(x) in SAM's padded window layout
                          (B * nWh * nWw, ws, ws, C), zeros on the padding (SAM pads after the norm)
    add_layer_norm        shortcut + y (y in window layout for a windowed block, then read back to the
                          grid and cropped) -> (that sum, LayerNorm of it)

and layer_norm is a plain LayerNorm over the last dimension with several rows per program, for the
norms with short rows or many of them (a global block's norm1, the neck's and the mask decoders'), and
upscale_logits the mask decoder's upscaling after its transformer, its convs' GEMMs read in place.

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

__all__ = ["add_layer_norm", "available", "layer_norm", "ln_window_partition", "plain_layer_norm", "upscale_logits"]


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


def _add_layer_norm_kernel(S_P, A_P, OUT_P, N_P, W_P, B_P, XB_P, NTOK, H, W, HP, WP, C, eps, WS: tl.constexpr,
                           HAS_XB: tl.constexpr, BLOCK_T: tl.constexpr, BLOCK_C: tl.constexpr):
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
    if HAS_XB:   # the sum handed on with a bias added (rounded again); the norm is of the sum itself
        xb = tl.load(XB_P + cols, mask=cmask, other=0).to(tl.float32)
        tl.store(OUT_P + at, (x.to(tl.float32) + xb[None, :]).to(OUT_P.dtype.element_ty), mask=m)
    else:
        tl.store(OUT_P + at, x, mask=m)
    n = _norm_rows(tl.where(m, x.to(tl.float32), 0.0), cmask, W_P, B_P, cols, C, eps)
    tl.store(N_P + at, n.to(N_P.dtype.element_ty), mask=m)


def _layer_norm_kernel(X, Y, W_P, B_P, NROW, C, eps, BLOCK_T: tl.constexpr, BLOCK_C: tl.constexpr):
    row = tl.program_id(0) * BLOCK_T + tl.arange(0, BLOCK_T)
    cols = tl.arange(0, BLOCK_C)
    cmask = cols < C
    m = (row < NROW)[:, None] & cmask[None, :]
    at = row.to(tl.int64)[:, None] * C + cols[None, :]
    v = tl.load(X + at, mask=m, other=0).to(tl.float32)
    tl.store(Y + at, _norm_rows(v, cmask, W_P, B_P, cols, C, eps).to(Y.dtype.element_ty), mask=m)


def _gelu(x):
    """The exact (erf) GELU, as torch computes it for a float32 value."""
    return 0.5 * x * (1 + tl.math.erf(x * 0.7071067811865476))


def _gemm_rows(NPIX, H, W, C, S: tl.constexpr, BLOCK_R: tl.constexpr, BLOCK_C: tl.constexpr):
    """A program's BLOCK_R rows of a stride-S transposed conv's GEMM (row r: input pixel (n, i, j) of an
    H x W grid; column c*S*S + a*S + b: channel c of output pixel (n, i*S + a, j*S + b)): which rows are
    live, their n, i, j, the channel columns and mask, the (row, channel) mask, and where sub-position 0
    of each (row, channel) is."""
    r = tl.program_id(0) * BLOCK_R + tl.arange(0, BLOCK_R)
    live = r < NPIX
    n, rem = r // (H * W), r % (H * W)
    cols = tl.arange(0, BLOCK_C)
    cmask = cols < C
    src = r.to(tl.int64)[:, None] * (C * S * S) + (cols * (S * S))[None, :]
    return live, n, rem // W, rem % W, cols, cmask, live[:, None] & cmask[None, :], src


def _out_pixel(n, i, j, a, b, H, W, S: tl.constexpr):
    """Where output pixel (n, i*S + a, j*S + b) of an (H*S) x (W*S) grid is, in pixels (int64)."""
    return ((n * (H * S) + i * S + a) * (W * S) + j * S + b).to(tl.int64)


def _upscale_norm_gelu_kernel(Y, OUT, W_P, B_P, NPIX, H, W, C, eps, S: tl.constexpr, BLOCK_R: tl.constexpr,
                              BLOCK_C: tl.constexpr):
    """GELU(LayerNorm2d(.)) of a stride-S transposed conv's output, read from its GEMM's rows: row r is
    input pixel (n, i, j), column c*S*S + a*S + b its output (n, c, i*S + a, j*S + b). Written channels
    last, each sub-position's LayerNorm over the C channels."""
    live, n, i, j, cols, cmask, m, src = _gemm_rows(NPIX, H, W, C, S, BLOCK_R, BLOCK_C)
    for a in tl.static_range(S):
        for b in tl.static_range(S):
            v = tl.load(Y + src + (a * S + b), mask=m, other=0).to(tl.float32)
            y = _norm_rows(v, cmask, W_P, B_P, cols, C, eps).to(OUT.dtype.element_ty).to(tl.float32)
            dst = _out_pixel(n, i, j, a, b, H, W, S) * C
            tl.store(OUT + dst[:, None] + cols[None, :], _gelu(y).to(OUT.dtype.element_ty), mask=m)


def _upscale_gelu_logits_kernel(Y, HYP, OUT, NPIX, H, W, C, S: tl.constexpr, BLOCK_R: tl.constexpr,
                                BLOCK_C: tl.constexpr):
    """The mask logits from the last transposed conv's GEMM rows (as above): per output pixel, its C
    channels through GELU, dotted with its image's hypernetwork vector HYP[n]."""
    live, n, i, j, cols, cmask, m, src = _gemm_rows(NPIX, H, W, C, S, BLOCK_R, BLOCK_C)
    hyp = tl.load(HYP + n.to(tl.int64)[:, None] * C + cols[None, :], mask=m, other=0).to(tl.float32)
    for a in tl.static_range(S):
        for b in tl.static_range(S):
            v = tl.load(Y + src + (a * S + b), mask=m, other=0).to(tl.float32)
            g = _gelu(v).to(OUT.dtype.element_ty).to(tl.float32)   # the activation as torch stores it
            logit = tl.sum(tl.where(m, g * hyp, 0.0), axis=1)
            tl.store(OUT + _out_pixel(n, i, j, a, b, H, W, S), logit.to(OUT.dtype.element_ty), mask=live)


if triton is not None:
    _layer_norm_kernel = triton.jit(_layer_norm_kernel)
    _upscale_norm_gelu_kernel = triton.jit(_upscale_norm_gelu_kernel)
    _upscale_gelu_logits_kernel = triton.jit(_upscale_gelu_logits_kernel)
    _gelu = triton.jit(_gelu)
    _gemm_rows = triton.jit(_gemm_rows)
    _out_pixel = triton.jit(_out_pixel)
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


# Elements per program of layer_norm: rows of 64 channels (the mask decoders' upscaling) go 64 to a
# program, ViT-B's 768 four. torch's layer_norm kernel launches a block per row, which for short rows
# is mostly waiting: the decoders' 30 layer_norm calls (131,072 rows of 64 channels three times, 32,768
# of 256 six times, the rest a few tokens) took 0.76 ms of a 3.2 ms batch of 8 in the H200 profile of
# 2026-11-28 (benchmarks/results/gpu_throughput_h200_2026-11-28/gpu_parts.json), where moving their
# bytes once takes about 0.1 ms.
ROW_ELEMENTS = 4096


def _row_tiles(c: int, per_row: int = 1) -> tuple[int, int]:
    """(BLOCK_C, rows per program) for rows of c channels, each read per_row times: ROW_ELEMENTS a program."""
    block_c = triton.next_power_of_2(c)
    return block_c, max(1, ROW_ELEMENTS // (block_c * per_row))


def layer_norm(x: torch.Tensor, norm) -> torch.Tensor:
    """`norm` (an affine LayerNorm over x's last dimension C, or segment-anything's LayerNorm2d) of x,
    several rows per program; x contiguous, its rows one after the other (as a channels-last tensor's
    permute(0, 2, 3, 1)). The result is contiguous, in x's dtype, agreeing with torch's to a rounding."""
    c = x.shape[-1]
    if not x.is_contiguous():
        raise ValueError(f"x must be contiguous with its channels last, got strides {tuple(x.stride())}")
    w, b = getattr(norm, "weight", None), getattr(norm, "bias", None)
    if w is None or b is None or tuple(w.shape) != (c,) or tuple(b.shape) != (c,):
        raise ValueError("layer_norm needs an affine weight and bias of the last dimension's size")
    y = torch.empty_like(x, memory_format=torch.contiguous_format)
    rows = x.numel() // c if c else 0
    if rows:
        block_c, block_t = _row_tiles(c)
        _layer_norm_kernel[(triton.cdiv(rows, block_t),)](x, y, w, b, rows, c, float(norm.eps),
                                                            BLOCK_T=block_t, BLOCK_C=block_c)
    return y


def plain_layer_norm(norm, x: torch.Tensor) -> bool:
    """Whether layer_norm may stand in for `norm` (an nn.LayerNorm, or segment-anything's LayerNorm2d
    given a channels-last tensor) on x: an affine norm over the last dimension of a contiguous x in x's
    dtype, eager (not under torch.compile, which fuses norms itself, nor traced for an export), not
    recording gradients (the kernel has none), and the kernels available."""
    w, b = getattr(norm, "weight", None), getattr(norm, "bias", None)
    shape = getattr(norm, "normalized_shape", (x.shape[-1],))
    return (w is not None and b is not None and tuple(shape) == (x.shape[-1],) and w.dtype == x.dtype
            and x.is_contiguous()
            and not torch.compiler.is_compiling() and not torch.jit.is_tracing() and not torch.is_autocast_enabled()
            and not (torch.is_grad_enabled() and (x.requires_grad or w.requires_grad or b.requires_grad))
            and available(x))


def upscale_logits(x: torch.Tensor, conv1, norm, conv2, hyper: torch.Tensor) -> torch.Tensor:
    """segment-anything's mask-decoder upscaling (transposed conv, LayerNorm2d, GELU, transposed conv, GELU;
    each conv's stride its kernel, S x S, with a bias) and the product with the hypernetwork vector, from
    the image tokens x (N, h, w, c), contiguous, and hyper (N, c2): the low-res mask logits
    (N, 1, h*S*S, w*S*S) in x's dtype.

    The convs (FastConvTranspose2d) stay their own GEMMs (FastConvTranspose2d.gemm); the rest is two kernels that read each
    GEMM's rows where they are, instead of a copy into channels-last pixels, a norm, a GELU, another copy,
    a GELU and a batched product, each a pass of its own (for a batch of 8 per head: ~17 MB after the first
    conv, ~34 MB after the second). Every value is rounded to x's dtype where torch's layers store it; the
    norm's statistics and the final dot product are summed in another order, so the logits agree with the
    layers' to a rounding."""
    n, h, w, c = x.shape
    s = conv1.kernel_size[0]
    c1, c2 = conv1.out_channels, conv2.out_channels
    if not x.is_contiguous() or tuple(hyper.shape) != (n, c2):
        raise ValueError(f"x must be a contiguous (N, h, w, c) tensor and hyper ({n}, {c2})")

    mid = torch.empty((n, h * s, w * s, c1), dtype=x.dtype, device=x.device)   # channels last
    out = torch.empty((n, 1, h * s * s, w * s * s), dtype=x.dtype, device=x.device)
    if not out.numel():
        return out
    y1 = conv1.gemm(x.reshape(n * h * w, c))   # FastConvTranspose2d's GEMM: columns in (C_out, S, S) order
    block_c, rows = _row_tiles(c1, s * s)
    _upscale_norm_gelu_kernel[(triton.cdiv(n * h * w, rows),)](
        y1, mid, norm.weight, norm.bias, n * h * w, h, w, c1, float(norm.eps), S=s, BLOCK_R=rows, BLOCK_C=block_c)
    y2 = conv2.gemm(mid.view(-1, c1))
    block_c, rows = _row_tiles(c2, s * s)
    npix = n * h * s * w * s
    _upscale_gelu_logits_kernel[(triton.cdiv(npix, rows),)](
        y2, hyper.contiguous(), out, npix, h * s, w * s, c2, S=s, BLOCK_R=rows, BLOCK_C=block_c)
    return out


def add_layer_norm(shortcut: torch.Tensor, a: torch.Tensor, norm: torch.nn.LayerNorm, ws: int = 0,
                   pad_hw: tuple[int, int] | None = None, x_bias: torch.Tensor | None = None
                   ) -> tuple[torch.Tensor, torch.Tensor]:
    """(x, norm(x)) for x = shortcut + a, with a (B, H, W, C), or for ws > 0 in the window layout of
    ln_window_partition: segment-anything's shortcut + window_unpartition(a, ws, pad_hw, (H, W)).
    x_bias (C,): the first result is x + x_bias instead (norm(x) unchanged), the base the block's MLP
    output is added onto in its second GEMM (FastMLPBlock.add_onto)."""
    c = _check(shortcut, norm)
    b, h, w, _ = shortcut.shape
    hp, wp = pad_hw if ws > 0 else (h, w)
    rows = b * hp * wp
    if not a.is_contiguous() or a.numel() != rows * c or a.dtype != shortcut.dtype:
        raise ValueError(f"a must be a contiguous {shortcut.dtype} tensor of {rows} rows of {c}")
    if x_bias is not None and (tuple(x_bias.shape) != (c,) or x_bias.dtype != shortcut.dtype):
        raise ValueError(f"x_bias must be a {shortcut.dtype} vector of {c}")
    x, n = torch.empty_like(shortcut), torch.empty_like(shortcut)
    if x.numel():
        ntok = b * h * w
        _add_layer_norm_kernel[(triton.cdiv(ntok, TOKENS),)](
            shortcut, a, x, n, norm.weight, norm.bias, norm.bias if x_bias is None else x_bias, ntok, h, w, hp,
            wp, c, float(norm.eps), WS=ws, HAS_XB=x_bias is not None, BLOCK_T=TOKENS,
            BLOCK_C=triton.next_power_of_2(c))
    return x, n
