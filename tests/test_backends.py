"""Backends agree on the same package; optional ones are skipped where not installed."""
import dataclasses
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


needs_torch = pytest.mark.skipif(not (importlib.util.find_spec("torch") and importlib.util.find_spec("onnx2torch")),
                                 reason="torch backend needs torch + onnx2torch (the train extra)")


def _shape_arithmetic_graph():
    """A graph that computes its shapes as it runs, as exported transformers do: Shape -> Gather ->
    Concat -> Reshape, an Expand to a constant shape, a Resize by constant scales, a Slice with
    constant bounds and a Gather of one constant index."""
    from onnx import TensorProto, helper, numpy_helper

    i64 = lambda name, v: numpy_helper.from_array(np.asarray(v, np.int64), name)   # noqa: E731
    nodes = [
        helper.make_node("Expand", ["x", "three"], ["x3"]),                         # (N, 3, 8, 8)
        helper.make_node("Shape", ["x3"], ["shape"]),
        helper.make_node("Gather", ["shape", "zero"], ["n"], axis=0),
        helper.make_node("Unsqueeze", ["n", "axes0"], ["n1"]),
        helper.make_node("Concat", ["n1", "rest"], ["target"], axis=0),
        helper.make_node("Reshape", ["x3", "target"], ["flat"]),                     # (N, 3, 64)
        helper.make_node("Reshape", ["flat", "back"], ["x3b"]),
        helper.make_node("Resize", ["x3b", "", "scales"], ["big"], mode="linear"),   # (N, 3, 16, 16)
        helper.make_node("Slice", ["big", "starts", "ends", "axes"], ["cut"]),       # (N, 3, 16, 12)
        helper.make_node("Gather", ["cut", "one"], ["ch"], axis=1),                  # (N, 16, 12)
        helper.make_node("Sigmoid", ["ch"], ["y0"]),
        helper.make_node("Unsqueeze", ["y0", "axes1"], ["y"]),                       # (N, 1, 16, 12)
    ]
    inits = [i64("three", [1, 3, 1, 1]), i64("zero", 0), i64("axes0", [0]), i64("rest", [3, 64]),
             i64("back", [0, 3, 8, 8]), numpy_helper.from_array(np.asarray([1, 1, 2, 2], np.float32), "scales"),
             i64("starts", [2]), i64("ends", [14]), i64("axes", [3]), i64("one", 1), i64("axes1", [1])]
    g = helper.make_graph(nodes, "shapes", [helper.make_tensor_value_info("x", TensorProto.FLOAT, ["batch", 1, 8, 8])],
                          [helper.make_tensor_value_info("y", TensorProto.FLOAT, ["batch", 1, 16, 12])], inits)
    return helper.make_model(g, opset_imports=[helper.make_opsetid("", 17)])


@needs_torch
def test_fold_shapes_leaves_no_shape_arithmetic_and_the_same_outputs():
    import onnxruntime as ort

    from xctrt.graph_rewrites import fold_shapes
    model = _shape_arithmetic_graph()
    folded = fold_shapes(model, 3)
    assert "Shape" in {n.op_type for n in model.graph.node}   # the caller's graph is left as it was
    assert not {"Shape", "Concat"} & {n.op_type for n in folded.graph.node}
    assert folded.graph.input[0].type.tensor_type.shape.dim[0].dim_value == 3
    x = np.random.default_rng(0).random((3, 1, 8, 8), np.float32)
    run = lambda m: ort.InferenceSession(m.SerializeToString(), providers=["CPUExecutionProvider"]).run(None, {"x": x})[0]  # noqa: E731
    np.testing.assert_array_equal(run(folded), run(model))


@needs_torch
def test_torch_engine_static_batch_reads_no_device_values():
    """static_batch (the default on CUDA): one module per batch size, shapes folded and their constants
    kept in host memory, so a forward never reads a device tensor on the host (a sync on CUDA, and no
    CUDA graph). Checked on the meta device, where any such read fails: the graph as onnx2torch converts
    it fails there, the static one runs, and both give the same probabilities on the CPU."""
    import torch

    from xctrt import backends

    tiny = load_package("untrained-tiny")
    pkg = dataclasses.replace(tiny, graphs=[dataclasses.replace(tiny.graphs[0],
                                                                data=_shape_arithmetic_graph().SerializeToString())])
    x = np.random.default_rng(1).random((2, 1, 8, 8), np.float32)
    dyn = backends.TorchEngine(pkg, device="cpu", static_batch=False)
    st = backends.TorchEngine(pkg, device="cpu", static_batch=True)
    np.testing.assert_allclose(st.run(x), dyn.run(x), rtol=0, atol=1e-6)
    assert st.modules_for(2) is st.modules_for(2) and st.modules_for(3) is not st.modules_for(2)
    # a smaller batch runs padded through a module already built (3 here), without building its own
    np.testing.assert_allclose(st.run(x[:1]), dyn.run(x[:1]), rtol=0, atol=1e-6)
    assert sorted(st._by_batch) == [2, 3]
    meta_x = torch.empty(2, 1, 8, 8, device="meta")
    with pytest.raises((NotImplementedError, RuntimeError)):
        dyn.modules_for(2)[0].to("meta")(meta_x)
    moved = st.modules_for(2)[0].to("meta")
    assert {b.device.type for b in moved.host_constants.buffers()} == {"cpu"}
    assert tuple(moved(meta_x).shape) == (2, 1, 16, 12)
    assert backends.TorchEngine(pkg, device="cpu").static_batch is False   # the CPU keeps one routed graph
