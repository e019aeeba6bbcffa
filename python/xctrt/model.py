"""Model packages: a folder or .zip holding manifest.json and ONNX graphs, each graph pinned by its sha256
in the manifest (an embedded package's manifest by EMBEDDED_MANIFEST_SHA256).

Graph contract (every backend relies on it): input ``image`` float32 (N, 1, S, S), grey values
already windowed to [0, 1]; output float32 (N, C, S, S) per-class probabilities, C = the
graph's ``outputs`` list. Paper mode ships one single-output graph per class; shared-encoder
mode ships one graph with several outputs.
"""
from __future__ import annotations

import hashlib
import io
import json
import math
import os
import zipfile
import zlib
from dataclasses import dataclass, field
from pathlib import Path

from .errors import XctrtError

FORMAT = "xctrt-model/1"
PRIORITY_RULES = ("priority", "argmax")
INPUT_MODES = ("tile", "resize")
BLENDS = ("constant", "ramp")
PADS = ("edge", "constant")
EMBEDDED = Path(__file__).parent / "models"
DEFAULT_MODEL = "litemedsam-convlora-shared"
# sha256 of each embedded package's manifest.json, which in turn holds its graphs' sha256: a package
# chosen by embedded name (-m NAME, 'default', XCTRT_MODEL) is refused if its manifest was edited, since
# nothing inside a package can protect its own manifest. A deliberate change to a shipped manifest must
# update its line here (tests/test_model.py checks these against the files).
EMBEDDED_MANIFEST_SHA256 = {
    "litemedsam-convlora-shared": "035dd8c88dbc49aa288548d0e90984d8618b060d916aaf75d55073a1c632c6c9",
    "untrained-tiny": "72af03b3702ce6b4ae52375db1e4db93891ccfa35db66ba9d60aeb3df6757a81",
}


@dataclass(frozen=True)
class ClassSpec:
    id: int          # label value written to labels.tif
    name: str
    threshold: float


@dataclass(frozen=True)
class Graph:
    file: str
    outputs: tuple[str, ...]
    data: bytes = field(repr=False)


@dataclass
class ModelPackage:
    path: Path
    manifest: dict
    classes: list[ClassSpec]       # one per probability channel, in channel order
    graphs: list[Graph]
    aggregation: str
    priority: list[int]            # channel indices, highest priority first
    input_size: int
    input_mode: str
    overlap: int
    blend: str
    pad: str
    window: dict
    manifest_sha256: str | None = None   # of manifest.json as read; summary.json records it (None: in memory)

    @property
    def name(self) -> str:
        return self.manifest.get("name", self.path.name)

    @property
    def trained(self) -> bool:
        return bool(self.manifest.get("trained", False))

    def describe(self) -> str:
        m = self.manifest
        lines = [
            f"model       {self.name}  ({'trained' if self.trained else 'UNTRAINED: random weights'})",
            f"path        {self.path}",
            f"backbone    {m.get('backbone', '?')}",
            "classes     " + ", ".join(f"{c.id}={c.name} (p>={c.threshold:g})" for c in self.classes),
            f"aggregation {self.aggregation}" + (
                " (" + " > ".join(self.classes[i].name for i in self.priority) + " > air)"
                if self.aggregation == "priority" else ""),
            f"input       {self.input_mode} {self.input_size}x{self.input_size}, overlap {self.overlap}, "
            f"blend {self.blend}, pad {self.pad}",
            f"window      {_window_text(self.window)}",
            "graphs      " + ", ".join(f"{g.file} -> {list(g.outputs)} ({_size_text(len(g.data))})"
                                        for g in self.graphs),
            f"manifest    sha256 {self.manifest_sha256}",
            f"training    {m.get('training_data', '-')}",
            *_metrics_lines(m.get("metrics")),
            "versions    " + (_inline(m["versions"]) if isinstance(m.get("versions"), dict)
                              else json.dumps(m.get("versions", "-"))),
        ]
        if m.get("description"):
            lines.append(f"about       {m['description']}")
        return "\n".join(lines)


def _window_text(w: dict) -> str:
    """How grey values are mapped to 0..1, in words (the manifest's window entry)."""
    if w["mode"] == "percentile":   # the loader allows only these two modes
        return f"percentiles {w['low']:g} to {w['high']:g} of the volume's grey values"
    return f"fixed grey values {w['low']:g} to {w['high']:g}"


