"""SAM attention with decomposed relative positions: reference, SDPA and the fused Triton kernel.

The Triton kernel runs under the Triton interpreter on CPU tensors. Triton decorates its own library
functions (tl.max, tl.sum, ...) when it is imported, so the interpreter only works in a process that had
TRITON_INTERPRET=1 before triton was first imported. torch._dynamo (pulled in by segment_anything and
others) imports triton, so when another test module got there first, the kernel tests run in a fresh
child pytest instead (test_triton_tests_in_fresh_process); exactly one of the two routes runs.
"""

from unittest import mock

import pytest

torch = pytest.importorskip("torch")

from conftest import (
    rerun_under_triton_interpreter,
    sm90_compile_report,
    use_triton_interpreter,
)

INTERPRETER = use_triton_interpreter()   # before the kernels' module imports triton

from xctrt.gpu.attention import (
    QKV_LAYOUTS,
    attention,
    attention_reference,
    attention_sdpa,
    attention_triton,
    choose_qkv_layout,
    qkv_layout_choices,
    rel_pos_attention,
    permuted_copy,
    relative_bias_terms,
    relative_offset_terms,
    split_qkv,
    triton_available,
)

HAVE_TRITON = triton_available()
INTERPRETER_HERE = HAVE_TRITON and INTERPRETER
interpreted = pytest.mark.skipif(
    not INTERPRETER_HERE,
    reason="triton missing, or imported before TRITON_INTERPRET=1 (then run by test_triton_tests_in_fresh_process)")


def make_case(seed, b, hw, d, dtype=torch.float32, pos_scale=1.0, qk_scale=1.0, heads=2):
    """Fresh random q, k, v (B, NH, N, D) and the offset terms off_h, off_w from random rel_pos tables."""
    g = torch.Generator().manual_seed(seed)
    h, w = hw
    n = h * w
    q, k, v = (torch.randn(b, heads, n, d, generator=g) for _ in range(3))
    q, k = q * qk_scale, k * qk_scale
    rel_pos_h = torch.randn(2 * h - 1, d, generator=g) * pos_scale
    rel_pos_w = torch.randn(2 * w - 1, d, generator=g) * pos_scale
    off_h, off_w = relative_offset_terms(q, rel_pos_h, rel_pos_w, hw)
    return tuple(t.to(dtype) for t in (q, k, v, off_h, off_w))


def assert_close(out, ref, atol=1e-4, rtol_norm=1e-5):
    """max |out-ref| against the output's scale, and the relative Frobenius error."""
    out, ref = out.double(), ref.double()
    assert torch.isfinite(out).all()
    scale = max(1.0, ref.abs().max().item())
    err = (out - ref).abs().max().item()
    rel = ((out - ref).norm() / ref.norm().clamp_min(1e-30)).item()
    assert err < atol * scale and rel < rtol_norm, f"max err {err:.3g} (scale {scale:.3g}), rel {rel:.3g}"


# ------------------------------------------------------------------------------------ torch pieces

@pytest.mark.parametrize("hw,length", [((4, 4), None), ((5, 3), None), ((6, 4), 5)])
def test_relative_bias_terms_match_segment_anything(hw, length):
    """Offset terms (one product per table) read out by offset give segment-anything's bias exactly."""
    ie = pytest.importorskip("segment_anything.modeling.image_encoder")
    h, w = hw
    d, b = 8, 3
    g = torch.Generator().manual_seed(1)
    q = torch.randn(b, h * w, d, generator=g)
    # length differing from 2*size-1 exercises the linear resampling of the tables
    rel_pos_h = torch.randn(length or 2 * h - 1, d, generator=g)
    rel_pos_w = torch.randn(length or 2 * w - 1, d, generator=g)
    off_h, off_w = relative_offset_terms(q[:, None], rel_pos_h, rel_pos_w, hw)   # one head
    assert off_h.shape == (b, 1, h * w, 2 * h - 1) and off_w.shape == (b, 1, h * w, 2 * w - 1)
    rel_h, rel_w = relative_bias_terms(off_h[:, 0], off_w[:, 0], hw)
    assert rel_h.shape == (b, h * w, h) and rel_w.shape == (b, h * w, w)
    # SAM adds the bias to an attention map; on a zero map its result is the bias itself
    theirs = ie.add_decomposed_rel_pos(torch.zeros(b, h * w, h * w), q, rel_pos_h, rel_pos_w, hw, hw)
    ours = (rel_h[..., :, None] + rel_w[..., None, :]).reshape(b, h * w, h * w)
    torch.testing.assert_close(ours, theirs, atol=1e-5, rtol=1e-5)
    # and term by term, against SAM's own per-query tables
    rh = ie.get_rel_pos(h, h, rel_pos_h)                                  # (H, H, D)
    grid = q.reshape(b, h, w, d)
    torch.testing.assert_close(rel_h, torch.einsum("byxc,ykc->byxk", grid, rh).reshape(b, h * w, h))
    with pytest.raises(ValueError, match="must be"):
        relative_offset_terms(q[:, None, :-1], rel_pos_h, rel_pos_w, hw)


@pytest.mark.parametrize("seed", [0, 1, 2])
@pytest.mark.parametrize("hw,d", [((4, 4), 16), ((5, 3), 32), ((8, 8), 16)])
def test_sdpa_matches_reference(seed, hw, d):
    q, k, v, rel_h, rel_w = make_case(seed, 3, hw, d)
    assert_close(attention_sdpa(q, k, v, rel_h, rel_w, hw, d ** -0.5),
                 attention_reference(q, k, v, rel_h, rel_w, hw, d ** -0.5))


def test_reference_float64_and_softmax_rows():
    hw, n = (3, 5), 15
    q, k, v, rel_h, rel_w = make_case(3, 2, hw, n, dtype=torch.float64)  # D = N so v can be the identity
    assert attention_reference(q, k, v, rel_h, rel_w, hw).dtype == torch.float64  # scale defaults to D^-0.5
    # with v = identity the output is the attention matrix itself: rows sum to one
    eye = torch.eye(n, dtype=torch.float64).expand(2, 2, n, n)
    p = attention_reference(q, k, eye, rel_h, rel_w, hw)
    torch.testing.assert_close(p.sum(-1), torch.ones(2, 2, n, dtype=torch.float64))
    assert (p >= 0).all()


