"""The bench report: Markdown tables, target checks, MFU and MLflow metric names, all derived from the report dict
that a bench run fills in (`experiments.bench.run`). Pure functions of that dict (plus `write`), so a partial
report renders too.

Metric names (MLflow run of kind ``bench``; <model> is the Steps model unless said otherwise):
    ratio.<model>.infer | .train          Steps images/s / baseline images/s (eager)
    ratio.<model>.infer_best | .train_best         ratio of the two sides' fastest rounds
    ratio.<model>.infer_cputime | .train_cputime   the same from process CPU time (CPU runs only)
    ratio.<model>.paths                   forward_paths (all paths) images/s / forward images/s
    ratio.<model>.train_compiled | .infer_compiled   compiled Steps / compiled baseline (with --compile)
    ratio.<model>.infer_graphed | .train_graphed   with CUDA graphs (with --cuda-graphs)
    sweep.<model>.b<batch>.infer | .train   the eager ratio at that batch size (section sweep);
    sweep.<model>.b<batch>.train_peak_ratio | .infer_peak_ratio   Steps / baseline peak memory (CUDA)
    ips.<name>.infer | .train             images/s of every model, Steps and baseline
    overhead.<model>.infer | .train       Steps stacks time / same blocks on pre-made inputs - 1
    wiring.<model>.infer | .train         time of the Steps wiring alone (blocks taken out) / Steps stacks time
    mfu.<name>                            training MFU of every model, Steps and baseline
    peak.tflops                           measured matmul peak (TFLOP/s)
    probe.fit_s.<sklearn|torch>, probe.acc.<sklearn|torch>, probe.acc_gap
    probe_run.cold_s | .cached_s       `probe run --path all` on the frozen demo model (section probe_run)
    scale.extract_ips.<1|2>, scale.extract_speedup, scale.extract_identical   sharded extraction, 1 and 2
                                          torchrun processes (section scale); scale.rss_kb_per_image,
                                          scale.data_wait_share (probe train on generated JPEG folders)
    attr.ig32.ips, attr.ig32.efficiency   (the number is --ig-steps)
    compile.<name>.<train|infer>.compile_s | .graphs | .frames | .graph_breaks; compile.<model>.<phase>.recompiles
"""
from __future__ import annotations

import json
import math
import os
from pathlib import Path
from typing import Any

TARGET_RATIO = 0.95      # Steps / baseline images/s
TARGET_PATHS = 0.90      # forward_paths / forward
TARGET_PROBE_S = 30.0    # the faster probe backend, seconds
# probe run --path all on the demo model, 2 CPU cores; refusal: a mistyped model name until its one-line error
TARGET_PROBE_RUN_S = {"cold_s": 150.0, "cached_s": 45.0, "refusal_s": 3.0}
TARGET_PROBE_GAP = 0.005  # accuracy difference between the backends
CATEGORIES = ("gemm", "attn", "copy", "norm", "other")  # profiled op categories, see profile.op_category


def fmt(v: Any, nd: int = 3) -> str:
    """A table cell: "-" for missing or NaN, floats to `nd` places."""
    if v is None or (isinstance(v, float) and math.isnan(v)):
        return "-"
    if isinstance(v, float):
        return f"{v:.{nd}f}" if abs(v) < 1e4 else f"{v:.0f}"
    return str(v)


def rng(r: dict, best: bool = False) -> str:
    """A ratio as "median (min-max)", with the best-round ratio when `best`."""
    extra = f"; best {r['best']:.2f}" if best and "best" in r else ""
    return f"{r['median']:.3f} ({r['min']:.2f}-{r['max']:.2f}{extra})"


def gflops(q: dict) -> str:
    return "-" if q.get("gemm_tflops") is None else f"{q['gemm_tflops'] * 1e3:.0f}"


