"""graph_rewrites on hand-built ONNX graphs: route_experts with the exporter's static expert selection,
resize_as_matmul with the Resizes torch.onnx writes for F.interpolate(mode="bicubic").

(The exported Conv-LoRA SAM graph itself is checked in test_convlora.py.)"""
from __future__ import annotations

import numpy as np
import onnxruntime as ort
import pytest

onnx = pytest.importorskip("onnx")
from onnx import TensorProto, helper, numpy_helper  # noqa: E402

from xctrt.graph_rewrites import cubic_resize_matrix, resize_as_matmul, route_experts  # noqa: E402


# Ways off the exporter's pattern; each must leave the graph static (the rewrite would change the output
# or break the graph).
OFF_PATTERN = {
    "shared expert input": "expert 1 reads expert 0's rows (tanh of relu)",
    "computed index": "the one-hot column index is computed, not a constant",
    "permuted one-hot": "the one-hot compares with [1, 0, 2]: column e is not choice == e",
    "one-hot across samples": "Gather(onehot, e) along axis 0",
    "leaked rows": "expert 0's rows are also read outside it",
    "row-mixing expert": "expert 0 subtracts the mean over the batch",
    "another batch input": "expert 0 adds a second batch-sized input",
    "product summed twice": "expert 2's product is added twice",
    "product is an output": "expert 1's product is also a graph output",
    "shape read outside": "expert 2's own shape read of x also feeds a graph output",
}


