"""Volume input and label output.

Inputs are read slab by slab (TIFF pages, a memory map, or one file per slice), never as
a whole unless the caller asks, so a volume larger than RAM still segments. Outputs are
written to a temporary file beside the target and renamed into place only when complete.
"""
from __future__ import annotations

import json
import logging
import os
import re
import secrets
import stat
import tempfile
import time
import xml.etree.ElementTree as ET
from contextlib import contextmanager
from pathlib import Path
from typing import Iterable, Iterator

import numpy as np
import tifffile

from .cpus import usable_cpus
from .errors import XctrtError

KERNEL_DTYPES = (np.uint8, np.uint16, np.float32)  # what the C++ kernels take without a copy
SLICE_SUFFIXES = (".tif", ".tiff", ".png")
TIFF_SUFFIXES = (".tif", ".tiff", ".btf", ".tf8")   # volumes open_volume reads as TIFF
_UNIT_TO_MM = {"mm": 1.0, "millimeter": 1.0, "µm": 1e-3, "um": 1e-3, "micron": 1e-3, "micrometer": 1e-3,
               "\\u00B5m": 1e-3, "nm": 1e-6, "cm": 10.0, "m": 1e3}


def _kernel_dtype(dtype: np.dtype, path: Path) -> np.dtype:
    dtype = np.dtype(dtype)
    if dtype in [np.dtype(d) for d in KERNEL_DTYPES]:
        return dtype
    if dtype.kind in "iu" or dtype.kind == "f" and dtype.itemsize <= 8:
        return np.dtype(np.float32)  # int16/int32/int64 (numpy's default)/float64 scans: converted slab by slab
    raise XctrtError(f"{path}: unsupported voxel type {dtype}; expected an integer or float grey-value volume")


class VolumeSource:
    """A 3D grey-value volume (Z, Y, X) that can be read in slabs of consecutive slices."""

    def __init__(self, path: Path, shape: tuple[int, int, int], file_dtype: np.dtype,
                 voxel_size: tuple[float, float, float] | None):
        self.path = path
        self.shape = tuple(int(s) for s in shape)
        self.file_dtype = np.dtype(file_dtype)
        self.dtype = _kernel_dtype(self.file_dtype, path)
        self.voxel_size = voxel_size  # (dz, dy, dx) in mm, or None when the file does not say
        self.voxel_size_note: str | None = None   # why metadata the file has gave no voxel size
        if len(self.shape) != 3:
            raise XctrtError(f"{path}: expected a 3D volume (Z, Y, X), got shape {self.shape}")
        if min(self.shape) == 0:
            raise XctrtError(f"{path}: the volume is empty (shape {self.shape})")

    def _read(self, z0: int, z1: int) -> np.ndarray:  # pragma: no cover - abstract
        raise NotImplementedError

    def read(self, z0: int, z1: int) -> np.ndarray:
        """Slices z0..z1-1 as a C-contiguous array of a kernel dtype; NaN/inf is an error."""
        try:
            slab = self._read(z0, z1)
        except XctrtError:
            raise
        except Exception as exc:  # tifffile/PIL/numpy raise many types for damaged files
            raise XctrtError(f"{self.path}: cannot read slices {z0}-{z1 - 1}; the file is truncated or corrupt "
                             f"({type(exc).__name__}: {exc})") from exc
        slab = np.ascontiguousarray(slab, dtype=self.dtype)
        if slab.shape != (z1 - z0,) + self.shape[1:]:
            raise XctrtError(f"{self.path}: slices {z0}-{z1 - 1} have shape {slab.shape[1:]}, "
                             f"expected {self.shape[1:]}")
        if slab.dtype.kind == "f" and not np.isfinite(slab).all():
            bad = int(np.argwhere(~np.isfinite(slab))[0][0]) + z0
            raise XctrtError(f"{self.path}: slice {bad} contains NaN or infinite values")
        return slab

    def slabs(self, depth: int) -> Iterator[tuple[int, np.ndarray]]:
        for z0 in range(0, self.shape[0], depth):
            z1 = min(z0 + depth, self.shape[0])
            yield z0, self.read(z0, z1)

    def sample_slices(self, count: int = 16) -> np.ndarray:
        """Evenly spaced slices, for intensity percentiles without reading the whole volume."""
        zs = np.unique(np.linspace(0, self.shape[0] - 1, min(count, self.shape[0])).round().astype(int))
        return np.stack([self.read(int(z), int(z) + 1)[0] for z in zs])

    def close(self) -> None:
        pass

    def __enter__(self):
        return self

    def __exit__(self, *exc):
        self.close()


