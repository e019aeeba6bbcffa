"""Model packages: the embedded default, write/load round trips, and every defect named clearly."""
from __future__ import annotations

import copy
import hashlib
import importlib.util
import io
import json
import shutil
import struct
import sys
import zipfile
from pathlib import Path

import pytest

from xctrt.errors import XctrtError
import xctrt.model
from xctrt.model import (DEFAULT_MODEL, EMBEDDED, EMBEDDED_MANIFEST_SHA256, FORMAT, load_package,
                         resolve_model_path, write_package)

REPO = Path(__file__).resolve().parents[1]
SHIPPED = REPO / "python" / "xctrt" / "models" / "untrained-tiny"


@pytest.fixture(scope="module")
def base(default_package):
    """(manifest without format/files, graph bytes) of the default package, to build variants from."""
    m = copy.deepcopy(default_package.manifest)
    m.pop("files")
    m.pop("format")
    return m, {g.file: g.data for g in default_package.graphs}


def _write(tmp_path, manifest, files, name="pkg"):
    return write_package(tmp_path / name, manifest, files)


def _expect_error(path, match):
    with pytest.raises(XctrtError, match=match) as e:
        load_package(path)
    assert str(path) in str(e.value), "the message must name the package"
    assert "\n" not in str(e.value)
    return str(e.value)


# ------------------------------------------------------------------ the default package


def test_untrained_package_loads_and_verifies(default_package):
    pkg = default_package  # conftest points 'default' at untrained-tiny via XCTRT_MODEL
    assert pkg.path == EMBEDDED / "untrained-tiny"
    assert pkg.manifest["format"] == FORMAT
    assert [(c.id, c.name, c.threshold) for c in pkg.classes] == [
        (1, "material", 0.5), (2, "pore", 0.5), (3, "inclusion", 0.5)]
    assert [pkg.classes[i].name for i in pkg.priority] == ["inclusion", "pore", "material"]
    assert (pkg.aggregation, pkg.input_mode, pkg.input_size, pkg.overlap, pkg.blend, pkg.pad) == (
        "priority", "tile", 256, 32, "ramp", "edge")
    assert pkg.window == {"mode": "percentile", "low": 0.5, "high": 99.5}
    assert pkg.trained is False
    [g] = pkg.graphs
    assert g.outputs == ("material", "pore", "inclusion")
    assert hashlib.sha256(g.data).hexdigest() == pkg.manifest["files"]["model.onnx"]
    assert g.data == (SHIPPED / "model.onnx").read_bytes()
    text = pkg.describe()
    assert "UNTRAINED" in text and "inclusion > pore > material > air" in text
    # what an integrator pins and checks: the manifest's hash, a readable window and graph size
    assert f"manifest    sha256 {hashlib.sha256((SHIPPED / 'manifest.json').read_bytes()).hexdigest()}" in text
    assert "window      percentiles 0.5 to 99.5 of the volume's grey values" in text
    assert f"({(SHIPPED / 'model.onnx').stat().st_size / 1e3:.1f} kB)" in text


@pytest.mark.parametrize("name", [None, "default"])
def test_default_names_follow_xctrt_model_else_the_shipped_package(name, monkeypatch):
    monkeypatch.setenv("XCTRT_MODEL", "untrained-tiny")
    assert resolve_model_path(name) == EMBEDDED / "untrained-tiny"
    monkeypatch.delenv("XCTRT_MODEL")
    assert resolve_model_path(name) == EMBEDDED / DEFAULT_MODEL
    assert resolve_model_path(DEFAULT_MODEL) == EMBEDDED / DEFAULT_MODEL


def test_shipped_default_is_the_trained_package_and_verifies():
    pkg = load_package(EMBEDDED / DEFAULT_MODEL)  # reads and hashes every file
    assert pkg.trained is True
    assert [c.name for c in pkg.classes] == ["material", "pore", "inclusion"]
    assert [pkg.classes[i].name for i in pkg.priority] == ["inclusion", "pore", "material"]
    m = pkg.manifest
    for key in ("backbone", "training_data", "recipe", "metrics"):
        assert m.get(key), key
    assert sum(len(g.data) for g in pkg.graphs) < 60e6


