"""What bench_scaleout makes of its measurements: the tables (throughput and latency per setup, hit ratio per
replica), the chart, and the RESULTS.md section's text."""
from __future__ import annotations

import subprocess
from pathlib import Path

from benchmarks.scaleout.load import HitRatio, Run
from scripts import topology


def tool_versions() -> dict[str, str]:
    nginx = topology.find_binary("nginx", install=False)
    nginx_v = subprocess.run([nginx, "-v"], capture_output=True, text=True).stderr.strip().split("/")[-1]
    redis_v = subprocess.run(["redis-server", "--version"], capture_output=True, text=True).stdout.split()[2]
    return {"nginx": nginx_v, "redis": redis_v.removeprefix("v=")}


def uptime() -> str:
    return subprocess.run(["uptime"], capture_output=True, text=True).stdout.strip()


def throughput_table(runs: list[Run]) -> str:
    base = runs[0]
    columns = ["setup", "requests/s", "p50 (ms)", "p99 (ms)", "throughput ÷ direct", "p99 ÷ direct", "errors",
               "answered by"]
    rows = ["| " + " | ".join(columns) + " |", "|---|---:|---:|---:|---:|---:|---:|---|"]
    for r in runs:
        by = ", ".join(f"{k} {v}" for k, v in sorted(r.replicas.items()))
        p50, p99 = r.quantile(0.5) * 1e3, r.quantile(0.99) * 1e3
        rows.append(f"| {r.name} | {r.rps:.1f} | {p50:.1f} | {p99:.1f} | {r.rps / base.rps:.2f} | "
                    f"{r.quantile(0.99) / base.quantile(0.99):.2f} | {r.errors} | {by} |")
    return "\n".join(rows)


def hit_table(results: list[HitRatio], capacity: int) -> str:
    rows = ["| routing | replica | hits | misses | hit ratio | resident adapters (capacity) |",
            "|---|---|---:|---:|---:|---:|"]
    for h in results:
        for replica, (hits, misses, resident) in sorted(h.per_replica.items()):
            rows.append(f"| {h.mode} | {replica} | {hits:.0f} | {misses:.0f} | "
                        f"{hits / max(1.0, hits + misses):.3f} | {resident:.0f} ({capacity}) |")
        rows.append(f"| **{h.mode}** | **both** | {h.hits:.0f} | {h.misses:.0f} | **{h.ratio:.3f}** | |")
    return "\n".join(rows)


def hit_latency_table(results: list[HitRatio]) -> str:
    rows = ["| routing | requests/s | p50 (ms) | p99 (ms) | errors |", "|---|---:|---:|---:|---:|"]
    for h in results:
        r = h.run
        p50, p99 = r.quantile(0.5) * 1e3, r.quantile(0.99) * 1e3
        rows.append(f"| {h.mode} | {r.rps:.1f} | {p50:.1f} | {p99:.1f} | "
                    f"{r.errors} |")
    return "\n".join(rows)


def chart_data(runs: list[Run], hits: list[HitRatio]) -> tuple[list[tuple[str, float, float]],
                                                               list[tuple[str, float]]]:
    """What the chart shows: (setup, requests/s, p99 ms) and (routing / replica, hit ratio)."""
    throughput = [(r.name, r.rps, r.quantile(0.99) * 1e3) for r in runs]
    ratios = []
    for h in hits:
        short = "hash" if h.mode.startswith("consistent") else "rr"
        for replica, (hit, miss, _) in sorted(h.per_replica.items()):
            ratios.append((f"{short}\n{replica}", hit / max(1.0, hit + miss)))
        ratios.append((f"{short}\nboth", h.ratio))
    return throughput, ratios


def write_chart(throughput: list[tuple[str, float, float]], ratios: list[tuple[str, float]], path: Path,
                title: str) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, (ax1, ax2, ax3) = plt.subplots(1, 3, figsize=(13, 4))
    names = [name.replace(" through ", "\nthrough ").replace(", direct", "\ndirect")
             for name, _, _ in throughput]
    colors = ["#999999", "#aec7e8", "#1f77b4"][: len(names)]
    panels = ((ax1, [t[1] for t in throughput], "requests / s", "throughput (higher is better)"),
              (ax2, [t[2] for t in throughput], "p99 latency (ms)", "p99 latency (lower is better)"))
    for ax, values, label, what in panels:
        bars = ax.bar(names, values, color=colors)
        ax.bar_label(bars, labels=[f"{v:.0f}" for v in values], padding=2)
        ax.set_ylim(0, max(values) * 1.18)
        ax.set_ylabel(label)
        ax.set_title(what, fontsize=9)
        ax.tick_params(axis="x", labelsize=8)
    labels, values = [r[0] for r in ratios], [r[1] for r in ratios]
    colors = ["#2ca02c" if lab.startswith("hash") else "#d62728" for lab in labels]
    bars = ax3.bar(labels, values, color=colors)
    ax3.bar_label(bars, labels=[f"{v:.2f}" for v in values], padding=2)
    ax3.set_ylim(0, 1.15)
    ax3.set_ylabel("adapter cache hit ratio")
    ax3.set_title("cache hit ratio, adapters = 2x one cache\n(hash: consistent hash, rr: round robin)",
                  fontsize=9)
    ax3.tick_params(axis="x", labelsize=7)
    fig.suptitle(title, fontsize=9)
    fig.tight_layout()
    fig.savefig(path, dpi=120)
    plt.close(fig)
