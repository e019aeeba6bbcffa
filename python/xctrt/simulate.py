"""Physics-based XCT simulation of additively manufactured (AM) metal parts: `xctrt simulate`.

A labelled phantom (a CAD-like solid, or a user STL, with gas pores, ellipsoidal pores, irregular
lack-of-fusion pores and dense inclusions) is scanned slice by slice:

1. each material's mask is forward-projected once per slice (path lengths in voxels per ray):
   parallel beam with scikit-image's ``radon``; fan beam (flat detector, 360 degrees) with the
   ray-driven projector below;
2. per ray, polychromatic transmission ``T = sum_E S(E) exp(-sum_m mu_m(E) L_m dx)`` with the tube
   spectrum ``S`` from spekpy (or the Kramers fallback, see :func:`tube_spectrum`) and ``mu`` from
   xraydb's Elam tables, so beam hardening (cupping, dark streaks between dense features) appears;
3. Poisson noise on the photon counts (``dose`` = photons per detector pixel per view, unattenuated;
   photon-counting detector), ``-log`` transform;
4. filtered back-projection: ``iradon`` (parallel) or fan-beam FBP (below), ramp or windowed filter.

The slice-by-slice 2D model is exact for parallel beam; "fan" is a 2D fan per slice (a stack of fan
beams, no cone angle), so there are no cone-beam (FDK) artefacts.

Outputs (written atomically): ``image.tif`` (uint16 by default, linear in the reconstructed linear
attenuation coefficient mu, see :data:`GREY_AIR`; or float32 mu in 1/mm), ``labels.tif`` (uint8 0 air,
1 material, 2 pore, 3 inclusion: the convention of ../shared/data/smg) and ``simulate.json`` (all
parameters, spectrum, attenuation coefficients, grey mapping, defect counts, timing), renamed last.
"""
from __future__ import annotations

import math
import signal
import time
from collections import deque
from dataclasses import asdict, dataclass, field
from pathlib import Path

import numpy as np

from .cpus import usable_cpus
from .errors import XctrtError

AIR, MATERIAL, PORE, INCLUSION = 0, 1, 2, 3
PARTS = ("cylinder", "block", "lattice", "overhang")
GEOMETRIES = ("parallel", "fan")
RECON_FILTERS = ("ramp", "shepp-logan", "cosine", "hamming", "hann")
# uint16 grey = 65535 * clip(GREY_AIR + (GREY_MATERIAL - GREY_AIR) * mu / mu_ref, 0, 1), where mu_ref is
# the matrix's attenuation at the effective energy (Scanner.effective_kev): air at 10 %, matrix near 45 % (lower with
# beam hardening), pores dark, dense inclusions bright (clipped at the top when very dense).
GREY_AIR, GREY_MATERIAL = 0.10, 0.45


@dataclass(frozen=True)
class Material:
    name: str
    mass_fractions: dict
    density: float  # g/cm^3


MATERIALS = {
    "alsi10mg": Material("AlSi10Mg", {"Al": 0.896, "Si": 0.100, "Mg": 0.004}, 2.67),
    "ti64": Material("Ti-6Al-4V", {"Ti": 0.90, "Al": 0.06, "V": 0.04}, 4.43),
    "316l": Material("316L", {"Fe": 0.655, "Cr": 0.17, "Ni": 0.12, "Mo": 0.025, "Mn": 0.02, "Si": 0.01}, 7.99),
}
INCLUSIONS = {
    "ni": Material("Ni", {"Ni": 1.0}, 8.908),
    "w": Material("W", {"W": 1.0}, 19.25),
}
FILTER_DENSITY = {"Al": 2.699, "Cu": 8.96, "Sn": 7.31, "Be": 1.848, "Fe": 7.874, "Ti": 4.506, "Ag": 10.49,
                  "Mo": 10.22, "Pb": 11.35, "W": 19.25, "Ni": 8.908}


def _need(module: str):
    import importlib
    try:
        return importlib.import_module(module)
    except ImportError as exc:
        raise XctrtError(f"xctrt simulate needs scikit-image and xraydb ({module} is missing); "
                         "install them with: pip install 'xctrt[sim]'") from exc


def mu_per_mm(material: Material, energies_kev) -> np.ndarray:
    """Linear attenuation coefficient (1/mm, total with coherent scattering) from xraydb's Elam tables."""
    xraydb = _need("xraydb")
    e = np.asarray(energies_kev, float) * 1e3
    mass = sum(w * np.asarray(xraydb.mu_elam(el, e), float) for el, w in material.mass_fractions.items())
    return mass * material.density / 10.0  # cm^2/g * g/cm^3 = 1/cm -> 1/mm


# ----------------------------------------------------------------------------- spectrum


@dataclass
class Spectrum:
    energies_kev: np.ndarray   # bin centres
    weights: np.ndarray        # photons per bin, normalised to sum 1 (what reaches the detector unattenuated)
    source: str

    @property
    def mean_kev(self) -> float:
        return float(np.dot(self.energies_kev, self.weights))


def mono_spectrum(kev: float) -> Spectrum:
    return Spectrum(np.array([float(kev)]), np.array([1.0]), f"monochromatic {kev:g} keV")


