"""report.md and PNG plots for `tetri bench compare` / `ab` results."""

from __future__ import annotations

from pathlib import Path
from typing import Any

from bench.metrics import pct
from bench.sessions import prefix_plot, prefix_table

DEFINITIONS = """\
**Definitions.** TTFT: arrival (simulator) or send (live) to first token. TPOT: (last token − first
token) / (output tokens − 1), per request. JCT: arrival to last token. Throughput: completed requests /
makespan (first arrival to last completion). Instance-seconds: instances × makespan, the capacity
provisioned while the workload runs; busy instance-seconds: the time instances spent in forward passes.
**perf/$** = completed requests per instance-second (an instance-second is the unit of cost: one
GPU-second for the GPU profiles, one engine process-second on the CPU). Relative changes are
new/baseline − 1 (−0.90 = 90% lower).
"""


def _fmt(v: Any, digits: int = 1) -> str:
    if v is None:
        return "–"
    if isinstance(v, float):
        if abs(v) >= 1000:
            return f"{v:,.0f}"
        return f"{v:.{digits}f}"
    return str(v)



def _split(s: dict[str, Any] | None) -> str:
    if not s:
        return "–"
    return " ".join(f"{k[0].upper()}{v}" for k, v in s.items())


def write_report(results: dict[str, Any], out_dir: Path) -> dict[str, Path]:
    out_dir.mkdir(parents=True, exist_ok=True)
    paths: dict[str, Path] = {}
    try:
        paths.update(_plots(results, out_dir))
    except Exception as exc:  # plotting must never lose the numbers
        (out_dir / "plots-error.txt").write_text(repr(exc))
    lines: list[str] = []
    title = results.get("title") or "tetri bench compare"
    lines.append(f"# {title}\n")
    meta = [f"backend **{results.get('backend')}**"]
    if results.get("profile"):
        meta.append(f"profile **{results['profile']}**")
    if results.get("instances"):
        meta.append(f"**{results['instances']}** instances per system")
    if results.get("requests"):
        meta.append(f"{results['requests']} requests per workload")
    if results.get("seed") is not None:
        meta.append(f"seed {results['seed']}")
    lines.append(", ".join(meta) + ".\n")
    timing = results.get("timing")
    if timing:
        keys = [k for k in ("knee", "total_kv_tokens", "kv_link_gbps", "prefill_512_ms", "prefill_2048_ms",
                            "decode_b32_ctx1024_ms", "decode_b128_ctx1024_ms", "source") if k in timing]  # fmt: skip
        lines.append("Timing model: " + ", ".join(f"{k} = {timing[k]}" for k in keys) + ".\n")
    lines.append(DEFINITIONS)
    for wname, wres in results["workloads"].items():
        lines.append(f"\n## Workload {wname}\n")
        st = wres.get("workload", {})
        rate = wres.get("rate")
        lines.append(
            f"{st.get('requests', '?')} requests, mean prompt {_fmt(st.get('mean_prompt_tokens'))} tokens, "
            f"mean output {_fmt(st.get('mean_output_tokens'))} tokens, classes {st.get('classes')}; "
            f"Poisson arrivals at {_fmt(rate, 2) if not isinstance(rate, str) else rate} "
            f"{st.get('rate_unit', 'req/s')} "
            f"({wres.get('rate_source', 'given')}).\n"
        )
        systems = wres["systems"]
        lines.append(
            "| system | split | mean TTFT ms | p50 | p99 | mean TPOT ms | p99 | mean JCT ms | p50 | p99 | "
            "thr req/s | inst-s | busy inst-s | perf/$ (req/inst-s) | errors |"
        )
        lines.append("|---|---|" + "---:|" * 13)
        for name, s in systems.items():
            m = s["summary"]
            lines.append(
                f"| {name} | {_split(s.get('split'))} | {_fmt(m.get('mean_ttft_ms'))} | {_fmt(m.get('p50_ttft_ms'))} | "
                f"{_fmt(m.get('p99_ttft_ms'))} | {_fmt(m.get('mean_tpot_ms'), 2)} | {_fmt(m.get('p99_tpot_ms'), 2)} | "
                f"{_fmt(m.get('mean_jct_ms'))} | {_fmt(m.get('p50_jct_ms'))} | {_fmt(m.get('p99_jct_ms'))} | "
                f"{_fmt(m.get('throughput_rps'), 2)} | {_fmt(m.get('instance_seconds'))} | "
                f"{_fmt(m.get('busy_instance_seconds'))} | {_fmt(m.get('perf_per_instance_s'), 3)} | "
                f"{m.get('errors', 0)} |"
            )
        refs = sorted({k[3:] for s in systems.values() for k in s.get("relative", {})},
                      key=lambda r: (r != "colocated-vllm", r))
        for ref in refs:
            key = f"vs_{ref}"
            if not any(key in s.get("relative", {}) for s in systems.values()):
                continue
            lines.append(f"\nRelative to **{ref}**:\n")
            lines.append("| system | mean TTFT | p99 TTFT | mean TPOT | mean JCT | instance-s | busy inst-s | perf/$ |")
            lines.append("|---|---:|---:|---:|---:|---:|---:|---:|")
            for name, s in systems.items():
                if name == ref:
                    continue
                r = s.get("relative", {}).get(key, {})
                lines.append(
                    f"| {name} | {pct(r.get('mean_ttft_ms'))} | {pct(r.get('p99_ttft_ms'))} | "
                    f"{pct(r.get('mean_tpot_ms'))} | {pct(r.get('mean_jct_ms'))} | "
                    f"{pct(r.get('instance_seconds'))} | {pct(r.get('busy_instance_seconds'))} | "
                    f"{pct(r.get('perf_per_instance_s'))} |"
                )
        lines.extend(prefix_table(systems, st))  # session workloads: hit rates vs the oracle's
        classes = sorted({c for s in systems.values() for c in (s.get("by_class") or {})})
        if len(classes) > 1:
            lines.append("\nPer class (mean TTFT / mean JCT, ms):\n")
            lines.append("| system | " + " | ".join(classes) + " |")
            lines.append("|---|" + "---:|" * len(classes))
            for name, s in systems.items():
                bc = s.get("by_class") or {}
                cells = [
                    f"{_fmt(bc[c].get('mean_ttft_ms'))} / {_fmt(bc[c].get('mean_jct_ms'))}" if c in bc else "–"
                    for c in classes
                ]
                lines.append(f"| {name} | " + " | ".join(cells) + " |")
        notes = []
        for name, s in systems.items():
            cfg = s.get("config") or {}
            m = s["summary"]
            bits = []
            if cfg.get("layout") == "disaggregated":
                if cfg.get("pd_ratio", "auto") != "auto":
                    how = "stated ratio"
                elif cfg.get("layout_plan") == "simulated":
                    how = f"simulated layout planner, {cfg.get('plan_objective')} objective"
                else:
                    how = "work-share/load planner"
                bits.append(f"prefill:decode {_split(s.get('split'))} ({how}), flip policy {cfg.get('flip_policy')}")
                bits.append(
                    f"prefill {cfg.get('prefill_policy')}, dispatch {cfg.get('dispatch_policy')}, admission "
                    f"{cfg.get('admission')}, predictor {cfg.get('predictor')}, fallback {cfg.get('fallback')}"
                )
            elif cfg:
                bits.append(f"co-located, {cfg.get('batching')} batching")
            if cfg.get("chunk_size"):
                bits.append(f"chunk {cfg['chunk_size']}")
            if m.get("preemptions") is not None:
                bits.append(f"{m['preemptions']} preemptions, {m.get('flips', 0)} flips")
            if m.get("sim_wall_s") is not None:
                bits.append(f"simulated in {m['sim_wall_s']:.2f} s")
            plan = (s.get("extra") or {}).get("plan")
            if plan and plan.get("candidates"):
                tried = ", ".join(
                    f"{split} {c['mean_ttft_ms']:.0f} / {c['mean_jct_ms']:.0f} ms"
                    for split, c in plan["candidates"].items()
                )
                bits.append(f"candidates simulated (mean TTFT / JCT on a resample of the traffic): {tried}")
            if plan and plan.get("rejected"):
                over = ", ".join(f"{split} at {u:.2f}" for split, u in plan["rejected"].items())
                bits.append(f"rejected, a pool over its steady-state capacity: {over}")
            if bits:
                notes.append(f"- **{name}**: " + "; ".join(bits))
        if notes:
            lines.append("\nConfiguration:\n")
            lines.extend(notes)
        for kind in ("ttft_cdf", "jct_cdf", "bars", "prefix"):
            p = paths.get(f"{wname}:{kind}")
            if p is not None:
                lines.append(f"\n![{kind}]({p.name})")
    if "overview" in paths:
        lines.append(f"\n## Overview\n\n![overview]({paths['overview'].name})")
    report = out_dir / "report.md"
    report.write_text("\n".join(lines) + "\n")
    paths["report"] = report
    return paths


