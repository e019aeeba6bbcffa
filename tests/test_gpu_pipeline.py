"""The GPU path's code run on the host (Segmenter(device="host-arrays"): xctrt.gpu.pipeline with NumPy and
torch on the CPU) against the C++ pipeline, bit for bit; the random-weight SAM networks of xctrt.gpu.sam
(builder, encoder FLOPs, fast attention swap, bf16 weights); `xctrt bench --gpu --host-arrays` and the
markdown summary of benchmarks/gpu_summary.py. No GPU needed: CUDA-only parts are covered by their
device scripts (benchmarks/gpu_throughput.sh)."""
from __future__ import annotations

import copy
import importlib.util
import json
import shutil
import subprocess
import sys
import weakref
from pathlib import Path

import numpy as np
import tifffile
import pytest

torch = pytest.importorskip("torch")
pytest.importorskip("segment_anything")

from conftest import REPO, load_benchmark, xctrt_env
from xctrt import _core
from xctrt.backends import TorchModuleEngine
from xctrt.errors import XctrtError
from xctrt.gpu.bench import CLASSES, COVER, bench_package
from xctrt.gpu.sam import (
    ClassNet,
    XctSam,
    accelerate,
    build_random_class_net,
    encoder_flops,
)
from xctrt.pipeline import Segmenter

MODES = ("paper", "shared")
SHAPE = (10, 70, 90)   # neither Y nor X is the model's 64: both resizes run; Z divides by neither slab


@pytest.fixture(scope="module")
def nets():
    return {mode: build_random_class_net("tiny", 3, mode, seed=0) for mode in MODES}


@pytest.fixture(scope="module")
def volume():
    """uint16 over the whole 0..65535 range: noisy material with dark and bright balls."""
    rng = np.random.default_rng(0)
    z, y, x = SHAPE
    zz, yy, xx = np.mgrid[:z, :y, :x]
    v = 20000.0 + rng.normal(0, 6000, SHAPE)
    for _ in range(12):
        c, r = rng.uniform(0, 1, 3) * SHAPE, rng.uniform(2, 9)
        v[(zz - c[0]) ** 2 + (yy - c[1]) ** 2 + (xx - c[2]) ** 2 < r * r] = rng.choice([0, 2000, 60000, 65535])
    v = np.clip(v, 0, 65535).astype(np.uint16)
    assert v.min() == 0 and v.max() == 65535
    v.setflags(write=False)
    return v


@pytest.fixture(scope="module")
def packages(nets, volume):
    """As bench.run picks them: thresholds at the model's own probability quantiles on the first slices
    (material ~60 %, pores and inclusions ~1 % of voxels), so every class is present."""
    out = {}
    for mode, net in nets.items():
        x = np.stack([_core.resize_bilinear(_core.window(s, 0.0, 65535.0), 64, 64) for s in volume[:4]])[:, None]
        p = TorchModuleEngine(net, device="cpu", batch=1).run(x)
        thr = [float(np.quantile(p[:, i], 1 - COVER[n])) for i, (n, _) in enumerate(CLASSES)]
        out[mode] = bench_package(64, thr, f"random-tiny-{mode}")
    return out


def segment_both(net, pkg, volume, **kw):
    """(C++ pipeline result, host-arrays GPU-path result), same engine settings and run options."""
    common = dict(progress=False, **kw)
    cpu = Segmenter(pkg, engine=TorchModuleEngine(net, device="cpu"), device="cpu", **common)
    host = Segmenter(pkg, engine=TorchModuleEngine(net, device="cpu"), device="host-arrays", **common)
    return cpu, host


def assert_same_results(a, b):
    """Labels, every defect column (values and dtype) and the summary's result section all identical."""
    np.testing.assert_array_equal(b.labels, a.labels)
    assert sorted(b.defects) == sorted(a.defects)
    for col in a.defects:
        assert b.defects[col].dtype == a.defects[col].dtype, col
        np.testing.assert_array_equal(b.defects[col], a.defects[col], err_msg=col)
    ra, rb = a.summary["result"], b.summary["result"]
    assert rb["voxels_per_class"] == ra["voxels_per_class"]
    assert rb["porosity_percent"] == ra["porosity_percent"]
    assert rb["inclusion_percent"] == ra["inclusion_percent"]
    assert rb == ra


# ---------------------------------------------------------------- 1. host-arrays GPU path == C++ pipeline


def test_host_arrays_fill_enclosed_air_matches_cpu_pipeline(nets, packages, volume):
    """The GPU path's labeller gives the fill the same outside air as the C++ one."""
    cpu, host = segment_both(nets["shared"], packages["shared"], volume, slab=3, fill_enclosed_air=True)
    a, b = cpu.segment(volume), host.segment(volume)
    assert a.summary["result"]["enclosed_air_filled_voxels"] > 0
    assert_same_results(a, b)


def test_components_thread_error_reaches_the_caller_and_the_thread_ends(nets, packages, volume, monkeypatch,
                                                                        tmp_path):
    """The components run on a thread of their own: a failure there is the run's error (no output
    folder left looking complete), and neither that thread nor a stalled one outlives the run."""
    import threading

    from xctrt.gpu import post

    calls = []

    def failing_add_slab(self, labels, image):
        calls.append(len(labels))
        if len(calls) == 2:
            raise RuntimeError("labeller broke on the second slab")
        return real(self, labels, image)

    real = post.ComponentLabeller.add_slab
    monkeypatch.setattr(post.ComponentLabeller, "add_slab", failing_add_slab)
    _, host = segment_both(nets["shared"], packages["shared"], volume, slab=3)
    with pytest.raises(RuntimeError, match="second slab"):
        host.segment(volume, out_dir=tmp_path / "out")
    assert not (tmp_path / "out" / "summary.json").exists()
    # the run joined its threads before it raised: the components thread and the labeller's kd-tree
    # thread, which the first slab's outside air had started
    assert not [t.name for t in threading.enumerate() if t.name.startswith("xctrt-")]
    # and one that fails in the main thread (the reader) stops the components thread too
    monkeypatch.setattr(post.ComponentLabeller, "add_slab", real)
    bad = volume.astype(np.float32)
    bad[7, 3, 3] = np.nan
    with pytest.raises(XctrtError):
        host.segment(bad)
    assert not [t.name for t in threading.enumerate() if t.name.startswith("xctrt-")]


@pytest.mark.parametrize("mode", MODES)
@pytest.mark.parametrize("slab,batch", [(3, 1), (4, 3)])
def test_host_components_match_cpu_pipeline(nets, packages, volume, mode, slab, batch, tmp_path):
    """components="host": the GPU path hands its labels to the C++ labeller on the Segmenter's components
    thread instead of labelling on the device; the same labels, table and files as the C++ pipeline."""
    cpu, _ = segment_both(nets[mode], packages[mode], volume, slab=slab, batch_size=batch)
    host = Segmenter(packages[mode], engine=TorchModuleEngine(nets[mode], device="cpu"), device="host-arrays",
                     components="host", progress=False, slab=slab, batch_size=batch)
    a, b = cpu.segment(volume), host.segment(volume)
    assert a.defects["id"].size > 0
    assert_same_results(a, b)
    run = b.summary["run"]
    assert run["components"] == "host" and run["pipeline"] == "host-arrays"
    assert a.summary["run"]["components"] == "host"
    assert "stage_components" not in b.summary["timing"]["main_thread_s"]   # no device labeller thread
    assert b.summary["timing"]["stage_busy_s"]["components"] > 0
    # the distances came from the stage's search (the GPU path's, here its host twin), the same bits
    t = b.summary["timing"]
    assert t["table_surface_runs"] == {"outside_air": len(host_outside_air(a)),
                                       "defect": t["table_surface_runs"]["defect"]}
    assert t["table_surface_runs"]["defect"] >= a.defects["id"].size > 0
    assert set(t["table_parts_s"]) == {"surface_distance", "surface_tree"}
    assert np.isfinite(b.defects["surface_distance"]).all()
    # and the files: defects.csv byte for byte, labels.tif's pages (its OME header has a UUID of its own)
    import tifffile
    for seg, name in ((cpu, "cpu"), (host, "host")):
        seg.segment(volume, out_dir=tmp_path / name)
    assert (tmp_path / "host" / "defects.csv").read_bytes() == (tmp_path / "cpu" / "defects.csv").read_bytes()
    np.testing.assert_array_equal(tifffile.imread(tmp_path / "host" / "labels.tif"), a.labels)


def test_device_components_draw_the_preview_while_the_table_is_made(nets, packages, volume, tmp_path, monkeypatch):
    """With the device labeller the preview is drawn on a thread as soon as the outside air is known
    (the "preview" stage), to the same pixels as the C++ pipeline's; its failure fails the run whole."""
    from PIL import Image

    import xctrt.pipeline as pipeline_module
    cpu, host = segment_both(nets["paper"], packages["paper"], volume, slab=3, batch_size=2)
    a = cpu.segment(volume, out_dir=tmp_path / "cpu")
    b = host.segment(volume, out_dir=tmp_path / "gpu")
    assert "preview" in b.summary["timing"]["stage_busy_s"] and "preview" not in a.summary["timing"]["stage_busy_s"]
    assert b.summary["timing"]["stage_busy_s"]["preview"] > 0
    assert any(name == "preview" for name, _, _ in b.summary["timeline"])
    with Image.open(tmp_path / "cpu" / "preview.png") as pa, Image.open(tmp_path / "gpu" / "preview.png") as pb:
        assert pa.size == pb.size and np.array_equal(np.asarray(pa), np.asarray(pb))

    def broken(*args, **kwargs):
        raise XctrtError("preview.png: cannot write (No space left on device)")

    # defects.csv: formatted and written on a thread of its own as soon as the table is made, the same bytes;
    # "csv_write" is the part of "csv" inside its writes (a few microseconds for this small table)
    for r in (a, b):
        busy = r.summary["timing"]["stage_busy_s"]
        assert busy["csv"] > 0 and 0 <= busy["csv_write"] <= busy["csv"]
    assert (tmp_path / "gpu" / "defects.csv").read_bytes() == (tmp_path / "cpu" / "defects.csv").read_bytes()

    monkeypatch.setattr(pipeline_module, "write_preview", broken)
    with pytest.raises(XctrtError, match="No space left"):
        host.segment(volume, out_dir=tmp_path / "failed")
    failed = tmp_path / "failed"
    assert not failed.exists() or not any(failed.iterdir())   # no output, not even a partial file

    write_table_csv = pipeline_module.write_table_csv

    def full_disk_csv(path, *args):   # the real writer, on a disk with no room left (its ENOSPC)
        write_table_csv(Path("/dev/full"), *args)

    monkeypatch.undo()
    monkeypatch.setattr(pipeline_module, "write_table_csv", full_disk_csv)
    for seg, name in ((host, "failed_csv_gpu"), (cpu, "failed_csv_cpu")):
        with pytest.raises(XctrtError, match="defects.csv: cannot write"):
            seg.segment(volume, out_dir=tmp_path / name)
        assert not (tmp_path / name).exists() or not any((tmp_path / name).iterdir())


