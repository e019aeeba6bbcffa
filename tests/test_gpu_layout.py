"""The encoder Block's LayerNorms fused with the window layout and the residual add (xctrt.gpu.layout),
against segment-anything's own ops, under the Triton interpreter on CPU tensors (float32; see
test_gpu_attention.py for the interpreter and the fresh-process route)."""
import copy

import pytest

from conftest import rerun_under_triton_interpreter, use_triton_interpreter

INTERPRETER = use_triton_interpreter()   # before anything imports triton (segment_anything does)

torch = pytest.importorskip("torch")
pytest.importorskip("segment_anything")

from xctrt.gpu import layout  # noqa: E402

INTERPRETER_HERE = layout.triton is not None and INTERPRETER
interpreted = pytest.mark.skipif(
    not INTERPRETER_HERE,
    reason="triton missing, or imported before TRITON_INTERPRET=1 (then run by test_triton_tests_in_fresh_process)")


def _norm(c, g):
    norm = torch.nn.LayerNorm(c, eps=1e-6)
    with torch.no_grad():
        norm.weight.copy_(torch.randn(c, generator=g))
        norm.bias.copy_(torch.randn(c, generator=g))
    return norm


@interpreted
@pytest.mark.parametrize("shape,ws", [((2, 7, 9, 24), 3), ((1, 6, 6, 20), 3), ((2, 5, 4, 24), 4)])
def test_triton_ln_window_partition_equals_segment_anything(shape, ws):
    from segment_anything.modeling.image_encoder import window_partition

    g = torch.Generator().manual_seed(sum(shape) + ws)
    x, norm = torch.randn(*shape, generator=g) * 3 + 1, _norm(shape[-1], g)
    want, pad_hw = window_partition(norm(x), ws)
    got, got_hw = layout.ln_window_partition(x, norm, ws)
    assert got_hw == pad_hw and got.shape == want.shape
    torch.testing.assert_close(got, want, rtol=1e-5, atol=1e-5)


@interpreted
@pytest.mark.parametrize("shape,ws", [((2, 7, 9, 24), 3), ((2, 5, 4, 24), 0), ((1, 6, 6, 20), 3)])
def test_triton_add_layer_norm_equals_segment_anything(shape, ws):
    from segment_anything.modeling.image_encoder import window_partition, window_unpartition

    g = torch.Generator().manual_seed(sum(shape) + ws + 1)
    shortcut, norm = torch.randn(*shape, generator=g), _norm(shape[-1], g)
    y = torch.randn(*shape, generator=g)
    if ws:
        a, pad_hw = window_partition(y, ws)
        a = a + torch.randn(a.shape, generator=g) * (a == 0)   # padding rows hold values: never read back
        want_x = shortcut + window_unpartition(a, ws, pad_hw, shape[1:3])
    else:
        a, pad_hw, want_x = y, None, shortcut + y
    x, n = layout.add_layer_norm(shortcut, a.contiguous(), norm, ws, pad_hw)
    torch.testing.assert_close(x, want_x, rtol=0, atol=0)
    torch.testing.assert_close(n, norm(want_x), rtol=1e-5, atol=1e-5)
    bias = torch.randn(shape[-1], generator=g)   # handed on with a bias added; the norm is of the sum alone
    xb, nb = layout.add_layer_norm(shortcut, a.contiguous(), norm, ws, pad_hw, x_bias=bias)
    torch.testing.assert_close(xb, want_x + bias, rtol=0, atol=0)
    torch.testing.assert_close(nb, n, rtol=0, atol=0)