def _size_text(n: int) -> str:
    return f"{n / 1e6:.1f} MB" if n >= 1e6 else f"{n / 1e3:.1f} kB"


def _metrics_lines(metrics) -> list[str]:
    if isinstance(metrics, dict) and metrics:
        return ["metrics", *_tree_lines(metrics, "  ")]
    return [f"metrics     {json.dumps(metrics) if metrics else '-'}"]   # free-form: shown as it is


def _inline(d: dict) -> str:
    return ", ".join(f"{k} ({_inline(v)})" if isinstance(v, dict) else f"{k} {_scalar(v)}"
                     for k, v in d.items()) or "-"


def _scalar(v) -> str:
    if isinstance(v, float):
        return f"{v:.4g}"
    if isinstance(v, list):
        return ("[" + ", ".join(map(_scalar, v)) + "]" if all(not isinstance(x, (dict, list)) for x in v)
                else json.dumps(v))
    return "-" if v is None else str(v)


def _one_line(d: dict) -> bool:
    """A mapping short enough to read on one line: plain values (or mappings of plain values), no long text."""
    def plain(x):
        return not isinstance(x, (dict, list)) and not (isinstance(x, str) and len(x) > 40)
    return all(plain(v) or (isinstance(v, dict) and all(plain(x) for x in v.values())) for v in d.values())


def _tree_lines(d: dict, indent: str, width: int = 100) -> list[str]:
    """A manifest's free-form metrics as indented lines: short mappings on one line, others with their
    entries below the key, long text wrapped."""
    import textwrap
    out = []
    for k, v in d.items():
        if isinstance(v, dict) and not _one_line(v):
            out.append(f"{indent}{k}")
            out += _tree_lines(v, indent + "  ", width)
            continue
        text = _inline(v) if isinstance(v, dict) else _scalar(v)
        head = f"{indent}{k:<10} "
        out += textwrap.wrap(text, width, initial_indent=head, subsequent_indent=" " * len(head),
                             break_on_hyphens=False) or [head]
    return out


def resolve_model_path(model: str | Path | None) -> Path:
    """A path, or the name of an embedded package. 'default' (or None) is $XCTRT_MODEL when set
    (a site's own package, or a faster embedded one), else the shipped DEFAULT_MODEL."""
    return _resolve(model)[0]


def _resolve(model: str | Path | None) -> tuple[Path, str | None, bool]:
    """resolve_model_path's path, the embedded name it was resolved from (None for a path), and whether
    the name came from $XCTRT_MODEL (errors then say so: the user typed no name)."""
    from_env = False
    if model is None or str(model) == "default":
        env = os.environ.get("XCTRT_MODEL")
        model, from_env = (env, True) if env else (DEFAULT_MODEL, False)
    p = Path(model)
    if not p.exists() and (EMBEDDED / str(model)).is_dir():
        return EMBEDDED / str(model), str(model), from_env
    return p, None, from_env


def _reader(path: Path):
    """A function name -> bytes over a package folder or zip."""
    if path.is_dir():
        def read(name: str) -> bytes:
            f = path / name
            if not f.is_file():
                raise XctrtError(f"{path}: model package is missing {name}")
            try:
                return f.read_bytes()
            except OSError as exc:   # no permission, an I/O error
                raise XctrtError(f"{path}: cannot read {name} ({exc.strerror or exc})") from exc
        return read
    if path.is_file():
        try:
            zf = zipfile.ZipFile(path)
        except zipfile.BadZipFile as exc:
            raise XctrtError(f"{path}: not a model package (neither a folder nor a valid .zip)") from exc
        names = set(zf.namelist())
        prefix = ""
        if "manifest.json" not in names:  # allow one top-level folder inside the zip
            tops = [n for n in names if n.endswith("/manifest.json") and n.count("/") == 1]
            prefix = tops[0][: -len("manifest.json")] if tops else ""

        def read(name: str) -> bytes:
            try:
                return zf.read(prefix + name)
            except KeyError as exc:
                raise XctrtError(f"{path}: model package is missing {name}") from exc
            # The central directory can be intact while a member's data is not (bad CRC, broken deflate
            # stream, cut short); an encrypted member (RuntimeError) or an unknown compression method
            # (NotImplementedError) cannot be read either.
            except (zipfile.BadZipFile, zlib.error, EOFError, OSError, RuntimeError, NotImplementedError) as exc:
                raise XctrtError(f"{path}: cannot read {name} from the zip, the package is damaged "
                                 f"({type(exc).__name__}: {exc})") from exc
        return read
    raise XctrtError(f"{path}: model package not found (give a folder, a .zip, or 'default')")