def host_outside_air(result) -> np.ndarray:
    """The x-runs of the air outside the part in a result's labels, as the C++ labeller finds them."""
    lb = _core.ComponentLabeller(shape=result.labels.shape)
    lb.add_slab(result.labels, np.zeros(result.labels.shape, np.uint8))
    lb.finish()
    return lb.outside_air_runs()


def test_components_option_is_checked(nets, packages):
    eng = TorchModuleEngine(nets["shared"], device="cpu")
    with pytest.raises(XctrtError, match="need --device cuda"):
        Segmenter(packages["shared"], engine=eng, device="cpu", components="device")
    with pytest.raises(XctrtError, match="'device' or 'host'"):
        Segmenter(packages["shared"], engine=eng, device="host-arrays", components="gpu")
    assert Segmenter(packages["shared"], engine=eng, device="host-arrays").components == "device"
    assert Segmenter(packages["shared"], engine=eng, device="cpu").components == "host"


def test_host_components_hand_back_downloads_in_order():
    """GpuStage._downloaded: the slabs whose labels reached the host, oldest first; it waits for the
    oldest only while more than two are on their way, and for all with wait=True."""
    from collections import deque
    from types import SimpleNamespace

    from xctrt.gpu.pipeline import GpuStage

    class Copy:   # a CUDA event stand-in: done or not, and whether it was waited for
        def __init__(self, done):
            self.done, self.waited = done, False

        def query(self):
            return self.done

        def synchronize(self):
            self.waited = True

    class Pinned:   # the pinned host tensor the labels are copied into
        def __init__(self, z):
            self.z = z

        def numpy(self):
            return np.full((1, 2, 2), self.z, np.uint8)

    def item(z, done):
        return (z, f"slab{z}", Pinned(z), Copy(done), "device labels", "image", "ready")

    stage = SimpleNamespace(_downloading=deque(), clock=SimpleNamespace(collect=lambda: None))
    stage._downloading.extend([item(0, False), item(1, True)])
    assert GpuStage._downloaded(stage) == []          # the oldest is not there yet: nothing, in order
    oldest = stage._downloading[0]
    stage._downloading.append(item(2, True))
    got = GpuStage._downloaded(stage)                 # three on their way: the oldest is waited for
    assert oldest[3].waited
    assert [g[0] for g in got] == [0, 1, 2] and [g[1] for g in got] == ["slab0", "slab1", "slab2"]
    assert got[0][2].tolist() == [[[0, 0], [0, 0]]]
    stage._downloading.append(item(3, False))
    assert GpuStage._downloaded(stage) == []
    last = item(4, False)
    stage._downloading.append(last)
    got = GpuStage._downloaded(stage, wait=True)      # the end of the volume: all of them
    assert [g[0] for g in got] == [3, 4] and last[3].waited and not stage._downloading


