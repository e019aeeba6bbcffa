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
