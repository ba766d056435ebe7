"""The ``fdpd`` command line."""

from __future__ import annotations

import json
import sys

import click
from click.core import ParameterSource

from fdpd.cli.options import (
    command_option_names,
    config_file_option,
    config_options,
    pick,
    value_origin,
)
from fdpd.config import ConfigError, EngineConfig, InstanceConfig, PDConfig
from fdpd.logs import FORMATS, LEVELS, configure_logging


@click.group(context_settings={"help_option_names": ["-h", "--help"],
                               "show_default": True})
@click.version_option(package_name="fdpd")
@click.option("--log-level", default="info", envvar="FDPD_LOG_LEVEL", show_envvar=True,
              type=click.Choice(LEVELS))
@click.option("--log-format", default="text", envvar="FDPD_LOG_FORMAT", show_envvar=True,
              type=click.Choice(FORMATS), help="text: for a terminal; json: one object per "
              "line, with request_id on lines about one request.")
@click.pass_context
def main(ctx: click.Context, log_level: str, log_format: str) -> None:
    """fdpd: LLM serving with prefill/decode disaggregation."""
    ctx.obj = {"log_level": log_level, "log_format": log_format}
    configure_logging(log_level, log_format, "fdpd")


def log_options(fn):
    """Per-command ``--log-level``/``--log-format`` (so a config file can set them); unset,
    the top-level ``fdpd --log-level/--log-format`` values apply."""
    fn = click.option("--log-format", type=click.Choice(FORMATS), default=None,
                      envvar="FDPD_LOG_FORMAT", show_envvar=True,
                      help="text or json (default: the top-level --log-format, text).")(fn)
    return click.option("--log-level", type=click.Choice(LEVELS), default=None,
                        envvar="FDPD_LOG_LEVEL", show_envvar=True,
                        help="debug, info, warning or error (default: the top-level "
                        "--log-level, info).")(fn)


def _logging(level: str | None, fmt: str | None, tag: str):
    top = click.get_current_context().find_root().obj or {}
    level, fmt = level or top.get("log_level", "info"), fmt or top.get("log_format", "text")
    return configure_logging(level, fmt, tag), level, fmt


@main.command()
@config_options(EngineConfig)
@click.option("--prompt", "prompts", multiple=True, help="A prompt (repeatable).")
@click.option("--max-tokens", default=32, help="Tokens to generate per prompt.")
@click.option("--temperature", default=0.0, help="0 = greedy.")
@click.option("--json", "as_json", is_flag=True, help="Print results as JSON lines.")
def generate(prompts, max_tokens, temperature, as_json, **engine_args):
    """Run the offline engine (role mixed, no server) on a few prompts and print the outputs."""
    from fdpd.llm import LLM
    from fdpd.sampling_params import SamplingParams

    prompts = list(prompts) or ["Hello, my name is", "The capital of France is",
                                "In a paged KV cache, every block"]
    try:
        llm = LLM(**pick(EngineConfig, engine_args))
        params = SamplingParams(max_tokens=max_tokens, temperature=temperature)
        results = llm.generate(prompts, params)
    except (ConfigError, ValueError) as e:
        raise click.ClickException(str(e)) from None
    for r in results:
        out = r.outputs[0]
        if as_json:
            click.echo(json.dumps({"prompt": r.prompt, "text": out.text,
                                   "token_ids": out.token_ids,
                                   "finish_reason": out.finish_reason}))
        else:
            click.echo(f"{r.prompt!r} -> {out.text!r} ({len(out.token_ids)} tokens, "
                       f"{out.finish_reason})")


def _served_names(value: str | None) -> tuple[str, ...]:
    if value is None:
        return ()
    names = tuple(n.strip() for n in value.split(","))
    if any(not n for n in names):
        raise click.BadParameter(f"an empty name in {value!r}; give NAME[,NAME...]",
                                 param_hint="--served-model-name")
    return tuple(dict.fromkeys(names))


