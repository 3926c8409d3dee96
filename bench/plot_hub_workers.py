"""Draw the PNGs of docs/workers.md from the results recorded there.

    python bench/plot_hub_workers.py        # needs matplotlib (pip install matplotlib)

Reads the JSON block that ``python bench/hub_workers.py --record`` wrote at the end of
docs/workers.md and writes:

* docs/hub_workers_rss.png        — RSS summed over the workers against connections
  held, with the least-squares line (its slope is the cost of a connection)
* docs/hub_workers_throughput.png — echo throughput with 1 and 2 workers (wall clock
  and per CPU-second of the workers), and routed sends (same / other worker)
"""

from __future__ import annotations

import json
import re
import sys
from pathlib import Path
from typing import Any

ROOT = Path(__file__).resolve().parent.parent
DOC = ROOT / "docs" / "workers.md"
BLOCK = re.compile(r"<!-- hub_workers results: begin.*?```json\n(.*?)\n```", re.DOTALL)


def results() -> list[dict[str, Any]]:
    match = BLOCK.search(DOC.read_text())
    if match is None:
        sys.exit(f"no recorded results in {DOC}: run python bench/hub_workers.py --record")
    data: list[dict[str, Any]] = json.loads(match.group(1))
    return data


def one(data: list[dict[str, Any]], bench: str) -> dict[str, Any]:
    for item in data:
        if item.get("bench") == bench:
            return item
    sys.exit(f"no {bench!r} result recorded in {DOC}")


def main() -> int:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    data = results()
    mem = one(data, "memory")
    xs = [p["connections"] for p in mem["points"]]
    ys = [p["workers_rss"] / 2**20 for p in mem["points"]]
    sup = [p["supervisor_rss"] / 2**20 for p in mem["points"]]
    slope = mem["bytes_per_connection"]
    intercept = mem["workers_rss_at_zero"] / 2**20
    fig, ax = plt.subplots(figsize=(7, 4.2), dpi=110)
    ax.plot([x / 1000 for x in xs], ys, "o", color="tab:blue",
            label=f"{mem['workers']} workers, RSS summed")
    top = max(xs)
    ax.plot([0, top / 1000], [intercept, intercept + slope * top / 2**20], "-",
            color="tab:blue", alpha=0.6,
            label=f"fit: {intercept:.0f} MiB + {slope:,.0f} B per connection")
    ax.plot([x / 1000 for x in xs], sup, "s", color="tab:gray", label="supervisor")
    ax.set_xlabel("connections held (thousands)")
    ax.set_ylabel("resident memory (MiB)")
    ax.set_title("Hub(workers=4): memory against connections")
    ax.set_xlim(left=0)
    ax.set_ylim(bottom=0)
    ax.grid(alpha=0.3)
    ax.legend(loc="upper left")
    fig.tight_layout()
    fig.savefig(ROOT / "docs" / "hub_workers_rss.png")
    plt.close(fig)

    echo = one(data, "echo-scaling")
    route = one(data, "route-ratio")
    fig, (ax1, ax2) = plt.subplots(1, 2, figsize=(9, 4.2), dpi=110,
                                   gridspec_kw={"width_ratios": [3, 2]})
    labels = ["1 worker", "2 workers"]
    wall = [echo["rate_1"] / 1e3, echo["rate_2"] / 1e3]
    per_cpu = [echo["rate_per_cpu_s_1"] / 1e3, echo["rate_per_cpu_s_2"] / 1e3]
    pos = range(len(labels))
    ax1.bar([p - 0.2 for p in pos], wall, 0.4, label="messages/s (wall clock)",
            color="tab:blue")
    ax1.bar([p + 0.2 for p in pos], per_cpu, 0.4, label="per CPU-second of the workers",
            color="tab:orange")
    for p, w, load in zip(pos, wall, [echo["loadgen_cpu_1"], echo["loadgen_cpu_2"]],
                          strict=True):
        ax1.annotate(f"{w:.0f}k\nloadgen {load:.0%} CPU", (p - 0.2, w), ha="center",
                     va="bottom", fontsize=8)
    ax1.set_xticks(list(pos), labels)
    ax1.set_ylabel("thousand 64-byte lines/s")
    ax1.set_title(f"echo, 1,000 conns x 16 in flight ({echo['cores']} cores): "
                  f"x{echo['scaling']:.2f}", fontsize=10)
    ax1.legend(loc="lower right", fontsize=8)
    ax1.grid(axis="y", alpha=0.3)
    rates = [route["same_worker_rate"] / 1e3, route["cross_worker_rate"] / 1e3]
    ax2.bar(["same worker", "other worker"], rates, 0.5, color=["tab:green", "tab:purple"])
    for i, r in enumerate(rates):
        ax2.annotate(f"{r:.0f}k", (i, r), ha="center", va="bottom", fontsize=8)
    ax2.set_ylabel("thousand hub.send/s")
    ax2.set_title(f"hub.send to a connection of: x{route['cross_vs_same']:.2f}", fontsize=10)
    ax2.grid(axis="y", alpha=0.3)
    fig.tight_layout()
    fig.savefig(ROOT / "docs" / "hub_workers_throughput.png")
    plt.close(fig)
    print("wrote docs/hub_workers_rss.png and docs/hub_workers_throughput.png")
    return 0


if __name__ == "__main__":
    sys.exit(main())