class ArraySource(VolumeSource):
    """An in-memory (or memory-mapped) array, e.g. from a plant pipeline or a .npy file."""

    def __init__(self, array: np.ndarray, path: Path | str = "<array>",
                 voxel_size: tuple[float, float, float] | None = None):
        while array.ndim > 3 and array.shape[0] == 1:   # leading batch/channel axes of 1, as TIFF's are squeezed
            array = array[0]
        self.array = array
        super().__init__(Path(path), array.shape, array.dtype, voxel_size)

    def _read(self, z0, z1):
        return self.array[z0:z1]


class _Collect(logging.Handler):
    """Keeps tifffile's log records: it logs, rather than raises, where the chain of pages breaks
    (a file cut at a page boundary then reads as a shorter volume), and they must not reach stderr."""

    def __init__(self):
        super().__init__(logging.WARNING)
        self.messages: list[str] = []

    def emit(self, record):
        self.messages.append(record.getMessage())


_BROKEN_CHAIN = ("invalid page offset", "invalid offset to page", "corrupted tag list")


class TiffSource(VolumeSource):
    def __init__(self, path: Path):
        log, logger = _Collect(), logging.getLogger("tifffile")
        logger.addHandler(log)
        try:
            self.tif = tifffile.TiffFile(path)
            series = self.tif.series[0]
            shape = tuple(series.shape)
            dtype = series.dtype
            len(self.tif.pages)  # follows the whole chain of pages
        except Exception as exc:
            raise XctrtError(f"{path}: not a readable TIFF ({type(exc).__name__}: {exc})") from exc
        finally:
            logger.removeHandler(log)
        try:  # any rejection below must not leave the file open
            broken = [m for m in log.messages if any(s in m for s in _BROKEN_CHAIN)]
            if broken:   # tifffile's log line starts with its object's repr: keep only what went wrong
                detail = re.sub(r"^<[^>]*>\s*", "", broken[0])
                raise XctrtError(f"{path}: the file is truncated or corrupt ({detail})")
            _refuse_palette(series.keyframe, path)
            if series.keyframe.samplesperpixel > 1:
                raise XctrtError(f"{path}: is a {series.keyframe.samplesperpixel}-channel image {shape} (colour or "
                                 "samples per pixel); xctrt needs one grey value per voxel, one page per slice")
            if len(shape) == 2:
                if not (self.tif.is_ome or self.tif.is_imagej):
                    raise XctrtError(f"{path}: is a single 2D image {shape}; xctrt needs a 3D volume (a multi-page "
                                     "TIFF or a folder of slices; a folder holding just this image is a volume of "
                                     "one slice)")
                shape = (1,) + shape   # OME and ImageJ state a Z size; tifffile squeezes Z = 1 away
            squeezed = tuple(s for s in shape if s != 1) if len(shape) > 3 else shape
            if len(squeezed) != 3:
                raise XctrtError(f"{path}: has shape {shape} (axes {series.axes}); expected one grey-value volume (Z, Y, X)")
            self.series = series
            vs, note = _tiff_voxel_size(self.tif)
            super().__init__(path, squeezed, dtype, vs)
            self.voxel_size_note = note
            if len(series.pages) != self.shape[0] and len(shape) == 3:
                raise XctrtError(f"{path}: has {len(series.pages)} readable pages for {self.shape[0]} slices; "
                                 "the file is truncated or corrupt")
        except BaseException:
            self.tif.close()
            raise

    def _read(self, z0, z1):
        # Plain page reads, never a memory map: mapped pages would count against the process's
        # resident memory until unmapped, and volumes may be larger than RAM.
        return self.tif.asarray(key=range(z0, z1), series=0).reshape((z1 - z0,) + self.shape[1:])

    def close(self):
        self.tif.close()


