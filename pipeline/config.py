"""Stage configs: one dataclass per stage, read from YAML, overridden from the command line.

Every stage config is a plain dataclass whose fields carry a one-line ``help`` text. The
loader is ours rather than ``HfArgumentParser`` because we want three things it does not
give: the YAML file and the command line merged with the command line winning, an unknown
key reported with the file it came from and the nearest valid key, and values coerced from
YAML's loose typing (``5e-5`` is a string to PyYAML) with an error naming the key.
"""

from __future__ import annotations

import argparse
import dataclasses
import difflib
import sys
import types
import typing
from pathlib import Path
from typing import Any

import yaml


class ConfigError(ValueError):
    """A user's config is wrong; the message names the file and key and what was expected."""


def field(default: Any = dataclasses.MISSING, help: str = "", **kwargs: Any) -> Any:
    """A dataclass field with a one-line help text (shown by ``--help``)."""
    if isinstance(default, (list, dict)):
        value = default
        kwargs["default_factory"] = lambda: type(value)(value)
        return dataclasses.field(metadata={"help": help}, **kwargs)
    return dataclasses.field(default=default, metadata={"help": help}, **kwargs)


def _strip_optional(tp: Any) -> tuple[Any, bool]:
    origin = typing.get_origin(tp)
    if origin in (typing.Union, types.UnionType):
        args = [a for a in typing.get_args(tp) if a is not type(None)]
        if len(args) == 1 and len(typing.get_args(tp)) == 2:
            return args[0], True
    return tp, False


_TRUE = {"true", "yes", "1", "on"}
_FALSE = {"false", "no", "0", "off"}


def coerce(value: Any, tp: Any, where: str) -> Any:
    """Convert ``value`` to the field type ``tp`` or raise a ConfigError naming ``where``."""
    base, optional = _strip_optional(tp)
    if value is None or (optional and isinstance(value, str) and value.lower() in {"none", "null", "~"}):
        if optional:
            return None
        raise ConfigError(f"{where}: expected a value of type {_type_name(base)}, got null")
    origin = typing.get_origin(base)
    try:
        if base is bool:
            if isinstance(value, bool):
                return value
            if isinstance(value, str) and value.lower() in _TRUE | _FALSE:
                return value.lower() in _TRUE
            raise ValueError
        if base is int:
            if isinstance(value, bool):
                raise ValueError
            if isinstance(value, float) and not value.is_integer():
                raise ValueError
            return int(value)
        if base is float:
            if isinstance(value, bool):
                raise ValueError
            return float(value)
        if base is str:
            if isinstance(value, (dict, list)):
                raise ValueError
            return str(value)
        if origin is list:
            (item_tp,) = typing.get_args(base) or (str,)
            if isinstance(value, str) and value.strip().startswith("["):
                # command-line form for lists of mappings: a YAML flow list (JSON is one too),
                # as the list would be written in a config file
                value = yaml.safe_load(value)
            elif isinstance(value, str):
                value = [v for v in value.split(",") if v.strip()] if value.strip() else []
            if not isinstance(value, list):
                raise ValueError
            return [coerce(v, item_tp, f"{where}[{i}]") for i, v in enumerate(value)]
        if origin is dict:
            if isinstance(value, str):
                # command-line form: key=value,key2=value2 (or a YAML flow mapping / JSON object)
                value = value.strip()
                if value.startswith("{"):
                    value = yaml.safe_load(value)
                else:
                    pairs = [p for p in value.split(",") if p.strip()]
                    if any("=" not in p for p in pairs):
                        raise ValueError
                    value = dict(p.split("=", 1) for p in pairs)
            if not isinstance(value, dict):
                raise ValueError
            _, value_tp = typing.get_args(base) or (str, str)
            if value_tp is str:
                return {str(k).strip(): str(v).strip() for k, v in value.items()}
            return {str(k).strip(): coerce(v, value_tp, f"{where}.{k}") for k, v in value.items()}
    except (ValueError, TypeError, yaml.YAMLError):
        raise ConfigError(f"{where}: expected {_type_name(base)}, got {value!r}") from None
    return value


def _type_name(tp: Any) -> str:
    origin = typing.get_origin(tp)
    if origin is list:
        return "a list"
    if origin is dict:
        return "a mapping (key: value)"
    return {bool: "true or false", int: "an integer", float: "a number", str: "a string"}.get(tp, str(tp))


def _fields(cls: type) -> dict[str, dataclasses.Field]:
    hints = typing.get_type_hints(cls)
    out = {}
    for f in dataclasses.fields(cls):
        f.type = hints[f.name]
        out[f.name] = f
    return out


def _unknown_key_message(key: str, known: list[str], where: str) -> str:
    close = difflib.get_close_matches(key, known, n=1)
    hint = f" (did you mean '{close[0]}'?)" if close else ""
    return f"{where}: unknown key '{key}'{hint}; valid keys: {', '.join(sorted(known))}"


def load_yaml(path: str | Path) -> dict[str, Any]:
    path = Path(path)
    if not path.is_file():
        raise ConfigError(f"{path}: config file not found")
    try:
        data = yaml.safe_load(path.read_text(encoding="utf-8"))
    except yaml.YAMLError as e:
        mark = getattr(e, "problem_mark", None)
        line = f":{mark.line + 1}" if mark is not None else ""
        raise ConfigError(f"{path}{line}: not valid YAML ({getattr(e, 'problem', e)})") from None
    if data is None:
        return {}
    if not isinstance(data, dict):
        raise ConfigError(f"{path}: expected a mapping of key: value at the top level")
    return data


