"""The side-by-side report: a markdown table of throughput and latency percentiles with
ratios against each Hugging Face baseline and of each pipeline against the same tp without
one, the per-rank all-reduce shares and per-stage busy shares of the tensorfleet runs, the
machine it ran on, and a PNG chart of throughput and TTFT by system.
"""

import os
import platform
from pathlib import Path

import torch

# Baselines the ratios are taken against: (result key, column title).
BASELINES = (("hf", "vs HF 1 proc"), ("hf-tp2", "vs HF tp=2"))
# A pipeline and the same tensor parallelism without one: (pipeline key, its baseline key).
PIPELINES = (("tf-pp2", "tf-tp1"), ("tf-tp2pp2", "tf-tp2"))
PIPELINE_TITLE = "vs same tp, pp=1"


def machine() -> dict:
    cpu = platform.processor() or platform.machine()
    try:
        cpu = next(line.split(":", 1)[1].strip() for line in Path("/proc/cpuinfo").read_text().splitlines()
                   if line.startswith("model name"))
    except (OSError, StopIteration):
        pass
    info = {"cpu": cpu, "cores": os.cpu_count(), "torch": torch.__version__,
            "torch_threads": torch.get_num_threads(), "os": platform.platform()}
    if torch.cuda.is_available():
        info["gpu"] = torch.cuda.get_device_name(0)
    return info


def _fmt(d: dict, q: str, scale: float) -> str:
    return f"{d[q] * scale:.{1 if scale == 1 else 0}f}" if d else "-"


def format_table(systems: dict[str, dict]) -> str:
    """Markdown: one row per system, in run order."""
    bases = [(key, title) for key, title in BASELINES if key in systems]
    pipelines = {key: base for key, base in PIPELINES if key in systems and base in systems}
    head = ["system", "output tok/s", "req/s", "TTFT p50 / p90 / p99 (s)", "ITL p50 / p99 (ms)",
            "E2E p50 / p99 (s)"] + [title for _, title in bases] + ([PIPELINE_TITLE] if pipelines else [])
    rows = [head, ["---"] * len(head)]
    for key, r in systems.items():
        row = [r["label"], f"{r['output_tok_s']:.1f}", f"{r['request_throughput']:.2f}",
               " / ".join(_fmt(r["ttft_s"], q, 1) for q in ("p50", "p90", "p99")),
               " / ".join(_fmt(r["itl_s"], q, 1e3) for q in ("p50", "p99")),
               " / ".join(_fmt(r["e2e_s"], q, 1) for q in ("p50", "p99"))]
        row += [f"{r['output_tok_s'] / systems[base]['output_tok_s']:.2f}x" for base, _ in bases]
        if pipelines:
            base = pipelines.get(key)
            row.append(f"{r['output_tok_s'] / systems[base]['output_tok_s']:.2f}x" if base else "-")
        rows.append(row)
    return "\n".join("| " + " | ".join(row) + " |" for row in rows)


def format_system_shares(systems: dict[str, dict]) -> str:
    """Per tensorfleet run: all-reduce time as a share of each rank's forward time (stage s,
    TP rank r), each pipeline stage's busy share of the time the engine had work, and the
    round trip of an empty step through all its stages."""
    lines = []
    for r in systems.values():
        if "ranks" not in r:
            continue
        shares = ", ".join(f"s{x['stage']}r{x['tp_rank']} {100 * x['all_reduce_share']:.1f}%"
                           for x in r["ranks"] if x["all_reduces"]) or "none (tp=1)"
        busy = ", ".join(f"s{x['stage']} {100 * x['busy_share']:.1f}%" for x in r.get("stages", []))
        lines.append(f"- {r['label']}: all-reduce share {shares}; stage busy {busy}; "
                     f"empty-step round trip {r['control_overhead_ms']:.2f} ms")
    return "\n".join(lines)


def format_rounds(systems: dict[str, dict]) -> str:
    """Output tokens/s of every round, per system (the table shows the median round), with
    the machine's load average after each."""
    return "\n".join(f"- {r['label']}: " + ", ".join(f"{t:.1f}" for t in r["tok_s_of_runs"]) + " tok/s (load "
                     + ", ".join(f"{x:.1f}" for x in r["load_average_of_runs"]) + ")" for r in systems.values())


def ratios(systems: dict[str, dict]) -> dict[str, float]:
    """tensorfleet output tokens/s over each baseline's, and each pipeline's over the same
    tp without one, for every pair present."""
    pairs = [(key, base) for key in systems if key.startswith("tf-") for base, _ in BASELINES]
    pairs += PIPELINES
    return {f"{key}/{base}": systems[key]["output_tok_s"] / systems[base]["output_tok_s"]
            for key, base in pairs if key in systems and base in systems}


def draw_chart(systems: dict[str, dict], title: str, path: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")  # no display: files only
    import matplotlib.pyplot as plt

    labels = [r["label"] for r in systems.values()]
    colors = ["tab:blue" if key.startswith("tf-") else "tab:gray" for key in systems]
    fig, (tput, ttft) = plt.subplots(1, 2, figsize=(12, 4.8))
    bars = tput.bar(labels, [r["output_tok_s"] for r in systems.values()], color=colors)
    tput.bar_label(bars, fmt="%.0f")
    tput.set_ylabel("output tokens/s (higher is better)")
    tput.set_title("Throughput")
    x = range(len(labels))
    for offset, q in ((-0.2, "p50"), (0.2, "p90")):
        ttft.bar([i + offset for i in x], [r["ttft_s"].get(q, 0) for r in systems.values()], width=0.4,
                 label=f"TTFT {q}", color=colors, alpha=1.0 if q == "p50" else 0.55)
    ttft.set_xticks(list(x), labels)
    ttft.set_ylabel("seconds (lower is better)")
    ttft.set_title("Time to first token (p50 solid, p90 light)")
    for ax in (tput, ttft):
        ax.tick_params(axis="x", labelrotation=20)
        for label in ax.get_xticklabels():
            label.set_horizontalalignment("right")
    fig.suptitle(title, fontsize=10)
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)
