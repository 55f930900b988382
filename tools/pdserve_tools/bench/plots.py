"""PNG plots of a `pdserve bench serve` result, drawn from its JSON document (nothing else is read).

Contract. `write_plots(data, folder, stem)` writes, and returns the paths of:
- `{stem}-cdf-{rate}.png` per offered rate: the empirical CDFs of TTFT and of TPOT, one line per target;
- `{stem}-rates.png` when more than one finite rate was run or a goodput search was: goodput and SLO
  attainment against the offered rate, one line per target, every fixed-rate run and search probe a point.
`write_attainment_plot(data, path)` draws a `pdserve bench goodput` result: SLO attainment against the offered
rate, one panel per SLO, one line per target and seed, the target share dashed.
matplotlib is imported here only, with its non-interactive Agg backend, so the benchmark runs without a display.
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from pathlib import Path
from typing import Any


def _pyplot() -> Any:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    return plt


def cdf(values: Sequence[float | None]) -> tuple[list[float], list[float]]:
    """Sorted samples and their cumulative shares (1/n .. 1); None entries are left out."""
    xs = sorted(v for v in values if v is not None)
    return xs, [(i + 1) / len(xs) for i in range(len(xs))]


def rate_points(data: dict[str, Any], target: str) -> list[tuple[float, float, float]]:
    """(rate, goodput, attainment) of a target's finite-rate runs and search probes, by rate."""
    runs = list(data["results"].get(target, {}).values()) + data.get("search", {}).get(target, {}).get("runs", [])
    points = [(float(r["rate_rps"]), r["request_goodput"] or 0.0, r["slo_attainment"] or 0.0) for r in runs]
    return sorted(p for p in points if not math.isinf(p[0]))


def _cdf_figure(data: dict[str, Any], rate: str, path: Path) -> Path:
    plt = _pyplot()
    fig, axes = plt.subplots(1, 2, figsize=(11, 4))
    for ax, key, title in ((axes[0], "ttfts_ms", "TTFT"), (axes[1], "tpots_ms", "TPOT")):
        for target, runs in data["results"].items():
            if rate in runs:
                xs, ys = cdf(runs[rate][key])
                if xs:
                    ax.step(xs, ys, where="post", label=target)
        ax.set_xscale("log")
        ax.set_xlabel(f"{title} (ms, log scale)")
        ax.set_ylabel("share of requests")
        ax.set_title(f"{title} at {rate} req/s")
        ax.grid(True, alpha=0.3)
        ax.legend()
    fig.tight_layout()
    fig.savefig(path, dpi=100)
    plt.close(fig)
    return path


def _rates_figure(data: dict[str, Any], path: Path) -> Path:
    plt = _pyplot()
    fig, axes = plt.subplots(1, 2, figsize=(11, 4))
    for target in data["results"]:
        points = rate_points(data, target)
        if points:
            rates, goodputs, attainments = zip(*points, strict=True)
            axes[0].plot(rates, goodputs, marker="o", label=target)
            axes[1].plot(rates, attainments, marker="o", label=target)
    target_share = data["args"].get("search_target")
    if data.get("search") and target_share:
        axes[1].axhline(target_share, color="grey", linestyle="--", label="search target")
    for ax, label in ((axes[0], "goodput (req/s within the SLO)"), (axes[1], "SLO attainment")):
        ax.set_xlabel("offered rate (req/s)")
        ax.set_ylabel(label)
        ax.grid(True, alpha=0.3)
        ax.legend()
    axes[1].set_ylim(0, 1.05)
    fig.tight_layout()
    fig.savefig(path, dpi=100)
    plt.close(fig)
    return path


def write_plots(data: dict[str, Any], folder: Path, stem: str) -> list[Path]:
    folder.mkdir(parents=True, exist_ok=True)
    rates = list(dict.fromkeys(rate for runs in data["results"].values() for rate in runs))
    written = [_cdf_figure(data, rate, folder / f"{stem}-cdf-{rate}.png") for rate in rates]
    finite = [r for r in rates if r != "inf"]
    if len(finite) > 1 or data.get("search"):
        written.append(_rates_figure(data, folder / f"{stem}-rates.png"))
    return written


def write_attainment_plot(data: dict[str, Any], path: Path) -> Path:
    plt = _pyplot()
    slos = data["slos"]
    fig, axes = plt.subplots(1, len(slos), figsize=(5.5 * len(slos), 4), squeeze=False)
    colors = plt.rcParams["axes.prop_cycle"].by_key()["color"]
    for ax, entry in zip(axes[0], slos, strict=True):
        for i, (target, seeds) in enumerate(data["runs"].items()):
            for j, runs in enumerate(seeds.values()):
                rates = [float(r["rate_rps"]) for r in runs]
                shares = [r["attainment"][entry["name"]] for r in runs]
                ax.plot(rates, shares, marker="o", color=colors[i % len(colors)], alpha=0.8,
                        label=target if j == 0 else None)
        ax.axhline(data["target_share"], color="grey", linestyle="--", label="target share")
        slo = entry["slo"]
        ax.set_title(f"{entry['name']}: TTFT <= {slo['ttft_ms']:g} ms, TPOT <= {slo['tpot_ms']:g} ms")
        ax.set_xlabel("offered rate (req/s)")
        ax.set_ylabel("SLO attainment")
        ax.set_ylim(0, 1.05)
        ax.grid(True, alpha=0.3)
        ax.legend()
    fig.tight_layout()
    path.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(path, dpi=100)
    plt.close(fig)
    return path