def _configs(values: dict) -> tuple[EngineConfig, PDConfig, InstanceConfig]:
    try:
        return (EngineConfig(**pick(EngineConfig, values)), PDConfig(**pick(PDConfig, values)),
                InstanceConfig(**pick(InstanceConfig, values)))
    except ConfigError as e:
        origin = value_origin(click.get_current_context(), e.field)
        raise click.BadParameter(f"{e} (from {origin})",
                                 param_hint="--" + e.field.replace("_", "-")) from None


@main.command()
@config_file_option(also_known=lambda: command_option_names(up))
@config_options(InstanceConfig)
@config_options(EngineConfig)
@config_options(PDConfig)
@click.option("--control-port", type=int, default=None, envvar="FDPD_CONTROL_PORT",
              show_envvar=True, help="Router only: ZMQ control port instances register at "
              "(default: --port + 1).")
@click.option("--api-key", default=None, envvar="FDPD_API_KEY", show_envvar=True,
              help="Router only: require 'Authorization: Bearer KEY' on /v1/*.")
@click.option("--served-model-name", default=None, envvar="FDPD_SERVED_MODEL_NAME",
              show_envvar=True, metavar="NAME[,NAME...]",
              help="Router only: the name(s) clients use for the model, comma-separated; "
              "responses name the one asked for, the first by default. Default: the --model "
              "value.")
@click.option("--torch-threads", default=1, envvar="FDPD_TORCH_THREADS", show_envvar=True,
              help="Torch intra-op threads of an engine process.")
@log_options
def launch(control_port, api_key, served_model_name, torch_threads, log_level, log_format,
           config_file, **values):
    """Run one process of a cluster: --role router | prefill | decode | mixed.

    Every option also reads its FDPD_* environment variable and a key of the --config YAML
    file (precedence: flag > environment > file > default). Keys of `fdpd up` in the file
    (num-prefill, ...) are allowed and ignored here, so one file serves both commands."""
    from fdpd import launch as launcher

    engine, pd, inst = _configs(values)
    tagger, _, _ = _logging(log_level, log_format, inst.instance_id or inst.role)
    if inst.role == "router":
        port = inst.port or 8000
        try:
            # No --model (nor FDPD_MODEL, nor a config key): the cluster's first instance
            # decides (fdpd.router.cluster_model).
            given = click.get_current_context().get_parameter_source("model") \
                is not ParameterSource.DEFAULT
            launcher.run_router(engine.model if given else None, pd, inst.host, port,
                                control_port, api_key, engine.max_model_len,
                                advertise_host=inst.advertise_host,
                                served_model_names=_served_names(served_model_name))
        except ValueError as e:
            raise click.ClickException(str(e)) from None
        return
    if not inst.router:
        raise click.BadParameter("engine instances need the router's control address",
                                 param_hint="--router")
    launcher.run_instance(engine, pd, inst, torch_threads, log_tag=tagger)


@main.command()
@config_file_option(also_known=lambda: command_option_names(launch))
@click.option("--num-prefill", default=1, show_default=True, envvar="FDPD_NUM_PREFILL",
              show_envvar=True, help="Prefill instances.")
@click.option("--num-decode", default=1, show_default=True, envvar="FDPD_NUM_DECODE",
              show_envvar=True, help="Decode instances.")
@click.option("--num-mixed", default=0, show_default=True, envvar="FDPD_NUM_MIXED",
              show_envvar=True,
              help="Colocated instances (use with 0 prefill/decode for the baseline).")
@click.option("--port", default=8000, show_default=True, envvar="FDPD_PORT", show_envvar=True,
              help="HTTP port of the router (its control port is PORT+1).")
@click.option("--host", default="127.0.0.1", show_default=True, envvar="FDPD_HOST",
              show_envvar=True, help="Address every process binds.")
@click.option("--model", default="tiny", show_default=True, envvar="FDPD_MODEL",
              show_envvar=True, help="'tiny' or a local Hugging Face directory.")