def test_device_labeller_joins_the_slabs_waiting_for_it(nets, packages, volume, monkeypatch):
    """When the components fall behind, the slabs queued for them are labelled in one call (up to
    LABEL_PLANES planes): the same labels and table as the C++ pipeline's, and the summary counts them."""
    import threading

    from xctrt.gpu import pipeline as gpu_pipeline
    from xctrt.gpu.post import ComponentLabeller
    calls, handed, queued = [], [], threading.Event()
    add_slab, hand_over = ComponentLabeller.add_slab, gpu_pipeline.GpuStage._hand_over

    def counted_hand_over(self, item):
        hand_over(self, item)
        handed.append(item is not None)
        if len(handed) >= 3:   # the first slab is with the labeller, two more wait in its queue
            queued.set()

    def slow_first(self, labels, image):   # the first call holds the labeller until two more slabs wait
        calls.append(labels.shape[0])
        if len(calls) == 1:
            assert queued.wait(60)
        return add_slab(self, labels, image)

    monkeypatch.setattr(gpu_pipeline.GpuStage, "_hand_over", counted_hand_over)
    monkeypatch.setattr(ComponentLabeller, "add_slab", slow_first)
    monkeypatch.setattr(gpu_pipeline, "LABEL_PLANES", 5)   # two 2-plane slabs at most, not three
    cpu, host = segment_both(nets["paper"], packages["paper"], volume, slab=2, batch_size=2)
    a, b = cpu.segment(volume), host.segment(volume)
    assert_same_results(a, b)
    assert sum(calls) == SHAPE[0] and calls[0] == 2
    assert 4 in calls and max(calls) == 4           # joined, up to the limit
    info = b.summary["timing"]["gpu_labeller_calls"]
    assert info == {"calls": len(calls), "slabs": SHAPE[0] // 2} and info["calls"] < info["slabs"]
    assert a.summary["timing"]["gpu_labeller_calls"] is None


@pytest.mark.parametrize("mode", MODES)
@pytest.mark.parametrize("slab,batch", [(3, 1), (3, 3), (4, 1), (4, 3)])
def test_host_arrays_matches_cpu_pipeline(nets, packages, volume, mode, slab, batch):
    # Exact equality holds because both paths feed the float32 CPU model the same batches: batches are
    # cut per slab at batch_size in both. (Different batch sizes change probabilities by ~1e-7.)
    cpu, host = segment_both(nets[mode], packages[mode], volume, slab=slab, batch_size=batch)
    a, b = cpu.segment(volume), host.segment(volume)
    assert a.labels.shape == SHAPE and a.labels.dtype == np.uint8
    assert set(np.unique(a.labels)) == {0, 1, 2, 3}, "the thresholds should leave every class present"
    assert len(a.defects["class"]) > 0 and set(a.defects["class"]) == {2, 3}
    assert_same_results(a, b)
    # the second run really was the GPU path's code (GpuStage), not the C++ stages
    assert b.summary["run"]["pipeline"] == "host-arrays" and a.summary["run"]["pipeline"] == "cpu"
    assert {"preprocess", "encoder", "decoder", "aggregate"} <= set(b.summary["timing"]["stage_busy_s"])
    assert "encoder" not in a.summary["timing"]["stage_busy_s"]
    # the GPU path's table is made on the main thread while the writer still writes labels.tif
    for r, parts in ((a, {"wait_read", "stage", "wait_write"}), (b, {"wait_read", "stage", "wait_write",
                                                                     "stage_components", "table"})):
        t = r.summary["timing"]
        assert set(t["main_thread_s"]) == parts and min(t["main_thread_s"].values()) >= 0
        # the main thread's parts add up to no more than the run (components are inside "stage")
        assert sum(v for k, v in t["main_thread_s"].items() if k != "stage_components") <= t["total_s"]
        assert t["main_thread_s"].get("stage_components", 0) <= t["main_thread_s"]["stage"]
        assert t["gpu_compute_idle_s"] is None   # no CUDA stream here
    # the timeline: every stage's spans within the run, by start, adding up to the busy seconds
    for r in (a, b):
        t = r.summary["timing"]
        rows = r.summary["timeline"]
        assert rows == sorted(rows, key=lambda row: (row[1], row[2]))
        assert all(0 <= start <= end <= t["total_s"] + 1e-3 for _, start, end in rows)
        stages = {name for name, _, _ in rows}
        assert {"read", "components", "write", "main stage", "main wait_read"} <= stages
        # the writer's time after its last slab (the last batch compressed, the file closed): one span, last
        closes = [(start, end) for name, start, end in rows if name == "write_close"]
        assert len(closes) == 1, closes
        assert all(start <= closes[0][0] for name, start, _ in rows if name == "write")
        for stage in ("read", "components", "encoder", "decoder", "aggregate", "preprocess"):
            if stage in t["stage_busy_s"]:
                spans = sum(end - start for name, start, end in rows if name == stage)
                assert spans == pytest.approx(t["stage_busy_s"][stage], abs=2e-3 + 1e-4 * len(rows)), stage
    assert {"encoder", "decoder", "aggregate"} <= {name for name, _, _ in b.summary["timeline"]}
    # the GPU path's table says how much of it was the distance to the surface (the C++ one does not)
    tp, tb = b.summary["timing"]["table_parts_s"], b.summary["timing"]["main_thread_s"]["table"]
    assert set(tp) == {"surface_distance", "surface_tree", "surface_outside_air", "resolve_components", "table_columns"}
    assert 0 <= tp["surface_outside_air"] <= tp["surface_tree"] <= tp["surface_distance"] <= tb
    assert tp["resolve_components"] > 0 and tp["table_columns"] > 0
    # the columns are made on a thread while the distances are searched: beside the search, not after it
    assert tp["resolve_components"] + tp["surface_distance"] <= tb + 3e-4   # each rounded
    assert tp["surface_outside_air"] + tp["resolve_components"] + tp["table_columns"] <= tb + 3e-4
    assert a.summary["timing"]["table_parts_s"] is None and a.summary["timing"]["table_surface_runs"] is None
    runs = b.summary["timing"]["table_surface_runs"]
    assert set(runs) == {"outside_air", "defect"} and runs["outside_air"] > 0 and runs["defect"] >= len(b.defects["id"])
    # the outside air's parts: union-find (on the host), selection (ends in a host sync) and the copy, within its time
    d = b.summary["timing"]["outside_air_detail"]
    assert a.summary["timing"]["outside_air_detail"] is None
    assert {"connect_s", "select_s", "to_host_s", "air_components", "air_pairs", "air_runs",
            "late_runs"} == set(d)
    assert d["connect_s"] + d["select_s"] + d["to_host_s"] <= tp["surface_outside_air"] + 3e-4
    assert 0 <= d["late_runs"] <= runs["outside_air"] <= d["air_runs"] and d["air_components"] > 0
    # ... and the table's parts are spans of the timeline, in order, inside the table's own span
    _, t0, t1 = next(r for r in b.summary["timeline"] if r[0] == "table")   # the labeller's (then the fill's)
    parts = [r for r in b.summary["timeline"] if r[0].startswith("table ")]
    # the outside air, then the merge, then the surface search with the columns made beside it (either
    # may start first: the timeline is in order of start)
    assert [p[0] for p in parts[:2]] == ["table outside air", "table merge"]
    assert sorted(p[0] for p in parts[2:]) == ["table columns", "table surface"]
    assert all(t0 - 1e-4 <= a <= e <= t1 + 1e-4 for _, a, e in parts)
    assert parts[0][2] <= parts[1][1] + 1e-4 and all(parts[1][2] <= p[1] + 1e-4 for p in parts[2:])
    assert parts[0][2] - parts[0][1] == pytest.approx(tp["surface_outside_air"], abs=3e-4)   # each rounded


def test_compiled_anchor_compiles_a_copy_of_the_encoders(nets):
    """The bench's torch.compile anchor (and benchmarks/compile_warm.py, which fills its cache): the
    encoders of a copy in the given dtype go through torch.compile; the given network is left alone."""
    from xctrt.gpu.bench import compiled_anchor

    net = nets["paper"]
    comp = compiled_anchor(net, "max-autotune", torch.bfloat16)
    assert all(isinstance(m.image_encoder, torch._dynamo.eval_frame.OptimizedModule) for m in comp.models)
    assert not any(isinstance(m.image_encoder, torch._dynamo.eval_frame.OptimizedModule) for m in net.models)
    assert next(comp.models[0].image_encoder.parameters()).dtype == torch.bfloat16
    assert next(net.models[0].image_encoder.parameters()).dtype == torch.float32
    assert len(comp.models) == len(net.models) == 3


def test_fast_net_leaves_out_a_failing_part(nets, monkeypatch):
    """The bench's fast forward: every part when all run; a part that fails on the machine is left out,
    named with its error, and the rest still runs (and still gives the original's numbers)."""
    from segment_anything.modeling.common import MLPBlock
    from xctrt.gpu.bench import fast_net
    from xctrt.gpu.sam import fast_classes

    net = nets["shared"]
    x = torch.rand(2, 1, 64, 64, generator=torch.Generator().manual_seed(3))
    fast, dropped = fast_net(net, "sdpa", x, torch.float32)
    assert dropped == {} and all(type(m) is fast_classes()[3] for m in fast.modules() if isinstance(m, MLPBlock))

    def broken(self, x):
        raise RuntimeError("cuBLASLt: not supported")

    monkeypatch.setattr(fast_classes()[3], "forward", broken)
    fast, dropped = fast_net(net, "sdpa", x, torch.float32)
    assert dropped == {"mlp": "RuntimeError: cuBLASLt: not supported"}
    assert not any(type(m) is fast_classes()[3] for m in fast.modules())
    assert any(type(m) is fast_classes()[2] for m in fast.modules())   # the other parts stay
    with torch.inference_mode():
        assert (fast(x) - net(x)).abs().max().item() < 1e-5


def test_kept_graphs_one_stage_at_a_time():
    """Graphs captured for a model are kept for the next stage of the process, never shared by two live
    stages, given back by their holder (or by its death), and not kept for a model without weak refs."""
    import gc

    from xctrt.gpu.pipeline import kept_graphs

    class Stage:
        pass

    captures = []

    def capture():
        captures.append(object())
        return captures[-1]

    model, key = torch.nn.Linear(2, 2), (8, 1024, "cuda")
    first, second = Stage(), Stage()
    entry, steps = kept_graphs(model, key, first, capture)
    assert entry["user"]() is first and steps is captures[0]
    own, steps2 = kept_graphs(model, key, second, capture)   # held by a live stage: a capture of its own
    assert own is None and steps2 is captures[1]
    entry["user"] = None                                       # first gives them back (GpuStage.finish)
    again, steps3 = kept_graphs(model, key, second, capture)
    assert again is entry and steps3 is captures[0] and entry["user"]() is second
    del second
    gc.collect()
    third = Stage()
    assert kept_graphs(model, key, third, capture)[1] is captures[0]   # its holder died: free again
    assert kept_graphs(model, (4, 1024, "cuda"), third, capture)[1] is captures[2]   # another key: captured
    assert len(captures) == 3

    class Engine:   # TorchEngine.torch_model: a bound method, a new object at each access
        def torch_model(self, x):
            return x

    eng = Engine()
    bound = kept_graphs(eng.torch_model, key, third, capture)
    bound[0]["user"] = None
    assert kept_graphs(eng.torch_model, key, third, capture)[1] is bound[1]   # kept with the engine
    assert len(captures) == 4

    class NoWeakRef:
        __slots__ = ()

    entry, steps = kept_graphs(NoWeakRef(), key, third, capture)
    assert steps is captures[4] and entry["user"]() is third
    assert kept_graphs(NoWeakRef(), key, third, capture)[1] is captures[5]   # nothing kept for it


@pytest.mark.parametrize("mode", MODES)
def test_host_arrays_writes_same_files(nets, packages, volume, tmp_path, mode):
    import tifffile

    cpu, host = segment_both(nets[mode], packages[mode], volume, slab=4, batch_size=3)
    a = cpu.segment(volume, out_dir=tmp_path / "cpu", keep_labels=True)
    b = host.segment(volume, out_dir=tmp_path / "host", keep_labels=True)
    for name in ("labels.tif", "defects.csv", "summary.json"):
        assert (tmp_path / "cpu" / name).is_file() and (tmp_path / "host" / name).is_file(), name
    la, lb = tifffile.imread(tmp_path / "cpu" / "labels.tif"), tifffile.imread(tmp_path / "host" / "labels.tif")
    np.testing.assert_array_equal(la, a.labels)
    np.testing.assert_array_equal(lb, la)
    assert (tmp_path / "host" / "defects.csv").read_text() == (tmp_path / "cpu" / "defects.csv").read_text()
    sa = json.loads((tmp_path / "cpu" / "summary.json").read_text())
    sb = json.loads((tmp_path / "host" / "summary.json").read_text())
    assert sb["result"] == sa["result"] and sa["result"]["defects"]["pore"]["count"] > 0
    assert_same_results(a, b)


# ---------------------------------------------------------------- 2. the random networks


@pytest.mark.skipif(importlib.util.find_spec("onnx2torch") is None, reason="torch backend needs onnx2torch")
@pytest.mark.parametrize("batch", [1, 5])
def test_host_arrays_tile_mode_package_matches_cpu_pipeline(batch):
    """A real (tile-mode) package through the torch backend: the GPU path's tiling, stitching, aggregation
    and components on host arrays give the C++ pipeline's labels and table exactly."""
    from xctrt.phantom import make_phantom

    vol = make_phantom((5, 300, 280), seed=3).render(0, 5)[0]   # 300 x 280: partial tiles at both edges
    cpu = Segmenter("untrained-tiny", backend="torch", batch_size=batch, slab=3, progress=False).segment(vol)
    arr = Segmenter("untrained-tiny", batch_size=batch, slab=3, progress=False, device="host-arrays").segment(vol)
    assert arr.summary["run"]["pipeline"] == "host-arrays"
    assert len(np.unique(cpu.labels)) >= 3
    assert np.array_equal(cpu.labels, arr.labels)
    assert set(cpu.defects) == set(arr.defects)
    for k in cpu.defects:
        a, b = cpu.defects[k], arr.defects[k]
        assert a.dtype == b.dtype and np.array_equal(a, b, equal_nan=a.dtype.kind == "f"), k
    assert cpu.summary["result"] == arr.summary["result"]


@pytest.mark.skipif(importlib.util.find_spec("onnx2torch") is None, reason="torch backend needs onnx2torch")
def test_host_arrays_keeps_the_model_on_the_host_where_cuda_is_visible(monkeypatch):
    """On a GPU machine the torch backend picks CUDA by itself; the host-arrays path (arrays on the host)
    must keep the model there too, or it feeds host tensors to CUDA weights."""
    import torch
    monkeypatch.setattr(torch.cuda, "is_available", lambda: True)
    seg = Segmenter("untrained-tiny", progress=False, device="host-arrays")
    assert seg.engine.device == "cpu"
    assert all(p.device.type == "cpu" for m in seg.engine.modules_for(1) for p in m.parameters())


def test_gpu_path_refuses_slabs_its_kernels_cannot_index(nets, packages):
    """CuPy's labelling and scatter kernels index with 32-bit ints: a slab of 2**31 voxels or more is one
    clear error naming a --slab that fits, before any slab is read."""
    seg = Segmenter(packages["shared"], engine=TorchModuleEngine(nets["shared"], device="cpu"), device="host-arrays",
                    slab=8, progress=False)
    with pytest.raises(XctrtError, match=r"reach 2\*\*31 voxels.*use --slab 7 or less"):
        seg._compute_stage((100, 16384, 16384), (1.0, 1.0, 1.0), None)
    with pytest.raises(XctrtError, match="slices this large need --device cpu"):   # not even one plane fits
        seg._compute_stage((4, 65536, 32768), (1.0, 1.0, 1.0), None)


def test_build_random_class_net_is_seeded():
    torch.manual_seed(123)
    before = torch.rand(4)
    torch.manual_seed(123)
    a = build_random_class_net("tiny", 3, "paper", seed=0)
    assert torch.equal(torch.rand(4), before), "building must leave the caller's global generator as it was"
    b = build_random_class_net("tiny", 3, "paper", seed=0)
    c = build_random_class_net("tiny", 3, "paper", seed=1)
    sa, sb, sc = a.state_dict(), b.state_dict(), c.state_dict()
    assert sa.keys() == sb.keys() == sc.keys()
    for k in sa:   # every tensor: drawn weights, default-initialised biases, the prompt encoder's buffer
        assert torch.equal(sa[k], sb[k]), k
    # another seed: every random tensor differs (LayerNorm/BatchNorm-style constants do not)
    linear = (torch.nn.Linear, torch.nn.Conv2d, torch.nn.ConvTranspose2d)
    rand = {f"{n}.bias" for n, m in a.named_modules() if isinstance(m, linear) and m.bias is not None}
    rand |= {k for k in sa if sa[k].dim() > 1 or "rel_pos" in k}
    assert len(rand) > 100
    for k in rand:
        assert not torch.equal(sa[k], sc[k]), k


def test_build_random_class_net_structure(nets):
    paper, shared = nets["paper"], nets["shared"]
    assert isinstance(paper, ClassNet) and all(isinstance(m, XctSam) for m in paper.models)
    assert len(paper.models) == 3 and [m.num_heads for m in paper.models] == [1, 1, 1]
    assert len(shared.models) == 1 and shared.models[0].num_heads == 3
    assert paper.num_classes == shared.num_classes == 3 and paper.image_size == shared.image_size == 64
    for net in (paper, shared):
        assert not net.training
        assert all(not p.requires_grad for p in net.parameters())
        rel = [p for n, p in net.named_parameters() if "rel_pos" in n]
        assert len(rel) == 2 * 2 * len(net.models)   # h and w tables, two blocks
        assert all(float(p.abs().min()) > 0 for p in rel), "relative-position tables must be drawn, not zero"
    # shared mode: every head its own random weights (from_sam starts them as copies of head 0)
    heads = shared.models[0].mask_decoders
    for i in range(3):
        for j in range(i + 1, 3):
            for (n, p), q in zip(heads[i].named_parameters(), heads[j].parameters()):
                if p.dim() > 1:
                    assert not torch.equal(p, q), (i, j, n)
    # paper mode: the encoders differ from model to model
    e = [m.image_encoder.patch_embed.proj.weight for m in paper.models]
    assert not torch.equal(e[0], e[1]) and not torch.equal(e[1], e[2])
    x = torch.rand(2, 1, 64, 64, generator=torch.Generator().manual_seed(0))
    for net in (paper, shared):
        with torch.inference_mode():
            p = net(x)
        assert p.shape == (2, 3, 64, 64) and p.dtype == torch.float32
        assert float(p.min()) >= 0.0 and float(p.max()) <= 1.0
        assert float(p.std()) > 1e-3, "random heads should not give constant maps"


@pytest.mark.parametrize("mode", MODES)
def test_class_net_heads_side_by_side_give_the_same_probabilities(nets, mode, monkeypatch):
    """ClassNet.decode with head_streams: each head forked onto a stream of its own and joined back (for a
    CUDA graph to capture), in the heads' order; here with stand-in streams that record the forks and
    joins, and the same probabilities as one head after another."""
    import contextlib

    net = nets[mode]
    x = torch.rand(2, 1, net.image_size, net.image_size, generator=torch.Generator().manual_seed(4))
    with torch.no_grad():
        emb = net.encode(x)
        want = net.decode(emb, 40)
    events = []

    # every model's decoder inputs, made on the main stream and read on the heads' streams, must still be
    # alive at the joins: freed earlier, the allocator could give their memory to the next model's
    made = []

    def keeping_track(m):
        def decoder_inputs(e):
            got = type(m).decoder_inputs(m, e)
            made.extend(weakref.ref(t) for t in got)
            return got
        return decoder_inputs

    for m in net.models:
        monkeypatch.setattr(m, "decoder_inputs", keeping_track(m))
    alive_at_joins = []

    class Stream:
        def __init__(self, name):
            self.name = name

        def wait_stream(self, other):
            events.append((self.name, "waits for", other.name))
            if self.name == "main":
                alive_at_joins.append(sum(r() is not None for r in made))

    main = Stream("main")
    monkeypatch.setattr(torch.cuda, "current_stream", lambda: main)
    monkeypatch.setattr(torch.cuda, "stream", lambda s: contextlib.nullcontext(events.append(("on", s.name))))
    net.head_streams = [Stream(f"head {k}") for k in range(net.num_classes)]
    try:
        with torch.no_grad():
            got = net.decode(emb, 40)
    finally:
        net.head_streams = None
    assert torch.equal(got, want)
    assert len(made) == 2 * len(net.models) and alive_at_joins == [len(made)] * 3
    heads = [f"head {k}" for k in range(3)]
    assert events == [e for h in heads for e in ((h, "waits for", "main"), ("on", h))] + [
        ("main", "waits for", h) for h in heads]


def test_build_random_class_net_rejects_bad_arguments():
    with pytest.raises(ValueError, match="unknown backbone"):
        build_random_class_net("vit_x", 3)
    with pytest.raises(ValueError, match="mode"):
        build_random_class_net("tiny", 3, "both")


# ---------------------------------------------------------------- 3. encoder FLOPs


def test_encoder_flops_vit_b():
    """The published SAM ViT-B figure at 1024² (../shared/DESIGN.md: 0.972 TFLOP), built on the meta device
    (shapes only, no memory); and torch's own FLOP counter on the same encoder agrees exactly."""
    from torch.utils.flop_counter import FlopCounterMode

    with torch.device("meta"):
        net = build_random_class_net("vit_b", 1, "paper", device="meta")
    sam = net.models[0]
    assert sam.image_size == 1024 and next(sam.parameters()).device.type == "meta"
    f = encoder_flops(sam)
    assert abs(f / 0.972e12 - 1) < 1e-3, f
    with FlopCounterMode(display=False) as counter:
        sam.image_encoder(torch.empty(1, 3, 1024, 1024, device="meta"))
    assert counter.get_total_flops() == f


def test_encoder_flops_tiny_by_hand(nets):
    # tiny: dim 32, 2 heads (head dim 16), MLP 128, patch 16 -> 4×4 tokens, window 3 in block 0 (grid
    # padded to 6×6 = four 3×3 windows), block 1 global (one 4×4 window), neck 32 -> 32 (1×1 then 3×3)
    patch = 2 * 16 * 32 * (3 * 16 * 16)                 # conv as one product per output: 786432
    b0 = (2 * 36 * 4 * 32 * 32                          # qkv + proj on the padded 6×6 tokens
          + 2 * 16 * 2 * 32 * 128                       # MLP on the 4×4 tokens
          + 4 * 2 * (4 * 9 * 9 * 16 + 2 * 9 * 16 * (3 + 3)))   # 4 windows × 2 heads: QKᵀ, PV, rel-pos h + w
    b1 = (2 * 16 * 4 * 32 * 32
          + 2 * 16 * 2 * 32 * 128
          + 1 * 2 * (4 * 16 * 16 * 16 + 2 * 16 * 16 * (4 + 4)))
    neck = 2 * 16 * 32 * 32 + 2 * 16 * 32 * 32 * 9
    assert (patch, b0, b1, neck) == (786432, 612352, 434176, 327680)
    for net in nets.values():
        assert encoder_flops(net.models[0]) == patch + b0 + b1 + neck == 2160640


# ---------------------------------------------------------------- 4. fast attention swap


@pytest.mark.parametrize("mode", MODES)
def test_accelerate_sdpa_same_outputs(nets, mode):
    from segment_anything.modeling.common import MLPBlock
    from segment_anything.modeling.image_encoder import Attention, Block, PatchEmbed
    from segment_anything.modeling.common import LayerNorm2d
    from segment_anything.modeling.transformer import Attention as DecoderAttention
    from segment_anything.modeling.transformer import TwoWayAttentionBlock
    from xctrt.gpu.sam import fast_classes, fast_swaps

    fast_enc, fast_dec, fast_patch, fast_mlp, fast_up, fast_block = fast_classes()
    net = nets[mode]
    x = torch.rand(3, 1, 64, 64, generator=torch.Generator().manual_seed(2))
    with torch.inference_mode():
        ref = net(x)
        fast = accelerate(copy.deepcopy(net), "sdpa")
        attn = [m for m in fast.modules() if isinstance(m, Attention)]
        dec = [m for m in fast.modules() if isinstance(m, DecoderAttention)]
        assert len(attn) == 2 * len(fast.models)
        assert all(type(m) is fast_enc and m.attention_impl == "sdpa" for m in attn)
        assert dec and all(type(m) is fast_dec for m in dec)   # every two-way-transformer attention
        patches = [m for m in fast.modules() if isinstance(m, PatchEmbed)]
        assert len(patches) == len(fast.models) and all(type(m) is fast_patch for m in patches)
        mlps = [m for m in fast.modules() if isinstance(m, MLPBlock)]   # encoder blocks' and decoders' MLPs
        assert len(mlps) >= 2 * len(fast.models) and all(type(m) is fast_mlp for m in mlps)
        ups = [m for m in fast.modules() if isinstance(m, torch.nn.ConvTranspose2d)]   # 2 per mask decoder
        assert len(ups) >= 2 * len(fast.models) and all(type(m) is fast_up for m in ups)
        blocks = [m for m in fast.modules() if isinstance(m, Block)]   # their fused path: test_gpu_layout.py
        assert len(blocks) == 2 * len(fast.models) and all(type(m) is fast_block for m in blocks)
        swapped = {base: cls for _, base, cls in fast_swaps()}
        for base in (TwoWayAttentionBlock, LayerNorm2d):   # the decoders' blocks; every LayerNorm2d
            found = [m for m in fast.modules() if isinstance(m, base)]
            assert found and all(type(m) is swapped[base] for m in found), base
        assert not any(type(m) in (fast_enc, fast_dec, fast_patch, fast_mlp, fast_up, fast_block)
                       for m in net.modules()), \
            "the original is untouched"
        out = fast(x)
        assert (out - ref).abs().max().item() < 1e-5
        assert accelerate(fast, "sdpa") is fast   # again: harmless
        assert all(type(m) is fast_enc for m in fast.modules() if isinstance(m, Attention))
        assert (fast(x) - ref).abs().max().item() < 1e-5


def test_fast_decoder_attention_matches_segment_anything():
    """The decoder's attention through SDPA equals segment-anything's own on random inputs, with the
    token counts of the two-way transformer (5 tokens against a 64-token image and back)."""
    from segment_anything.modeling.transformer import Attention as DecoderAttention
    from xctrt.gpu.sam import fast_classes

    g = torch.Generator().manual_seed(7)
    for rate in (1, 2):
        ref = DecoderAttention(32, 2, downsample_rate=rate)
        with torch.no_grad():
            for p in ref.parameters():
                p.copy_(torch.randn(p.shape, generator=g) * 0.3)
        fast = copy.deepcopy(ref)
        fast.__class__ = fast_classes()[1]
        for nq, nk in ((5, 64), (64, 5)):
            q, k, v = torch.randn(3, nq, 32, generator=g), torch.randn(3, nk, 32, generator=g), torch.randn(3, nk, 32, generator=g)
            with torch.inference_mode():
                a, b = ref(q, k, v), fast(q, k, v)
            assert a.shape == b.shape == (3, nq, 32)
            assert (a - b).abs().max().item() < 1e-5 * max(1.0, a.abs().max().item())


@pytest.mark.parametrize("act,shape", [(torch.nn.GELU, (2, 5, 6, 24)), (torch.nn.ReLU, (3, 7, 24)),
                                       (lambda: torch.nn.GELU(approximate="tanh"), (4, 24)), (torch.nn.SiLU, (4, 24))])
def test_fast_mlp_matches_segment_anything(act, shape, monkeypatch):
    """The MLP with lin1 + activation as one GEMM with the activation in its epilogue equals segment-anything's
    MLPBlock for GELU and ReLU, over any leading dimensions (the CPU computes the exact GELU; cuBLASLt's
    epilogue on CUDA is the tanh form, checked on the GPU by the bench's label agreement); any other
    activation runs as the original. Also with a non-Linear lin1 (Conv-LoRA style wrappers)."""
    from segment_anything.modeling.common import MLPBlock
    from xctrt.gpu.sam import fast_classes

    g = torch.Generator().manual_seed(13)
    ref = MLPBlock(24, 96, act)
    with torch.no_grad():
        for prm in ref.parameters():
            prm.copy_(torch.randn(prm.shape, generator=g) * 0.3)
    fast = copy.deepcopy(ref)
    fast.__class__ = fast_classes()[3]
    x = torch.randn(*shape, generator=g)
    fused = []
    real = torch._addmm_activation
    monkeypatch.setattr(torch, "_addmm_activation", lambda *a, **k: fused.append(k["use_gelu"]) or real(*a, **k))
    with torch.inference_mode():
        a, b = ref(x), fast(x)
        assert a.shape == b.shape == shape
        assert (a - b).abs().max().item() < 1e-5 * a.abs().max().item()
        epilogue = type(ref.act) in (torch.nn.GELU, torch.nn.ReLU) and getattr(ref.act, "approximate", "none") == "none"
        assert fused == ([type(ref.act) is torch.nn.GELU] if epilogue else [])
        wrapped = copy.deepcopy(fast)
        wrapped.lin1 = torch.nn.Sequential(wrapped.lin1)   # not a plain Linear: the original path
        assert (wrapped(x) - a).abs().max().item() < 1e-5 * a.abs().max().item()
        assert len(fused) == (1 if epilogue else 0)


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_fast_mlp_adds_onto_the_residual(dtype):
    """add_onto(x, residual + lin2.bias) is residual + mlp(x), its second GEMM adding onto the base in
    place: float32 to a rounding of the sums; bf16 to one rounding of the operands' magnitude (the base is
    rounded after the bias, the product's sum once with it in). Not offered without the fused first
    GEMM or with a lin2 that is not a plain Linear with a bias."""
    from segment_anything.modeling.common import MLPBlock
    from xctrt.gpu.sam import fast_classes

    g = torch.Generator().manual_seed(29)
    ref = MLPBlock(64, 256)
    with torch.no_grad():
        for prm in ref.parameters():
            prm.copy_(torch.randn(prm.shape, generator=g) * 0.3)
    ref = ref.to(dtype)
    fast = copy.deepcopy(ref)
    fast.__class__ = fast_classes()[3]
    x = torch.randn(4, 10, 64, generator=g).to(dtype)
    residual = (torch.randn(4, 10, 64, generator=g) * 3).to(dtype)
    with torch.inference_mode():
        want = (residual + ref(x)).float()
        base = residual + fast.lin2.bias
        got = fast.add_onto(x, base)
        assert got is base and fast.adds_onto(x)
        scale = max(want.abs().max().item(), residual.float().abs().max().item())
        tol = 1e-5 * scale if dtype == torch.float32 else 2 ** -7 * scale   # bf16: 8 significant bits
        assert (got.float() - want).abs().max().item() <= tol
    assert not fast.adds_onto(x.double())
    plain = copy.deepcopy(fast)
    plain.lin2.bias = None
    assert not plain.adds_onto(x)
    plain = copy.deepcopy(fast)
    plain.act = torch.nn.SiLU()
    assert not plain.adds_onto(x)


@pytest.mark.parametrize("kernel,stride,padding,bias", [(2, 2, 0, True), (3, 3, 0, False), (2, 2, 1, True),
                                                     (3, 2, 0, True)])
def test_fast_conv_transpose_matches_the_conv(kernel, stride, padding, bias):
    """One GEMM where the transposed conv's stride equals its kernel (no padding); any other runs as the
    conv itself. Same numbers either way, with and without bias."""
    from xctrt.gpu.sam import FastConvTranspose2d

    g = torch.Generator().manual_seed(17)
    ref = torch.nn.ConvTranspose2d(12, 5, kernel, stride, padding, bias=bias)
    with torch.no_grad():
        for prm in ref.parameters():
            prm.copy_(torch.randn(prm.shape, generator=g))
    fast = copy.deepcopy(ref)
    fast.__class__ = FastConvTranspose2d
    x = torch.randn(3, 12, 7, 6, generator=g)
    with torch.inference_mode():
        a, b = ref(x), fast(x)
        c = fast(x.contiguous(memory_format=torch.channels_last))   # as the mask decoders give it
    assert a.shape == b.shape == c.shape and a.shape[:2] == (3, 5)
    assert (a - b).abs().max().item() < 1e-5 * a.abs().max().item()
    assert (a - c).abs().max().item() < 1e-5 * a.abs().max().item()
    # the GEMM's result comes out channels-last (a view of it), the conv's as the conv makes it
    assert b.is_contiguous(memory_format=torch.channels_last) == (kernel == stride and padding == 0)


def test_fast_layer_norm_2d_and_two_way_block_match_segment_anything():
    """The decoders' LayerNorm2d as one layer_norm on channels-last tensors (the original on others),
    and the two-way block with the image's keys + key_pe made once: the same numbers as
    segment-anything's modules."""
    from segment_anything.modeling.common import LayerNorm2d
    from segment_anything.modeling.transformer import TwoWayAttentionBlock
    from xctrt.gpu import layout
    from xctrt.gpu.sam import fast_swaps

    swapped = {base: cls for _, base, cls in fast_swaps()}
    g = torch.Generator().manual_seed(5)
    norm = LayerNorm2d(6)
    with torch.no_grad():
        norm.weight.copy_(torch.randn(6, generator=g))
        norm.bias.copy_(torch.randn(6, generator=g))
    fast = copy.deepcopy(norm)
    fast.__class__ = swapped[LayerNorm2d]
    x = torch.randn(2, 6, 5, 7, generator=g) * 3 + 1
    with torch.inference_mode():
        ref = norm(x)
        for inp in (x, x.contiguous(memory_format=torch.channels_last)):
            out = fast(inp)
            assert out.shape == ref.shape and (out - ref).abs().max().item() < 1e-5
        assert fast(x.contiguous(memory_format=torch.channels_last)).is_contiguous(memory_format=torch.channels_last)
    for skip in (True, False):
        block = TwoWayAttentionBlock(16, 2, mlp_dim=32, skip_first_layer_pe=skip)
        with torch.no_grad():
            for prm in block.parameters():
                prm.copy_(torch.randn(prm.shape, generator=g) * 0.3)
        fast_block = copy.deepcopy(block)
        fast_block.__class__ = swapped[TwoWayAttentionBlock]
        args = [torch.randn(shape, generator=g) for shape in ((3, 5, 16), (3, 12, 16), (3, 5, 16), (1, 12, 16))]
        with torch.inference_mode():
            (q0, k0), (q1, k1) = block(*args), fast_block(*args)
        if layout.available(args[0]):   # a process under the Triton interpreter: its norms are layout.layer_norm's
            torch.testing.assert_close((q1, k1), (q0, k0), rtol=1e-5, atol=1e-5)
        else:
            assert torch.equal(q0, q1) and torch.equal(k0, k1)


@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16, torch.float32])
def test_prepare_gives_segment_anythings_normalisation_bit_for_bit(nets, dtype):
    """prepare(image, dtype): (x * 255 - mean) / std on the image expanded to 3 channels, then .to(dtype),
    the same bits though made in fewer passes; the "unit" input (LiteMedSAM) is the image as is."""
    sam = nets["shared"].models[0]
    g = torch.Generator().manual_seed(3)
    image = torch.rand(3, 1, 16, 16, generator=g)
    image[0, 0, :2] = torch.tensor([0.0, 1.0])[:, None]
    x = image.expand(-1, 3, -1, -1)
    ref = ((x * 255.0 - sam.pixel_mean) / sam.pixel_std).to(dtype)
    out = sam.prepare(image, dtype)
    assert out.dtype == dtype and out.shape == (3, 3, 16, 16)
    assert torch.equal(out.view(torch.uint8), ref.view(torch.uint8))
    assert sam.prepare(image).dtype == torch.float32
    unit = copy.copy(sam)
    unit.input_norm = "unit"
    assert torch.equal(unit.prepare(image, dtype), x.to(dtype))