def explain(pair: dict, profiles: dict[str, dict], overhead: dict | None) -> str | None:
    """A line on where a pair's extra time goes, from the profiles and the block volumes."""
    s, b = profiles.get(pair["steps"]), profiles.get(pair["baseline"])
    if not s or not b:
        return None
    line = [f"**{pair['steps']}** (ratios: train {pair['train']['ratio']['median']:.2f}, infer "
            f"{pair['infer']['ratio']['median']:.2f}). MACs x{s['macs'] / b['macs']:.2f}, block activation volume "
            f"x{s['volume'] / b['volume']:.2f}."]
    for mode, what in (("train", "fwd+bwd"), ("infer", "inference")):
        ps, pb = s.get(mode), b.get(mode)
        if not ps or not pb or not pb["total_ms"]:
            continue
        base = pb["total_ms"]
        parts = ", ".join(f"{k} {100 * (ps[f'{k}_ms'] - pb[f'{k}_ms']) / base:+.0f}%"
                          for k in CATEGORIES)
        busy = (f"; busy {fmt(ps['busy'], 2)} vs {fmt(pb['busy'], 2)}" if s.get("clock") == "device" else "")
        line.append(f"Profiled {what} time x{ps['total_ms'] / base:.2f} ({parts} of the baseline's time; GEMM/conv/"
                    f"attention rate {gflops(ps)} vs {gflops(pb)} GFLOP/s; {ps['ops']} vs {pb['ops']} ops{busy}).")
    if overhead:
        line.append(f"Steps wiring alone: {100 * overhead['train']['wiring_share']:.1f}% (train), "
                    f"{100 * overhead['infer']['wiring_share']:.1f}% (infer) of the stacks' time.")
    return " ".join(line)