class NpySource(VolumeSource):
    """A .npy volume read slab by slab with file reads (no memory map, see TiffSource._read)."""

    def __init__(self, path: Path):
        try:
            with open(path, "rb") as fh:
                magic = fh.read(6)
            header = np.load(path, mmap_mode="r") if magic == b"\x93NUMPY" else None  # header only, no page
        except Exception as exc:
            if "Python objects" in str(exc):   # numpy's words for an object array (pickled payload)
                raise XctrtError(f"{path}: holds Python objects, not numbers; xctrt will not load them") from None
            raise XctrtError(f"{path}: not a readable .npy file ({type(exc).__name__}: {exc})") from exc
        if header is None:   # np.load would try to unpickle it and talk of allow_pickle
            raise XctrtError(f"{path}: not a NumPy array file (no .npy header); xctrt loads no pickled "
                             "Python objects")
        shape, dtype, self.offset = header.shape, header.dtype, header.offset
        fortran = header.ndim > 1 and not header.flags.c_contiguous
        del header
        if len(shape) != 3:
            raise XctrtError(f"{path}: expected a 3D volume (Z, Y, X), got shape {shape}")
        if fortran or dtype.hasobject:
            raise XctrtError(f"{path}: Fortran-ordered or object .npy files are not supported; save with np.save "
                             "from a C-ordered numeric array")
        super().__init__(path, shape, dtype, None)
        expected = self.offset + int(np.prod(shape)) * dtype.itemsize
        if path.stat().st_size < expected:
            raise XctrtError(f"{path}: file is truncated ({path.stat().st_size} of {expected} bytes)")

    def _read(self, z0, z1):
        plane = self.shape[1] * self.shape[2]
        with open(self.path, "rb") as fh:
            fh.seek(self.offset + z0 * plane * self.file_dtype.itemsize)
            data = np.fromfile(fh, dtype=self.file_dtype, count=(z1 - z0) * plane)
        return data.reshape((z1 - z0,) + self.shape[1:])


class SliceFolderSource(VolumeSource):
    """A folder of 2D TIFF or PNG slices, in natural sort order of their names; every slice must have
    the first one's type and size (a 16-bit slice among 8-bit ones would be cast and wrap)."""

    def __init__(self, path: Path):
        files = [p for p in path.iterdir() if p.suffix.lower() in SLICE_SUFFIXES and p.is_file()]
        if not files:
            raise XctrtError(f"{path}: folder holds no .tif/.tiff/.png slices")
        files.sort(key=lambda p: [int(t) if t.isdigit() else t for t in re.split(r"(\d+)", p.name)])
        self.files = files
        first = self._read_file(files[0])
        if first.ndim != 2:
            raise XctrtError(f"{files[0]}: slice has shape {first.shape}; expected a 2D grey-value image")
        super().__init__(path, (len(files),) + first.shape, first.dtype, None)

    @staticmethod
    def _read_file(p: Path) -> np.ndarray:
        try:
            if p.suffix.lower() != ".png":
                with tifffile.TiffFile(p) as tif:
                    _refuse_palette(tif.pages.first, p)
                    return tif.asarray()
            from PIL import Image
            with Image.open(p) as im:
                if im.mode not in ("P", "PA"):
                    return np.asarray(im)
                # a palette PNG holds indices into its palette: the grey values are the palette's
                rgb = np.asarray(im.convert("RGB"))
        except XctrtError:
            raise
        except Exception as exc:
            raise XctrtError(f"{p}: cannot read slice ({type(exc).__name__}: {exc})") from exc
        if not ((rgb[..., 0] == rgb[..., 1]) & (rgb[..., 1] == rgb[..., 2])).all():
            raise XctrtError(f"{p}: is a colour palette image; xctrt needs grey-value slices")
        return np.ascontiguousarray(rgb[..., 0])

    def _read(self, z0, z1):
        out = []
        for p in self.files[z0:z1]:
            out.append(self._read_file(p))
            if out[-1].dtype != self.file_dtype or out[-1].shape != self.shape[1:]:
                raise XctrtError(f"{p}: slice is {out[-1].dtype} {out[-1].shape}, but the first slice "
                                 f"{self.files[0].name} is {self.file_dtype} {self.shape[1:]}; all slices "
                                 "need the same type and size")
        return np.stack(out)


