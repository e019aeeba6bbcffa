"""Picture of what `xctrt simulate` produces: docs/simulate.png.

Top: one 512x512 slice of the default AlSi10Mg cylinder (pores, Ni inclusions, 160 kVp, 1e4 photons per
pixel) reconstructed from 60 views (sparse: streaks) and from 720 views, next to its labels.
Bottom: a line profile through the centre of a defect-free cylinder, noiseless: the polychromatic
beam cups (the centre reconstructs darker than the rim), a 1 mm Cu pre-filter cups less, and a
monochromatic beam at the effective energy is flat; and the reconstruction error against the ideal
image as the number of views grows.

    PYTHONPATH=python python benchmarks/simulate_figure.py [--out docs/simulate.png]

Needs the sim extra (pip install ".[sim]"; matplotlib comes with spekpy). Takes about a minute.
"""
from __future__ import annotations

import argparse
import time
from pathlib import Path

import numpy as np


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--out", default=str(Path(__file__).resolve().parents[1] / "docs" / "simulate.png"))
    ap.add_argument("--size", type=int, default=512)
    args = ap.parse_args()

    import matplotlib
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    import matplotlib.ticker

    from xctrt.simulate import SimConfig, build, grey_map

    t0 = time.perf_counter()
    n = args.size
    z = 20
    recs = {}
    for views in (60, 720):
        ph, sc = build(SimConfig(shape=(40, n, n), views=views, seed=1))
        labels = ph.render(z, z + 1)[0]
        recs[views] = sc.scan(labels, z)
    mu_ref = sc.mu_at()["material"]

    profiles, cfgs = {}, {
        "polychromatic 160 kVp": SimConfig(shape=(1, n, n), views=360, dose=0, pores_per_mm3=0, inclusions_per_mm3=0),
        "160 kVp + 1 mm Cu": SimConfig(shape=(1, n, n), views=360, dose=0, pores_per_mm3=0, inclusions_per_mm3=0,
                                       beam_filter=("Cu", 1.0)),
    }
    for name, cfg in cfgs.items():
        ph, sc = build(cfg)
        lab = ph.render(0, 1)[0]
        profiles[name] = sc.scan(lab)[n // 2]
        if name.startswith("poly"):
            e_eff = sc.effective_kev()
    mono_cfg = SimConfig(shape=(1, n, n), views=360, dose=0, pores_per_mm3=0, inclusions_per_mm3=0, mono_kev=e_eff)
    ph, sc = build(mono_cfg)
    profiles[f"monochromatic {e_eff:.0f} keV"] = sc.scan(ph.render(0, 1)[0])[n // 2]

    view_counts = [30, 60, 120, 240, 480, 720]
    err = []
    for v in view_counts:
        ph, sc = build(SimConfig(shape=(40, n, n), views=v, seed=1, mono_kev=e_eff, dose=0))
        lab = ph.render(z, z + 1)[0]
        err.append(float(np.sqrt(np.mean((sc.scan(lab, z) - sc.ideal(lab)) ** 2))))

    fig = plt.figure(figsize=(15, 10), dpi=100)
    grid = fig.add_gridspec(2, 3, height_ratios=[1.15, 1])
    for i, views in enumerate((60, 720)):
        ax = fig.add_subplot(grid[0, i])
        ax.imshow(grey_map(recs[views], mu_ref), cmap="gray", vmin=0, vmax=65535)
        ax.set_title(f"{views} views (parallel beam), uint16 grey")
        ax.axis("off")
    ax = fig.add_subplot(grid[0, 2])
    ax.imshow(labels, cmap="viridis", vmin=0, vmax=3, interpolation="nearest")
    ax.set_title("labels: 0 air, 1 material, 2 pore, 3 inclusion")
    ax.axis("off")
    ax = fig.add_subplot(grid[1, :2])
    x_mm = (np.arange(n) - (n - 1) / 2) * 0.02
    for name, prof in profiles.items():
        ax.plot(x_mm, prof, label=name, lw=1.2)
    ax.set_xlabel("x (mm), row through the centre of an 8.2 mm AlSi10Mg cylinder (noiseless, 360 views)")
    ax.set_ylabel("reconstructed mu (1/mm)")
    ax.set_title("beam hardening: cupping with the polychromatic spectrum, flat with a monochromatic beam")
    ax.legend()
    ax.grid(alpha=0.3)
    ax = fig.add_subplot(grid[1, 2])
    ax.loglog(view_counts, err, "o-")
    ax.xaxis.set_minor_formatter(matplotlib.ticker.NullFormatter())
    ax.set_xticks(view_counts, [str(v) for v in view_counts])
    ax.set_xlabel("views")
    ax.set_ylabel("RMS error vs ideal mu (1/mm)")
    ax.set_title(f"sparse views: error vs views\n(monochromatic {e_eff:.0f} keV, noiseless)")
    ax.grid(alpha=0.3, which="both")
    fig.suptitle("xctrt simulate: AlSi10Mg cylinder, 20 um voxels, pores + Ni inclusions, spekpy 160 kVp W spectrum")
    fig.tight_layout()
    Path(args.out).parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(args.out)
    print(f"wrote {args.out} in {time.perf_counter() - t0:.0f} s; RMS error by views: "
          + ", ".join(f"{v}: {e:.4f}" for v, e in zip(view_counts, err)))


if __name__ == "__main__":
    main()
