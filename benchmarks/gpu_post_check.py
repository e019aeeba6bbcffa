"""GPU post-processing (xctrt.gpu.post on CuPy) against the C++ kernels, and its speed at full size.

    python benchmarks/gpu_post_check.py --out DIR                      # H200: 1000x1200x1200
    python benchmarks/gpu_post_check.py --out DIR --xp numpy --z 16 --y 128 --x 128   # CPU dry run

1. Small checks: fresh random inputs at a few sizes, every function on the device vs _core on
   the host, exact (grey_mean of float32 images up to the rounding of its float64 sum). Each check prints PASS/FAIL;
   exceptions are caught and reported per check.
2. Full size: a 3-class probability volume (material cylinder; pores and inclusions as random
   ellipsoids of radius 1-8; smooth fields plus hash noise) and a uint16 grey volume, generated
   slab by slab on the device from a fixed seed (never held whole). aggregate + components +
   table are timed over all slices (warm-up first, median of --repeats); generation is not.
   Then one more pass compares against _core (aggregate per slab and ComponentLabeller
   streamed, on host copies).
3. The device labeller's union-find and component statistics against the way each was done before (scatter
   and pointer-jumping rounds), on a slab-sized percolating graph: same results, median seconds.
4. On the GPU, last: the GPU stage's fused Triton kernels (xctrt.gpu.resample), exact against _core,
   and their time per slice against the step-by-step ones. JSON goes to DIR/gpu_post.json.
"""
from __future__ import annotations

import argparse
import json
import platform
import sys
import time
import traceback
from pathlib import Path

import numpy as np

sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "python"))

from xctrt import _core  # noqa: E402
from xctrt.gpu import post  # noqa: E402
from xctrt.io import commit_json, output_file  # noqa: E402

THRESHOLDS = np.array([0.5, 0.5, 0.5], np.float32)
LABEL_IDS = np.array([1, 2, 3], np.uint8)  # channels: material, pore, inclusion
PRIORITY = np.array([2, 1, 0])  # inclusion > pore > material
DTYPES = (np.uint8, np.uint16, np.float32)


class Checks:
    def __init__(self):
        self.results = {}

    def run(self, name, fn):
        try:
            ok, detail = fn()
        except Exception as exc:  # report and go on: one broken check must not hide the others
            ok, detail = False, f"{type(exc).__name__}: {exc}"
            traceback.print_exc(limit=4)
        self.results[name] = {"pass": bool(ok), "detail": detail}
        print(f"{'PASS' if ok else 'FAIL'}  {name}{'' if ok else '  ' + str(detail)}", flush=True)
        return ok


def same(got, ref):
    got = post.to_host(got)
    if got.dtype != ref.dtype or got.shape != ref.shape:
        return False, f"dtype/shape {got.dtype}{got.shape} vs {ref.dtype}{ref.shape}"
    bad = int(np.count_nonzero(~((got == ref) | (np.isnan(got) & np.isnan(ref)))
                               if got.dtype.kind == "f" else got != ref))
    return bad == 0, f"{bad} of {ref.size} differ"


def same_table(got, ref, float_image=False):
    if list(got) != list(ref):
        return False, "columns differ"
    bad = []
    for k in ref:
        if got[k].dtype != ref[k].dtype or got[k].shape != ref[k].shape:
            bad.append(f"{k}: {got[k].dtype}{got[k].shape} vs {ref[k].dtype}{ref[k].shape}")
        elif float_image and k == "grey_mean":
            # float64 sums of float32 grey values, in another order on the GPU (atomic adds): within
            # the rounding bound of n additions of positive values (the checks' images are positive)
            bound = np.abs(ref[k]) * ref["voxels"] * np.finfo(np.float64).eps
            if not np.all((np.abs(got[k] - ref[k]) <= bound) | (np.isnan(got[k]) & np.isnan(ref[k]))):
                bad.append(k)
        elif not np.array_equal(got[k], ref[k], equal_nan=ref[k].dtype.kind == "f"):  # NaN: no surface
            bad.append(k)
    return not bad, f"{len(ref['id'])} components" + (f"; differ: {bad}" if bad else "")


# ---------------------------------------------------------------- 1. small checks

