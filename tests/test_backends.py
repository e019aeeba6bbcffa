"""Backends agree on the same package; optional ones are skipped where not installed."""
import importlib.util

import numpy as np
import pytest

from xctrt.backends import available_backends, make_engine
from xctrt.errors import XctrtError
from xctrt.model import load_package


def test_onnxruntime_shapes_and_range():
    pkg = load_package()
    x = np.random.default_rng(0).random((3, 1, pkg.input_size, pkg.input_size), dtype=np.float32)
    y = make_engine(pkg, "onnxruntime", threads=1).run(x)
    assert y.shape == (3, len(pkg.classes), pkg.input_size, pkg.input_size) and y.dtype == np.float32
    assert np.all((y >= 0) & (y <= 1))


def test_auto_without_tensorrt_is_onnxruntime():
    if "tensorrt" in available_backends():
        pytest.skip("TensorRT installed here")
    assert make_engine(load_package(), "auto").name == "onnxruntime"


@pytest.mark.skipif(not (importlib.util.find_spec("torch") and importlib.util.find_spec("onnx2torch")),
                    reason="torch backend needs torch + onnx2torch (the train extra)")
def test_torch_backend_matches_onnxruntime():
    pkg = load_package()
    x = np.random.default_rng(1).random((2, 1, pkg.input_size, pkg.input_size), dtype=np.float32)
    ref = make_engine(pkg, "onnxruntime", threads=1).run(x)
    got = make_engine(pkg, "torch", threads=1).run(x)
    assert got.shape == ref.shape and got.dtype == np.float32
    assert np.max(np.abs(got - ref)) < 1e-5


@pytest.mark.skipif(importlib.util.find_spec("tensorrt") is not None, reason="TensorRT is installed here")
def test_tensorrt_missing_is_a_clear_error():
    with pytest.raises(XctrtError, match="tensorrt"):
        make_engine(load_package(), "tensorrt")


@pytest.mark.skipif(not (importlib.util.find_spec("torch") and importlib.util.find_spec("onnx2torch")),
                    reason="torch backend needs torch + onnx2torch (the train extra)")
def test_torch_backend_bf16():
    """precision bf16: the convolutions really run in bfloat16 (results move, by bf16's rounding), the
    probabilities still come back float32 in [0, 1]; other backends refuse it in one sentence."""
    pkg = load_package("untrained-tiny")
    x = np.random.default_rng(1).random((2, 1, pkg.input_size, pkg.input_size), dtype=np.float32)
    ref = make_engine(pkg, "torch").run(x)
    eng = make_engine(pkg, "torch", precision="bf16")
    got = eng.run(x)
    assert eng.name == "torch-bf16" and got.dtype == np.float32 and got.shape == ref.shape
    assert np.all((got >= 0) & (got <= 1))
    assert 0 < np.max(np.abs(got - ref)) < 0.05
    with pytest.raises(XctrtError, match="needs the torch backend"):
        make_engine(pkg, "onnxruntime", precision="bf16")
    with pytest.raises(XctrtError, match="unknown precision"):
        make_engine(pkg, "torch", precision="fp8")