def tube_spectrum(kvp: float, beam_filter: tuple[str, float] | None = None, bin_kev: float = 2.0,
                  use_spekpy: bool | None = None) -> Spectrum:
    """Tungsten-anode tube spectrum (photon fluence per bin) after 1 mm Be window and an optional
    filter (element, mm). spekpy (12 degree anode) when installed; otherwise Kramers' law
    N(E) ~ (kVp - E)/E with 1 mm Al standing in for anode self-absorption (no characteristic lines:
    a rough but documented stand-in that still hardens the same way). Bins below 8 keV are dropped
    (nothing of them crosses a metal part)."""
    if not 10 <= kvp <= 450:
        raise XctrtError(f"--kvp {kvp:g} is out of range (10-450 kV)")
    filters = [("Be", 1.0)] + ([tuple(beam_filter)] if beam_filter else [])
    for el, mm in filters:
        if el not in FILTER_DENSITY:
            raise XctrtError(f"unknown beam filter '{el}'; use one of {', '.join(sorted(FILTER_DENSITY))}")
        if not 0 <= mm < math.inf:
            raise XctrtError(f"beam filter thickness must be a finite number >= 0 mm, got {mm:g}")
    spekpy = None
    if use_spekpy is not False:
        try:
            import spekpy
        except ImportError:
            if use_spekpy:
                raise XctrtError("spekpy is not installed; pip install 'xctrt[sim]'") from None
    if spekpy is not None:
        s = spekpy.Spek(kvp=float(kvp), th=12.0, dk=float(bin_kev))
        for el, mm in filters:
            if mm > 0:
                s.filter(el, float(mm))
        e, w = (np.asarray(a, float) for a in s.get_spectrum())
        source = f"spekpy {getattr(spekpy, '__version__', '')} W anode 12 deg".replace("  ", " ")
    else:
        e = np.arange(bin_kev / 2, kvp, bin_kev)
        w = np.clip(kvp - e, 0, None) / e
        for el, mm in filters + [("Al", 1.0)]:
            w = w * np.exp(-mu_per_mm(Material(el, {el: 1.0}, FILTER_DENSITY[el]), e) * mm)
        source = "Kramers' law (spekpy not installed)"
    keep = (e >= 8.0) & (w > 0)
    e, w = e[keep], w[keep]
    w = w / w.sum()
    keep = w > 1e-6  # negligible bins cost time and change nothing
    w = w[keep] / w[keep].sum()
    name = f"{kvp:g} kVp, 1 mm Be" + (f" + {beam_filter[1]:g} mm {beam_filter[0]}" if beam_filter else "")
    return Spectrum(e[keep], w, f"{source}; {name}")


# ----------------------------------------------------------------------------- phantom


def _random_rotation(rng) -> np.ndarray:
    q = rng.normal(size=4)
    a, b, c, d = q / np.linalg.norm(q)
    return np.array([[a * a + b * b - c * c - d * d, 2 * (b * c - a * d), 2 * (b * d + a * c)],
                     [2 * (b * c + a * d), a * a - b * b + c * c - d * d, 2 * (c * d - a * b)],
                     [2 * (b * d - a * c), 2 * (c * d + a * b), a * a - b * b - c * c + d * d]])


def _rot_z(phi: float) -> np.ndarray:  # rotation in the (y, x) plane, axes ordered (z, y, x)
    c, s = math.cos(phi), math.sin(phi)
    return np.array([[1, 0, 0], [0, c, -s], [0, s, c]], float)


@dataclass
class AMPhantom:
    """A labelled AM part: ``render(z0, z1)`` gives uint8 labels of slices z0..z1-1.

    Coordinates are voxels (z, y, x). Defects are ellipsoids: voxel p is inside ellipsoid i when
    ``|M_i (p - c_i)| <= 1``; a lack-of-fusion pore is several flat ellipsoids with one id."""
    shape: tuple[int, int, int]
    voxel_size: float                      # mm, isotropic
    part: str
    centres: np.ndarray = field(repr=False)    # (n, 3)
    matrices: np.ndarray = field(repr=False)   # (n, 3, 3)
    extents: np.ndarray = field(repr=False)    # (n, 3) half bounding box
    labels: np.ndarray = field(repr=False)     # (n,) PORE or INCLUSION
    counts: dict = field(default_factory=dict)  # defects placed per kind
    stl: object = field(default=None, repr=False)

    @property
    def radius(self) -> float:
        """Radius (voxels) of the field of view: every solid voxel lies inside it."""
        return min(self.shape[1:]) / 2.0

    def inside(self, z, y, x) -> np.ndarray:
        """Boolean part mask at voxel coordinates (broadcasting arrays)."""
        _, Y, X = self.shape
        cy, cx = (Y - 1) / 2, (X - 1) / 2
        R = self.radius
        dy, dx = y - cy, x - cx
        r2 = dy * dy + dx * dx
        if self.stl is not None:
            return self.stl.inside(z, y, x)
        if self.part == "cylinder":
            return np.broadcast_to(r2 <= (0.80 * R) ** 2, np.broadcast_shapes(np.shape(z), np.shape(r2)))
        if self.part == "block":
            m = (np.abs(dx) <= 0.62 * R) & (np.abs(dy) <= 0.45 * R)
            return np.broadcast_to(m, np.broadcast_shapes(np.shape(z), np.shape(m)))
        if self.part == "lattice":  # sheet gyroid, 4 cells across, inside a cylindrical skin
            rp = 0.80 * R
            k = 2 * np.pi / (2 * rp / 4)
            g = (np.sin(k * dx) * np.cos(k * dy) + np.sin(k * dy) * np.cos(k * z) + np.sin(k * z) * np.cos(k * dx))
            return (r2 <= rp * rp) & ((np.abs(g) <= 0.45) | (r2 >= (rp - max(2.0, 0.05 * R)) ** 2))
        if self.part == "overhang":  # build direction +z: column, 45-degree flare, cantilever shelf
            Z = self.shape[0]
            z = np.asarray(z, float)
            col = 0.30 * R
            flare = np.clip(col + (z - 0.30 * Z), col, 0.75 * R)  # 45 degrees for isotropic voxels
            shelf = (z >= 0.60 * Z) & (dx >= 0) & (dx <= 0.78 * R) & (np.abs(dy) <= 0.22 * R)
            return (r2 <= flare * flare) | shelf
        raise XctrtError(f"unknown part '{self.part}'; use one of {', '.join(PARTS)}")

    def render(self, z0: int, z1: int) -> np.ndarray:
        _, Y, X = self.shape
        zz, yy, xx = np.ogrid[z0:z1, :Y, :X]
        labels = np.ascontiguousarray(self.inside(zz, yy, xx), dtype=np.uint8)
        if len(self.labels):
            lo = self.centres[:, 0] - self.extents[:, 0]
            hi = self.centres[:, 0] + self.extents[:, 0]
            for i in np.flatnonzero((hi >= z0) & (lo <= z1 - 1)):  # pores first, then inclusions (sorted)
                c, e = self.centres[i], self.extents[i]
                a = [max(math.floor(c[d] - e[d]), lim) for d, lim in enumerate((z0, 0, 0))]
                b = [min(math.ceil(c[d] + e[d]) + 1, lim) for d, lim in enumerate((z1, Y, X))]
                if any(a[d] >= b[d] for d in range(3)):
                    continue
                g = np.stack(np.meshgrid(*(np.arange(a[d], b[d]) - c[d] for d in range(3)), indexing="ij"), -1)
                q = g @ self.matrices[i].T
                body = (q * q).sum(-1) <= 1.0
                view = labels[a[0] - z0:b[0] - z0, a[1]:b[1], a[2]:b[2]]
                view[body & (view >= MATERIAL)] = self.labels[i]  # defects only inside the part
        return labels