def small_checks(xp, checks: Checks, seed: int):
    rng = np.random.default_rng(seed)
    dev = xp.asarray

    def rand_slice(shape, dtype):
        if dtype == np.uint8:
            return rng.integers(0, 256, shape, dtype=np.uint8), 10.0, 200.0
        if dtype == np.uint16:
            return rng.integers(0, 65536, shape, dtype=np.uint16), 1000.5, 50000.0
        return (rng.standard_normal(shape) * 3).astype(np.float32), -2.0, 2.5

    for shape in [(1, 1), (257, 300), (1024, 1024)]:
        for dt in DTYPES:
            s, lo, hi = rand_slice(shape, dt)
            checks.run(f"window {np.dtype(dt).name} {shape}",
                       lambda: same(post.window(dev(s), lo, hi), _core.window(s, lo, hi)))
    for (c, h, w), (oh, ow) in [((1, 7, 9), (33, 5)), ((3, 100, 120), (256, 256)),
                                ((3, 1024, 1024), (1200, 1300)), ((3, 1200, 1200), (256, 256))]:
        img = rng.standard_normal((c, h, w)).astype(np.float32)
        checks.run(f"resize_bilinear {(c, h, w)}->{(oh, ow)}",
                   lambda: same(post.resize_bilinear(dev(img), oh, ow), _core.resize_bilinear(img, oh, ow)))
    batch = rng.standard_normal((4, 3, 64, 80)).astype(np.float32)
    checks.run("resize_bilinear batch (4,3,64,80)->(256,256)",
               lambda: same(post.resize_bilinear(dev(batch), 256, 256),
                            np.stack([_core.resize_bilinear(b, 256, 256) for b in batch])))
    for mode in ("priority", "argmax"):
        for shape in [(3, 5, 7), (4, 512, 600), (3, 1200, 1200)]:
            p = rng.random(shape).astype(np.float32)
            p[:, ::3] = np.floor(p[:, ::3] * 4) / 4  # ties and values on the threshold
            k = shape[0]
            thr, ids = rng.choice([0.25, 0.5, 0.75], k).astype(np.float32), np.arange(1, k + 1, dtype=np.uint8)
            prio = rng.permutation(k)
            checks.run(f"aggregate {mode} {shape}",
                       lambda: same(post.aggregate(dev(p), thr, ids, prio, mode),
                                    _core.aggregate(p, thr, ids, prio, mode)))
        pb = rng.random((5, 3, 64, 64)).astype(np.float32)
        checks.run(f"aggregate {mode} batch (5,3,64,64)",
                   lambda: same(post.aggregate(dev(pb), THRESHOLDS, LABEL_IDS, PRIORITY, mode),
                                np.stack([_core.aggregate(b, THRESHOLDS, LABEL_IDS, PRIORITY, mode) for b in pb])))
    for (h, w), tile, ov in [((300, 280), 64, 16), ((1200, 1200), 256, 32), ((50, 40), 64, 8)]:
        for pad in ("edge", "constant"):
            s, lo, hi = rand_slice((h, w), np.uint16)
            checks.run(f"extract_tiles {pad} {(h, w)} tile {tile}/{ov}",
                       lambda: same(post.extract_tiles(dev(s), tile, ov, lo, hi, pad),
                                    _core.extract_tiles(s, tile, ov, lo, hi, pad)))
        nt = len(_core.tile_starts(h, tile, ov)) * len(_core.tile_starts(w, tile, ov))
        t = rng.random((nt, 3, tile, tile)).astype(np.float32)
        for blend in ("constant", "ramp"):
            checks.run(f"stitch_tiles {blend} {(h, w)} tile {tile}/{ov}",
                       lambda: same(post.stitch_tiles(dev(t), h, w, ov, blend),
                                    _core.stitch_tiles(t, h, w, ov, blend)))

    # the labeller's air labelling (union-find kernels on the GPU) against SciPy's numbering, on noise
    # (fragmented air, long union chains) and on a slab the size the bench hands it
    from scipy import ndimage
    for shape, air in [((1, 1, 1), 1.0), ((3, 7, 5), 0.5), ((16, 300, 280), 0.38), ((8, 1200, 1200), 0.6)]:
        lab = np.where(rng.random(shape) < air, 0, 1).astype(np.uint8)

        def air_label():
            comp, n = post.air_label(dev(lab))
            want, n_want = ndimage.label(lab == 0)
            ok, detail = same(comp, want.astype(np.int32))
            return ok and n == n_want, detail if not ok else f"{n} components (SciPy {n_want})"
        checks.run(f"air_label {shape} air {air}", air_label)

    # the components' union-find (post._connect: kernels on the GPU, their _core twins on the host), on random
    # graphs and on a chain of shuffled nodes (deep trees), against each node's smallest connected node
    from scipy.sparse import coo_matrix
    from scipy.sparse.csgraph import connected_components
    for n, m, chain in [(1, 0, False), (50, 80, False), (200_000, 150_000, False), (2_000_000, 1_999_999, True)]:
        if chain:
            order = rng.permutation(n).astype(np.int32)
            a, b = order[:-1], order[1:]
        else:
            a, b = rng.integers(0, n, m).astype(np.int32), rng.integers(0, n, m).astype(np.int32)

        def connect():
            _, comp = connected_components(coo_matrix((np.ones(len(a)), (a, b)), shape=(n, n)), directed=False)
            first = np.full(int(comp.max()) + 1, n, np.int64)
            np.minimum.at(first, comp, np.arange(n))
            return same(post._connect(n, dev(a), dev(b)), first[comp].astype(np.int32))
        checks.run(f"union-find {n} nodes {len(a)} edges{' chain' if chain else ''}", connect)

    def blobs(shape, n):
        lab = np.ones(shape, np.uint8)
        for _ in range(n):
            c = rng.uniform(0, shape)
            r = rng.uniform(0.5, 6, 3)
            sl = tuple(slice(max(0, int(c[i] - r[i]) - 1), min(shape[i], int(c[i] + r[i]) + 2))
                       for i in range(3))
            zz, yy, xx = np.ogrid[sl]
            m = ((zz - c[0]) / r[0]) ** 2 + ((yy - c[1]) / r[1]) ** 2 + ((xx - c[2]) / r[2]) ** 2 <= 1
            lab[sl][m] = rng.integers(2, 4)
        return lab

    cases = [("blobs", (40, 64, 64), lambda s: blobs(s, 80)),
             ("blobs", (96, 200, 180), lambda s: blobs(s, 600)),
             ("noise", (17, 33, 45), lambda s: rng.choice(4, s, p=[0.4, 0.3, 0.15, 0.15]).astype(np.uint8)),
             ("dense noise", (64, 256, 256), lambda s: rng.integers(0, 4, s, dtype=np.uint8))]
    for kind, shape, make in cases:
        lab = make(shape)
        for conn in (6, 18, 26):
            dt = DTYPES[conn % 3]
            img = (rng.integers(0, 256 if dt == np.uint8 else 65536, shape).astype(dt) if dt != np.float32
                   else rng.uniform(0, 1000, shape).astype(np.float32))
            for slab in (1, 5, shape[0]):
                if slab == 1 and shape[0] * shape[1] * shape[2] > 300000:
                    continue  # one plane per call is slow through Python; thin slabs are covered above
                vs = (0.5, 1.0, 2.0)
                mv = 3 if slab == 5 else 0

                def comp():
                    ref = _core.ComponentLabeller(shape, [2, 3], conn, vs)
                    got = post.ComponentLabeller(shape, [2, 3], conn, vs)
                    for z in range(0, shape[0], slab):
                        ref.add_slab(lab[z:z + slab], img[z:z + slab])
                        got.add_slab(dev(lab[z:z + slab]), dev(img[z:z + slab]))
                    return same_table(got.finish(mv), ref.finish(mv), dt == np.float32)

                checks.run(f"components {kind} {shape} conn {conn} slab {slab} {np.dtype(dt).name}", comp)
            checks.run(f"label_volume {kind} {shape} conn {conn}",
                       lambda: same(post.label_volume(dev(lab), [2, 3], conn), _core.label_volume(lab, [2, 3], conn)))

    # Edge cases: no defect at all (empty sorts and scatters), defects but no air (labelling an all-False
    # mask) with an empty slab, and a float32 image with NaN at defect voxels (skipped by min/max).
    shape = (6, 9, 10)
    u16 = rng.integers(0, 65536, shape, dtype=np.uint16)
    no_air = np.ones(shape, np.uint8)
    no_air[2:4, 3:6, 4:7] = 2
    noise = rng.choice(4, shape, p=[0.3, 0.3, 0.2, 0.2]).astype(np.uint8)
    f32 = rng.uniform(0, 1000, shape).astype(np.float32)
    f32[(noise >= 2) & (rng.random(shape) < 0.2)] = np.nan
    for name, lab, img, slabs, float_image in [("no defects", np.ones(shape, np.uint8), u16, [2, 2, 2], False),
                                                ("defects, no air, an empty slab", no_air, u16, [1, 0, 2, 3], False),
                                                ("float32 image with NaN", noise, f32, [1, 2, 3], True)]:
        def edge_case():
            ref = _core.ComponentLabeller(shape, [2, 3], 26, (0.5, 1.0, 2.0))
            got = post.ComponentLabeller(shape, [2, 3], 26, (0.5, 1.0, 2.0))
            z = 0
            for d in slabs:
                ref.add_slab(lab[z:z + d], img[z:z + d])
                got.add_slab(dev(lab[z:z + d]), dev(img[z:z + d]))
                z += d
            return same_table(got.finish(1), ref.finish(1), float_image)

        checks.run(f"components {name} {shape}", edge_case)