def _refuse_palette(page, path: Path) -> None:
    """A palette TIFF's pixels are indices into a colour table, not grey values."""
    if page.photometric == tifffile.PHOTOMETRIC.PALETTE:
        raise XctrtError(f"{path}: is a palette (indexed colour) TIFF; xctrt needs grey values")


def _tiff_voxel_size(tif: tifffile.TiffFile) -> tuple[tuple[float, float, float] | None, str | None]:
    """(dz, dy, dx) in mm from OME or ImageJ metadata, else None; and, when the file has such metadata
    but it gives no complete size, why (so the run can say so rather than silently count voxels)."""
    try:
        if tif.is_ome and tif.ome_metadata:
            root = ET.fromstring(tif.ome_metadata)
            pixels = next(el for el in root.iter() if el.tag.endswith("Pixels"))
            sizes = []
            for ax in "ZYX":
                v = pixels.get(f"PhysicalSize{ax}")
                unit = pixels.get(f"PhysicalSize{ax}Unit", "µm")
                if v is None:
                    given = [a for a in "ZYX" if pixels.get(f"PhysicalSize{a}") is not None]
                    return None, (f"the OME metadata gives PhysicalSize{'/'.join(given)} but not {ax}" if given
                                  else None)
                if unit not in _UNIT_TO_MM:
                    return None, f"the OME metadata's PhysicalSize{ax}Unit {unit!r} is not a length xctrt knows"
                sizes.append(float(v) * _UNIT_TO_MM[unit])
            return tuple(sizes), None
        ij = tif.imagej_metadata
        if ij and "spacing" in ij:
            unit = str(ij.get("unit", "")).replace("\\u00B5", "µ")
            scale = _UNIT_TO_MM.get(unit)
            tags = tif.pages[0].tags
            if scale is None:
                return None, f"the ImageJ metadata's unit {unit!r} is not a length xctrt knows"
            if "XResolution" not in tags:
                return None, "the ImageJ metadata gives a slice spacing but the file no X/Y resolution"
            xr = tags["XResolution"].value
            yr = tags["YResolution"].value
            return (float(ij["spacing"]) * scale, yr[1] / yr[0] * scale, xr[1] / xr[0] * scale), None
    except (StopIteration, ET.ParseError, KeyError, ZeroDivisionError, ValueError, TypeError) as exc:
        return None, f"its voxel-size metadata cannot be read ({type(exc).__name__})"
    return None, None


def open_volume(path: str | os.PathLike) -> VolumeSource:
    """Open a multi-page/Big/OME-TIFF, a folder of TIFF/PNG slices, or a .npy volume."""
    path = Path(path)
    if not path.exists():
        raise XctrtError(f"{path}: no such file or folder")
    if path.is_dir():
        return SliceFolderSource(path)
    if path.stat().st_size == 0:
        raise XctrtError(f"{path}: the file is empty (0 bytes)")
    if path.suffix.lower() == ".npy":
        return NpySource(path)
    if path.suffix.lower() in TIFF_SUFFIXES:
        return TiffSource(path)
    raise XctrtError(f"{path}: unknown volume format; use a TIFF stack, a folder of TIFF/PNG slices or a .npy file")


# ----------------------------------------------------------------------------- output