def markdown(rep: dict) -> str:
    """The report as one Markdown page: settings, a table per section measured so far, targets, notes."""
    st = rep["settings"]
    L = [f"# StepsLab bench: {rep['device']}" + (f" ({rep['tag']})" if rep.get("tag") else ""), "",
         f"{rep['date']} - torch {rep['torch']}, timm {rep['timm']}, {rep['card']}, {rep['dtype']}, batch "
         f"{st['batch']}, {st['repeats']} interleaved rounds, budget {st['budget_s']} s, total "
         f"{fmt(rep.get('total_s'), 1)} s{' (--quick)' if st['quick'] else ''}"
         f"{'; Swin window attention fused (SDPA) in both models' if st.get('fused_window_attn') else ''}.", "",
         "Ratios are Steps / baseline (or paths / forward) measured in this run, interleaved; median of the "
         "rounds' ratios, min-max in brackets; best = ratio of the two sides' fastest rounds (noise from other "
         "processes only adds time). Absolute images/s (medians) move with the machine's load; ratios do not "
         "(much)." + (" CPU-time ratios (process CPU time instead of wall time) are less sensitive to other "
                     "processes on a shared machine." if not rep["cuda"] else ""), ""]
    cs, ce = rep.get("contention_start"), rep.get("contention_end")
    if cs:
        L += [f"Machine load: load average {cs['load_avg_1m']:.1f} at the start"
              + (f", {ce['load_avg_1m']:.1f} at the end" if ce else "")
              + f" on {cs['cores']} cores; a 1M-element add took {cs['op_ms_threads']:.2f} ms on {cs['threads']} "
              f"threads vs {cs['op_ms_1thread']:.2f} ms on one (x{cs['slowdown']:.1f}"
              + (f"; x{ce['slowdown']:.1f} at the end" if ce else "") + ").", ""]
    pairs = rep.get("throughput", [])
    peak = rep.get("peak") or {}
    if pairs:
        L += [f"## Throughput (images/s), target Steps/baseline >= {TARGET_RATIO}", "",
              "| Steps model | baseline | MACs S/B | infer S | infer B | **infer ratio** | train S | train B | "
              "**train ratio** |" + (" train ratio (CPU time) |" if not rep["cuda"] else "") + " MFU S | MFU B |",
              "|---|---|---|---|---|---|---|---|---|" + ("---|" if not rep["cuda"] else "") + "---|---|"]
        for p in pairs:
            mfu = rep.get("mfu", {})
            L.append(f"| {p['steps']} | {p['baseline']} | {p['macs']['steps'] / p['macs']['baseline']:.3f} | "
                     f"{p['infer']['ips']['steps']:.0f} | {p['infer']['ips']['baseline']:.0f} | "
                     f"{rng(p['infer']['ratio'], True)} | {p['train']['ips']['steps']:.0f} | "
                     f"{p['train']['ips']['baseline']:.0f} | {rng(p['train']['ratio'], True)} |"
                     + (f" {rng(p['train']['ratio_cputime'])} |" if not rep["cuda"] else "")
                     + f" {fmt(mfu.get(p['steps']))} | {fmt(mfu.get(p['baseline']))} |")
        L += ["", f"MFU = count_macs x 2 x 3 (fwd + bwd) x training images/s / measured matmul peak "
                  f"({fmt(peak.get('tflops'))} TFLOP/s, {peak.get('dtype')} {peak.get('n')}^2); the training step "
                  "includes the optimizer.", ""]
    if rep.get("overhead"):
        L += ["## Split/merge overhead: Steps stacks vs the same blocks on pre-made dense inputs", "",
              "| Steps model | mode | stack ms | plain ms | **overhead** (stack/plain - 1) | best-round overhead | "
              "wiring alone ms | **wiring share** of the stack |", "|---|---|---|---|---|---|---|---|"]
        for o in rep["overhead"]:
            for mode in ("infer", "train"):
                q = o[mode]
                spread = f"{100 * q['overhead_min']:+.0f}..{100 * q['overhead_max']:+.0f}%"
                L.append(f"| {o['model']} | {mode} | {q['stack_ms']:.1f} | {q['plain_ms']:.1f} | "
                         f"{100 * q['overhead']:+.1f}% ({spread}) | {100 * q['overhead_best']:+.1f}% | "
                         f"{q['wiring_ms']:.2f} | {100 * q['wiring_share']:.1f}% |")
        L += ["", "Stack = the model's Steps stacks on their captured inputs; plain = each step's blocks on a dense "
                  "input of the step's width made beforehand (no split, no concatenation, no HookPoints); wiring "
                  "alone = the stacks with their blocks taken out (split, dense first group, one concatenation "
                  "per step: the real models/steps.py code), its share computed from each side's fastest round. "
                  "Train = forward + backward with fixed output gradients. The difference stack - plain is within "
                  "the noise of a shared machine; the wiring share is the direct measure.", ""]
    if rep.get("paths"):
        L += [f"## Path extraction (forward_paths, all paths, one pass) vs forward, target >= {TARGET_PATHS}", "",
              "| Steps model | forward img/s | paths img/s | **ratio** | paths |", "|---|---|---|---|---|"]
        for p in rep["paths"]:
            L.append(f"| {p['model']} | {p['forward_ips']:.0f} | {p['paths_ips']:.0f} | {rng(p['ratio'])} | "
                     f"{len(p['paths'])}: {', '.join(p['paths'])} |")
        L.append("")
    profs = {p["model"]: p for p in rep.get("profile", [])}
    if profs:
        unit = "device" if rep["cuda"] else "CPU"
        L += [f"## Where the time goes (torch.profiler, {unit} self time of a training fwd+bwd / an inference "
              "forward; per category the minimum over rounds interleaved with the other model)", "",
              "| model | mode | total ms | GEMM/conv ms | attention ms | copy ms | norm ms | other ms | GEMM+attn "
              "GFLOP/s | busy | ops | block volume / img | top other ops (ms) |",
              "|---|---|---|---|---|---|---|---|---|---|---|---|---|"]
        for p in profs.values():
            for mode in ("train", "infer"):
                q = p.get(mode)
                if not q:
                    continue
                top = ", ".join(f"{k.split('::')[-1]} {v}" for k, v in q["top_other"][:4])
                L.append(f"| {p['model']} | {mode} | {q['total_ms']:.1f} | {q['gemm_ms']:.1f} | {q['attn_ms']:.1f} | "
                         f"{q['copy_ms']:.1f} | {q['norm_ms']:.1f} | {q['other_ms']:.1f} | {gflops(q)} | "
                         f"{fmt(q['busy'], 2)} | {q['ops']} | {p['volume']} | {top} |")
        L += ["", "GEMM/conv = projections and convolutions; attention = attention products and softmax (fused "
                  "or not); GEMM+attn GFLOP/s = the model's FLOPs (count_macs x 2, x3 for fwd+bwd) / time in both. "
                  "Block volume = elements per image written by the residual blocks (sum over blocks "
                  "of tokens x width): memory-bound work (norms, activations, copies) and attention grow with "
                  "it, while MACs grow with width squared, so narrow-then-wide steps at matched MACs have more "
                  "volume. busy = profiled op time / wall time (on CUDA below 1: the GPU waited for kernel "
                  "launches; the profiler slows the launching side, so it is a lower bound).", ""]
        over = {o["model"]: o for o in rep.get("overhead", [])}
        lines = [explain(p, profs, over.get(p["steps"])) for p in pairs]
        lines = [ln for ln in lines if ln]
        if lines:
            L += ["### Why the ratios are what they are", ""] + [f"- {ln}" for ln in lines] + [""]
    if rep.get("probe"):
        p = rep["probe"]
        L += [f"## Linear probe: {p['n']} x {p['d']} synthetic features, {p['classes']} classes, {p['test']} test", "",
              "| backend | fit s | test acc |", "|---|---|---|",
              f"| sklearn | {p['sklearn']['fit_s']:.1f} | {p['sklearn']['acc']:.4f} |",
              f"| torch | {p['torch']['fit_s']:.1f} | {p['torch']['acc']:.4f} |", "",
              f"Oracle (the generating linear map) accuracy {p['oracle_acc']:.4f}; backend gap "
              f"{100 * p['acc_gap']:.2f} points; {p['note']}. Targets: faster fit < {TARGET_PROBE_S:.0f} s, gap "
              f"<= {100 * TARGET_PROBE_GAP:.1f} points. `--probe-n/--probe-d` set the size.", ""]
    if rep.get("probe_run"):
        p = rep["probe_run"]
        L += [f"## The everyday loop: `{p['command']}` ({p['n_train']} train / {p['n_test']} test images)", "",
              "| run | wall s | target s |", "|---|---|---|",
              f"| cold (extraction + probes) | {p['cold_s']:.0f} | {TARGET_PROBE_RUN_S['cold_s']:.0f} |",
              f"| features cached (probes only) | {p['cached_s']:.0f} | {TARGET_PROBE_RUN_S['cached_s']:.0f} |"]
        if "refusal_s" in p:
            L += [f"| a mistyped model name, until its one-line error | {p['refusal_s']:.2f} | "
                  f"{TARGET_PROBE_RUN_S['refusal_s']:.0f} |"]
        L += ["", f"dol.acc of that run: {p['dol_acc']:+.3f}.", ""]
    if rep.get("scale"):
        L += _scale_markdown(rep["scale"])
    if rep.get("attribution"):
        a = rep["attribution"]
        L += [f"## Attribution: integrated gradients, {a['ig_steps']} steps, merge point of {a['model']}", "",
              f"{a['ips']:.2f} images/s ({a['images']} images in {a['seconds']:.1f} s, batch {a['batch_size']}, "
              f"internal batch {a['internal_batch_size']}) via {a['via']}; plain fwd+bwd (batch "
              f"{a.get('fwd_bwd_batch')}) {a['fwd_bwd_ips']:.0f} images/s: IG runs at {a['efficiency']:.2f} x "
              f"(fwd+bwd images/s / {a['ig_steps']})"
              + (f"; completeness delta.rel {a['delta_rel']:.4f}" if a.get("delta_rel") is not None else "") + ". "
              "Layer IG back-propagates only from the output down to the merge point, so an IG step costs less than "
              "a full fwd+bwd and this efficiency can exceed 1.", ""]
    if rep.get("compile"):
        cpu = any("ratio_cputime" in c.get(ph, {}) for c in rep["compile"] for ph in ("train", "infer"))
        L += ["## torch.compile (whole model)", "",
              "| Steps model | phase | mode | compile s S / B | frames S | graphs S | graph breaks S | recompiles "
              "while timing | compiles once | S img/s | B img/s | **ratio** |" + (" ratio (CPU time) |" if cpu else ""),
              "|---|---|---|---|---|---|---|---|---|---|---|---|" + ("---|" if cpu else "")]
        for c in rep["compile"]:
            for phase in ("train", "infer"):
                cs = c["models"].get(c["steps"], {}).get(phase, {})
                cb = c["models"].get(c["baseline"], {}).get(phase, {})
                if not cs:
                    continue
                r = c.get(phase)
                L.append(f"| {c['steps']} | {phase} | {c['mode']} | {fmt(cs.get('compile_s'), 0)} / "
                         f"{fmt(cb.get('compile_s'), 0)} | {fmt(cs.get('frames'))} | {fmt(cs.get('graphs'))} | "
                         f"{fmt(cs.get('graph_breaks'))} | "
                         + (f"{r['recompiles_while_timing']} | {r['compiles_once']} | {r['ips']['steps']:.0f} | "
                            f"{r['ips']['baseline']:.0f} | {rng(r['ratio'], best=True)} |" if r else "- | - | - | - | - |")
                         + (f" {rng(r['ratio_cputime'])} |" if r and "ratio_cputime" in r else ""))
        L += ["", "One `torch.compile` of the whole model per phase (the same mode for both models of a pair); "
              "reduce-overhead adds CUDA graphs. Frames/graphs/breaks are counted by Dynamo over the compile and "
              "two more calls: one frame and one graph means the Steps stacks trace into one graph, with no "
              "recompile per step.", ""]
    if rep.get("sweep"):
        L += ["## Batch sizes (eager)", "",
              "Steps / baseline images/s at each batch size, interleaved; peak = memory allocated during one call "
              "above what was allocated before it (activations and workspace), Steps / baseline (CUDA only).", "",
              "| Steps model | batch | infer S | infer B | **infer ratio** | train S | train B | **train ratio** | "
              "infer peak MiB S / B | train peak MiB S / B | **train peak ratio** |",
              "|---|---|---|---|---|---|---|---|---|---|---|"]
        for sw in rep["sweep"]:
            for r in sw["rows"]:
                if r.get("oom"):
                    L.append(f"| {sw['steps']} | {r['batch']} | out of memory |" + " |" * 8)
                    continue
                i, t = r["infer"], r["train"]
                L.append(f"| {sw['steps']} | {r['batch']} | {i['ips']['steps']:.0f} | {i['ips']['baseline']:.0f} | "
                         f"{rng(i['ratio'])} | {t['ips']['steps']:.0f} | {t['ips']['baseline']:.0f} | "
                         f"{rng(t['ratio'])} | "
                         f"{fmt(i['peak_mib']['steps'], 0)} / {fmt(i['peak_mib']['baseline'], 0)} | "
                         f"{fmt(t['peak_mib']['steps'], 0)} / {fmt(t['peak_mib']['baseline'], 0)} | "
                         f"{fmt(t['peak_ratio'], 2)} |")
            if sw.get("stopped"):
                L.append(f"| {sw['steps']} | {sw['stopped']} |" + " |" * 9)
        L.append("")
    if rep.get("graphs"):
        L += ["## CUDA graphs (whole model)", "",
              "| Steps model | infer S | infer B | **infer ratio** | train S | train B | **train ratio** |",
              "|---|---|---|---|---|---|---|"]
        for g in rep["graphs"]:
            L.append(f"| {g['steps']} | {g['infer']['ips']['steps']:.0f} | {g['infer']['ips']['baseline']:.0f} | "
                     f"{rng(g['infer']['ratio'])} | {g['train']['ips']['steps']:.0f} | "
                     f"{g['train']['ips']['baseline']:.0f} | {rng(g['train']['ratio'])} |")
        L.append("")
    if rep.get("targets"):
        L += ["## Targets", "", "| check | value | target | pass |", "|---|---|---|---|"]
        for t in rep["targets"]:
            L.append(f"| {t['check']} | {fmt(t['value'])} | {t['target']} | {'yes' if t['pass'] else '**no**'} |")
        L.append("")
    if rep.get("notes"):
        L += ["## Notes", ""] + [f"- {n}" for n in rep["notes"]] + [""]
    return "\n".join(L)