def test_embedded_manifest_pins_match_the_shipped_manifests():
    """Every embedded package has a pin and it is its manifest's sha256: a deliberate manifest change
    fails here until the pin in xctrt/model.py is updated with it."""
    shipped = {p.name: hashlib.sha256((p / "manifest.json").read_bytes()).hexdigest()
               for p in EMBEDDED.iterdir() if p.is_dir()}
    assert shipped == EMBEDDED_MANIFEST_SHA256


@pytest.fixture
def embedded_copy(tmp_path, monkeypatch):
    """A copy of the embedded untrained-tiny folder that the loader resolves embedded names in, so that
    damaging it leaves the real package alone; returns the copy's manifest path."""
    models = tmp_path / "models"
    shutil.copytree(SHIPPED, models / "untrained-tiny")
    monkeypatch.setattr(xctrt.model, "EMBEDDED", models)
    return models / "untrained-tiny" / "manifest.json"


def test_an_edited_embedded_manifest_is_refused(embedded_copy, monkeypatch, run_cli):
    assert load_package("untrained-tiny").path == embedded_copy.parent   # the copy, unedited, loads
    text = embedded_copy.read_text()
    assert text.count('"threshold": 0.5') == 3
    embedded_copy.write_text(text.replace('"threshold": 0.5', '"threshold": 0.4', 1))  # still a valid package
    assert load_package(embedded_copy.parent).classes[0].threshold == 0.4   # as a path: a user's own package
    msg = _expect_error("untrained-tiny", "manifest.json of the embedded package 'untrained-tiny' is not the one")
    assert EMBEDDED_MANIFEST_SHA256["untrained-tiny"][:12] in msg
    monkeypatch.setenv("XCTRT_MODEL", "untrained-tiny")
    with pytest.raises(XctrtError) as e:
        load_package("default")
    assert str(e.value) == msg
    code, _, err = run_cli("info")
    assert code == 2 and err.splitlines() == [f"xctrt: error: {msg}"]


def test_an_embedded_package_without_a_pin_is_refused(embedded_copy, monkeypatch):
    monkeypatch.delitem(EMBEDDED_MANIFEST_SHA256, "untrained-tiny")
    _expect_error("untrained-tiny", "pinned none")


def test_summary_records_the_manifest_sha256_of_a_user_package(tmp_path, phantom_volume):
    """A user package's manifest is not pinned: an edited threshold loads, and the run's summary.json
    tells the edited manifest from the shipped one (the graph hashes alone are the same for both)."""
    from xctrt.pipeline import Segmenter
    pkg = tmp_path / "pkg"
    shutil.copytree(SHIPPED, pkg)
    manifest = pkg / "manifest.json"
    manifest.write_text(manifest.read_text().replace('"threshold": 0.5', '"threshold": 0.4', 1))
    seg = Segmenter(pkg, backend="onnxruntime", progress=False)
    seg.segment(phantom_volume[:2, :64, :64], out_dir=tmp_path / "out")
    model = json.loads((tmp_path / "out" / "summary.json").read_text())["model"]
    assert model["manifest_sha256"] == hashlib.sha256(manifest.read_bytes()).hexdigest()
    assert model["manifest_sha256"] != EMBEDDED_MANIFEST_SHA256["untrained-tiny"]
    assert model["files_sha256"] == json.loads((SHIPPED / "manifest.json").read_text())["files"]


@pytest.mark.parametrize("name", [None, "default"])
def test_a_missing_package_named_by_xctrt_model_says_so(name, monkeypatch, run_cli):
    monkeypatch.setenv("XCTRT_MODEL", "bogus")
    with pytest.raises(XctrtError, match="bogus: model package not found") as e:
        load_package(name)
    msg = str(e.value)
    assert "environment variable XCTRT_MODEL" in msg and "untrained-tiny" in msg  # and what would be found
    code, _, err = run_cli("info")
    assert code == 2 and err.splitlines() == [f"xctrt: error: {msg}"]


def test_a_missing_package_given_by_name_does_not_blame_xctrt_model(monkeypatch, tmp_path):
    monkeypatch.setenv("XCTRT_MODEL", "untrained-tiny")
    assert "XCTRT_MODEL" not in _expect_error(tmp_path / "bogus", "model package not found")


