"""The ``fdpd`` command line."""

from __future__ import annotations

import json
import logging
import sys

import click

from fdpd.cli.options import config_options, pick
from fdpd.config import ConfigError, EngineConfig


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


@main.group()
def bench() -> None:
    """Benchmarks (each prints ratios measured side by side in one run)."""


def _register_benches() -> None:
    from fdpd.bench import engine as bench_engine

    bench.add_command(bench_engine.command, "engine")


_register_benches()

if __name__ == "__main__":
    sys.exit(main())