def mfu_of(rep: dict) -> dict[str, float]:
    """Training MFU of every model timed in the throughput section: count_macs x 2 FLOPs x 3 passes (fwd + bwd)
    x training images/s over the measured matmul peak. Empty without a peak."""
    peak = (rep.get("peak") or {}).get("tflops")
    if not peak:
        return {}
    return {p[role]: 6.0 * p["macs"][role] * p["train"]["ips"][role] / (peak * 1e12)
            for p in rep.get("throughput", []) for role in ("steps", "baseline")}


def targets(rep: dict) -> list[dict]:
    """Each check against its target (ratios, path extraction, probe speed and agreement, compiling once)."""
    out = []
    for p in rep.get("throughput", []):
        for mode in ("infer", "train"):
            v = p[mode]["ratio"]["median"]
            out.append({"check": f"ratio.{p['steps']}.{mode}", "value": v, "target": f">= {TARGET_RATIO}",
                        "pass": v >= TARGET_RATIO})
    for p in rep.get("paths", []):
        v = p["ratio"]["median"]
        out.append({"check": f"ratio.{p['model']}.paths", "value": v, "target": f">= {TARGET_PATHS}",
                    "pass": v >= TARGET_PATHS})
    if rep.get("probe"):
        p = rep["probe"]
        v = p[p["faster"]]["fit_s"]
        out.append({"check": f"probe.fit_s.{p['faster']} (faster)", "value": v, "target": f"< {TARGET_PROBE_S:.0f} s",
                    "pass": v < TARGET_PROBE_S})
        out.append({"check": "probe.acc_gap", "value": p["acc_gap"], "target": f"<= {TARGET_PROBE_GAP}",
                    "pass": p["acc_gap"] <= TARGET_PROBE_GAP})
    for c in rep.get("compile", []):
        for phase in ("train", "infer"):
            if phase in c:
                v = c[phase]["ratio"]["median"]
                out.append({"check": f"ratio.{c['steps']}.{phase}_compiled", "value": v,
                            "target": f">= {TARGET_RATIO}", "pass": v >= TARGET_RATIO})
                out.append({"check": f"compile.{c['steps']}.{phase} compiles once",
                            "value": c["models"][c["steps"]][phase]["graphs"],
                            "target": "1 graph, 0 breaks, 0 recompiles", "pass": c[phase]["compiles_once"]})
    return out


