"""Markdown summary of one benchmarks/gpu_throughput.sh call: python benchmarks/gpu_summary.py OUT_DIR.

Reads what the steps wrote (gpu_post.json, bench.json, bench_compiled.json, gpu_attention.json,
label_writer.json);
a step that failed or ran out of time is named as missing, the others are still summarised.
"""
from __future__ import annotations

import json
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))
sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "python"))

from timeline_stalls import writer_tail  # noqa: E402

from xctrt.gpu.bench import comparisons  # noqa: E402  (the runs and ratios, as `xctrt bench --gpu` prints them)

STAGES = ("capture", "read", "h2d", "preprocess", "tile", "encoder", "decoder", "infer", "aggregate", "stitch",
          "components", "d2h", "write", "table")


def _load(out: Path, name: str):
    p = out / name
    try:
        return json.loads(p.read_text())
    except (OSError, ValueError):
        return None


def _missing(step: str) -> str:
    return f"{step}: no results (step failed or timed out)"


def _search_sizes(runs: dict | None) -> str:
    """"; its search: N outside air runs, M defect runs" from a surface search's run counts, or ""."""
    return "; its search: " + ", ".join(f"{v:,} {k.replace('_', ' ')} runs" for k, v in runs.items()) if runs else ""


MODEL_STAGES = ("encoder", "decoder", "model", "infer")   # the network's spans: on the device, or the host's


def timeline_phases(timeline: list | None, total_s: float | None) -> dict | None:
    """From a run's timeline: when the first model work began (the fill), when the last model or
    aggregate span ended, the time from then to the run's end (the tail: last slabs' components, the
    table, the report), and how busy the model kept its stream in between (share of that interval)."""
    spans = [(a, b) for name, a, b in timeline or () if name in MODEL_STAGES]
    if not spans or not total_s:
        return None
    first = min(a for a, _ in spans)
    last = max(b for name, _, b in timeline if name in MODEL_STAGES + ("aggregate",))
    busy = sum(b - a for a, b in spans)
    return {"fill_s": first, "last_model_end_s": last, "tail_s": max(0.0, total_s - last),
            "model_busy_share": busy / (last - first) if last > first else None}


def _phases_text(o: dict) -> str:
    ph = timeline_phases(o.get("timeline"), o.get("total_s"))
    if ph is None:
        return ""
    writer = writer_tail(o)   # labels.tif's writer after its last slab
    return (f"; timeline: first model work at {ph['fill_s']:.2f} s, the last model/aggregate work ends at "
            f"{ph['last_model_end_s']:.2f} s, then {ph['tail_s']:.2f} s to the end; model busy "
            f"{_f(100 * ph['model_busy_share'] if ph['model_busy_share'] is not None else None, '.0f')} % in between"
            + ("" if writer is None else
               f"; labels.tif's writer took its last slab at {writer['took_last_slab_s']:.2f} s and closed the file "
               f"{writer['after_s']:.2f} s later"))


def _f(v, fmt=".1f"):
    return format(v, fmt) if isinstance(v, (int, float)) else "–"


def bench_rows(res: dict, label: str) -> list[str]:
    rows = []
    for mode, run, x, x_naive, x_comp in comparisons(res):
        busy = x.get("stage_busy_s", {})
        stages = ", ".join(f"{s} {busy[s]:.2f}" for s in STAGES if busy.get(s, 0) >= 0.005)
        rows.append(f"| {label} | {mode} | {run} | {x['slices']} | {_f(x['slices_per_s'])} | "
                    f"{_f(x_naive)} | {_f(x_comp, '.2f')} | "
                    f"{_f(x.get('encoder_tflops'), '.0f')} | {_f(x.get('encoder_percent_of_peak'), '.0f')} / "
                    f"{_f(x.get('encoder_percent_of_datasheet_peak'), '.0f')} | "
                    f"{_f(x.get('torch_peak_gib'), '.1f')} / {_f(x.get('torch_reserved_peak_gib'), '.1f')} / "
                    f"{_f(x.get('cupy_pool_gib'), '.1f')} / {_f(x.get('gpu_memory_used_max_gib'), '.1f')} | "
                    f"{stages} |")
    return rows


# Issue 5's targets, on a generated volume of ISSUE_SHAPE
ISSUE_SHAPE = (1000, 1200, 1200)
TARGETS = {"paper": 100.0, "shared": 250.0, "vs_compiled": 1.7, "encoder_percent": 38.0, "post_s": 1.0,
           "memory_gib": 16.0}