def test_dispatch_and_errors():
    hw, d = (4, 4), 16
    g = torch.Generator().manual_seed(5)
    q, k, v = (torch.randn(2, 3, 16, d, generator=g) for _ in range(3))
    rel_pos_h, rel_pos_w = torch.randn(7, d, generator=g), torch.randn(7, d, generator=g)
    rel_h, rel_w = relative_offset_terms(q, rel_pos_h, rel_pos_w, hw)
    ref = attention_reference(q, k, v, rel_h, rel_w, hw, 0.25)
    assert_close(attention(q, k, v, rel_pos_h, rel_pos_w, hw, 0.25), ref)  # auto on CPU -> sdpa
    assert_close(attention(q, k, v, rel_pos_h, rel_pos_w, hw, 0.25, impl="reference"), ref)
    with pytest.raises(ValueError):
        attention(q, k, v, rel_pos_h, rel_pos_w, hw, 0.25, impl="nope")
    with pytest.raises(ValueError, match="off_h"):
        attention_reference(q, k, v, rel_h[..., :-1], rel_w, hw, 0.25)
    with pytest.raises(ValueError):
        attention_sdpa(q, k, v, rel_h, rel_w, (2, 4), 0.25)
    with pytest.raises(ValueError):
        attention_reference(q, k, v[:, :-1], rel_h, rel_w, hw, 0.25)


# --------------------------------------------------------------------------------- Triton (interpreter)

# (hw, D, BLOCK_M, BLOCK_N): which kernel path each case takes. Key tiles hold ROWS = BLOCK_N // KWP grid
# rows of KWP slots (KWP = W rounded up to a power of two).
TRITON_CASES = [
    ((4, 4), 16, 16, 16),   # KWP = W, 4 rows per tile, H a multiple of the rows: no masking at all
    ((2, 16), 32, 16, 16),  # one row per tile (rel_h one column), the global blocks' loop
    ((5, 3), 32, 16, 16),   # W=3 padded to 4 slots, 4 rows per tile, 5 rows: last tile runs past the grid
    ((3, 4), 16, 16, 16),   # 4 rows per tile over 3 rows: one tile, its last row masked
    ((8, 8), 16, 32, 16),   # several query blocks; 2 rows per tile
    ((7, 5), 24, 16, 32),   # D=24 padded to 32, W=5 padded to 8, 4 rows per tile over 7 rows
    ((14, 14), 16, 32, 64), # SAM's windows: W=14 padded to 16, 4 rows per tile, 14 rows
    ((6, 7), 16, 64, 16),   # one block of all 42 queries, W=7 padded to 8, 2 rows per tile
]


@interpreted
@pytest.mark.parametrize("seed", [0, 1])
@pytest.mark.parametrize("hw,d,bm,bn", TRITON_CASES)
def test_triton_matches_reference(seed, hw, d, bm, bn):
    q, k, v, rel_h, rel_w = make_case(seed, 3, hw, d)
    out = attention_triton(q, k, v, rel_h, rel_w, hw, d ** -0.5, block_m=bm, block_n=bn)
    assert out.shape == q.shape and out.dtype == q.dtype
    assert_close(out, attention_reference(q, k, v, rel_h, rel_w, hw, d ** -0.5))


@interpreted
def test_triton_key_tile_narrower_than_a_row_is_refused():
    q, k, v, rel_h, rel_w = make_case(0, 1, (2, 20), 16)   # W=20 pads to 32 slots
    with pytest.raises(ValueError, match="narrower than one padded key row"):
        attention_triton(q, k, v, rel_h, rel_w, (2, 20), block_n=16)
    out = attention_triton(q, k, v, rel_h, rel_w, (2, 20), block_m=16)   # the default widens to 32
    assert_close(out, attention_reference(q, k, v, rel_h, rel_w, (2, 20)))


@interpreted
@pytest.mark.parametrize("scale", [0.0, -0.25, float("nan"), float("inf")])
def test_triton_refuses_a_scale_that_is_not_positive(scale):
    # the kernel takes each tile's row maximum before scaling: only a positive scale keeps the order
    q, k, v, rel_h, rel_w = make_case(0, 1, (4, 4), 16)
    with pytest.raises(ValueError, match="positive finite"):
        attention_triton(q, k, v, rel_h, rel_w, (4, 4), scale)


@interpreted
def test_triton_batch_split_over_grid_limit(monkeypatch):
    import xctrt.gpu.attention as att
    monkeypatch.setattr(att, "_MAX_GRID_Y", 4)  # 5 batches x 2 heads -> launches of 2, 2 and 1 batches
    hw = (4, 4)
    q, k, v, rel_h, rel_w = make_case(19, 5, hw, 16)
    out = attention_triton(q, k, v, rel_h, rel_w, hw, block_m=16, block_n=16)
    assert_close(out, attention_reference(q, k, v, rel_h, rel_w, hw))


@interpreted
def test_triton_float16():
    # bf16 cannot run here: the interpreter's tl.dot multiplies bf16 bit patterns as integers.
    hw, d = (8, 8), 32
    q, k, v, rel_h, rel_w = make_case(7, 2, hw, d, dtype=torch.float16)
    out = attention_triton(q, k, v, rel_h, rel_w, hw, block_m=16, block_n=32)
    assert out.dtype == torch.float16
    assert_close(out, attention_reference(q, k, v, rel_h, rel_w, hw), atol=5e-3, rtol_norm=5e-3)


@interpreted
@pytest.mark.parametrize("hw,bn", [((4, 4), 16), ((5, 3), 16)])
def test_triton_large_bias_is_stable(hw, bn):
    # bias and logits in the hundreds: exp without the running maximum would overflow
    q, k, v, rel_h, rel_w = make_case(11, 2, hw, 16, pos_scale=40.0, qk_scale=6.0)
    assert rel_h.abs().max() > 100
    ref = attention_reference(q, k, v, rel_h, rel_w, hw, 0.25)
    assert_close(attention_triton(q, k, v, rel_h, rel_w, hw, 0.25, block_m=16, block_n=bn), ref)
    assert_close(attention_sdpa(q, k, v, rel_h, rel_w, hw, 0.25), ref)


@interpreted
def test_triton_writes_every_row_and_nothing_else():
    hw, d = (5, 3), 16  # N=15: last query block is partial
    q, k, v, rel_h, rel_w = make_case(13, 2, hw, d)
    n = q.shape[2]
    big = torch.full((2, 2, n + 9, d), float("nan"))  # rows >= N of the buffer must stay untouched
    out = big[:, :, :n]
    attention_triton(q, k, v, rel_h, rel_w, hw, block_m=16, block_n=16, out=out)
    assert torch.isfinite(out).all()
    assert torch.isnan(big[:, :, n:]).all()
    assert_close(out, attention_reference(q, k, v, rel_h, rel_w, hw))


