"""Inference engines behind one interface: ``engine.run(x)`` with x float32 (N, 1, S, S) in [0, 1]
returns float32 (N, C, S, S) probabilities, C = every class channel of the package in order.

onnxruntime is the default everywhere; torch (CUDA when present) and TensorRT are optional and
imported only when chosen.
"""
from __future__ import annotations

import hashlib
import importlib.util
import os
from pathlib import Path

import numpy as np

from .errors import XctrtError
from .graph_rewrites import fold_shapes, resize_as_matmul, route_experts, weights_as_float32
from .model import ModelPackage

BACKENDS = ("auto", "onnxruntime", "torch", "tensorrt")
PRECISIONS = ("fp32", "bf16")


class Engine:
    name = "?"
    device = "cpu"
    torch_model = None   # a torch callable on device tensors, for the GPU path (torch engines only)

    def run(self, x: np.ndarray) -> np.ndarray:  # pragma: no cover - interface
        raise NotImplementedError


def rewrite_for_cpu(data: bytes, route: bool = True, resize_matmul: bool = True) -> tuple[bytes, int, int]:
    """A serialized ONNX graph as ONNX Runtime runs it on a CPU: experts routed (route_experts), then
    their Resizes as MatMuls (resize_as_matmul; after routing, which recognises the experts by their
    Resizes). Returns the graph (data itself when nothing changed), routed adapters, rewritten Resizes."""
    import onnx

    model = onnx.load_from_string(data)
    routed = route_experts(model) if route else 0
    resized = resize_as_matmul(model) if resize_matmul else 0
    return (model.SerializeToString() if routed or resized else data), routed, resized


class OnnxRuntimeEngine(Engine):
    """ONNX Runtime (CUDA provider when installed, else CPU).

    route: on the CPU provider, run each Conv-LoRA expert only on the windows its gate chose
    (graph_rewrites.route_experts: the same outputs, 3.4-3.9x faster for the shipped model); False runs
    the graph as exported. The CUDA provider keeps the exported graph: there cuDNN may choose another
    algorithm for each subset size, so the same numbers are not assured, and it is not measured.
    resize_matmul: on the CPU provider, also run the experts' fixed-size bicubic Resizes as two small
    MatMuls each (graph_rewrites.resize_as_matmul: the same outputs up to float32 rounding, about a
    third off a CPU tile of the shipped model; benchmarks/routed_experts.py measures both)."""

    name = "onnxruntime"

    def __init__(self, package: ModelPackage, threads: int = 0, route: bool = True, resize_matmul: bool = True):
        import onnxruntime as ort

        opts = ort.SessionOptions()
        opts.intra_op_num_threads = threads or 0
        opts.inter_op_num_threads = 1
        opts.log_severity_level = 3
        providers = [p for p in ("CUDAExecutionProvider", "CPUExecutionProvider")
                     if p in ort.get_available_providers()]
        self.routed_adapters = 0   # Conv-LoRA adapters whose experts run routed, over all graphs
        self.matmul_resizes = 0    # Resizes run as MatMuls, over all graphs
        on_cpu = providers[0] == "CPUExecutionProvider"
        route, resize_matmul = route and on_cpu, resize_matmul and on_cpu
        try:
            graphs = []
            for g in package.graphs:
                data, routed, resized = (rewrite_for_cpu(g.data, route, resize_matmul) if route or resize_matmul
                                         else (g.data, 0, 0))
                graphs.append(data)
                self.routed_adapters += routed
                self.matmul_resizes += resized
            self.sessions = [ort.InferenceSession(data, sess_options=opts, providers=providers) for data in graphs]
        except Exception as exc:
            raise XctrtError(f"{package.path}: ONNX Runtime cannot load the model graph ({exc})") from exc
        self.device = "cuda" if self.sessions[0].get_providers()[0].startswith("CUDA") else "cpu"
        self.input_names = [s.get_inputs()[0].name for s in self.sessions]

    def run(self, x):
        outs = [s.run(None, {n: x})[0] for s, n in zip(self.sessions, self.input_names)]
        return outs[0] if len(outs) == 1 else np.concatenate(outs, axis=1)


