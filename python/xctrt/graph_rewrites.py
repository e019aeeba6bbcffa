"""Rewrites of a model package's ONNX graph, made in memory when an engine loads it (the files on disk,
and their checksums, stay as exported).

  weights_as_float32  float16-stored weights back to float32 initializers (onnx2torch, TensorRT)
  route_experts       Conv-LoRA expert selection from "run all, keep one" to "run the chosen one"
  resize_as_matmul    fixed-size bicubic Resizes (the Conv-LoRA experts' rescaling) as two MatMuls
  fold_shapes         one batch size, shape arithmetic folded to constants (torch on CUDA)

Only imported by the engines that use them; needs the onnx package.
"""
from __future__ import annotations

import numpy as np

__all__ = ["fold_shapes", "resize_as_matmul", "route_experts", "weights_as_float32"]


def weights_as_float32(model):
    """Undo float16 weight storage (training.export --weights-fp16) in an onnx ModelProto, in place:
    each Cast-to-float32 of a float16 initializer or Constant that nothing else reads becomes a
    float32 initializer under the Cast's output name. For converters that need weights as initializers
    (onnx2torch takes Conv/MatMul weights from them; TensorRT builds its own fp16 engine). Same values,
    so the outputs are unchanged. Returns the model."""
    from onnx import TensorProto, numpy_helper

    g = model.graph
    readers: dict[str, int] = {}
    for node in g.node:
        for i in node.input:
            readers[i] = readers.get(i, 0) + 1
    for o in g.output:
        readers[o.name] = readers.get(o.name, 0) + 1
    half = {t.name: t for t in g.initializer if t.data_type == TensorProto.FLOAT16}
    consts = {n.output[0]: k for k, n in enumerate(g.node) if n.op_type == "Constant" and len(n.attribute) == 1
              and n.attribute[0].name == "value" and n.attribute[0].t.data_type == TensorProto.FLOAT16}
    drop_nodes, drop_inits, new = set(), set(), []   # node indices (protobuf wrappers have no stable id)
    for k, node in enumerate(g.node):
        if node.op_type != "Cast" or readers.get(node.input[0]) != 1:
            continue
        to = next((a.i for a in node.attribute if a.name == "to"), None)
        src = node.input[0]
        if to != TensorProto.FLOAT or (src not in half and src not in consts):
            continue
        t = half[src] if src in half else g.node[consts[src]].attribute[0].t
        new.append(numpy_helper.from_array(numpy_helper.to_array(t).astype(np.float32), node.output[0]))
        drop_nodes.add(k)
        if src in half:
            drop_inits.add(src)
        else:
            drop_nodes.add(consts[src])
    if new:
        keep = [n for k, n in enumerate(g.node) if k not in drop_nodes]
        inits = [t for t in g.initializer if t.name not in drop_inits] + new
        del g.node[:]
        g.node.extend(keep)
        del g.initializer[:]
        g.initializer.extend(inits)
    return model


# ONNX Runtime's graph transformers other than constant folding: left out so that fold_shapes changes
# where values come from, not how they are computed (names ONNX Runtime does not know are ignored)
_NOT_FOLDING = ("ConstantSharing", "CommonSubexpressionElimination", "ConvAddFusion", "ConvMulFusion",
                "ConvBNFusion", "ReluClipFusion", "ReshapeFusion", "MatMulAddFusion", "GemmTransposeFusion",
                "DivMulFusion", "NotWhereFusion", "MatMulBnFusion", "PadFusion", "GemmSumFusion", "FuseReluClip",
                "ConvActivationFusion", "GemmActivationFusion", "IdenticalChildrenConsolidation",
                "DoubleQDQPairsRemover", "QDQS8ToU8Transformer", "QDQPropagationTransformer",
                "EnsureUniqueDQForNodeUnit", "CastElimination", "NoopElimination", "ExpandElimination",
                "UnsqueezeElimination", "EliminateSlice", "EliminateDropout", "EliminateIdentity")


