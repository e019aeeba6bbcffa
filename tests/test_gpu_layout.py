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


@interpreted
@pytest.mark.parametrize("window", [3, 0])
def test_triton_fast_block_equals_segment_anything(window):
    """A windowed (padded grid) and a global block with relative positions: the same outputs, and the
    fused path really ran."""
    from segment_anything.modeling.image_encoder import Block
    from xctrt.gpu.sam import fast_classes

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
    finally:
        layout.add_layer_norm = real


@interpreted
def test_triton_layout_refuses_bad_arguments():
    norm = torch.nn.LayerNorm(8)
    with pytest.raises(ValueError, match="contiguous"):
        layout.ln_window_partition(torch.zeros(2, 4, 8), norm, 2)
    with pytest.raises(ValueError, match="affine LayerNorm"):
        layout.ln_window_partition(torch.zeros(1, 4, 4, 6), norm, 2)
    with pytest.raises(ValueError, match="rows of 8"):
        layout.add_layer_norm(torch.zeros(1, 4, 4, 8), torch.zeros(1, 4, 4, 8), norm, 3, (6, 6))


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
    for ws in (14, 0):
        const = dict(WS=ws, BLOCK_T=L.TOKENS, BLOCK_C=1024)
        sig = {nm: "constexpr" if nm in const else ptrs.get(nm) or ("*bf16" if nm in ("W_P", "B_P") else
               "fp32" if nm == "eps" else "i32") for nm in fn.arg_names}
        kern = compile(fn, sig, const, num_warps=4)
        if isinstance(kern, dict):
            report[f"{name} ws={ws}"] = kern; continue
        m = re.search(r"REG:(\d+).*?STACK:(\d+)", cuobjdump_of(kern, "-res-usage") or "")
        report[f"{name} ws={ws}"] = {"ptx": len(kern.asm.get("ptx", "")), "stack": int(m.group(2)) if m else 0}
print(json.dumps(report))
'''


@pytest.mark.skipif(layout.triton is None, reason="triton missing")
def test_layout_kernels_compile_for_sm90():
    from conftest import sm90_compile_report

    report = sm90_compile_report(_SM90_SCRIPT, timeout=300)
    assert len(report) == 4 and all(row["ptx"] > 0 for row in report.values())
    assert all(row["stack"] == 0 for row in report.values()), report   # no register spills