def load_package(model: str | Path | None = None) -> ModelPackage:
    """Load and verify a model package; any defect is an XctrtError naming the package."""
    path, embedded, from_env = _resolve(model)
    if from_env and not path.exists():
        names = ", ".join(sorted(p.name for p in EMBEDDED.iterdir() if p.is_dir()))
        raise XctrtError(f"{path}: model package not found; the name comes from the environment variable "
                         f"XCTRT_MODEL (set it to a package folder, a .zip, or an embedded name: {names})")
    read = _reader(path)
    raw = read("manifest.json")
    digest = hashlib.sha256(raw).hexdigest()
    pin = EMBEDDED_MANIFEST_SHA256.get(embedded) if embedded else None
    if embedded and digest != pin:
        raise XctrtError(f"{path}: manifest.json of the embedded package {embedded!r} is not the one this "
                         f"xctrt ships (sha256 {digest[:12]}..., pinned {pin[:12] + '...' if pin else 'none'}); "
                         "reinstall xctrt, or if the change is deliberate update its EMBEDDED_MANIFEST_SHA256 "
                         "entry in xctrt/model.py")
    try:
        manifest = json.loads(raw)
    except (ValueError, UnicodeDecodeError) as exc:
        raise XctrtError(f"{path}: manifest.json is not valid JSON ({exc})") from exc
    if not isinstance(manifest, dict) or manifest.get("format") != FORMAT:
        got = manifest.get("format") if isinstance(manifest, dict) else type(manifest).__name__
        raise XctrtError(f"{path}: unsupported model package format {got!r}; this xctrt reads {FORMAT!r}")
    try:
        return _parse(path, manifest, read, digest)
    except (KeyError, TypeError, ValueError) as exc:
        raise XctrtError(f"{path}: manifest.json is incomplete or malformed ({type(exc).__name__}: {exc})") from exc


def _parse(path: Path, m: dict, read, manifest_sha256: str) -> ModelPackage:
    hashes = m["files"]
    graphs = []
    for g in m["graphs"]:
        name = g["file"]
        if name not in hashes:
            raise XctrtError(f"{path}: {name} has no sha256 in manifest.json")
        data = read(name)
        digest = hashlib.sha256(data).hexdigest()
        if digest != hashes[name]:
            raise XctrtError(f"{path}: {name} does not match its sha256 in manifest.json; "
                             "the package is damaged or was modified")
        graphs.append(Graph(name, tuple(g["outputs"]), data))
    by_name = {c["name"]: c for c in m["classes"]}
    if len(by_name) != len(m["classes"]):   # else the last entry of a name would silently win
        raise XctrtError(f"{path}: class names must be distinct, got {[c['name'] for c in m['classes']]}")
    channel_names = [o for g in graphs for o in g.outputs]
    if not channel_names:
        raise XctrtError(f"{path}: the package has no classes (no graph outputs)")
    if sorted(channel_names) != sorted(by_name) or len(set(channel_names)) != len(channel_names):
        raise XctrtError(f"{path}: graph outputs {channel_names} do not match the classes {sorted(by_name)}")
    classes = [ClassSpec(_whole(by_name[n]["id"], f"class {n!r} id"), n, float(by_name[n]["threshold"]))
               for n in channel_names]
    if any(not 0 < c.id < 256 for c in classes) or len({c.id for c in classes}) != len(classes):
        raise XctrtError(f"{path}: class ids must be distinct values 1..255")
    for c in classes:
        if not 0 <= c.threshold <= 1:   # also NaN: a probability threshold outside [0, 1] never/always fires
            raise XctrtError(f"{path}: class {c.name!r} threshold must be a probability in [0, 1], "
                             f"not {c.threshold}")
    if not isinstance(m.get("trained", False), bool):   # bool("false") would call it trained
        raise XctrtError(f"{path}: trained must be true or false, not {m['trained']!r}")
    agg = m.get("aggregation", "priority")
    if agg not in PRIORITY_RULES:
        raise XctrtError(f"{path}: aggregation must be one of {PRIORITY_RULES}, not {agg!r}")
    prio_names = m.get("priority", channel_names)
    if sorted(prio_names) != sorted(channel_names):
        raise XctrtError(f"{path}: priority {prio_names} must list every class once")
    inp = m["input"]
    size, mode = _whole(inp["size"], "input size"), inp.get("mode", "tile")
    overlap = _whole(inp.get("overlap", 0), "input overlap")
    blend, pad = inp.get("blend", "ramp"), inp.get("pad", "edge")
    if mode not in INPUT_MODES or blend not in BLENDS or pad not in PADS or not 0 <= overlap < size:
        raise XctrtError(f"{path}: bad input section {inp}")
    for g in graphs:
        _check_graph_shape(path, g, size)
    window = m.get("intensity_window", {"mode": "percentile", "low": 0.5, "high": 99.5})
    if not isinstance(window, dict) or window.get("mode") not in ("percentile", "fixed"):
        raise XctrtError(f"{path}: bad intensity_window {window}")
    lo, hi = float(window["low"]), float(window["high"])
    ok = math.isfinite(lo) and math.isfinite(hi) and lo < hi
    if not ok or (window["mode"] == "percentile" and not (0 <= lo and hi <= 100)):   # else NumPy fails mid-run
        raise XctrtError(f"{path}: bad intensity_window {window} (needs finite low < high; percentiles 0..100)")
    return ModelPackage(path=path, manifest=m, classes=classes, graphs=graphs, aggregation=agg,
                        priority=[channel_names.index(n) for n in prio_names], input_size=size,
                        input_mode=mode, overlap=overlap, blend=blend, pad=pad, window=window,
                        manifest_sha256=manifest_sha256)