@interpreted
@pytest.mark.parametrize("window", [3, 0])
def test_triton_fast_block_equals_segment_anything(window):
    """A windowed (padded grid) and a global block with relative positions: the same outputs, and the
    fused path really ran."""
    from segment_anything.modeling.image_encoder import Block
    from xctrt.gpu.sam import accelerate, fast_classes

    g = torch.Generator().manual_seed(23 + window)
    ref = Block(dim=24, num_heads=2, use_rel_pos=True, window_size=window, input_size=(7, 8) if not window else (3, 3))
    with torch.no_grad():
        for p in ref.parameters():
            p.copy_(torch.randn(p.shape, generator=g) * 0.3)
    fast = copy.deepcopy(ref)
    fast.__class__ = fast_classes()[5]
    # as segment-anything's patch embedding hands it over: a permuted view (made contiguous once, inside)
    x = torch.randn(2, 24, 7, 8, generator=g).permute(0, 2, 3, 1)
    calls = []
    real = layout.add_layer_norm
    layout.add_layer_norm = lambda *a, **k: calls.append(1) or real(*a, **k)
    try:
        with torch.inference_mode():
            a, b = ref(x), fast(x)
        assert calls == [1]
        torch.testing.assert_close(b, a, rtol=1e-4, atol=1e-4)
        trained = fast(x.detach().requires_grad_())   # recording gradients: the original path, with them
        assert calls == [1] and trained.grad_fn is not None
        torch.testing.assert_close(trained.detach(), a, rtol=1e-4, atol=1e-4)
        # the MLP's second GEMM adding onto the residual (FastMLPBlock.add_onto, the "mlp" part)
        onto = accelerate(copy.deepcopy(ref), "triton", ("block_layout", "mlp"))
        with torch.inference_mode():
            torch.testing.assert_close(onto(x), a, rtol=1e-4, atol=1e-4)
        assert len(calls) == 2 and onto.mlp.adds_onto(x)
    finally:
        layout.add_layer_norm = real


@interpreted
@pytest.mark.parametrize("grid", [(7, 8), (6, 6)])
def test_triton_fast_block_reads_windows_in_the_grid(grid):
    """A windowed block with the fast attention, both ways (attention.WINDOW_LAYOUTS): windows partitioned
    with padding, and read where they lie in the grid (projections of the grid's tokens only, no
    partition): segment-anything's outputs either way; "auto" on the CPU (nothing to time) partitions."""
    from segment_anything.modeling.image_encoder import Block
    from xctrt.gpu.sam import accelerate

    g = torch.Generator().manual_seed(sum(grid))
    ref = Block(dim=24, num_heads=2, use_rel_pos=True, window_size=3, input_size=(3, 3))
    with torch.no_grad():
        for p in ref.parameters():
            p.copy_(torch.randn(p.shape, generator=g) * 0.3)
    fast = accelerate(copy.deepcopy(ref), "triton", ("attention", "block_layout"))
    x = torch.randn(2, 24, *grid, generator=g).permute(0, 2, 3, 1)
    calls = []
    real = fast.attn.image_windows
    fast.attn.image_windows = lambda *a: calls.append(1) or real(*a)
    with torch.inference_mode():
        want = ref(x)
        for way, grid_calls in (("grid", 1), ("partitioned", 1), ("auto", 1)):
            fast.window_layout = way
            torch.testing.assert_close(fast(x), want, rtol=1e-4, atol=1e-4)
            assert len(calls) == grid_calls, way
    # with the MLP's second GEMM adding onto the residual (the "mlp" part), both ways
    onto = accelerate(copy.deepcopy(ref), "triton", ("attention", "block_layout", "mlp"))
    added = []
    real_onto = onto.mlp.add_onto
    onto.mlp.add_onto = lambda *a: added.append(1) or real_onto(*a)
    with torch.inference_mode():
        for way in ("grid", "partitioned"):
            onto.window_layout = way
            torch.testing.assert_close(onto(x), want, rtol=1e-4, atol=1e-4)
        assert len(added) == 2
    # q, k, v copied heads-major when qkv_layout says so (on the CPU "auto" takes views)
    from xctrt.gpu import attention as A
    copies = []
    real_copy = A.permuted_copy
    A.permuted_copy = lambda *a: copies.append(1) or real_copy(*a)
    try:
        fast.window_layout, fast.attn.qkv_layout = "partitioned", "heads_major"
        with torch.inference_mode():
            torch.testing.assert_close(fast(x), want, rtol=1e-4, atol=1e-4)
        assert copies == [1]
    finally:
        A.permuted_copy = real_copy
    # no fast attention (its part left out): partitioned, whatever window_layout says
    plain = accelerate(copy.deepcopy(ref), "triton", ("block_layout",))
    plain.window_layout = "grid"
    with torch.inference_mode():
        torch.testing.assert_close(plain(x), want, rtol=1e-4, atol=1e-4)