@pytest.mark.parametrize("kernel,stride,padding,size", [(16, 16, 0, 64), (4, 4, 0, 12), (4, 4, 1, 12), (4, 2, 0, 12)])
def test_fast_patch_embed_matches_the_conv(kernel, stride, padding, size):
    """One GEMM over unfolded patches where the conv is a plain patchify (stride = kernel, no padding);
    any other conv runs as the conv itself. Same numbers either way."""
    from segment_anything.modeling.image_encoder import PatchEmbed
    from xctrt.gpu.sam import fast_classes

    g = torch.Generator().manual_seed(11)
    ref = PatchEmbed(kernel_size=(kernel, kernel), stride=(stride, stride), padding=(padding, padding),
                     in_chans=3, embed_dim=24)
    with torch.no_grad():
        for prm in ref.parameters():
            prm.copy_(torch.randn(prm.shape, generator=g))
    fast = copy.deepcopy(ref)
    fast.__class__ = fast_classes()[2]
    x = torch.randn(2, 3, size, size, generator=g)
    with torch.inference_mode():
        a, b = ref(x), fast(x)
    assert a.shape == b.shape and a.shape[-1] == 24
    assert (a - b).abs().max().item() < 1e-5 * a.abs().max().item()


def test_compiled_fast_encoders_match_eager_without_graph_breaks(nets):
    """torch.compile of the accelerated encoders (what `xctrt bench --compile-ours` does on the GPU) traces
    each encoder as one graph, the relative-position attention an opaque operator inside it, and gives the
    eager numbers. Inductor on the CPU here; the same graph goes to Triton kernels on a GPU."""
    import torch._dynamo

    net = nets["paper"]
    fast = accelerate(copy.deepcopy(net), "sdpa")
    x = torch.rand(2, 1, 64, 64, generator=torch.Generator().manual_seed(5))
    enc = fast.models[0].image_encoder
    explained = torch._dynamo.explain(enc)(fast.models[0].prepare(x))
    assert explained.graph_count == 1 and explained.graph_break_count == 0
    assert any("rel_pos_attention" in str(n.target) for gm in explained.graphs for n in gm.graph.nodes)
    torch._dynamo.reset()
    for m in fast.models:
        m.image_encoder = torch.compile(m.image_encoder, fullgraph=True, dynamic=False)
    with torch.inference_mode():
        ref, out = net(x), fast(x)
    assert out.shape == ref.shape
    assert (out - ref).abs().max().item() < 1e-5