class TorchEngine(Engine):
    """Runs the package's ONNX graphs as torch modules (onnx2torch), on CUDA when available.

    precision "bf16": matrix products and convolutions in bfloat16 through torch.autocast (which keeps
    reductions, normalisation and the softmax in float32); probabilities come back as float32.
    static_batch (default: on CUDA): one module per batch size, its shape arithmetic folded into
    constants (graph_rewrites.fold_shapes), so a forward reads nothing back from the device and can be
    captured in a CUDA graph; False converts the graph once, shapes computed as it runs."""

    name = "torch"

    def __init__(self, package: ModelPackage, threads: int = 0, precision: str = "fp32", device: str | None = None,
                 static_batch: bool | None = None):
        """device: "cuda" or "cpu"; None = CUDA when torch sees a GPU."""
        try:
            import onnx
            import torch
            from onnx2torch import convert
        except ImportError as exc:
            raise XctrtError("the torch backend needs torch, onnx and onnx2torch (pip install 'xctrt[torch]')") from exc
        self.torch, self._onnx, self._convert = torch, onnx, convert
        if threads:
            torch.set_num_threads(threads)
        self.device = device or ("cuda" if torch.cuda.is_available() else "cpu")
        self.static_batch = self.device != "cpu" if static_batch is None else bool(static_batch)
        # Float16-stored weights go back to float32 initializers first (onnx2torch reads Conv weights from those).
        # Without static_batch (the CPU) the Conv-LoRA experts run routed (as in OnnxRuntimeEngine); with it the
        # graph stays static, since the GPU path captures it in CUDA graphs, which need fixed shapes.
        self.routed_adapters = 0
        self.graphs = []
        for g in package.graphs:
            model = weights_as_float32(onnx.load_from_string(g.data))
            if not self.static_batch:
                self.routed_adapters += route_experts(model)
            self.graphs.append(model)
        self._by_batch: dict[int | None, list] = {}
        if not self.static_batch:
            self._by_batch[None] = [self._module(m) for m in self.graphs]
            self.graphs = None
        self.precision = precision
        if precision != "fp32":
            self.name = f"torch-{precision}"

    def _module(self, model):
        # Shape inference with data propagation first: onnx2torch sizes LayerNormalization from the graph's
        # value_info, and a TinyViT (LiteMedSAM) graph reshapes with computed shapes that plain inference
        # leaves unknown (it would build LayerNorm(normalized_shape=[0])).
        model = self._onnx.shape_inference.infer_shapes(model, data_prop=True)
        return _host_shape_constants(self._convert(model)).eval().to(self.device)

    def modules_for(self, batch: int) -> list:
        """The torch modules that take a batch of this size (built on first use when static_batch)."""
        if not self.static_batch:
            return self._by_batch[None]
        mods = self._by_batch.get(batch)
        if mods is None:
            mods = self._by_batch[batch] = [self._module(fold_shapes(m, batch)) for m in self.graphs]
        return mods

    def torch_model(self, t):
        """Device tensor (N, 1, S, S) float32 -> probabilities (N, K, S, S) float32."""
        torch = self.torch
        n = t.shape[0]
        # a smaller batch (a volume's last) runs padded through a module already built for a larger one:
        # building another takes seconds
        bigger = [b for b in self._by_batch if b is not None and b > n] if self.static_batch else []
        batch = min(bigger) if bigger else n
        if batch > n:
            t = torch.cat([t, t[-1:].expand(batch - n, *t.shape[1:])])
        modules = self.modules_for(batch)
        # no cast cache: the GPU path captures this call in a CUDA graph (torch's advice for autocast there)
        with torch.autocast(self.device, dtype=torch.bfloat16, enabled=self.precision == "bf16", cache_enabled=False):
            outs = [m(t) for m in modules]
        return (outs[0] if len(outs) == 1 else torch.cat(outs, dim=1))[:n].float()

    def run(self, x):
        torch = self.torch
        with torch.inference_mode():
            return self.torch_model(torch.from_numpy(x).to(self.device, non_blocking=True)).cpu().numpy()


# onnx2torch modules that read shape-like arguments (target shapes, resize scales and sizes, slice
# bounds, pads and pad value, split sizes, scalar gather indices) from tensors as they run, by position
_SHAPE_ARGS = {"OnnxReshape": (1,), "OnnxExpand": (1,), "OnnxTile": (1,), "OnnxSlice": (1, 2, 3, 4),
               "OnnxSplit13": (1,), "OnnxPadDynamic": (1, 2), "OnnxResize": (1, 2, 3),
               "OnnxConstantOfShape": (0,), "OnnxUnsqueezeDynamicAxes": (1,), "OnnxSqueezeDynamicAxes": (1,),
               "OnnxGather": (1,)}


