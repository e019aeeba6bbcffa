"""Shared fixtures: a small phantom volume on disk, the default model package, a warm Segmenter,
and helpers that run the command line in-process (fast) or as a real `python -m xctrt` process."""
from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest

# The suite runs on the tiny untrained package: fast, and every pipeline stage still runs for real.
# Subprocesses inherit it. Tests of the trained package name it explicitly.
os.environ["XCTRT_MODEL"] = "untrained-tiny"

import xctrt
from xctrt.model import load_package
from xctrt.phantom import make_phantom, write_phantom

PHANTOM_SHAPE = (12, 96, 80)
PHANTOM_VOXEL = (0.02, 0.01, 0.01)  # (dz, dy, dx) mm, anisotropic on purpose
OUTPUT_NAMES = {"labels.tif", "defects.csv", "preview.png", "summary.json"}
REPO = Path(__file__).resolve().parents[1]


def load_benchmark(name: str):
    """A script of benchmarks/ as a module (the folder is not a package)."""
    import importlib.util
    spec = importlib.util.spec_from_file_location(name, REPO / "benchmarks" / f"{name}.py")
    mod = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(mod)
    return mod


def crofton_reference(voxel_size):
    """The 13 Crofton directions (dz, dy, dx) and the surface area per line crossing along each,
    2 w V / |v| with w the direction's share of the sphere (both signs' spherical Voronoi cells,
    from SciPy): the reference for _core.crofton_factors (cpp/crofton.hpp)."""
    from scipy.spatial import SphericalVoronoi

    dirs = np.array([(0, 0, 1), (0, 1, -1), (0, 1, 0), (0, 1, 1)]
                    + [(1, dy, dx) for dy in (-1, 0, 1) for dx in (-1, 0, 1)])
    v = dirs * np.asarray(voxel_size, float)
    length = np.linalg.norm(v, axis=1)
    u = v / length[:, None]
    areas = SphericalVoronoi(np.concatenate([u, -u]), 1.0, np.zeros(3)).calculate_areas()
    w = (areas[:13] + areas[13:]) / (4 * np.pi)
    return dirs, 2 * w * np.prod(voxel_size) / length


def outside_air_reference(labels: np.ndarray) -> np.ndarray:
    """The part's outside: air (label 0) connected, 6-neighbours, to the volume's y or x sides."""
    from scipy import ndimage
    comp, _ = ndimage.label(labels == 0)  # 6-neighbours
    faces = [comp[:, 0], comp[:, -1], comp[:, :, 0], comp[:, :, -1]]
    edge = np.unique(np.concatenate([f.ravel() for f in faces]))
    return np.isin(comp, edge[edge > 0])


def surface_distance_reference(labels: np.ndarray, ids: np.ndarray, voxel_size) -> np.ndarray:
    """Per component id 1..max: the smallest distance from its voxels to the part's outside (air
    connected, 6-neighbours, to the volume's sides: y or x at the edge, not the first or last
    plane), by SciPy's exact Euclidean distance transform; NaN where no air is outside."""
    from scipy import ndimage
    outside = outside_air_reference(labels)
    n = int(ids.max())
    if not outside.any():
        return np.full(n, np.nan)
    edt = ndimage.distance_transform_edt(~outside, sampling=voxel_size)
    return np.asarray(ndimage.minimum(edt, ids, index=np.arange(1, n + 1)), np.float64).reshape(n)


def phantom_array(shape=PHANTOM_SHAPE, seed: int = 0, dtype=np.uint16) -> np.ndarray:
    ph = make_phantom(shape, seed=seed, dtype=dtype)
    return ph.render(0, shape[0])[0]


@pytest.fixture
def phantom_path(tmp_path) -> Path:
    """A compressed OME-TIFF phantom (uint16, PHANTOM_SHAPE, PHANTOM_VOXEL mm) in its own folder."""
    p = tmp_path / "in" / "phantom.ome.tif"
    p.parent.mkdir()
    write_phantom(p, PHANTOM_SHAPE, seed=0, voxel_size=PHANTOM_VOXEL)
    return p


@pytest.fixture(scope="session")
def phantom_volume() -> np.ndarray:
    """The same phantom as phantom_path, in memory (read-only)."""
    a = phantom_array()
    a.setflags(write=False)
    return a


@pytest.fixture(scope="session")
def default_package():
    return load_package()


@pytest.fixture(scope="session")
def segmenter(default_package):
    """One warm ONNX Runtime segmenter for tests that do not vary its settings (do not mutate)."""
    from xctrt.pipeline import Segmenter
    return Segmenter(default_package, backend="onnxruntime", progress=False)