@interpreted
@pytest.mark.parametrize("shape", [(3, 5, 7, 64), (2, 9, 20), (130, 24), (1, 3, 96)])
def test_triton_layer_norm_equals_torch(shape):
    """Several rows per program, the last program part-full (130 rows of 24: 128 to a program)."""
    g = torch.Generator().manual_seed(sum(shape))
    x, norm = torch.randn(*shape, generator=g) * 2 - 1, _norm(shape[-1], g)
    got = layout.layer_norm(x, norm)
    assert got.shape == x.shape and got.is_contiguous()
    torch.testing.assert_close(got, torch.nn.functional.layer_norm(x, shape[-1:], norm.weight, norm.bias, norm.eps),
                               rtol=1e-5, atol=1e-5)


@interpreted
def test_triton_layer_norm_in_the_fast_decoder_parts():
    """The mask decoder's LayerNorm2d on a channels-last tensor and the two-way block's norm4 run
    layout.layer_norm (and give segment-anything's numbers); a tensor recording gradients keeps torch's."""
    from segment_anything.modeling.common import LayerNorm2d
    from segment_anything.modeling.transformer import TwoWayAttentionBlock
    from xctrt.gpu.sam import fast_swaps

    fast = {base: cls for _, base, cls in fast_swaps()}
    g = torch.Generator().manual_seed(31)
    ln2d, block = LayerNorm2d(16), TwoWayAttentionBlock(embedding_dim=16, num_heads=2, mlp_dim=32)
    with torch.no_grad():
        for p in [*ln2d.parameters(), *block.parameters()]:
            p.copy_(torch.randn(p.shape, generator=g) * 0.3)
    fast_ln2d, fast_block = copy.deepcopy(ln2d), copy.deepcopy(block)
    fast_ln2d.__class__, fast_block.__class__ = fast[LayerNorm2d], fast[TwoWayAttentionBlock]
    x = torch.randn(2, 16, 5, 6, generator=g).to(memory_format=torch.channels_last)
    args = (torch.randn(2, 5, 16, generator=g), torch.randn(2, 30, 16, generator=g),
            torch.randn(2, 5, 16, generator=g), torch.randn(2, 30, 16, generator=g))
    calls, real = [], layout.layer_norm
    layout.layer_norm = lambda *a, **k: calls.append(a[0].shape) or real(*a, **k)
    try:
        with torch.inference_mode():
            torch.testing.assert_close(fast_ln2d(x), ln2d(x), rtol=1e-5, atol=1e-5)
            (q0, k0), (q1, k1) = block(*args), fast_block(*args)
        assert calls == [(2, 5, 6, 16), (2, 30, 16)]
        torch.testing.assert_close(q1, q0, rtol=1e-5, atol=1e-5)
        torch.testing.assert_close(k1, k0, rtol=1e-5, atol=1e-5)
        fast_ln2d(x.requires_grad_())   # recording gradients: torch's layer_norm, with them
        assert len(calls) == 2
    finally:
        layout.layer_norm = real


@interpreted
@pytest.mark.parametrize("n,h,w,dtype", [(2, 3, 4, torch.float32), (1, 5, 5, torch.float32),
                                         (2, 4, 3, torch.bfloat16)])