def _ellipsoid(centre, axes, rot) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    axes = np.asarray(axes, float)
    m = np.diag(1.0 / axes) @ rot.T
    cov = rot @ np.diag(axes ** 2) @ rot.T
    return np.asarray(centre, float), m, np.sqrt(np.diag(cov))


def make_am_phantom(shape=(64, 512, 512), part: str = "cylinder", voxel_size: float = 0.02, seed: int = 0,
                    pores_per_mm3: float = 20.0, pore_size: float = 0.1, pore_mix=(0.5, 0.3, 0.2),
                    inclusions_per_mm3: float = 2.0, inclusion_size: float = 0.06, stl=None) -> AMPhantom:
    """Place defects in a part. Counts are Poisson with the given density per mm^3 of part volume
    (rejection sampling of uniform centres); sizes are log-normal (sigma 0.35) around the mean
    equivalent diameter (mm), at least 1.5 voxels. Pore kinds by ``pore_mix`` fractions: spherical
    gas pores, randomly oriented prolate ellipsoids (aspect 1.3-3), and irregular lack-of-fusion pores
    (3-7 flat ellipsoids chained in the layer plane, about twice the mean size). Inclusions are
    near-spherical (aspect <= 1.4)."""
    shape = tuple(int(s) for s in shape)
    if len(shape) != 3 or min(shape) < 1 or min(shape[1:]) < 16:
        raise XctrtError(f"--shape {shape}: need Z >= 1 and Y, X >= 16")
    if not 0 < voxel_size < math.inf:   # written so that NaN fails too
        raise XctrtError(f"--voxel-size must be a finite number > 0 mm, got {voxel_size:g}")
    if stl is None and part not in PARTS:
        raise XctrtError(f"unknown part '{part}'; use one of {', '.join(PARTS)}")
    for name, v in (("--pores-per-mm3", pores_per_mm3), ("--inclusions-per-mm3", inclusions_per_mm3)):
        if not 0 <= v < math.inf:
            raise XctrtError(f"{name} must be a finite number >= 0, got {v:g}")
    for name, v in (("--pore-size", pore_size), ("--inclusion-size", inclusion_size)):
        if not 0 < v < math.inf:
            raise XctrtError(f"{name} must be a finite number > 0 mm, got {v:g}")
    mix = np.asarray(pore_mix, float)
    if mix.shape != (3,) or not np.isfinite(mix).all() or (mix < 0).any() or mix.sum() <= 0:
        raise XctrtError("--pore-mix takes three non-negative fractions (sphere ellipsoid lack-of-fusion)")
    mix = mix / mix.sum()
    ph = AMPhantom(shape, float(voxel_size), part if stl is None else "stl", np.zeros((0, 3)),
                   np.zeros((0, 3, 3)), np.zeros((0, 3)), np.zeros(0, np.uint8), stl=stl)
    rng = np.random.default_rng(seed)
    Z, Y, X = shape
    box_mm3 = Z * Y * X * voxel_size ** 3
    items = []

    def centres(density):
        n = rng.poisson(density * box_mm3)
        p = rng.uniform([-0.5, -0.5, -0.5], [Z - 0.5, Y - 0.5, X - 0.5], size=(n, 3))
        return p[ph.inside(p[:, 0], p[:, 1], p[:, 2])] if n else p

    def diameters(n, mean_mm):
        d = mean_mm / voxel_size * np.exp(rng.normal(-0.35 ** 2 / 2, 0.35, n))
        return np.maximum(d, 1.5)

    counts = {"sphere": 0, "ellipsoid": 0, "lack_of_fusion": 0, "inclusion": 0}
    pc = centres(pores_per_mm3)
    kinds = rng.choice(3, size=len(pc), p=mix)
    for c, d, kind in zip(pc, diameters(len(pc), pore_size), kinds):
        r = d / 2
        if kind == 0:
            items.append(_ellipsoid(c, (r, r, r), np.eye(3)) + (PORE,))
            counts["sphere"] += 1
        elif kind == 1:
            k = rng.uniform(1.3, 3.0)
            items.append(_ellipsoid(c, (r * k ** (2 / 3), r * k ** (-1 / 3), r * k ** (-1 / 3)),
                                    _random_rotation(rng)) + (PORE,))
            counts["ellipsoid"] += 1
        else:  # lack of fusion: flat, irregular, elongated in the layer (y, x) plane
            pos = np.array(c, float)
            heading = rng.uniform(0, 2 * np.pi)
            for _ in range(rng.integers(3, 8)):
                ri = r * rng.uniform(0.5, 1.0)
                rot = _rot_z(heading + rng.normal(0, 0.5))
                items.append(_ellipsoid(pos, (max(0.6, 0.3 * ri), 0.6 * ri, 1.4 * ri), rot) + (PORE,))
                heading += rng.normal(0, 0.8)
                pos = pos + np.array([rng.normal(0, 0.15 * r), 1.2 * ri * math.sin(heading),
                                      1.2 * ri * math.cos(heading)])
            counts["lack_of_fusion"] += 1
    ic = centres(inclusions_per_mm3)
    for c, d in zip(ic, diameters(len(ic), inclusion_size)):
        r, k = d / 2, rng.uniform(1.0, 1.4)
        items.append(_ellipsoid(c, (r * k ** (2 / 3), r * k ** (-1 / 3), r * k ** (-1 / 3)),
                                _random_rotation(rng)) + (INCLUSION,))
        counts["inclusion"] += 1
    if items:
        ph.centres = np.array([it[0] for it in items])
        ph.matrices = np.array([it[1] for it in items])
        ph.extents = np.array([it[2] for it in items])
        ph.labels = np.array([it[3] for it in items], np.uint8)
    ph.counts = counts
    return ph