def test_an_existing_path_wins_over_an_embedded_name(tmp_path, base, monkeypatch):
    _write(tmp_path, dict(base[0], name="local"), base[1], name=DEFAULT_MODEL)
    monkeypatch.chdir(tmp_path)
    assert load_package(DEFAULT_MODEL).name == "local"


# ------------------------------------------------------------------ round trips


def test_write_package_folder_round_trip(tmp_path, base):
    manifest, files = base
    out = _write(tmp_path, dict(manifest, name="copy", trained=True), files)
    assert sorted(p.name for p in out.iterdir()) == ["manifest.json", "model.onnx"]
    pkg = load_package(out)
    assert pkg.path == out and pkg.name == "copy" and pkg.trained
    assert pkg.graphs[0].data == files["model.onnx"]
    assert pkg.manifest["files"] == {"model.onnx": hashlib.sha256(files["model.onnx"]).hexdigest()}
    assert {k: v for k, v in pkg.manifest.items() if k not in ("files", "format", "name", "trained")} == {
        k: v for k, v in manifest.items() if k not in ("name", "trained")}
    assert "trained" in pkg.describe() and "UNTRAINED" not in pkg.describe()


def test_describe_lays_out_the_metrics_readably(tmp_path, base):
    manifest, files = base
    metrics = {"val_iou": {"material": 0.97061, "pore": 0.6972},
               "test_iou": {"test1": {"slices": 10, "iou_pore": 0.108, "truth_voxels": {"pore": 1104}},
                            "test5": {"slices": 10, "iou_inclusion": None}},
               "note": "word " * 40}
    text = load_package(_write(tmp_path, dict(manifest, metrics=metrics), files)).describe()
    lines = text.splitlines()
    at = lines.index("metrics")
    assert lines[at + 1:at + 5] == [
        "  val_iou    material 0.9706, pore 0.6972",   # plain values on one line, 4 significant digits
        "  test_iou",                                   # a mapping of mappings: one line per entry
        "    test1      slices 10, iou_pore 0.108, truth_voxels (pore 1104)",
        "    test5      slices 10, iou_inclusion -"]      # None: no value
    note = [ln for ln in lines[at + 5:] if ln.startswith("  note") or ln.startswith("             word")]
    assert len(note) >= 2 and all(len(ln) <= 100 for ln in note)   # long text wrapped under its key
    assert '{"' not in text.split("metrics", 1)[1].split("versions")[0]   # no raw JSON
    # metrics and versions are free-form: what is not a mapping is shown as it is
    for metrics, versions in [(None, None), ([{"iou": 0.5}], "torch 2"), ("see README", [1, 2])]:
        text = load_package(_write(tmp_path, dict(manifest, metrics=metrics, versions=versions), files,
                                   name=f"free{len(str(metrics))}")).describe()
        assert ("metrics     -" if metrics is None else f"metrics     {json.dumps(metrics)}") in text


def test_write_package_zip_round_trip(tmp_path, base, default_package):
    manifest, files = base
    out = write_package(tmp_path / "pkg.zip", manifest, files)
    assert zipfile.is_zipfile(out)
    assert sorted(zipfile.ZipFile(out).namelist()) == ["manifest.json", "model.onnx"]
    pkg = load_package(out)
    assert pkg.path == out
    assert pkg.graphs[0].data == files["model.onnx"]
    assert pkg.classes == default_package.classes and pkg.priority == default_package.priority


def test_zip_with_one_top_level_folder(tmp_path, base, default_package):
    manifest, files = base
    folder = _write(tmp_path, manifest, files, name="inner")
    z = tmp_path / "wrapped.zip"
    with zipfile.ZipFile(z, "w") as zf:
        zf.writestr("inner/", "")
        for f in folder.iterdir():
            zf.write(f, f"inner/{f.name}")
    pkg = load_package(z)
    assert pkg.graphs[0].data == files["model.onnx"]
    assert pkg.classes == default_package.classes


def test_package_copy_of_the_shipped_folder_loads(tmp_path):
    dst = tmp_path / "copy"
    shutil.copytree(SHIPPED, dst)
    assert load_package(dst).manifest == load_package("default").manifest


