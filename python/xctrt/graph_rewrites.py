"""Rewrites of a model package's ONNX graph, made in memory when an engine loads it (the files on disk,
and their checksums, stay as exported).

  weights_as_float32  float16-stored weights back to float32 initializers (onnx2torch, TensorRT)
  route_experts       Conv-LoRA expert selection from "run all, keep one" to "run the chosen one"

Only imported by the engines that use them; needs the onnx package.
"""
from __future__ import annotations

import numpy as np

__all__ = ["route_experts", "weights_as_float32"]


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


def route_experts(model) -> int:
    """Run each Conv-LoRA expert only on the samples its gate chose, in an onnx ModelProto, in place;
    returns how many adapters were rewritten (0: the graph is left as it was).

    The exporter keeps the expert choice graph-static: every expert runs on every sample (window) and a
    one-hot of the gate's argmax keeps one, out = Σ_e onehot_e · E_e(z). The experts upsample by up to 8×,
    so on a CPU they take most of the shipped model's time, 7/8 of it thrown away (routed, it segments
    3.6-3.9x faster: benchmarks/RESULTS.md). Rewritten, each expert
    gets Gather(z, NonZero(choice == e)) and one Gather puts the results back in sample order. The
    output is the same numbers: the static sum adds exact zeros (0 · finite) to the chosen expert's
    value, and each sample's expert maths does not depend on which other samples share the batch.

    Recognised structurally, as training/export.py writes it: z -> ReduceMean -> MatMul -> ArgMax
    (the gate), choice -> Unsqueeze -> Equal -> Cast (the one-hot), per expert Gather(onehot, e) ->
    Unsqueeze... -> Mul(·, E_e(z)), the products summed by a chain of Adds, and the expert branches
    reading z through nodes of their own. An adapter that differs in any of this is left static.

    For engines that take data-dependent shapes well (ONNX Runtime). The torch path on a GPU keeps the
    static graph: CUDA graphs need fixed shapes, and there the experts are small kernels side by side."""
    from onnx import helper, numpy_helper

    g = model.graph
    if any(a.type in (a.GRAPH, a.GRAPHS) for n in g.node for a in n.attribute):
        return 0   # subgraphs read outer names this walk does not see
    consts = {t.name: t for t in g.initializer}
    for n in g.node:
        if n.op_type == "Constant" and len(n.attribute) == 1 and n.attribute[0].name == "value":
            consts[n.output[0]] = n.attribute[0].t
    producer = {o: n for n in g.node for o in n.output}
    readers: dict[str, list] = {}
    for n in g.node:
        for i in n.input:
            readers.setdefault(i, []).append(n)
    for o in g.output:
        readers.setdefault(o.name, []).append(None)   # a graph output is never an intermediate to drop

    def only_reader(t, op):
        r = readers.get(t, [])
        return r[0] if len(r) == 1 and r[0] is not None and r[0].op_type == op else None

    def index_of(t):
        a = numpy_helper.to_array(consts[t]) if t in consts else None
        return int(a.reshape(-1)[0]) if a is not None and a.size == 1 and a.dtype.kind in "iu" else None

    def reads_no_batch_size(reader) -> bool:
        """A reader of a (N, ...) shape vector that takes one dimension other than N."""
        if reader is None or reader.op_type != "Gather" or any(a.name == "axis" and a.i != 0 for a in reader.attribute):
            return False
        k = index_of(reader.input[1])
        return k is not None and k > 0 and numpy_helper.to_array(consts[reader.input[1]]).ndim == 0

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
        return seen.values()

    def rows_stay_inside(e, value, product, first) -> bool:
        """Whether what expert e computes from its samples' rows (from the nodes `first` on) is read
        only inside its branch and ends in its value, which only its one-hot product reads."""
        branch = {id(n) for n in branch_nodes(value, z)}
        inside, todo = {}, list(first)
        while todo:
            n = todo.pop()
            if id(n) in inside:
                continue
            inside[id(n)] = n
            todo += [r for o in n.output for r in readers.get(o, []) if r is not None and id(r) in branch]
        for n in inside.values():
            for o in n.output:
                for r in readers.get(o, []):
                    if r is None or (id(r) not in inside and not (o == value and product in r.output)):
                        return False
        return producer.get(value) is not None and id(producer[value]) in inside

    def node(op, inputs, outputs, **attrs):   # named after its output: converters key nodes by name
        return helper.make_node(op, inputs, outputs, name=outputs[0], **attrs)

    def const(name, value):
        return node("Constant", [], [name], value=numpy_helper.from_array(np.asarray(value, np.int64)))

    drop, new_nodes, rewire, count = set(), [], {}, 0
    for argmax in [n for n in g.node if n.op_type == "ArgMax"]:
        choice = argmax.output[0]
        unsq = only_reader(choice, "Unsqueeze")
        equal = unsq and only_reader(unsq.output[0], "Equal")
        cast = equal and only_reader(equal.output[0], "Cast")
        gate = producer.get(argmax.input[0])
        pool = producer.get(gate.input[0]) if gate is not None and gate.op_type == "MatMul" else None
        attrs = {a.name: a.i for a in argmax.attribute}
        if (cast is None or pool is None or pool.op_type != "ReduceMean"
                or attrs.get("keepdims", 1) != 0 or attrs.get("axis", 0) not in (1, -1)):
            continue   # not the exporter's gate: one expert index per sample, shape (N,)
        labels = [a for a in equal.input if a != unsq.output[0]]
        labels = numpy_helper.to_array(consts[labels[0]]).reshape(-1) if labels and labels[0] in consts else None
        z = pool.input[0]
        # per expert: its value E_e(z) and its product with the one-hot
        experts, chain = {}, [unsq, equal, cast]
        for gather in readers.get(cast.output[0], []):
            e = index_of(gather.input[1]) if gather is not None and gather.op_type == "Gather" else None
            if e is None:
                experts = None
                break
            chain.append(gather)
            t = gather.output[0]
            while (u := only_reader(t, "Unsqueeze")) is not None:
                chain.append(u)
                t = u.output[0]
            mul = only_reader(t, "Mul")
            if mul is None:
                experts = None
                break
            chain.append(mul)
            experts[e] = (mul.input[1] if mul.input[0] == t else mul.input[0], mul.output[0])
        if not experts or labels is None or sorted(experts) != list(range(len(experts))) \
                or not np.array_equal(labels, np.arange(len(experts))):
            continue   # one-hot column e must mean "choice == e", for every e
        products = {p for _, p in experts.values()}
        t, summed = experts[0][1], {experts[0][1]}
        while (add := only_reader(t, "Add")) is not None:
            other = add.input[1] if add.input[0] == t else add.input[0]
            if other not in products:
                break
            summed.add(other)
            chain.append(add)
            t = add.output[0]
        if summed != products:
            continue
        total = t
        # the nodes through which each expert reads z: its own ones are rewired to its samples; a shape
        # read of z that several experts share may stay only where nothing reads z's batch size from it
        # (as the exporter's resize-back reads z's height and width)
        owner: dict[int, int] = {}
        nodes_by_id = {}
        for e, (value, _) in experts.items():
            for n in branch_nodes(value, z):
                if z in n.input:
                    owner[id(n)] = e if owner.get(id(n), e) == e else -1
                    nodes_by_id[id(n)] = n
        shared = [nodes_by_id[k] for k, e in owner.items() if e == -1]
        if any(n.op_type != "Shape" or not all(reads_no_batch_size(r) for r in readers.get(n.output[0], []))
               for n in shared) or set(owner.values()) - {-1} != set(experts):
            continue
        owner = {k: e for k, e in owner.items() if e != -1}
        if not all(rows_stay_inside(e, value, experts[e][1], [nodes_by_id[k] for k, o in owner.items() if o == e])
                   for e, (value, _) in experts.items()):
            continue

        pre = f"{argmax.name or choice}/routed"
        new_nodes.append(const(f"{pre}/flat", [-1]))
        for e in sorted(experts):
            p = f"{pre}/{e}"
            new_nodes += [const(f"{p}/e", e),
                          node("Equal", [choice, f"{p}/e"], [f"{p}/mask"]),
                          node("NonZero", [f"{p}/mask"], [f"{p}/nonzero"]),
                          node("Reshape", [f"{p}/nonzero", f"{pre}/flat"], [f"{p}/rows"]),
                          node("Gather", [z, f"{p}/rows"], [f"{p}/z"], axis=0)]
        for k, e in owner.items():
            rewire[k] = (z, f"{pre}/{e}/z")
        order = sorted(experts)
        # rows (a permutation of 0..N-1) says whose value each row of `values` is; argsort(rows) is where
        # each sample's value sits, so one Gather puts them back in sample order
        new_nodes += [node("Concat", [f"{pre}/{e}/rows" for e in order], [f"{pre}/rows"], axis=0),
                      node("Shape", [f"{pre}/rows"], [f"{pre}/n"]),
                      node("TopK", [f"{pre}/rows", f"{pre}/n"], [f"{pre}/sorted", f"{pre}/where"],
                           axis=0, largest=0, sorted=1),
                      node("Concat", [experts[e][0] for e in order], [f"{pre}/values"], axis=0),
                      node("Gather", [f"{pre}/values", f"{pre}/where"], [total], axis=0)]
        drop.update(id(n) for n in chain)
        count += 1
    if not count:
        return 0

    nodes = [n for n in g.node if id(n) not in drop]
    for n in nodes:
        if id(n) in rewire:
            old, new = rewire[id(n)]
            for i, name in enumerate(n.input):
                if name == old:
                    n.input[i] = new
    # topological order again (the new nodes sit between old ones), then what no output needs goes
    ready = {i.name for i in g.input} | {t.name for t in g.initializer} | {""}
    ordered, pending = [], nodes + new_nodes
    while pending:
        waiting = []
        for n in pending:
            if all(i in ready for i in n.input):
                ordered.append(n)
                ready.update(n.output)
            else:
                waiting.append(n)
        if len(waiting) == len(pending):
            raise ValueError("route_experts: the rewritten graph has a cycle or a missing input")
        pending = waiting
    needed, live = {o.name for o in g.output}, []
    for n in reversed(ordered):
        if any(o in needed for o in n.output):
            live.append(n)
            needed.update(n.input)
    del g.node[:]
    g.node.extend(reversed(live))
    kept = [t for t in g.initializer if t.name in needed]
    del g.initializer[:]
    g.initializer.extend(kept)
    return count
