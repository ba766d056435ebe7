"""Click options generated from the config dataclasses: one schema for flags, ``FDPD_*``
environment variables and YAML files, so a field that exists is a flag that exists, with its
help and default.

Precedence, highest first: a flag on the command line, its ``FDPD_*`` environment variable, the
``--config`` YAML file, the default. (Click consults exactly that order when the file's values
are installed as the context's ``default_map``.)
"""

from __future__ import annotations

import dataclasses
from collections.abc import Callable, Iterable
from typing import Any

import click
from click.core import ParameterSource

_TYPES: dict[str, Any] = {"int": int, "int | None": int, "str": str, "str | None": str,
                          "float": float, "float | None": float}
CONFIG_META = "fdpd.config_file"


def config_options(schema: type, skip: tuple[str, ...] = ()) -> Callable:
    """Decorate a click command with one ``--flag`` per field of the dataclass ``schema``."""

    def decorate(fn: Callable) -> Callable:
        for f in reversed(dataclasses.fields(schema)):
            if f.name in skip:
                continue
            flag = "--" + f.name.replace("_", "-")
            envvar = "FDPD_" + f.name.upper()
            help_text = f.metadata.get("help", "")
            if f.metadata.get("secret"):
                # From the environment only, and its value is never shown as a default.
                opt = click.option(flag, type=_TYPES[f.type], default=None, envvar=envvar,
                                   show_default=False, show_envvar=True, help=help_text,
                                   callback=_environment_only)
            elif f.type == "bool":
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


def _environment_only(ctx: click.Context, param: click.Parameter, value: Any) -> Any:
    """A secret's option: refused on the command line (any user sees it in ``ps``) and in a
    ``--config`` file (it belongs in a file of its own, or the environment)."""
    source = ctx.get_parameter_source(param.name)
    if source in (ParameterSource.COMMANDLINE, ParameterSource.DEFAULT_MAP):
        where = "on the command line" if source is ParameterSource.COMMANDLINE else \
            "in a --config file"
        files = [p.opts[0] for p in ctx.command.params if p.name == f"{param.name}_file"]
        raise click.BadParameter(f"a secret is not accepted {where}: set the environment "
                                 f"variable {param.envvar}" + "".join(
                                     f" or name a file holding it with {f}" for f in files))
    return value


def pick(schema: type, values: dict[str, Any]) -> dict[str, Any]:
    names = {f.name for f in dataclasses.fields(schema)}
    return {k: v for k, v in values.items() if k in names}


# ---------------------------------------------------------------------- YAML config files
def config_file_option(also_known: Callable[[], Iterable[str]] = tuple) -> Callable:
    """``--config FILE`` (``FDPD_CONFIG``): option values from a YAML mapping whose keys are
    the command's option names (``num-kv-blocks`` or ``num_kv_blocks``). A key of no option of
    the command is an error, unless ``also_known()`` names it (a key meant for another command
    reading the same file: ``fdpd up`` and the ``fdpd launch`` processes it starts)."""

    def callback(ctx: click.Context, param: click.Parameter, path: str | None) -> str | None:
        if path is None:
            return None
        own = {p.name: p for p in ctx.command.params
               if p.name and p.name != param.name and isinstance(p, click.Option)
               and not p.is_eager}
        values = read_config_file(path, set(own) | set(also_known()))
        for key, value in values.items():
            if key in own and value is not None:
                try:
                    own[key].type_cast_value(ctx, value)
                except click.BadParameter as e:
                    raise click.BadParameter(f"{path}: key {key!r}: {e.message}",
                                             ctx=ctx, param=param) from None
        ctx.default_map = {**(ctx.default_map or {}),
                           **{k: v for k, v in values.items() if k in own}}
        ctx.meta[CONFIG_META] = path
        return path

    return click.option(
        "--config", "config_file", type=click.Path(exists=True, dir_okay=False),
        envvar="FDPD_CONFIG", show_envvar=True, is_eager=True, callback=callback,
        help="YAML file of option values, keyed by option name (dashes or underscores). "
             "Precedence: flag > FDPD_* environment variable > this file > default.")


def read_config_file(path: str, known: set[str]) -> dict[str, Any]:
    """The file's mapping with keys normalized to option names; raises ``click.BadParameter``
    naming the file and the key for anything that is not a known key with a single value."""
    import yaml

    def bad(message: str) -> click.BadParameter:
        return click.BadParameter(f"{path}: {message}", param_hint="--config")

    try:
        with open(path, encoding="utf-8") as f:
            raw = yaml.safe_load(f)
    except yaml.YAMLError as e:
        raise bad(f"not valid YAML: {e}") from None
    except OSError as e:
        raise bad(f"cannot read: {e.strerror}") from None
    if raw is None:
        return {}
    if not isinstance(raw, dict):
        raise bad(f"expected a mapping of option names to values, got a "
                  f"{type(raw).__name__}")
    values: dict[str, Any] = {}
    for key, value in raw.items():
        name = str(key).replace("-", "_")
        if name not in known:
            raise bad(f"unknown key {key!r}; known keys: "
                      f"{', '.join(sorted(k.replace('_', '-') for k in known))}")
        if name in values:
            raise bad(f"key {key!r} is given twice (dashes and underscores are the same key)")
        if isinstance(value, (dict, list)):
            raise bad(f"key {key!r}: expected a single value, got a {type(value).__name__}")
        values[name] = value
    return values


def value_origin(ctx: click.Context, name: str) -> str:
    """Where option ``name``'s value came from, for error messages."""
    source = ctx.get_parameter_source(name)
    flag = "--" + name.replace("_", "-")
    if source is ParameterSource.COMMANDLINE:
        return flag
    if source is ParameterSource.ENVIRONMENT:
        return "FDPD_" + name.upper()
    if source is ParameterSource.DEFAULT_MAP:
        return f"key {name!r} of {ctx.meta.get(CONFIG_META, 'the config file')}"
    return f"{flag} (default)"


def command_option_names(command: click.Command) -> set[str]:
    return {p.name for p in command.params
            if p.name and isinstance(p, click.Option) and not p.is_eager}