def from_dict(cls: type, data: dict[str, Any], source: str = "<dict>", overrides: dict[str, Any] | None = None) -> Any:
    """Build ``cls`` from a mapping (plus command-line ``overrides``), rejecting unknown keys
    and coercing types; every error names the file or flag it came from."""
    fields = _fields(cls)
    data = _renamed(cls, data, source)
    overrides = _renamed(cls, overrides or {}, "command line")
    kwargs = {}
    for key, value in data.items():
        if key not in fields:
            raise ConfigError(_unknown_key_message(str(key), list(fields), source))
        kwargs[key] = coerce(value, fields[key].type, f"{source}: key '{key}'")
    for key, value in overrides.items():
        if key not in fields:
            raise ConfigError(_unknown_key_message(str(key), list(fields), "command line"))
        kwargs[key] = coerce(value, fields[key].type, f"command line: --{key}")
    try:
        cfg = cls(**kwargs)
    except TypeError as e:  # a required field is missing
        raise ConfigError(f"{source}: {e}") from None
    validate = getattr(cfg, "validate", None)
    if validate is not None:
        try:
            validate()
        except ConfigError as e:
            raise ConfigError(f"{source}: {e}") from None
    return cfg


def _renamed(cls: type, data: dict[str, Any], source: str, quiet: bool = False) -> dict[str, Any]:
    """``data`` with the keys ``cls.RENAMED`` lists under their new names (a note on stderr for each)."""
    renamed = getattr(cls, "RENAMED", {})
    out = {}
    for key, value in data.items():
        new = renamed.get(key)
        if new is None:
            out[key] = value
            continue
        if new in data:
            raise ConfigError(f"{source}: keys '{key}' and '{new}' are the same setting ('{key}' is its old name); "
                              f"keep '{new}'")
        if not quiet:
            print(f"note: {source}: key '{key}' is now called '{new}'; read as '{new}'", file=sys.stderr)
        out[new] = value
    return out


def to_dict(cfg: Any) -> dict[str, Any]:
    return dataclasses.asdict(cfg)


def with_defaults(cls: type, saved: dict[str, Any]) -> dict[str, Any]:
    """A config an earlier run saved, with each key added to ``cls`` since then at its default
    (what that run used), so comparing it with a new config names real differences only."""
    return {**to_dict(cls()), **_renamed(cls, saved, "saved config", quiet=True)}


def save(cfg: Any, path: str | Path) -> None:
    """Write the resolved config as YAML (what ``--config`` reads back)."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(yaml.safe_dump(to_dict(cfg), sort_keys=False), encoding="utf-8")


def build_parser(cls: type, prog: str, description: str) -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog=prog,
        description=description,
        formatter_class=argparse.RawDescriptionHelpFormatter,
        epilog="Every field can be set in the YAML file given by --config and overridden here; "
        "lists take comma-separated values, mappings take key=value,key2=value2."
        + (f"\n\n{cls.help_epilog()}" if hasattr(cls, "help_epilog") else ""),
    )
    parser.add_argument("--config", help="YAML file with this stage's settings")
    group = parser.add_argument_group("settings (override the YAML file)")
    for name, f in _fields(cls).items():
        default = f.default if f.default is not dataclasses.MISSING else (
            f.default_factory() if f.default_factory is not dataclasses.MISSING else None
        )
        group.add_argument(
            f"--{name}",
            dest=name,
            default=argparse.SUPPRESS,
            metavar=_metavar(f.type),
            help=f"{f.metadata.get('help', '')} (default: {default!r})",
        )
    for old, new in getattr(cls, "RENAMED", {}).items():
        if new in _fields(cls):
            group.add_argument(f"--{old}", dest=old, default=argparse.SUPPRESS, help=argparse.SUPPRESS)
    return parser


def _metavar(tp: Any) -> str:
    base, _ = _strip_optional(tp)
    return {bool: "BOOL", int: "INT", float: "FLOAT", str: "STR"}.get(base, "VALUE")


def parse(cls: type, argv: list[str] | None, prog: str, description: str) -> Any:
    """``--config FILE`` plus ``--field value`` overrides -> a validated ``cls`` instance.

    Errors in the user's input exit with status 1 and one line on stderr.
    """
    parser = build_parser(cls, prog, description)
    args = vars(parser.parse_args(argv))
    config_path = args.pop("config", None)
    try:
        data = load_yaml(config_path) if config_path else {}
        source = str(config_path) if config_path else "command line"
        return from_dict(cls, data, source, overrides=args)
    except ConfigError as e:
        fail(str(e))


def fields_help(cls: type, indent: str = "  ") -> str:
    """One line per field of dataclass ``cls``: its name, help and default (for nested settings in --help)."""
    lines = []
    for name, f in _fields(cls).items():
        default = f.default if f.default is not dataclasses.MISSING else f.default_factory()
        lines.append(f"{indent}{name}: {f.metadata.get('help', '')} (default: {default!r})")
    return "\n".join(lines)


def fail(message: str, code: int = 1) -> typing.NoReturn:
    """Stop with one clear line on stderr (for user mistakes; never for our own bugs)."""
    print(f"error: {message}", file=sys.stderr)
    raise SystemExit(code)
