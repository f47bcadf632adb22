"""The fleet report as a PNG: per host, predicted (with one standard error) against
exact savings, for the placement and the given order."""

from __future__ import annotations

from typing import Any

import numpy as np

from ..constants import PAGE_SIZE

MIB = 2**20


def fleet_plot(path: str, r: dict[str, Any]) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, axes = plt.subplots(1, 2, figsize=(11, 4.2), sharey=True)
    for ax, key, title in ((axes[0], "placement", "placement (greedy + local search)"),
                           (axes[1], "given_order", "given order")):
        hosts = r[key]["hosts"]
        x = np.arange(len(hosts))
        pred = np.array([h["predicted_saved_pages"] for h in hosts]) * PAGE_SIZE / MIB
        err = np.array([h["predicted_stderr_pages"] for h in hosts]) * PAGE_SIZE / MIB
        ax.bar(x - 0.2, pred, 0.4, yerr=err, capsize=3, label="predicted (sketches)",
               color="#6baed6")
        if all("exact" in h and h["exact"] for h in hosts):
            ex = np.array([h["exact"]["saved_pages"] for h in hosts]) * PAGE_SIZE / MIB
            ax.bar(x + 0.2, ex, 0.4, label="exact (engine)", color="#fd8d3c")
        t = r[key]["total"]
        total = t.get("exact_saved_pages", t["predicted_saved_pages"]) * PAGE_SIZE / MIB
        ax.set_title(f"{title}: {total:.1f} MiB saved")
        ax.set_xlabel("host")
        ax.set_xticks(x)
        ax.grid(axis="y", alpha=0.3)
    axes[0].set_ylabel("memory KSM saves (MiB)")
    axes[0].legend(loc="lower right")
    fig.suptitle(f"ksmcore fleet: {len(r['sources'])} sources on {r['hosts']} hosts")
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)