def fold_shapes(model, batch: int):
    """The graph for one fixed batch size, its shape arithmetic (Shape -> Gather -> Concat -> Reshape
    chains and the like) folded into constants by ONNX Runtime's constant folding.

    Converted to torch (onnx2torch), every such node is a small host computation on values that live
    on the device: on CUDA one sync each (the shipped model has 460 Shape nodes) and a graph no CUDA
    graph can capture. Folded, the shipped model keeps none. Outputs differ from the unfolded graph's
    by float32 rounding only (constant subexpressions computed once, ~1e-6 on probabilities)."""
    import tempfile
    from pathlib import Path

    import onnx
    import onnxruntime as ort

    model = onnx.ModelProto.FromString(model.SerializeToString())   # the caller's graph stays as it is
    for vi in (*model.graph.input, *model.graph.output):
        dims = vi.type.tensor_type.shape.dim
        if dims:
            dims[0].Clear()
            dims[0].dim_value = int(batch)
    opts = ort.SessionOptions()
    opts.graph_optimization_level = ort.GraphOptimizationLevel.ORT_ENABLE_BASIC
    opts.log_severity_level = 3
    with tempfile.TemporaryDirectory(prefix="xctrt-fold-") as tmp:
        opts.optimized_model_filepath = str(Path(tmp) / "folded.onnx")
        ort.InferenceSession(model.SerializeToString(), opts, providers=["CPUExecutionProvider"],
                             disabled_optimizers=list(_NOT_FOLDING))
        return onnx.load(opts.optimized_model_filepath)


def _constants(g) -> dict:
    """g's constant tensors by name: initializers (except those that are also graph inputs, which a
    caller may feed) and the values of Constant nodes."""
    inputs = {i.name for i in g.input}
    consts = {t.name: t for t in g.initializer if t.name not in inputs}
    for n in g.node:
        if n.op_type == "Constant" and len(n.attribute) == 1 and n.attribute[0].name == "value":
            consts[n.output[0]] = n.attribute[0].t
    return consts


def _ints(consts: dict, t: str):
    """A constant integer tensor as a flat list, or None."""
    from onnx import numpy_helper
    return [int(v) for v in numpy_helper.to_array(consts[t]).reshape(-1)] if t in consts else None


def _attr(n, name, default=None):
    from onnx import helper
    return next((helper.get_attribute_value(a) for a in n.attribute if a.name == name), default)


def _n_and_c_of(sizes: str, producer: dict, consts: dict):
    """t when sizes is Concat(Slice(Shape(t), [0], [2]), ...), as torch.onnx writes the sizes of
    F.interpolate(size=...): sizes that start with t's own N and C; else None."""
    cat = producer.get(sizes)
    head = producer.get(cat.input[0]) if cat is not None and cat.op_type == "Concat" else None
    if head is None or head.op_type != "Slice" or len(head.input) < 3:
        return None
    shape = producer.get(head.input[0])
    axes, steps = (head.input[3:4] or [""])[0], (head.input[4:5] or [""])[0]
    ok = (shape is not None and shape.op_type == "Shape"
          and not shape.attribute   # no start/end: the whole shape
          and _ints(consts, head.input[1]) == [0] and _ints(consts, head.input[2]) == [2]
          and (not axes or _ints(consts, axes) == [0]) and (not steps or _ints(consts, steps) == [1]))
    return shape.input[0] if ok else None


# Ops an expert may apply to its samples' rows: each output row depends on the same input row only.
# Binary ones take another row tensor of the same expert or a value that does not depend on the rows
# (a constant without a batch axis of its own).
_ROWWISE_UNARY = {"Abs", "Cast", "Erf", "Exp", "Gelu", "Identity", "Log", "Neg", "Relu", "Sigmoid", "Softplus",
                  "Sqrt", "Tanh"}