# ----------------------------------------------------------------------------- STL


class StlPart:
    """A closed triangle mesh (binary or ASCII STL, millimetres) voxelised by ray parity along z:
    each voxel column (y, x) keeps the sorted z of its crossings with the mesh, and a voxel is inside
    when an odd number of crossings lie below it. The mesh is centred in the field of view."""

    def __init__(self, path, shape, voxel_size: float):
        tri = read_stl(path)
        Z, Y, X = shape
        tri = tri / voxel_size  # mm -> voxels
        lo, hi = tri.reshape(-1, 3).min(0), tri.reshape(-1, 3).max(0)
        # STL axes (x, y, z); volume axes (z, y, x): z is the build direction
        centre = np.array([(Z - 1) / 2, (Y - 1) / 2, (X - 1) / 2])
        mid = (lo + hi) / 2
        v = np.stack([tri[..., 2] - mid[2] + centre[0], tri[..., 1] - mid[1] + centre[1],
                      tri[..., 0] - mid[0] + centre[2]], -1)  # (n, 3 vertices, zyx)
        radius = np.sqrt(((v[..., 1:] - centre[1:]) ** 2).sum(-1)).max()
        if radius > min(Y, X) / 2 - 1:
            raise XctrtError(f"{path}: the mesh ({(hi - lo)[0] * voxel_size:.3g} x {(hi - lo)[1] * voxel_size:.3g} "
                             f"mm in x, y) does not fit the field of view of {min(Y, X) * voxel_size:.3g} mm at "
                             f"--voxel-size {voxel_size:g}; use a larger voxel size or --shape")
        self.shape = tuple(shape)
        self.columns = self._crossings(v, Y, X)

    @staticmethod
    def _crossings(v, Y, X) -> dict:
        ys, xs, zs = [], [], []
        for t in range(0, len(v), 4096):
            tr = v[t:t + 4096]
            (z0, y0, x0), (z1, y1, x1), (z2, y2, x2) = (tr[:, k].T for k in range(3))
            det = (y1 - y0) * (x2 - x0) - (x1 - x0) * (y2 - y0)
            ok = np.abs(det) > 1e-12
            for i in np.flatnonzero(ok):
                ya, yb = math.ceil(min(y0[i], y1[i], y2[i])), math.floor(max(y0[i], y1[i], y2[i]))
                xa, xb = math.ceil(min(x0[i], x1[i], x2[i])), math.floor(max(x0[i], x1[i], x2[i]))
                if ya > yb or xa > xb:
                    continue
                gy, gx = np.mgrid[max(ya, 0):min(yb, Y - 1) + 1, max(xa, 0):min(xb, X - 1) + 1]
                gy, gx = gy.ravel() + 1e-7, gx.ravel() + 2e-7  # nudge off edges and vertices
                a = ((y1[i] - gy) * (x2[i] - gx) - (x1[i] - gx) * (y2[i] - gy)) / det[i]
                b = ((y2[i] - gy) * (x0[i] - gx) - (x2[i] - gx) * (y0[i] - gy)) / det[i]
                c = 1 - a - b
                hit = (a >= 0) & (b >= 0) & (c >= 0)
                if hit.any():
                    ys.append(np.round(gy[hit]).astype(np.int64))
                    xs.append(np.round(gx[hit]).astype(np.int64))
                    zs.append(a[hit] * z0[i] + b[hit] * z1[i] + c[hit] * z2[i])
        if not ys:
            return {"key": np.zeros(0, np.int64), "z": np.zeros(0), "start": np.zeros(Y * X + 1, np.int64)}
        key = np.concatenate(ys) * X + np.concatenate(xs)
        z = np.concatenate(zs)
        order = np.lexsort((z, key))
        key, z = key[order], z[order]
        start = np.searchsorted(key, np.arange(Y * X + 1))
        return {"key": key, "z": z, "start": start}

    def inside(self, z, y, x) -> np.ndarray:
        _, Y, X = self.shape
        z, y, x = np.broadcast_arrays(np.asarray(z, float), np.asarray(y), np.asarray(x))
        col = (np.clip(np.round(y).astype(np.int64), 0, Y - 1) * X
               + np.clip(np.round(x).astype(np.int64), 0, X - 1)).ravel()
        zc, start = self.columns["z"], self.columns["start"]
        n = start[col + 1] - start[col]
        below = np.zeros(len(col), np.int64)
        for k in range(int(n.max()) if len(n) else 0):  # a column crosses a closed mesh a few times only
            has = np.flatnonzero(n > k)
            below[has] += zc[start[col[has]] + k] < z.ravel()[has]
        return (below % 2 == 1).reshape(z.shape)


def read_stl(path) -> np.ndarray:
    """Triangles (n, 3, 3) in the file's units from a binary or ASCII STL."""
    path = Path(path)
    try:
        data = path.read_bytes()
    except OSError as exc:
        raise XctrtError(f"{path}: cannot read the STL ({exc.strerror or exc})") from exc
    if len(data) >= 84:
        n = int.from_bytes(data[80:84], "little")
        if len(data) == 84 + 50 * n and n > 0:
            rec = np.frombuffer(data, dtype=np.dtype([("n", "<f4", 3), ("v", "<f4", (3, 3)), ("a", "<u2")]),
                                count=n, offset=84)
            tri = rec["v"].astype(np.float64)
            if not np.isfinite(tri).all():
                raise XctrtError(f"{path}: the STL has NaN or infinite vertices")
            return tri
    text = data.decode("ascii", errors="replace")
    if not text.lstrip().lower().startswith("solid"):
        raise XctrtError(f"{path}: not an STL file (neither binary nor ASCII 'solid ...')")
    vals = [ln.split()[1:4] for ln in text.splitlines() if ln.strip().lower().startswith("vertex")]
    try:
        tri = np.array(vals, np.float64).reshape(-1, 3, 3)
    except ValueError as exc:
        raise XctrtError(f"{path}: the ASCII STL is malformed ({exc})") from exc
    if len(tri) == 0:
        raise XctrtError(f"{path}: the STL has no triangles")
    return tri