def moe_graph(variant: str = "", shared_dim: int | None = None):
    """x (N, 2, 4, 4) -> Σ_e onehot(argmax gate)_e · E_e(x), written the way training/export.py writes it:
    gate ReduceMean -> MatMul -> ArgMax; one-hot Unsqueeze -> Equal(arange) -> Cast; per expert
    Gather(onehot, e) -> Unsqueeze -> Mul; the products summed by Adds. Experts: Relu, Tanh, and a
    scaled copy resized to its own size, N and C read from Shape(x) (that expert's own shape read).
    shared_dim: experts 0 and 1 also add x.shape[shared_dim], read through one Shape node they share
    (0: the batch size, which differs between the routed subsets). variant: one of OFF_PATTERN."""
    assert variant in ("", *OFF_PATTERN)
    n = helper.make_node
    inits = [numpy_helper.from_array(np.array([[1.0, -1.0, 0.0], [0.0, 0.0, 1.0]], np.float32), "w_gate"),
             numpy_helper.from_array(np.array([1, 0, 2] if variant == "permuted one-hot" else [0, 1, 2], np.int64),
                                     "experts"),
             numpy_helper.from_array(np.array(2.5, np.float32), "two_and_a_half"),
             numpy_helper.from_array(np.array([0], np.int64), "zero"),
             numpy_helper.from_array(np.array([2], np.int64), "two"),
             numpy_helper.from_array(np.array([4, 4], np.int64), "four_four")]
    inputs = [helper.make_tensor_value_info("x", TensorProto.FLOAT, ["N", 2, 4, 4])]
    outputs = [helper.make_tensor_value_info("y", TensorProto.FLOAT, ["N", 2, 4, 4])]
    nodes = [n("ReduceMean", ["x"], ["pooled"], axes=[2, 3], keepdims=0),
             n("MatMul", ["pooled", "w_gate"], ["logits"]),
             n("ArgMax", ["logits"], ["choice"], axis=1, keepdims=0),
             n("Constant", [], ["ax1"], value=numpy_helper.from_array(np.array([1], np.int64))),
             n("Unsqueeze", ["choice", "ax1"], ["choice_col"]),
             n("Equal", ["choice_col", "experts"], ["hit"]),
             n("Cast", ["hit"], ["onehot"], to=TensorProto.FLOAT),
             n("Relu", ["x"], ["relu"]),
             n("Tanh", ["relu" if variant == "shared expert input" else "x"], ["tanh"]),
             n("Mul", ["x", "two_and_a_half"], ["scaled"]),
             n("Shape", ["x"], ["x_shape"]),            # expert 2's own: N and C of its resize sizes
             n("Slice", ["x_shape", "zero", "two", "zero"], ["nc"]),
             n("Concat", ["nc", "four_four"], ["sizes"], axis=0),
             n("Resize", ["scaled", "", "", "sizes"], ["y2"], mode="nearest"),   # same size: a copy
             n("Constant", [], ["ax123"], value=numpy_helper.from_array(np.array([1, 2, 3], np.int64)))]
    if shared_dim is not None:
        nodes += [n("Shape", ["x"], ["shared_shape"]),
                  n("Constant", [], ["dim_index"], value=numpy_helper.from_array(np.array(shared_dim, np.int64))),
                  n("Gather", ["shared_shape", "dim_index"], ["dim"], axis=0),
                  n("Cast", ["dim"], ["dim_f"], to=TensorProto.FLOAT),
                  n("Add", ["relu", "dim_f"], ["y0"]), n("Add", ["tanh", "dim_f"], ["y1"])]
    elif variant == "row-mixing expert":
        nodes += [n("ReduceMean", ["relu"], ["batch_mean"], axes=[0], keepdims=1),
                  n("Sub", ["relu", "batch_mean"], ["y0"]), n("Identity", ["tanh"], ["y1"])]
    elif variant == "another batch input":
        inputs.append(helper.make_tensor_value_info("b", TensorProto.FLOAT, ["N", 2, 4, 4]))
        nodes += [n("Add", ["relu", "b"], ["y0"]), n("Identity", ["tanh"], ["y1"])]
    else:
        nodes += [n("Identity", ["relu"], ["y0"]), n("Identity", ["tanh"], ["y1"])]
    for e in range(3):
        k = f"k{e}" if variant != "computed index" else f"k{e}_constant"
        nodes.append(n("Constant", [], [k], value=numpy_helper.from_array(np.array(e, np.int64))))
        if variant == "computed index":
            nodes.append(n("Identity", [k], [f"k{e}"]))
        nodes += [n("Gather", ["onehot", f"k{e}"], [f"g{e}"], axis=0 if variant == "one-hot across samples" else 1),
                  n("Unsqueeze", [f"g{e}", "ax123"], [f"gate{e}"]),
                  n("Mul", [f"gate{e}", f"y{e}"], [f"p{e}"])]
    last = "y" if variant not in ("leaked rows", "product summed twice") else "sum"
    nodes += [n("Add", ["p0", "p1"], ["s01"]), n("Add", ["s01", "p2"], [last])]
    if variant == "leaked rows":
        nodes.append(n("Add", ["sum", "relu"], ["y"]))
    if variant == "product summed twice":
        nodes.append(n("Add", ["sum", "p2"], ["y"]))
    if variant == "product is an output":
        outputs.append(helper.make_tensor_value_info("p1", TensorProto.FLOAT, ["N", 2, 4, 4]))
    if variant == "shape read outside":
        outputs.append(helper.make_tensor_value_info("x_shape", TensorProto.INT64, [4]))
    graph = helper.make_graph(nodes, "moe", inputs, outputs, inits)
    model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", 17)])
    onnx.checker.check_model(model)
    return model


def run(model, x):
    sess = ort.InferenceSession(model.SerializeToString(), providers=["CPUExecutionProvider"])
    feed = {i.name: x if i.name == "x" else np.ones_like(x) for i in sess.get_inputs()}
    return sess.run(None, feed)[0]


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
    assert route_experts(routed) == 1
    x = batch(n, seed=3)
    np.testing.assert_array_equal(run(routed, x), run(static, x))


@pytest.mark.parametrize("variant", list(OFF_PATTERN))
def test_graphs_off_the_pattern_are_left_as_they_are(variant):
    model = moe_graph(variant)
    assert run(model, batch(3)).shape == (3, 2, 4, 4)   # a working graph: static, it stays correct
    before = model.SerializeToString()
    assert route_experts(model) == 0, OFF_PATTERN[variant]
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


