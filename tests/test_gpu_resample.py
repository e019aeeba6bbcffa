"""The GPU stage's fused window+resize and resize+aggregate Triton kernels, bit for bit against _core.

The kernels run under the Triton interpreter on CPU tensors (see test_gpu_attention.py for why that
needs TRITON_INTERPRET=1 before triton's first import, and the fresh-process route otherwise). The
interpreter rounds every float32 operation on its own, as the GPU does only with fp fusion off, so a
second test compiles the kernels for sm_90 and reads the machine code for fused multiply-adds.
"""
import numpy as np
import pytest

torch = pytest.importorskip("torch")

from conftest import (
    rerun_under_triton_interpreter,
    sm90_compile_report,
    use_triton_interpreter,
)

INTERPRETER = use_triton_interpreter()   # before the kernels' module imports triton

from xctrt import _core
from xctrt.gpu import resample

HAVE_TRITON = resample.triton is not None
INTERPRETER_HERE = HAVE_TRITON and INTERPRETER
interpreted = pytest.mark.skipif(
    not INTERPRETER_HERE,
    reason="triton missing, or imported before TRITON_INTERPRET=1 (then run by test_triton_tests_in_fresh_process)")


@pytest.fixture(autouse=True)
def _interpreter_blocks(monkeypatch):
    """Blocks of 16 rows instead of the GPU's 4 under the interpreter, which costs per program instance
    (a quarter of the time). The test slices (13 to 64 rows) still span one to four blocks, most of
    them ending in a partial one."""
    if INTERPRETER_HERE:
        monkeypatch.setattr(resample, "BLOCK_Y", 16)


def _slices(rng, dtype, n, h, w):
    if dtype == np.float32:
        a = rng.normal(900.0, 400.0, (n, h, w)).astype(np.float32)
        a[0, 1, 2], a[-1, -1, -1] = np.nan, np.inf
        return a
    top = np.iinfo(dtype).max
    return rng.integers(0, top, (n, h, w), endpoint=True).astype(dtype)


@interpreted
@pytest.mark.parametrize("dtype", [np.uint16, np.uint8, np.float32])
@pytest.mark.parametrize("hw,size", [((37, 53), 32), ((13, 20), 32), ((64, 64), 64)])
def test_triton_window_resize_equals_core(dtype, hw, size):
    rng = np.random.default_rng(hash((np.dtype(dtype).str, hw, size)) % 2 ** 32)
    raw = _slices(rng, dtype, 3, *hw)
    lo, hi = (200.0, 61000.0) if dtype == np.uint16 else (10.0, 240.0) if dtype == np.uint8 else (300.0, 1500.0)
    t = torch.from_numpy(raw.view(np.int16) if dtype == np.uint16 else raw)
    got = resample.window_resize(t, lo, hi, size).numpy()
    want = np.stack([_core.resize_bilinear(_core.window(s, lo, hi), size, size) for s in raw])[:, None]
    np.testing.assert_array_equal(got, want)   # bit for bit, NaN where _core has NaN


@interpreted
@pytest.mark.parametrize("mode", ["priority", "argmax"])
@pytest.mark.parametrize("k,ids,priority", [(3, [1, 2, 3], [2, 0, 1]), (1, [2], [0]), (2, [3, 3], [1, 0])])
def test_triton_resize_aggregate_equals_core(mode, k, ids, priority):
    rng = np.random.default_rng(k * 10 + len(mode))
    n, s, h, w = 3, 24, 29, 41
    probs = rng.random((n, k, s, s), dtype=np.float32)
    probs[0, 0, :4, :4] = 0.5   # ties between channels and exactly at a threshold
    probs[1, :, 3, 3] = np.nan
    thr = np.float32([0.5, 0.62, 0.7][:k])
    ids8, prio = np.uint8(ids), np.int64(priority)
    want = np.stack([_core.aggregate(_core.resize_bilinear(p, h, w), thr, ids8, prio, mode) for p in probs])
    counts = torch.zeros(256, dtype=torch.int64)
    counts[7] = 5   # counts are added to what is there
    out = torch.full((n, h, w), 255, dtype=torch.uint8)
    resample.resize_aggregate(torch.from_numpy(probs), out, thr, ids8, prio, mode, counts=counts)
    np.testing.assert_array_equal(out.numpy(), want)
    expect = np.bincount(want.reshape(-1), minlength=256)
    expect[7] += 5
    np.testing.assert_array_equal(counts.numpy(), expect)
    assert 0 < (want != 0).mean() < 1   # both background and classes were exercised


