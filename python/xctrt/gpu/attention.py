"""SAM image-encoder attention with decomposed relative-position bias.

For a (B, H, W, C) block input with nh heads (head dim D, N = H*W tokens) SAM computes, per batch*head,

    S[i, j] = (q_i * scale) . k_j + rel_h[i, kh(j)] + rel_w[i, kw(j)]      j = kh*W + kw
    out     = softmax_j(S) @ v

with rel_h[i, kh] = q_i . Ph[qh(i) - kh + H - 1] and rel_w[i, kw] = q_i . Pw[qw(i) - kw + W - 1] (unscaled
q; Ph, Pw are the learned rel_pos_h / rel_pos_w tables of 2H-1 and 2W-1 relative offsets).

Tensors are (B, NH, N, D) with any strides: q, k, v as views of the qkv projection (B, N, 3, NH, D),
without the copy a (B*NH, N, D) layout needs; the fused kernel writes its output so that it is already
the (B, N, NH*D) input of the output projection.

Every implementation here takes the offset terms off_h[i, t] = q_i . Ph[t] (B, NH, N, 2H-1) and off_w
(B, NH, N, 2W-1): one plain matrix product each (relative_offset_terms), where the per-query tables of
SAM's own formulation need a batched product per grid row with the operands transposed. The bias terms
are read out of them by offset (relative_bias_terms); the fused kernel does that itself, per tile. A query
reads only H of its 2H-1 offsets (those of its own grid's keys): offset_terms_triton writes just those,
in the same layouts, and offset_terms_for_triton picks per shape whichever way is faster on the device.

  attention_reference  plain float32 (or float64) maths, the test oracle
  attention_sdpa       materialises the (B, NH, N, N) bias and calls torch's SDPA (works everywhere)
  attention_triton     fused flash-attention kernel: the bias is never materialised, it is read per
                       score tile from the offset terms
  attention            dispatch (triton on CUDA when available, sdpa otherwise) from q, k, v and the
                       rel_pos tables
  image_window_attention  a windowed block's attention from its unpartitioned input: the projection of
                       the grid's tokens only (no padding to whole windows), the windows read in place
  rel_pos_attention    the dispatch registered as one torch operator (xctrt::rel_pos_attention), what
                       the SAM encoders call, so torch.compile treats it as a single opaque node

Only imported on the torch path; Triton is imported lazily so the module loads without it.
"""
import math
import os
import types

import torch
import torch.nn.functional as F

try:  # optional: the sdpa/reference paths work without Triton
    import triton
    import triton.language as tl
except Exception:  # noqa: BLE001 - any failure to import means "no Triton"
    triton = None
    tl = types.SimpleNamespace(constexpr=int)  # only so the kernel's annotations evaluate

# The kernel's annotations must read literally `tl.constexpr` and be real objects (the interpreter
# re-parses the source, the JIT inspects the signature), so no `from __future__ import annotations`.

__all__ = [
    "attention",
    "attention_reference",
    "attention_sdpa",
    "attention_triton",
    "choose_fastest",
    "choose_qkv_layout",
    "close_to",
    "default_config",
    "device_ms",
    "empty_output",
    "image_window_attention",
    "launch_of",
    "permuted_copy",
    "rel_pos_attention",
    "relative_bias_terms",
    "offset_terms_for_triton",
    "offset_terms_triton",
    "relative_offset_terms",
    "qkv_layout_choices",
    "split_qkv",
    "triton_available",
    "tuned_choices",
    "WINDOW_LAYOUTS",
]

LOG2E = 1.4426950408889634


# ----------------------------------------------------------------------------------------- bias terms

def _offset_table(rel_pos: torch.Tensor, size: int) -> torch.Tensor:
    """rel_pos (L, D) as the 2*size-1 offsets of a grid of `size`: itself, or, for a model trained at
    another resolution, resampled linearly along the offset axis as SAM does (in float32)."""
    length = 2 * size - 1
    if rel_pos.shape[0] == length:
        return rel_pos
    # (L, D) -> (1, D, L) -> (1, D, length) -> (length, D)
    return F.interpolate(rel_pos.float().t()[None], size=length, mode="linear")[0].t()


# aten::bmm.dtype: bf16/fp16 operands on tensor cores, float32 sums written out as float32 (torch >= 2.8)
_BMM_OUT_DTYPE = hasattr(torch.ops.aten.bmm, "dtype")


def _products(q: torch.Tensor, table: torch.Tensor, offsets_outer: bool = False) -> torch.Tensor:
    """q (B, NH, N, D) against every row of table (L, D): (B, NH, N, L) in float32 (float64 for float64 q).

    One batched product over the heads, with batch and tokens merged: for q a view of SAM's qkv
    projection that is a view too (no copy). bf16/fp16 CUDA operands stay on the tensor cores, the table
    rounded to q's dtype (exact for a bf16 model's own tables): products of bf16 values are exact in
    float32, so only the order of the float32 sums differs from upcasting first.

    Laid out per head as (B*N, L) rows, or with offsets_outer as (L, B*N): each offset's terms for all
    tokens side by side (the same values, as a strided view). The fused kernel reads rel_h one offset
    for a whole block of queries at a time, which is then one run of memory."""
    global _BMM_OUT_DTYPE
    b, nh, n, d = q.shape
    length = table.shape[0]
    if not offsets_outer:
        # Rows padded to a multiple of 8 with zeros (2H-1 is odd): an unaligned row of results keeps
        # cuBLAS on its slow align-1 kernels (2.6 ms of a 22 ms ViT-B batch of 8 on an H200,
        # 2026-11-27). The padding's columns are cut off again as a view; the kernel reads the terms
        # by their strides. (Rows of B*N tokens need no padding.)
        table = F.pad(table, (0, 0, 0, -length % 8))
    padded = table.shape[0]
    flat = q.transpose(0, 1).reshape(nh, b * n, d)
    tab = table.to(q.dtype).expand(nh, padded, d)
    out = None
    if q.is_cuda and q.dtype in (torch.bfloat16, torch.float16) and _BMM_OUT_DTYPE:
        try:
            out = (torch.bmm(tab, flat.transpose(1, 2), out_dtype=torch.float32) if offsets_outer else
                   torch.bmm(flat, tab.transpose(1, 2), out_dtype=torch.float32))
        except (RuntimeError, TypeError):   # a build without it for this dtype/device: upcast from now on
            _BMM_OUT_DTYPE = False
    if out is None:
        ct = torch.float64 if q.dtype == torch.float64 else torch.float32
        out = table.to(ct) @ flat.to(ct).transpose(1, 2) if offsets_outer else flat.to(ct) @ table.to(ct).t()
    if offsets_outer:   # (NH, L, B*N) -> (B, NH, N, L)
        return out.view(nh, length, b, n).permute(2, 0, 3, 1)
    return out[..., :length].view(nh, b, n, length).transpose(0, 1)