# --- resize_as_matmul ---------------------------------------------------------------------------------

def resize_graph(hw=(7, 9), out=None, scales=None, sizes="own shape", opset=17, spatial_known=True, batch="N",
                 dtype=TensorProto.FLOAT, scales_fed=False, domain="", declared_out=("N2", 3, "Ho", "Wo"), **attrs):
    """x (N, 3, H, W) -> Resize -> y. scales: (sh, sw), given as a constant (1, 1, sh, sw), also a graph
    input the caller may feed when scales_fed; else out=(h, w) as sizes: "own shape" writes N, C from
    Shape(x) as torch.onnx does for F.interpolate(size=...), "other shape" from a second input's shape,
    or a tuple of four constants. declared_out: y's shape as the file declares it. attrs: the Resize's,
    bicubic with half-pixel centres unless given."""
    n = helper.make_node
    h, w = hw
    dims = [batch, 3, h, w] if spatial_known else [batch, 3, "H", "W"]
    inputs = [helper.make_tensor_value_info("x", dtype, dims)]
    attrs = {"mode": "cubic", "coordinate_transformation_mode": "half_pixel", "cubic_coeff_a": -0.75,
             "nearest_mode": "floor", **attrs}
    nodes, inits = [], []
    if scales is not None:
        inits.append(numpy_helper.from_array(np.array([1, 1, *scales], np.float32), "scales"))
        if scales_fed:
            inputs.append(helper.make_tensor_value_info("scales", TensorProto.FLOAT, [4]))
        nodes.append(n("Resize", ["x", "", "scales"], ["y"], domain=domain, **attrs))
    elif isinstance(sizes, tuple):
        inits.append(numpy_helper.from_array(np.array(sizes, np.int64), "sizes"))
        nodes.append(n("Resize", ["x", "", "", "sizes"], ["y"], **attrs))
    else:
        src = "x"
        if sizes == "other shape":
            inputs.append(helper.make_tensor_value_info("other", TensorProto.FLOAT, dims))
            src = "other"
        inits += [numpy_helper.from_array(np.array([0], np.int64), "zero"),
                  numpy_helper.from_array(np.array([2], np.int64), "two"),
                  numpy_helper.from_array(np.array(out, np.int64), "out_hw")]
        nodes += [n("Shape", [src], ["x_shape"]), n("Slice", ["x_shape", "zero", "two"], ["n_c"]),
                  n("Concat", ["n_c", "out_hw"], ["sizes"], axis=0),
                  n("Resize", ["x", "", "", "sizes"], ["y"], **attrs)]
    y = helper.make_tensor_value_info("y", dtype, list(declared_out))
    graph = helper.make_graph(nodes, "resize", inputs, [y], inits)
    return helper.make_model(graph, opset_imports=[helper.make_opsetid("", opset)])


def images(n=3, hw=(7, 9), seed=0, dtype=np.float32):
    return np.random.default_rng(seed).normal(size=(n, 3, *hw)).astype(dtype)


@pytest.mark.parametrize("factor", [2, 3, 5, 8])
def test_cubic_matrix_is_what_onnx_runtime_computes(factor):
    """The matrix, applied along both axes, against ONNX Runtime's own Resize (float64 maths vs its
    float32): up by the experts' integer factors, and back down by sizes."""
    x = images(hw=(7, 7))
    up = run(resize_graph((7, 7), scales=(factor, factor)), x)
    m = cubic_resize_matrix(7, 7 * factor, factor)
    np.testing.assert_allclose(np.einsum("ih,nchw,jw->ncij", m, x, m), up, atol=2e-5)
    down = run(resize_graph((7 * factor,) * 2, out=(7, 7)), up)
    d = cubic_resize_matrix(7 * factor, 7, 1 / factor)
    np.testing.assert_allclose(np.einsum("ih,nchw,jw->ncij", d, up, d), down, atol=2e-5)