@pytest.fixture
def run_cli(capsys):
    """run_cli(*args) -> (exit code, stdout, stderr) of xctrt.cli.main in this process."""
    from xctrt.cli import main

    def run(*args):
        capsys.readouterr()  # drop anything printed before
        try:
            code = main([str(a) for a in args])
        except SystemExit as exc:  # argparse usage errors, --version
            code = exc.code
        out = capsys.readouterr()
        return code, out.out, out.err
    return run


def xctrt_env() -> dict:
    """Environment for a child `python -m xctrt` that imports the same xctrt as this process,
    whether it is installed or found through PYTHONPATH=python."""
    env = dict(os.environ)
    root = str(Path(xctrt.__file__).resolve().parents[1])
    env["PYTHONPATH"] = os.pathsep.join([root] + ([env["PYTHONPATH"]] if env.get("PYTHONPATH") else []))
    env.pop("PYTHONWARNINGS", None)
    return env


def use_triton_interpreter() -> bool:
    """Ask for the Triton interpreter (kernels on CPU tensors) and say whether this process has it.

    Triton decorates its library functions (tl.sum, ...) when first imported, so the interpreter works
    only if TRITON_INTERPRET=1 was set before that: set it if triton is not imported yet; if it is,
    the answer is whether it was set then (by an earlier test module). Call before importing a kernel."""
    if "triton" not in sys.modules:
        os.environ["TRITON_INTERPRET"] = "1"
    return os.environ.get("TRITON_INTERPRET") == "1"


def triton_child_env(interpret: bool) -> dict:
    """xctrt_env() with TRITON_INTERPRET=1 set (interpret) or removed: Triton reads it when first imported."""
    env = {k: v for k, v in xctrt_env().items() if k != "TRITON_INTERPRET"}
    env["PYTHONPATH"] = os.pathsep.join([str(REPO), env["PYTHONPATH"]])   # benchmarks/ too
    if interpret:
        env["TRITON_INTERPRET"] = "1"
    return env


# The test files whose Triton kernels run under the interpreter; when this process imported triton
# before any of them could set TRITON_INTERPRET=1, their kernel tests run again in one fresh pytest
# (a child's imports cost ~15 s on 2 cores, so one child for all of them, not one per file).
INTERPRETED_FILES = ("test_gpu_attention.py", "test_gpu_layout.py", "test_gpu_resample.py")
INTERPRETED_KEYWORD = "triton and not fresh_process and not sm90"
_interpreted_results: dict | None = None


def rerun_under_triton_interpreter(test_file) -> None:
    """Fail if test_file's kernel tests (INTERPRETED_KEYWORD) failed, errored or were skipped in the
    shared fresh pytest with the Triton interpreter on, or if none of them ran there."""
    global _interpreted_results
    name = Path(test_file).name
    assert name in INTERPRETED_FILES, name
    if _interpreted_results is None:
        import tempfile
        import xml.etree.ElementTree as ET

        with tempfile.TemporaryDirectory() as tmp:
            xml = Path(tmp) / "junit.xml"
            p = subprocess.run([sys.executable, "-m", "pytest", "-q", "-rs", "-p", "no:cacheprovider",
                                f"--junitxml={xml}", "-k", INTERPRETED_KEYWORD,
                                *(str(REPO / "tests" / f) for f in INTERPRETED_FILES)],
                               capture_output=True, text=True, env=triton_child_env(True), check=False,
                               timeout=600, cwd=REPO)
            results = {f: {"ran": 0, "bad": []} for f in INTERPRETED_FILES}
            if xml.exists():
                for case in ET.parse(xml).getroot().iter("testcase"):
                    module = case.get("classname", "").split(".")[-1] + ".py"   # tests.test_gpu_x
                    if module in results:
                        results[module]["ran"] += 1
                        results[module]["bad"] += [f"{case.get('name')}: {c.tag} {c.get('message', '')[:300]}"
                                                   for c in case if c.tag in ("failure", "error", "skipped")]
        _interpreted_results = {"results": results, "log": p.stdout[-4000:] + p.stderr[-2000:]}
    got = _interpreted_results["results"][name]
    assert got["ran"] > 0 and not got["bad"], (got, _interpreted_results["log"])