# ---------------------------------------------------------------- 1b. the GPU stage's fused kernels

def fused_checks(checks: Checks, seed: int) -> dict:
    """xctrt.gpu.resample's Triton kernels (torch CUDA tensors) vs _core, exact, at the bench's sizes and
    the shipped packages' tiling; then their time per 1200x1200 slice against the step-by-step CuPy
    functions above (32 slices)."""
    import cupy
    import torch

    from xctrt.gpu import resample

    rng = np.random.default_rng(seed + 1)
    cuda = torch.device("cuda")
    for dt, lo, hi in ((np.uint16, 1000.5, 50000.0), (np.uint8, 10.0, 200.0), (np.float32, -2.0, 2.5)):
        s = (rng.integers(0, np.iinfo(dt).max, (2, 1200, 1100), endpoint=True).astype(dt) if dt != np.float32
             else (rng.standard_normal((2, 1200, 1100)) * 3).astype(np.float32))
        t = torch.from_numpy(s.view(np.int16) if dt == np.uint16 else s).to(cuda)
        ref = np.stack([_core.resize_bilinear(_core.window(x, lo, hi), 1024, 1024) for x in s])[:, None]
        checks.run(f"fused window_resize {np.dtype(dt).name} (2,1200,1100)->1024",
                   lambda: same(resample.window_resize(t, lo, hi, 1024).cpu().numpy(), ref))
    for mode in ("priority", "argmax"):
        p = rng.random((3, 3, 1024, 1024)).astype(np.float32)
        p[:, :, ::3] = np.floor(p[:, :, ::3] * 4) / 4  # ties and values on the threshold
        ref = np.stack([_core.aggregate(_core.resize_bilinear(b, 1200, 1100), THRESHOLDS, LABEL_IDS, PRIORITY, mode)
                        for b in p])

        def agg(probs):
            out = torch.empty((3, 1200, 1100), dtype=torch.uint8, device=cuda)
            counts = torch.zeros(256, dtype=torch.int64, device=cuda)
            resample.resize_aggregate(probs, out, THRESHOLDS, LABEL_IDS, PRIORITY, mode, counts=counts)
            ok, detail = same(out.cpu().numpy(), ref)
            good_counts = np.array_equal(counts.cpu().numpy(), np.bincount(ref.reshape(-1), minlength=256))
            return ok and good_counts, f"{detail}; counts {'agree' if good_counts else 'DIFFER'}"

        checks.run(f"fused resize_aggregate {mode} (3,3,1024,1024)->(1200,1100)", lambda: agg(torch.from_numpy(p).to(cuda)))
    pb = torch.from_numpy(rng.random((2, 3, 1024, 1024)).astype(np.float32)).to(cuda).to(torch.bfloat16)
    ref = np.stack([_core.aggregate(_core.resize_bilinear(b, 1200, 1200), THRESHOLDS, LABEL_IDS, PRIORITY)
                    for b in pb.float().cpu().numpy()])
    out_bf = torch.empty((2, 1200, 1200), dtype=torch.uint8, device=cuda)
    checks.run("fused resize_aggregate bf16 probabilities",
               lambda: same(resample.resize_aggregate(pb, out_bf, THRESHOLDS, LABEL_IDS, PRIORITY).cpu().numpy(), ref))

    for pad in ("edge", "constant"):   # tile mode, as the shipped packages: 256 tiles, overlap 32, ramp
        s = rng.integers(0, 65536, (2, 1200, 1100), dtype=np.uint16)
        t = torch.from_numpy(s.view(np.int16)).to(cuda)
        ref = np.concatenate([_core.extract_tiles(x, 256, 32, 1000.5, 50000.0, pad) for x in s])[:, None]
        checks.run(f"fused extract_tiles {pad} (2,1200,1100) tile 256/32",
                   lambda: same(resample.extract_tiles(t, 256, 32, 1000.5, 50000.0, pad).cpu().numpy(), ref))
    nt = len(_core.tile_starts(1200, 256, 32)) * len(_core.tile_starts(1100, 256, 32))
    pt = rng.random((2 * nt, 3, 256, 256)).astype(np.float32)
    for blend in ("ramp", "constant"):
        ref = np.stack([_core.aggregate(_core.stitch_tiles(pt[i * nt:(i + 1) * nt], 1200, 1100, 32, blend), THRESHOLDS,
                                        LABEL_IDS, PRIORITY) for i in range(2)])
        out_t = torch.empty((2, 1200, 1100), dtype=torch.uint8, device=cuda)
        checks.run(f"fused stitch_aggregate {blend} 2x(1200,1100) tile 256/32",
                   lambda: same(resample.stitch_aggregate(torch.from_numpy(pt).to(cuda), out_t, 32, blend, THRESHOLDS,
                                                          LABEL_IDS, PRIORITY).cpu().numpy(), ref))

    # time per slice, 32 slices: fused vs step by step (CuPy, one kernel per float32 operation)
    n = 32
    raw = torch.randint(0, 65536, (n, 1200, 1200), dtype=torch.int32, device=cuda).to(torch.int16)
    probs = torch.rand((n, 3, 1024, 1024), device=cuda)
    labels = torch.empty((n, 1200, 1200), dtype=torch.uint8, device=cuda)
    raw_cp, probs_cp = cupy.from_dlpack(raw).view(np.uint16), cupy.from_dlpack(probs)
    nt_full = len(_core.tile_starts(1200, 256, 32)) ** 2
    tile_probs = torch.rand((n * nt_full, 3, 256, 256), device=cuda)
    tile_probs_cp = cupy.from_dlpack(tile_probs)
    runs = {
        "preprocess fused": lambda: resample.window_resize(raw, 1000.0, 50000.0, 1024),
        "preprocess step-by-step": lambda: post.resize_bilinear(post.window(raw_cp, 1000.0, 50000.0), 1024, 1024),
        "aggregate fused": lambda: resample.resize_aggregate(probs, labels, THRESHOLDS, LABEL_IDS, PRIORITY),
        "aggregate step-by-step": lambda: post.aggregate(post.resize_bilinear(probs_cp, 1200, 1200), THRESHOLDS,
                                                         LABEL_IDS, PRIORITY),
        "tiles fused": lambda: resample.extract_tiles(raw, 256, 32, 1000.0, 50000.0),
        "tiles step-by-step": lambda: cupy.concatenate([post.extract_tiles(r, 256, 32, 1000.0, 50000.0)
                                                        for r in raw_cp]),
        "stitch fused": lambda: resample.stitch_aggregate(tile_probs, labels, 32, "ramp", THRESHOLDS, LABEL_IDS,
                                                          PRIORITY),
        "stitch step-by-step": lambda: post.aggregate(cupy.stack([post.stitch_tiles(
            tile_probs_cp[i * nt_full:(i + 1) * nt_full], 1200, 1200, 32, "ramp") for i in range(n)]), THRESHOLDS,
            LABEL_IDS, PRIORITY),
    }
    timing = {}
    for name, fn in runs.items():
        fn()
        torch.cuda.synchronize()
        ms = []
        for _ in range(5):
            a, b = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
            a.record()
            fn()
            b.record()
            b.synchronize()
            ms.append(a.elapsed_time(b))
        timing[name] = float(np.median(ms)) / n
        print(f"  {name}: {timing[name]:.4f} ms per 1200x1200 slice", flush=True)
    return {"ms_per_slice": timing}