def test_cubic_matrix_rows_sum_to_one_and_identity_at_scale_one():
    for n_in, n_out in [(7, 56), (56, 7), (5, 13), (13, 5)]:
        np.testing.assert_allclose(cubic_resize_matrix(n_in, n_out, n_out / n_in).sum(1), 1, atol=1e-12)
    np.testing.assert_allclose(cubic_resize_matrix(9, 9, 1.0), np.eye(9), atol=1e-12)
    # odd integer factor down: the output samples fall on input samples, so it is plain subsampling
    np.testing.assert_allclose(cubic_resize_matrix(21, 7, 1 / 3), np.eye(21)[1::3], atol=1e-12)


@pytest.mark.parametrize("case", ["scales up", "scales, unequal", "own-shape sizes down", "own-shape sizes, unequal",
                                  "constant sizes", "pytorch_half_pixel", "cubic_coeff_a -0.5"])
def test_bicubic_resizes_become_matmuls_with_the_same_numbers(case):
    hw, kw = (7, 9), {}
    if case == "scales up":
        kw = {"scales": (4, 4)}
    elif case == "scales, unequal":
        kw = {"scales": (2, 3)}
    elif case == "own-shape sizes down":
        hw, kw = (28, 36), {"out": (7, 9)}
    elif case == "own-shape sizes, unequal":
        hw, kw = (8, 8), {"out": (5, 20)}
    elif case == "constant sizes":
        kw = {"sizes": (3, 3, 21, 27), "batch": 3}
    elif case == "pytorch_half_pixel":
        kw = {"scales": (3, 3), "coordinate_transformation_mode": "pytorch_half_pixel"}
    else:
        kw = {"scales": (5, 5), "cubic_coeff_a": -0.5}
    static, rewritten = resize_graph(hw, **kw), resize_graph(hw, **kw)
    assert resize_as_matmul(rewritten) == 1
    onnx.checker.check_model(rewritten)
    assert [node.op_type for node in rewritten.graph.node] == ["MatMul", "MatMul"]   # the sizes maths went too
    x = images(3, hw)
    np.testing.assert_allclose(run(rewritten, x), run(static, x), atol=2e-5)


# Resizes the rewrite must leave alone: each is a working graph whose output the MatMuls would not give
# (or that the rewrite cannot size).
LEFT_ALONE = {
    "linear": {"scales": (2, 2), "mode": "linear"},
    "nearest": {"scales": (2, 2), "mode": "nearest"},
    "antialias": {"out": (3, 4), "hw": (7, 9), "antialias": 1, "opset": 18},
    "exclude_outside": {"scales": (2, 2), "exclude_outside": 1},
    "align_corners": {"scales": (2, 2), "coordinate_transformation_mode": "align_corners"},
    "asymmetric": {"scales": (2, 2), "coordinate_transformation_mode": "asymmetric"},
    "unknown spatial size": {"scales": (2, 2), "spatial_known": False},
    "constant sizes, batch size not known": {"sizes": (3, 3, 14, 18)},
    "sizes from another tensor's shape": {"out": (14, 18), "sizes": "other shape"},
    "float16": {"scales": (2, 2), "dtype": TensorProto.FLOAT16},
    # ONNX Runtime sizes the output floor(5 * float32(1.4)) = 7, shape inference (float64) says 6
    "scale not exact in float32": {"hw": (5, 5), "scales": (1.4, 1.4)},
    "scales the caller may feed": {"scales": (2, 2), "scales_fed": True},
}
# ... and ones ONNX Runtime itself does not run, which must stay that way (not become MatMuls that run)
LEFT_ALONE_NOT_RUN = {
    "keep_aspect_ratio_policy": {"out": (5, 100), "keep_aspect_ratio_policy": "not_larger", "opset": 18,
                                 "batch": 1},
    "another domain's Resize": {"scales": (2, 2), "domain": "com.example"},
}