@interpreted
@pytest.mark.parametrize("dtype", [np.uint16, np.float32])
@pytest.mark.parametrize("pad", ["edge", "constant"])
@pytest.mark.parametrize("hw,tile,overlap", [((37, 53), 16, 4), ((10, 21), 16, 3), ((12, 9), 16, 0), ((40, 33), 16, 11)])
def test_triton_extract_tiles_equals_core(dtype, pad, hw, tile, overlap):
    rng = np.random.default_rng(len(pad) * 100 + tile + overlap)
    raw = _slices(rng, dtype, 2, *hw)
    lo, hi = (200.0, 61000.0) if dtype == np.uint16 else (300.0, 1500.0)
    t = torch.from_numpy(raw.view(np.int16) if dtype == np.uint16 else raw)
    got = resample.extract_tiles(t, tile, overlap, lo, hi, pad).numpy()
    want = np.concatenate([_core.extract_tiles(s, tile, overlap, lo, hi, pad) for s in raw])[:, None]
    np.testing.assert_array_equal(got, want)


@interpreted
@pytest.mark.parametrize("blend", ["constant", "ramp"])
@pytest.mark.parametrize("mode", ["priority", "argmax"])
@pytest.mark.parametrize("hw,tile,overlap", [((37, 53), 16, 4), ((12, 9), 16, 0), ((40, 33), 16, 11)])
def test_triton_stitch_aggregate_equals_core(blend, mode, hw, tile, overlap):
    """Overlap 11 of 16: up to three tiles cover a pixel along an axis; 12x9: one tile larger than the slice."""
    rng = np.random.default_rng(len(blend) * 10 + len(mode) + overlap)
    n, (h, w) = 2, hw
    nt = len(_core.tile_starts(h, tile, overlap)) * len(_core.tile_starts(w, tile, overlap))
    probs = rng.random((n * nt, 3, tile, tile), dtype=np.float32)
    thr, ids, prio = np.float32([0.5, 0.55, 0.6]), np.uint8([1, 2, 3]), np.int64([2, 1, 0])
    want = np.stack([_core.aggregate(_core.stitch_tiles(probs[i * nt:(i + 1) * nt], h, w, overlap, blend),
                                     thr, ids, prio, mode) for i in range(n)])
    out, counts = torch.empty((n, h, w), dtype=torch.uint8), torch.zeros(256, dtype=torch.int64)
    resample.stitch_aggregate(torch.from_numpy(probs), out, overlap, blend, thr, ids, prio, mode, counts=counts)
    np.testing.assert_array_equal(out.numpy(), want)
    np.testing.assert_array_equal(counts.numpy(), np.bincount(want.reshape(-1), minlength=256))
    assert len(np.unique(want)) > 2


@interpreted
def test_triton_resize_aggregate_reads_bf16_as_float32():
    g = torch.Generator().manual_seed(3)
    probs = torch.rand(2, 2, 16, 16, generator=g).to(torch.bfloat16)
    a, b = torch.empty(2, 20, 18, dtype=torch.uint8), torch.empty(2, 20, 18, dtype=torch.uint8)
    args = ([0.5, 0.5], [1, 2], [1, 0])
    resample.resize_aggregate(probs, a, *args)
    resample.resize_aggregate(probs.float(), b, *args)
    assert torch.equal(a, b)


