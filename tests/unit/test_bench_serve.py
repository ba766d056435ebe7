"""``fdpd bench serve`` pieces: datasets (Mooncake expansion, scaling), arrival processes,
metrics on synthetic timings, one end-to-end run against the router app with a fake core on
loopback, and the cost-model runner (in-process and through a real 1 P + 1 D cluster)."""

from __future__ import annotations

import json
import math
import statistics
import sys
from pathlib import Path

import pytest
from click.testing import CliRunner

from fdpd.bench import datasets
from fdpd.bench.metrics import SLO, RequestRecord, percentile, summarize
from fdpd.config import ConfigError, EngineConfig
from fdpd.testing.asgi import serve_app

sys.path.insert(0, str(Path(__file__).resolve().parents[2]))   # see test_model.py
from tests.unit.router_fakes import ScriptedCore

TINY_VOCAB = 384


# ------------------------------------------------------------------------------ datasets
@pytest.fixture
def trace(tmp_path) -> Path:
    rows = [  # request 1 shares block 0 with request 0; request 2 shares blocks 0 and 1
        {"timestamp": 0, "input_length": 1100, "output_length": 10, "hash_ids": [0, 1, 2]},
        {"timestamp": 500, "input_length": 700, "output_length": 20, "hash_ids": [0, 3]},
        {"timestamp": 1500, "input_length": 1500, "output_length": 30, "hash_ids": [0, 1, 4]},
    ]
    path = tmp_path / "trace.jsonl"
    path.write_text("\n".join(json.dumps(r) for r in rows) + "\n")
    return path


def test_mooncake_expansion_is_deterministic_and_prefix_consistent(trace):
    a = datasets.mooncake_dataset(trace, None, 1.0, 1.0, vocab=1000)
    b = datasets.mooncake_dataset(trace, None, 1.0, 1.0, vocab=1000)
    p = [s.turns[0].prompt_ids for s in a.sessions]
    assert p == [s.turns[0].prompt_ids for s in b.sessions]
    assert [len(x) for x in p] == [1100, 700, 1500]
    assert p[1][:512] == p[0][:512] and p[1][512:600] != p[0][512:600]
    assert p[2][:1024] == p[0][:1024] and p[2][1024:1100] != p[0][1024:1100]
    assert all(10 <= t < 1000 for x in p for t in x)
    assert [s.arrival for s in a.sessions] == [0.0, 0.5, 1.5]
    assert [s.turns[0].output_len for s in a.sessions] == [10, 20, 30]


def test_mooncake_scaling_keeps_the_block_structure(trace):
    full = datasets.mooncake_dataset(trace, None, 1.0, 1.0, vocab=1000)
    w = datasets.mooncake_dataset(trace, 2, 1 / 16, 1 / 16, vocab=1000)
    assert w.notes["block_tokens"] == 32 and w.notes["length_scale"] == 1 / 16
    p = [s.turns[0].prompt_ids for s in w.sessions]
    assert [len(x) for x in p] == [math.ceil(1100 / 16), math.ceil(700 / 16)]
    assert p[0][:32] == p[1][:32] and p[0][32:44] != p[1][32:44]
    # Block 0's scaled tokens are the first 32 of its own 512-token expansion.
    assert p[0][:32] == full.sessions[0].turns[0].prompt_ids[:32]
    assert [s.turns[0].output_len for s in w.sessions] == [1, 2]
    # block_scale < length_scale: the missing blocks are unique to the request.
    w2 = datasets.mooncake_dataset(trace, None, 1.0, 0.5, vocab=1000, max_input_len=1200)
    q = [s.turns[0].prompt_ids for s in w2.sessions]
    assert q[1][:256] == q[0][:256] and q[1][512:700] != q[0][512:700]
    assert len(q[2]) == 1200 and w2.notes["truncated"] == 1