@interpreted
def test_triton_strided_inputs():
    """q, k, v as SAM's encoder passes them: views of one (B, N, 3, NH, D) projection (token stride
    3*NH*D, head stride D), the output laid out for the output projection; also a feature-strided v
    and head-major offset terms."""
    bsz, nh, hw, d = 2, 3, (4, 4), 16
    n = hw[0] * hw[1]
    g = torch.Generator().manual_seed(17)
    q, k, v = torch.randn(bsz, n, 3, nh, d, generator=g).permute(2, 0, 3, 1, 4).unbind(0)
    assert not q.is_contiguous() and q.stride() == (n * 3 * nh * d, d, 3 * nh * d, 1)
    off_h, off_w = relative_offset_terms(q, torch.randn(2 * hw[0] - 1, d, generator=g),
                                         torch.randn(2 * hw[1] - 1, d, generator=g), hw)
    ref = attention_reference(q, k, v, off_h, off_w, hw)
    out = attention_triton(q, k, v, off_h, off_w, hw, block_m=16, block_n=16)
    assert out.transpose(1, 2).is_contiguous()   # (B, N, NH, D) underneath: the projection's input as is
    assert_close(out, ref)
    # the same values copied heads-major (split_qkv): batch stride below the head stride
    qh, kh, vh = split_qkv(torch.stack([q, k, v]).permute(1, 3, 0, 2, 4), "heads_major")
    assert qh.stride() == (n * d, bsz * n * d, d, 1)
    assert torch.equal(attention_triton(qh, kh, vh, off_h, off_w, hw, block_m=16, block_n=16), out)
    vt = torch.randn(bsz, nh, d, n, generator=g).transpose(2, 3)   # D stride != 1
    assert_close(attention_triton(q, k, vt, off_h.contiguous(), off_w, hw, block_m=16, block_n=16),
                 attention_reference(q, k, vt, off_h, off_w, hw))


def test_split_qkv_layouts_hold_the_same_values():
    """in_place: views of the projection; heads_major: one copy, each head's q one (B*N, D) matrix."""
    g = torch.Generator().manual_seed(5)
    bsz, n, nh, d = 2, 12, 3, 8
    proj = torch.randn(bsz, n, 3, nh, d, generator=g)
    a, b = split_qkv(proj, "in_place"), split_qkv(proj, "heads_major")
    for i, (x, y) in enumerate(zip(a, b)):
        assert x.shape == y.shape == (bsz, nh, n, d) and torch.equal(x, y)
        assert x.data_ptr() == proj[:, :, i].data_ptr()             # a view, no copy
        assert y.transpose(0, 1).is_contiguous()                    # (NH, B, N, D) underneath
    with pytest.raises(ValueError, match="unknown qkv layout"):
        split_qkv(proj, "tokens_major")
    # the offset terms from either layout are the same numbers (CPU: the same float32 products)
    tab_h, tab_w = torch.randn(5, d, generator=g), torch.randn(7, d, generator=g)
    for x, y in zip(relative_offset_terms(a[0], tab_h, tab_w, (3, 4)), relative_offset_terms(b[0], tab_h, tab_w, (3, 4))):
        assert torch.equal(x, y)