# ----------------------------------------------------------------------------- scanner


def _fourier_filter(size: int, name: str) -> np.ndarray:
    """Ramp filter from its spatial-domain kernel (Kak & Slaney eq. 61, as scikit-image builds it),
    optionally windowed; the same filter for parallel and fan FBP."""
    n = np.concatenate((np.arange(1, size / 2 + 1, 2, dtype=int), np.arange(size / 2 - 1, 0, -2, dtype=int)))
    f = np.zeros(size)
    f[0] = 0.25
    f[1::2] = -1 / (np.pi * n) ** 2
    fourier = 2 * np.real(np.fft.fft(f))
    if name == "shepp-logan":
        omega = np.pi * np.fft.fftfreq(size)[1:]
        fourier[1:] *= np.sin(omega) / omega
    elif name == "cosine":
        fourier *= np.fft.fftshift(np.sin(np.linspace(0, np.pi, size, endpoint=False)))
    elif name == "hamming":
        fourier *= np.fft.fftshift(np.hamming(size))
    elif name == "hann":
        fourier *= np.fft.fftshift(np.hanning(size))
    elif name != "ramp":
        raise XctrtError(f"unknown reconstruction filter '{name}'; use one of {', '.join(RECON_FILTERS)}")
    return fourier


def _near_bins(coord: np.ndarray, n: int) -> np.ndarray:
    """Detector bins within reach of fractional detector positions ``coord`` (bilinear footprint)."""
    near = np.zeros(n, bool)
    base = np.floor(coord).astype(np.int64)
    for off in (-1, 0, 1, 2):
        near[np.clip(base + off, 0, n - 1)] = True
    return near


class ParallelBeam:
    """Ray-driven parallel projector with scikit-image's ``radon`` conventions (centre ``size // 2``,
    bin j at s = j - centre, bilinear samples 1 pixel apart), used where only a few rays matter: the
    projection of small inclusions, traced only along rays that pass near them."""

    def __init__(self, size: int, theta_deg: np.ndarray):
        self.size = size
        self.c = size // 2
        self.theta = np.deg2rad(theta_deg)
        self.t = np.arange(size, dtype=np.float64) - self.c

    def project(self, img: np.ndarray, pixels: np.ndarray) -> np.ndarray:
        """(views, bins) line integrals of ``img``, traced only near ``pixels`` ((y, x) of its nonzero
        pixels); equal to ``radon(img, theta, circle=True).T`` within float rounding."""
        from scipy.ndimage import map_coordinates
        n = self.size
        out = np.zeros((len(self.theta), n), np.float32)
        dy, dx = pixels[:, 0] - self.c, pixels[:, 1] - self.c
        lo, hi = pixels.min(0) - 2, pixels.max(0) + 2
        for k, a in enumerate(self.theta):
            ca, sa = math.cos(a), math.sin(a)
            idx = np.flatnonzero(_near_bins(ca * dx - sa * dy + self.c, n))
            s = idx - self.c
            # samples t only where the ray crosses the pixels' bounding box: cheaper, same sums
            tt = self.t
            y_in = self.c - sa * s[:, None] + ca * tt[None, :]
            x_in = self.c + ca * s[:, None] + sa * tt[None, :]
            keep = ((y_in >= lo[0]) & (y_in <= hi[0]) & (x_in >= lo[1]) & (x_in <= hi[1])).any(0)
            y_in, x_in = y_in[:, keep], x_in[:, keep]
            vals = map_coordinates(img, np.stack([y_in.ravel(), x_in.ravel()]), order=1, mode="constant",
                                   cval=0.0, prefilter=False)
            out[k, idx] = vals.reshape(len(idx), -1).sum(1)
        return out