@interpreted
def test_triton_kernels_refuse_bad_arguments():
    raw = torch.zeros(2, 8, 8, dtype=torch.int16)
    with pytest.raises(ValueError, match="raw must be"):
        resample.window_resize(raw[0], 0, 1, 8)
    with pytest.raises(ValueError, match="raw must be"):
        resample.window_resize(raw.to(torch.int32), 0, 1, 8)
    with pytest.raises(ValueError, match="hi > lo"):
        resample.window_resize(raw, 5, 5, 8)
    with pytest.raises(ValueError, match="out must be"):
        resample.window_resize(raw, 0, 1, 8, out=torch.empty(2, 1, 8, 4))
    probs, out = torch.rand(2, 3, 8, 8), torch.empty(2, 9, 9, dtype=torch.uint8)
    with pytest.raises(ValueError, match="one entry per class"):
        resample.resize_aggregate(probs, out, [0.5, 0.5], [1, 2, 3], [0, 1, 2])
    with pytest.raises(ValueError, match="every channel once"):
        resample.resize_aggregate(probs, out, [0.5] * 3, [1, 2, 3], [0, 0, 2])
    with pytest.raises(ValueError, match="mode"):
        resample.resize_aggregate(probs, out, [0.5] * 3, [1, 2, 3], [0, 1, 2], mode="vote")
    with pytest.raises(ValueError, match="out must be"):
        resample.resize_aggregate(probs, out[:1], [0.5] * 3, [1, 2, 3], [0, 1, 2])
    with pytest.raises(ValueError, match="counts"):
        resample.resize_aggregate(probs, out, [0.5] * 3, [1, 2, 3], [0, 1, 2], counts=torch.zeros(256))
    with pytest.raises(ValueError, match="pad must be"):
        resample.extract_tiles(raw, 4, 1, 0, 1, pad="reflect")
    with pytest.raises(ValueError, match="got 2 tiles"):   # a 9x9 slice with tiles of 8, overlap 2 has 4
        resample.stitch_aggregate(probs, out, 2, "ramp", [0.5] * 3, [1, 2, 3], [0, 1, 2])
    with pytest.raises(ValueError, match="blend"):
        resample.stitch_aggregate(probs, out, 2, "cosine", [0.5] * 3, [1, 2, 3], [0, 1, 2])


def _stage(shape, fused: bool, monkeypatch, mode: str = "priority", batch: int = 2, **tiling):
    from xctrt.gpu.pipeline import GpuStage

    monkeypatch.setattr(GpuStage, "FUSED_ON_CPU", fused)

    def model(x):   # any callable x -> probabilities: three smooth channels of the windowed input
        return torch.cat([x, 1 - x, (x * 7).frac()], 1)

    return GpuStage(model, 32, [0.55, 0.7, 0.8], [1, 2, 3], [1, 2, 0], mode, shape, (1.0, 1.0, 1.0),
                    batch_size=batch, device="cpu", **tiling)


def _run_stage(volume, fused: bool, monkeypatch, mode: str, batch: int, slab: int, **tiling):
    """Labels, voxels per label value and defect table of the GPU stage (on the CPU) over `volume`."""
    stage = _stage(volume.shape, fused, monkeypatch, mode, batch, **tiling)
    assert stage.fused == fused and stage.fused_error is None
    done = []
    for z in range(0, volume.shape[0], slab):
        done += stage.submit(z, volume[z:z + slab], (300, 52000))
    done += stage.flush()
    labels = np.concatenate([lab for _, _, lab in sorted(done, key=lambda d: d[0])])
    return labels, stage.host_class_voxels(), stage.finish(), stage.stage_seconds()


TILE_MODE = dict(input_mode="tile", overlap=6, blend="ramp", pad="edge")


@interpreted
@pytest.mark.parametrize("mode,batch,slab,tiling", [("priority", 2, 3, {}), ("argmax", 4, 4, {}),
                                                    ("priority", 3, 3, TILE_MODE),
                                                    ("argmax", 2, 4, dict(TILE_MODE, blend="constant", pad="constant"))])
def test_triton_gpu_stage_fused_equals_step_by_step(monkeypatch, mode, batch, slab, tiling):
    """The GPU stage with the fused kernels gives the step-by-step stage's labels, counts and defect
    table: resize mode, and tile mode (45x38 slices in 2x2 tiles of 32, batches that split a slice's tiles)."""
    rng = np.random.default_rng(7)
    volume = rng.integers(0, 65535, (7, 45, 38), endpoint=True).astype(np.uint16)
    a = _run_stage(volume, False, monkeypatch, mode, batch, slab, **tiling)
    b = _run_stage(volume, True, monkeypatch, mode, batch, slab, **tiling)
    np.testing.assert_array_equal(b[0], a[0])
    assert set(np.unique(a[0])) == {0, 1, 2, 3}
    np.testing.assert_array_equal(b[1], a[1])
    np.testing.assert_array_equal(b[1], np.bincount(a[0].reshape(-1), minlength=256))
    assert sorted(b[2]) == sorted(a[2]) and len(a[2]["class"]) > 0
    for col in a[2]:
        np.testing.assert_array_equal(b[2][col], a[2][col], err_msg=col)
    assert {"preprocess", "model", "aggregate"} <= set(b[3])


