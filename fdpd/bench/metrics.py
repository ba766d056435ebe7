"""What ``fdpd bench serve`` measures, from per-request client-side timings.

Definitions (all client side, as vLLM's benchmark_serving):

- TTFT: request sent -> first streamed chunk with output.
- ITL: the gaps between consecutive output chunks of one request (a chunk normally carries
  one token; a chunk with several counts as one gap, as in vLLM).
- TPOT: ``(e2e - ttft) / (output_tokens - 1)`` per request with more than one output token.
- E2E: request sent -> stream ended.
- Goodput: requests per second that finished and met every given SLO: ``ttft`` against the
  request's TTFT, ``itl`` against one statistic of the request's own ITLs (``itl_stat``, default
  ``max``: every gap of the request must be within the SLO), ``tpot`` and ``e2e`` likewise.
- Prefix-cache hit ratio: sum of ``usage.prompt_tokens_details.cached_tokens`` over the sum of
  ``usage.prompt_tokens`` (successful requests).
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from dataclasses import dataclass, field

PERCENTILES = (50, 90, 99)
ITL_STATS = ("max", "p99", "p90", "p50", "mean")


@dataclass
class RequestRecord:
    """One request's timings in seconds; ``start`` and ``chunk_times`` from the bench's t0."""

    index: int
    start: float = 0.0
    ok: bool = False
    error: str = ""
    chunk_times: list[float] = field(default_factory=list)
    end: float | None = None
    prompt_tokens: int = 0           # from usage (else the prompt length the bench sent)
    output_tokens: int = 0           # from usage (else the chunks' token counts)
    cached_tokens: int | None = None
    long_prompt: bool = False        # set by workloads that mix classes (interference)

    @property
    def ttft(self) -> float | None:
        return self.chunk_times[0] - self.start if self.chunk_times else None

    @property
    def e2e(self) -> float | None:
        return None if self.end is None else self.end - self.start

    @property
    def itls(self) -> list[float]:
        t = self.chunk_times
        return [b - a for a, b in zip(t, t[1:])]

    @property
    def tpot(self) -> float | None:
        if self.output_tokens < 2 or self.ttft is None or self.e2e is None:
            return None
        return (self.e2e - self.ttft) / (self.output_tokens - 1)


@dataclass(frozen=True)
class SLO:
    """Latency objectives in milliseconds (None: not checked)."""

    ttft_ms: float | None = None
    itl_ms: float | None = None
    tpot_ms: float | None = None
    e2e_ms: float | None = None
    itl_stat: str = "max"

    @classmethod
    def parse(cls, text: str | None, itl_stat: str = "max") -> SLO | None:
        """``ttft:MS,itl:MS[,tpot:MS][,e2e:MS]`` -> SLO."""
        if not text:
            return None
        if itl_stat not in ITL_STATS:
            raise ValueError(f"itl statistic must be one of {ITL_STATS}, got {itl_stat!r}")
        values: dict[str, float] = {}
        for part in text.split(","):
            name, sep, ms = part.partition(":")
            name = name.strip().lower()
            if not sep or name not in ("ttft", "itl", "tpot", "e2e"):
                raise ValueError(f"bad SLO item {part!r}; expected ttft:MS, itl:MS, tpot:MS "
                                 "or e2e:MS, comma-separated")
            try:
                values[f"{name}_ms"] = float(ms)
            except ValueError:
                raise ValueError(f"bad SLO value in {part!r}: not a number of ms") from None
        return cls(**values, itl_stat=itl_stat)

    def describe(self) -> str:
        parts = [f"TTFT <= {self.ttft_ms:g} ms" if self.ttft_ms is not None else "",
                 f"{self.itl_stat} ITL of the request <= {self.itl_ms:g} ms"
                 if self.itl_ms is not None else "",
                 f"TPOT <= {self.tpot_ms:g} ms" if self.tpot_ms is not None else "",
                 f"E2E <= {self.e2e_ms:g} ms" if self.e2e_ms is not None else ""]
        return " and ".join(p for p in parts if p)

    def met(self, r: RequestRecord) -> bool:
        if not r.ok:
            return False
        checks = ((self.ttft_ms, r.ttft), (self.tpot_ms, r.tpot), (self.e2e_ms, r.e2e),
                  (self.itl_ms, itl_statistic(r.itls, self.itl_stat)))
        return all(limit is None or value is None or value * 1e3 <= limit
                   for limit, value in checks)


def percentile(values: Sequence[float], q: float) -> float:
    """Linear interpolation between closest ranks (numpy's default)."""
    if not values:
        return math.nan
    s = sorted(values)
    pos = (len(s) - 1) * q / 100
    lo = math.floor(pos)
    hi = min(lo + 1, len(s) - 1)
    return s[lo] + (s[hi] - s[lo]) * (pos - lo)


def itl_statistic(itls: Sequence[float], stat: str) -> float | None:
    if not itls:
        return None
    if stat == "max":
        return max(itls)
    if stat == "mean":
        return sum(itls) / len(itls)
    return percentile(itls, float(stat[1:]))


def distribution_ms(values: Sequence[float]) -> dict[str, float]:
    """mean / p50 / p90 / p99 / max of ``values`` (seconds) in ms; NaN when empty."""
    if not values:
        return {"mean": math.nan, **{f"p{q}": math.nan for q in PERCENTILES}, "max": math.nan}
    out = {"mean": 1e3 * sum(values) / len(values)}
    out.update({f"p{q}": 1e3 * percentile(values, q) for q in PERCENTILES})
    out["max"] = 1e3 * max(values)
    return out


def summarize(records: Sequence[RequestRecord], slo: SLO | None = None,
              duration: float | None = None) -> dict:
    """The result dict of one run (JSON-ready apart from NaN, which json writes as NaN)."""
    done = [r for r in records if r.ok]
    if duration is None:
        ends = [r.end for r in records if r.end is not None]
        duration = (max(ends) - min(r.start for r in records)) if ends else 0.0
    out_tokens = sum(r.output_tokens for r in done)
    in_tokens = sum(r.prompt_tokens for r in done)
    cached = [r.cached_tokens for r in done if r.cached_tokens is not None]
    cached_prompt = sum(r.prompt_tokens for r in done if r.cached_tokens is not None)
    per_s = (lambda x: x / duration) if duration > 0 else (lambda x: math.nan)
    result = {
        "completed": len(done), "failed": len(records) - len(done),
        "duration_s": duration,
        "request_throughput": per_s(len(done)),
        "output_throughput": per_s(out_tokens),
        "total_token_throughput": per_s(out_tokens + in_tokens),
        "prompt_tokens": in_tokens, "output_tokens": out_tokens,
        "cached_tokens": sum(cached) if cached else None,
        "prefix_cache_hit_ratio": sum(cached) / cached_prompt if cached_prompt else None,
        "ttft_ms": distribution_ms([r.ttft for r in done if r.ttft is not None]),
        "tpot_ms": distribution_ms([r.tpot for r in done if r.tpot is not None]),
        "itl_ms": distribution_ms([g for r in done for g in r.itls]),
        "e2e_ms": distribution_ms([r.e2e for r in done if r.e2e is not None]),
        "errors": _error_counts(records),
    }
    if slo is not None:
        good = sum(1 for r in records if slo.met(r))
        result["slo"] = {"ttft_ms": slo.ttft_ms, "itl_ms": slo.itl_ms, "tpot_ms": slo.tpot_ms,
                         "e2e_ms": slo.e2e_ms, "itl_stat": slo.itl_stat,
                         "description": slo.describe()}
        result["good_requests"] = good
        result["goodput"] = per_s(good)
        result["slo_attainment"] = good / len(records) if records else math.nan
    return result


def _error_counts(records: Sequence[RequestRecord]) -> dict[str, int]:
    counts: dict[str, int] = {}
    for r in records:
        if not r.ok:
            key = (r.error or "unknown")[:80]
            counts[key] = counts.get(key, 0) + 1
    return counts


def format_table(results: dict[str, dict], title: str = "") -> str:
    """A markdown table: one column per result (e.g. ``{"pd": ..., "colocated": ...}``)."""
    names = list(results)
    rows: list[tuple[str, list[str]]] = []

    def row(label: str, fn) -> None:
        cells = []
        for n in names:
            try:
                v = fn(results[n])
            except (KeyError, TypeError):
                v = None
            cells.append(_fmt(v))
        rows.append((label, cells))

    row("completed / failed", lambda r: f"{r['completed']} / {r['failed']}")
    row("duration (s)", lambda r: r["duration_s"])
    row("request throughput (req/s)", lambda r: r["request_throughput"])
    row("output throughput (tok/s)", lambda r: r["output_throughput"])
    row("total token throughput (tok/s)", lambda r: r["total_token_throughput"])
    if any("goodput" in r for r in results.values()):
        row("goodput (req/s)", lambda r: r["goodput"])
        row("SLO attainment", lambda r: f"{100 * r['slo_attainment']:.1f}%")
    if any(r.get("prefix_cache_hit_ratio") is not None for r in results.values()):
        row("prefix cache hit ratio", lambda r: r["prefix_cache_hit_ratio"])
    for metric in ("ttft", "tpot", "itl", "e2e"):
        for stat in ("mean", "p50", "p90", "p99"):
            row(f"{metric.upper()} {stat} (ms)", lambda r, m=metric, s=stat: r[f"{m}_ms"][s])
    width = max(len(label) for label, _ in rows)
    cols = [max(len(n), *(len(c[i]) for _, c in rows)) for i, n in enumerate(names)]
    lines = [title] if title else []
    lines.append("| " + "metric".ljust(width) + " | "
                 + " | ".join(n.rjust(w) for n, w in zip(names, cols)) + " |")
    lines.append("| " + "-" * width + " | " + " | ".join("-" * (w - 1) + ":" for w in cols)
                 + " |")
    for label, cells in rows:
        lines.append("| " + label.ljust(width) + " | "
                     + " | ".join(c.rjust(w) for c, w in zip(cells, cols)) + " |")
    return "\n".join(lines)


def _fmt(v) -> str:
    if v is None:
        return "-"
    if isinstance(v, str):
        return v
    if isinstance(v, float):
        if math.isnan(v):
            return "-"
        return f"{v:.3f}" if abs(v) < 10 else f"{v:.1f}"
    return str(v)
