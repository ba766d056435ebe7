"""PNG plots of ``fdpd bench serve`` / ``compare`` runs (matplotlib, imported only here).

Small on purpose (a few tens of KB each, so they can live in the repository): latency CDFs
(TTFT, ITL, E2E) and ITL over time, one line or colour per run.
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from pathlib import Path

from fdpd.bench.metrics import RequestRecord

_COLORS = ("tab:blue", "tab:red", "tab:green", "tab:orange", "tab:purple")
# Points per run in the ITL scatter (a deterministic stride beyond it keeps PNGs small).
_MAX_POINTS = 8000


def _pyplot():
    try:
        import matplotlib
    except ImportError:
        raise RuntimeError("--plot-dir needs matplotlib: pip install matplotlib") from None
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    return plt


def _save(fig, path: Path) -> None:
    """Save as a 64-colour palette PNG: a few tens of KB instead of a few hundred."""
    from PIL import Image

    fig.savefig(path)
    with Image.open(path) as img:
        small = img.convert("RGB").quantize(colors=64)
    small.save(path, optimize=True)


def _cdf(ax, values_ms: Sequence[float], label: str, color: str) -> None:
    if not values_ms:
        return
    xs = sorted(values_ms)
    n = len(xs)
    ax.plot(xs, [(i + 1) / n for i in range(n)], label=label, color=color, lw=1.2)


def plot_runs(runs: Mapping[str, Sequence[RequestRecord]], out_dir: str | Path,
              prefix: str = "", title: str = "") -> list[Path]:
    """Write ``{prefix}latency_cdf.png`` and ``{prefix}itl_over_time.png``; return the paths."""
    plt = _pyplot()
    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    paths = []

    fig, axes = plt.subplots(1, 3, figsize=(10, 3), dpi=80)
    metrics = (("TTFT", lambda r: [r.ttft] if r.ttft is not None else []),
               ("ITL", lambda r: r.itls),
               ("E2E", lambda r: [r.e2e] if r.e2e is not None else []))
    for ax, (name, get) in zip(axes, metrics):
        for (label, records), color in zip(runs.items(), _COLORS):
            _cdf(ax, [1e3 * v for r in records if r.ok for v in get(r)], label, color)
        ax.set_xlabel(f"{name} (ms)")
        ax.set_xscale("log")
        ax.xaxis.set_minor_formatter(plt.NullFormatter())
        ax.grid(alpha=0.3, which="both")
    axes[0].set_ylabel("fraction of requests / gaps")
    axes[0].legend(fontsize=8)
    if title:
        fig.suptitle(title, fontsize=9)
    fig.tight_layout()
    path = out / f"{prefix}latency_cdf.png"
    _save(fig, path)
    plt.close(fig)
    paths.append(path)

    fig, ax = plt.subplots(figsize=(10, 3), dpi=80)
    for (label, records), color in zip(runs.items(), _COLORS):
        ts, gaps = [], []
        for r in records:
            if r.ok:
                ts.extend(r.chunk_times[1:])
                gaps.extend(1e3 * g for g in r.itls)
        if len(ts) > _MAX_POINTS:
            # Every outlier stays (they are the point of the plot); the bulk is thinned.
            stride = -(-len(ts) // _MAX_POINTS)
            cut = sorted(gaps)[int(0.99 * len(gaps))]
            keep = [i for i in range(len(ts)) if i % stride == 0 or gaps[i] >= cut]
            ts, gaps = [ts[i] for i in keep], [gaps[i] for i in keep]
        ax.scatter(ts, gaps, s=2, alpha=0.5, color=color, label=label, linewidths=0)
        longs = [r.start for r in records if r.long_prompt]
        for t in longs:
            ax.axvline(t, color=color, alpha=0.15, lw=0.8)
    ax.set_xlabel("time since the run started (s)" + ("; vertical lines: long-prompt arrivals"
                                                       if any(r.long_prompt for rs in
                                                              runs.values() for r in rs)
                                                       else ""))
    ax.set_ylabel("ITL (ms)")
    ax.set_yscale("log")
    ax.grid(alpha=0.3, which="both")
    ax.legend(fontsize=8, markerscale=4)
    if title:
        ax.set_title(title, fontsize=9)
    fig.tight_layout()
    path = out / f"{prefix}itl_over_time.png"
    _save(fig, path)
    plt.close(fig)
    paths.append(path)
    return paths