def metrics_of(rep: dict) -> dict[str, float]:
    """The MLflow metrics, named as in the module docstring."""
    m: dict[str, float] = {}
    for p in rep.get("throughput", []):
        for mode in ("infer", "train"):
            m[f"ratio.{p['steps']}.{mode}"] = p[mode]["ratio"]["median"]
            m[f"ratio.{p['steps']}.{mode}_best"] = p[mode]["ratio"]["best"]
            if not rep["cuda"]:
                m[f"ratio.{p['steps']}.{mode}_cputime"] = p[mode]["ratio_cputime"]["median"]
            m[f"ips.{p['steps']}.{mode}"] = p[mode]["ips"]["steps"]
            m[f"ips.{p['baseline']}.{mode}"] = p[mode]["ips"]["baseline"]
    for o in rep.get("overhead", []):
        for mode in ("infer", "train"):
            m[f"overhead.{o['model']}.{mode}"] = o[mode]["overhead"]
            m[f"wiring.{o['model']}.{mode}"] = o[mode]["wiring_share"]
    for p in rep.get("paths", []):
        m[f"ratio.{p['model']}.paths"] = p["ratio"]["median"]
    for name, v in rep.get("mfu", {}).items():
        m[f"mfu.{name}"] = v
    if rep.get("peak"):
        m["peak.tflops"] = rep["peak"]["tflops"]
    if rep.get("probe"):
        for b in ("sklearn", "torch"):
            m[f"probe.fit_s.{b}"] = rep["probe"][b]["fit_s"]
            m[f"probe.acc.{b}"] = rep["probe"][b]["acc"]
        m["probe.acc_gap"] = rep["probe"]["acc_gap"]
    if rep.get("probe_run"):
        for key in ("cold_s", "cached_s", "refusal_s"):
            if key in rep["probe_run"]:
                m[f"probe_run.{key}"] = rep["probe_run"][key]
    if rep.get("scale"):
        e = rep["scale"]["extraction"]
        m.update({"scale.extract_ips.1": e["ips_1"], "scale.extract_ips.2": e["ips_2"],
                  "scale.extract_speedup": e["speedup"], "scale.extract_identical": float(e["identical"])})
        mem = rep["scale"].get("memory")
        if mem:
            m["scale.rss_kb_per_image"] = mem["kb_per_image"]
            shares = [s for s in mem.get("data_wait_share") or [] if s is not None]
            if shares:
                m["scale.data_wait_share"] = max(shares)
    if rep.get("attribution"):
        a = rep["attribution"]
        m[f"attr.ig{a['ig_steps']}.ips"] = a["ips"]
        m[f"attr.ig{a['ig_steps']}.efficiency"] = a["efficiency"]
    for c in rep.get("compile", []):
        for name, phases in c["models"].items():
            for phase, v in phases.items():
                for key in ("compile_s", "graphs", "frames", "graph_breaks"):
                    m[f"compile.{name}.{phase}.{key}"] = v[key]
        for phase in ("train", "infer"):
            if phase in c:
                m[f"ratio.{c['steps']}.{phase}_compiled"] = c[phase]["ratio"]["median"]
                m[f"compile.{c['steps']}.{phase}.recompiles"] = c[phase]["recompiles_while_timing"]
    for g in rep.get("graphs", []):
        for mode in ("infer", "train"):
            m[f"ratio.{g['steps']}.{mode}_graphed"] = g[mode]["ratio"]["median"]
    for sw in rep.get("sweep", []):
        for r in sw["rows"]:
            for mode in ("infer", "train") if not r.get("oom") else ():
                m[f"sweep.{sw['steps']}.b{r['batch']}.{mode}"] = r[mode]["ratio"]["median"]
                m[f"sweep.{sw['steps']}.b{r['batch']}.{mode}_peak_ratio"] = r[mode]["peak_ratio"]
    return {k: float(v) for k, v in m.items() if v is not None}