_ROWWISE_BINARY = {"Add", "Div", "Max", "Min", "Mul", "Pow", "Sub"}
# Ops allowed on values that do not depend on the rows (weights, shape vectors, constants).
_STATIC_OPS = {"Cast", "Concat", "Constant", "Gather", "Identity", "Reshape", "Shape", "Slice", "Squeeze",
               "Unsqueeze"}


def route_experts(model) -> int:
    """Run each Conv-LoRA expert only on the samples its gate chose, in an onnx ModelProto, in place;
    returns how many adapters were rewritten (0: the graph is left exactly as it was).

    The exporter keeps the expert choice graph-static: every expert runs on every sample (window) and a
    one-hot of the gate's argmax keeps one, out = Σ_e onehot_e · E_e(z). The experts upsample by up to 8×,
    so on a CPU they take most of the shipped model's time, 7/8 of it thrown away (routed, it segments
    3.4-3.9x faster: benchmarks/RESULTS.md). Rewritten, each expert gets Gather(z, NonZero(choice == e))
    and one Gather puts the results back in sample order. The output is the same numbers: the static sum
    adds exact zeros (0 · finite) to the chosen expert's value, and each sample's expert maths does not
    depend on which other samples share the batch.

    Recognised structurally, as training/export.py writes it, and left static where anything differs:
    z -> ReduceMean over (H, W) -> MatMul -> ArgMax over the experts (the gate, one index per sample);
    choice -> Unsqueeze(1) -> Equal(arange(E)) -> Cast (the one-hot); per expert Gather(onehot, e, axis 1)
    -> Unsqueeze(axes >= 1)... -> Mul(·, E_e(z)), each product summed once by a chain of E-1 Adds. Each
    expert reads z through nodes of its own, applies only row-wise ops (elementwise, Conv, Resize that
    keeps the batch), with weights and shape vectors that do not depend on other rows, and its rows are
    read nowhere else. A shape read of z that experts share may only take dimensions other than N.

    For engines that run data-dependent shapes well (ONNX Runtime on a CPU). The torch path on a GPU keeps
    the static graph: CUDA graphs need fixed shapes."""
    from onnx import helper, numpy_helper

    g = model.graph
    if len(g.sparse_initializer) or any(a.type in (a.GRAPH, a.GRAPHS) for n in g.node for a in n.attribute):
        return 0   # subgraphs read outer names, and sparse weights, that this walk does not see
    consts = _constants(g)
    producer = {o: n for n in g.node for o in n.output}
    readers: dict[str, list] = {}
    for n in g.node:
        for i in n.input:
            readers.setdefault(i, []).append(n)
    for o in g.output:
        readers.setdefault(o.name, []).append(None)   # a graph output: read outside the graph

    def const(t):
        return numpy_helper.to_array(consts[t]) if t in consts else None

    def ints(t):
        return _ints(consts, t)

    attr = _attr

    def axes(n):
        """A node's axes, from its attribute or its constant second input (opset >= 13/18)."""
        a = attr(n, "axes")
        return list(a) if a is not None else (ints(n.input[1]) if len(n.input) > 1 else None)

    def only_reader(t, op):
        r = readers.get(t, [])
        return r[0] if len(r) == 1 and r[0] is not None and r[0].op_type == op else None

    def scalar_index(t):
        a = const(t)
        return int(a) if a is not None and a.ndim == 0 and a.dtype.kind in "iu" else None

    def branch_nodes(y, z):
        """Nodes computing y, walking back no further than z."""
        seen, todo = {}, [y]
        while todo:
            t = todo.pop()
            n = producer.get(t)
            if n is None or t == z or id(n) in seen:
                continue
            seen[id(n)] = n
            todo.extend(n.input)
        return seen

    def takes_no_batch_size(shape_node) -> bool:
        """A Shape of z whose every reader takes one dimension other than N (a constant index > 0)."""
        return all(r is not None and r.op_type == "Gather" and attr(r, "axis", 0) == 0
                   and (scalar_index(r.input[1]) or 0) > 0 for r in readers.get(shape_node.output[0], []))

    def plan_adapter(argmax):
        """What to rewrite for one adapter, or None when anything is off the exporter's pattern."""
        choice = argmax.output[0]
        unsq = only_reader(choice, "Unsqueeze")
        equal = unsq and only_reader(unsq.output[0], "Equal")
        cast = equal and only_reader(equal.output[0], "Cast")
        gate = producer.get(argmax.input[0])
        pool = producer.get(gate.input[0]) if gate is not None and gate.op_type == "MatMul" else None
        if (cast is None or pool is None or pool.op_type != "ReduceMean" or const(gate.input[1]) is None
                or attr(argmax, "keepdims", 1) != 0 or attr(argmax, "axis", 0) not in (1, -1)
                or attr(pool, "keepdims", 1) != 0 or sorted(axes(pool) or []) not in ([2, 3], [-2, -1])
                or axes(unsq) not in ([1], [-1])):
            return None
        z = pool.input[0]
        labels = const(next((i for i in equal.input if i != unsq.output[0]), ""))
        experts, chain = {}, [unsq, equal, cast]
        for gather in readers.get(cast.output[0], []):
            e = scalar_index(gather.input[1]) if gather is not None and gather.op_type == "Gather" else None
            if e is None or attr(gather, "axis", 0) != 1 or e in experts:
                return None
            chain.append(gather)
            t = gather.output[0]
            while (u := only_reader(t, "Unsqueeze")) is not None:
                if min(axes(u) or [0]) < 1:   # the gate value must stay on the batch axis
                    return None
                chain.append(u)
                t = u.output[0]
            mul = only_reader(t, "Mul")
            if mul is None or len(readers.get(mul.output[0], [])) != 1:
                return None
            chain.append(mul)
            experts[e] = (mul.input[1] if mul.input[0] == t else mul.input[0], mul.output[0])
        count = len(experts)
        if (count < 2 or sorted(experts) != list(range(count)) or labels is None
                or not np.array_equal(labels.reshape(-1), np.arange(count)) or labels.ndim != 1):
            return None
        # the products, each summed exactly once, by E-1 Adds
        products = {p for _, p in experts.values()}
        t, summed = experts[0][1], [experts[0][1]]
        while (add := only_reader(t, "Add")) is not None:
            other = add.input[1] if add.input[0] == t else add.input[0]
            if other not in products or other in summed:
                break
            summed.append(other)
            chain.append(add)
            t = add.output[0]
        if sorted(summed) != sorted(products):
            return None
        rewire, shapes_of_z, rows, branches = {}, {}, set(), {}
        for e, (value, product) in experts.items():
            branches[e] = branch_nodes(value, z)
            inside = expert_rows(e, z, value, product, branches[e], rewire, shapes_of_z)
            if inside is None:
                return None
            rows |= {o for n in inside.values() for o in n.output}
        # a shape read of z shared by experts may only take dimensions other than N; one expert's own is
        # rewired to its subset, so nothing outside that expert may read it
        for k, (shape, owners) in shapes_of_z.items():
            if len(owners) > 1:
                if not takes_no_batch_size(shape):
                    return None
                rewire.pop(k, None)
            elif not all(r is not None and id(r) in branches[next(iter(owners))]
                         for r in readers.get(shape.output[0], [])):
                return None
        return {"argmax": argmax, "choice": choice, "z": z, "experts": experts, "chain": chain, "total": t,
                "rewire": rewire, "rows": rows}

    def expert_rows(e, z, value, product, branch, rewire, shapes_of_z):
        """The nodes through which expert e computes on z's rows, checked row-wise and private; fills
        rewire (node id -> expert) for its nodes that read z. None when it is not that."""
        inside = {}
        todo = []
        for k, n in branch.items():
            if z in n.input:
                rewire[k] = e
                if n.op_type == "Shape":
                    shapes_of_z.setdefault(k, (n, set()))[1].add(e)
                else:
                    todo.append(n)
        while todo:
            n = todo.pop()
            if id(n) in inside:
                continue
            inside[id(n)] = n
            todo += [r for o in n.output for r in readers.get(o, []) if r is not None and id(r) in branch
                     and r.op_type != "Shape"]
        rows = {o for n in inside.values() for o in n.output} | {z}
        static_memo: dict[str, bool] = {}

        def static(t) -> bool:
            """t depends on no rows: constants, and shape vectors of this expert's rows or of z."""
            if t == "" or t in consts:
                return True
            if t in static_memo:
                return static_memo[t]
            static_memo[t] = False   # cycles are not static
            n = producer.get(t)
            ok = n is not None and n.op_type in _STATIC_OPS and (
                n.input[0] in rows or static(n.input[0]) if n.op_type == "Shape" else all(static(i) for i in n.input))
            static_memo[t] = ok
            return ok

        def keeps_batch(n) -> bool:
            """A Resize whose scales keep N and C, or whose sizes start with N and C read from this
            expert's own rows (Shape -> Slice [0:2] -> Concat with static sizes)."""
            scales = const(n.input[2]) if len(n.input) > 2 and n.input[2] else None
            if scales is not None and scales.size:
                return scales.size >= 2 and scales[0] == 1 and scales[1] == 1
            sizes = producer.get(n.input[3]) if len(n.input) > 3 and n.input[3] else None
            if sizes is None or sizes.op_type != "Concat" or not all(static(i) for i in sizes.input[1:]):
                return False
            return _n_and_c_of(sizes.output[0], producer, consts) in rows

        def broadcasts_per_row(t) -> bool:
            """A static operand: a constant must not carry a batch axis of its own (4-D rows)."""
            c = const(t)
            return static(t) and (c is None or c.ndim < 4 or c.shape[0] == 1)

        for n in inside.values():   # (rows holds z too: these nodes are rewired to the expert's subset)
            if n.op_type in _ROWWISE_UNARY:
                ok = n.input[0] in rows and all(static(i) for i in n.input[1:])
            elif n.op_type in _ROWWISE_BINARY:
                ok = any(i in rows for i in n.input) and all(broadcasts_per_row(i) for i in n.input if i not in rows)
            elif n.op_type == "Conv":
                ok = n.input[0] in rows and all(static(i) for i in n.input[1:])
            elif n.op_type == "Resize":
                ok = n.input[0] in rows and all(static(i) for i in n.input[1:]) and keeps_batch(n)
            else:
                ok = False
            if not ok:
                return None
            for o in n.output:   # rows read only inside this expert, its value only by its product
                for r in readers.get(o, []):
                    if r is None or (id(r) not in inside and not (r.op_type == "Shape" and id(r) in branch)
                                     and not (o == value and product in r.output)):
                        return None
        if producer.get(value) is None or id(producer[value]) not in inside:
            return None
        return inside

    plans = [p for p in (plan_adapter(n) for n in g.node if n.op_type == "ArgMax") if p is not None]
    if not plans:
        return 0

    def node(op, inputs, outputs, **attrs):   # named after its output: converters key nodes by name
        return helper.make_node(op, inputs, outputs, name=outputs[0], **attrs)

    def int_const(name, value):
        return node("Constant", [], [name], value=numpy_helper.from_array(np.asarray(value, np.int64)))

    drop, new_nodes, rewired = set(), [], {}
    for plan in plans:
        choice, z, experts = plan["choice"], plan["z"], plan["experts"]
        pre = f"{plan['argmax'].name or choice}/routed"
        order = sorted(experts)
        new_nodes.append(int_const(f"{pre}/flat", [-1]))
        for e in order:
            p = f"{pre}/{e}"
            new_nodes += [int_const(f"{p}/e", e),
                          node("Equal", [choice, f"{p}/e"], [f"{p}/mask"]),
                          node("NonZero", [f"{p}/mask"], [f"{p}/nonzero"]),
                          node("Reshape", [f"{p}/nonzero", f"{pre}/flat"], [f"{p}/rows"]),
                          node("Gather", [z, f"{p}/rows"], [f"{p}/z"], axis=0)]
        for k, e in plan["rewire"].items():
            rewired[k] = (z, f"{pre}/{e}/z")
        # rows (a permutation of 0..N-1) says whose value each row of `values` is; argsort(rows) is where
        # each sample's value sits, so one Gather puts them back in sample order
        new_nodes += [node("Concat", [f"{pre}/{e}/rows" for e in order], [f"{pre}/rows"], axis=0),
                      node("Shape", [f"{pre}/rows"], [f"{pre}/n"]),
                      node("TopK", [f"{pre}/rows", f"{pre}/n"], [f"{pre}/sorted", f"{pre}/where"],
                           axis=0, largest=0, sorted=1),
                      node("Concat", [experts[e][0] for e in order], [f"{pre}/values"], axis=0),
                      node("Gather", [f"{pre}/values", f"{pre}/where"], [plan["total"]], axis=0)]
        drop.update(id(n) for n in plan["chain"])

    # the new node list, built beside the graph's (copies where inputs change): the graph is replaced
    # only once it is complete
    nodes = []
    for n in g.node:
        if id(n) in drop:
            continue
        if id(n) in rewired:
            old, new = rewired[id(n)]
            n2 = type(n)()
            n2.CopyFrom(n)
            for i, name in enumerate(n2.input):
                if name == old:
                    n2.input[i] = new
            n = n2
        nodes.append(n)
    ready = {i.name for i in g.input} | {t.name for t in g.initializer} | {""}
    ordered, pending = [], nodes + new_nodes
    while pending:   # topological order (the new nodes sit between old ones)
        waiting = []
        for n in pending:
            if all(i in ready for i in n.input):
                ordered.append(n)
                ready.update(n.output)
            else:
                waiting.append(n)
        if len(waiting) == len(pending):
            return 0   # not expected; the graph is untouched
        pending = waiting
    # shapes recorded for tensors that now hold a subset of the rows would be wrong: forget them
    _set_live_nodes(g, ordered, stale={o for plan in plans for o in plan["rows"]})
    return len(plans)