def targets(out: Path) -> list[str]:
    """Issue 5's targets against this call's numbers, one table row each; "–" where a step is missing."""
    bench, comp, post = _load(out, "bench.json"), _load(out, "bench_compiled.json"), _load(out, "gpu_post.json")

    def ours(res, mode, run="ours"):
        return ((res or {}).get("modes", {}).get(mode) or {}).get(run) or {}

    # judged only as the issue sets them: the full volume on a GPU (a dry run's numbers are not the issue's)
    ref = bench or comp or {}
    full = list(ISSUE_SHAPE)
    why_not = None
    if ref and (ref.get("shape") != full or ref.get("device") == "cpu"):
        why_not = f"not judged: {ref.get('shape')} on {ref.get('device')}"

    def verdict(v, limit, most=False, judged=why_not):
        if not isinstance(v, (int, float)):
            return "not measured"
        if judged:
            return judged
        return "met" if (v <= limit if most else v >= limit) else "not met"

    rows = ["| target | this call | |", "|---|---|---|"]
    for mode in ("paper", "shared"):
        # judged on the faster of ours (components on the GPU) and ours-host (C++ components), named
        v, host = ours(bench, mode).get("slices_per_s"), ours(bench, mode, "ours-host").get("slices_per_s")
        if isinstance(host, (int, float)):
            best, which = (host, " (ours-host)") if not isinstance(v, (int, float)) or host > v else (v, " (ours)")
            ok = verdict(best, TARGETS[mode])
            rows.append(f"| {mode} ≥ {TARGETS[mode]:.0f} slices/s (bench step) | {_f(v)}, components on the host "
                        f"{_f(host)} | {ok}{which if ok in ('met', 'not met') else ''} |")
        else:
            rows.append(f"| {mode} ≥ {TARGETS[mode]:.0f} slices/s (bench step) | {_f(v)} | {verdict(v, TARGETS[mode])} |")
    x_comp = next((xc for mode, run, _, _, xc in comparisons(comp) if mode == "paper" and run == "ours"), None) \
        if comp else None
    mode_name = (comp or {}).get("compile_mode") or "?"
    rows.append(f"| ≥ {TARGETS['vs_compiled']}× the torch.compile anchor, same run (compiled step, mode {mode_name}) "
                f"| {_f(x_comp, '.2f')}× | {verdict(x_comp, TARGETS['vs_compiled'])} |")
    pct = [ours(bench, m).get("encoder_percent_of_peak") for m in ("paper", "shared")]
    pct = max((p for p in pct if isinstance(p, (int, float))), default=None)
    rows.append(f"| encoder ≥ {TARGETS['encoder_percent']:.0f} % of bf16 peak (measured matmul rate) | {_f(pct, '.0f')} % | "
                f"{verdict(pct, TARGETS['encoder_percent'])} |")
    total = ((post or {}).get("full") or {}).get("median_s", {}).get("total")
    failed = (post or {}).get("failed")
    post_shape = (post or {}).get("shape")
    ok = verdict(total, TARGETS["post_s"], most=True,
                 judged=None if post_shape == full and (post or {}).get("info", {}).get("device") != "cpu"
                 else f"not judged: {post_shape}")
    if ok == "met" and failed != 0:
        ok = f"not met: {failed} checks failed"
    rows.append(f"| post-processing ≤ {TARGETS['post_s']:.0f} s, identical to C++ | {_f(total, '.3f')} s, "
                f"{_f(failed, 'd')} failed checks | {ok} |")
    mem = [ours(res, m, run).get("gpu_memory_used_max_gib") for res in (bench, comp) for m in ("paper", "shared")
           for run in ("ours", "ours-host")]
    mem = max((v for v in mem if isinstance(v, (int, float))), default=None)
    rows.append(f"| GPU memory in use ≤ {TARGETS['memory_gib']:.0f} GiB | {_f(mem)} GiB | "
                f"{verdict(mem, TARGETS['memory_gib'], most=True)} |")
    return rows


