"""``fdpd bench transfer``: KV transfer between two processes vs. raw ZMQ, measured side by side.

The fdpd path is the one a prefill and a decode instance run: the sender sends the blocks of a
request (random, non-contiguous block ids) straight from its block-major KV cache with
``send_kv_blocks`` (one zero-copy frame per block, messages of up to ``--frame-mib``) through its
``Transport`` (IO thread, DEALER->ROUTER); the receiver's IO thread hands them to its loop, which
copies each frame into its own cache at other random block ids with ``receive_kv_blocks`` and
acknowledges the end. The baseline moves the same number of bytes, in messages of the same sizes
(one frame each), from a preallocated buffer over a raw PUSH/PULL pair whose receiver only
receives. Trials alternate between the two so that
machine noise hits both alike. With ``--cluster-secret-file`` both transports authenticate every
message (``fdpd.pd.auth``: a MAC over each KV frame on send, checked on receipt), as a cluster
with a secret does; without it they do not (the default, as before).
"""

from __future__ import annotations

import json
import multiprocessing as mp
import random
import time
from dataclasses import dataclass

import click

from fdpd.model.config import ModelConfig


def bench_model_config(hidden: int, layers: int, kv_heads: int) -> ModelConfig:
    heads = max(kv_heads, hidden // 64)
    return ModelConfig("LlamaForCausalLM", 32000, hidden, hidden * 3, layers, heads, kv_heads,
                       hidden // heads, 10000.0, 1e-6, 8192, False, False, "float32")


def cache_shape(cfg: ModelConfig, num_blocks: int, block_size: int) -> tuple[int, ...]:
    """Block-major, as the engine's (fdpd.engine.runner)."""
    return (num_blocks, cfg.num_hidden_layers, 2, block_size, cfg.num_key_value_heads,
            cfg.head_dim)


@dataclass(frozen=True)
class Setup:
    hidden: int
    layers: int
    kv_heads: int
    block_size: int
    num_blocks: int
    frame_bytes: int


def _receiver(setup: Setup, conn, secret: bytes | None) -> None:
    import torch
    import zmq

    from fdpd.pd.kv_transfer import receive_kv_blocks
    from fdpd.pd.protocol import KVBlocks, PrefillDone, TransferResult
    from fdpd.pd.transport import Transport

    torch.set_num_threads(1)
    cfg = bench_model_config(setup.hidden, setup.layers, setup.kv_heads)
    cache = torch.zeros(cache_shape(cfg, setup.num_blocks, setup.block_size))
    transport = Transport("bench-decode", 1, secret=secret)
    ctx = zmq.Context()
    pull = ctx.socket(zmq.PULL)
    pull.setsockopt(zmq.RCVHWM, 0)
    raw_port = pull.bind_to_random_port("tcp://127.0.0.1")
    conn.send((transport.address, f"tcp://127.0.0.1:{raw_port}"))
    rng = random.Random(1)
    while True:
        cmd = conn.recv()
        if cmd[0] == "stop":
            break
        if cmd[0] == "fdpd":
            _, n, reply_to = cmd
            targets = rng.sample(range(setup.num_blocks), n)
            while True:
                inbound = transport.recv(30)
                msg = inbound.msg
                if isinstance(msg, KVBlocks):
                    ids = targets[msg.first_block:msg.first_block + msg.num_blocks]
                    receive_kv_blocks(cache, msg, inbound.frames, ids)
                elif isinstance(msg, PrefillDone):
                    transport.send(reply_to, TransferResult(msg.grant_id, msg.req_id, True))
                    break
            conn.send(("targets", targets))
        elif cmd[0] == "verify":
            _, targets = cmd
            idx = torch.tensor(targets)
            conn.send(cache.index_select(0, idx).sum().item())
        elif cmd[0] == "raw":
            _, nframes = cmd
            for _ in range(nframes):
                pull.recv(copy=False)
            conn.send("raw-done")
    transport.close()
    pull.close(0)
    ctx.term()


def run(setup: Setup, sizes: list[int], repeats: int,
        secret: bytes | None = None) -> list[dict]:
    import torch
    import zmq

    from fdpd.pd.kv_transfer import StagingPool, send_kv_blocks
    from fdpd.pd.protocol import PrefillDone
    from fdpd.pd.transport import Transport

    torch.set_num_threads(1)
    cfg = bench_model_config(setup.hidden, setup.layers, setup.kv_heads)
    torch.manual_seed(0)
    cache = torch.randn(cache_shape(cfg, setup.num_blocks, setup.block_size))
    block_bytes = cache[0].numel() * cache.element_size()
    ctx = mp.get_context("spawn")
    parent, child = ctx.Pipe()
    proc = ctx.Process(target=_receiver, args=(setup, child, secret), daemon=True)
    proc.start()
    decode_addr, raw_addr = parent.recv()
    transport = Transport("bench-prefill", 1, secret=secret)
    zctx = zmq.Context()
    push = zctx.socket(zmq.PUSH)
    push.setsockopt(zmq.SNDHWM, 0)
    push.connect(raw_addr)
    raw_buf = torch.randn(setup.frame_bytes // 4).numpy()
    rng = random.Random(0)
    pool = StagingPool()
    results = []
    try:
        # A whole untimed pass over every size first: the first transfers of each new peak size
        # run at about half speed while both processes' allocators and ZMQ's buffers grow (a
        # first pass 256, 512, 1024 tokens measured 1024 at 0.34 of raw ZMQ; the same sizes
        # again in the same processes, 0.77).
        for timed, tokens in [(False, t) for t in sizes] + [(True, t) for t in sizes]:
            n = -(-tokens // setup.block_size)
            nbytes = n * block_bytes
            per_frame = max(1, setup.frame_bytes // block_bytes)
            nframes = -(-n // per_frame)
            frame_sizes = [min(per_frame, n - i * per_frame) * block_bytes
                           for i in range(nframes)]
            t_fdpd, t_raw = [], []
            for rep in range(repeats + 1):              # the first round warms up
                ids = rng.sample(range(setup.num_blocks), n)
                parent.send(("fdpd", n, transport.address))
                t0 = time.perf_counter()
                send_kv_blocks(lambda m, f: transport.send(decode_addr, m, f), cache, "g",
                               "r", ids, 0, pool, setup.frame_bytes)   # cache never written
                transport.send(decode_addr, PrefillDone("g", "r", 0, None, n, 0))
                ack = transport.recv(60)
                t1 = time.perf_counter()
                if ack is None:
                    raise RuntimeError("receiver did not acknowledge")
                _, targets = parent.recv()
                if rep == 0:
                    parent.send(("verify", targets))
                    got = parent.recv()
                    want = cache.index_select(0, torch.tensor(ids)).sum().item()
                    if abs(got - want) > 1e-3 * max(1.0, abs(want)):
                        raise RuntimeError(f"KV arrived corrupted: {got} != {want}")
                parent.send(("raw", nframes))
                t2 = time.perf_counter()
                for size in frame_sizes:
                    push.send(memoryview(raw_buf)[: size // 4].cast("B"), copy=False)
                parent.recv()
                t3 = time.perf_counter()
                if rep:
                    t_fdpd.append(t1 - t0)
                    t_raw.append(t3 - t2)
            if not timed:
                continue
            fd = nbytes * len(t_fdpd) / sum(t_fdpd) / 1e9
            rw = nbytes * len(t_raw) / sum(t_raw) / 1e9
            results.append({"tokens": tokens, "blocks": n, "bytes": nbytes, "frames": nframes,
                            "fdpd_gbps": round(fd, 3), "raw_zmq_gbps": round(rw, 3),
                            "ratio": round(fd / rw, 3)})
    finally:
        parent.send(("stop",))
        proc.join(10)
        transport.close()
        push.close(0)
        zctx.term()
    return results


@click.command()
@click.option("--hidden", default=512, show_default=True)
@click.option("--layers", default=8, show_default=True)
@click.option("--kv-heads", default=8, show_default=True)
@click.option("--block-size", default=16, show_default=True)
@click.option("--num-blocks", default=1024, show_default=True,
              help="Blocks in each side's cache (random ids are drawn from these).")
@click.option("--sizes", default="256,1024,4096", show_default=True,
              help="Request sizes in tokens.")
@click.option("--repeats", default=5, show_default=True)
@click.option("--frame-mib", default=8, show_default=True, help="Largest KV frame.")
@click.option("--cluster-secret-file", default=None, type=click.Path(dir_okay=False),
              help="Authenticate the fdpd path's messages with the cluster secret in this "
              "file, as a cluster with a secret does (default: no authentication).")
@click.option("--json", "as_json", is_flag=True)
def command(hidden, layers, kv_heads, block_size, num_blocks, sizes, repeats, frame_mib,
            cluster_secret_file, as_json):
    """KV transfer prefill->decode process (fdpd path) vs. raw ZMQ PUSH/PULL, same bytes."""
    from fdpd.config import ConfigError, PDConfig

    try:
        secret = PDConfig(cluster_secret_file=cluster_secret_file).cluster_key
    except ConfigError as e:
        raise click.BadParameter(str(e), param_hint="--cluster-secret-file") from None
    setup = Setup(hidden, layers, kv_heads, block_size, num_blocks, frame_mib * 2**20)
    results = run(setup, [int(s) for s in sizes.split(",")], repeats, secret)
    if as_json:
        click.echo(json.dumps({"setup": setup.__dict__, "authenticated": secret is not None,
                               "results": results}, indent=2))
        return
    cfg = bench_model_config(hidden, layers, kv_heads)
    click.echo(f"KV per token: {cfg.num_hidden_layers * 2 * cfg.kv_size * 4 / 1024:.0f} KiB "
               f"(hidden {hidden}, {layers} layers, {kv_heads} KV heads x {cfg.head_dim}, "
               f"float32); block size {block_size}; {repeats} timed runs each; messages "
               f"{'authenticated (HMAC-SHA256)' if secret else 'not authenticated'}")
    click.echo(f"{'tokens':>7} {'MiB':>8} {'frames':>6} {'fdpd GB/s':>10} {'raw GB/s':>9} "
               f"{'ratio':>6}")
    for r in results:
        click.echo(f"{r['tokens']:>7} {r['bytes'] / 2**20:>8.1f} {r['frames']:>6} "
                   f"{r['fdpd_gbps']:>10.2f} {r['raw_zmq_gbps']:>9.2f} {r['ratio']:>6.2f}")
