"""``fdpd bench compare`` (one rate, a sweep), ``bench slo-table`` and ``bench exposed-transfer``
with real clusters: the cost model or the tiny model, small loads."""

from __future__ import annotations

import json

import pytest
from click.testing import CliRunner


def test_bench_compare_and_slo_table(tmp_path):
    """Both clusters (1 P + 1 D, 2 mixed) on the cost model, the same load, one JSON with the
    ratios; slo-table recomputes attainment from the saved per-request timings."""
    from fdpd.cli import main

    out = tmp_path / "compare.json"
    args = ["bench", "compare", "--hidden", "16", "--layers", "1", "--heads", "2",
            "--kv-heads", "1", "--vocab", "1000", "--engine-args",
            "--cost-model 20,2 --num-kv-blocks 256", "--dataset", "interference",
            "--num-prompts", "12", "--random-input-len", "16", "--random-output-len", "8",
            "--long-prompt-len", "200", "--long-output-len", "2", "--long-fraction", "0.25",
            "--vocab-size", "1000", "--request-rate", "40", "--warmup", "0",
            "--slo", "ttft:5000,itl:5000", "--json", str(out), "--save-requests",
            "--no-progress"]
    result = CliRunner().invoke(main, args)
    assert result.exit_code == 0, result.output + repr(result.exception)
    r = json.loads(out.read_text())
    for system in ("pd", "colocated"):
        assert r[system]["completed"] == 12 and r[system]["failed"] == 0
        assert r[system]["cluster"]["quiescent_after_run"]
        assert len(r[system]["requests"]) == 12
        assert r[system]["short_requests"]["completed"] == 9
        assert r[system]["cpu_ms_per_request"]["router"] > 0
    assert r["pd"]["cluster"]["prefill"] == 1 and r["colocated"]["cluster"]["mixed"] == 2
    assert set(r["ratios"]) >= {"p99_itl_pd_over_colocated", "goodput_pd_over_colocated"}
    assert r["ratios"]["goodput_pd_over_colocated"] == pytest.approx(
        r["pd"]["goodput"] / r["colocated"]["goodput"])
    table = CliRunner().invoke(main, ["bench", "slo-table", str(out), "--slo",
                                      "ttft:5000,itl:5000", "--slo", "ttft:0.001"])
    assert table.exit_code == 0, table.output + repr(table.exception)
    assert "| 40 | 100.0% (" in table.output
    assert "PD: highest tested rate with >= 90% attainment: 40" in table.output
    assert "| 40 | 0.0% (0.000) | 0.0% (0.000) | inf |" in table.output


def test_bench_compare_sweeps_rates_on_one_started_system(tmp_path):
    """``--sweep``: the PD cluster starts once and serves each rate in turn (the same
    processes: same epochs in both reports); one JSON per rate, then the SLO table."""
    from fdpd.cli import main

    out = tmp_path / "sweep.json"
    args = ["bench", "compare", "--systems", "pd", "--hidden", "16", "--layers", "1",
            "--heads", "2", "--kv-heads", "1", "--vocab", "1000", "--engine-args",
            "--cost-model 20,2 --num-kv-blocks 256", "--dataset", "random",
            "--num-prompts", "6", "--random-input-len", "48", "--random-output-len", "4",
            "--vocab-size", "1000", "--sweep", "40,20", "--warmup", "0",
            "--slo", "ttft:5000,itl:5000", "--json", str(out), "--no-progress"]
    result = CliRunner().invoke(main, args)
    assert result.exit_code == 0, result.output + repr(result.exception)
    reports = {rate: json.loads((tmp_path / f"sweep_rate{rate}.json").read_text())
               for rate in (20, 40)}
    for rate, r in reports.items():
        assert r["pd"]["completed"] == 6 and len(r["pd"]["requests"]) == 6
        assert f"rate {rate} req/s" in r["pd"]["config"]["arrival"]
        # Other prompts at each rate: nothing comes from the previous rate's prefix cache.
        assert r["pd"]["prefix_cache_hit_ratio"] == 0, r["pd"]["prefix_cache_hit_ratio"]
    epochs = [sorted(i["epoch"] for i in r["pd"]["cluster"]["instances"])
              for r in reports.values()]
    assert epochs[0] == epochs[1]
    assert result.output.index("## 20 req/s") < result.output.index("## 40 req/s")
    assert "| 20 | 100.0% (" in result.output and "| 40 | 100.0% (" in result.output


def test_bench_exposed_transfer_reports_both_ways(tmp_path):
    """Two 1P+1D clusters on the tiny model, 48-token prompts in 16-token chunks: each request's
    phases come back from the router, with and without chunk streaming."""
    from fdpd.cli import main

    result = CliRunner().invoke(main, [
        "bench", "exposed-transfer", "--prompt-len", "48", "--requests", "2",
        "--engine-args", "--num-kv-blocks 64 --max-num-batched-tokens 16"])
    assert result.exit_code == 0, result.output + repr(result.exception)
    rows = [line for line in result.output.splitlines() if line.startswith("| streamed")
            or line.startswith("| sent at the end")]
    assert len(rows) == 6, result.output                   # 2 requests + a median, each way
    for row in rows:
        if "median" not in row:
            prefill_s, grant_ms, transfer_ms = (float(c) for c in row.split("|")[2:5])
            assert prefill_s > 0 and grant_ms >= 0 and transfer_ms > 0, row