# ---------------------------------------------------------------- 2. full-size volume

class Phantom:
    """Deterministic probabilities and grey values of any slab, generated on the device."""

    def __init__(self, xp, shape, seed=0, fraction=0.02):
        self.xp, self.shape = xp, shape
        Z, Y, X = shape
        rng = np.random.default_rng(seed)
        self.cy, self.cx, self.R = (Y - 1) / 2, (X - 1) / 2, 0.45 * min(Y, X)
        # Mean ellipsoid volume with radii ~U(1, 8): 4/3 pi 4.5^3 voxels, ~3/4 of it above 0.5.
        n = max(1, int(fraction * Z * Y * X / (4 / 3 * np.pi * 4.5 ** 3 * 0.75)))
        ang, rad = rng.uniform(0, 2 * np.pi, n), (self.R - 9) * np.sqrt(rng.random(n))
        d = np.stack([rng.uniform(0, Z, n), self.cy + rad * np.sin(ang), self.cx + rad * np.cos(ang)], 1)
        r = rng.uniform(1, 8, (n, 3))
        chan = np.where(rng.random(n) < 0.7, 1, 2)  # 70 % pores, 30 % inclusions
        order = np.argsort(d[:, 0])
        self.centre, self.radius, self.chan = d[order], r[order], chan[order]
        self.box = np.stack(np.meshgrid(*[np.arange(-9, 10)] * 3, indexing="ij"), -1).reshape(-1, 3)

    def noise(self, z0, nz, salt):
        """Hash noise in [-0.5, 0.5) per voxel (uint32 arithmetic wraps the same in NumPy and CuPy)."""
        xp = self.xp
        plane = self.shape[1] * self.shape[2]
        h = xp.arange(nz * plane, dtype=np.uint32) + np.uint32((z0 * plane + salt * 0x9E3779B9) & 0xFFFFFFFF)
        h = h * np.uint32(2654435761)
        h = h ^ (h >> np.uint32(15))
        h = h * np.uint32(2246822519)
        h = h ^ (h >> np.uint32(13))
        return ((h >> np.uint32(8)).astype(np.float32) * np.float32(1 / 2 ** 24) - np.float32(0.5)).reshape(
            nz, self.shape[1], self.shape[2])

    def slab(self, z0, z1):
        xp = self.xp
        Z, Y, X = self.shape
        nz = z1 - z0
        yy = xp.arange(Y, dtype=np.float32)[:, None] - np.float32(self.cy)
        xx = xp.arange(X, dtype=np.float32)[None, :] - np.float32(self.cx)
        dist = xp.clip(np.float32(self.R) - xp.sqrt(yy * yy + xx * xx), -60, 60)
        material = (np.float32(1) / (np.float32(1) + xp.exp(-dist / np.float32(2))))[None]
        defects = xp.zeros((2, nz * Y * X), np.float32)
        lo, hi = np.searchsorted(self.centre[:, 0], [z0 - 9, z1 + 9])
        for c0 in range(lo, hi, 2000):  # rasterise ellipsoids in chunks: value 1 - q/2 (0.5 at q = 1)
            c1 = min(hi, c0 + 2000)
            cen, rad = xp.asarray(self.centre[c0:c1]), xp.asarray(self.radius[c0:c1])
            pos = xp.floor(cen)[:, None, :] + xp.asarray(self.box)[None]  # (n, 6859, 3)
            q = (((pos - cen[:, None, :]) / rad[:, None, :]) ** 2).sum(-1)
            v = (1 - 0.5 * q).astype(np.float32)
            ok = (v > 0) & (pos[..., 0] >= z0) & (pos[..., 0] < z1) & (pos[..., 1] >= 0) & \
                (pos[..., 1] < Y) & (pos[..., 2] >= 0) & (pos[..., 2] < X)
            p = pos.astype(np.int64)
            flat = ((p[..., 0] - z0) * Y + p[..., 1]) * X + p[..., 2]
            ch = xp.broadcast_to(xp.asarray(self.chan[c0:c1] - 1)[:, None], flat.shape)
            post.scatter_max(defects, (ch[ok], flat[ok]), v[ok])
        defects = defects.reshape(2, nz, Y, X)
        probs = xp.empty((3, nz, Y, X), np.float32)
        for c, field in enumerate([xp.broadcast_to(material, (nz, Y, X)), defects[0], defects[1]]):
            probs[c] = xp.clip(field + np.float32(0.08) * self.noise(z0, nz, c), 0, 1)
        grey = (np.float32(8000) + np.float32(30000) * material - np.float32(20000) * defects[0]
                + np.float32(15000) * defects[1] + np.float32(2000) * self.noise(z0, nz, 7))
        return probs, xp.clip(grey, 0, 65535).astype(np.uint16)