class _SplitModel:
    """A split model (encode -> embeddings, decode -> probabilities), as XctSam's ClassNet: three smooth
    channels of the windowed input, through two embeddings."""

    def encode(self, x):
        return [x * 0.5, 1 - x]

    def decode(self, emb, size):
        a, b = emb
        return torch.cat([2 * a, b, (a * 14).frac()], 1)


@interpreted
@pytest.mark.parametrize("fused", [False, True])
@pytest.mark.parametrize("tiling", [{}, TILE_MODE])
def test_triton_gpu_stage_decoders_overlapped_give_the_same_result(monkeypatch, fused, tiling):
    """A split model's decoders run a batch behind its encoders (sam.OverlappedSteps, as on CUDA where it
    measures faster): each batch's probabilities still land in their own slices and tiles, the slab's
    last batch (a short one here) included: the same labels, counts and table as one after the other."""
    from xctrt.gpu.pipeline import GpuStage

    rng = np.random.default_rng(11)
    volume = rng.integers(0, 65535, (7, 45, 38), endpoint=True).astype(np.uint16)
    monkeypatch.setattr(GpuStage, "FUSED_ON_CPU", fused)
    runs = {}
    for overlap in ("off", "on"):
        monkeypatch.setattr(GpuStage, "DECODER_OVERLAP", overlap)
        stage = GpuStage(_SplitModel(), 32, [0.55, 0.7, 0.8], [1, 2, 3], [1, 2, 0], "priority", volume.shape,
                         (1.0, 1.0, 1.0), batch_size=3, device="cpu", **tiling)
        assert stage.fused == fused and stage.decoder_overlap == {
            "chosen": "overlapped" if overlap == "on" else "serial"}
        done = []
        for z in range(0, 7, 4):   # slabs of 4 and 3 slices: batches of 3 and a short one (tile mode: 4 tiles a slice)
            done += stage.submit(z, volume[z:z + 4], (300, 52000))
        done += stage.flush()
        labels = np.concatenate([lab for _, _, lab in sorted(done, key=lambda d: d[0])])
        runs[overlap] = labels, stage.host_class_voxels(), stage.finish(), stage.stage_seconds()
    (a_lab, a_cnt, a_tab, a_sec), (b_lab, b_cnt, b_tab, b_sec) = runs["off"], runs["on"]
    np.testing.assert_array_equal(b_lab, a_lab)
    assert set(np.unique(a_lab)) == {0, 1, 2, 3}
    np.testing.assert_array_equal(b_cnt, a_cnt)
    for col in a_tab:
        np.testing.assert_array_equal(b_tab[col], a_tab[col], err_msg=col)
    # one after the other: encoder and decoder spans; overlapped: each slab's first batch encoded alone,
    # the next ones beside the decoders before them ("model"), the last batch decoded alone
    assert {"encoder", "decoder"} <= set(a_sec) and "model" not in a_sec
    assert {"encoder", "decoder", "model"} <= set(b_sec)


def test_gpu_stage_decoders_overlapped_carry_a_slab_to_the_next_submit(monkeypatch):
    """With the decoders overlapped each slab's last batch is decoded by the next submit (or flush), so a
    slab comes back one submit later than one after the other, with the same labels; labels for the
    host's components (components="host") too."""
    from xctrt.gpu.pipeline import GpuStage

    rng = np.random.default_rng(5)
    volume = rng.integers(0, 65535, (11, 45, 38), endpoint=True).astype(np.uint16)
    monkeypatch.setattr(GpuStage, "FUSED_ON_CPU", False)
    for components in ("device", "host"):
        runs = {}
        for overlap in ("off", "on"):
            monkeypatch.setattr(GpuStage, "DECODER_OVERLAP", overlap)
            stage = GpuStage(_SplitModel(), 32, [0.55, 0.7, 0.8], [1, 2, 3], [1, 2, 0], "priority", volume.shape,
                             (1.0, 1.0, 1.0), batch_size=3, device="cpu", components=components)
            back, done = [], []
            for z in range(0, 11, 4):
                got = stage.submit(z, volume[z:z + 4], (300, 52000))
                back.append([g[0] for g in got])
                done += got
            got = stage.flush()
            back.append([g[0] for g in got])
            done += got
            stage.close()   # no table made here: the labeller's kd-tree thread stops with the stage
            runs[overlap] = back, np.concatenate([lab for _, _, lab in sorted(done, key=lambda d: d[0])])
        np.testing.assert_array_equal(runs["on"][1], runs["off"][1])
        assert sorted(sum(runs["on"][0], [])) == [0, 4, 8]
        if components == "host":   # the host's download queue hands each slab back as soon as it is ended
            assert runs["off"][0] == [[0], [4], [8], []] and runs["on"][0] == [[], [0], [4], [8]]