# ---------------------------------------------------------------- 5. bf16 weights


@pytest.mark.parametrize("mode", MODES)
def test_cast_weights_bf16(nets, mode):
    net = nets[mode]
    x = torch.rand(2, 1, 64, 64, generator=torch.Generator().manual_seed(3))
    b = copy.deepcopy(net).cast_weights(torch.bfloat16)
    for m in b.models:
        assert all(p.dtype == torch.bfloat16 for p in m.image_encoder.parameters())
        assert all(p.dtype == torch.bfloat16 for p in m.mask_decoders.parameters())
        assert m.pixel_mean.dtype == m.pixel_std.dtype == torch.float32
    for m, m0 in zip(b.models, net.models):   # the positional table keeps its float32 values, not rounded ones
        assert torch.equal(m.prompt_encoder.pe_layer.positional_encoding_gaussian_matrix,
                           m0.prompt_encoder.pe_layer.positional_encoding_gaussian_matrix)
    with torch.inference_mode():
        ref, p = net(x), b(x)
    assert p.dtype == torch.float32 and p.shape == ref.shape
    assert 0 < (p - ref).abs().max().item() < 0.05   # bf16 really ran, and stays close


# ---------------------------------------------------------------- 6. xctrt bench --gpu --host-arrays, summary


def test_datasheet_bf16_peaks_by_device_name():
    from xctrt.gpu.bench import datasheet_bf16_peak
    assert datasheet_bf16_peak("NVIDIA H200") == datasheet_bf16_peak("NVIDIA H100 80GB HBM3") == 989.5
    assert datasheet_bf16_peak("NVIDIA H200 NVL") == 835.5 and datasheet_bf16_peak("NVIDIA H100 PCIe") == 756.5
    assert datasheet_bf16_peak("cpu") is None


