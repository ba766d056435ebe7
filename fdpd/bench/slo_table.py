"""``fdpd bench slo-table``: SLO attainment and goodput of PD vs colocated (fdpd mixed, vLLM)
across request rates, recomputed offline from ``bench compare --save-requests`` results (one
JSON per rate).

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

SYSTEMS = (("pd", "PD"), ("colocated", "colocated"), ("vllm", "vLLM"))


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
    # The systems every file has, in the canonical order (PD first: the ratios are PD / other).
    systems = [(k, n) for k, n in SYSTEMS if all(k in r for r in reports)]
    if not systems:
        raise click.ClickException("no system is in every file (pd, colocated, vllm)")
    rate_of = [_rate(r[systems[0][0]]) for r in reports]
    order = sorted(range(len(reports)), key=lambda i: rate_of[i])
    parsed = [SLO.parse(s, slo_itl_stat) for s in slos]
    others = [(k, n) for k, n in systems if k != "pd"] if systems[0][0] == "pd" else []
    curves: dict[tuple[str, str], list[float]] = {}
    for text, slo in zip(slos, parsed):
        click.echo(f"\nSLO {slo.describe()}: attainment (goodput, req/s)")
        header = ["rate (req/s)", *(n for _, n in systems),
                  *(f"goodput PD / {n}" for _, n in others),
                  *(f"p99 ITL PD / {n}" for _, n in others)]
        click.echo("| " + " | ".join(header) + " |")
        click.echo("|" + " ---: |" * len(header))
        best: dict[str, float | None] = {k: None for k, _ in systems}
        for i in order:
            rep, rate = reports[i], rate_of[i]
            got = {k: attainment(rep, k, slo) for k, _ in systems}
            for k, (a, _) in got.items():
                curves.setdefault((text, k), []).append(100 * a)
                if a >= target:
                    best[k] = rate
            cells = [f"{rate:g}", *(f"{100 * got[k][0]:.1f}% ({got[k][1]:.3f})"
                                    for k, _ in systems)]
            pg = got["pd"][1] if others else 0.0
            cells += [f"{pg / got[k][1]:.2f}" if got[k][1] else "inf" for k, _ in others]
            cells += [_itl_ratio(rep, k) for k, _ in others]
            click.echo("| " + " | ".join(cells) + " |")
        for k, name in systems:
            click.echo(f"{name}: highest tested rate with >= {100 * target:.0f}% attainment: "
                       f"{best[k] if best[k] is not None else 'none'}")
    if plot:
        _plot(plot, [rate_of[i] for i in order], slos, parsed, curves, target, systems)
        click.echo(f"wrote {plot}")


def _rate(result: dict) -> float:
    return float(result["config"]["arrival"].split("rate ")[1].split(" ")[0])


def _itl_ratio(report: dict, other: str) -> str:
    a, b = report["pd"]["itl_ms"]["p99"], report[other]["itl_ms"]["p99"]
    return f"{a / b:.3f}" if a is not None and b else "-"


def _plot(path: str, rates: list[float], slos, parsed, curves, target: float,
          systems) -> None:
    from fdpd.bench.plots import _pyplot, _save

    plt = _pyplot()
    fig, axes = plt.subplots(1, len(slos), figsize=(4.5 * len(slos), 3), dpi=80,
                             squeeze=False)
    for ax, text, slo in zip(axes[0], slos, parsed):
        for (system, label), color in zip(systems, ("tab:blue", "tab:red", "tab:green")):
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