def test_ideal_prefix_hit_ratio(trace):
    rows = datasets.read_mooncake(trace)
    # Unbounded: request 1 hits block 0 (512 of 700), request 2 blocks 0-1 (1024 of 1500).
    assert datasets.ideal_prefix_hit_ratio(rows, None) == pytest.approx((512 + 1024) / 3300)
    # Capacity 2: request 0 leaves {1, 2}, so request 1 misses; it leaves {0, 3}, so
    # request 2 hits block 0 only.
    assert datasets.ideal_prefix_hit_ratio(rows, 2) == pytest.approx(512 / 3300)


@pytest.mark.skipif(not (datasets.DATA_DIR / "conversation_trace.jsonl").is_file(),
                    reason="shared trace data not present")
def test_ideal_matches_data_md_column():
    rows = datasets.read_mooncake(datasets.DATA_DIR / "conversation_trace.jsonl")
    assert round(datasets.ideal_prefix_hit_ratio(rows, 1000), 3) == 0.045


def test_other_datasets():
    w = datasets.shared_prefix_dataset(8, groups=2, prefix_len=20, input_len=5, output_len=3,
                                       vocab=TINY_VOCAB)
    p = [s.turns[0].prompt_ids for s in w.sessions]
    assert p[0][:20] == p[2][:20] != p[1][:20] and all(len(x) == 25 for x in p)
    w = datasets.multi_turn_dataset(7, turns=3, input_len=4, output_len=2)
    assert [len(s.turns) for s in w.sessions] == [3, 3, 1] and w.sessions[0].chained
    w = datasets.interference_dataset(20, 16, 200, 30, 2, long_fraction=0.25)
    lens = [len(s.turns[0].prompt_ids) for s in w.sessions]
    assert lens.count(200) == 5 == w.notes["long_requests"] and lens.count(16) == 15
    w = datasets.random_dataset(50, 100, 10, range_ratio=0.5, seed=1)
    assert all(50 <= len(s.turns[0].prompt_ids) <= 150 for s in w.sessions)


def test_azure_dataset(tmp_path):
    path = tmp_path / "azure.csv"
    path.write_text("TIMESTAMP,ContextTokens,GeneratedTokens\n"
                    "2023-11-16 18:15:46.6805900,374,44\n"
                    "2023-11-16 18:15:50.9951690,396,109\n")
    w = datasets.azure_dataset(path, None, length_scale=0.5)
    assert [len(s.turns[0].prompt_ids) for s in w.sessions] == [187, 198]
    assert [s.turns[0].output_len for s in w.sessions] == [22, 55]
    assert w.sessions[1].arrival == pytest.approx(4.314579)


# ------------------------------------------------------------------------------ arrivals
@pytest.mark.parametrize("burstiness", [1.0, 0.25, 4.0])
def test_gamma_arrivals_rate_and_burstiness(burstiness):
    t = datasets.poisson_offsets(20000, rate=50.0, burstiness=burstiness, seed=3)
    gaps = [b - a for a, b in zip(t, t[1:])]
    assert t[0] == 0 and statistics.fmean(gaps) == pytest.approx(1 / 50, rel=0.05)
    cv2 = statistics.pvariance(gaps) / statistics.fmean(gaps) ** 2
    assert cv2 == pytest.approx(1 / burstiness, rel=0.1)


def test_infinite_rate_and_trace_speedup():
    assert datasets.poisson_offsets(3, math.inf) == [0.0, 0.0, 0.0]
    sessions = [datasets.Session([], arrival=a) for a in (0.0, 2.0, 5.0)]
    assert datasets.trace_offsets(sessions, speedup=4) == [0.0, 0.5, 1.25]
    with pytest.raises(ValueError):
        datasets.trace_offsets([datasets.Session([])])


# ------------------------------------------------------------------------------ metrics
def _record(i, start, chunks, output_tokens=None, cached=None, prompt=100):
    return RequestRecord(i, start=start, ok=True, chunk_times=list(chunks), end=chunks[-1],
                         prompt_tokens=prompt, output_tokens=output_tokens or len(chunks),
                         cached_tokens=cached)