def test_bench_gpu_host_arrays_cli(tmp_path):
    """The whole `xctrt bench --gpu` on host arrays, ours through torch.compile (Inductor on the CPU) and
    profiled, as the device script's ours-compiled step runs it; then the summary and the picture."""
    from xctrt.timing import stalled_spans

    work = tmp_path / "work"
    cmd = [sys.executable, "-m", "xctrt", "bench", "--gpu", "--host-arrays", "--backbone", "tiny",
           "--shape", "6", "64", "64", "--naive-slices", "3", "--compile-mode", "none", "--batch-size", "2",
           "--slab", "3", "--compile-ours", "default", "--profile",
           "--work", str(work), "--json", str(tmp_path / "b.json")]
    p = subprocess.run(cmd, check=False, capture_output=True, text=True, env=xctrt_env(), cwd=REPO, timeout=120)
    assert p.returncode == 0, p.stderr[-3000:]
    res = json.loads((tmp_path / "b.json").read_text())
    assert res["device"] == "cpu" and res["backbone"] == "tiny" and res["shape"] == [6, 64, 64]
    assert sorted(res["modes"]) == ["paper", "shared"] and res["compile_ours"] == "default"
    assert res["compile_mode"] is None   # the JSON is saved after each mode (bench.run's on_mode), whole at the end
    for mode, r in res["modes"].items():
        assert "compiled" not in r
        names = [row["name"] for row in r["ours_profile"]]
        assert any("rel_pos_attention" in n for n in names) and all(row["ms"] > 0 for row in r["ours_profile"])
        assert r["naive"]["slices"] == 3 and r["ours"]["slices"] == 6
        assert r["naive"]["slices_per_s"] > 0 and r["ours"]["slices_per_s"] > 0
        assert r["ours"]["label_agreement_vs_naive"] == 1.0
        # the same volume again with the components on the host (C++): the same defects
        assert r["ours"]["components"] == "device" and r["ours-host"]["components"] == "host"
        assert r["ours-host"]["slices"] == 6 and r["ours-host"]["same_defects_as_ours"] is True
        assert r["ours"]["prob_max_abs_diff_vs_naive"] < 1e-5   # float32 on the host: the same maths
        assert r["encoder_passes_per_slice"] == (3 if mode == "paper" else 1)
        assert r["encoder_tflop_per_image"] == 2160640 / 1e12
        assert (work / f"ours-{mode}" / "labels.tif").is_file()
        # the device labeller alone on ours' labels (here its NumPy path: 6 planes, slabs of 3)
        lp = r["ours"]["labeller_profile"]
        assert lp["planes"] == 6 and lp["slab"] == 3 and len(lp["add_slab_s"]) == 2
        assert all(v > 0 for v in lp["add_slab_s"]) and lp["finish_s"] > 0
        assert lp["kernels"] == []   # no device here: the times only
        assert "labeller_profile" not in r["ours-host"]
        # the untimed run over two slabs before the timed ones (the labeller's cross-slab kernels compile there)
        assert (work / f"warm-up-{mode}" / "labels.tif").is_file()
        with tifffile.TiffFile(work / f"warm-up-{mode}" / "labels.tif") as t:
            assert len(t.pages) == 6
        assert r["ours"]["warm_up_run_s"] > 0 and r["ours-host"]["warm_up_run_s"] == r["ours"]["warm_up_run_s"]
        # each run's stalls, from its own timeline
        for run in ("ours", "ours-host"):
            assert r[run]["stalls"] == json.loads(json.dumps(stalled_spans(r[run]["timeline"])))
            assert set(r[run]["stalls"]) == {"kinds", "stalls", "device_excess_s"}
    last = p.stdout.strip().splitlines()[-6:]
    assert [line.split()[:2] for line in last] == [["paper", "naive"], ["paper", "ours"], ["paper", "ours-host"],
                                                   ["shared", "naive"], ["shared", "ours"], ["shared", "ours-host"]], \
        p.stdout

    out = tmp_path / "summary"
    out.mkdir()
    shutil.copy(tmp_path / "b.json", out / "bench.json")
    md = load_benchmark("gpu_summary").main(out)
    for mode in MODES:
        for run in ("naive", "ours", "ours-host"):
            assert f"| bench | {mode} | {run} |" in md
        assert f"- bench/{mode}/ours-host: the same run with the components on the host: " in md
        assert f"- bench/{mode}/ours-host (components on the host), where the wall goes: " in md
        assert md.count("; timeline: first model work at ") == 4   # ours and ours-host of both modes
        assert f"- bench/{mode}: ours vs naive on the same slices: labels agree 100.000 %" in md
        assert f"the untimed run over two slabs after it took {r['ours']['warm_up_run_s']:.1f} s" in md
        assert f"- bench/{mode}, where our encoder time goes (one batch, torch.compile default): " in md
        assert f"- bench/{mode}, the device labeller alone on ours' first 6 planes in slabs of 3: add_slab [" in md
    assert "post-processing: no results" in md and "attention: no results" in md
    assert "bench: no results" not in md
    # a small volume on the CPU: its numbers shown, the targets not judged by them
    assert "| not judged: [6, 64, 64] on cpu |" in md and "| met |" not in md and "| not met |" not in md
    # the stage picture from the same JSON
    load_benchmark("gpu_figure").draw(json.loads((tmp_path / "b.json").read_text()), tmp_path / "stages.png")
    from PIL import Image
    with Image.open(tmp_path / "stages.png") as im:
        assert im.size[0] == 900 and im.size[1] > 300
        pixels = np.asarray(im.convert("RGB")).reshape(-1, 3)
        assert len(np.unique(pixels, axis=0)) > 3   # bars and text, not a blank canvas