def _set_live_nodes(g, nodes, stale=frozenset()) -> None:
    """Make g's nodes those of `nodes` (kept in their order) that some graph output needs, and drop the
    initializers and value_info nothing needs any more (and the value_info named in stale). For graphs
    without subgraphs (whose outer-scope reads this does not see); the order need not be topological."""
    producer = {o: k for k, n in enumerate(nodes) for o in n.output}
    needed, live, todo = set(), set(), [o.name for o in g.output]
    while todo:
        t = todo.pop()
        if t in needed:
            continue
        needed.add(t)
        k = producer.get(t)
        if k is not None and k not in live:
            live.add(k)
            todo.extend(nodes[k].input)
    del g.node[:]
    g.node.extend(n for k, n in enumerate(nodes) if k in live)
    inputs = {i.name for i in g.input}
    kept = [t for t in g.initializer if t.name in needed or t.name in inputs]
    del g.initializer[:]
    g.initializer.extend(kept)
    info = [v for v in g.value_info if v.name not in stale and v.name in needed]
    del g.value_info[:]
    g.value_info.extend(info)


def cubic_resize_matrix(n_in: int, n_out: int, scale: float, a: float = -0.75) -> np.ndarray:
    """The (n_out, n_in) float64 matrix of ONNX Resize along one axis: mode "cubic", half-pixel centres,
    coefficient a, no antialias, exclude_outside 0 (taps past an edge read the edge sample).
    scale is out/in as the operator sees it (its scales input, or sizes / input size)."""
    x = (np.arange(n_out) + 0.5) / scale - 0.5
    left = np.floor(x)
    t = x - left
    weights = (((a * (t + 1) - 5 * a) * (t + 1) + 8 * a) * (t + 1) - 4 * a,
               ((a + 2) * t - (a + 3)) * t * t + 1,
               ((a + 2) * (1 - t) - (a + 3)) * (1 - t) * (1 - t) + 1,
               ((a * (2 - t) - 5 * a) * (2 - t) + 8 * a) * (2 - t) - 4 * a)
    m = np.zeros((n_out, n_in))
    rows = np.arange(n_out)
    for k, w in enumerate(weights):   # taps left-1 .. left+2, clamped: np.add.at sums taps that meet at an edge
        np.add.at(m, (rows, np.clip(left.astype(np.int64) - 1 + k, 0, n_in - 1)), w)
    return m