def test_overlapped_steps_decode_each_batch_before_encoding_the_one_after_the_next():
    """The eager order of OverlappedSteps is its graph's: next(x) decodes the batch held, then encodes x;
    each returned result is its own batch's."""
    from xctrt.gpu.sam import OverlappedSteps

    calls = []

    def encode(x):
        calls.append(("encode", int(x)))
        return (x * 10,)

    def decode(e):
        calls.append(("decode", int(e) // 10))
        return e + 1

    steps = OverlappedSteps(encode, decode)
    steps.first(torch.tensor(1))
    got = [int(steps.next(torch.tensor(i))) for i in (2, 3)] + [int(steps.last())]
    assert got == [11, 21, 31]
    assert calls == [("encode", 1), ("decode", 1), ("encode", 2), ("decode", 2), ("encode", 3), ("decode", 3)]
    assert steps.held is None


@interpreted
def test_triton_gpu_stage_self_check_turns_off_wrong_or_failing_kernels(monkeypatch):
    """The stage checks the fused kernels against the step-by-step functions first: a kernel that
    differs or fails is not used, and the stage says why."""
    real = resample.resize_aggregate

    def off_by_one(probs, out, *args, **kw):
        real(probs, out, *args, **kw)
        out[0, 0, 0] += 1

    monkeypatch.setattr(resample, "resize_aggregate", off_by_one)
    stage = _stage((4, 37, 53), True, monkeypatch)
    assert not stage.fused and "fused aggregation differs" in stage.fused_error
    # the check runs in every run's time: a span of the timeline, before any slab
    (_, t0, t1), = [s for s in stage.timeline() if s[0] == "fused_check"]
    assert 0 < t0 < t1 and not any(s[0] == "fused_check" for s in _stage((4, 37, 53), False, monkeypatch).timeline())
    assert _stage((4, 37, 53), True, monkeypatch, **TILE_MODE).fused   # tile mode does not use it
    real_tiles = resample.extract_tiles
    monkeypatch.setattr(resample, "extract_tiles", lambda *a, **k: real_tiles(*a, **k) * 0.5)
    stage = _stage((4, 37, 53), True, monkeypatch, **TILE_MODE)
    assert not stage.fused and "fused preprocessing (uint16) differs" in stage.fused_error

    def miscounting(probs, out, *args, counts=None, **kw):
        real(probs, out, *args, counts=counts, **kw)
        if counts is not None:
            counts[0] += 1

    monkeypatch.setattr(resample, "resize_aggregate", miscounting)
    stage = _stage((4, 37, 53), True, monkeypatch)
    assert not stage.fused and "voxel counts differ" in stage.fused_error
    monkeypatch.setattr(resample, "resize_aggregate", real)

    # every grey dtype a volume may have compiles its own preprocessing kernel: each is checked
    real_window = resample.window_resize
    monkeypatch.setattr(resample, "window_resize", lambda t, *a, **k: real_window(t, *a, **k) * (
        0.5 if t.dtype == torch.uint8 else 1.0))
    stage = _stage((4, 37, 53), True, monkeypatch)
    assert not stage.fused and "fused preprocessing (uint8) differs" in stage.fused_error
    # a stage told its volume's grey dtype checks that one only: a uint16 scan keeps the fused kernels
    assert _stage((4, 37, 53), True, monkeypatch, grey_dtype=np.uint16).fused
    assert not _stage((4, 37, 53), True, monkeypatch, grey_dtype=np.uint8).fused

    def broken(*args, **kw):
        raise RuntimeError("no such PTX instruction")

    monkeypatch.setattr(resample, "window_resize", broken)
    stage = _stage((4, 37, 53), True, monkeypatch)
    assert not stage.fused and stage.fused_error == "RuntimeError: no such PTX instruction"
    assert isinstance(stage.class_voxels, np.ndarray)   # the step-by-step path's counts
    monkeypatch.undo()
    assert _stage((4, 37, 53), True, monkeypatch).fused


@pytest.mark.skipif(not HAVE_TRITON or INTERPRETER_HERE, reason="the kernel tests ran in this process")
def test_triton_tests_in_fresh_process():
    rerun_under_triton_interpreter(__file__)


# Both kernels compiled for sm_90 (H100/H200) with the local Triton and ptxas, no GPU needed: as the
# runtime launches them (fp fusion off) the PTX must hold no fused multiply-add and only round-to-nearest
# qualified float32 products and sums (which ptxas never contracts), the aggregate's machine code no FFMA
# (the window's IEEE division, div.rn, is itself built from FFMAs), and compiled with fusion on, FMAs
# appear (so the check can fail).
_SM90_SCRIPT = r'''
from xctrt.gpu import resample as R
F32, I32 = ("HY", "LY", "HX", "LX", "THR", "lo", "scale"), ("Y0", "Y1", "X0", "X1", "IDS", "ORDER", "VALUES")
def types(names, special):
    return {nm: special.get(nm) or ("*fp32" if nm in F32[:5] else "fp32" if nm in F32 else "*i32" if nm in I32
            else "i32") for nm in names}
kernels = {
    "window_resize": (R._window_resize_kernel, {"SRC_P": "*i16", "OUT_P": "*fp32"}, dict(SRC=2)),
    "resize_aggregate": (R._resize_aggregate_kernel, {"P": "*fp32", "OUT_P": "*u8", "COUNTS": "*i64"},
                         dict(K=3, NV=4, ARGMAX=False)),
    "extract_tiles": (R._extract_tiles_kernel, {"SRC_P": "*i16", "OUT_P": "*fp32", "YS": "*i32", "XS": "*i32"},
                      dict(SRC=2, EDGE=True, S=256)),
    "stitch_aggregate": (R._stitch_aggregate_kernel, {"P": "*fp32", "OUT_P": "*u8", "COUNTS": "*i64", "W1": "*fp32",
                         **{k: "*i32" for k in ("YS", "XS", "YF", "YC", "XF", "XC")}},
                         dict(K=3, NV=4, ARGMAX=False, RAMP=True, MAXC=2)),
}
report = {}
for name, (fn, special, const) in kernels.items():
    const = dict(const, BY=R.BLOCK_Y, BX=R.BLOCK_X)
    names = fn.arg_names
    sig = {nm: "constexpr" if nm in const else t for nm, t in types(names, special).items()}
    for fusion in (False, True):
        kern = compile(fn, sig, const, num_warps=R.NUM_WARPS, enable_fp_fusion=fusion)
        if isinstance(kern, dict):
            report[f"{name} fusion={fusion}"] = kern; continue
        ptx = kern.asm.get("ptx", "")
        # .rn-qualified mul/add/sub are never contracted by ptxas; plain ones may be
        row = {"ptx_fma": ptx.count("fma.rn.f32"), "div_rn": ptx.count("div.rn.f32"),
               "plain": len(re.findall(r"\b(?:mul|add|sub)\.f32\s", ptx)),
               "div_approx": ptx.count("div.full.f32") + ptx.count("div.approx.f32")}
        sass = cuobjdump_of(kern, "-sass")
        if sass is not None:
            row["sass_ffma"] = sass.count("FFMA")
        report[f"{name} fusion={fusion}"] = row
print(json.dumps(report))
'''


@pytest.mark.skipif(not HAVE_TRITON, reason="triton missing")
def test_sm90_machine_code_has_no_fma():
    report = sm90_compile_report(_SM90_SCRIPT)
    for kernel in ("window_resize", "resize_aggregate", "extract_tiles", "stitch_aggregate"):
        off, on = report[f"{kernel} fusion=False"], report[f"{kernel} fusion=True"]
        assert off["ptx_fma"] == 0 and off["plain"] == 0, (kernel, off)
        assert on["plain"] > 0, (kernel, on)   # the checks see plain ops, and FMAs where there are products
        assert on["ptx_fma"] > 0 or kernel == "extract_tiles", (kernel, on)
    assert report["resize_aggregate fusion=False"].get("sass_ffma", 0) == 0
    for kernel in ("window_resize", "extract_tiles", "stitch_aggregate"):   # IEEE divisions only
        row = report[f"{kernel} fusion=False"]
        assert row["div_rn"] > 0 and row["div_approx"] == 0, (kernel, row)
