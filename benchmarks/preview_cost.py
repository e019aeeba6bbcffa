"""What preview.png costs at the end of a run with a random network's outside air (issue 5's tail).

    python benchmarks/preview_cost.py [--runs 5200000] [--shape 1000 1200 1200] [--repeat 3]

On a synthetic run of that size (random mid-planes, `--runs` random outside-air x-runs, as the H200
bench's shared mode had 5.2 M), times in one process, best of `--repeat`:
- the enclosed-air marking of the three mid-planes (preview.mark_enclosed_air, int32 column views)
  against the same marking of an int64 copy of the runs (it used to copy the columns to int64);
- the preview's PNG encoding at zlib level 1 (write_preview) against PIL's default level 6, with the
  file sizes. Both pairs must give the same pixels; the script exits 1 if not.
"""
from __future__ import annotations

import argparse
import io
import sys
import tempfile
import time
from pathlib import Path

import numpy as np
from PIL import Image

sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "python"))

from xctrt.preview import mark_enclosed_air, write_preview  # noqa: E402


def best(fn, repeat):
    times, out = [], None
    for _ in range(repeat):
        t0 = time.perf_counter()
        out = fn()
        times.append(time.perf_counter() - t0)
    return min(times), out


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--runs", type=int, default=5_200_000)
    ap.add_argument("--shape", type=int, nargs=3, default=[1000, 1200, 1200])
    ap.add_argument("--repeat", type=int, default=3)
    args = ap.parse_args()
    Z, Y, X = shape = tuple(args.shape)
    rng = np.random.default_rng(0)
    m = args.runs
    x0 = rng.integers(0, X - 10, m)
    runs = np.stack([rng.integers(0, Z, m), rng.integers(0, Y, m), x0, x0 + rng.integers(0, 10, m)], 1).astype(np.int32)
    planes = {k: (rng.integers(0, 65535, s).astype(np.uint16), rng.integers(0, 4, s).astype(np.uint8))
              for k, s in (("z", (Y, X)), ("y", (Z, X)), ("x", (Z, Y)))}
    t_new, new = best(lambda: mark_enclosed_air(planes, runs, shape), args.repeat)
    # the previous form read the run columns as int64 copies: the same marking on int64 runs, copy included
    t_old, old = best(lambda: mark_enclosed_air(planes, runs.astype(np.int64), shape), args.repeat)
    same = all(np.array_equal(new[k][1], old[k][1]) for k in planes)   # marks, then PNG pixels
    with tempfile.TemporaryDirectory() as tmp:
        path = Path(tmp) / "preview.png"
        write_preview(path, new, (0, 65535), (1.0, 1.0, 1.0), {1: "material", 2: "pore", 3: "inclusion"}, "cost")
        with Image.open(path) as im:
            img = im.convert("RGB")

    def encode(level):
        buf = io.BytesIO()
        img.save(buf, format="PNG", compress_level=level)
        return buf

    sizes, secs = {}, {}
    for level in (1, 6):
        secs[level], buf = best(lambda: encode(level), args.repeat)
        sizes[level] = len(buf.getvalue())
        buf.seek(0)
        with Image.open(buf) as back:
            if not np.array_equal(np.asarray(back.convert("RGB")), np.asarray(img)):
                same = False
    print(f"{m:,} outside-air runs, mid-planes of {Z}x{Y}x{X}, best of {args.repeat}")
    print(f"enclosed-air marking: int32 views {t_new:.3f} s, int64 copies {t_old:.3f} s "
          f"({t_old / t_new:.1f}x); same marks and PNG pixels: {same}")
    print(f"preview PNG {img.width}x{img.height}: zlib level 1 {secs[1]:.3f} s, {sizes[1] / 1e3:.0f} kB; "
          f"level 6 {secs[6]:.3f} s, {sizes[6] / 1e3:.0f} kB ({secs[6] / secs[1]:.1f}x)")
    return 0 if same else 1


if __name__ == "__main__":
    sys.exit(main())