def test_percentile_matches_numpy():
    np = pytest.importorskip("numpy")
    values = [5.0, 1.0, 9.0, 3.0, 7.0, 2.0, 8.0]
    for q in (0, 10, 50, 90, 99, 100):
        assert percentile(values, q) == pytest.approx(np.percentile(values, q))


def test_record_timings_and_summary():
    a = _record(0, 0.0, [0.1, 0.15, 0.2, 0.6], cached=50)       # one 400 ms gap
    b = _record(1, 1.0, [1.05, 1.1, 1.15, 1.2], cached=0)
    failed = RequestRecord(2, start=1.5, error="HTTP 503: busy")
    assert a.ttft == pytest.approx(0.1) and a.e2e == pytest.approx(0.6)
    assert a.itls == pytest.approx([0.05, 0.05, 0.4])
    assert a.tpot == pytest.approx(0.5 / 3)
    r = summarize([a, b, failed], SLO.parse("ttft:200,itl:100"), duration=2.0)
    assert r["completed"] == 2 and r["failed"] == 1 and r["errors"] == {"HTTP 503: busy": 1}
    assert r["request_throughput"] == 1.0 and r["output_throughput"] == 4.0
    assert r["prefix_cache_hit_ratio"] == pytest.approx(50 / 200)
    assert r["ttft_ms"]["mean"] == pytest.approx(75) and r["ttft_ms"]["p50"] == pytest.approx(75)
    assert r["itl_ms"]["max"] == pytest.approx(400)
    # max ITL: a misses (a 400 ms gap); the median ITL of a is 50 ms: a meets it.
    assert r["good_requests"] == 1 and r["goodput"] == 0.5
    assert r["slo_attainment"] == pytest.approx(1 / 3)
    r = summarize([a, b, failed], SLO.parse("ttft:200,itl:100", itl_stat="p50"), duration=2.0)
    assert r["good_requests"] == 2
    r = summarize([a, b], SLO.parse("ttft:60"), duration=2.0)
    assert r["good_requests"] == 1                                 # a's TTFT is 100 ms


def test_slo_parse_errors():
    assert SLO.parse(None) is None
    for bad in ("ttft=5", "foo:5", "ttft:fast"):
        with pytest.raises(ValueError):
            SLO.parse(bad)


# ------------------------------------------------------------------------------ end to end
serve = serve_app


def _bench(args: list[str]) -> None:
    from fdpd.cli import main

    result = CliRunner().invoke(main, ["bench", "serve", "--no-progress", *args])
    assert result.exit_code == 0, result.output + repr(result.exception)
    return result.output


def test_bench_serve_end_to_end_against_the_router_app(tmp_path):
    from fdpd.router.app import create_app

    import importlib.util

    core = ScriptedCore(script=list(range(65, 91)), delay=0.002, num_cached_tokens=4)
    out = tmp_path / "result.json"
    # Plots need matplotlib (not a dependency of the package): checked when it is there.
    plots = importlib.util.find_spec("matplotlib") is not None
    with serve(create_app(core)) as url:
        text = _bench(["--base-url", url, "--dataset", "random", "--num-prompts", "12",
                       "--random-input-len", "20", "--random-output-len", "6",
                       "--vocab-size", str(TINY_VOCAB), "--request-rate", "200",
                       "--slo", "ttft:5000,itl:5000", "--warmup", "1", "--json", str(out),
                       "--save-requests",
                       *(["--plot-dir", str(tmp_path / "plots")] if plots else [])])
    assert "TTFT p99 (ms)" in text
    r = json.loads(out.read_text())
    assert r["completed"] == 12 and r["failed"] == 0 and r["not_sent"] == 0
    for key in ("ttft_ms", "tpot_ms", "itl_ms", "e2e_ms"):
        assert set(r[key]) >= {"mean", "p50", "p90", "p99"}
    assert r["output_tokens"] == 12 * 6 and r["prompt_tokens"] == 12 * 20
    assert r["prefix_cache_hit_ratio"] == pytest.approx(4 / 20)
    assert r["good_requests"] == 12 and r["goodput"] > 0 and r["request_throughput"] > 0
    assert len(r["requests"]) == 12 and all(len(q["itls"]) == 5 for q in r["requests"])
    assert r["config"]["arrival"].startswith("gamma arrivals, rate 200")
    if plots:
        assert (tmp_path / "plots" / "latency_cdf.png").stat().st_size > 1000
        assert (tmp_path / "plots" / "itl_over_time.png").is_file()
    calls = [c for c in core.calls if len(c.prompt_token_ids) == 20]
    assert len(calls) == 12 and all(c.params.ignore_eos for c in calls)