def test_gpu_summary_timeline_phases():
    """The fill, the tail and the model's busy share from a hand-made timeline."""
    phases = load_benchmark("gpu_summary").timeline_phases
    timeline = [["read", 0.0, 0.5], ["encoder", 1.0, 2.0], ["decoder", 2.0, 2.5], ["aggregate", 2.5, 2.75],
                ["compute_idle", 2.75, 3.0], ["encoder", 3.0, 4.0], ["aggregate", 4.0, 4.25], ["table", 4.25, 5.5],
                ["main stage", 0.0, 5.0]]
    ph = phases(timeline, 6.0)
    assert ph == {"fill_s": 1.0, "last_model_end_s": 4.25, "tail_s": 1.75, "model_busy_share": 2.5 / 3.25}
    # the summary's line names labels.tif's writer after its last slab (timeline_stalls.writer_tail)
    text = load_benchmark("gpu_summary")._phases_text
    assert "writer" not in text({"timeline": timeline, "total_s": 6.0})
    assert "labels.tif's writer took its last slab at 4.50 s and closed the file 0.25 s later" in \
        text({"timeline": timeline + [["write_close", 4.5, 4.75]], "total_s": 6.0})
    assert phases([["read", 0.0, 1.0]], 2.0) is None and phases(None, 2.0) is None and phases(timeline, None) is None


def test_gpu_summary_without_results(tmp_path):
    md = load_benchmark("gpu_summary").main(tmp_path)
    assert all(f"{step}: no results" in md for step in ("bench", "post-processing", "attention", "parts"))
    assert md.count("| not measured |") == 6   # every target row, none judged without its number


def test_gpu_summary_targets_from_a_recorded_call():
    """The issue's targets judged from the 2026-11-27 H200 call kept in benchmarks/results."""
    from pathlib import Path
    out = Path(__file__).resolve().parents[1] / "benchmarks" / "results" / "gpu_throughput_h200_2026-11-27"
    rows = load_benchmark("gpu_summary").targets(out)
    assert "| paper ≥ 100 slices/s (bench step) | 45.9 | not met |" in rows
    assert "| shared ≥ 250 slices/s (bench step) | 64.4 | not met |" in rows
    assert any("mode default) | 3.87× | met |" in r for r in rows)
    assert any(r.startswith("| encoder ≥ 38 %") and r.endswith("| 45 % | met |") for r in rows)
    assert any(r.startswith("| post-processing ≤ 1 s") and "1.635 s, 0 failed checks | not met |" in r for r in rows)
    assert any(r.startswith("| GPU memory in use ≤ 16 GiB") and r.endswith("| met |") for r in rows)


def test_gpu_summary_targets_from_the_evening_call():
    """The targets judged from the 2026-11-27 22:20 UTC H200 bench call: paper mode met, shared not."""
    from pathlib import Path
    out = (Path(__file__).resolve().parents[1] / "benchmarks" / "results"
           / "gpu_throughput_h200_2026-11-27_2220_bench")
    rows = load_benchmark("gpu_summary").targets(out)
    assert "| paper ≥ 100 slices/s (bench step) | 100.1, components on the host 97.8 | met (ours) |" in rows
    assert "| shared ≥ 250 slices/s (bench step) | 206.7, components on the host 115.4 | not met (ours) |" in rows
    assert any(r.startswith("| encoder ≥ 38 %") and r.endswith("| 52 % | met |") for r in rows)
    assert any(r.startswith("| post-processing ≤ 1 s") and "not measured" in r for r in rows)


def test_gpu_summary_judges_the_faster_of_ours_and_ours_host(tmp_path):
    """With the components on the host timed too, each throughput target is judged on the faster run, named."""
    from pathlib import Path
    rec = Path(__file__).resolve().parents[1] / "benchmarks" / "results" / "gpu_throughput_h200_2026-11-27"
    res = json.loads((rec / "bench.json").read_text())
    res["modes"]["paper"]["ours-host"] = {**res["modes"]["paper"]["ours"], "slices_per_s": 101.5,
                                          "gpu_memory_used_max_gib": 17.0}
    res["modes"]["shared"]["ours-host"] = {**res["modes"]["shared"]["ours"], "slices_per_s": 60.0}
    (tmp_path / "bench.json").write_text(json.dumps(res))
    rows = load_benchmark("gpu_summary").targets(tmp_path)
    assert "| paper ≥ 100 slices/s (bench step) | 45.9, components on the host 101.5 | met (ours-host) |" in rows
    assert "| shared ≥ 250 slices/s (bench step) | 64.4, components on the host 60.0 | not met (ours) |" in rows
    assert any(r.startswith("| GPU memory in use ≤ 16 GiB") and "| 17.0 GiB | not met |" in r for r in rows)


def test_gpu_parts_check_dry_run(tmp_path):
    """benchmarks/gpu_parts_check.py on the CPU (tiny network): every variant runs, gives segment-anything's
    probabilities, and the device summary lists them."""
    from xctrt.gpu.sam import FAST_PARTS

    assert load_benchmark("gpu_parts_check").main(["--out", str(tmp_path), "--device", "cpu", "--batch", "2"]) == 0
    res = json.loads((tmp_path / "gpu_parts.json").read_text())
    assert list(res["variants"]) == ["none", "all"] + [f"all but {p}" for p in FAST_PARTS] + [
        "all, windows in grid", "all, windows partitioned", "all, windows partitioned, q/k/v in place",
        "all, windows partitioned, q/k/v heads-major", "all, offset terms products", "all, offset terms kernel"]
    for name, r in res["variants"].items():
        assert r["encoder_ms"] > 0 and r["decoder_ms"] > 0, name
        assert r["max_abs_diff_vs_none"] < 1e-5, name   # float32 on the CPU: the same maths
    # the decoders beside the next batch's encoders (eager on the CPU): the same probabilities
    assert res["decoder_overlap"] == {"max_abs_diff_vs_serial": 0.0}
    assert res["decoder_profile_all_parts"] and res["backbone"] == "tiny"
    ops = res["ops_by_shape_all_parts"]   # operators with their input shapes, each pass
    assert set(ops) == {"decoder", "encoder"}
    for part, rows in ops.items():
        assert rows and all(r["ms"] > 0 and r["calls"] >= 1 and "::" in r["op"] for r in rows), part
    assert any(r["op"] == "aten::native_layer_norm" and r["shapes"].startswith("[[") for r in ops["decoder"])
    assert sorted(res["encoder_batch_sweep"], key=int) == ["2", "4", "16"]   # the run's batch and --sweep's
    for b, r in res["encoder_batch_sweep"].items():
        assert r["encoder_ms_per_image"] > 0 and r["encoder_tflops"] > 0, b
    md = load_benchmark("gpu_summary").main(tmp_path)
    assert "fast-forward parts (cpu, tiny, batch 2," in md and "all but upscale" in md
    assert "encoder with every part, per image by batch: batch 2 " in md
    assert "decoder operators by input shape (eager, ms of their own kernels): aten::" in md


# ---------------------------------------------------------------- 7. errors


@pytest.mark.skipif(torch.cuda.is_available(), reason="checks the message on a machine without CUDA")
def test_cuda_device_without_cuda_is_one_clear_error(nets, packages, tmp_path):
    """Refused before any work: no CUDA device (or no CuPy) is one sentence at construction."""
    with pytest.raises(XctrtError) as err:
        Segmenter(packages["shared"], engine=TorchModuleEngine(nets["shared"], device="cpu"), device="cuda",
                  progress=False)
    msg = str(err.value)
    assert ("CUDA" in msg or "CuPy" in msg) and "\n" not in msg and ". " not in msg.rstrip(".")


def test_cli_notes_gpu_fallbacks():
    """`xctrt segment` says, in a note line each, when the GPU path fell back to a slower way."""
    from xctrt.cli import gpu_fallback_notes

    assert gpu_fallback_notes({"timing": {"cuda_graphs_not_used_because": None,
                                          "fused_kernels_not_used_because": None}}) == []
    assert gpu_fallback_notes({"timing": {}}) == []
    notes = gpu_fallback_notes({"timing": {"cuda_graphs_not_used_because": "RuntimeError: capture",
                                           "fused_kernels_not_used_because": "the fused aggregation differs"}})
    assert len(notes) == 2
    assert notes[0].startswith("the model ran without CUDA graphs") and notes[0].endswith("RuntimeError: capture")
    assert "fused kernels" in notes[1] and notes[1].endswith("the fused aggregation differs")


def test_cli_segment_device_cuda_without_cuda(tmp_path):
    """`xctrt segment --device cuda` here: one `xctrt: error:` line, exit 2, no output folder content."""
    from xctrt.phantom import write_phantom

    write_phantom(tmp_path / "v.tif", (4, 64, 64), seed=0)
    p = subprocess.run([sys.executable, "-m", "xctrt", "segment", str(tmp_path / "v.tif"), "-o", str(tmp_path / "out"),
                        "--device", "cuda", "--no-progress"], capture_output=True, text=True, env=xctrt_env(), cwd=REPO)
    assert p.returncode == 2, p.stderr
    lines = [ln for ln in p.stderr.splitlines() if ln.strip()]
    assert len(lines) == 1 and lines[0].startswith("xctrt: error:") and ("CUDA" in lines[0] or "CuPy" in lines[0])
    assert not (tmp_path / "out" / "summary.json").exists()