def relative_offset_terms(q: torch.Tensor, rel_pos_h: torch.Tensor, rel_pos_w: torch.Tensor, hw: tuple[int, int],
                          grid: tuple[int, int] | None = None) -> tuple[torch.Tensor, torch.Tensor]:
    """(off_h (B, NH, N, 2H-1), off_w (B, NH, N, 2W-1)) in float32 (float64 for float64 q) from q
    (B, NH, N, D): off_h[..., i, t] = q[..., i, :] . Ph[t], off_w likewise. off_h is laid out offsets
    outermost (see _products): per key tile the kernel reads one rel_h value per query, at one offset
    for a whole query row; off_w token by token, since a query reads its whole row of them once.
    grid=(IH, IW): q holds an IH x IW grid's tokens, whose H x W windows attend (attention_triton's grid)."""
    h, w = hw
    _grid_of(q, hw, grid)
    return (_products(q, _offset_table(rel_pos_h, h), offsets_outer=True),
            _products(q, _offset_table(rel_pos_w, w)))


def _grid_of(q: torch.Tensor, hw: tuple[int, int], grid: tuple[int, int] | None) -> tuple[int, int]:
    """(IH, IW): the token grid q (B, NH, IH*IW, D) holds (hw itself without grid); raises if q does not."""
    ih, iw = tuple(hw) if grid is None else tuple(grid)
    if q.dim() != 4 or q.shape[2] != ih * iw:
        raise ValueError(f"q must be (B, NH, N={ih * iw}, D) for hw={tuple(hw)}"
                         + (f" in a {tuple(grid)} grid" if grid else "") + f", got {tuple(q.shape)}")
    return ih, iw


def offset_terms_triton(q: torch.Tensor, rel_pos_h: torch.Tensor, rel_pos_w: torch.Tensor, hw: tuple[int, int],
                        grid: tuple[int, int] | None = None, block_t: int = 64,
                        num_warps: int = 8) -> tuple[torch.Tensor, torch.Tensor]:
    """relative_offset_terms' two tensors (same shapes, strides and float32 sums) with only the offsets a
    query's own keys use written: off_h[..., i, t] for qh(i) <= t < qh(i) + H and off_w likewise, half of
    the 2H-1 (the rest is left as torch.empty left it). That is all attention_triton and
    relative_bias_terms read. One Triton kernel (_offset_terms_fwd): both products from one read of q,
    and half the float32 stores of the plain products (for the global 64x64 grid 200 MB per table and
    block for a batch of 8 instead of 400). float32 q uses IEEE products (the interpreter, tests); the
    fast path is bf16/fp16. 64 tokens and 8 warps a program: 70 registers for the global grid's shape,
    56 for the windows in the grid, no spills (sm_90, Triton 3.8; 4 warps took 142)."""
    h, w = hw
    ih, iw = _grid_of(q, hw, grid)
    b, nh, n, d = q.shape
    if q.dtype not in (torch.float16, torch.bfloat16, torch.float32):
        raise ValueError(f"unsupported dtype {q.dtype}")
    if b * nh > _MAX_GRID_Y:
        raise ValueError(f"{b} x {nh} batch-heads: more than one launch holds ({_MAX_GRID_Y})")
    kernel = _kernel(q.device.type != "cuda" or _interpret_env(), _offset_terms_fwd, "offset_terms_triton")
    th = _offset_table(rel_pos_h, h).to(q.dtype).contiguous()
    tw = _offset_table(rel_pos_w, w).to(q.dtype).contiguous()
    lh, lw = 2 * h - 1, 2 * w - 1
    store_h = torch.empty((nh, lh, b * n), dtype=torch.float32, device=q.device)
    store_w = torch.empty((nh, b * n, lw + (-lw % 8)), dtype=torch.float32, device=q.device)   # as _products
    off_h = store_h.view(nh, lh, b, n).permute(2, 0, 3, 1)
    off_w = store_w[..., :lw].view(nh, b, n, lw).transpose(0, 1)
    if b * nh * n == 0:
        return off_h, off_w
    kernel[(triton.cdiv(n, block_t), b * nh)](
        q, th, tw, off_h, off_w, *q.stride()[:3], *off_h.stride(), *off_w.stride()[:3], n, nh, iw,
        SQD=q.stride(3), SGWK=off_w.stride(3), KH=h, KW=w,
        LHP=max(16, _next_pow2(lh)), LWP=max(16, _next_pow2(lw)), HEAD_D=d, BLOCK_D=max(16, _next_pow2(d)),
        GRID=grid is not None, IEEE=q.dtype == torch.float32, BLOCK_T=block_t, num_warps=num_warps)
    return off_h, off_w


# How the fused kernel's offset terms are made per shape: "products" (relative_offset_terms: every offset,
# two plain matrix products), "kernel" (offset_terms_triton: only the offsets read), or "auto": on CUDA
# with bf16/fp16 q, whichever choose_fastest times faster on the device, else the products. Tests set it.
OFFSET_TERMS = "auto"


def offset_terms_for_triton(q: torch.Tensor, rel_pos_h: torch.Tensor, rel_pos_w: torch.Tensor, hw: tuple[int, int],
                            grid: tuple[int, int] | None = None) -> tuple[torch.Tensor, torch.Tensor]:
    """The offset terms attention_triton reads, made the OFFSET_TERMS way."""
    way = OFFSET_TERMS
    if way == "auto":
        if q.is_cuda and q.dtype in (torch.bfloat16, torch.float16) and triton is not None:
            key = ("offset terms", tuple(q.shape), tuple(q.stride()), q.dtype, str(q.device), tuple(hw), grid)
            # the kernel's first call per shape is checked against the products' before it may be chosen
            way = choose_fastest(key, ("products", "kernel"),
                                 lambda opt: _offset_terms_by(opt, q, rel_pos_h, rel_pos_w, hw, grid),
                                 same=lambda got, want: _same_offset_terms(got, want, hw, grid))
        else:
            way = "products"
    return _offset_terms_by(way, q, rel_pos_h, rel_pos_w, hw, grid)