class FanBeam:
    """2D fan beam, full 360-degree scan, flat detector. Distances in pixels: the source is
    ``source_distance`` field-of-view radii from the rotation centre; the detector is described at
    the rotation centre (virtual detector, 1-pixel bins) and just covers the field-of-view circle."""

    def __init__(self, size: int, views: int, source_distance: float = 3.0):
        if source_distance <= 1.05:
            raise XctrtError("the fan-beam source must be more than 1.05 field-of-view radii from the centre")
        self.size = size
        self.r = size / 2.0
        self.R = source_distance * self.r
        umax = self.r * self.R / math.sqrt(self.R ** 2 - self.r ** 2)
        half = math.ceil(umax)
        self.u = np.arange(-half, half + 1, dtype=np.float64)
        self.betas = np.linspace(0, 2 * np.pi, views, endpoint=False)
        self.c = (size - 1) / 2.0
        self.t = np.arange(size, dtype=np.float64) - (size - 1) / 2.0  # ray samples, step 1 pixel
        yy, xx = np.mgrid[:size, :size]
        dy, dx = yy - self.c, xx - self.c
        m = dy * dy + dx * dx <= self.r * self.r
        self.mask = m
        self.px, self.py = dx[m], dy[m]

    @property
    def fan_angle_deg(self) -> float:
        return 2 * math.degrees(math.asin(self.r / self.R))

    def project(self, img: np.ndarray, radius: float | None = None, pixels: np.ndarray | None = None) -> np.ndarray:
        """Line integrals (views, detector bins) of ``img`` (zero outside the field-of-view circle), in
        pixels. Rays and samples farther than ``radius`` (pixels) from the centre are skipped; with
        ``pixels`` ((y, x) of the nonzero pixels, centred), only rays passing near them are traced
        (cheap for small, dense inclusions)."""
        from scipy.ndimage import map_coordinates
        radius = self.r if radius is None else min(radius, self.r)
        reach = radius + 1.5
        t = self.t[np.abs(self.t) <= reach]
        out = np.zeros((len(self.betas), len(self.u)), np.float32)
        n = len(self.u)
        for k, b in enumerate(self.betas):
            sx, sy = self.R * math.cos(b), self.R * math.sin(b)
            ex, ey = -math.sin(b), math.cos(b)
            px, py = self.u * ex - sx, self.u * ey - sy           # source -> detector point
            norm = np.hypot(px, py)
            dxr, dyr = px / norm, py / norm
            rays = np.abs(sx * dyr - sy * dxr) <= reach          # distance of each ray from the centre
            if pixels is not None:
                s = pixels[:, 1] * math.cos(b) + pixels[:, 0] * math.sin(b)
                e = -pixels[:, 1] * math.sin(b) + pixels[:, 0] * math.cos(b)
                rays &= _near_bins(e * self.R / (self.R - s) - self.u[0], n)
            idx = np.flatnonzero(rays)
            if not len(idx):
                continue
            dxr, dyr = dxr[idx], dyr[idx]
            tm = -(sx * dxr + sy * dyr)                            # closest approach to the centre
            tt = tm[:, None] + t[None, :]
            coords = np.stack([(self.c + sy + tt * dyr[:, None]).ravel(),
                               (self.c + sx + tt * dxr[:, None]).ravel()]).astype(np.float32)
            out[k, idx] = map_coordinates(img, coords, order=1, mode="constant", cval=0.0,
                                          prefilter=False).reshape(len(idx), -1).sum(1)
        return out

    def reconstruct(self, sino: np.ndarray, filter_name: str = "ramp") -> np.ndarray:
        """Fan-beam FBP (Kak & Slaney, equispaced detector): cosine weighting, ramp filtering,
        back-projection weighted by 1/U^2. Returns a (size, size) image, zero outside the circle."""
        n = len(self.u)
        pad = max(64, int(2 ** math.ceil(math.log2(2 * n))))
        weighted = sino * (self.R / np.sqrt(self.R ** 2 + self.u ** 2))[None, :]
        q = np.fft.ifft(np.fft.fft(weighted, n=pad, axis=1) * _fourier_filter(pad, filter_name)[None, :],
                        axis=1)[:, :n].real
        acc = np.zeros(self.px.shape, np.float64)
        u0 = self.u[0]
        for k, b in enumerate(self.betas):
            cb, sb = math.cos(b), math.sin(b)
            s = self.px * cb + self.py * sb
            e = -self.px * sb + self.py * cb
            U = (self.R - s) / self.R
            up = e / U - u0
            i = np.clip(up.astype(np.int64), 0, n - 2)
            w = up - i
            qk = q[k]
            acc += ((1 - w) * qk[i] + w * qk[i + 1]) / (U * U)
        img = np.zeros((self.size, self.size), np.float32)
        img[self.mask] = acc * (np.pi / (2 * len(self.betas)))
        return img