# ------------------------------------------------------------------ defects


def test_unreadable_file_in_a_package_folder(tmp_path, monkeypatch):
    """No permission or an I/O error on a package file: one error naming the file (tests run as root,
    where chmod does not stop a read, so the read itself fails here)."""
    dst = tmp_path / "copy"
    shutil.copytree(SHIPPED, dst)
    real = Path.read_bytes

    def read_bytes(self):
        if self.name == "model.onnx":
            raise PermissionError(13, "Permission denied", str(self))
        return real(self)
    monkeypatch.setattr(Path, "read_bytes", read_bytes)
    _expect_error(dst, r"cannot read model.onnx \(Permission denied\)")


def test_missing_path(tmp_path):
    _expect_error(tmp_path / "nope", "not found")


def test_not_a_zip(tmp_path):
    p = tmp_path / "pkg.zip"
    p.write_bytes(b"PK\x03\x04 but not really a zip")
    _expect_error(p, "neither a folder nor a valid .zip")


def test_missing_manifest(tmp_path):
    (tmp_path / "pkg").mkdir()
    _expect_error(tmp_path / "pkg", "missing manifest.json")


def test_missing_manifest_in_zip(tmp_path):
    z = tmp_path / "pkg.zip"
    with zipfile.ZipFile(z, "w") as zf:
        zf.writestr("model.onnx", b"x")
    _expect_error(z, "missing manifest.json")


@pytest.mark.parametrize("text", [b"{not json", b"\xff\xfe\x00garbage", b""])
def test_invalid_json(tmp_path, base, text):
    p = _write(tmp_path, *base)
    (p / "manifest.json").write_bytes(text)
    _expect_error(p, "not valid JSON")


@pytest.mark.parametrize("fmt", ["xctrt-model/2", "", None])
def test_wrong_format_string(tmp_path, base, fmt):
    p = _write(tmp_path, *base)
    m = json.loads((p / "manifest.json").read_text())
    if fmt is None:
        del m["format"]
    else:
        m["format"] = fmt
    (p / "manifest.json").write_text(json.dumps(m))
    msg = _expect_error(p, "unsupported model package format")
    assert FORMAT in msg


def test_manifest_that_is_not_an_object(tmp_path, base):
    p = _write(tmp_path, *base)
    (p / "manifest.json").write_text("[1, 2]")
    _expect_error(p, "unsupported model package format 'list'")


def test_missing_graph_file(tmp_path, base):
    p = _write(tmp_path, *base)
    (p / "model.onnx").unlink()
    _expect_error(p, "missing model.onnx")


def test_missing_graph_file_in_zip(tmp_path, base):
    manifest, files = base
    folder = _write(tmp_path, manifest, files)
    z = tmp_path / "pkg.zip"
    with zipfile.ZipFile(z, "w") as zf:
        zf.write(folder / "manifest.json", "manifest.json")
    _expect_error(z, "missing model.onnx")


@pytest.mark.parametrize("where", [0, 100, -1])
def test_tampered_graph(tmp_path, base, where):
    p = _write(tmp_path, *base)
    data = bytearray((p / "model.onnx").read_bytes())
    data[where] ^= 0x01
    (p / "model.onnx").write_bytes(bytes(data))
    msg = _expect_error(p, "sha256")
    assert "model.onnx" in msg


def test_tampered_graph_in_zip(tmp_path, base):
    manifest, files = base
    z = write_package(tmp_path / "pkg.zip", manifest, files)
    bad = bytearray(files["model.onnx"])
    bad[50] ^= 0xFF
    with zipfile.ZipFile(z) as zin:
        man = zin.read("manifest.json")
    with zipfile.ZipFile(z, "w") as zout:
        zout.writestr("manifest.json", man)
        zout.writestr("model.onnx", bytes(bad))
    _expect_error(z, "sha256")


def _member_data(data: bytes, name: str) -> tuple[int, int]:
    """(offset, length) of a zip member's stored bytes: after its local header's name and extra field."""
    info = zipfile.ZipFile(io.BytesIO(data)).getinfo(name)
    name_len, extra_len = struct.unpack("<HH", data[info.header_offset + 26:info.header_offset + 30])
    return info.header_offset + 30 + name_len + extra_len, info.compress_size