class StagedOutputs:
    """Files written under hidden temporary names in one folder and renamed into place together,
    in the order given, only by commit(); discard() (or leaving the block with an error) removes
    them, so a failed run never leaves a file that looks complete.

    create=True makes the folder first and proves it writable (check_output_dir), before any work;
    discard() then also removes the folders it made, if still empty, so a failed run leaves no
    empty output folder behind either. The names in `order` are checked at once too (check_target),
    so a folder or a device in the way stops the run before its work, not at commit."""

    def __init__(self, out_dir: Path, order: Iterable[str] = (), create: bool = False):
        self.out_dir = Path(out_dir)
        self.order = list(order)
        self.tmp: dict[str, Path] = {}
        # temporary names unique to this run, not just this process: two runs into one folder from
        # two threads must not write, rename or remove each other's files
        self.token = f"{os.getpid()}.{secrets.token_hex(4)}"
        self.made = check_output_dir(self.out_dir) if create else []
        try:
            for name in self.order:
                check_target(self.out_dir / name)
        except XctrtError:
            self.discard()
            raise

    def path(self, name: str) -> Path:
        p = self.out_dir / f".{name}.{self.token}.partial"
        self.tmp[name] = p
        return p

    @contextmanager
    def write(self, name: str) -> Iterator[Path]:
        """The temporary path to write `name` to; an OSError while writing it (a full disk, the file
        size limit, no permission) becomes an XctrtError naming the output file."""
        tmp = self.path(name)
        try:
            yield tmp
        except OSError as exc:
            raise XctrtError(f"{self.out_dir / name}: cannot write ({exc.strerror or exc})") from exc

    def commit(self) -> dict[str, Path]:
        names = [n for n in self.order if n in self.tmp] + [n for n in self.tmp if n not in self.order]
        done = {}
        earlier: dict[Path, Path] = {}   # target -> a hard link to the file it replaced, until the set is in
        try:
            with _folder_lock(self.out_dir):   # runs committing into one folder take turns: one whole set wins
                for name in names:   # every target first: a refused one must not leave the others half replaced
                    check_target(self.out_dir / name)
                for name in names:
                    target = self.out_dir / name
                    if os.path.lexists(target):
                        keep = self.out_dir / f".{name}.{self.token}.earlier"
                        try:
                            os.link(target, keep, follow_symlinks=False)
                            earlier[target] = keep
                        except OSError:   # no hard links on this file system: that file cannot be put back
                            pass
                    try:
                        os.replace(self.tmp[name], target)
                    except OSError as exc:
                        raise XctrtError(f"{target}: cannot write ({exc.strerror or exc})") from exc
                    del self.tmp[name]   # only once renamed: until then discard() must remove it
                    done[name] = target
        except BaseException:
            # a rename failed, or Ctrl-C/SIGTERM came between two: put the earlier results back, so the
            # folder never holds part of this run's set beside part of the one before
            for target in done.values():
                if target not in earlier:
                    _unlink_quietly(target)
                    continue
                try:
                    os.replace(earlier.pop(target), target)
                except OSError:
                    pass
            self.discard()
            raise
        finally:
            for keep in earlier.values():
                _unlink_quietly(keep)
        self.made = []   # the folders now hold results: they stay
        return done

    def discard(self) -> None:
        for p in self.tmp.values():
            _unlink_quietly(p)
        self.tmp.clear()
        _remove_empty(self.made)
        self.made = []

    def __enter__(self):
        return self

    def __exit__(self, exc_type, *exc):
        if exc_type is None:
            self.commit()   # discards what is left itself if it fails
        else:
            self.discard()


def _unlink_quietly(p: Path) -> None:
    """Cleanup runs while an error is on its way: a file that cannot be removed must never replace it."""
    try:
        p.unlink(missing_ok=True)
    except OSError:
        pass


