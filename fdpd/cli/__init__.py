"""The ``fdpd`` command line."""

from __future__ import annotations

import json
import logging
import sys

import click

from fdpd.cli.options import config_options, pick
from fdpd.config import ConfigError, EngineConfig, InstanceConfig, PDConfig


@click.group(context_settings={"help_option_names": ["-h", "--help"],
                               "show_default": True})
@click.version_option(package_name="fdpd")
@click.option("--log-level", default="info", envvar="FDPD_LOG_LEVEL", show_envvar=True,
              type=click.Choice(["debug", "info", "warning", "error"]))
def main(log_level: str) -> None:
    """fdpd: LLM serving with prefill/decode disaggregation."""
    logging.basicConfig(level=log_level.upper(),
                        format="%(asctime)s %(levelname)s %(name)s: %(message)s")


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


def _configs(values: dict) -> tuple[EngineConfig, PDConfig, InstanceConfig]:
    try:
        return (EngineConfig(**pick(EngineConfig, values)), PDConfig(**pick(PDConfig, values)),
                InstanceConfig(**pick(InstanceConfig, values)))
    except ConfigError as e:
        raise click.BadParameter(str(e), param_hint="--" + e.field.replace("_", "-")) from None


@main.command()
@config_options(InstanceConfig)
@config_options(EngineConfig)
@config_options(PDConfig)
@click.option("--control-port", type=int, default=None, envvar="FDPD_CONTROL_PORT",
              show_envvar=True, help="Router only: ZMQ control port instances register at "
              "(default: --port + 1).")
@click.option("--api-key", default=None, envvar="FDPD_API_KEY", show_envvar=True,
              help="Router only: require 'Authorization: Bearer KEY' on /v1/*.")
@click.option("--torch-threads", default=1, envvar="FDPD_TORCH_THREADS", show_envvar=True,
              help="Torch intra-op threads of an engine process.")
def launch(control_port, api_key, torch_threads, **values):
    """Run one process of a cluster: --role router | prefill | decode | mixed."""
    from fdpd import launch as launcher

    engine, pd, inst = _configs(values)
    if inst.role == "router":
        port = inst.port or 8000
        try:
            launcher.run_router(engine.model, pd, inst.host, port, control_port, api_key,
                                engine.max_model_len)
        except ValueError as e:
            raise click.ClickException(str(e)) from None
        return
    if not inst.router:
        raise click.BadParameter("engine instances need the router's control address",
                                 param_hint="--router")
    launcher.run_instance(engine, pd, inst, torch_threads)


@main.command()
@click.option("--num-prefill", default=1, show_default=True, help="Prefill instances.")
@click.option("--num-decode", default=1, show_default=True, help="Decode instances.")
@click.option("--num-mixed", default=0, show_default=True,
              help="Colocated instances (use with 0 prefill/decode for the baseline).")
@click.option("--port", default=8000, show_default=True, help="HTTP port of the router "
              "(its control port is PORT+1).")
@click.option("--host", default="127.0.0.1", show_default=True)
@click.option("--model", default="tiny", show_default=True)
@click.option("--log-dir", default=None, help="Write each process's log to this directory.")
@click.argument("extra", nargs=-1, type=click.UNPROCESSED)
def up(num_prefill, num_decode, num_mixed, port, host, model, log_dir, extra):
    """Start a local cluster (router + prefill + decode [+ mixed]) and serve until Ctrl-C.

    EXTRA arguments after `--` go to every process, e.g. `fdpd up -- --num-kv-blocks 512`."""
    from fdpd import launch as launcher

    if num_mixed == 0 and (num_prefill < 1 or num_decode < 1):
        raise click.BadParameter("need at least one prefill and one decode, or --num-mixed")
    code = launcher.run_cluster(num_prefill=num_prefill, num_decode=num_decode,
                                num_mixed=num_mixed, port=port, host=host,
                                common=["--model", model, *extra], log_dir=log_dir)
    sys.exit(code)


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


class _LazyBenchGroup(click.Group):
    """Bench commands import heavy modules (transformers, plotting) only when run."""

    _COMMANDS = {"engine": "fdpd.bench.engine", "transfer": "fdpd.bench.transfer",
                 "restore": "fdpd.bench.restore"}

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