def test_multi_turn_sends_the_conversation_so_far(tmp_path):
    from fdpd.router.app import create_app

    core = ScriptedCore(script=list(range(65, 91)), max_model_len=512)
    with serve(create_app(core)) as url:
        _bench(["--base-url", url, "--dataset", "multi-turn", "--num-prompts", "3",
                "--num-turns", "3", "--random-input-len", "5", "--random-output-len", "4",
                "--vocab-size", str(TINY_VOCAB), "--warmup", "0"])
    p = [c.prompt_token_ids for c in core.calls]
    assert [len(x) for x in p] == [5, 5 + 4 + 5, 14 + 4 + 5]
    assert p[1][:9] == p[0] + [65, 66, 67, 68] and p[2][:18] == p[1] + [65, 66, 67, 68]


# ------------------------------------------------------------------------------ cost model
@pytest.fixture(scope="module")
def cost_model_dir(tmp_path_factory) -> str:
    from fdpd.bench.compare import synthetic_model

    return synthetic_model(tmp_path_factory.mktemp("cost") / "model", hidden=16, layers=2,
                           heads=2, kv_heads=1, vocab=1000, max_positions=4096,
                           config_only=True)


def test_cost_model_flag_is_validated():
    assert EngineConfig(cost_model="700, 17").cost_model == "700, 17"
    for bad in ("700", "a,b", "1,2,3,4", "-1,2", "inf,1"):
        with pytest.raises(ConfigError):
            EngineConfig(cost_model=bad)


def test_cost_model_engine(cost_model_dir):
    from fdpd.engine.cost_model import CostModelRunner, next_token
    from fdpd.engine.engine import Engine
    from fdpd.sampling_params import SamplingParams

    def run() -> tuple[Engine, dict[str, list[int]]]:
        engine = Engine(EngineConfig(model=cost_model_dir, cost_model="10,1,0.5",
                                     num_kv_blocks=64, max_num_batched_tokens=64))
        prefix = list(range(100, 148))
        outs: dict[str, list[int]] = {}
        for i in range(3):
            engine.add_request(f"r{i}", prefix + [200 + i] * (10 + i),
                               SamplingParams(max_tokens=5 + i, temperature=0.8))
            if i == 0:                     # r0's prefix is computed (cached) before r1, r2
                outs["r0"] = engine.step()[0].new_token_ids
        while engine.has_unfinished_requests():
            for o in engine.step():
                outs.setdefault(o.request_id, []).extend(o.new_token_ids)
        return engine, outs

    engine, outs = run()
    assert isinstance(engine.runner, CostModelRunner)
    assert engine.runner.kv_cache.shape == (64, 2, 2, 16, 1, 8)
    assert [len(outs[f"r{i}"]) for i in range(3)] == [5, 6, 7]
    # Every token is the runner's function of the previous token and its position.
    prompt = list(range(100, 148)) + [200] * 10
    seq = prompt + outs["r0"]
    assert outs["r0"] == [next_token(seq[p - 1], p - 1, 1000, (2,))
                          for p in range(len(prompt), len(seq))]
    assert run()[1] == outs                                # deterministic across engines
    # The prefix cache saw the shared 48-token prefix (3 blocks) for r1 and r2.
    assert engine.block_manager.stats().hit_tokens == 2 * 48
    # The cost slept: prompt tokens at 10 us each, decode steps at 1 ms + 0.5 ms per sequence.
    assert engine.runner.busy_seconds > (58 + 59 + 60 - 96) * 10e-6 + 6 * 1e-3
    # Every block is back: accounting returns to zero.
    assert engine.block_manager.num_free_blocks == engine.block_manager.num_blocks
    engine.check_integrity()