def offsets_read(n: int, hw: tuple[int, int], grid: tuple[int, int] | None = None, device=None):
    """Masks (N, 2H-1) and (N, 2W-1) of the offsets each token's queries read: qh <= t < qh + H, with qh
    the token's row in its H x W window (of an IW-wide grid's token, y % H), likewise for w."""
    tok = torch.arange(n, device=device)
    qh, qw = (tok // hw[1], tok % hw[1]) if grid is None else ((tok // grid[1]) % hw[0], (tok % grid[1]) % hw[1])
    th, tw = torch.arange(2 * hw[0] - 1, device=device), torch.arange(2 * hw[1] - 1, device=device)
    return ((th[None] >= qh[:, None]) & (th[None] < qh[:, None] + hw[0]),
            (tw[None] >= qw[:, None]) & (tw[None] < qw[:, None] + hw[1]))


def _same_offset_terms(got, want, hw, grid=None, tol: float = 1e-3) -> None:
    """Raise unless the offset terms the fused kernel reads agree (relative to their largest) within tol:
    float32 sums of the same products in another order differ by a rounding."""
    for a, b, read in zip(got, want, offsets_read(want[0].shape[2], hw, grid, want[0].device)):
        close_to(a[..., read], b[..., read], tol, "offset_terms_triton differs from the products")


def _offset_terms_by(way: str, q, rel_pos_h, rel_pos_w, hw, grid):
    if way == "kernel":
        return offset_terms_triton(q, rel_pos_h, rel_pos_w, hw, grid)
    if way != "products":
        raise ValueError(f"OFFSET_TERMS must be auto, products or kernel, not {way!r}")
    return relative_offset_terms(q, rel_pos_h, rel_pos_w, hw, grid=grid)


def relative_bias_terms(off_h: torch.Tensor, off_w: torch.Tensor, hw: tuple[int, int]
                        ) -> tuple[torch.Tensor, torch.Tensor]:
    """(rel_h (..., N, H), rel_w (..., N, W)): rel_h[..., i, kh] = off_h[..., i, qh(i) - kh + H - 1], likewise w."""
    h, w = hw
    i = torch.arange(h * w, device=off_h.device)
    qh, qw = (i // w)[:, None], (i % w)[:, None]
    rows = i[:, None]
    return (off_h[..., rows, qh - torch.arange(h, device=i.device)[None, :] + h - 1],
            off_w[..., rows, qw - torch.arange(w, device=i.device)[None, :] + w - 1])


def _full_bias(off_h: torch.Tensor, off_w: torch.Tensor, hw: tuple[int, int], dtype: torch.dtype) -> torch.Tensor:
    """The (..., N, N) additive bias: bias[..., i, kh*W + kw] = rel_h[..., i, kh] + rel_w[..., i, kw]."""
    rel_h, rel_w = relative_bias_terms(off_h, off_w, hw)
    return (rel_h.to(dtype)[..., :, None] + rel_w.to(dtype)[..., None, :]).flatten(-2)


def _check_shapes(q, k, v, off_h, off_w, hw, tokens: int | None = None):
    """tokens: N when q, k, v hold more tokens than one h x w grid (attention_triton's grid)."""
    h, w = hw
    if q.dim() != 4 or k.shape != q.shape or v.shape != q.shape:
        raise ValueError(f"q, k, v must share one (B, NH, N, D) shape, got {tuple(q.shape)}, "
                         f"{tuple(k.shape)}, {tuple(v.shape)}")
    b, nh, n, _ = q.shape
    if n != (h * w if tokens is None else tokens):
        raise ValueError(f"N={n} tokens do not match hw={tuple(hw)}" + (f" and {tokens} tokens" if tokens else ""))
    if tuple(off_h.shape) != (b, nh, n, 2 * h - 1) or tuple(off_w.shape) != (b, nh, n, 2 * w - 1):
        raise ValueError(f"off_h {tuple(off_h.shape)} / off_w {tuple(off_w.shape)} must be "
                         f"({b}, {nh}, {n}, {2 * h - 1}) / ({b}, {nh}, {n}, {2 * w - 1})")


def empty_output(q: torch.Tensor) -> torch.Tensor:
    """(B, NH, N, D) output laid out as (B, N, NH, D): its transpose(1, 2) is the output projection's
    (B, N, NH*D) input without a copy."""
    b, nh, n, d = q.shape
    return q.new_empty((b, n, nh, d)).transpose(1, 2)


# ------------------------------------------------------------------------------------ torch versions

def attention_reference(q, k, v, off_h, off_w, hw, scale: float | None = None) -> torch.Tensor:
    """Plain maths in float32 (float64 when q is float64); returns q's dtype."""
    _check_shapes(q, k, v, off_h, off_w, hw)
    scale = q.shape[-1] ** -0.5 if scale is None else scale
    ct = torch.float64 if q.dtype == torch.float64 else torch.float32
    s = (q.to(ct) * scale) @ k.to(ct).transpose(-2, -1) + _full_bias(off_h, off_w, hw, ct)
    return (torch.softmax(s, dim=-1) @ v.to(ct)).to(q.dtype)


def attention_sdpa(q, k, v, off_h, off_w, hw, scale: float | None = None) -> torch.Tensor:
    """torch SDPA with the bias materialised as a (B, NH, N, N) mask in q's dtype. (With 3-D inputs
    torch's fused CUDA backends are skipped: 12 TFLOP/s for the global blocks on an H200,
    gpu_attention.json of 2026-11-26.)"""
    _check_shapes(q, k, v, off_h, off_w, hw)
    scale = q.shape[-1] ** -0.5 if scale is None else scale
    bias = _full_bias(off_h, off_w, hw, q.dtype)
    return F.scaled_dot_product_attention(q, k, v, attn_mask=bias, scale=scale)


# ------------------------------------------------------------------------------------- Triton kernel

def _attn_fwd(Q, K, V, GH, GW, O,
              sqb, sqh, sqn, skb, skh, skn, svb, svh, svn, sghb, sghh, sghn, sghk, sgwb, sgwh, sgwn, sob, soh, son,
              N, NH, qk_scale, bias_scale, IH, IW, NWX, NWIN, PADTOK,
              SQD: tl.constexpr, SKD: tl.constexpr, SVD: tl.constexpr, SOD: tl.constexpr,
              SGWK: tl.constexpr,
              KH: tl.constexpr, KW: tl.constexpr, KWP: tl.constexpr, HEAD_D: tl.constexpr, BLOCK_D: tl.constexpr,
              WINDOWS: tl.constexpr, BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr):
    """One program = one (batch, head) and BLOCK_M queries (consecutive tokens); loops over the keys.
    Every tensor is addressed through its batch, head and token strides (s*b, s*h, s*n).

    Keys are visited a few whole rows of the key grid at a time: a key tile holds ROWS = BLOCK_N // KWP
    grid rows, each padded from KW to KWP slots (KWP = the power of two >= KW, so 14 -> 16 and 64 -> 64).
    Slot t of a tile is then key (row0 + t // KWP, t % KWP), so a tile's bias is rel_h (ROWS values per
    query, read from the offset terms GH at qh - kh + KH - 1) plus rel_w (KWP values per query, read from
    GW at qw - kw + KW - 1 and the same for every tile: loaded once, with the padding slots
    set to -inf, which masks them), broadcast to (BLOCK_M, ROWS, KWP). No per-element divisions or gathers
    in the loop (the contiguous tiling this replaces needed both for 14x14 windows).
    Scores are kept in the log2 domain (qk_scale = scale*log2e > 0, bias_scale = log2e) so exp2 is used.
    Per score the loop does as little as it can beside the two dots, since for 64-wide heads that work,
    not the tensor cores, bounds the kernel: rel_w is kept in units of q.k (divided by the score scale
    once), so a score tile is t = q.k + rel_w, one add; the scale and the row maximum then enter the
    exponent as one fused multiply-add, exp2(t * qk_scale - m); with whole-row key tiles (ROWS == 1)
    rel_h is one value per query and tile, folded into that row's m (the tile's maximum is taken on t,
    as scaling by qk_scale > 0 keeps the order). For the global grid's default launch that took the
    loop from 395 to 354 SASS instructions per key tile and thread, 6.3 to 4.5 float32 ones per score,
    and 170 to 139 registers, so three 4-warp programs fit an SM instead of two (sm_90, Triton 3.8;
    benchmarks/attention_sass.py).
    The innermost strides (S*D, SGWK) are constexpr: usually 1, and a compile-time 1 is what lets the
    loads vectorise whatever the Triton version specialises on its own. off_h's offset stride (sghk,
    B*N tokens) is not: a constexpr there would compile the kernel again for every batch size.

    WINDOWS: the KH x KW windows of an IH x IW token grid, read where they lie in it (every tensor
    (B, NH, IH*IW, .) in the grid's token order, as the qkv projection of the unpartitioned block
    input makes them), instead of a partitioned copy padded to whole windows. Program axis 1 numbers
    (image, window, head); window wi of an image starts at grid row (wi // NWX) * KH, column
    (wi % NWX) * KW. Where a window runs past the grid its keys are segment-anything's padding: zero
    tokens after the norm, so their k and v are the projection's bias. The projection holds that
    bias in a row after its last token (PADTOK tokens after the first image's start), and the padding
    keys are read from there; padding queries read it too and are not stored.
    """
    ROWS: tl.constexpr = BLOCK_N // KWP
    pid_m = tl.program_id(0)
    pid = tl.program_id(1).to(tl.int64)  # int64: B*N*C offsets of big batches overflow int32
    bi = pid // NH
    hi = pid % NH

    offs_m = pid_m * BLOCK_M + tl.arange(0, BLOCK_M)
    # Clamp instead of masking loads: padded query rows re-read row N-1 and are never stored.
    rows = tl.minimum(offs_m, N - 1)
    offs_d = tl.arange(0, BLOCK_D)
    d_ok = offs_d < HEAD_D
    qh = rows // KW                                   # the query's grid row and column
    qw = rows % KW
    if WINDOWS:   # bi numbers (image, window): the tokens' places in the image's grid
        wi = (bi % NWIN).to(tl.int32)
        bi = bi // NWIN
        y0 = (wi // NWX) * KH
        x0 = (wi % NWX) * KW
        pad = (PADTOK - bi * IH * IW).to(tl.int32)   # the bias row, counted from this image's first token
        q_ok = (y0 + qh < IH) & (x0 + qw < IW)
        tok = tl.where(q_ok, (y0 + qh) * IW + x0 + qw, pad)
        gtok = tl.where(q_ok, tok, 0)                 # the offset terms have no bias row
    else:
        tok = rows
        gtok = rows

    q_ptrs = Q + bi * sqb + hi * sqh + tok[:, None] * sqn + offs_d[None, :] * SQD
    k_base = K + bi * skb + hi * skh + offs_d[:, None] * SKD   # K loaded transposed: (BLOCK_D, BLOCK_N)
    v_base = V + bi * svb + hi * svh + offs_d[None, :] * SVD
    # per query: where its offset terms for key row 0 / key column 0 sit (offset qh + KH - 1, qw + KW - 1);
    # key row kh is then kh places before
    # off_h's offset axis: B*N tokens apart (relative_offset_terms), a run-time argument, so that a new
    # batch size needs no new compile; in int64, as offsets times B*N may pass 2**31
    sghk = tl.zeros([], tl.int64) + sghk
    gh_0 = GH + bi * sghb + hi * sghh + gtok * sghn + (qh + (KH - 1)) * sghk
    gw_0 = GW + bi * sgwb + hi * sgwh + gtok * sgwn + (qw + (KW - 1)) * SGWK

    if BLOCK_D == HEAD_D:
        q = tl.load(q_ptrs)
    else:
        q = tl.load(q_ptrs, mask=d_ok[None, :], other=0.0)

    # rel_w of one padded row (BLOCK_M, KWP), the same for every tile: loaded once, in units of q.k
    # (bias_scale / qk_scale); padding slots -inf
    to_dot = bias_scale / qk_scale
    kw_row = tl.arange(0, KWP)
    bias_w = tl.load(gw_0[:, None] - (tl.minimum(kw_row, KW - 1) * SGWK)[None, :]).to(tl.float32) * to_dot
    if KWP != KW:
        bias_w = tl.where((kw_row < KW)[None, :], bias_w, float("-inf"))
    slot = tl.arange(0, BLOCK_N)
    kw_c = tl.minimum(slot % KWP, KW - 1)   # padding slots re-read a real key; their score is -inf

    m_i = tl.full([BLOCK_M], float("-inf"), tl.float32)
    l_i = tl.zeros([BLOCK_M], dtype=tl.float32)
    acc = tl.zeros([BLOCK_M, BLOCK_D], dtype=tl.float32)

    for row0 in range(0, KH, ROWS):
        kh = row0 + slot // KWP
        if WINDOWS:   # keys past the grid: the bias row
            ky = y0 + tl.minimum(kh, KH - 1)
            kx = x0 + kw_c
            cols = tl.where((ky < IH) & (kx < IW), ky * IW + kx, pad)
        else:
            cols = tl.minimum(kh, KH - 1) * KW + kw_c

        if BLOCK_D == HEAD_D:
            kt = tl.load(k_base + cols[None, :] * skn)
        else:
            kt = tl.load(k_base + cols[None, :] * skn, mask=d_ok[:, None], other=0.0)
        if ROWS == 1:   # log2 score = t * qk_scale + bh: bh shifts the row's maximum instead of every score
            t = tl.dot(q, kt) + bias_w
            bh = tl.load(gh_0 - row0 * sghk).to(tl.float32) * bias_scale
            m_new = tl.maximum(m_i, tl.max(t, 1) * qk_scale + bh)
            shift = m_new - bh
        else:   # bias[i, r, c] = rel_h[i, row0 + r] + rel_w[i, c], laid out as the tile's (BLOCK_M, BLOCK_N)
            r = row0 + tl.arange(0, ROWS)
            bh = tl.load(gh_0[:, None] - (tl.minimum(r, KH - 1) * sghk)[None, :]).to(tl.float32) * to_dot
            if KH % ROWS != 0:   # the last tile runs past the grid's last row: -inf masks those rows
                bh = tl.where((r < KH)[None, :], bh, float("-inf"))   # (BLOCK_M, ROWS), not per score
            t = tl.dot(q, kt) + tl.reshape(bh[:, :, None] + bias_w[:, None, :], (BLOCK_M, BLOCK_N))
            m_new = tl.maximum(m_i, tl.max(t, 1) * qk_scale)
            shift = m_new

        # online softmax: rescale what was accumulated under the old row maximum
        alpha = tl.exp2(m_i - m_new)
        p = tl.exp2(t * qk_scale - shift[:, None])
        l_i = l_i * alpha + tl.sum(p, 1)

        if BLOCK_D == HEAD_D:
            vt = tl.load(v_base + cols[:, None] * svn)
        else:
            vt = tl.load(v_base + cols[:, None] * svn, mask=d_ok[None, :], other=0.0)
        acc = acc * alpha[:, None] + tl.dot(p.to(vt.dtype), vt)
        m_i = m_new

    acc = acc / l_i[:, None]
    if WINDOWS:
        o_ptrs = O + bi * sob + hi * soh + tok[:, None] * son + offs_d[None, :] * SOD
        tl.store(o_ptrs, acc.to(O.dtype.element_ty), mask=((offs_m < N) & q_ok)[:, None] & d_ok[None, :])
    else:
        o_ptrs = O + bi * sob + hi * soh + offs_m[:, None] * son + offs_d[None, :] * SOD
        tl.store(o_ptrs, acc.to(O.dtype.element_ty), mask=(offs_m < N)[:, None] & d_ok[None, :])


def _offset_terms_fwd(Q, TH, TW, GH, GW,
                      sqb, sqh, sqn, sghb, sghh, sghn, sghk, sgwb, sgwh, sgwn,
                      N, NH, IW,
                      SQD: tl.constexpr, SGWK: tl.constexpr, KH: tl.constexpr, KW: tl.constexpr,
                      LHP: tl.constexpr, LWP: tl.constexpr, HEAD_D: tl.constexpr, BLOCK_D: tl.constexpr,
                      GRID: tl.constexpr, IEEE: tl.constexpr, BLOCK_T: tl.constexpr):
    """One program = one (batch, head) and BLOCK_T consecutive tokens: every offset term of theirs as one
    product with each table, P = q . T^T (BLOCK_T x LHP and x LWP, float32 sums), of which each token
    stores only the KH (KW) offsets its queries read: off_h[i, t] for qh <= t < qh + KH, where qh is the
    token's row in its KH x KW window (GRID: the token is (y, x) of an IW-wide grid, qh = y % KH; else
    of one window, qh = i // KW); off_w likewise. Half the stores of writing all 2KH-1, and the table
    rows past 2KH-1 (padding to a power of two) are zeros, never stored."""
    pid_t = tl.program_id(0)
    pid = tl.program_id(1).to(tl.int64)
    bi = pid // NH
    hi = pid % NH
    toks = pid_t * BLOCK_T + tl.arange(0, BLOCK_T)
    t_ok = toks < N
    tok = tl.minimum(toks, N - 1)
    if GRID:
        qh = (tok // IW) % KH
        qw = (tok % IW) % KW
    else:
        qh = tok // KW
        qw = tok % KW
    offs_d = tl.arange(0, BLOCK_D)
    d_ok = offs_d < HEAD_D
    q = tl.load(Q + bi * sqb + hi * sqh + tok[:, None] * sqn + offs_d[None, :] * SQD, mask=d_ok[None, :], other=0.0)
    # per program an int64 base, per element int32 offsets (tokens times the offset stride: B*N*(2H-1)
    # at most): 64-bit addresses for every stored value would take twice the registers
    gh = GH + bi * sghb + hi * sghh
    gw = GW + bi * sgwb + hi * sgwh

    lh = tl.arange(0, LHP)   # tables loaded transposed: (BLOCK_D, L)
    th = tl.load(TH + lh[None, :] * HEAD_D + offs_d[:, None], mask=(lh[None, :] < 2 * KH - 1) & d_ok[:, None],
                 other=0.0)
    if IEEE:
        ph = tl.dot(q, th, input_precision="ieee")
    else:
        ph = tl.dot(q, th)
    keep = t_ok[:, None] & (lh[None, :] >= qh[:, None]) & (lh[None, :] < qh[:, None] + KH)
    tl.store(gh + (tok * sghn)[:, None] + lh[None, :] * sghk, ph, mask=keep)

    lw = tl.arange(0, LWP)
    tw = tl.load(TW + lw[None, :] * HEAD_D + offs_d[:, None], mask=(lw[None, :] < 2 * KW - 1) & d_ok[:, None],
                 other=0.0)
    if IEEE:
        pw = tl.dot(q, tw, input_precision="ieee")
    else:
        pw = tl.dot(q, tw)
    keep = t_ok[:, None] & (lw[None, :] >= qw[:, None]) & (lw[None, :] < qw[:, None] + KW)
    tl.store(gw + (tok * sgwn)[:, None] + lw[None, :] * SGWK, pw, mask=keep)


_KERNELS: dict = {}
_MAX_GRID_Y = 65535


def triton_available() -> bool:
    return triton is not None


def _interpret_env() -> bool:
    return os.environ.get("TRITON_INTERPRET", "0").lower() in ("1", "true", "on", "yes")


def _kernel(interpret: bool, fn=_attn_fwd, who: str = "attention_triton"):
    """A kernel of this module (fn), built on first use rather than at import: triton.jit decides
    compile-vs-interpret when it decorates, so building late lets a module imported before
    TRITON_INTERPRET was set still pick the interpreter. (Triton's own tl.max/tl.sum are decorated when
    triton is imported, so the variable must also have been set before that; a CPU run without it fails
    with a clear message naming `who`.)"""
    if triton is None:
        raise RuntimeError(f"{who} needs Triton")
    if interpret and not _interpret_env():
        raise RuntimeError(f"{who} on CPU tensors runs under the Triton interpreter: set "
                           "TRITON_INTERPRET=1 before triton is imported")
    key = (fn.__name__, interpret)
    if key not in _KERNELS:
        _KERNELS[key] = triton.jit(fn)
    return _KERNELS[key]


def _next_pow2(x: int) -> int:
    return 1 << max(0, (int(x) - 1).bit_length())


# Launches the CUDA path tries on its first call per (N, W, D, dtypes), keeping the fastest (triton's
# autotuner): (BLOCK_M, BLOCK_N, warps, stages, register cap per thread or None). The sweep of
# benchmarks/gpu_attention_check.py times each of them; all compile for sm_90 where _prune_launches lets
# them run, the uncapped ones without spills (tests/test_gpu_attention.py compiles every one). Those
# capped at 128 registers are for the global grid, where a key loop short of latency hiding may gain
# from more programs per SM: four 4-warp ones instead of three, two 8-warp ones instead of one; the cap
# costs them one spilled value per key tile (sm_90, Triton 3.8; benchmarks/attention_sass.py). 128-query
# blocks also read each key and value tile from L2 half as often per score as 64-query ones: each
# program reads all of its head's K and V, about 1 MB for the global grid. 32-key tiles (two padded
# rows of a 14x14 window) cover its 14 rows in 7 tiles without a masked row: 224 key slots per query
# against 256 with 64-key tiles, for more, shorter loop iterations (92 registers: five programs per SM).
TUNED_LAUNCHES = ((64, 64, 4, 3, None), (64, 64, 4, 2, None), (64, 64, 8, 3, None), (64, 64, 8, 2, None),
                  (128, 64, 8, 2, None), (64, 128, 8, 2, None), (128, 128, 8, 2, None), (64, 256, 8, 2, None),
                  (64, 32, 4, 2, None),
                  (64, 64, 4, 2, 128), (128, 64, 8, 2, 128), (128, 64, 8, 3, 128))   # every default_config is one


def launch_of(cfg: dict) -> tuple:
    """A launch dict (default_config's) as a TUNED_LAUNCHES tuple."""
    return cfg["block_m"], cfg["block_n"], cfg["num_warps"], cfg["num_stages"], cfg.get("maxnreg")


def tuned_launches_for(hw: tuple[int, int], d: int) -> list[tuple]:
    """The TUNED_LAUNCHES a shape may use: key tiles at least one padded row wide; for the 64-wide global
    grid no 256-key tiles (they spill), and register caps only there; for D > 64 (ViT-H's 80) only the
    default launch."""
    kwp = _next_pow2(hw[1])
    if d > 64:
        return [launch_of(default_config(hw, d))]
    wide = kwp >= 64
    return [t for t in TUNED_LAUNCHES if t[1] >= kwp and not (wide and t[1] > 128) and (wide or t[4] is None)]


def _prune_launches(configs, named_args, **kwargs):
    allowed = set(tuned_launches_for((kwargs["KH"], kwargs["KW"]), kwargs["HEAD_D"]))
    kept = [c for c in configs
            if (c.kwargs["BLOCK_M"], c.kwargs["BLOCK_N"], c.num_warps, c.num_stages, c.maxnreg) in allowed]
    return kept or configs[:1]


_TUNE = {"error": None}   # why tuning is off for good, once a tuned launch has failed


def _tuned_kernel():
    if "tuned" not in _KERNELS:
        configs = [triton.Config({"BLOCK_M": bm, "BLOCK_N": bn}, num_warps=nw, num_stages=ns, maxnreg=reg)
                   for bm, bn, nw, ns, reg in TUNED_LAUNCHES]
        _KERNELS["tuned"] = triton.autotune(configs=configs, key=["N", "KW", "HEAD_D", "WINDOWS"],
                                            prune_configs_by={"early_config_prune": _prune_launches})(
            triton.jit(_attn_fwd))
    return _KERNELS["tuned"]


def tuned_choices() -> dict:
    """What the CUDA path's first calls chose, per (N, W, D, dtypes...), and why tuning is off if it is."""
    tuner = _KERNELS.get("tuned")
    out = {str(key): str(cfg) for key, cfg in (tuner.cache.items() if tuner is not None else ())}
    if _TUNE["error"]:
        out["tuning off"] = _TUNE["error"]
    return out


def default_config(hw: tuple[int, int], d: int, dtype: torch.dtype = torch.bfloat16) -> dict:
    """Launch defaults for Hopper, from the sweep in benchmarks/gpu_attention_check.py on an H200 with
    Triton 3.6 (2026-11-26, benchmarks/results/gpu_throughput_h200_2026-11-26). Global 64x64 tokens
    (N=4096, D=64, 96 batch-heads): 64 x 64 tiles, 4 warps, 3 stages, 353 TFLOP/s (128 x 64 / 8 warps, the
    first guess: 261); a 64-key tile is one grid row there, the same loop as today's. Windowed 14x14
    (N=196, 2400 batch-heads): 128 x 64 / 8 warps / 2 stages was best, 43 TFLOP/s, with the contiguous key
    tiling before the padded-row one (not yet timed on a GPU: the sweep tries wider key tiles too).
    D=80 (ViT-H) keeps 64-row blocks and 8 warps: larger tiles spill on sm_90
    (tests/test_gpu_attention.py compiles each default and checks). block_n is at least one padded row.
    float32 tiles take twice the shared memory: 3 stages of the global D=80 launch need 238 KB, over
    sm_90's 227 KB per block, so float32 keeps 2 (a correctness path; bf16 is the fast one)."""
    h, w = hw
    if h * w <= 256:
        cfg = {"block_m": 64 if d > 64 else 128, "block_n": 64, "num_warps": 8, "num_stages": 2}
    else:
        cfg = {"block_m": 64, "block_n": 64, "num_warps": 8 if d > 64 else 4,
               "num_stages": 2 if dtype == torch.float32 else 3}
    cfg["block_n"] = max(cfg["block_n"], _next_pow2(w))
    return cfg


def attention_triton(q, k, v, off_h, off_w, hw, scale: float | None = None, *,
                     block_m: int | None = None, block_n: int | None = None,
                     num_warps: int | None = None, num_stages: int | None = None,
                     maxnreg: int | None = None, out: torch.Tensor | None = None,
                     grid: tuple[int, int] | None = None) -> torch.Tensor:
    """Fused attention; q, k, v (B, NH, N, D) with any strides (e.g. views of the qkv projection), the
    offset terms off_h (B, NH, N, 2H-1), off_w (B, NH, N, 2W-1). bf16/fp16 (fp32 accumulation) or float32.
    Returns (B, NH, N, D) in q's dtype, laid out as empty_output makes it or written into `out` (any
    strides) when given. CPU tensors run under the Triton interpreter.
    grid=(IH, IW): attention within each H x W window (hw) of an IH x IW token grid, the windows read
    where they lie: q, k, v, off_h, off_w and the result hold the grid's N = IH*IW tokens (the kernel's
    WINDOWS), q, k, v as views of one projection whose images follow each other and whose row after
    the last image holds the projection of a zero token (image_window_attention makes it so).
    On CUDA without overrides the launch is tuned: the first call per shape times the TUNED_LAUNCHES
    that fit it and keeps the fastest. Overrides (fixed launch, also on CPU; default_config fills the
    rest): block_m, block_n (powers of two >= 16; block_n also >= W rounded up to a power of two, one
    padded key row), num_warps, num_stages, maxnreg (a register cap per thread, e.g. 168 keeps three
    4-warp programs per Hopper SM)."""
    h, w = hw
    ih, iw = (h, w) if grid is None else grid
    _check_shapes(q, k, v, off_h, off_w, hw, None if grid is None else ih * iw)
    if not (q.dtype == k.dtype == v.dtype):
        raise ValueError("q, k, v must share one dtype")
    if q.dtype not in (torch.float16, torch.bfloat16, torch.float32):
        raise ValueError(f"unsupported dtype {q.dtype}")
    b, nh, n, d = q.shape
    nwy, nwx = -(-ih // h), -(-iw // w)
    if grid is not None:
        for t in (q, k, v):   # the zero token's row right after the last image's last token
            last = t.storage_offset() + b * n * t.stride(2) + (nh - 1) * t.stride(1) + (d - 1) * t.stride(3)
            if t.stride(0) != n * t.stride(2) or t.untyped_storage().nbytes() < (last + 1) * t.element_size():
                raise ValueError("with grid, q, k, v must be views of one projection of B*N tokens and a "
                                 "padding row after them (image_window_attention)")
    scale = d ** -0.5 if scale is None else scale
    if not (math.isfinite(scale) and scale > 0):   # the kernel takes row maxima before scaling
        raise ValueError(f"scale must be a positive finite number, got {scale}")
    cfg = default_config(hw, d, q.dtype)
    for key, val in (("block_m", block_m), ("block_n", block_n), ("num_warps", num_warps),
                     ("num_stages", num_stages), ("maxnreg", maxnreg)):
        if val is not None:
            cfg[key] = val
    bm, bn = cfg["block_m"], cfg["block_n"]
    if bm < 16 or bn < 16 or bm & (bm - 1) or bn & (bn - 1):
        raise ValueError("block_m and block_n must be powers of two >= 16 (tl.dot tiles)")
    if bn < _next_pow2(w):
        raise ValueError(f"block_n={bn} is narrower than one padded key row ({_next_pow2(w)} slots for W={w})")
    if out is None:
        out = empty_output(q)
    elif out.shape != q.shape or out.dtype != q.dtype:
        raise ValueError("out must match q's shape and dtype")
    if b == 0 or nh == 0 or n == 0:
        return out

    interpret = q.device.type != "cuda" or _interpret_env()
    # the tuned launches are sized for 2-byte tiles: float32 takes the default launch
    fixed = interpret or q.dtype == torch.float32 or _TUNE["error"] is not None or any(
        val is not None for val in (block_m, block_n, num_warps, num_stages, maxnreg))
    tensors = (q, k, v, off_h, off_w, out)
    strides = [st for t in tensors for st in t.stride()[:3]]   # batch, head, token of each
    strides[12:12] = [off_h.stride(3)]                          # and off_h's offset axis
    shape_args = dict(SQD=q.stride(3), SKD=k.stride(3), SVD=v.stride(3), SOD=out.stride(3),
                      SGWK=off_w.stride(3),
                      KH=h, KW=w, KWP=_next_pow2(w), HEAD_D=d, BLOCK_D=max(16, _next_pow2(d)),
                      WINDOWS=grid is not None)
    # programs per image and head: its windows (one with grid=None); a window's queries are h*w tokens
    nwin, nq = (1, n) if grid is None else (nwy * nwx, h * w)
    # grid axis 1 holds at most 65535 programs: very large batches go in slices (views, same strides);
    # a head's query blocks run side by side, so its K and V stay in L2
    step = max(1, _MAX_GRID_Y // (nh * nwin))
    parts = [(b0, [t[b0:b0 + step] for t in tensors]) for b0 in range(0, b, step)]

    def args(b0):   # the grid's and (in tokens from the slice's first image) the padding row's; zeros unused
        where = (ih, iw, nwx, nwin, (b - b0) * n) if grid is not None else (0,) * 5
        return (nq, nh, float(scale) * LOG2E, LOG2E) + where
    if not fixed:
        try:
            kernel = _tuned_kernel()
            for b0, part in parts:
                kernel[lambda meta, nb=part[0].shape[0] * nwin * nh: (math.ceil(nq / meta["BLOCK_M"]), nb)](
                    *part, *strides, *args(b0), **shape_args)
            return out
        except Exception as exc:   # noqa: BLE001 - tuning is an optimisation: fall back to the default launch
            _TUNE["error"] = f"{type(exc).__name__}: {exc}"[:300]
    kernel = _kernel(interpret)
    for b0, part in parts:
        kernel[(math.ceil(nq / bm), part[0].shape[0] * nwin * nh)](
            *part, *strides, *args(b0), **shape_args, BLOCK_M=bm, BLOCK_N=bn,
            num_warps=cfg["num_warps"], num_stages=cfg["num_stages"],
            **({"maxnreg": cfg["maxnreg"]} if cfg.get("maxnreg") else {}))
    return out


# ------------------------------------------------------------------------------ where q, k, v live

QKV_LAYOUTS = ("in_place", "heads_major")


def split_qkv(proj: torch.Tensor, layout: str) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """q, k, v (B, NH, N, D) from the qkv projection (B, N, 3, NH, D).

    in_place     views of the projection: no copy; a key tile's rows lie 3*NH*D apart
    heads_major  one copy into (3, NH, B, N, D): a key tile is one contiguous block, and the offset
                 terms' product reads each head's q as one matrix
    The values are the same either way; which is faster is measured (choose_qkv_layout)."""
    if layout == "in_place":
        return proj.permute(2, 0, 3, 1, 4).unbind(0)
    if layout == "heads_major":
        return permuted_copy(proj, (2, 3, 0, 1, 4)).transpose(1, 2).unbind(0)
    raise ValueError(f"unknown qkv layout {layout!r} (one of {QKV_LAYOUTS})")


def permuted_copy(t: torch.Tensor, dims: tuple[int, ...]) -> torch.Tensor:
    """t.permute(dims).contiguous(), the same bits, moved as 8-byte words where the layout allows: when
    the last dimension stays last and is contiguous, its 2- or 4-byte elements go four or two at a time.
    torch copies a permuted tensor with its generic kernel, one index computation per element. In the
    H200 shared-mode profile of 2026-11-28 ten such bf16 copies took 1.98 ms of a 20.7 ms encoder batch
    of 8; eight of them are most likely the windowed blocks' heads-major q, k, v (180 MB each way),
    about 1.5 TB/s. Anything else (other dtypes or layouts, a tensor that records gradients) is copied
    as torch would, and so is everything under torch.compile, which lays out its own copies."""
    if (t.dim() == 0 or tuple(dims)[-1] % t.dim() != t.dim() - 1 or t.requires_grad
            or torch.compiler.is_compiling()):
        return t.permute(dims).contiguous()
    ratio = 8 // t.element_size() if t.element_size() in (2, 4) else 1
    if ratio > 1 and t.stride(-1) == 1 and t.shape[-1] % ratio == 0 and t.storage_offset() % ratio == 0 \
            and all(s % ratio == 0 for s in t.stride()[:-1]):
        try:
            return t.view(torch.int64).permute(dims).contiguous().view(t.dtype)
        except RuntimeError:   # a view torch will not make (its own alignment rules): the plain copy
            pass
    return t.permute(dims).contiguous()


def image_window_attention(x: torch.Tensor, qkv: torch.nn.Linear, num_heads: int, rel_pos_h: torch.Tensor,
                           rel_pos_w: torch.Tensor, ws: int, scale: float, **triton_kw) -> torch.Tensor:
    """segment-anything's windowed Attention (ws x ws windows, relative positions) up to its output
    projection, from the block's unpartitioned normed input x (B, H, W, C), contiguous: (B, H, W, C),
    as window_unpartition would give it back.

    segment-anything pads norm1(x) with zero tokens to whole windows and projects every token. Here only
    the grid's tokens are projected, into a buffer with one more row: the projection of a zero token
    (qkv's bias, or zeros), which is what every padding token's q, k and v are, bit for bit. The fused
    kernel reads each window where it lies in the grid, and that row where the window runs past it
    (attention_triton's grid). For ViT-B at 1024x1024 that projects 32,768 tokens for a batch of 8
    instead of 39,200, and the output projection likewise."""
    b, h, w, c = x.shape
    if not x.is_contiguous() or type(qkv) is not torch.nn.Linear:
        raise ValueError("image_window_attention needs a contiguous (B, H, W, C) x and a plain nn.Linear qkv")
    rows, d = x.view(-1, c), qkv.out_features // (3 * num_heads)
    proj = torch.empty((rows.shape[0] + 1, qkv.out_features), dtype=x.dtype, device=x.device)
    if qkv.bias is not None:
        torch.addmm(qkv.bias, rows, qkv.weight.t(), out=proj[:-1])
        proj[-1] = qkv.bias
    else:
        torch.mm(rows, qkv.weight.t(), out=proj[:-1])
        proj[-1] = 0
    q, k, v = proj[:-1].view(b, h * w, 3, num_heads, d).permute(2, 0, 3, 1, 4).unbind(0)
    off_h, off_w = offset_terms_for_triton(q, rel_pos_h, rel_pos_w, (ws, ws), grid=(h, w))
    o = attention_triton(q, k, v, off_h, off_w, (ws, ws), scale, grid=(h, w), **triton_kw)
    return o.transpose(1, 2).reshape(b, h, w, c)   # laid out (B, N, NH, D) by the kernel: a view


_LAYOUT = {}   # key -> {"chosen": layout, "ms": {layout: median ms}}


def close_to(got: torch.Tensor, want: torch.Tensor, tol: float = 0.02, what: str = "differs from the first way") -> None:
    """Raise (`what`, and the difference) unless max |got - want| <= tol * max(max |want|, 1): the check of
    a result made another way (another layout, other GEMM shapes, another order of the same kernels), as
    choose_fastest's `same`. bf16 roundings in another order stay within a few units of the last place of
    the largest value (0.0039 relative); a wrong read is of its order."""
    diff, scale = float((got.float() - want.float()).abs().max()), float(want.float().abs().max())
    if not diff <= tol * max(scale, 1.0):   # NaN fails too
        raise RuntimeError(f"{what} (max |diff| {diff:.3g} of {scale:.3g})")


def choose_qkv_layout(key, run, timer=None, repeats: int = 5, same=None) -> str:
    """The faster of QKV_LAYOUTS for `run(layout)` (the whole attention from the projection), timed on
    the first call per key and remembered; "in_place" wherever nothing can be timed (CPU, a CUDA graph
    being captured, torch.compile tracing). timer(fn) -> milliseconds of one call (device_ms when None:
    the device's time, as the pipeline's CUDA graphs replay it, not the host's launches)."""
    return choose_fastest(key, QKV_LAYOUTS, run, timer, repeats, same)


# A windowed encoder block's two ways: segment-anything's (norm1 and the window partition padded to
# whole windows, attention on the copies, unpartition; the qkv and output projections on the padding
# too: 39,200 tokens for a batch of 8 at 1024x1024 where the grid has 32,768) or the grid's tokens only
# (image_window_attention), whichever FastBlock times faster per shape.
WINDOW_LAYOUTS = ("partitioned", "grid")


def choose_fastest(key, options, run, timer=None, repeats: int = 5, same=None) -> str:
    """The option of `options` whose run(option) is fastest, timed on the first call per key and
    remembered; options[0] wherever nothing can be timed (CPU, a CUDA graph being captured,
    torch.compile tracing), and where another fails (its error kept; options[0]'s failure is raised).
    same(got, want): raises unless another option's first result agrees with options[0]'s; one that
    does not is a failure (a faster wrong result cannot be chosen by timing)."""
    if torch.compiler.is_compiling():   # torch.compile lays out its own graph
        return options[0]
    if key in _LAYOUT:
        return _LAYOUT[key]["chosen"]
    if timer is None:
        if not torch.cuda.is_available() or torch.cuda.is_current_stream_capturing():
            return options[0]
        timer = device_ms
    ms, errors, first = {}, {}, None
    for option in options:
        try:
            got = run(option)   # first call: the kernel's launch tuning, allocations
            if same is not None:
                if option == options[0]:
                    first = got
                else:
                    same(got, first)
            ms[option] = sorted(timer(lambda opt=option: run(opt)) for _ in range(repeats))[repeats // 2]
        except Exception as exc:   # noqa: BLE001 - the others are options: the first remains (its failure is real)
            if option == options[0]:
                raise
            errors[option] = f"{type(exc).__name__}: {exc}"[:200]
    _LAYOUT[key] = {"chosen": min(ms, key=ms.get), "ms": ms, **({"errors": errors} if errors else {})}
    return _LAYOUT[key]["chosen"]


def device_ms(fn, runs: int = 3, cuda=None) -> float:
    """Device milliseconds per call of fn() on the current CUDA stream, the host's launch time left out.

    A sleep kernel holds the stream while `runs` calls are queued behind it, so the events around them
    time only the device's work, back to back. The sleep is made longer until the device was still in it
    when the last call had been queued (its start event not yet reached). Timing one synchronised call
    instead measures, where the device's work is short, mostly the Python that launches it: the
    windowed blocks' attention from the projection (offset products and kernel, ~0.25 ms of device
    work by the kernel's own timing) took 0.45 to 0.76 ms a call in the four H200 runs of 2026-11-27/28,
    which picked its layout one way twice and the other way twice; in the pipeline the blocks run as
    replayed CUDA graphs, device time only. `cuda`: torch.cuda or a stand-in with the same Event,
    _sleep and synchronize."""
    cuda = torch.cuda if cuda is None else cuda
    cycles, ms = 1 << 21, None   # ~1 ms at an H200's ~2 GHz; x4 per try
    for _ in range(6):
        start, end = cuda.Event(enable_timing=True), cuda.Event(enable_timing=True)
        cuda._sleep(cycles)
        start.record()
        for _ in range(runs):
            fn()
        end.record()
        ahead = not start.query()   # the device still asleep: every call queued before it began them
        end.synchronize()
        ms = start.elapsed_time(end) / runs
        if ahead:
            return ms
        cycles *= 4
    return ms   # the host outran every sleep (~1 s): the launches' time is in this figure


def qkv_layout_choices() -> dict:
    """What choose_fastest chose per key (the q/k/v layouts, FastBlock's window layouts, the offset terms'
    way), with the median ms of each option."""
    return {str(k): {"chosen": v["chosen"], "ms": {lay: round(t, 4) for lay, t in v["ms"].items()},
                     **({"errors": v["errors"]} if "errors" in v else {})}
            for k, v in _LAYOUT.items()}


# -------------------------------------------------------------------------------------------- dispatch

def _resolve_impl(impl: str, q: torch.Tensor) -> str:
    """"auto" -> triton for CUDA tensors when Triton imports, else sdpa; names checked."""
    if impl == "auto":
        impl = "triton" if q.is_cuda and triton_available() else "sdpa"
    if impl not in ("triton", "sdpa", "reference"):
        raise ValueError(f"unknown attention impl {impl!r}")
    return impl


def attention(q, k, v, rel_pos_h, rel_pos_w, hw, scale: float | None = None, impl: str = "auto",
              **triton_kw):
    """SAM's attention from q, k, v (B, NH, N, D) and the block's rel_pos_h (2H-1, D) / rel_pos_w tables
    (other lengths are resampled). impl: "auto" (triton for CUDA tensors when Triton imports, else
    sdpa), "triton", "sdpa", "reference". triton_kw (block_m, block_n, num_warps, num_stages, maxnreg) go to
    the Triton kernel."""
    impl = _resolve_impl(impl, q)
    if impl == "triton":
        off_h, off_w = offset_terms_for_triton(q, rel_pos_h, rel_pos_w, hw)
        return attention_triton(q, k, v, off_h, off_w, hw, scale, **triton_kw)
    off_h, off_w = relative_offset_terms(q, rel_pos_h, rel_pos_w, hw)
    if impl == "sdpa":
        return attention_sdpa(q, k, v, off_h, off_w, hw, scale)
    return attention_reference(q, k, v, off_h, off_w, hw, scale)


# ------------------------------------------------------------------------------ one op for torch.compile

@torch.library.custom_op("xctrt::rel_pos_attention", mutates_args=())
def rel_pos_attention(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, rel_pos_h: torch.Tensor,
                      rel_pos_w: torch.Tensor, h: int, w: int, scale: float, impl: str) -> torch.Tensor:
    """`attention` as one opaque torch operator: torch.compile keeps it whole (no graph break at the
    Triton launch, no tracing into it) and fuses the pointwise work around it. Returns (B, NH, N, D) in
    q's dtype, laid out as empty_output makes it (whatever the implementation)."""
    impl = _resolve_impl(impl, q)
    out = attention(q, k, v, rel_pos_h, rel_pos_w, (h, w), scale, impl=impl)
    return out if impl == "triton" else empty_output(q).copy_(out)   # triton writes that layout itself


@rel_pos_attention.register_fake
def _rel_pos_attention_fake(q, k, v, rel_pos_h, rel_pos_w, h, w, scale, impl):
    return empty_output(q)