@click.option("--log-dir", default=None, envvar="FDPD_LOG_DIR", show_envvar=True,
              help="Write each process's log to this directory.")
@click.option("--cluster-secret-file", default=None, envvar="FDPD_CLUSTER_SECRET_FILE",
              show_envvar=True, help="File holding the cluster secret every process "
              "authenticates its messages with (or set FDPD_CLUSTER_SECRET; both are passed "
              "on to every process).")
@click.option("--max-restarts", default=5, show_default=True, envvar="FDPD_MAX_RESTARTS",
              show_envvar=True, type=click.IntRange(min=0),
              help="Restarts of one process within --restart-window seconds before it is "
              "left stopped (a process that exits is restarted after 1, 2, 4 ... s, at most "
              "30 s). 0 = never restart: any exit then only leaves that process stopped; a "
              "router that cannot be restarted stops the cluster.")
@click.option("--restart-window", default=60.0, show_default=True,
              envvar="FDPD_RESTART_WINDOW", show_envvar=True,
              type=click.FloatRange(min=0, min_open=True),
              help="Seconds over which --max-restarts counts.")
@log_options
@click.argument("extra", nargs=-1, type=click.UNPROCESSED)
def up(num_prefill, num_decode, num_mixed, port, host, model, log_dir, cluster_secret_file,
       max_restarts, restart_window, log_level, log_format, config_file, extra):
    """Start a local cluster (router + prefill + decode [+ mixed]) and serve until Ctrl-C.

    A process that exits is restarted (same name, new epoch) while the rest keep serving;
    the router resumes the streams it held on the others.

    Instances are named prefill-0, decode-0, ...; every log line starts with that name.
    EXTRA arguments after `--` go to every process, e.g. `fdpd up -- --num-kv-blocks 512`.
    With --config FILE, keys of this command (num-prefill, port, ...) configure the cluster
    and every other key goes to every process (`fdpd launch --config FILE`)."""
    import os

    from fdpd import launch as launcher

    if num_mixed == 0 and (num_prefill < 1 or num_decode < 1):
        raise click.BadParameter("need at least one prefill and one decode, or --num-mixed")
    try:        # a bad secret fails here once, not in every child
        PDConfig(cluster_secret=os.environ.get("FDPD_CLUSTER_SECRET") or None,
                 cluster_secret_file=cluster_secret_file)
    except ConfigError as e:
        raise click.BadParameter(str(e), param_hint="--" + e.field.replace("_", "-")) from None
    _, level, fmt = _logging(log_level, log_format, "up")
    common = ["--model", model, "--log-level", level, "--log-format", fmt]
    if config_file:
        common = ["--config", os.path.abspath(config_file), *common]
    if cluster_secret_file:     # the environment (FDPD_CLUSTER_SECRET) is inherited
        common += ["--cluster-secret-file", os.path.abspath(cluster_secret_file)]
    code = launcher.run_cluster(num_prefill=num_prefill, num_decode=num_decode,
                                num_mixed=num_mixed, port=port, host=host,
                                common=[*common, *extra], log_dir=log_dir,
                                max_restarts=max_restarts, restart_window=restart_window)
    sys.exit(code)


@main.command()
@click.option("--url", default=None, help="A health URL: the router's /health, or an "
              "instance's http://HOST:METRICS_PORT/health.")
@click.option("--router", "router_url", default=None, help="The router's HTTP address "
              "(http://HOST:PORT or HOST:PORT, not its control port), with --instance.")
@click.option("--instance", default=None, help="With --router: the instance id to check in "
              "the router's /v1/cluster.")
@click.option("--api-key", default=None, envvar="FDPD_API_KEY", show_envvar=True,
              help="Bearer key for /v1/cluster when the router requires one.")