def _host_shape_constants(gm):
    """Keep the graph's constant shape-like arguments in host memory.

    onnx2torch reads them with .tolist()/torch.Size() at every call; as buffers they would follow the
    module to the GPU, making each read a device sync (and the forward impossible to capture in a CUDA
    graph). Held by a submodule that .to() passes by, they stay on the host. Gather indices only when
    scalar: a host scalar index is a plain select, while index arrays are data for the device."""
    import torch

    class HostConstants(torch.nn.Module):   # .to() / .cuda() pass it by
        def _apply(self, fn, recurse=True):
            return self

    held = {**dict(gm.named_parameters()), **dict(gm.named_buffers())}
    gm.add_submodule("host_constants", HostConstants())
    host = {}

    def on_host(node, arg):
        if arg.target not in host:
            host[arg.target] = f"c{len(host)}"
            gm.host_constants.register_buffer(host[arg.target], held[arg.target].detach().cpu().clone(),
                                              persistent=False)
        with gm.graph.inserting_before(node):
            return gm.graph.get_attr(f"host_constants.{host[arg.target]}")

    for node in list(gm.graph.nodes):
        kind = type(gm.get_submodule(node.target)).__name__ if node.op == "call_module" else None
        if kind not in _SHAPE_ARGS:
            continue
        constant = lambda a: getattr(a, "op", None) == "get_attr" and a.target in held and \
            (kind != "OnnxGather" or held[a.target].dim() == 0)   # noqa: E731
        for i in _SHAPE_ARGS[kind]:
            if i < len(node.args) and constant(node.args[i]):
                node.update_arg(i, on_host(node, node.args[i]))
        for k, a in node.kwargs.items():   # onnx2torch passes Resize's roi / scales / sizes by name
            if constant(a):
                node.update_kwarg(k, on_host(node, a))
    gm.graph.eliminate_dead_code()
    gm.recompile()
    return gm


class TorchModuleEngine(Engine):
    """An in-memory torch module as an engine (benchmarks: the same network run several ways).

    batch: images per module call (1 = one image at a time, as a plain segment-anything loop does)."""

    name = "torch-module"

    def __init__(self, module, device: str = "cuda", batch: int | None = None, name: str | None = None):
        import torch
        self.torch, self.torch_model, self.device, self.batch = torch, module, device, batch
        if name:
            self.name = name

    def run(self, x):
        torch = self.torch
        step = self.batch or len(x)
        with torch.inference_mode():
            t = torch.from_numpy(x).to(self.device, non_blocking=True)
            # each chunk to the host at once: a compiled module's CUDA-graph outputs are reused by its next call
            return torch.cat([self.torch_model(t[i:i + step]).float().cpu()
                              for i in range(0, len(t), step)]).numpy()