# The start of every sm_90 compile script: Triton's ahead-of-time API (it moves between versions: a
# mismatch prints {"api": why} and ends the script, which sm90_compile_report turns into a skip) and
# compile(fn, sig, const, **options) -> the compiled kernel, or {"error": ...} for a compile error.
SM90_PRELUDE = r'''
import json, os, re, subprocess, sys, tempfile
import triton
try:
    from triton.backends.compiler import GPUTarget
    from triton.compiler import ASTSource
except Exception as exc:
    print(json.dumps({"api": repr(exc)})); sys.exit(0)
cuobjdump = os.path.join(os.path.dirname(triton.__file__), "backends", "nvidia", "bin", "cuobjdump")
def compile(fn, sig, const, attrs=None, **options):
    try:
        src = ASTSource(fn=fn, signature=sig, constexprs={(fn.arg_names.index(k),): v for k, v in const.items()},
                        **({"attrs": attrs} if attrs else {}))
        return triton.compile(src, target=GPUTarget("cuda", 90, 32), options=options)
    except triton.CompilationError as exc:
        return {"error": str(exc)[-2000:]}
    except Exception as exc:
        print(json.dumps({"api": repr(exc)[:500]})); sys.exit(0)
def cuobjdump_of(kern, flag):
    """cuobjdump's output (flag: -sass, -res-usage) for a compiled kernel; None without Triton's cuobjdump."""
    if not os.path.exists(cuobjdump):
        return None
    with tempfile.NamedTemporaryFile(suffix=".cubin", delete=False) as f:
        f.write(kern.asm["cubin"])
    try:
        return subprocess.run([cuobjdump, flag, f.name], capture_output=True, text=True).stdout
    finally:
        os.unlink(f.name)
'''


def sm90_compile_report(script: str, timeout: float = 400) -> dict:
    """Run SM90_PRELUDE + a script that compiles Triton kernels for sm_90 without a GPU and prints one
    JSON report ({name: row}) last; skip when it says Triton's ahead-of-time API differs here
    ({"api": why}); fail on a crash or on a row with a compile "error"."""
    p = subprocess.run([sys.executable, "-c", SM90_PRELUDE + script], capture_output=True, text=True, check=False,
                       env=triton_child_env(interpret=False), timeout=timeout, cwd=REPO)
    assert p.returncode == 0, p.stderr[-3000:]
    report = json.loads(p.stdout.strip().splitlines()[-1])
    if "api" in report:
        pytest.skip(f"Triton's ahead-of-time compile API differs here: {report['api']}")
    for name, row in report.items():
        assert "error" not in row, f"{name}: {row.get('error')}"
    return report


def run_xctrt_process(*args, timeout: float = 120, cwd=None):
    """(exit code, stdout, stderr) of a real `python -m xctrt ARGS` process."""
    p = subprocess.run([sys.executable, "-m", "xctrt", *map(str, args)], capture_output=True, text=True,
                       env=xctrt_env(), timeout=timeout, cwd=cwd)
    return p.returncode, p.stdout, p.stderr


@pytest.fixture
def run_process():
    return run_xctrt_process


def randomise_conv_lora(model, g):
    """Conv-LoRA adapters away from their start, drawn from generator g: nonzero B (zero at the start,
    where the adapted model equals the frozen one), a random gate and noise, random experts."""
    import torch
    from training.conv_lora import conv_lora_modules

    with torch.no_grad():
        for m in conv_lora_modules(model):
            m.lora_b.weight.copy_(torch.randn(m.lora_b.weight.shape, generator=g) * 0.05)
            m.w_gate.copy_(torch.randn(m.w_gate.shape, generator=g) * 2)
            m.w_noise.copy_(torch.randn(m.w_noise.shape, generator=g))
            for e in m.experts:
                e.conv.weight.copy_(torch.randn(e.conv.weight.shape, generator=g) * 0.3)
                e.conv.bias.copy_(torch.randn(e.conv.bias.shape, generator=g) * 0.1)
    return model


def onnx_vs_torch(model, graph: bytes, x):
    """An exported graph (outputs probabilities and logits) against its PyTorch model on the batch x:
    (probabilities, logits, max |Δ| of each). The batch must route through more than one Conv-LoRA
    expert, so that the check covers the graph's one-hot expert selection."""
    import onnxruntime as ort
    import torch
    from training.conv_lora import conv_lora_modules

    sess = ort.InferenceSession(graph, providers=["CPUExecutionProvider"])
    with torch.no_grad():
        logits = model.logits(x)
        probs = torch.sigmoid(logits)
    chosen = {int(k) for m in conv_lora_modules(model) for k in m.last_choice}
    assert len(chosen) > 1, "the check should cover more than one expert"
    p_onnx, l_onnx = sess.run(None, {"image": x.numpy()})
    return (probs, logits, float(np.abs(p_onnx - probs.numpy()).max()),
            float(np.abs(l_onnx - logits.numpy()).max()))


@pytest.fixture
def slab_calls(monkeypatch):
    """Counts slabs that went through inference, to prove an error came mid-stream."""
    import xctrt.pipeline as pipeline
    calls = []
    real = pipeline.Segmenter.labels_for_slab

    def counting(self, slab, *a, **k):
        calls.append(len(slab))
        return real(self, slab, *a, **k)
    monkeypatch.setattr(pipeline.Segmenter, "labels_for_slab", counting)
    return calls