@pytest.mark.parametrize("member", ["manifest.json", "model.onnx"])
@pytest.mark.parametrize("damage, error", [("flip", "Bad CRC-32"),                 # deflate stream still decodes
                                           ("zero", "error: Error -3"),            # zlib.error: not deflate data
                                           ("encrypt", "RuntimeError")])            # flagged as encrypted
def test_zip_with_damaged_member_data(tmp_path, member, damage, error):
    """The central directory is intact, so the zip opens; reading the member fails. Before: BadZipFile /
    zlib.error escaped as an internal error (exit 3)."""
    z = tmp_path / "pkg.zip"
    with zipfile.ZipFile(z, "w", zipfile.ZIP_DEFLATED) as zf:
        for f in sorted(SHIPPED.iterdir()):
            zf.write(f, f.name)
    data = bytearray(z.read_bytes())
    at, n = _member_data(bytes(data), member)
    if damage == "flip":
        data[at + n // 2] ^= 0x01
    elif damage == "zero":
        data[at:at + n] = bytes(n)
    else:   # general-purpose flag bit 0 in the member's central directory entry (name at +46)
        entry = data.index(b"PK\x01\x02")
        while data[entry + 46:entry + 46 + struct.unpack_from("<H", data, entry + 28)[0]] != member.encode():
            entry = data.index(b"PK\x01\x02", entry + 4)
        data[entry + 8] |= 0x01
    z.write_bytes(bytes(data))
    msg = _expect_error(z, f"cannot read {member} from the zip")
    assert error in msg


def test_graph_without_a_sha256(tmp_path, base):
    p = _write(tmp_path, *base)
    m = json.loads((p / "manifest.json").read_text())
    m["files"] = {}
    (p / "manifest.json").write_text(json.dumps(m))
    _expect_error(p, "model.onnx has no sha256")


@pytest.mark.parametrize("outputs", [
    ["material", "pore"],                              # a class without a channel
    ["material", "pore", "inclusion", "crack"],        # a channel without a class
    ["material", "pore", "pore"],                      # a channel twice
])
def test_outputs_not_matching_classes(tmp_path, base, outputs):
    manifest, files = base
    m = copy.deepcopy(manifest)
    m["graphs"][0]["outputs"] = outputs
    _expect_error(_write(tmp_path, m, files), "do not match the classes")


@pytest.mark.parametrize("priority", [["pore", "material"], ["pore", "pore", "material"],
                                      ["inclusion", "pore", "material", "air"]])
def test_bad_priority(tmp_path, base, priority):
    manifest, files = base
    _expect_error(_write(tmp_path, dict(manifest, priority=priority), files), "priority")


def test_bad_aggregation(tmp_path, base):
    manifest, files = base
    _expect_error(_write(tmp_path, dict(manifest, aggregation="vote"), files), "aggregation must be one of")


@pytest.mark.parametrize("change", [
    {"mode": "crop"}, {"blend": "gauss"}, {"pad": "reflect"}, {"overlap": 256}, {"overlap": -1}])
def test_bad_input_section(tmp_path, base, change):
    manifest, files = base
    m = dict(manifest, input=dict(manifest["input"], **change))
    _expect_error(_write(tmp_path, m, files), "bad input section")


@pytest.mark.parametrize("inp", [{}, {"size": "big"}, None])
def test_malformed_input_section(tmp_path, base, inp):
    manifest, files = base
    m = dict(manifest)
    if inp is None:
        del m["input"]
    else:
        m["input"] = inp
    _expect_error(_write(tmp_path, m, files), "incomplete or malformed")


def test_input_size_not_matching_the_graph(tmp_path, base):
    """The shipped graph takes 256x256 tiles; before, a manifest saying 128 loaded and ONNX Runtime failed
    mid-run with InvalidArgument (an internal error)."""
    manifest, files = base
    m = dict(manifest, input=dict(manifest["input"], size=128))
    msg = _expect_error(_write(tmp_path, m, files), "model.onnx input 'image' has shape")
    assert "[batch, 1, 256, 256]" in msg and "input size 128 needs [N, 1, 128, 128]" in msg


def test_class_count_not_matching_the_graph_channels(tmp_path, base):
    """Graph outputs 3 channels, the manifest maps 2 classes onto it."""
    manifest, files = base
    m = copy.deepcopy(manifest)
    m["classes"] = m["classes"][:2]
    m["priority"] = ["pore", "material"]
    m["graphs"][0]["outputs"] = ["material", "pore"]
    msg = _expect_error(_write(tmp_path, m, files), "model.onnx output 'probs' has shape")
    assert "[batch, 3, 256, 256]" in msg and "need [N, 2, 256, 256]" in msg


@pytest.mark.parametrize("window", [{"mode": "auto", "low": 0, "high": 1}, {"mode": "fixed", "low": 5, "high": 5}])
def test_bad_intensity_window(tmp_path, base, window):
    manifest, files = base
    _expect_error(_write(tmp_path, dict(manifest, intensity_window=window), files), "bad intensity_window")


@pytest.mark.parametrize("ids", [(0, 2, 3), (1, 1, 3), (1, 2, 256)])
def test_bad_class_ids(tmp_path, base, ids):
    manifest, files = base
    m = copy.deepcopy(manifest)
    for c, i in zip(m["classes"], ids):
        c["id"] = i
    _expect_error(_write(tmp_path, m, files), "class ids")


def _set(where: str, value):
    """A manifest edit: where is a dotted path ("classes.0.threshold"), value the new value."""
    def edit(m):
        *keys, last = [int(k) if k.isdigit() else k for k in where.split(".")]
        for k in keys:
            m = m[k]
        m[last] = value
    return edit


@pytest.mark.parametrize("edit, match", [
    # each loaded before and ran with a silently different meaning, or failed mid-run (internal error)
    (_set("classes.0.threshold", 1.5), "class 'material' threshold must be a probability .* not 1.5"),
    (_set("classes.0.threshold", -0.1), "threshold must be a probability"),
    (_set("classes.0.threshold", float("nan")), "threshold must be a probability .* not nan"),
    (_set("classes.1.id", 2.7), "class 'pore' id must be a whole number, not 2.7"),           # was id 2
    (_set("classes.0.id", True), "class 'material' id must be a whole number, not True"),
    (_set("input.size", float("inf")), "input size must be a whole number"),                   # OverflowError
    (_set("input.overlap", 32.7), "input overlap must be a whole number"),
    (lambda m: m["classes"].append({"id": 9, "name": "pore", "threshold": 0.1}),              # pore was id 9
     "class names must be distinct"),
    (lambda m: m.update(classes=[], priority=[], graphs=[]), "the package has no classes"),     # IndexError
    (_set("intensity_window", {"mode": "percentile", "low": -5, "high": 99.5}), "bad intensity_window"),
    (_set("intensity_window", {"mode": "percentile", "low": 0.5, "high": 150}), "bad intensity_window"),
    (_set("intensity_window", {"mode": "fixed", "low": 0, "high": float("inf")}), "bad intensity_window"),
    (_set("intensity_window", [0, 1]), "bad intensity_window"),                                 # AttributeError
    (_set("trained", "false"), "trained must be true or false, not 'false'"),                   # read as trained
])
def test_manifest_values_out_of_range(tmp_path, base, edit, match):
    m = copy.deepcopy(base[0])
    edit(m)
    _expect_error(_write(tmp_path, m, base[1]), match)


# ------------------------------------------------------------------ the shipped package is reproducible


def test_regenerating_the_untrained_package_is_byte_identical(tmp_path, monkeypatch, capsys):
    pytest.importorskip("onnx")
    script = REPO / "training" / "make_untrained_model.py"
    monkeypatch.setattr(sys, "path", list(sys.path))  # the script prepends the repo's python/ folder
    spec = importlib.util.spec_from_file_location("_make_untrained_model", script)
    mod = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(mod)
    out = tmp_path / "regenerated"
    mod.main([str(out)])
    assert "wrote" in capsys.readouterr().out
    for name in ("model.onnx", "manifest.json"):
        assert (out / name).read_bytes() == (SHIPPED / name).read_bytes(), name
    assert load_package(out).graphs[0].data == load_package("default").graphs[0].data