@pytest.mark.parametrize("case", list(LEFT_ALONE) + list(LEFT_ALONE_NOT_RUN))
def test_other_resizes_are_left_as_they_are(case):
    kw = dict(LEFT_ALONE.get(case) or LEFT_ALONE_NOT_RUN[case])
    hw = kw.pop("hw", (7, 9))
    model = resize_graph(hw, **kw)
    if case in LEFT_ALONE:   # a working graph
        sess = ort.InferenceSession(model.SerializeToString(), providers=["CPUExecutionProvider"])
        dtype = np.float16 if kw.get("dtype") == TensorProto.FLOAT16 else np.float32
        feed = {i.name: np.array([1, 1, 3, 3], np.float32) if i.name == "scales" else images(3, hw, dtype=dtype)
                for i in sess.get_inputs()}
        assert len(sess.run(None, feed)[0])
    before = model.SerializeToString()
    assert resize_as_matmul(model) == 0, case
    assert model.SerializeToString() == before


def test_shapes_the_file_declares_are_not_trusted():
    """y declared 10x10 where the Resize makes 14x18: the matrices follow the input's shape, not the claim
    (ONNX Runtime does not check declared shapes of outputs or intermediate tensors)."""
    static = resize_graph(scales=(2, 2), declared_out=("N", 3, 10, 10))
    rewritten = resize_graph(scales=(2, 2), declared_out=("N", 3, 10, 10))
    rewritten.graph.value_info.append(helper.make_tensor_value_info("y", TensorProto.FLOAT, ["N", 3, 10, 10]))
    assert resize_as_matmul(rewritten) == 1
    x = images()
    want = run(static, x)
    assert want.shape == (3, 3, 14, 18)
    np.testing.assert_allclose(run(rewritten, x), want, atol=2e-5)


def test_a_graph_with_subgraphs_is_left_as_it_is():
    """An If branch reads t from the outer graph, which node inputs do not show: pruning could drop it."""
    n, v = helper.make_node, helper.make_tensor_value_info
    branch = [helper.make_graph([n("Identity", ["t"], [f"o{k}"])], f"b{k}", [], [v(f"o{k}", TensorProto.FLOAT, None)])
              for k in (1, 2)]
    graph = helper.make_graph(
        [n("Resize", ["x", "", "scales"], ["y"], mode="cubic"), n("Neg", ["x"], ["t"]),
         n("If", ["c"], ["w"], then_branch=branch[0], else_branch=branch[1])], "g",
        [v("x", TensorProto.FLOAT, [1, 3, 7, 9]), v("c", TensorProto.BOOL, [])],
        [v("y", TensorProto.FLOAT, None), v("w", TensorProto.FLOAT, None)],
        [numpy_helper.from_array(np.array([1, 1, 2, 2], np.float32), "scales")])
    model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", 17)])
    before = model.SerializeToString()
    assert resize_as_matmul(model) == 0 and model.SerializeToString() == before


def test_a_graph_out_of_topological_order_keeps_working():
    """ONNX Runtime runs nodes listed out of order; the rewrite must not drop a producer listed late."""
    n, v = helper.make_node, helper.make_tensor_value_info
    graph = helper.make_graph(
        [n("Relu", ["a"], ["z"]), n("Neg", ["x"], ["a"]), n("Resize", ["x", "", "scales"], ["y"], mode="cubic")],
        "g", [v("x", TensorProto.FLOAT, [1, 3, 7, 9])],
        [v("y", TensorProto.FLOAT, None), v("z", TensorProto.FLOAT, None)],
        [numpy_helper.from_array(np.array([1, 1, 2, 2], np.float32), "scales")])
    static = helper.make_model(graph, opset_imports=[helper.make_opsetid("", 17)])
    rewritten = type(static)()
    rewritten.CopyFrom(static)
    assert resize_as_matmul(rewritten) == 1
    x = images(1)
    sessions = [ort.InferenceSession(m.SerializeToString(), providers=["CPUExecutionProvider"])
                for m in (static, rewritten)]
    (y0, z0), (y1, z1) = (s.run(None, {"x": x}) for s in sessions)
    np.testing.assert_allclose(y1, y0, atol=2e-5)
    np.testing.assert_array_equal(z1, z0)