def full_run(xp, shape, slab, repeats, checks: Checks, seed: int):
    Z = shape[0]
    ph = Phantom(xp, shape, seed)
    pool = xp.get_default_memory_pool() if xp is not np else None
    peak = [0]
    surface_runs = {}

    def sync():
        if xp is not np:
            xp.cuda.Device().synchronize()
            peak[0] = max(peak[0], pool.total_bytes())

    def one_pass(compare=False):
        t = {"aggregate": 0.0, "components": 0.0, "finish": 0.0}
        lb = post.ComponentLabeller(shape, (2, 3), 26)
        ref = _core.ComponentLabeller(shape, [2, 3], 26) if compare else None
        label_bad = 0
        defect_voxels = 0
        for z0 in range(0, Z, slab):
            z1 = min(Z, z0 + slab)
            probs, grey = ph.slab(z0, z1)
            sync()
            t0 = time.perf_counter()
            labels = post.aggregate(probs.transpose(1, 0, 2, 3), THRESHOLDS, LABEL_IDS, PRIORITY)
            sync()
            t1 = time.perf_counter()
            lb.add_slab(labels, grey)
            sync()
            t2 = time.perf_counter()
            t["aggregate"] += t1 - t0
            t["components"] += t2 - t1
            if compare:
                ph_host = post.to_host(probs)
                ref_lab = _core.aggregate(ph_host, THRESHOLDS, LABEL_IDS, PRIORITY)
                label_bad += int(np.count_nonzero(ref_lab != post.to_host(labels)))
                defect_voxels += int(np.count_nonzero(ref_lab >= 2))
                ref.add_slab(ref_lab, post.to_host(grey))
            del probs, grey, labels
        sync()
        t0 = time.perf_counter()
        table = lb.finish(0)
        sync()
        t["finish"] = time.perf_counter() - t0
        t["finish_surface_distance"] = lb.surface_distance_s  # part of finish
        t["finish_surface_tree"] = lb.surface_tree_s          # part of that: outside air, wait for the host kd-tree
        t["finish_outside_air"] = lb.outside_air_s            # part of that: the outside air alone
        t["finish_resolve"] = lb.resolve_s                    # part of finish: the slabs' components merged
        t["finish_columns"] = lb.columns_s                    # ... and the table's columns made (beside the search)
        surface_runs.update(lb.surface_runs)                  # the tree's and the searches' sizes
        t["total"] = t["aggregate"] + t["components"] + t["finish"]
        if compare:
            return t, table, ref.finish(0), label_bad, defect_voxels
        return t, table

    times = []
    for rep in range(1 + repeats):
        t, table = one_pass()
        if rep:  # the first pass warms up (CuPy compiles its kernels)
            times.append(t)
        print(f"  pass {rep}{' (warm-up)' if rep == 0 else ''}: " +
              ", ".join(f"{k} {v:.3f} s" for k, v in t.items()), flush=True)
    med = {k: float(np.median([t[k] for t in times])) for k in times[0]} if times else {}
    out = {"times_s": times, "median_s": med, "components": int(len(table["id"])),
           "surface_search_on_host_because": post.air_search_error(),
           "labeller_kernels_on_host_because": post.kernel_error(post.LABELLER), "surface_runs": dict(surface_runs)}

    def compare():
        t, got, ref, label_bad, defect_voxels = one_pass(compare=True)
        out["defect_voxels"] = defect_voxels
        out["defect_fraction"] = defect_voxels / float(np.prod(shape))
        out["components_cpp"] = int(len(ref["id"]))
        ok_t, detail = same_table(got, ref)
        return label_bad == 0 and ok_t, f"{label_bad} labels differ; {detail}"

    checks.run(f"full size {shape}: aggregate labels and table vs _core", compare)
    out["gpu_peak_pool_bytes"] = peak[0]
    return out


