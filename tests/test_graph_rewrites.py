"""graph_rewrites.route_experts on hand-built ONNX graphs with the exporter's static expert selection.

(The exported Conv-LoRA SAM graph itself is checked in test_convlora.py.)"""
from __future__ import annotations

import numpy as np
import onnxruntime as ort
import pytest

onnx = pytest.importorskip("onnx")
from onnx import TensorProto, helper, numpy_helper  # noqa: E402

from xctrt.graph_rewrites import route_experts  # noqa: E402


def moe_graph(variant: str = "", shared_dim: int | None = None):
    """x (N, 2, 4, 4) -> Σ_e onehot(argmax gate)_e · E_e(x), written the way training/export.py writes it:
    gate ReduceMean -> MatMul -> ArgMax; one-hot Unsqueeze -> Equal(arange) -> Cast; per expert
    Gather(onehot, e) -> Unsqueeze -> Mul; the products summed by Adds. Experts: Relu, Tanh, and a scaled
    copy reshaped to Shape(x) (that expert's own shape read). shared_dim: experts 0 and 1 also add
    x.shape[shared_dim], read through one Shape node they share (0: the batch size, which differs
    between the routed subsets). variant: one way off the exporter's pattern, for the cases that must
    be left static."""
    n = helper.make_node
    inits = [numpy_helper.from_array(np.array([[1.0, -1.0, 0.0], [0.0, 0.0, 1.0]], np.float32), "w_gate"),
             numpy_helper.from_array(np.array([1, 0, 2] if variant == "permuted one-hot" else [0, 1, 2], np.int64),
                                     "experts"),
             numpy_helper.from_array(np.array(2.5, np.float32), "two_and_a_half")]
    nodes = [n("ReduceMean", ["x"], ["pooled"], axes=[2, 3], keepdims=0),
             n("MatMul", ["pooled", "w_gate"], ["logits"]),
             n("ArgMax", ["logits"], ["choice_kept"] if variant == "keepdims" else ["choice"], axis=1,
               keepdims=int(variant == "keepdims")),
             n("Constant", [], ["ax1"], value=numpy_helper.from_array(np.array([1], np.int64))),
             n("Identity" if variant == "keepdims" else "Unsqueeze",
               ["choice_kept"] if variant == "keepdims" else ["choice", "ax1"], ["choice_col"]),
             n("Equal", ["choice_col", "experts"], ["hit"]),
             n("Cast", ["hit"], ["onehot"], to=TensorProto.FLOAT),
             n("Relu", ["x"], ["relu"]),
             n("Tanh", ["relu" if variant == "shared expert input" else "x"], ["tanh"]),
             n("Mul", ["x", "two_and_a_half"], ["scaled"]),
             n("Shape", ["x"], ["x_shape"]),
             n("Reshape", ["scaled", "x_shape"], ["y2"]),
             n("Constant", [], ["ax123"], value=numpy_helper.from_array(np.array([1, 2, 3], np.int64)))]
    if shared_dim is None:
        nodes += [n("Identity", ["relu"], ["y0"]), n("Identity", ["tanh"], ["y1"])]
    else:
        nodes += [n("Shape", ["x"], ["shared_shape"]),
                  n("Constant", [], ["dim_index"], value=numpy_helper.from_array(np.array(shared_dim, np.int64))),
                  n("Gather", ["shared_shape", "dim_index"], ["dim"], axis=0),
                  n("Cast", ["dim"], ["dim_f"], to=TensorProto.FLOAT),
                  n("Add", ["relu", "dim_f"], ["y0"]), n("Add", ["tanh", "dim_f"], ["y1"])]
    for e in range(3):
        k = f"k{e}" if variant != "computed index" else f"k{e}_constant"
        nodes.append(n("Constant", [], [k], value=numpy_helper.from_array(np.array(e, np.int64))))
        if variant == "computed index":   # the same value, but computed: not the exporter's pattern
            nodes.append(n("Identity", [k], [f"k{e}"]))
        nodes += [n("Gather", ["onehot", f"k{e}"], [f"g{e}"], axis=1),
                  n("Unsqueeze", [f"g{e}", "ax123"], [f"gate{e}"]),
                  n("Mul", [f"gate{e}", f"y{e}"], [f"p{e}"])]
    nodes += [n("Add", ["p0", "p1"], ["s01"]), n("Add", ["s01", "p2"], ["sum" if variant == "leaked rows" else "y"])]
    if variant == "leaked rows":   # an expert's intermediate read outside it too
        nodes.append(n("Add", ["sum", "relu"], ["y"]))
    graph = helper.make_graph(nodes, "moe", [helper.make_tensor_value_info("x", TensorProto.FLOAT, ["N", 2, 4, 4])],
                              [helper.make_tensor_value_info("y", TensorProto.FLOAT, ["N", 2, 4, 4])], inits)
    model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", 17)])
    onnx.checker.check_model(model)
    return model