@contextmanager
def _folder_lock(folder: Path, wait_s: float = 5.0) -> Iterator[None]:
    """An exclusive flock on the folder itself (no lock file left behind), across threads and processes.
    Our commits hold it for milliseconds; a holder that keeps it past wait_s is not one of them (say
    `flock OUT xctrt ...` around the whole run), so the commit then goes ahead without it. Where the
    platform or file system has no flock, no lock."""
    try:
        import fcntl
        fd = os.open(folder, os.O_RDONLY)
    except (ImportError, OSError):
        yield
        return
    try:
        deadline = time.monotonic() + wait_s
        while True:
            try:
                fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
                break
            except BlockingIOError:
                if time.monotonic() > deadline:
                    break
                time.sleep(0.01)
            except OSError:
                break
        yield
    finally:
        os.close(fd)   # releases the lock


def check_target(target: Path) -> None:
    """Refuse an output name held by a folder or by anything but a regular file (after following
    symlinks): renaming over it would replace a device such as /dev/null or /dev/stdout, a pipe or a
    socket with a plain file. A missing name, or a (link to a) regular file, is fine."""
    try:
        st = os.stat(target)
    except FileNotFoundError:
        return   # free (a dangling symlink is replaced, as a link to a file would be)
    except OSError as exc:
        raise XctrtError(f"{target}: cannot write the output here ({exc.strerror or exc})") from exc
    if stat.S_ISDIR(st.st_mode):
        raise XctrtError(f"{target}: is a folder; xctrt will not replace it with an output file")
    if not stat.S_ISREG(st.st_mode):
        raise XctrtError(f"{target}: exists and is not a regular file (a device, pipe or socket); "
                         "xctrt will not replace it with an output file")


def write_json(path: Path, obj, rows_key: str | None = None) -> None:
    """obj as indented JSON. rows_key names an item of the dict obj holding a long list of short
    lists (a run's timeline): it is written last, one row per line, not one number per line."""
    if rows_key is None:
        path.write_text(json.dumps(obj, indent=2, default=_json_default) + "\n")
        return
    rest = {k: v for k, v in obj.items() if k != rows_key}
    body = ",\n".join("    " + json.dumps(r, default=_json_default) for r in obj[rows_key])
    head = json.dumps(rest, indent=2, default=_json_default)
    head = head[:-2] + ",\n" if rest else "{\n"
    path.write_text(head + f"  {json.dumps(rows_key)}: [\n{body}\n  ]\n}}\n")


def commit_json(staged: StagedOutputs, obj) -> Path:
    """Write obj as JSON into the one file `staged` (from output_file) holds, rename it into place
    and return its path."""
    (name,) = staged.order
    with staged, staged.write(name) as tmp:
        write_json(tmp, obj)
    return staged.out_dir / name


def _json_default(o):
    if isinstance(o, np.generic):
        return o.item()
    if isinstance(o, np.ndarray):
        return o.tolist()
    raise TypeError(f"not JSON serialisable: {type(o).__name__}")


def ome_metadata(voxel_size: tuple[float, float, float] | None) -> dict:
    md = {"axes": "ZYX"}
    if voxel_size is not None:
        for ax, v in zip("ZYX", voxel_size):
            md[f"PhysicalSize{ax}"] = float(v)
            md[f"PhysicalSize{ax}Unit"] = "mm"
    return md


ROWS_PER_STRIP = 64   # the compressed strips' height: a page's strips are compressed in parallel threads
BATCH_BYTES = 64 * 2 ** 20   # the pages compressed together by default