@click.option("--timeout", default=5.0, help="Seconds to wait for an answer.")
def health(url, router_url, instance, api_key, timeout):
    """Exit 0 if healthy, 1 if not (a probe for container health checks).

    `--url U`: U answers 200. `--router R --instance ID`: the router lists ID as healthy (it
    registered and its heartbeats arrive)."""
    from fdpd.cli.probe import check_instance, check_url

    if (url is None) == (router_url is None) or (router_url is None) != (instance is None):
        raise click.UsageError("give --url, or --router with --instance")
    ok, why = (check_url(url, timeout) if url else
               check_instance(router_url, instance, api_key, timeout))
    click.echo(("healthy: " if ok else "unhealthy: ") + why)
    sys.exit(0 if ok else 1)


@main.group()
def model() -> None:
    """Model utilities."""


@model.command("export")
@click.argument("name", type=click.Choice(["tiny"]))
@click.argument("directory", type=click.Path(file_okay=False))
def export(name: str, directory: str) -> None:
    """Write a built-in model to DIRECTORY in Hugging Face layout."""
    from fdpd.model.tiny import export_tiny

    export_tiny(directory)
    click.echo(f"wrote {name} to {directory}")


@model.command("synth")
@click.option("--out", "directory", required=True, type=click.Path(file_okay=False),
              help="Directory to write (created; existing files are overwritten).")
@click.option("--arch", type=click.Choice(["llama", "qwen2", "mistral"]), default="llama")
@click.option("--hidden", default=512, help="Hidden size.")
@click.option("--layers", default=8, help="Decoder layers.")
@click.option("--heads", default=8, help="Attention heads.")
@click.option("--kv-heads", default=2, help="KV heads (GQA).")
@click.option("--vocab", default=32000, help="Vocabulary (the trained tokenizer has exactly "
              "this many ids; at most 32000).")
@click.option("--max-positions", default=8192, help="max_position_embeddings.")
@click.option("--dtype", type=click.Choice(["float32", "bfloat16", "float16"]),
              default="float32", help="Stored weight dtype.")
@click.option("--seed", default=0, help="Weights and tokenizer corpus seed.")
def synth(directory, arch, hidden, layers, heads, kv_heads, vocab, max_positions, dtype, seed):
    """Write a synthetic checkpoint + trained BPE tokenizer that fdpd and vLLM both load.

    The directory `fdpd bench compare --model DIR` runs every system on, e.g.
    `fdpd model synth --out models/llama-h512 --hidden 512 --layers 8`."""
    from fdpd.model.synthetic import synthetic_config, write_model_dir

    try:
        cfg = synthetic_config(arch, hidden=hidden, layers=layers, vocab=vocab, heads=heads,
                               kv_heads=kv_heads, max_positions=max_positions, dtype=dtype)
        out = write_model_dir(directory, cfg, seed=seed)
    except ValueError as e:
        raise click.ClickException(str(e)) from None
    click.echo(f"wrote {cfg.name} (hidden {hidden}, {layers} layers, vocab {vocab}, {dtype}) "
               f"to {out}")


class _LazyBenchGroup(click.Group):
    """Bench commands import heavy modules (transformers, plotting) only when run."""

    _COMMANDS = {"engine": "fdpd.bench.engine", "transfer": "fdpd.bench.transfer",
                 "restore": "fdpd.bench.restore", "serve": "fdpd.bench.serve",
                 "compare": "fdpd.bench.compare", "slo-table": "fdpd.bench.slo_table",
                 "overload": "fdpd.bench.overload", "exposed-transfer": "fdpd.bench.exposed",
                 "kernels": "fdpd.bench.kernels"}

    def list_commands(self, ctx):
        return sorted(self._COMMANDS)

    def get_command(self, ctx, name):
        import importlib

        module = self._COMMANDS.get(name)
        return importlib.import_module(module).command if module else None


@main.group(cls=_LazyBenchGroup)
def bench() -> None:
    """Benchmarks (each prints ratios measured side by side in one run)."""


if __name__ == "__main__":
    sys.exit(main())