def run(model, x):
    sess = ort.InferenceSession(model.SerializeToString(), providers=["CPUExecutionProvider"])
    return sess.run(None, {"x": x})[0]


def batch(n, seed=0):
    return np.random.default_rng(seed).normal(size=(n, 2, 4, 4)).astype(np.float32)


def test_routed_graph_gives_the_same_numbers():
    static = moe_graph()
    routed = moe_graph()
    assert route_experts(routed) == 1
    onnx.checker.check_model(routed)
    ops = [node.op_type for node in routed.graph.node]
    assert ops.count("NonZero") == 3 and "TopK" in ops and "Equal" in ops and "Cast" not in ops
    x = batch(40)
    choice = (x.mean(axis=(2, 3)) @ np.array([[1.0, -1.0, 0.0], [0.0, 0.0, 1.0]], np.float32)).argmax(1)
    assert set(choice.tolist()) == {0, 1, 2}          # every expert has samples
    np.testing.assert_array_equal(run(routed, x), run(static, x))
    # the expected values by hand: relu, tanh, 2.5 x, per sample by its gate
    want = np.stack([[np.maximum(s, 0), np.tanh(s), 2.5 * s][c] for s, c in zip(x, choice)])
    np.testing.assert_allclose(run(routed, x), want, rtol=1e-6)


@pytest.mark.parametrize("n", [1, 2])
def test_experts_no_sample_chose_run_on_empty_batches(n):
    static, routed = moe_graph(), moe_graph()
    route_experts(routed)
    x = batch(n, seed=3)
    np.testing.assert_array_equal(run(routed, x), run(static, x))


@pytest.mark.parametrize("kind", ["shared expert input", "computed index", "permuted one-hot", "keepdims",
                                  "leaked rows"])
def test_graphs_off_the_pattern_are_left_as_they_are(kind):
    model = moe_graph(kind)
    onnx.checker.check_model(model)
    run(model, batch(3))
    before = model.SerializeToString()
    assert route_experts(model) == 0
    assert model.SerializeToString() == before


def test_a_shape_read_the_experts_share_is_kept_unless_it_reads_the_batch_size():
    static, routed = moe_graph(shared_dim=2), moe_graph(shared_dim=2)   # height: the same for any subset
    assert route_experts(routed) == 1
    x = batch(40)
    np.testing.assert_array_equal(run(routed, x), run(static, x))
    model = moe_graph(shared_dim=0)                                      # batch size: would differ
    before = model.SerializeToString()
    assert route_experts(model) == 0 and model.SerializeToString() == before


def test_a_graph_without_adapters_is_left_as_it_is():
    n = helper.make_node
    graph = helper.make_graph([n("ArgMax", ["x"], ["a"], axis=1, keepdims=0), n("Relu", ["x"], ["y"])], "plain",
                              [helper.make_tensor_value_info("x", TensorProto.FLOAT, [2, 3])],
                              [helper.make_tensor_value_info("y", TensorProto.FLOAT, [2, 3]),
                               helper.make_tensor_value_info("a", TensorProto.INT64, [2])])
    model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", 17)])
    before = model.SerializeToString()
    assert route_experts(model) == 0 and model.SerializeToString() == before