def write_volume_tiff(target: Path, pages: Iterable[np.ndarray], shape: tuple[int, int, int], dtype,
                      voxel_size: tuple[float, float, float] | None, compression: str | None = "zlib",
                      batch_pages: int | None = None) -> None:
    """Write a compressed OME-TIFF page by page from an iterator (stage it with StagedOutputs).

    zlib at level 1: label volumes still shrink ~6× (level 6: ~8.6×) at ~3× the speed, which keeps
    the writer ahead of a GPU producing 100+ slices/s. The strips of `batch_pages` pages (default: 64 MiB
    of them) are compressed together as soon as those pages have come; a streamed volume passes the
    pages it hands over at a time. tifffile's own default gathers 512 MiB of strips before compressing
    any (368 pages of 1200²): nothing was written before then, each batch was thousands of compressions
    queued at once on 8 threads (where a GPU run's timelines show their longest stalls), and the last
    batch was compressed only after the last page had come (benchmarks/RESULTS.md, "An eighth pass")."""
    extra = {}
    if compression == "zlib":
        rows = min(ROWS_PER_STRIP, shape[1])
        page_strips = -(-shape[1] // rows)
        strip_bytes = rows * int(np.prod(shape[2:])) * np.dtype(dtype).itemsize
        if batch_pages is None:
            batch_pages = max(1, BATCH_BYTES // (page_strips * strip_bytes))
        # tifffile compresses buffersize // strip_bytes strips at a time: whole pages, batch_pages of them
        extra = {"compressionargs": {"level": 1}, "rowsperstrip": rows, "maxworkers": min(8, usable_cpus()),
                 "buffersize": batch_pages * page_strips * strip_bytes}
    with tifffile.TiffWriter(target, bigtiff=True, ome=True) as tw:
        tw.write(data=iter(pages), shape=tuple(shape), dtype=np.dtype(dtype), compression=compression,
                 photometric="minisblack", metadata=ome_metadata(voxel_size), **extra)


def check_output_dir(out_dir: Path) -> list[Path]:
    """Create the output folder and prove it is writable before any work is done; return the
    folders this made (the folder and any missing parents, innermost first)."""
    out_dir = Path(out_dir)
    made = []   # innermost first
    try:
        # one level at a time, outermost first, as `mkdir -p` does, so what was made is known exactly
        # ("a/../b" makes a and b; "a/.." and existing folders are not made here)
        target = out_dir.absolute()
        for level in [*reversed(target.parents), target]:
            try:
                level.mkdir()
                made.insert(0, level)
            except FileExistsError:
                if not level.is_dir():   # mkdir's "File exists" would not say which part is in the way
                    _remove_empty(made)
                    what = ("it exists and is not a folder" if level == target else
                            f"{level} exists and is not a folder (Not a directory)")
                    raise XctrtError(f"{out_dir}: not writable as the output folder: {what}") from None
        _write_check(out_dir)
    except OSError as exc:
        _remove_empty(made)
        raise XctrtError(f"{out_dir}: output folder is not writable ({exc.strerror or exc})") from exc
    return made


def _write_check(folder: Path) -> None:
    """Make and remove a hidden file in folder: proves it writable where os.access cannot tell
    (read-only mounts, ACLs, root squash)."""
    with tempfile.NamedTemporaryFile(dir=folder, prefix=".xctrt-write-check."):
        pass


def output_file(path: str | os.PathLike) -> StagedOutputs:
    """One output file named on the command line (phantom's volumes, evaluate --json, bench --json),
    checked before any work: its folder exists and is writable, and the name is free or a regular
    file. Write it with `with staged, staged.write(name) as tmp: ...`, which renames it into place."""
    path = Path(path)
    folder = path.parent
    try:
        st = os.stat(folder)
        why = None if stat.S_ISDIR(st.st_mode) else f"{folder} is not a folder"
    except FileNotFoundError:
        why = f"folder {folder} does not exist"
    except OSError as exc:
        why = f"folder {folder} cannot be reached ({exc.strerror or exc})"
    if why is None:
        try:
            _write_check(folder)
        except OSError as exc:
            why = f"folder {folder} is not writable ({exc.strerror or exc})"
    if why is not None:
        raise XctrtError(f"{path}: cannot write the output: {why}")
    return StagedOutputs(folder, [path.name])


def _remove_empty(folders: list[Path]) -> None:
    """Remove these folders, innermost first, while they are empty (something else may have put a
    file there since: then it and the folders above it stay)."""
    for d in folders:
        try:
            d.rmdir()
        except OSError:
            return