@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16, torch.float32, torch.int32, torch.int16])
def test_permuted_copy_moves_the_same_bits(dtype):
    """Wide words or not, the copy is permute().contiguous() bit for bit: NaN payloads, signed zeros and
    subnormals included (the bits are drawn at random, never computed on)."""
    g = torch.Generator().manual_seed(11)
    size = torch.empty((), dtype=dtype).element_size()
    bits = torch.randint(-2 ** 15, 2 ** 15, (2, 5, 3, 4, 8 * 4 // size), generator=g, dtype=torch.int32)
    t = bits.to(torch.int16).view(dtype) if size == 2 else bits.view(dtype) if dtype == torch.float32 else bits
    for dims in [(2, 3, 0, 1, 4), (0, 2, 1, 3, 4), (0, 1, 2, 3, 4), (3, 2, 1, 0, 4)]:
        out = permuted_copy(t, dims)
        ref = t.permute(dims).contiguous()
        assert out.dtype == t.dtype and out.shape == ref.shape and out.is_contiguous()
        assert torch.equal(out.view(torch.uint8), ref.view(torch.uint8))
    # and these are moved as words (a copy of int64 elements), not by the fallback
    views, view = [], torch.Tensor.view
    with mock.patch.object(torch.Tensor, "view", lambda self, *a: views.append(a) or view(self, *a)):
        permuted_copy(t, (2, 3, 0, 1, 4))
    assert views == [(torch.int64,), (dtype,)]


def test_permuted_copy_takes_the_plain_copy_where_words_do_not_fit():
    """The last dimension moved, odd or strided, a misaligned start, a tensor recording gradients: each
    still gets permute().contiguous()'s values (and gradients)."""
    g = torch.Generator().manual_seed(12)
    t = torch.randn(3, 4, 6, 10, generator=g).to(torch.bfloat16)
    cases = [(t, (0, 1, 3, 2)),                      # the last dimension moves
             (t[..., :7], (1, 0, 2, 3)),             # 7 elements: not whole words
             (t[..., ::2], (1, 0, 2, 3)),            # strided last dimension
             (t.reshape(-1)[1:1 + 3 * 4 * 6 * 8].reshape(3, 4, 6, 8), (2, 1, 0, 3)),   # starts off a word
             (t[:, :, :, 1:9], (1, 0, 2, 3)),        # ... through a slice's offset
             (torch.tensor(1.5), ())]
    for x, dims in cases:
        out = permuted_copy(x, dims)
        assert torch.equal(out, x.permute(dims).contiguous()) and out.is_contiguous()
    w = torch.randn(2, 3, 8, generator=g, requires_grad=True)
    out = permuted_copy(w, (1, 0, 2))
    assert out.requires_grad
    out.sum().backward()
    assert torch.equal(w.grad, torch.ones_like(w))


def test_choose_qkv_layout_times_each_once_and_remembers(monkeypatch):
    from xctrt.gpu import attention as A

    monkeypatch.setattr(A, "_LAYOUT", {})
    calls = []
    cost = {"in_place": 2.0, "heads_major": 1.5}
    current = {}

    def run(layout):
        calls.append(layout)
        current["layout"] = layout

    def timer(fn):
        fn()
        return cost[current["layout"]]

    assert choose_qkv_layout("k1", run, timer, repeats=3) == "heads_major"
    # one untimed first call and three timed ones per layout
    assert calls == ["in_place"] * 4 + ["heads_major"] * 4
    assert choose_qkv_layout("k1", run, timer) == "heads_major" and len(calls) == 8   # remembered
    cost.update(in_place=1.0)
    assert choose_qkv_layout("k2", run, timer, repeats=3) == "in_place"
    assert qkv_layout_choices() == {"k1": {"chosen": "heads_major", "ms": {"in_place": 2.0, "heads_major": 1.5}},
                                    "k2": {"chosen": "in_place", "ms": {"in_place": 1.0, "heads_major": 1.5}}}
    assert set(QKV_LAYOUTS) == {"in_place", "heads_major"}
    def failing(layout):   # a copy that cannot be made (out of memory, say): views, and the reason kept
        if layout == "heads_major":
            raise RuntimeError("CUDA out of memory")
        run(layout)
    assert choose_qkv_layout("k4", failing, timer, repeats=1) == "in_place"
    assert qkv_layout_choices()["k4"]["errors"] == {"heads_major": "RuntimeError: CUDA out of memory"}
    with pytest.raises(RuntimeError, match="views"):
        choose_qkv_layout("k5", lambda lay: (_ for _ in ()).throw(RuntimeError("views")), timer)
    calls.clear()
    if not torch.cuda.is_available():   # nothing to time with: views, and nothing remembered
        assert choose_qkv_layout("k3", run) == "in_place" and "k3" not in A._LAYOUT and calls == []


def test_choose_fastest_drops_a_faster_way_whose_first_result_differs(monkeypatch):
    """With `same`, each way's first result is checked against the first way's before any timing can
    choose it: a faster way that agrees is chosen, a faster one that differs is dropped (reason kept)."""
    from xctrt.gpu import attention as A

    monkeypatch.setattr(A, "_LAYOUT", {})
    want = torch.randn(4, 8, generator=torch.Generator().manual_seed(1)) * 5
    results = {"first": want, "rounded": want.bfloat16().float(), "wrong": want.flip(0)}
    cost = {"first": 2.0, "rounded": 1.0, "wrong": 0.5}
    current = {}

    def run(way):
        current["way"] = way
        return results[way].clone()

    def timer(fn):
        fn()
        return cost[current["way"]]

    chosen = A.choose_fastest("k", ("first", "rounded", "wrong"), run, timer, repeats=1, same=A.close_to)
    assert chosen == "rounded"
    errors = A.qkv_layout_choices()["k"]["errors"]
    assert set(errors) == {"wrong"} and "differs from the first way" in errors["wrong"]
    # without the check the wrong way's speed would have won
    assert A.choose_fastest("k2", ("first", "rounded", "wrong"), run, timer, repeats=1) == "wrong"


def test_close_to_passes_roundings_and_refuses_errors():
    from xctrt.gpu.attention import close_to

    g = torch.Generator().manual_seed(2)
    want = torch.randn(64, 64, generator=g) * 10
    close_to(want.bfloat16(), want)   # one bf16 rounding of every value
    close_to(torch.zeros(3), torch.full((3,), 0.01))   # small values: judged against 1, not their own size
    for bad in (want + 0.3 * want.abs().max() * (torch.rand(64, 64, generator=g) > 0.99),
                torch.where(want > 2, float("nan"), want)):
        with pytest.raises(RuntimeError, match="differs"):
            close_to(bad, want)


class _SimulatedStream:
    """torch.cuda as device_ms uses it, on one simulated stream: every launch costs the host launch_ms,
    and the device runs what was queued in order, each piece from when it was queued and the device was
    free. An event is reached once the work queued before it is done."""

    def __init__(self, launch_ms: float, cycles_per_ms: float = 2e6):
        self.launch_ms, self.cycles_per_ms = launch_ms, cycles_per_ms
        self.host = self.device_free = 0.0
        self.sleeps = []
        stream = self

        class Event:
            def __init__(self, enable_timing=False):
                self.at = None

            def record(self):
                self.at = max(stream.host, stream.device_free)

            def query(self):
                return self.at <= stream.host

            def synchronize(self):
                stream.host = max(stream.host, self.at)

            def elapsed_time(self, other):
                return other.at - self.at

        self.Event = Event

    def launch(self, device_ms: float) -> None:
        self.host += self.launch_ms
        self.device_free = max(self.host, self.device_free) + device_ms

    def _sleep(self, cycles: int) -> None:
        self.sleeps.append(cycles)
        self.launch(cycles / self.cycles_per_ms)

    def synchronised_ms(self, fn) -> float:
        """One call between two events, waited for: the way the layouts were timed before device_ms."""
        start, end = self.Event(), self.Event()
        start.record()
        fn()
        end.record()
        end.synchronize()
        return start.elapsed_time(end)


def test_device_ms_times_the_device_not_the_launches(monkeypatch):
    from xctrt.gpu import attention as A

    # a layout whose launches take the host longer than its work takes the device, and one the other way
    work = {"in_place": (0.5, 0.25), "heads_major": (0.2, 0.35)}   # (host launch ms, device ms)
    sim = {lay: _SimulatedStream(host) for lay, (host, _) in work.items()}
    for lay, (_, dev) in work.items():
        s = sim[lay]
        assert s.synchronised_ms(lambda: s.launch(dev)) == pytest.approx(s.launch_ms + dev)
        assert A.device_ms(lambda: s.launch(dev), runs=3, cuda=s) == pytest.approx(dev)
    # in_place queued 3 x 0.5 ms of launches: longer than the first sleep (~1 ms), so it slept again, longer
    assert sim["in_place"].sleeps[-2:] == [1 << 21, 1 << 23]

    # the choice follows the device: synchronised single calls would have picked heads_major (0.55 vs 0.75 ms)
    monkeypatch.setattr(A, "_LAYOUT", {})
    cur = {}
    def run(layout):
        cur["layout"] = layout
        sim[layout].launch(work[layout][1])
    timer = lambda fn: A.device_ms(fn, cuda=sim[cur["layout"]])
    assert choose_qkv_layout("sim", run, timer, repeats=3) == "in_place"
    assert qkv_layout_choices()["sim"]["ms"] == pytest.approx({"in_place": 0.25, "heads_major": 0.35})

    # a host slower than every sleep: six tries, then the figure with the launches in it
    slow = _SimulatedStream(launch_ms=2000.0)
    ms = A.device_ms(lambda: slow.launch(0.1), runs=3, cuda=slow)
    assert len(slow.sleeps) == 6 and ms > 0.1


def _sam_attention_case(impl):
    ie = pytest.importorskip("segment_anything.modeling.image_encoder")
    dim, nh, (h, w), bsz = 32, 2, (4, 5), 2
    torch.manual_seed(23)
    mod = ie.Attention(dim, num_heads=nh, qkv_bias=True, use_rel_pos=True, input_size=(h, w)).eval()
    with torch.no_grad():
        for p in mod.parameters():
            p.copy_(torch.randn_like(p) * 0.3)
    x = torch.randn(bsz, h, w, dim)
    with torch.no_grad():
        expected = mod(x)
        d = dim // nh
        q, k, v = mod.qkv(x).view(bsz, h * w, 3, nh, d).permute(2, 0, 3, 1, 4).unbind(0)
        kw = {"block_m": 16, "block_n": 16} if impl == "triton" else {}
        o = attention(q, k, v, mod.rel_pos_h, mod.rel_pos_w, (h, w), mod.scale, impl=impl, **kw)
        got = mod.proj(o.transpose(1, 2).reshape(bsz, h, w, dim))
    assert_close(got, expected, atol=1e-4, rtol_norm=1e-5)


def test_sam_attention_module_sdpa():
    _sam_attention_case("sdpa")


@interpreted
def test_sam_attention_module_triton():
    _sam_attention_case("triton")


@interpreted
@pytest.mark.parametrize("offsets", ["products", "kernel"])
@pytest.mark.parametrize("grid,ws,bias", [((7, 9), 4, True), ((8, 8), 4, True), ((5, 6), 4, False), ((3, 3), 4, True)])
def test_triton_image_window_attention_equals_segment_anything_on_padded_windows(grid, ws, bias, offsets, monkeypatch):
    """The grid's tokens only, the windows read where they lie and the padding tokens' keys from the
    projection's extra row: the same as segment-anything's Attention on window_partition's padded copies
    (windows past the grid's right, bottom or both; a grid of whole windows; one smaller than a window;
    a qkv without a bias, whose padding keys are zeros), and the same as when the launch is tuned per
    shape in other block sizes; with the offset terms of every offset or only those read."""
    ie = pytest.importorskip("segment_anything.modeling.image_encoder")
    import xctrt.gpu.attention as att
    from xctrt.gpu.attention import image_window_attention

    monkeypatch.setattr(att, "OFFSET_TERMS", offsets)

    dim, nh, bsz = 24, 2, 2
    g = torch.Generator().manual_seed(sum(grid) + ws)
    mod = ie.Attention(dim, num_heads=nh, qkv_bias=bias, use_rel_pos=True, input_size=(ws, ws)).eval()
    with torch.no_grad():
        for p in mod.parameters():
            p.copy_(torch.randn(p.shape, generator=g) * 0.3)
        x = torch.randn(bsz, *grid, dim, generator=g)
        windows, pad_hw = ie.window_partition(x, ws)
        expected = ie.window_unpartition(mod(windows), ws, pad_hw, grid)
        for launch in ({"block_m": 16, "block_n": 16}, {"block_m": 32, "block_n": 32}):
            o = image_window_attention(x, mod.qkv, nh, mod.rel_pos_h, mod.rel_pos_w, ws, mod.scale, **launch)
            assert o.shape == x.shape
            assert_close(mod.proj(o), expected, atol=1e-4, rtol_norm=1e-5)


@interpreted
def test_triton_image_window_attention_split_over_the_grid_limit(monkeypatch):
    """Three images of 2 x 3 windows and 2 heads, launched two images and then one (24 programs a
    launch at most): each launch finds the padding row counted from its own first image."""
    ie = pytest.importorskip("segment_anything.modeling.image_encoder")
    import xctrt.gpu.attention as att

    g = torch.Generator().manual_seed(41)
    mod = ie.Attention(24, num_heads=2, qkv_bias=True, use_rel_pos=True, input_size=(4, 4)).eval()
    with torch.no_grad():
        for p in mod.parameters():
            p.copy_(torch.randn(p.shape, generator=g) * 0.3)
        x = torch.randn(3, 7, 9, 24, generator=g)
        windows, pad_hw = ie.window_partition(x, 4)
        expected = ie.window_unpartition(mod(windows), 4, pad_hw, (7, 9))
        monkeypatch.setattr(att, "_MAX_GRID_Y", 24)
        o = att.image_window_attention(x, mod.qkv, 2, mod.rel_pos_h, mod.rel_pos_w, 4, mod.scale,
                                       block_m=16, block_n=16)
        assert_close(mod.proj(o), expected, atol=1e-4, rtol_norm=1e-5)


def test_image_window_attention_refuses_what_it_cannot_read():
    from xctrt.gpu.attention import image_window_attention

    x, lin = torch.zeros(1, 4, 4, 8), torch.nn.Linear(8, 24)
    ph = torch.zeros(3, 4)
    with pytest.raises(ValueError, match="contiguous"):
        image_window_attention(x.transpose(1, 2), lin, 2, ph, ph, 2, 0.5)
    with pytest.raises(ValueError, match="plain nn.Linear"):
        image_window_attention(x, torch.nn.Sequential(lin), 2, ph, ph, 2, 0.5)
    q = torch.zeros(1, 2, 16, 4)   # not views of a projection with a padding row after them
    off = torch.zeros(1, 2, 16, 3)
    with pytest.raises(ValueError, match="padding row"):
        attention_triton(q, q, q, off, off, (2, 2), 0.5, grid=(4, 4))


# ------------------------------------------------------------------ the operator torch.compile sees

@pytest.mark.parametrize("impl", ["sdpa", "reference"])
def test_rel_pos_attention_op(impl):
    """The registered operator: schema, fake (meta) shapes and dispatch pass torch's own checks, and it
    returns what `attention` does, in the fused kernel's layout whatever the implementation, also from
    strided inputs."""
    g = torch.Generator().manual_seed(3)
    q, k, v = (torch.randn(3, 2, 12, 8, generator=g) for _ in range(3))
    rel_pos_h, rel_pos_w = torch.randn(5, 8, generator=g), torch.randn(7, 8, generator=g)
    ref = attention_reference(q, k, v, *relative_offset_terms(q, rel_pos_h, rel_pos_w, (3, 4)), (3, 4), 0.3)
    qs = q.transpose(1, 2).contiguous().transpose(1, 2)   # same values, other strides
    for qq in (q, qs):
        args = (qq, k, v, rel_pos_h, rel_pos_w, 3, 4, 0.3, impl)
        report = torch.library.opcheck(rel_pos_attention, args)
        assert set(report.values()) == {"SUCCESS"}, report
        out = rel_pos_attention(*args)
        assert out.shape == q.shape and out.transpose(1, 2).is_contiguous()   # as the fused kernel lays it out
        assert_close(out, ref)


@interpreted
def test_triton_inside_a_compiled_graph():
    """torch.compile keeps the Triton kernel's launch as one operator call: a traced function around it
    runs the kernel and matches the reference."""
    import torch._dynamo

    q, k, v, _, _ = make_case(4, 3, (5, 6), 16)
    rel_pos_h, rel_pos_w = torch.randn(9, 16), torch.randn(11, 16)

    def block(q, k, v):
        return rel_pos_attention(q * 1.0, k, v, rel_pos_h, rel_pos_w, 5, 6, 0.25, "triton") * 2.0

    explained = torch._dynamo.explain(block)(q, k, v)
    assert explained.graph_count == 1 and explained.graph_break_count == 0
    torch._dynamo.reset()
    out = torch.compile(block, backend="aot_eager", fullgraph=True)(q, k, v)
    off_h, off_w = relative_offset_terms(q, rel_pos_h, rel_pos_w, (5, 6))
    assert_close(out, 2.0 * attention_reference(q, k, v, off_h, off_w, (5, 6), 0.25))


@pytest.mark.skipif(not HAVE_TRITON or INTERPRETER_HERE, reason="the kernel tests ran in this process")
def test_triton_tests_in_fresh_process():
    """triton was imported here before TRITON_INTERPRET=1: rerun the kernel tests where it is set first."""
    rerun_under_triton_interpreter(__file__)


def test_every_interpreter_test_is_one_the_fresh_process_runs():
    """A test that only runs under the Triton interpreter (@interpreted) is skipped wherever triton was
    imported first (CI) and then run by the fresh pytest, which selects by INTERPRETED_KEYWORD: a name
    without "triton" would run nowhere. (Four of them did until 2026-11-28.)"""
    import ast

    from conftest import INTERPRETED_FILES, INTERPRETED_KEYWORD, REPO

    assert INTERPRETED_KEYWORD == "triton and not fresh_process and not sm90"
    seen = 0
    for name in INTERPRETED_FILES:
        tree = ast.parse((REPO / "tests" / name).read_text())
        for fn in tree.body:
            if isinstance(fn, ast.FunctionDef) and any(
                    isinstance(d, ast.Name) and d.id == "interpreted" for d in fn.decorator_list):
                seen += 1
                assert "triton" in fn.name and "fresh_process" not in fn.name and "sm90" not in fn.name, \
                    f"{name}::{fn.name} runs nowhere in CI: the fresh process selects '{INTERPRETED_KEYWORD}'"
    assert seen >= 30, seen


@pytest.mark.skipif(not HAVE_TRITON, reason="triton missing")
def test_tuned_launches_fit_their_shape():
    """The CUDA path's tuning only tries launches that fit: key tiles at least one padded row, no
    256-key tiles on the 64-wide grid, the default alone for D > 64; the pruning hook agrees."""
    import triton

    from xctrt.gpu import attention as A

    glob, win, vith = A.tuned_launches_for((64, 64), 64), A.tuned_launches_for((14, 14), 64), \
        A.tuned_launches_for((14, 14), 80)
    assert glob and all(64 <= bn <= 128 for _, bn, _, _, _ in glob)
    assert {reg for *_, reg in glob} == {None, 128}   # register caps for the global grid only
    assert (64, 256, 8, 2, None) in win and all(reg is None for *_, reg in win)
    assert len(win) == sum(reg is None for *_, reg in A.TUNED_LAUNCHES)
    assert vith == [A.launch_of(A.default_config((14, 14), 80))]
    for hw, d in (((64, 64), 64), ((14, 14), 64), ((64, 64), 80), ((14, 14), 80)):   # defaults are candidates
        assert A.launch_of(A.default_config(hw, d)) in A.tuned_launches_for(hw, d)
    assert all(bn >= 32 for _, bn, *_ in A.tuned_launches_for((3, 20), 64))   # W=20 pads to 32 slots
    configs = [triton.Config({"BLOCK_M": bm, "BLOCK_N": bn}, num_warps=nw, num_stages=ns, maxnreg=reg)
               for bm, bn, nw, ns, reg in A.TUNED_LAUNCHES]
    for hw, launches in (((64, 64), glob), ((14, 14), win)):
        kept = A._prune_launches(configs, {}, KH=hw[0], KW=hw[1], HEAD_D=64)
        assert [(c.kwargs["BLOCK_M"], c.kwargs["BLOCK_N"], c.num_warps, c.num_stages, c.maxnreg)
                for c in kept] == launches
    assert A.tuned_choices() == {}   # nothing tuned on this machine: the CPU path takes fixed launches


# Compiles the kernel for sm_90 (H100/H200) with the local Triton and its bundled ptxas, no GPU
# needed: catches what the lenient interpreter accepts but the compiler does not, and register
# spills of the default launch and of every launch the CUDA path's tuning may pick (those capped at
# 128 registers may spill a value or two, 16 bytes). Uses Triton's ahead-of-time API (ASTSource),
# which moves between versions: an API mismatch skips, a compile error or a spill beyond that fails.
_SM90_SCRIPT = r'''
import importlib.util
import torch
from xctrt.gpu import attention as A
spec = importlib.util.spec_from_file_location("attention_sass", "benchmarks/attention_sass.py")
sass = importlib.util.module_from_spec(spec)
spec.loader.exec_module(sass)
fn = triton.jit(A._attn_fwd)
names = fn.arg_names
report = {}
cases = []
for (h, w), d in [((64, 64), 64), ((14, 14), 64), ((64, 64), 80), ((14, 14), 80)]:
    launches = {A.launch_of(A.default_config((h, w), d))} | set(A.tuned_launches_for((h, w), d))
    cases += [((h, w), d, "bf16", launch, None) for launch in sorted(launches, key=str)]
    # float32 takes its default launch only
    cases.append(((h, w), d, "fp32", A.launch_of(A.default_config((h, w), d, torch.float32)), None))
    if (h, w) == (14, 14) and d == 64:   # the windows read in place from ViT-B's 64x64 grid
        cases += [((h, w), d, "bf16", launch, (64, 64)) for launch in sorted(launches, key=str)]
for (h, w), d, dt, (bm, bn, warps, stages, reg), grid in cases:
    name = f"{h}x{w}/{d} {dt} {bm}x{bn} w{warps} s{stages}" + (f" r{reg}" if reg else "") + (" in grid" if grid else "")
    # bf16 (or float32) q, k, v, out and float32 offset terms, laid out as the ViT-B encoder passes them
    sig, const, attrs = sass.encoder_signature(names, (h, w), d, dt, launch=(bm, bn), grid=grid)
    kern = compile(fn, sig, const, attrs, num_warps=warps, num_stages=stages, **({"maxnreg": reg} if reg else {}))
    if isinstance(kern, dict):
        report[name] = kern; continue
    row = {"wgmma": "wgmma" in kern.asm.get("ptx", ""), "dtype": dt, "shared": kern.metadata.shared, "cap": reg}
    m = re.search(r"REG:(\d+).*?STACK:(\d+)", cuobjdump_of(kern, "-res-usage") or "")
    if m:
        row.update(regs=int(m.group(1)), stack=int(m.group(2)))
    default = A.launch_of(A.default_config((h, w), d))
    if dt == "bf16" and d == 64 and not grid and (bm, bn, warps, stages, reg) == default:
        # what benchmarks/attention_sass.py reads from the machine code of ViT-B's default launches
        tile = sass.tile_report(kern, (bm, bn, warps, stages, reg))
        row["key_loop"] = {k: tile[k] for k in ("instructions", "scores_per_thread", "exp2", "tensor", "fp32")}
    report[name] = row
print(json.dumps(report))
'''


@pytest.mark.skipif(not HAVE_TRITON, reason="triton missing")
def test_triton_compiles_for_sm90_without_spills():
    report = sm90_compile_report(_SM90_SCRIPT)
    assert len(report) >= 14   # the defaults (bf16, float32) and the tuning's launches of all four shapes
    assert sum(name.endswith("in grid") for name in report) >= 5   # and the windows read in the grid
    for shape, row in report.items():
        assert row["wgmma"] or row["dtype"] == "fp32", f"{shape}: expected Hopper wgmma instructions"
        # uncapped launches never spill; a register cap may cost a value or two (16 bytes of stack)
        assert row.get("stack", 0) <= (16 if row["cap"] else 0), f"{shape}: register spills {row}"
        assert row["shared"] <= 232448, f"{shape}: {row['shared']} B of shared memory, over sm_90's 227 KB per block"
    # benchmarks/attention_sass.py finds the key loop in the default launches' SASS: tensor-core
    # instructions and one exp2 per score of a tile (plus the rescale's)
    loops = {shape: row["key_loop"] for shape, row in report.items() if "key_loop" in row}
    assert len(loops) == 2, sorted(report)
    for shape, loop in loops.items():
        assert loop["tensor"] > 0 and loop["fp32"] > 0, (shape, loop)
        assert loop["scores_per_thread"] <= loop["exp2"] <= loop["scores_per_thread"] + 4, (shape, loop)


def test_offset_terms_layouts_and_the_plain_products():
    """The offset terms are the plain products q @ table.T in two layouts, as views. off_w: token by
    token, rows padded to 8 (2W-1 is odd; unaligned rows kept cuBLAS on its align-1 kernels). off_h:
    offsets outermost, each offset's terms for all B*N tokens side by side, so that the kernel's rel_h
    loads for a block of queries are one run of memory."""
    from xctrt.gpu.attention import relative_offset_terms
    g = torch.Generator().manual_seed(0)
    q = torch.randn(2, 3, 14 * 14, 16, generator=g)
    ph, pw = torch.randn(27, 16, generator=g), torch.randn(27, 16, generator=g)
    off_h, off_w = relative_offset_terms(q, ph, pw, (14, 14))
    assert off_w.shape == (2, 3, 196, 27) and off_w.stride(2) % 8 == 0 and off_w.stride(3) == 1
    assert off_h.shape == (2, 3, 196, 27) and off_h.stride(2) == 1 and off_h.stride(3) == 2 * 196
    for off, table in ((off_h, ph), (off_w, pw)):
        torch.testing.assert_close(off, q @ table.t(), rtol=0, atol=1e-5)


@interpreted
@pytest.mark.parametrize("hw,grid,d", [((5, 6), None, 16), ((4, 4), (7, 9), 8), ((14, 14), (20, 30), 64),
                                       ((3, 20), None, 24)])
def test_triton_offset_terms_kernel_writes_the_offsets_the_fused_kernel_reads(hw, grid, d):
    """offset_terms_triton: relative_offset_terms' layouts (shapes and strides), the same values on every
    offset a query's keys use (half of them); with every other entry poisoned with NaN the fused kernel
    still gives the reference attention, so it reads nothing else (padding queries of the grid's
    windows included: they read token 0's row and are never stored)."""
    from xctrt.gpu.attention import offset_terms_triton, offsets_read

    g = torch.Generator().manual_seed(sum(hw) + d)
    ih, iw = grid or hw
    b, nh, n = 2, 3, ih * iw
    proj = torch.randn(b * n + 1, 3, nh, d, generator=g) * 0.5    # q, k, v views with a padding row after
    q, k, v = proj[:-1].view(b, n, 3, nh, d).permute(2, 0, 3, 1, 4).unbind(0)
    ph, pw = torch.randn(2 * hw[0] - 1, d, generator=g), torch.randn(2 * hw[1] - 1, d, generator=g)
    ref_h, ref_w = relative_offset_terms(q, ph, pw, hw, grid=grid)
    off_h, off_w = offset_terms_triton(q, ph, pw, hw, grid=grid)
    assert (off_h.shape, off_h.stride(), off_w.shape, off_w.stride()) == \
        (ref_h.shape, ref_h.stride(), ref_w.shape, ref_w.stride())
    mh, mw = offsets_read(n, hw, grid)
    assert 2 * mh.sum() == mh.numel() + n and 2 * mw.sum() == mw.numel() + n   # H of the 2H-1 per token
    torch.testing.assert_close(off_h[..., mh], ref_h[..., mh], rtol=0, atol=1e-5)
    torch.testing.assert_close(off_w[..., mw], ref_w[..., mw], rtol=0, atol=1e-5)
    with torch.no_grad():
        off_h[..., ~mh] = float("nan")
        off_w[..., ~mw] = float("nan")
    if grid is None:
        want = attention_reference(q, k, v, ref_h, ref_w, hw, 0.3)
        got = attention_triton(q, k, v, off_h, off_w, hw, 0.3, block_m=16, block_n=max(16, 1 << (hw[1] - 1).bit_length()))
    else:   # whole windows of the grid against the same windows cut out (no window runs past this grid's edge
        # in the comparison: those are covered by the segment-anything test above)
        got = attention_triton(q, k, v, off_h, off_w, hw, 0.3, grid=grid, block_m=16, block_n=16)
        wy, wx = ih // hw[0], iw // hw[1]
        cut = lambda t: t.reshape(b, nh, ih, iw, -1)[:, :, :wy * hw[0], :wx * hw[1]].reshape(  # noqa: E731
            b, nh, wy, hw[0], wx, hw[1], -1).permute(0, 2, 4, 1, 3, 5, 6).reshape(b * wy * wx, nh, hw[0] * hw[1], -1)
        cq, ck, cv = cut(q), cut(k), cut(v)
        want = attention_reference(cq, ck, cv, *relative_offset_terms(cq, ph, pw, hw), hw, 0.3)
        got = cut(got)
    assert torch.isfinite(got).all()
    torch.testing.assert_close(got, want, rtol=1e-4, atol=1e-4)


@interpreted
def test_triton_offset_terms_are_made_the_chosen_way(monkeypatch):
    """offset_terms_for_triton: the products on the CPU unless OFFSET_TERMS says otherwise; a wrong way
    named is refused; attention(impl="triton") gives the same output either way."""
    import xctrt.gpu.attention as att

    g = torch.Generator().manual_seed(3)
    q, k, v = (torch.randn(1, 2, 20, 16, generator=g) for _ in range(3))
    ph, pw = torch.randn(7, 16, generator=g), torch.randn(9, 16, generator=g)
    calls = []
    real = att.offset_terms_triton
    monkeypatch.setattr(att, "offset_terms_triton", lambda *a, **kw: calls.append(1) or real(*a, **kw))
    outs = {}
    for way in ("auto", "products", "kernel"):
        monkeypatch.setattr(att, "OFFSET_TERMS", way)
        calls.clear()
        outs[way] = att.attention(q, k, v, ph, pw, (4, 5), 0.25, impl="triton", block_m=16, block_n=16)
        assert len(calls) == (way == "kernel"), way
    for way in ("products", "kernel"):
        torch.testing.assert_close(outs[way], outs["auto"], rtol=1e-5, atol=1e-5)
    monkeypatch.setattr(att, "OFFSET_TERMS", "fast")
    with pytest.raises(ValueError, match="OFFSET_TERMS"):
        att.attention(q, k, v, ph, pw, (4, 5), 0.25, impl="triton")


_SM90_OFFSETS_SCRIPT = r'''
from xctrt.gpu import attention as A
fn = triton.jit(A._offset_terms_fwd)
names = fn.arg_names
report = {}
for (h, w), grid, batch in (((64, 64), None, 8), ((14, 14), (64, 64), 8), ((14, 14), None, 200)):
    n = (grid[0] * grid[1]) if grid else h * w
    lh, lw = 2 * h - 1, 2 * w - 1
    lwp = lw + (-lw % 8)
    c = 12 * 64
    const = dict(SQD=1, SGWK=1, KH=h, KW=w, LHP=max(16, A._next_pow2(lh)), LWP=max(16, A._next_pow2(lw)),
                 HEAD_D=64, BLOCK_D=64, GRID=grid is not None, IEEE=False, BLOCK_T=64)
    ints = dict(sqb=n * 3 * c, sqh=64, sqn=3 * c, sghb=n, sghh=lh * batch * n, sghn=1, sghk=batch * n,
                sgwb=n * lwp, sgwh=batch * n * lwp, sgwn=lwp, N=n, NH=12, IW=grid[1] if grid else w)
    sig = {nm: "*bf16" if nm in ("Q", "TH", "TW") else "*fp32" if nm in ("GH", "GW") else
           "constexpr" if nm in const else "i32" for nm in names}
    attrs = {(names.index(nm),): [["tt.divisibility", 16]] for nm in names
             if nm in ("Q", "TH", "TW", "GH", "GW") or ints.get(nm, 1) % 16 == 0}
    kern = compile(fn, sig, const, attrs, num_warps=8, num_stages=1)
    name = f"{h}x{w}" + (f" in {grid[0]}x{grid[1]}" if grid else "")
    if isinstance(kern, dict):
        report[name] = kern; continue
    row = {"mma": any(op in kern.asm.get("ptx", "") for op in ("wgmma", "mma.sync")), "shared": kern.metadata.shared}
    m = re.search(r"REG:(\d+).*?STACK:(\d+)", cuobjdump_of(kern, "-res-usage") or "")
    if m:
        row.update(regs=int(m.group(1)), stack=int(m.group(2)))
    report[name] = row
print(json.dumps(report))
'''


@pytest.mark.skipif(not HAVE_TRITON, reason="triton missing")
def test_offset_terms_kernel_compiles_for_sm90_without_spills():
    report = sm90_compile_report(_SM90_OFFSETS_SCRIPT)
    assert len(report) == 3
    for name, row in report.items():
        assert row["mma"], f"{name}: expected tensor-core products"
        assert row.get("stack", 0) == 0, f"{name}: register spills {row}"


@interpreted
@pytest.mark.parametrize("hw,grid", [((5, 6), None), ((4, 4), (7, 9))])
def test_triton_offset_terms_check_passes_the_kernel_and_catches_a_difference(hw, grid):
    """The check run on the kernel's first call per shape (before it may be chosen) compares only the
    offsets read: the kernel's unwritten entries (NaN here) do not matter, a read entry off by more than
    a rounding does."""
    import xctrt.gpu.attention as att

    g = torch.Generator().manual_seed(9)
    ih, iw = grid or hw
    q = torch.randn(2, 2, ih * iw, 16, generator=g)
    ph, pw = torch.randn(2 * hw[0] - 1, 16, generator=g), torch.randn(2 * hw[1] - 1, 16, generator=g)
    want = relative_offset_terms(q, ph, pw, hw, grid=grid)
    got = att.offset_terms_triton(q, ph, pw, hw, grid=grid)
    read_h, read_w = att.offsets_read(ih * iw, hw, grid)
    with torch.no_grad():
        got[0][..., ~read_h] = float("nan")
        got[1][..., ~read_w] = float("nan")
    att._same_offset_terms(got, want, hw, grid)
    with torch.no_grad():
        got[1][0, 1, 3, int(read_w[3].nonzero()[-1])] += 0.5
    with pytest.raises(RuntimeError, match="differs from the products"):
        att._same_offset_terms(got, want, hw, grid)


def test_graph_checks_refuse_other_probabilities():
    """What a decoder graph run another way (overlapped, heads side by side) gives is checked against
    one after the other once at capture: a rounding passes, a missing dependency's garbage does not."""
    from xctrt.gpu.pipeline import _same_probabilities

    p = torch.rand(2, 3, 8, 8, generator=torch.Generator().manual_seed(0))
    _same_probabilities((p + 1e-3, p), "a graph")
    with pytest.raises(RuntimeError, match="a graph gave other probabilities"):
        _same_probabilities((torch.where(p > 0.9, 0.0, p), p), "a graph")
    with pytest.raises(RuntimeError, match="other probabilities"):
        _same_probabilities((p * float("nan"), p), "a graph")