def main(out: Path) -> str:
    lines = [f"# GPU throughput, {out}", "", *targets(out), ""]
    bench, comp = _load(out, "bench.json"), _load(out, "bench_compiled.json")
    ours_comp = _load(out, "bench_ours_compiled.json")
    ref = bench or comp or ours_comp
    if ref:
        lines += [f"device {ref['device']}, torch {ref['torch']}, {ref['date']}, volume {ref['shape']} uint16, "
                  f"{ref['backbone']} random weights, batch {ref['batch']}, attention {ref.get('attention_impl')}, "
                  f"measured bf16 matmul {_f(ref.get('matmul_bf16_tflops'), '.0f')} TFLOP/s", "",
                  "| call | mode | run | slices | slices/s | × naive | × compiled | enc TFLOP/s | % of measured / "
                  "datasheet bf16 peak | GiB torch peak / torch reserved / CuPy pool / device in use | busy s per stage |",
                  "|---|---|---|---|---|---|---|---|---|---|---|"]
        calls = ((bench, "bench"), (comp, "compiled"), (ours_comp, "ours-compiled"))
        for res, label in calls:
            if res:
                lines += bench_rows(res, label)
        for res, label in calls:
            for mode, r in (res or {}).get("modes", {}).items():
                o = r.get("ours", {})
                lines.append(f"- {label}/{mode}: ours vs naive on the same slices: labels agree "
                             f"{_f(100 * o.get('label_agreement_vs_naive', float('nan')), '.3f')} %, probability "
                             f"max |Δ| {_f(o.get('prob_max_abs_diff_vs_naive'), '.3g')}, mean |Δ| "
                             f"{_f(o.get('prob_mean_abs_diff_vs_naive'), '.3g')}; defects {o.get('defects')}; "
                             f"setup+run wall {_f(o.get('wall_s_with_setup'))} s; the engine's first run in the process "
                             f"captured its graphs in {_f(o.get('first_run_capture_s'))} s, the untimed run over two "
                             f"slabs after it took {_f(o.get('warm_up_run_s'))} s"
                             + (f"; the anchor's torch.compile({res.get('compile_mode')}) took "
                                f"{_f(r['compiled_compile_s'], '.0f')} s" if "compiled_compile_s" in r else "")
                             + "".join(f"; {why.replace('_', ' ')}: {o[why]}" for why in
                                       ("cuda_graphs_not_used_because", "fused_kernels_not_used_because",
                                        "gpu_labeller_kernels_not_used_because",
                                        "gpu_surface_search_not_used_because") if o.get(why))
                             + (f"; left out of the fast forward: {r['fast_parts_dropped']}"
                                if r.get("fast_parts_dropped") else ""))
                for run in ("ours", "ours-host", "ours-device"):
                    o = r.get(run, {})
                    if run != "ours" and o:
                        lines.append(f"- {label}/{mode}/{run}: the same run with the components on the "
                                     f"{o.get('components')}: defects {o.get('defects')}, the same as ours: "
                                     f"{o.get('same_defects_as_ours')}")
                    if o.get("main_thread_s"):
                        lines.append(f"- {label}/{mode}/{run} (components on the {o.get('components', 'device')}), "
                                     "where the wall goes: compute stream idle between slabs "
                                     f"{_f(o.get('gpu_compute_idle_s'), '.2f')} s of {_f(o.get('total_s'), '.2f')} s; "
                                     "main thread " + ", ".join(f"{k} {v:.2f} s" for k, v in o["main_thread_s"].items())
                                     + (("; of the table: " + ", ".join(f"{k.replace('_', ' ')} {v:.2f} s" for k, v in
                                                                       o["table_parts_s"].items()))
                                        if o.get("table_parts_s") else "")
                                     + _search_sizes(o.get("table_surface_runs"))
                                     + (f"; its outside air: {o['outside_air_detail']}" if o.get("outside_air_detail") else "")
                                     + (f"; Python's garbage collector: {o['garbage_collector']}"
                                        if o.get("garbage_collector") else "")
                                     + (f"; the decoders beside the next batch's encoders or after them: "
                                        f"{o['decoder_overlap']}" if o.get("decoder_overlap") else "")
                                     + (f"; the decoder heads in the graphs: {o['decoder_heads']}"
                                        if o.get("decoder_heads") else "")
                                     + (f"; pinned host blocks made during the run: {o['pinned_host']}"
                                        if o.get("pinned_host") else "")
                                     + (f"; {len(o['stalls']['stalls'])} spans far past their kind's median "
                                        f"(the compute stream's {o['stalls']['device_excess_s']:.3f} s past its)"
                                        if o.get("stalls") else "")
                                     + (f"; the device labeller took {o['gpu_labeller_calls']['slabs']} slabs in "
                                        f"{o['gpu_labeller_calls']['calls']} calls" if o.get("gpu_labeller_calls") else "")
                                     + _phases_text(o))
        if ref.get("attention_check"):
            lines.append(f"- attention check in the bench: {ref['attention_check']}")
        if ref.get("attention_launches"):
            lines.append(f"- attention launches chosen: {ref['attention_launches']}")
        if ref.get("attention_qkv_layouts"):
            lines.append(f"- layouts chosen, q/k/v and window (median device ms of each): {ref['attention_qkv_layouts']}")
        for res, label in calls:
            how = f"torch.compile {res['compile_ours']}" if (res or {}).get("compile_ours") else "eager"
            for mode, r in (res or {}).get("modes", {}).items():
                if r.get("ours_profile"):
                    lines.append(f"- {label}/{mode}, where our encoder time goes (one batch, {how}): " + "; ".join(
                        f"{p['name'][:60]} {p['ms']:.2f} ms x{p['calls']}" for p in r["ours_profile"][:8]))
                lp = r.get("ours", {}).get("labeller_profile")
                if lp:
                    lines.append(f"- {label}/{mode}, the device labeller alone on ours' first {lp['planes']} planes in "
                                 f"slabs of {lp['slab']}: add_slab {lp['add_slab_s']} s"
                                 + (f" (with CuPy's air labelling {lp['add_slab_s_cupyx_air_label']} s)"
                                    if lp.get("add_slab_s_cupyx_air_label") else "")
                                 + f", finish {lp['finish_s']} s"
                                 + (f"; kernels of one pass, {sum(k['ms'] for k in lp['kernels']):.1f} ms in the top "
                                    f"{len(lp['kernels'])}: " + "; ".join(f"{k['name'][:50]} {k['ms']:.2f} ms x{k['calls']}"
                                                                         for k in lp["kernels"][:10])
                                    if lp["kernels"] else ""))
    else:
        lines.append(_missing("bench"))
    lines.append("")
    post = _load(out, "gpu_post.json")
    if post:
        full = post.get("full", {})
        med = full.get("median_s", {})
        lines.append(f"post-processing ({post.get('info', {}).get('device', '?')}): checks {post.get('passed')} passed, "
                     f"{post.get('failed')} failed; full size {post.get('shape')}: aggregate {_f(med.get('aggregate'), '.3f')} s"
                     f" + components {_f(med.get('components'), '.3f')} s + table {_f(med.get('finish'), '.3f')} s"
                     f" (of which surface distance {_f(med.get('finish_surface_distance'), '.3f')} s, before its"
                     f" search (outside air, host kd-tree) {_f(med.get('finish_surface_tree'), '.3f')} s,"
                     f" the outside air alone {_f(med.get('finish_outside_air'), '.3f')} s; components merged"
                     f" {_f(med.get('finish_resolve'), '.3f')} s, columns {_f(med.get('finish_columns'), '.3f')} s) = "
                     f"{_f(med.get('total'), '.3f')} s; components {full.get('components')} (C++ {full.get('components_cpp')}),"
                     f" defect fraction {_f(full.get('defect_fraction'), '.4f')}, pool peak "
                     f"{_f((full.get('gpu_peak_pool_bytes') or 0) / 2 ** 30, '.2f')} GiB"
                     + (f"; surface distances searched on the host because: {full['surface_search_on_host_because']}"
                        if full.get("surface_search_on_host_because") else "")
                     + _search_sizes(full.get("surface_runs")))
        ab = post.get("labeller_ab") or {}
        if ab:
            uf, st = ab["union_find_s"], ab["component_stats_s"]
            lines.append(f"device labeller A/B on {ab['nodes']:,} defect voxels ({ab['components']:,} components, the "
                         f"largest {ab['largest_component']:,}; median of {ab['repeats']}): union-find kernels "
                         f"{uf['kernels'] * 1e3:.2f} ms vs rounds {uf['rounds'] * 1e3:.2f} ms; statistics kernel "
                         f"{st['kernel'] * 1e3:.2f} ms vs scatters {st['scatter'] * 1e3:.2f} ms")
        fused = post.get("fused", {}).get("ms_per_slice", {})
        if fused:
            lines.append("GPU stage kernels, ms per 1200x1200 slice (32 slices): "
                         + ", ".join(f"{k} {v:.4f}" for k, v in fused.items()))
    else:
        lines.append(_missing("post-processing"))
    parts = _load(out, "gpu_parts.json")
    if parts:
        cells = []
        for name, r in parts["variants"].items():
            if "error" in r:
                cells.append(f"{name} failed ({r['error'][:80]})")
            else:
                eager = " (eager)" if r.get("cuda_graphs_error") else ""
                cells.append(f"{name}{eager} {r['encoder_ms']:.2f} / {r['decoder_ms']:.2f}")
        lines.append(f"fast-forward parts ({parts['device']}, {parts['backbone']}, batch {parts['batch']}, ms per batch "
                     f"encoder / 3 decoder heads, CUDA graphs): " + "; ".join(cells))
        sweep = [f"batch {b} failed ({r['error'][:80]})" if "error" in r else
                 f"batch {b} {r['encoder_ms_per_image']:.2f} ms, {r['encoder_tflops']:.0f} TFLOP/s"
                 + ("" if r["torch_peak_gib"] is None else f", {r['torch_peak_gib']:.1f} GiB")
                 for b, r in parts.get("encoder_batch_sweep", {}).items()]
        if sweep:
            lines.append("encoder with every part, per image by batch: " + "; ".join(sweep))
        if parts.get("decoder_overlap"):
            lines.append(f"decoders beside the next batch's encoders (4 batches, device ms each way; probabilities "
                          f"against one after the other): {parts['decoder_overlap']}")
        for part, rows in (parts.get("ops_by_shape_all_parts") or {}).items():
            lines.append(f"{part} operators by input shape (eager, ms of their own kernels): " + "; ".join(
                r["error"] if "error" in r else f"{r['op']} {r['shapes']} {r['ms']:.3f} ms x{r['calls']}"
                for r in rows[:8]))
    else:
        lines.append(_missing("parts"))
    pkg = _load(out, "gpu_package.json")
    if pkg:
        h, g, b = pkg["runs"]["host"], pkg["runs"]["gpu"], pkg["runs"].get("gpu-bf16", {})
        lines.append(f"package {pkg['model']} on {pkg['shape']} ({h['engine']}): host pipeline {_f(h['slices_per_s'], '.2f')}"
                     f" slices/s, {g['pipeline']} {_f(g['slices_per_s'], '.2f')} slices/s; labels identical "
                     f"{pkg['labels_identical']}, table identical {pkg['table_identical']}; bf16 "
                     f"{_f(b.get('slices_per_s'), '.2f')} slices/s, labels agree "
                     f"{_f(100 * pkg.get('bf16_label_agreement', float('nan')), '.3f')} % with float32"
                     + (f"; experts routed {_f(pkg['runs']['gpu-routed']['slices_per_s'], '.2f')} slices/s, labels "
                        f"agree {_f(100 * pkg.get('routed_label_agreement', float('nan')), '.3f')} % with static"
                        if "gpu-routed" in pkg["runs"] else ""))
    else:
        lines.append(_missing("package"))
    att = _load(out, "gpu_attention.json")
    if att:
        for shape, s in att.get("shapes", {}).items():
            best = {}
            for v in s.get("variants", []):
                k = v["variant"].split("-")[0] if v["variant"].startswith("triton") else v["variant"]
                if isinstance(v.get("tflops"), (int, float)) and v["tflops"] > best.get(k, {}).get("tflops", -1):
                    best[k] = v
            lines.append(f"attention {shape} {s.get('hw')} x{s.get('B')}x{s.get('heads', 1)}: " + "; ".join(
                f"{k} {v.get('config', '')} {_f(v['tflops'], '.0f')} TFLOP/s ({v.get('check', '-')})"
                for k, v in best.items()))
            cp = s.get("heads_major_copy") or {}
            if "torch" in cp and "words" in cp:
                lines.append(f"heads-major q/k/v copy, {shape}: permute().contiguous() {_f(cp['torch']['ms'], '.3f')} ms "
                             f"({_f(cp['torch']['GB_per_s'], '.0f')} GB/s), permuted_copy {_f(cp['words']['ms'], '.3f')} ms "
                             f"({_f(cp['words']['GB_per_s'], '.0f')} GB/s), same bits {cp.get('same_bits')}")
            ot = s.get("offset_terms") or {}
            if "products" in ot and "kernel" in ot:
                lines.append(f"offset terms, {shape}: every offset (two products) {_f(ot['products']['ms'], '.3f')} ms, "
                             f"only those read (kernel) {_f(ot['kernel']['ms'], '.3f')} ms, max |diff| on those "
                             f"{_f(ot['max_abs_diff_read'], '.2e')}")
            elif ot.get("error"):
                lines.append(f"offset terms, {shape}: {ot['error']}")
    else:
        lines.append(_missing("attention"))
    wr = _load(out, "label_writer.json")
    if wr:
        lines.append(f"labels.tif's writer on this host ({wr['cpus']} CPUs, {wr['shape']} handed over in slabs of "
                     f"{wr['slab']} at {wr['rate']:.0f} slices/s): " + "; ".join(
                         f"{way} (batch {r['batch_pages']} pages) after the last slab {r['after_last_slab_s']:.3f} s, "
                         f"most pages not on disk {r['most_pages_not_on_disk']}, a ticking thread's longest gap "
                         f"{r['ticker_longest_gap_ms']:.1f} ms"
                         for way, runs in wr["runs"].items() for r in runs))
    else:
        lines.append(_missing("writer"))
    return "\n".join(lines)


if __name__ == "__main__":
    print(main(Path(sys.argv[1])))