def _safe(name: str) -> str:
    return "".join(c if c.isalnum() or c in "-_" else "_" for c in name)


def _plots(results: dict[str, Any], out_dir: Path) -> dict[str, Path]:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    import numpy as np

    paths: dict[str, Path] = {}
    for wname, wres in results["workloads"].items():
        systems = wres["systems"]
        for metric, label in (("ttft_s", "TTFT (s)"), ("jct_s", "JCT (s)")):
            fig, ax = plt.subplots(figsize=(6, 4))
            for name, s in systems.items():
                vals = np.sort([r[metric] for r in s.get("requests", []) if r.get(metric) is not None])
                if len(vals):
                    ax.plot(vals, np.arange(1, len(vals) + 1) / len(vals), label=name)
            ax.set_xlabel(label)
            ax.set_ylabel("fraction of requests")
            ax.set_title(f"{wname}: CDF of {label.split()[0]}")
            if metric == "ttft_s":
                ax.set_xscale("log")
            ax.grid(alpha=0.3)
            ax.legend(fontsize=8)
            p = out_dir / f"{_safe(wname)}_{metric.split('_')[0]}_cdf.png"
            fig.tight_layout()
            fig.savefig(p, dpi=110)
            plt.close(fig)
            paths[f"{wname}:{metric.split('_')[0]}_cdf"] = p
        fig, axes = plt.subplots(1, 3, figsize=(11, 3.6))
        names = list(systems)
        for ax, (key, label) in zip(
            axes,
            (("mean_ttft_ms", "mean TTFT (ms)"), ("mean_jct_ms", "mean JCT (ms)"), ("mean_tpot_ms", "mean TPOT (ms)")),
            strict=True,
        ):
            vals = [systems[n]["summary"].get(key) or 0.0 for n in names]
            ax.bar(range(len(names)), vals, color=[f"C{i}" for i in range(len(names))])
            ax.set_xticks(range(len(names)))
            ax.set_xticklabels(names, rotation=30, ha="right", fontsize=8)
            ax.set_title(label, fontsize=9)
            if key == "mean_ttft_ms":
                ax.set_yscale("log")
        fig.suptitle(wname)
        fig.tight_layout()
        p = out_dir / f"{_safe(wname)}_bars.png"
        fig.savefig(p, dpi=110)
        plt.close(fig)
        paths[f"{wname}:bars"] = p
        if prefix_plot(wname, systems, out_dir / f"{_safe(wname)}_prefix.png"):
            paths[f"{wname}:prefix"] = out_dir / f"{_safe(wname)}_prefix.png"
    wls = list(results["workloads"])
    if len(wls) > 1:
        sysnames: list[str] = []
        for w in wls:
            for n in results["workloads"][w]["systems"]:
                if n not in sysnames:
                    sysnames.append(n)
        fig, axes = plt.subplots(1, 2, figsize=(11, 3.8))
        width = 0.8 / max(1, len(sysnames))
        panels = ((axes[0], "mean_ttft_ms", "mean TTFT (ms, log)"), (axes[1], "mean_jct_ms", "mean JCT (ms)"))
        for ax, key, label in panels:
            for k, n in enumerate(sysnames):
                vals = [
                    (results["workloads"][w]["systems"].get(n, {}).get("summary", {}).get(key) or 0.0) for w in wls
                ]
                ax.bar(np.arange(len(wls)) + k * width, vals, width, label=n)
            ax.set_xticks(np.arange(len(wls)) + width * (len(sysnames) - 1) / 2)
            ax.set_xticklabels(wls, fontsize=8)
            ax.set_title(label, fontsize=9)
            if key == "mean_ttft_ms":
                ax.set_yscale("log")
        axes[0].legend(fontsize=7)
        fig.tight_layout()
        p = out_dir / "overview_bars.png"
        fig.savefig(p, dpi=110)
        plt.close(fig)
        paths["overview"] = p
    return paths