@dataclass
class Scanner:
    """Everything needed to scan one slice; picklable, so worker processes get one copy."""
    matrix: Material
    inclusion: Material
    spectrum: Spectrum
    views: int
    geometry: str = "parallel"
    dose: float = 1e4                 # photons per detector pixel per view, unattenuated; 0: noiseless
    voxel_size: float = 0.02          # mm
    recon_filter: str = "ramp"
    source_distance: float = 3.0      # fan beam: source to centre, in field-of-view radii
    seed: int = 0
    ref_path_mm: float = 5.0          # matrix path that defines the effective energy (a FOV radius)
    mu_matrix: np.ndarray = field(init=False, repr=False)
    mu_inclusion: np.ndarray = field(init=False, repr=False)

    def __post_init__(self):
        if self.geometry not in GEOMETRIES:
            raise XctrtError(f"unknown geometry '{self.geometry}'; use parallel or fan")
        if self.views < 2:
            raise XctrtError(f"--views must be >= 2, got {self.views}")
        if not 0 <= self.dose < math.inf:
            raise XctrtError(f"--dose must be a finite number >= 0 photons per pixel (0 = noiseless), "
                             f"got {self.dose:g}")
        if self.recon_filter not in RECON_FILTERS:
            raise XctrtError(f"unknown reconstruction filter '{self.recon_filter}'; use one of {', '.join(RECON_FILTERS)}")
        e = self.spectrum.energies_kev
        self.mu_matrix = mu_per_mm(self.matrix, e)
        self.mu_inclusion = mu_per_mm(self.inclusion, e)
        self._fan = {}

    def effective_kev(self) -> float:
        """Energy at which the matrix's mu equals its effective attenuation -ln(T(L))/L over
        ``ref_path_mm`` (what a part of that size reconstructs to, near its centre)."""
        e, w = self.spectrum.energies_kev, self.spectrum.weights
        if len(e) == 1:
            return float(e[0])
        L = self.ref_path_mm
        mu_eff = -math.log(float(np.exp(-self.mu_matrix * L) @ w)) / L
        grid = np.arange(e.min(), e.max() + 0.05, 0.1)
        return float(grid[np.argmin(np.abs(mu_per_mm(self.matrix, grid) - mu_eff))])

    def mu_at(self, kev: float | None = None) -> dict:
        """mu (1/mm) of each class at ``kev`` (default: :meth:`effective_kev`)."""
        kev = self.effective_kev() if kev is None else kev
        return {"air": 0.0, "material": float(mu_per_mm(self.matrix, [kev])[0]), "pore": 0.0,
                "inclusion": float(mu_per_mm(self.inclusion, [kev])[0])}

    def ideal(self, labels: np.ndarray, kev: float | None = None) -> np.ndarray:
        """The attenuation image (1/mm) the scan tries to recover: mu at ``kev`` (default: effective energy)."""
        mu = self.mu_at(kev)
        lut = np.array([mu["air"], mu["material"], mu["pore"], mu["inclusion"]], np.float32)
        return lut[labels]

    def fan(self, size: int) -> FanBeam:
        if size not in self._fan:
            self._fan[size] = FanBeam(size, self.views, self.source_distance)
        return self._fan[size]

    def transmission(self, path_matrix: np.ndarray, path_inclusion: np.ndarray) -> np.ndarray:
        """Expected fraction of photons reaching each detector pixel; path lengths in voxels."""
        w = self.spectrum.weights
        a_m = (self.mu_matrix * self.voxel_size).astype(np.float32)
        a_i = (self.mu_inclusion * self.voxel_size).astype(np.float32)
        lm = path_matrix.astype(np.float32).ravel()
        li = path_inclusion.astype(np.float32).ravel()
        out = np.empty(lm.shape, np.float64)
        # matrix-only rays (nearly all): a fine 1D table of T(L), interpolated
        grid = np.linspace(0.0, float(lm.max()) + 1.0, 4097)
        table = np.exp(-np.outer(grid, a_m)) @ w
        out[:] = np.interp(lm, grid, table)
        hit = li > 1e-6
        if hit.any():
            out[hit] = np.exp(-(np.outer(lm[hit], a_m) + np.outer(li[hit], a_i))) @ w
        return out.reshape(path_matrix.shape)

    def scan(self, labels: np.ndarray, z: int = 0, return_sinogram: bool = False):
        """Reconstructed attenuation (1/mm, float32, labels' shape) of one labelled slice."""
        Y, X = labels.shape
        S = max(Y, X)
        py, px = (S - Y) // 2, (S - X) // 2
        lab = np.zeros((S, S), np.uint8)
        lab[py:py + Y, px:px + X] = labels
        m = (lab == MATERIAL).astype(np.float32)
        inc = (lab == INCLUSION).astype(np.float32)
        if self.geometry == "parallel":
            from skimage.transform import radon
            theta = np.linspace(0.0, 180.0, self.views, endpoint=False)
            lm = radon(m, theta, circle=True, preserve_range=True).T
            iy, ix = np.nonzero(inc)
            li = (ParallelBeam(S, theta).project(inc, np.stack([iy, ix], 1)) if len(iy)
                  else np.zeros_like(lm))
        else:
            fb = self.fan(S)
            ys, xs = np.nonzero(lab)
            radius = float(np.sqrt(((ys - fb.c) ** 2 + (xs - fb.c) ** 2).max())) + 1 if len(ys) else 0.0
            lm = fb.project(m, radius)
            iy, ix = np.nonzero(inc)
            li = fb.project(inc, radius, np.stack([iy - fb.c, ix - fb.c], 1)) if len(iy) else np.zeros_like(lm)
        np.maximum(lm, 0, out=lm)
        np.maximum(li, 0, out=li)
        t = self.transmission(lm, li)
        if self.dose > 0:
            rng = np.random.default_rng([self.seed, 0x5CA1, z])
            counts = np.maximum(rng.poisson(self.dose * t), 1)  # photon starvation: at least 1 count
            p = -np.log(counts / self.dose)
        else:
            p = -np.log(np.maximum(t, 1e-30))
        if self.geometry == "parallel":
            from skimage.transform import iradon
            rec = iradon(p.T.astype(np.float64), theta, circle=True, filter_name=self.recon_filter,
                         preserve_range=True)
        else:
            rec = self.fan(S).reconstruct(p, self.recon_filter)
        rec = (rec[py:py + Y, px:px + X] / self.voxel_size).astype(np.float32)
        return (rec, p) if return_sinogram else rec


def grey_map(mu: np.ndarray, mu_ref: float) -> np.ndarray:
    g = GREY_AIR + (GREY_MATERIAL - GREY_AIR) * mu / mu_ref
    return np.round(np.clip(g, 0.0, 1.0) * 65535).astype(np.uint16)


# ----------------------------------------------------------------------------- driver

_WORKER_SCANNER: Scanner | None = None


def _init_worker(scanner: Scanner, single_thread: bool = True) -> None:
    global _WORKER_SCANNER
    _WORKER_SCANNER = scanner
    if single_thread:  # a worker process per core: keep BLAS single-threaded inside each
        # Ctrl-C reaches the whole process group: only the parent reports it and stops the pool
        # (which ends workers with SIGTERM, so that keeps its default action, not a handler
        # inherited through fork).
        signal.signal(signal.SIGINT, signal.SIG_IGN)
        signal.signal(signal.SIGTERM, signal.SIG_DFL)
        try:
            from threadpoolctl import threadpool_limits
            threadpool_limits(1)
        except ImportError:
            pass


def _scan_one(args):
    z, labels = args
    return z, _WORKER_SCANNER.scan(labels, z)


@dataclass
class SimConfig:
    shape: tuple = (64, 512, 512)
    part: str = "cylinder"
    stl: str | None = None
    material: str = "alsi10mg"
    inclusion: str = "ni"
    pores_per_mm3: float = 20.0
    pore_size: float = 0.1
    pore_mix: tuple = (0.5, 0.3, 0.2)
    inclusions_per_mm3: float = 2.0
    inclusion_size: float = 0.06
    views: int = 360
    geometry: str = "parallel"
    kvp: float = 160.0
    beam_filter: tuple | None = None   # (element, mm)
    mono_kev: float | None = None      # monochromatic beam instead of the tube spectrum (no beam hardening)
    dose: float = 1e4
    recon_filter: str = "ramp"
    source_distance: float = 3.0
    seed: int = 0
    voxel_size: float = 0.02
    dtype: str = "uint16"