def _whole(value, what: str) -> int:
    """A whole-number manifest value; int() alone would turn 1.7 into 1 and true into 1, and fail on
    Infinity with an OverflowError. ValueError/TypeError: load_package calls the manifest malformed."""
    if isinstance(value, int) and not isinstance(value, bool):
        return value
    f = float(value)   # "256" and 256.0 are fine
    if isinstance(value, bool) or not f.is_integer():
        raise ValueError(f"{what} must be a whole number, not {value!r}")
    return int(f)


def _check_graph_shape(path: Path, graph: Graph, size: int) -> None:
    """The graph's declared input (N, 1, S, S) and first output (N, C, S, S) against the manifest's input
    size and the graph's outputs list, so that a mismatch is refused at load instead of failing in the
    engine mid-run. Only fixed dimensions are compared (a symbolic batch, or an output shape the export
    left open, passes); bytes onnx cannot parse are left to the engine, which reports them."""
    import onnx
    from google.protobuf.message import DecodeError

    try:
        g = onnx.load_model_from_string(graph.data).graph
    except DecodeError:
        return
    weights = {t.name for t in g.initializer}
    inputs = [i for i in g.input if i.name not in weights]
    for kind, info, want, why in (
            ("input", inputs[:1], (None, 1, size, size), f"manifest.json's input size {size} needs"),
            ("output", g.output[:1], (None, len(graph.outputs), size, size),
             f"manifest.json's input size {size} and outputs {list(graph.outputs)} need")):
        if not info or not info[0].type.tensor_type.HasField("shape"):
            continue
        dims = [d.dim_value if d.HasField("dim_value") else d.dim_param or "?"
                for d in info[0].type.tensor_type.shape.dim]
        if len(dims) != 4 or any(isinstance(d, int) and w is not None and d != w for d, w in zip(dims, want)):
            shape = "[" + ", ".join(map(str, dims)) + "]"
            raise XctrtError(f"{path}: {graph.file} {kind} {info[0].name!r} has shape {shape}, but {why} "
                             f"[N, {want[1]}, {size}, {size}]")


def write_package(out: Path, manifest: dict, files: dict[str, bytes]) -> Path:
    """Write a package folder (or .zip when out ends in .zip), filling in the sha256 of every file."""
    manifest = dict(manifest, format=FORMAT, files={n: hashlib.sha256(b).hexdigest() for n, b in files.items()})
    text = (json.dumps(manifest, indent=2, sort_keys=False) + "\n").encode()
    out = Path(out)
    if out.suffix == ".zip":
        buf = io.BytesIO()
        with zipfile.ZipFile(buf, "w", zipfile.ZIP_DEFLATED) as zf:
            zf.writestr("manifest.json", text)
            for n, b in files.items():
                zf.writestr(n, b)
        out.write_bytes(buf.getvalue())
    else:
        out.mkdir(parents=True, exist_ok=True)
        (out / "manifest.json").write_bytes(text)
        for n, b in files.items():
            (out / n).write_bytes(b)
    return out
