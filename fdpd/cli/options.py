"""Click options generated from the config dataclasses: one schema for flags and ``FDPD_*``
environment variables, so a field that exists is a flag that exists, with its help and default."""

from __future__ import annotations

import dataclasses
from collections.abc import Callable
from typing import Any

import click

_TYPES: dict[str, Any] = {"int": int, "int | None": int, "str": str, "str | None": str,
                          "float": float, "float | None": float}


def config_options(schema: type, skip: tuple[str, ...] = ()) -> Callable:
    """Decorate a click command with one ``--flag`` per field of the dataclass ``schema``."""

    def decorate(fn: Callable) -> Callable:
        for f in reversed(dataclasses.fields(schema)):
            if f.name in skip:
                continue
            flag = "--" + f.name.replace("_", "-")
            envvar = "FDPD_" + f.name.upper()
            help_text = f.metadata.get("help", "")
            if f.type == "bool":
                opt = click.option(f"{flag}/--no-{flag[2:]}", default=f.default,
                                   envvar=envvar, show_default=True, show_envvar=True,
                                   help=help_text)
            else:
                opt = click.option(flag, type=_TYPES[f.type], default=f.default,
                                   envvar=envvar, show_default=True, show_envvar=True,
                                   help=help_text)
            fn = opt(fn)
        return fn

    return decorate


def pick(schema: type, values: dict[str, Any]) -> dict[str, Any]:
    names = {f.name for f in dataclasses.fields(schema)}
    return {k: v for k, v in values.items() if k in names}