def build(cfg: SimConfig) -> tuple[AMPhantom, Scanner]:
    if cfg.material not in MATERIALS:
        raise XctrtError(f"unknown material '{cfg.material}'; use one of {', '.join(MATERIALS)}")
    if cfg.inclusion not in INCLUSIONS:
        raise XctrtError(f"unknown inclusion '{cfg.inclusion}'; use one of {', '.join(INCLUSIONS)}")
    if cfg.dtype not in ("uint16", "float32"):
        raise XctrtError(f"--dtype must be uint16 or float32, got {cfg.dtype}")
    _need("skimage")
    _need("xraydb")
    stl = StlPart(cfg.stl, cfg.shape, cfg.voxel_size) if cfg.stl else None
    phantom = make_am_phantom(cfg.shape, cfg.part, cfg.voxel_size, cfg.seed, cfg.pores_per_mm3, cfg.pore_size,
                              cfg.pore_mix, cfg.inclusions_per_mm3, cfg.inclusion_size, stl=stl)
    if cfg.mono_kev is not None:
        if not 1 <= cfg.mono_kev <= 1000:
            raise XctrtError(f"--mono {cfg.mono_kev:g} keV is out of range (1-1000)")
        spectrum = mono_spectrum(cfg.mono_kev)
    else:
        spectrum = tube_spectrum(cfg.kvp, cfg.beam_filter)
    scanner = Scanner(MATERIALS[cfg.material], INCLUSIONS[cfg.inclusion], spectrum, int(cfg.views), cfg.geometry,
                      float(cfg.dose), float(cfg.voxel_size), cfg.recon_filter, float(cfg.source_distance),
                      int(cfg.seed), min(cfg.shape[1:]) / 2 * cfg.voxel_size)
    return phantom, scanner


def simulate(out_dir, cfg: SimConfig, workers: int = 0, progress: bool = True, slab: int = 8) -> dict:
    """Write OUT_DIR/image.tif, labels.tif and simulate.json (atomically); return the summary."""
    from .io import StagedOutputs, write_volume_tiff
    t0 = time.perf_counter()
    phantom, scanner = build(cfg)   # checks the configuration before the output folder is made
    Z = phantom.shape[0]
    vs = (cfg.voxel_size,) * 3
    mu_ref = scanner.mu_at()["material"]
    workers = usable_cpus() if workers <= 0 else workers
    workers = max(1, min(workers, Z))
    class_voxels = np.zeros(4, np.int64)

    def label_pages(count: bool):
        for z0 in range(0, Z, slab):
            lab = phantom.render(z0, min(z0 + slab, Z))
            if count:
                class_voxels[:] += np.bincount(lab.ravel(), minlength=4)[:4]
            yield from lab

    def scanned():  # (z, recon) in order, with at most 2 * workers + 1 slices in flight
        items = enumerate(label_pages(False))  # labels are rendered again: cheap, and memory stays bounded
        if workers == 1:
            _init_worker(scanner, single_thread=False)  # in this process: leave its thread pools alone
            yield from map(_scan_one, items)
            return
        import multiprocessing as mp
        ctx = mp.get_context("fork" if "fork" in mp.get_all_start_methods() else "spawn")
        with ctx.Pool(workers, initializer=_init_worker, initargs=(scanner,)) as pool:
            pending = deque()
            for item in items:
                pending.append(pool.apply_async(_scan_one, (item,)))
                if len(pending) >= 2 * workers + 1:
                    yield pending.popleft().get()
            while pending:
                yield pending.popleft().get()

    def image_pages():
        from tqdm import tqdm
        # disable=None: no bar when stderr is not a terminal (a log file), as segment's
        for _, rec in tqdm(scanned(), total=Z, desc="simulate", unit="slice", disable=None if progress else True,
                           dynamic_ncols=True):
            yield rec if cfg.dtype == "float32" else grey_map(rec, mu_ref)

    with StagedOutputs(out_dir, order=["labels.tif", "image.tif", "simulate.json"], create=True) as staged:
        t_lab = time.perf_counter()
        with staged.write("labels.tif") as tmp:   # a full disk: one error naming the file
            write_volume_tiff(tmp, label_pages(True), phantom.shape, np.uint8, vs, "zlib")
        t_img = time.perf_counter()
        with staged.write("image.tif") as tmp:
            write_volume_tiff(tmp, image_pages(), phantom.shape, np.dtype(cfg.dtype), vs, "zlib")
        t_end = time.perf_counter()
        part_vox = int(class_voxels[1:].sum())
        summary = {
            "xctrt_simulate": 1,
            "config": {k: (list(v) if isinstance(v, tuple) else v) for k, v in asdict(cfg).items()},
            "shape": list(phantom.shape),
            "voxel_size_mm": cfg.voxel_size,
            "labels": {"0": "air", "1": "material", "2": "pore", "3": "inclusion"},
            "class_voxels": {n: int(c) for n, c in zip(("air", "material", "pore", "inclusion"), class_voxels)},
            "porosity_percent": 100.0 * float(class_voxels[2]) / max(part_vox, 1),
            "defects_placed": phantom.counts,
            "materials": {"matrix": scanner.matrix.name, "inclusion": scanner.inclusion.name},
            "spectrum": {"source": scanner.spectrum.source, "mean_kev": scanner.spectrum.mean_kev,
                         "energies_kev": scanner.spectrum.energies_kev, "weights": scanner.spectrum.weights},
            "effective_kev": scanner.effective_kev(),
            "mu_per_mm_at_effective_energy": scanner.mu_at(),
            "geometry": {"kind": scanner.geometry, "views": scanner.views,
                         "scan_degrees": 180 if scanner.geometry == "parallel" else 360,
                         **({"source_distance_fov_radii": scanner.source_distance,
                             "fan_angle_deg": 2 * math.degrees(math.asin(1 / scanner.source_distance))}
                            if scanner.geometry == "fan" else {})},
            "grey": ({"dtype": "float32", "unit": "1/mm (linear attenuation coefficient)"} if cfg.dtype == "float32"
                     else {"dtype": "uint16", "formula": "65535 * clip(a + (b - a) * mu / mu_ref, 0, 1)",
                           "a": GREY_AIR, "b": GREY_MATERIAL, "mu_ref_per_mm": mu_ref}),
            "timing_s": {"labels": t_img - t_lab, "scan": t_end - t_img, "total": t_end - t0},
            "workers": workers,
        }
        from .io import write_json
        with staged.write("simulate.json") as tmp:
            write_json(tmp, summary)
    return summary