def test_triton_upscale_logits_equal_the_decoders_layers(n, h, w, dtype):
    """segment-anything's upscaling (conv, LayerNorm2d, GELU, conv, GELU) and hypernetwork product, layer
    by layer, against the two kernels reading the convs' GEMM rows. In bf16 (the GPU's dtype) each layer
    rounds its output and the kernels round at the same places, but the interpreter casts float32 to bf16
    by truncation where the GPU rounds to nearest: here the kernels stay within twice the bf16 layers'
    own error against float32 (truncation's ulp against rounding's half)."""
    from segment_anything.modeling.common import LayerNorm2d
    from xctrt.gpu.sam import FastConvTranspose2d

    g = torch.Generator().manual_seed(n * 100 + h * 10 + w)
    c = 32
    seq = torch.nn.Sequential(torch.nn.ConvTranspose2d(c, c // 4, 2, 2), LayerNorm2d(c // 4), torch.nn.GELU(),
                              torch.nn.ConvTranspose2d(c // 4, c // 8, 2, 2), torch.nn.GELU())
    with torch.no_grad():
        for p in seq.parameters():
            p.copy_(torch.randn(p.shape, generator=g) * 0.5)
    x = torch.randn(n, h, w, c, generator=g)
    hyper = torch.randn(n, c // 8, generator=g)
    up = seq(x.permute(0, 3, 1, 2))
    want = (hyper[:, None, :] @ up.flatten(2)).view(n, 1, 4 * h, 4 * w)
    seq, x, hyper = seq.to(dtype), x.to(dtype), hyper.to(dtype)
    conv1, conv2 = copy.deepcopy(seq[0]), copy.deepcopy(seq[3])   # the fast part's convs: their GEMMs
    conv1.__class__ = conv2.__class__ = FastConvTranspose2d
    with torch.inference_mode():
        got = layout.upscale_logits(x, conv1, seq[1], conv2, hyper)
    assert got.shape == want.shape and got.dtype == dtype
    if dtype == torch.float32:
        torch.testing.assert_close(got, want, rtol=1e-4, atol=1e-4)
    else:   # against the float32 layers
        mine = (got.float() - want).abs().max()
        layers = (hyper[:, None, :] @ seq(x.permute(0, 3, 1, 2)).flatten(2)).view(want.shape)
        theirs = (layers.float() - want).abs().max()
        assert mine <= 2 * theirs + 1e-2, (mine, theirs)
    with pytest.raises(ValueError, match="hyper"):
        layout.upscale_logits(x, conv1, seq[1], conv2, hyper[:, :2])


@interpreted
def test_triton_fast_decoder_takes_the_fused_upscaling():
    """XctSam's decode with the fast parts: the fused upscaling runs and gives segment-anything's logits;
    with the upscale part left out, or while recording gradients, the layers run one by one."""
    from xctrt.gpu.sam import FAST_PARTS, accelerate, build_random_class_net

    net = build_random_class_net("tiny", 3, "shared", seed=2)
    sam = net.models[0]
    emb = torch.randn(2, 32, 4, 4, generator=torch.Generator().manual_seed(4))
    with torch.inference_mode():
        want = sam.low_res_logits(emb)
    calls, real = [], layout.upscale_logits
    layout.upscale_logits = lambda *a, **k: calls.append(a[0].shape) or real(*a, **k)
    try:
        for parts, fused in ((FAST_PARTS, 3), (tuple(p for p in FAST_PARTS if p != "upscale"), 0)):
            calls.clear()
            fast = accelerate(copy.deepcopy(net), "sdpa", parts).models[0]
            with torch.inference_mode():
                got = fast.low_res_logits(emb)
            assert len(calls) == fused, parts
            torch.testing.assert_close(got, want, rtol=1e-4, atol=1e-4)
        calls.clear()
        fast = accelerate(copy.deepcopy(net), "sdpa").models[0]
        fast.requires_grad_(True)
        assert fast.low_res_logits(emb).grad_fn is not None and calls == []
    finally:
        layout.upscale_logits = real


@interpreted
def test_triton_layout_refuses_bad_arguments():
    norm = torch.nn.LayerNorm(8)
    with pytest.raises(ValueError, match="contiguous"):
        layout.ln_window_partition(torch.zeros(2, 4, 8), norm, 2)
    with pytest.raises(ValueError, match="affine LayerNorm"):
        layout.ln_window_partition(torch.zeros(1, 4, 4, 6), norm, 2)
    with pytest.raises(ValueError, match="rows of 8"):
        layout.add_layer_norm(torch.zeros(1, 4, 4, 8), torch.zeros(1, 4, 4, 8), norm, 3, (6, 6))
    with pytest.raises(ValueError, match="channels last"):
        layout.layer_norm(torch.zeros(2, 8, 4).transpose(1, 2), norm)
    with pytest.raises(ValueError, match="affine"):
        layout.layer_norm(torch.zeros(2, 4, 6), norm)


@pytest.mark.skipif(layout.triton is None or INTERPRETER_HERE, reason="the kernel tests ran in this process")
def test_triton_tests_in_fresh_process():
    rerun_under_triton_interpreter(__file__)


# Both kernels compiled for sm_90 with bf16 activations and ViT-B's 768 channels, as the encoder runs them
# (no GPU needed; see test_gpu_attention.py): they must build, for windowed and global blocks.
_SM90_SCRIPT = r'''
from xctrt.gpu import layout as L
report = {}
for name, fn, ptrs in (("ln_window_partition", L._ln_window_partition_kernel, {"X": "*bf16", "Y": "*bf16"}),
                       ("add_layer_norm", L._add_layer_norm_kernel,
                        {"S_P": "*bf16", "A_P": "*bf16", "OUT_P": "*bf16", "N_P": "*bf16"})):
    for ws, xb in ((14, False), (0, False), (14, True), (0, True)):
        if xb and name != "add_layer_norm":
            continue
        const = dict(WS=ws, BLOCK_T=L.TOKENS, BLOCK_C=1024, **({"HAS_XB": xb} if name == "add_layer_norm" else {}))
        sig = {nm: "constexpr" if nm in const else ptrs.get(nm) or ("*bf16" if nm in ("W_P", "B_P", "XB_P") else
               "fp32" if nm == "eps" else "i32") for nm in fn.arg_names}
        kern = compile(fn, sig, const, num_warps=4)
        key = f"{name} ws={ws}" + (" x_bias" if xb else "")
        if isinstance(kern, dict):
            report[key] = kern; continue
        m = re.search(r"REG:(\d+).*?STACK:(\d+)", cuobjdump_of(kern, "-res-usage") or "")
        report[key] = {"ptx": len(kern.asm.get("ptx", "")), "stack": int(m.group(2)) if m else 0}
for c in (64, 256, 768):   # layer_norm at the decoders' upscaling, their image tokens and ViT-B's blocks
    block_c = 1 << (c - 1).bit_length()
    const = dict(BLOCK_T=L.ROW_ELEMENTS // block_c, BLOCK_C=block_c)
    fn = L._layer_norm_kernel
    sig = {nm: "constexpr" if nm in const else "*bf16" if nm in ("X", "Y", "W_P", "B_P") else
           "fp32" if nm == "eps" else "i32" for nm in fn.arg_names}
    kern = compile(fn, sig, const, num_warps=4)
    if isinstance(kern, dict):
        report[f"layer_norm C={c}"] = kern; continue
    m = re.search(r"REG:(\d+).*?STACK:(\d+)", cuobjdump_of(kern, "-res-usage") or "")
    report[f"layer_norm C={c}"] = {"ptx": len(kern.asm.get("ptx", "")), "stack": int(m.group(2)) if m else 0}
# the mask decoders' upscaling (ViT-B: 64 channels after the first conv, 32 after the second, 2 x 2)
for name, fn, c in (("upscale_norm_gelu", L._upscale_norm_gelu_kernel, 64),
                    ("upscale_gelu_logits", L._upscale_gelu_logits_kernel, 32)):
    const = dict(S=2, BLOCK_R=L.ROW_ELEMENTS // (c * 4), BLOCK_C=c)
    sig = {nm: "constexpr" if nm in const else "*bf16" if nm in ("Y", "OUT", "W_P", "B_P", "HYP") else
           "fp32" if nm == "eps" else "i32" for nm in fn.arg_names}
    kern = compile(fn, sig, const, num_warps=4)
    if isinstance(kern, dict):
        report[name] = kern; continue
    m = re.search(r"REG:(\d+).*?STACK:(\d+)", cuobjdump_of(kern, "-res-usage") or "")
    report[name] = {"ptx": len(kern.asm.get("ptx", "")), "stack": int(m.group(2)) if m else 0}
print(json.dumps(report))
'''


@pytest.mark.skipif(layout.triton is None, reason="triton missing")
def test_layout_kernels_compile_for_sm90():
    from conftest import sm90_compile_report

    report = sm90_compile_report(_SM90_SCRIPT, timeout=300)
    assert len(report) == 11 and all(row["ptx"] > 0 for row in report.values()), report
    assert all(row["stack"] == 0 for row in report.values()), report   # no register spills
