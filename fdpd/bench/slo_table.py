"""``fdpd bench slo-table``: SLO attainment and goodput of PD vs colocated across request
rates, recomputed offline from ``bench compare --save-requests`` results (one JSON per rate).

::

    for r in 0.5 1.0 1.5 2.0; do fdpd bench compare ... --request-rate $r \\
        --json sweep_$r.json --save-requests; done
    fdpd bench slo-table sweep_*.json --slo ttft:4000,itl:250 --slo ttft:4000,itl:100 \\
        --plot docs/bench/interference_slo_attainment.png

Goodput in DistServe's sense (the highest rate a system serves with at least ``--target`` of
its requests within the SLO) is read off the table: the highest tested rate that meets it.
"""

from __future__ import annotations

import json
from pathlib import Path

import click

from fdpd.bench.metrics import ITL_STATS, SLO, RequestRecord

SYSTEMS = (("pd", "PD"), ("colocated", "colocated"))


def records_from_rows(rows: list[dict]) -> list[RequestRecord]:
    """Rebuild records from ``request_rows`` output (chunk times from TTFT and the ITLs)."""
    out = []
    for i, q in enumerate(rows):
        r = RequestRecord(i, start=q["start"], ok=q["ok"], error=q.get("error", ""),
                          output_tokens=q["output_tokens"])
        if q["ttft"] is not None:
            times = [q["start"] + q["ttft"]]
            for gap in q["itls"]:
                times.append(times[-1] + gap)
            r.chunk_times = times
            r.end = q["start"] + q["e2e"] if q["e2e"] is not None else None
        out.append(r)
    return out


def attainment(report: dict, system: str, slo: SLO) -> tuple[float, float]:
    """(share of requests within ``slo``, good requests per second) of one system's run."""
    result = report[system]
    if "requests" not in result:
        raise click.ClickException("the JSON has no per-request timings; run bench compare "
                                   "with --save-requests")
    records = records_from_rows(result["requests"])
    good = sum(slo.met(r) for r in records)
    return good / max(1, len(records)), good / result["duration_s"]


@click.command("slo-table")
@click.argument("results", nargs=-1, required=True, type=click.Path(exists=True,
                                                                     dir_okay=False))
@click.option("--slo", "slos", multiple=True, required=True,
              help="ttft:MS,itl:MS[,tpot:MS][,e2e:MS] (repeatable).")
@click.option("--slo-itl-stat", type=click.Choice(ITL_STATS), default="max", show_default=True)
@click.option("--target", default=0.9, show_default=True, help="Attainment goodput needs.")
@click.option("--plot", default=None, help="Write an attainment-vs-rate PNG here.")
def command(results, slos, slo_itl_stat, target, plot):
    """Attainment and goodput per request rate from `bench compare --save-requests` JSONs."""
    reports = [json.loads(Path(p).read_text()) for p in results]
    rate_of = [float(r["pd"]["config"]["arrival"].split("rate ")[1].split(" ")[0])
               for r in reports]
    order = sorted(range(len(reports)), key=lambda i: rate_of[i])
    parsed = [SLO.parse(s, slo_itl_stat) for s in slos]
    curves: dict[tuple[str, str], list[float]] = {}
    for text, slo in zip(slos, parsed):
        click.echo(f"\nSLO {slo.describe()}: attainment (goodput, req/s)")
        click.echo("| rate (req/s) | PD | colocated | goodput PD / colocated | p99 ITL PD / "
                   "colocated |")
        click.echo("| ---: | ---: | ---: | ---: | ---: |")
        best = {s: None for s, _ in SYSTEMS}
        for i in order:
            rep, rate = reports[i], rate_of[i]
            (pa, pg), (ca, cg) = (attainment(rep, s, slo) for s, _ in SYSTEMS)
            for s, a in (("pd", pa), ("colocated", ca)):
                curves.setdefault((text, s), []).append(100 * a)
                if a >= target:
                    best[s] = rate
            itl = rep["pd"]["itl_ms"]["p99"] / rep["colocated"]["itl_ms"]["p99"]
            ratio = f"{pg / cg:.2f}" if cg else "inf"
            click.echo(f"| {rate:g} | {100 * pa:.1f}% ({pg:.3f}) | {100 * ca:.1f}% "
                       f"({cg:.3f}) | {ratio} | {itl:.3f} |")
        for s, name in SYSTEMS:
            click.echo(f"{name}: highest tested rate with >= {100 * target:.0f}% attainment: "
                       f"{best[s] if best[s] is not None else 'none'}")
    if plot:
        _plot(plot, [rate_of[i] for i in order], slos, parsed, curves, target)
        click.echo(f"wrote {plot}")


def _plot(path: str, rates: list[float], slos, parsed, curves, target: float) -> None:
    from fdpd.bench.plots import _pyplot, _save

    plt = _pyplot()
    fig, axes = plt.subplots(1, len(slos), figsize=(4.5 * len(slos), 3), dpi=80,
                             squeeze=False)
    for ax, text, slo in zip(axes[0], slos, parsed):
        for (system, label), color in zip(SYSTEMS, ("tab:blue", "tab:red")):
            ax.plot(rates, curves[(text, system)], "o-", color=color, label=label)
        ax.axhline(100 * target, color="gray", lw=0.8, ls="--")
        ax.set_title(slo.describe(), fontsize=8)
        ax.set_xlabel("request rate (req/s)")
        ax.set_ylim(0, 105)
        ax.grid(alpha=0.3)
    axes[0][0].set_ylabel("SLO attainment (%)")
    axes[0][0].legend(fontsize=8)
    fig.tight_layout()
    Path(path).parent.mkdir(parents=True, exist_ok=True)
    _save(fig, Path(path))
    plt.close(fig)