def test_bogus_device_is_one_clear_error(nets, packages):
    for engine in (None, TorchModuleEngine(nets["shared"], device="cpu")):
        with pytest.raises(XctrtError, match="device must be one of cpu, cuda, host-arrays") as err:
            Segmenter(packages["shared"], engine=engine, device="bogus", progress=False)
        assert "\n" not in str(err.value) and "'bogus'" in str(err.value)


# ---------------------------------------------------------------- 8. bf16 for a package's graphs


def test_segment_precision_bf16(run_cli, tmp_path):
    """`--precision bf16` runs a package's graphs in bfloat16 through the torch backend, on the host
    pipeline and on the GPU path's code alike, says so in the summary, and labels nearly every voxel as
    float32 does; without the torch backend it is refused in one line."""
    from xctrt.phantom import make_phantom, write_phantom

    vol = tmp_path / "v.tif"
    write_phantom(vol, (6, 96, 112), seed=3)
    code, _, err = run_cli("segment", vol, "-o", tmp_path / "out", "-m", "untrained-tiny", "--backend", "torch",
                           "--precision", "bf16", "--no-progress")
    assert code == 0, err
    summary = json.loads((tmp_path / "out" / "summary.json").read_text())
    assert summary["run"]["backend"] == "torch-bf16"
    code, _, err = run_cli("segment", vol, "-o", tmp_path / "out2", "-m", "untrained-tiny", "--precision", "bf16")
    assert code == 2 and err.count("\n") == 1 and "needs the torch backend" in err
    volume = make_phantom((6, 96, 112), seed=3).render(0, 6)[0]
    labels = {}
    for precision in ("fp32", "bf16"):
        seg = Segmenter("untrained-tiny", backend="torch", device="host-arrays", precision=precision,
                        batch_size=4, slab=3, progress=False)
        labels[precision] = seg.segment(volume).labels
    agree = float((labels["fp32"] == labels["bf16"]).mean())
    assert 0.99 < agree <= 1.0


def test_sample_threads_counts_each_thread_and_keeps_the_exit_status(tmp_path):
    """benchmarks/sample_threads.py (SAMPLE=1 in the device script): per thread name, where its time
    went, ours (xctrt/benchmarks frames) apart; the sampled program's exit status is its own."""
    script = tmp_path / "work.py"
    script.write_text(
        "import sys, threading, time\n"
        "def waiter():\n"
        "    time.sleep(0.4)\n"
        "t = threading.Thread(target=waiter, name='xctrt-test-waiter')\n"
        "t.start()\n"
        "end = time.perf_counter() + 0.4\n"
        "while time.perf_counter() < end:\n"
        "    sum(range(1000))\n"
        "t.join()\n"
        "g = threading.Thread(target=waiter, name='xctrt-components')\n"   # as the GPU stage's
        "g.start()\n"
        "g.join()\n"
        "sys.exit(3)\n")
    out = tmp_path / "out"
    r = subprocess.run([sys.executable, str(REPO / "benchmarks" / "sample_threads.py"), "--out", str(out),
                        "--every-ms", "5", str(script)], capture_output=True, text=True, timeout=60)
    assert r.returncode == 3, r.stderr
    rep = json.loads((out / "thread_samples.json").read_text())
    threads = rep["threads"]
    assert {"MainThread", "xctrt-test-waiter", "xctrt-components"} <= set(threads)
    assert threads["xctrt-test-waiter"]["samples"] >= 10 and threads["MainThread"]["samples"] >= 10
    assert any("sleep" in where or "waiter" in where for where, _ in threads["xctrt-test-waiter"]["leaf"])
    # kept apart: the samples while the GPU stage's thread was alive (the last 0.4 s only)
    during = rep["while_gpu_stage_streams"]
    assert "xctrt-test-waiter" not in during and during["MainThread"]["samples"] >= 10
    assert during["MainThread"]["samples"] < threads["MainThread"]["samples"]
    assert any("threading.py" in where for where, _ in during["MainThread"]["leaf"])   # waits in join()
    assert "thread samples every 5.0 ms" in r.stdout and "while the GPU stage streamed slabs" in r.stdout


def test_host_tail_costs_benchmark_runs(tmp_path):
    """benchmarks/host_tail_costs.py at a small size: every figure it reports, the CSV written where asked."""
    out = load_benchmark("host_tail_costs").main(["--runs", "5000", "--csv-rows", "300", "--repeat", "1",
                                                  "--dir", str(tmp_path), "--json", str(tmp_path / "costs.json")])
    assert json.loads((tmp_path / "costs.json").read_text()) == out
    assert out["gc_objects"] > 0 and out["gc_full_pass_s"] > 0 and out["gc_full_pass_frozen_s"] >= 0
    assert out["host_pick_s"] > 0 and out["csv_rows"] == 300 and out["csv_bytes"] > 300 * 50
    assert out["csv_format_s"] > 0 and out["csv_write_s"] > 0 and out["csv_streamed_s"] > 0 and out["check_probs_on_host_s"] > 0 and list(tmp_path.iterdir()) == [tmp_path / "costs.json"]


def test_stalled_spans_finds_the_spans_that_stretched_together(tmp_path, capsys):
    """xctrt.timing.stalled_spans (and benchmarks/timeline_stalls.py, its command line): a run of 20
    batches of 20 ms with one held up 200 ms while the reader and the main thread's stage stretched too.
    The three are found, each with the others beside it; the compute stream's loss is that span's excess;
    waits and zero-length marks are not work."""
    from xctrt.timing import stalled_spans

    cli = load_benchmark("timeline_stalls")
    timeline, t = [], 0.0
    for i in range(20):
        d = 0.22 if i == 10 else 0.02
        timeline += [["encoder", t, t + d], ["components", t, t], ["write_wait", t, t + 0.3]]
        t += d
    # the encoder of batch 10 runs 0.20-0.42 s; the reader's third read and the main thread's third stage
    # stretch over the same time, the others are short and elsewhere
    timeline += [["read", a, b] for a, b in ((0.0, 0.03), (0.1, 0.13), (0.19, 0.49), (0.5, 0.53), (0.6, 0.63))]
    timeline += [["main stage", a, b] for a, b in ((0.02, 0.03), (0.12, 0.13), (0.18, 0.44), (0.52, 0.53), (0.62, 0.63))]
    got = stalled_spans(timeline)
    assert [s["kind"] for s in got["stalls"]] == ["main stage", "read", "encoder"]
    assert all({b["kind"] for b in s["beside"]} == {"main stage", "read", "encoder"} - {s["kind"]} for s in got["stalls"])
    assert abs(got["device_excess_s"] - 0.2) < 1e-9
    assert set(got["kinds"]) == {"encoder", "read", "main stage"} and got["kinds"]["encoder"]["median_ms"] == 20.0
    quiet = [s for s in timeline if not (s[0] == "encoder" and s[2] - s[1] > 0.1)]
    assert stalled_spans(quiet)["device_excess_s"] == 0
    doc = {"modes": {"shared": {"ours": {"slices": 160, "slices_per_s": 200.0, "timeline": timeline}}}}
    (tmp_path / "bench.json").write_text(json.dumps(doc))
    assert cli.main([str(tmp_path / "bench.json"), "--json", str(tmp_path / "stalls.json")]) == 0
    assert "3 stalled spans; the compute stream's spans 0.200 s past their medians" in capsys.readouterr().out
    assert json.loads((tmp_path / "stalls.json").read_text())["shared mode, ours: 160 slices, 200.0 slices/s"] == \
        {**json.loads(json.dumps(got)), "writer": None}   # no writer's spans in this timeline


def test_timeline_stalls_says_how_long_the_writer_worked_after_its_last_slab():
    """benchmarks/timeline_stalls.writer_tail: the write_close span where a run has it; for a run from
    before it, the writer's busy seconds less its write spans, from the time it took its last slab."""
    tail = load_benchmark("timeline_stalls").writer_tail
    waits = [["write_wait", 0.0, 1.0], ["write", 1.0, 1.1], ["write_wait", 1.1, 2.0], ["write", 2.0, 2.2],
             ["write_wait", 2.2, 3.0]]
    old = {"timeline": waits, "stage_busy_s": {"write": 0.8}, "total_s": 4.0}
    got = tail(old)
    assert got["took_last_slab_s"] == 3.0 and abs(got["after_s"] - 0.5) < 1e-9 and got["total_s"] == 4.0
    new = {"timeline": waits + [["write_close", 3.0, 3.25]], "stage_busy_s": {"write": 0.55}, "total_s": 4.0}
    assert tail(new) == {"took_last_slab_s": 3.0, "after_s": 0.25, "total_s": 4.0}
    assert tail({"timeline": [["read", 0.0, 1.0]], "stage_busy_s": {}}) is None


def test_pinned_host_counts_the_blocks_made_during_the_stage():
    """GpuStage.pinned_host: the pinned blocks torch's host allocator made since the stage began and the
    ms they took (a cudaHostAlloc holds the driver's lock: other threads' launches wait), from torch's
    host_memory_stats; None where torch keeps none."""
    from types import SimpleNamespace

    from xctrt.gpu import pipeline as P

    stats = {"num_host_alloc": 3, "host_alloc_time.total": 1500.0, "allocated_bytes.current": 2 ** 30}
    fake = SimpleNamespace(cuda=SimpleNamespace(host_memory_stats=lambda: dict(stats)))
    stage = object.__new__(P.GpuStage)
    stage.torch, stage._pinned_at_start = fake, P._pinned_host_stats(fake)
    stats.update({"num_host_alloc": 5, "host_alloc_time.total": 41500.0, "allocated_bytes.current": 3 * 2 ** 29})
    assert stage.pinned_host == {"blocks_made": 2, "making_ms": 40.0, "pool_gib": 1.5}
    stage._pinned_at_start = None   # off CUDA
    assert stage.pinned_host is None

    def no_stats():
        raise RuntimeError("not kept by this torch")
    assert P._pinned_host_stats(SimpleNamespace(cuda=SimpleNamespace(host_memory_stats=no_stats))) is None
