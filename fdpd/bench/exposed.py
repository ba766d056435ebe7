"""``fdpd bench exposed-transfer``: how much of a long prompt's KV transfer the client waits for.

A PD cluster (1 P + 1 D) serves long prompts one at a time; for each request the router's
timeline (``/v1/requests/recent``) splits the time into phases. The *exposed* transfer is what
comes after the prefill's last chunk: ``grant_wait`` (the decode's grant not yet there) plus
``kv_transfer`` (the last chunk's end -> the KV complete on the decode). With
``--stream-kv-chunks`` (the default) the blocks of each finished chunk travel while the next
chunk computes, so only the last chunk's blocks are exposed; the same run repeats without it,
side by side, on the same machine.
"""

from __future__ import annotations

import random
import statistics

import click


def measure(model: str, prompt_len: int, requests: int, stream: bool, engine_args: list[str],
            vocab: int) -> list[dict]:
    """One cluster: a warm-up request, then ``requests`` sequential ones; their phases."""
    from fdpd.testing import Cluster, complete

    args = [*engine_args, "--stream-kv-chunks" if stream else "--no-stream-kv-chunks"]
    with Cluster(1, 1, model=model, common_args=args, startup_timeout=180,
                 heartbeat_interval=2.0) as cluster:
        client = cluster.client(timeout=300)
        rng = random.Random(0)
        for _ in range(requests + 1):              # the first one warms up
            prompt = [rng.randrange(10, vocab) for _ in range(prompt_len)]
            res = complete(client, "/v1/completions", {
                "prompt": prompt, "max_tokens": 4, "temperature": 0, "ignore_eos": True,
                "return_token_ids": True, "stream": True})
            if not res.ok:
                raise click.ClickException(f"request failed: {res.error}")
        recent = client.get("/v1/requests/recent", params={"limit": requests}).json()["data"]
    rows = []
    for t in recent:
        ph = t["phases"]
        exposed = ph.get("grant_wait", 0.0) + ph.get("kv_transfer", 0.0)
        rows.append({"prefill_s": ph["prefill"], "grant_wait_ms": 1e3 * ph.get("grant_wait", 0),
                     "kv_transfer_ms": 1e3 * ph.get("kv_transfer", 0),
                     "exposed_over_prefill": exposed / ph["prefill"],
                     "ttft_s": t.get("ttft_seconds")})
    return rows


@click.command("exposed-transfer")
@click.option("--model", default="tiny", show_default=True,
              help="Model directory both clusters load (e.g. from `fdpd model synth`).")
@click.option("--prompt-len", default=2048, show_default=True)
@click.option("--requests", default=4, show_default=True, help="Timed requests per cluster.")
@click.option("--vocab-size", default=256, show_default=True,
              help="Token ids are drawn from [10, vocab-size).")
@click.option("--engine-args", default="--num-kv-blocks 2048 --max-num-batched-tokens 512",
              show_default=True, help="Engine flags of both instances.")
def command(model, prompt_len, requests, vocab_size, engine_args):
    """Exposed KV transfer of long prompts, with and without chunk streaming, side by side."""
    import shlex

    args = shlex.split(engine_args)
    click.echo(f"{prompt_len}-token prompts, {requests} sequential requests after a warm-up, "
               f"1 P + 1 D, engine args: {engine_args}")
    click.echo("| KV of finished chunks | prefill (s) | grant_wait (ms) | kv_transfer (ms) "
               "| exposed / prefill | client TTFT (s) |")
    click.echo("| --- | ---: | ---: | ---: | ---: | ---: |")
    for stream in (True, False):
        rows = measure(model, prompt_len, requests, stream, args, vocab_size)
        label = "streamed (--stream-kv-chunks)" if stream else "sent at the end"
        for r in rows:
            click.echo(f"| {label} | {r['prefill_s']:.3f} | {r['grant_wait_ms']:.1f} | "
                       f"{r['kv_transfer_ms']:.1f} | {100 * r['exposed_over_prefill']:.2f}% | "
                       f"{r['ttft_s'] if r['ttft_s'] is None else round(r['ttft_s'], 3)} |")
        click.echo(f"| {label}: median | | | | "
                   f"{100 * statistics.median(r['exposed_over_prefill'] for r in rows):.2f}% | |")
