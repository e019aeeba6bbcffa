"""benchmarks/inductor_tuning.py: the autotuning part of a TORCHINDUCTOR_CACHE_DIR, counted and packed alone
(what benchmarks/gpu_throughput.sh brings back from the GPU machine for git)."""
from __future__ import annotations

import json
import tarfile

from conftest import load_benchmark

tuning = load_benchmark("inductor_tuning")


def make_cache(root):
    """A cache dir laid out as inductor lays it out: timings, best configs, a mark, and the rest."""
    timings = {"system": {"hash": "abc"}, "cache": {
        "addmm": {"[shape a]": {"highest": {"triton_mm_1-x": 0.07, "bias_addmm": 0.06}},
                  "[shape b]": {"highest": {"triton_mm_2-y": 0.1}}},
        "convolution": {"[shape c]": {"highest": {"conv": 0.09, "triton_conv-z": 0.26, "t2": 0.3}}}}}
    (root / "cache").mkdir(parents=True)
    (root / "cache" / "abc").write_text(json.dumps(timings))
    (root / "ab").mkdir()
    (root / "ab" / "cabkernel.py").write_text("# kernel code")
    (root / "ab" / "cabkernel.best_config").write_text('{"XBLOCK": 1024, "num_warps": 4}')
    (root / "fxgraph" / "x").mkdir(parents=True)
    (root / "fxgraph" / "x" / "graph").write_bytes(b"\0" * 100)
    (root / "xctrt-warmed-max-autotune").touch()
    return root


def test_summary_counts_shapes_choices_configs_and_marks(tmp_path):
    s = tuning.summarize(make_cache(tmp_path / "c"))
    assert s["timed"] == {"addmm": 2, "convolution": 1}
    assert s["choices"] == 6
    assert s["best_configs"] == 1
    assert s["marks"] == ["max-autotune"]
    assert s["unreadable"] == []
    assert "addmm 2, convolution 1 (6 choices)" in tuning.describe(s)


def test_pack_keeps_the_tuning_alone_and_unpacks_to_the_same_summary(tmp_path):
    cache = make_cache(tmp_path / "c")
    out = tmp_path / "tuning.tar.xz"
    assert tuning.pack(cache, out) == 3
    with tarfile.open(out) as tar:
        names = sorted(tar.getnames())
        assert names == ["ab/cabkernel.best_config", "cache/abc", "xctrt-warmed-max-autotune"]
        tar.extractall(tmp_path / "back", filter="data")
    assert tuning.summarize(tmp_path / "back") == tuning.summarize(cache)
    assert not (tmp_path / "tuning.tar.xz.part").exists()


def test_no_tuning_writes_nothing_and_a_broken_timing_file_is_named(tmp_path, capsys):
    cache = tmp_path / "c"
    (cache / "fxgraph").mkdir(parents=True)
    out = tmp_path / "t.tar.xz"
    assert tuning.main([str(cache), "--pack", str(out)]) == 0
    assert not out.exists()
    assert "nothing to keep" in capsys.readouterr().out
    (cache / "cache").mkdir()
    (cache / "cache" / "abc").write_text("{not json")
    s = tuning.summarize(cache)
    assert s["unreadable"] == ["cache/abc"] and s["choices"] == 0
    assert "unreadable: cache/abc" in tuning.describe(s)