def _connect_rounds(xp, n, a, b):
    """The device labeller's union-find before 0ec3887 (the baseline of labeller_ab): scatter-min hooking and
    pointer jumping in rounds, each check a host sync."""
    parent = xp.arange(n, dtype=np.int32)
    while a.size:
        post.scatter_min(parent, xp.maximum(a, b), xp.minimum(a, b))
        while True:
            pp = parent[parent]
            ppp = pp[pp]
            parent = ppp
            if not bool((ppp != pp).any()):
                break
        a, b = parent[a], parent[b]
        keep = xp.flatnonzero(a != b)
        a, b = a[keep], b[keep]
    return parent


def _stats_scatter(xp, pid, stats, zyx, g, nloc):
    """The device labeller's component statistics before its kernel (the baseline of labeller_ab): one
    atomic per voxel and column, CuPy's scatter kernels."""
    nan = xp.isnan(g)
    out = {"sums": post.segment_sum(pid, nloc, stats), "min": xp.full((nloc, 3), 2 ** 31 - 1, np.int32),
           "max": xp.full((nloc, 3), -1, np.int32), "gsum": post.segment_sum(pid, nloc, g.astype(np.float64)),
           "gmin": xp.full(nloc, np.inf, np.float32), "gmax": xp.full(nloc, -np.inf, np.float32)}
    post.scatter_min(out["min"], pid, zyx)
    post.scatter_max(out["max"], pid, zyx)
    post.scatter_min(out["gmin"], pid, xp.where(nan, np.float32(np.inf), g))
    post.scatter_max(out["gmax"], pid, xp.where(nan, np.float32(-np.inf), g))
    return out