def resize_as_matmul(model) -> int:
    """Each 4-D bicubic Resize of height and width only, whose input and output sizes shape inference
    fixes, becomes MatMul(rows, MatMul(x, columnsᵀ)) with the two constant interpolation matrices, in an
    onnx ModelProto, in place; returns how many were rewritten (0: the graph is left as it was).

    The shipped Conv-LoRA model's experts rescale 7x7 and 14x14 windows by 2-8x and back. ONNX Runtime's
    CPU Resize spent about 30 % of a routed 256² tile's kernel time there (2 threads); as two small matrix
    products each, a tile's kernel time drops by about a third (benchmarks/routed_experts.py --profile,
    whose wall-clock runs give 1.45-1.64x on the released test volumes). Separable cubic
    interpolation is a fixed linear map per axis, so the output is the same up to float32 rounding (the
    matrices are computed in float64 and stored as float32, the sums run in another order), not bit for
    bit: benchmarks/routed_experts.py measures what that does to labels on the released test volumes.

    Only the form torch.onnx writes for F.interpolate(mode="bicubic") is taken: a float32 tensor, mode
    "cubic", coordinate_transformation_mode half_pixel (or pytorch_half_pixel with more than one output
    sample), no antialias, exclude_outside 0, no axes, keep_aspect_ratio_policy stretch, N and C kept
    (constant scales 1, or sizes that read them from the input's own shape), and sizes known from the
    graph inputs' shapes alone. Anything else is left alone, and so is a graph with subgraphs."""
    from onnx import TensorProto, helper, numpy_helper, shape_inference

    g = model.graph
    if len(g.sparse_initializer) or any(a.type in (a.GRAPH, a.GRAPHS) for n in g.node for a in n.attribute):
        return 0   # subgraphs read outer names that the pruning below does not see
    # Sizes from the graph inputs' shapes only (which ONNX Runtime enforces): shapes the file declares
    # for other tensors are not checked at run time, and inference keeps a declared shape over its own.
    bare = type(model)()
    bare.CopyFrom(model)
    del bare.graph.value_info[:]
    for o in bare.graph.output:
        o.type.tensor_type.ClearField("shape")
    try:
        inferred = shape_inference.infer_shapes(bare, data_prop=True)
    except Exception:   # a graph shape inference cannot follow is left alone
        return 0
    typed = [v for v in (*inferred.graph.value_info, *inferred.graph.input, *inferred.graph.output)
             if v.type.HasField("tensor_type")]
    dims = {v.name: [d.dim_value if d.HasField("dim_value") else None for d in v.type.tensor_type.shape.dim]
            for v in typed if v.type.tensor_type.HasField("shape")}
    elem = {v.name: v.type.tensor_type.elem_type for v in typed}
    consts = _constants(g)
    producer = {o: n for n in g.node for o in n.output}
    attr = _attr

    def sizes_keep_n_and_c(sizes, x) -> bool:
        """sizes starts with x's own N and C: a constant whose first two match x's known N and C, or
        read from x's shape (_n_and_c_of)."""
        if sizes in consts:
            known, v = dims.get(x, [None, None]), _ints(consts, sizes)
            return len(v) == 4 and None not in known[:2] and v[:2] == known[:2]
        return _n_and_c_of(sizes, producer, consts) == x

    def plan(n):
        """(height matrix, width matrix) for a Resize of the taken form, else None."""
        mode = attr(n, "coordinate_transformation_mode", b"half_pixel")
        src, dst = dims.get(n.input[0]), dims.get(n.output[0])
        if (n.domain not in ("", "ai.onnx") or elem.get(n.input[0]) != TensorProto.FLOAT
                or attr(n, "mode") != b"cubic" or attr(n, "antialias", 0) != 0 or attr(n, "exclude_outside", 0) != 0
                or attr(n, "axes") is not None or attr(n, "keep_aspect_ratio_policy", b"stretch") != b"stretch"
                or mode not in (b"half_pixel", b"pytorch_half_pixel")
                or src is None or dst is None or len(src) != 4 or len(dst) != 4
                or None in src[2:] + dst[2:] or 0 in src[2:] + dst[2:]
                or (mode == b"pytorch_half_pixel" and 1 in dst[2:])):
            return None
        scales = (numpy_helper.to_array(consts[n.input[2]]) if len(n.input) > 2 and n.input[2] in consts
                  else None)
        if scales is not None and scales.size:
            if scales.size != 4 or scales[0] != 1 or scales[1] != 1 or (len(n.input) > 3 and n.input[3]):
                return None
            # ONNX Runtime sizes the output floor(in * scale) in float32, shape inference in float64: where
            # they differ (scale 1.4 on 5 samples: 7 against 6) the sizes are not known for sure
            if any(int(np.floor(np.float32(i) * np.float32(f))) != o for i, f, o in zip(src[2:], scales[2:], dst[2:])):
                return None
            factors = [float(scales[2]), float(scales[3])]
        elif len(n.input) > 3 and n.input[3]:
            # sizes (possibly computed): N and C must be the input's own, which shape inference shows
            # only when it knows them; otherwise they might not be kept
            if not sizes_keep_n_and_c(n.input[3], n.input[0]):
                return None
            factors = [dst[2] / src[2], dst[3] / src[3]]
        else:
            return None
        a = float(attr(n, "cubic_coeff_a", -0.75))
        return (cubic_resize_matrix(src[2], dst[2], factors[0], a),
                cubic_resize_matrix(src[3], dst[3], factors[1], a))

    taken = {t.name for t in g.initializer} | {o for n in g.node for o in n.output} | {i.name for i in g.input}

    def fresh(name):   # a tensor name nothing in the graph uses yet
        k, out = 0, name
        while out in taken:
            k += 1
            out = f"{name}_{k}"
        taken.add(out)
        return out

    new, count = [], 0
    for n in g.node:
        p = plan(n) if n.op_type == "Resize" else None
        if p is None:
            new.append(n)
            continue
        count += 1
        rows, cols = p
        name = n.name or n.output[0]
        rows_name, cols_name = fresh(f"{name}/rows"), fresh(f"{name}/columns_t")
        mid = fresh(f"{name}/columns_applied")
        g.initializer.extend([numpy_helper.from_array(rows.astype(np.float32), rows_name),
                              numpy_helper.from_array(np.ascontiguousarray(cols.T).astype(np.float32), cols_name)])
        new += [helper.make_node("MatMul", [n.input[0], cols_name], [mid], name=mid),
                helper.make_node("MatMul", [rows_name, mid], [n.output[0]], name=n.output[0])]
    if count:
        _set_live_nodes(g, new)   # the scales/sizes computations no Resize reads any more go
    return count