def _json_default(o: Any) -> Any:
    if hasattr(o, "tolist"):
        return o.tolist()
    if isinstance(o, (set, tuple)):
        return list(o)
    return str(o)


def write(rep: dict, out: Path) -> Path:
    """Rewrite <out>/bench-<device>.json and .md (atomically) with what the report holds so far."""
    rep["mfu"] = mfu_of(rep)
    rep["targets"] = targets(rep)
    rep["metrics"] = metrics_of(rep)
    out.mkdir(parents=True, exist_ok=True)
    stem = out / f"bench-{rep['device']}{'-' + rep['tag'] if rep.get('tag') else ''}"
    for suffix, text in ((".json", json.dumps(rep, indent=1, default=_json_default) + "\n"),
                         (".md", markdown(rep))):
        tmp = stem.with_suffix(suffix + ".tmp")
        tmp.write_text(text)
        os.replace(tmp, stem.with_suffix(suffix))
    return stem


def _scale_markdown(sc: dict) -> list[str]:
    """The scale section: sharded extraction with 1 and 2 processes, peak memory against folder size."""
    e = sc["extraction"]
    L = [f"## Scale: sharded feature extraction ({e['model']}, {e['n']} generated images, shards of "
         f"{e['shard_size']}, one thread per process)", "",
         "| processes | images/s |", "|---|---|", f"| 1 | {e['ips_1']:.0f} |", f"| 2 | {e['ips_2']:.0f} |", "",
         f"Speed-up {e['speedup']:.2f}x; caches byte-identical: {'yes' if e['identical'] else 'NO'}.", ""]
    mem = sc.get("memory")
    if mem:
        L += [f"Peak RSS of `{mem['command']}` ({mem['img']} px JPEG folders):", "",
              "| train images | peak RSS, process tree (MiB) | main process (MiB) |", "|---|---|---|"]
        L += [f"| {r['n']} | {r['tree_mib']:.0f} | {r['main_mib']:.0f} |" for r in mem["rows"]]
        shares = [s for s in mem.get("data_wait_share") or [] if s is not None]
        wait = ", ".join(f"{s:.0%}" for s in shares) if shares else mem.get("data_wait_note", "not logged")
        main = f", main process {mem['kb_per_image_main']:.1f} KB" if "kb_per_image_main" in mem else ""
        L += ["", f"Growth per extra image: process tree {mem['kb_per_image']:.1f} KB{main} (target <= 25 KB). "
              f"Data-wait share of the training step: {wait}.", ""]
    return L