def labeller_ab(xp, checks: Checks, seed: int, shape=(16, 600, 600), repeats: int = 3) -> dict:
    """The device labeller's union-find and component statistics, each against the way it was done before
    (same inputs, same results checked, median seconds of `repeats` after a warm-up): the defect voxels of
    a noise slab whose bonds percolate (a giant component, as a random network's labels have), joined to
    their x-1, y-1 and z-1 neighbours with probability 0.6; then their statistics rows summed per
    component."""
    rng = np.random.default_rng(seed + 7)
    nz, ny, nx = shape
    n = nz * ny * nx
    v = np.arange(n, dtype=np.int64)
    a_parts, b_parts = [], []
    for step, ok in ((1, v % nx > 0), (nx, (v // nx) % ny > 0), (ny * nx, v >= ny * nx)):
        keep = ok & (rng.random(n) < 0.6)
        a_parts.append(v[keep].astype(np.int32))
        b_parts.append((v[keep] - step).astype(np.int32))
    order = rng.permutation(sum(len(x) for x in a_parts))   # edges in no particular order
    a, b = xp.asarray(np.concatenate(a_parts)[order]), xp.asarray(np.concatenate(b_parts)[order])

    def sync():
        if xp is not np:
            xp.cuda.Device().synchronize()

    def timed(fn):
        fn()
        sync()
        times = []
        for _ in range(repeats):
            t0 = time.perf_counter()
            out = fn()
            sync()
            times.append(time.perf_counter() - t0)
        return float(np.median(times)), out

    t_kernels, root = timed(lambda: post._connect(n, a, b))
    t_rounds, root_rounds = timed(lambda: _connect_rounds(xp, n, a, b))
    checks.run(f"labeller_ab union-find {n} nodes {int(a.size)} edges: kernels as rounds",
               lambda: same(root, post.to_host(root_rounds)))
    comp, roots, nloc = post._rank_roots(xp, root)
    stats = xp.asarray(rng.integers(0, 3, (n, 18)).astype(np.float64))
    zyx = xp.asarray(np.stack(np.unravel_index(np.arange(n), shape), 1).astype(np.int32))
    g = xp.asarray(rng.integers(0, 65536, n).astype(np.float32))
    t_stats, got = timed(lambda: post.component_stats(comp, stats, zyx, g, nloc))
    t_scatter, want = timed(lambda: _stats_scatter(xp, comp, stats, zyx, g, nloc))

    def same_stats():
        bad = [k for k in want if not same(got[k], post.to_host(want[k]))[0]]
        return not bad, f"{nloc} components; differ: {bad}" if bad else f"{nloc} components, all columns equal"
    checks.run("labeller_ab component statistics: kernel as scatters", same_stats)
    sizes = np.bincount(post.to_host(comp))
    out = {"shape": list(shape), "nodes": n, "edges": int(a.size), "components": int(nloc),
           "largest_component": int(sizes.max()), "repeats": repeats,
           "union_find_s": {"kernels": round(t_kernels, 5), "rounds": round(t_rounds, 5)},
           "component_stats_s": {"kernel": round(t_stats, 5), "scatter": round(t_scatter, 5)}}
    print(f"labeller A/B on {n:,} defect voxels ({nloc:,} components, the largest {out['largest_component']:,}): "
          f"union-find kernels {t_kernels * 1e3:.2f} ms vs rounds {t_rounds * 1e3:.2f} ms; statistics kernel "
          f"{t_stats * 1e3:.2f} ms vs scatters {t_scatter * 1e3:.2f} ms", flush=True)
    return out


def main(argv=None):
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--out", required=True, type=Path)
    ap.add_argument("--xp", choices=["cupy", "numpy"], default="cupy")
    ap.add_argument("--z", type=int, default=1000)
    ap.add_argument("--y", type=int, default=1200)
    ap.add_argument("--x", type=int, default=1200)
    ap.add_argument("--slab", type=int, default=None, help="planes per slab (default 64; z/3 for small z)")
    ap.add_argument("--repeats", type=int, default=3)
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--skip-small", action="store_true")
    args = ap.parse_args(argv)
    t_start = time.perf_counter()
    if args.xp == "cupy":
        import cupy as xp
    else:
        xp = np
    args.out.mkdir(parents=True, exist_ok=True)
    info = {"xp": args.xp, "numpy": np.__version__, "python": platform.python_version()}
    if xp is not np:
        info.update(cupy=xp.__version__, cuda_runtime=xp.cuda.runtime.runtimeGetVersion(),
                    cuda_driver=xp.cuda.runtime.driverGetVersion(),
                    device=xp.cuda.runtime.getDeviceProperties(0)["name"].decode())
    print(json.dumps(info), flush=True)
    checks = Checks()
    shape = (args.z, args.y, args.x)
    args.slab = args.slab or (64 if args.z >= 192 else max(1, args.z // 3))  # small runs still cross slabs
    full, fused, ab = {}, {}, {}

    def save() -> dict:   # after each part, renamed into place: a step stopped by its time limit keeps the rest
        n_pass = sum(r["pass"] for r in checks.results.values())
        result = {"info": info, "shape": shape, "slab": args.slab, "full": full, "fused": fused, "labeller_ab": ab,
                  "checks": checks.results, "passed": n_pass, "failed": len(checks.results) - n_pass,
                  "wall_s": time.perf_counter() - t_start}
        commit_json(output_file(args.out / "gpu_post.json"), result)
        return result

    if not args.skip_small:
        t0 = time.perf_counter()
        small_checks(xp, checks, args.seed)
        info["small_checks_s"] = time.perf_counter() - t0
        save()
    if not args.skip_small:
        try:
            ab = labeller_ab(xp, checks, args.seed, shape=(16, 600, 600) if xp is not np else (4, 64, 64))
        except Exception as exc:
            traceback.print_exc()
            checks.results["labeller_ab"] = {"pass": False, "detail": f"{type(exc).__name__}: {exc}"}
            print(f"FAIL  labeller_ab  {type(exc).__name__}: {exc}")
        save()
    print(f"full size {shape}, slabs of {args.slab}", flush=True)
    try:
        full = full_run(xp, shape, args.slab, args.repeats, checks, args.seed)
    except Exception as exc:
        traceback.print_exc()
        checks.results["full size run"] = {"pass": False, "detail": f"{type(exc).__name__}: {exc}"}
        print(f"FAIL  full size run  {type(exc).__name__}: {exc}")
    save()
    # last: a fault in a new kernel would leave this process's CUDA context unusable
    if xp is not np and not args.skip_small:
        try:
            fused = fused_checks(checks, args.seed)
        except Exception as exc:
            traceback.print_exc()
            checks.results["fused kernels"] = {"pass": False, "detail": f"{type(exc).__name__}: {exc}"}
            print(f"FAIL  fused kernels  {type(exc).__name__}: {exc}")
    result = save()
    n_pass = result["passed"]

    med = full.get("median_s", {})
    print("\n| what | value |\n| --- | --- |")
    rows = [("device", info.get("device", "cpu (numpy)")), ("volume", "x".join(map(str, shape))),
            ("defect voxels", f"{full.get('defect_fraction', float('nan')) * 100:.2f} %"),
            ("components (post / _core)", f"{full.get('components')} / {full.get('components_cpp')}")]
    rows += [(f"{k} (median of {len(full.get('times_s', []))})", f"{v:.3f} s") for k, v in med.items()]
    rows += [(f"{k} (32 slices)", f"{v:.4f} ms per slice") for k, v in fused.get("ms_per_slice", {}).items()]
    rows += [("peak device pool", f"{full.get('gpu_peak_pool_bytes', 0) / 2 ** 30:.2f} GiB"),
             ("checks", f"{n_pass} passed, {len(checks.results) - n_pass} failed"),
             ("wall", f"{result['wall_s']:.1f} s")]
    for k, v in rows:
        print(f"| {k} | {v} |")
    return 0 if n_pass == len(checks.results) else 1


if __name__ == "__main__":
    sys.exit(main())