def test_cost_model_through_a_pd_cluster(cost_model_dir):
    """The real scheduler, ledger and KV transfers (1 P + 1 D processes), zero compute: the
    outputs are the cost model's tokens, and the harness checks on exit that every instance
    is idle and the decode's ledger is back to zero."""
    from fdpd.bench.serve import run_benchmark
    from fdpd.engine.cost_model import next_token
    from fdpd.testing import Cluster

    args = ["--cost-model", "5,1", "--num-kv-blocks", "256", "--max-num-batched-tokens", "128"]
    with Cluster(1, 1, model=cost_model_dir, common_args=args) as cluster:
        prompt = list(range(300, 340))
        r = cluster.client().post("/v1/completions", json={
            "prompt": prompt, "max_tokens": 6, "temperature": 0, "return_token_ids": True})
        assert r.status_code == 200, r.text
        ids = r.json()["choices"][0]["token_ids"]
        seq = prompt + ids
        assert ids == [next_token(seq[p - 1], p - 1, 1000, (2,))
                       for p in range(len(prompt), len(seq))]
        v = {"slo": "ttft:10000,itl:10000", "slo_itl_stat": "max", "arrival": "auto",
             "request_rate": 100.0, "burstiness": 1.0, "seed": 0, "speedup": 1.0,
             "max_concurrency": 8, "max_duration": 60.0, "request_timeout": 30.0,
             "ignore_eos": True, "temperature": 0.0, "warmup": 0, "vocab_size": 1000}
        workload = datasets.shared_prefix_dataset(24, groups=2, prefix_len=64, input_len=16,
                                                  output_len=8, vocab=1000)
        result, _ = run_benchmark(cluster.base_url, v, workload, model=None, progress=False)
        assert result["completed"] == 24 and result["failed"] == 0
        assert result["output_tokens"] == 24 * 8
        # The router keeps each prefix group on its prefill (there is one): 64-token prefixes
        # hit from the third request on.
        assert result["prefix_cache_hit_ratio"] > 0.5

        def granted() -> int:
            views = cluster.cluster()["instances"]
            return next(v for v in views if v["role"] == "decode")["ledger"]["grants_granted"]

        cluster.wait_for(lambda: granted() == 25, 5, what="25 grants in the decode's ledger")


def test_prefix_affinity_matches_the_deepest_block_an_instance_computed():
    """The routing fix the Mooncake replay found: a prefix block every prompt shares, last
    recorded for another instance, must not hide the deeper blocks of a conversation."""
    from fdpd.router.policy import PrefixAffinity

    aff = PrefixAffinity(block_size=2)
    conversation = aff.hashes([1, 2, 3, 4, 5, 6, 7])
    aff.record(conversation, "p1")
    aff.record(aff.hashes([1, 2, 9, 9]), "p2")             # shares the first block only
    assert aff.matched_tokens(conversation, "p1") == 6
    assert aff.matched_tokens(conversation, "p2") == 2
    assert aff.matched_tokens(aff.hashes([1, 2, 3, 4, 8, 8]), "p1") == 4
    assert aff.matched_tokens(aff.hashes([5, 5, 3, 4]), "p1") == 0