class TensorRTEngine(Engine):
    """TensorRT >= 10: builds an fp16 engine per graph from the ONNX, cached next to the package
    (or in ~/.cache/xctrt) keyed by GPU name, TensorRT version and graph sha256. Device buffers
    come from torch. Not run in this repository's CI: TensorRT is not installable there."""

    name = "tensorrt"
    device = "cuda"

    def __init__(self, package: ModelPackage, threads: int = 0, max_batch: int = 32):
        try:
            import tensorrt as trt
            import torch
        except ImportError as exc:
            raise XctrtError("the tensorrt backend needs the tensorrt and torch packages with a CUDA GPU") from exc
        if not torch.cuda.is_available():
            raise XctrtError("the tensorrt backend needs a CUDA GPU; none is visible")
        self.trt, self.torch = trt, torch
        self.logger = trt.Logger(trt.Logger.WARNING)
        self.runtime = trt.Runtime(self.logger)
        self.max_batch = max_batch
        size = package.input_size
        self.engines = []
        for g in package.graphs:
            plan = self._cached_plan(package, g, size)
            engine = self.runtime.deserialize_cuda_engine(plan)
            if engine is None:
                raise XctrtError(f"{package.path}: TensorRT could not deserialise the engine for {g.file}")
            self.engines.append((engine, engine.create_execution_context(), len(g.outputs)))
        self.stream = torch.cuda.Stream()

    def _cached_plan(self, package, graph, size) -> bytes:
        trt, torch = self.trt, self.torch
        gpu = torch.cuda.get_device_name().replace(" ", "_")
        key = hashlib.sha256(graph.data).hexdigest()[:16]
        name = f"{Path(graph.file).stem}.{gpu}.trt{trt.__version__}.b{self.max_batch}.{key}.engine"
        cache_dir = package.path if package.path.is_dir() and os.access(package.path, os.W_OK) \
            else Path.home() / ".cache" / "xctrt" / "engines"
        cache_dir.mkdir(parents=True, exist_ok=True)
        cached = cache_dir / name
        if cached.is_file():
            return cached.read_bytes()
        builder = trt.Builder(self.logger)
        network = builder.create_network(0)
        parser = trt.OnnxParser(network, self.logger)
        if not parser.parse(self._float32_weights(graph.data)):
            errs = "; ".join(str(parser.get_error(i)) for i in range(parser.num_errors))
            raise XctrtError(f"{package.path}: TensorRT cannot parse {graph.file}: {errs}")
        config = builder.create_builder_config()
        config.set_flag(trt.BuilderFlag.FP16)
        profile = builder.create_optimization_profile()
        inp = network.get_input(0).name
        profile.set_shape(inp, (1, 1, size, size), (max(1, self.max_batch // 2), 1, size, size),
                          (self.max_batch, 1, size, size))
        config.add_optimization_profile(profile)
        plan = builder.build_serialized_network(network, config)
        if plan is None:
            raise XctrtError(f"{package.path}: TensorRT failed to build an engine for {graph.file}")
        plan = bytes(plan)
        tmp = cached.with_suffix(".partial")
        tmp.write_bytes(plan)
        os.replace(tmp, cached)
        return plan

    @staticmethod
    def _float32_weights(data: bytes) -> bytes:
        """Float16-stored weights as plain float32 initializers (the parser's constant weights; the
        engine is built in fp16 anyway); the graph as it is when onnx is not installed."""
        try:
            import onnx
        except ImportError:
            return data
        return weights_as_float32(onnx.load_from_string(data)).SerializeToString()

    def run(self, x):
        torch = self.torch
        outs = []
        with torch.cuda.stream(self.stream):
            for start in range(0, x.shape[0], self.max_batch):
                chunk = torch.from_numpy(np.ascontiguousarray(x[start:start + self.max_batch])).cuda()
                parts = []
                for engine, ctx, n_out in self.engines:
                    in_name = engine.get_tensor_name(0)
                    out_name = engine.get_tensor_name(1)
                    ctx.set_input_shape(in_name, tuple(chunk.shape))
                    out = torch.empty((chunk.shape[0], n_out) + tuple(chunk.shape[2:]), device="cuda",
                                      dtype=torch.float32)
                    ctx.set_tensor_address(in_name, chunk.data_ptr())
                    ctx.set_tensor_address(out_name, out.data_ptr())
                    if not ctx.execute_async_v3(self.stream.cuda_stream):
                        raise XctrtError("TensorRT execution failed")
                    parts.append(out)
                outs.append(torch.cat(parts, dim=1))
        self.stream.synchronize()
        return torch.cat(outs).cpu().numpy()


def available_backends() -> list[str]:
    names = ["onnxruntime"]
    if importlib.util.find_spec("torch") and importlib.util.find_spec("onnx2torch"):
        names.append("torch")
    if importlib.util.find_spec("tensorrt"):
        names.append("tensorrt")
    return names


def make_engine(package: ModelPackage, backend: str = "auto", threads: int = 0, precision: str = "fp32",
                torch_device: str | None = None) -> Engine:
    """torch_device: where the torch backend runs ("cuda", "cpu"; None = CUDA when torch sees a GPU)."""
    if backend not in BACKENDS:
        raise XctrtError(f"unknown backend {backend!r}; choose one of {', '.join(BACKENDS)}")
    if precision not in PRECISIONS:
        raise XctrtError(f"unknown precision {precision!r}; choose one of {', '.join(PRECISIONS)}")
    if precision != "fp32" and backend != "torch":
        raise XctrtError(f"precision {precision} needs the torch backend (--backend torch), not {backend}")
    if backend == "auto":
        # TensorRT only where it is installed and a GPU is visible; otherwise ONNX Runtime.
        if "tensorrt" in available_backends():
            try:
                return TensorRTEngine(package, threads)
            except XctrtError:
                pass
        backend = "onnxruntime"
    if backend == "torch":
        return TorchEngine(package, threads, precision, torch_device)
    cls = {"onnxruntime": OnnxRuntimeEngine, "tensorrt": TensorRTEngine}[backend]
    return cls(package, threads)
