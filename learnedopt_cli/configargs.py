"""Command-line flags generated from config dataclasses, so that every default and help line has one source: the
field (``dataclasses.field(metadata={"help": ..., "choices": ..., "flag": ..., "metavar": ...})``)."""

from __future__ import annotations

import argparse
import dataclasses
import typing
from typing import Any, TypeVar

__all__ = ["add_config_arguments", "config_from_args", "horizons", "positive"]

C = TypeVar("C")


def positive(value: str) -> int:
    number = int(value)
    if number < 1:
        raise argparse.ArgumentTypeError(f"expected an integer >= 1, got {value}")
    return number


def horizons(value: str) -> tuple[int, ...]:
    """A comma-separated list of positive step counts, e.g. ``200,500``."""
    return tuple(positive(v) for v in value.split(",") if v.strip())


def flag_defaults(cls: type, nested: dict[str, dict[str, Any]] | None = None) -> dict[str, Any]:
    """``dest -> default`` of every flag :func:`add_config_arguments` makes for ``cls`` (a nested config's flags
    default to its field defaults, overridden by ``nested[field]``)."""
    defaults: dict[str, Any] = {}
    hints = typing.get_type_hints(cls)
    for f in dataclasses.fields(cls):
        if "help" not in f.metadata:
            continue
        kind = hints[f.name]
        if dataclasses.is_dataclass(kind):
            overrides = (nested or {}).get(f.name, {})
            defaults.update({k: overrides.get(k, v) for k, v in flag_defaults(typing.cast(type, kind)).items()})
        elif f.default is not dataclasses.MISSING:
            defaults[f.name] = f.default
        else:
            defaults[f.name] = f.default_factory()  # type: ignore[misc,operator]
    return defaults


def add_config_arguments(parser: argparse.ArgumentParser, cls: type, *, skip: tuple[str, ...] = (),
                         nested: dict[str, dict[str, Any]] | None = None) -> None:
    """One flag per field of ``cls`` that has a ``help`` (and of each nested config field's), named after the
    field (``--meta-lr`` for ``meta_lr``) unless the field's ``flag`` says otherwise."""
    hints = typing.get_type_hints(cls)
    defaults = flag_defaults(cls, nested)
    for f in dataclasses.fields(cls):
        if "help" not in f.metadata or f.name in skip:
            continue
        kind = hints[f.name]
        if dataclasses.is_dataclass(kind):
            sub = typing.cast(type, kind)
            for g in dataclasses.fields(sub):
                if "help" in g.metadata:
                    _add(parser, g, typing.get_type_hints(sub)[g.name], defaults[g.name])
            continue
        _add(parser, f, kind, defaults[f.name])


def _add(parser: argparse.ArgumentParser, f: dataclasses.Field, kind: Any, default: Any) -> None:
    meta = f.metadata
    name = "--" + (meta.get("flag") or f.name.replace("_", "-"))
    options: dict[str, Any] = {"dest": f.name, "default": default, "help": meta["help"]}
    if meta.get("metavar"):
        options["metavar"] = meta["metavar"]
    if kind is bool:
        parser.add_argument(name, action="store_true", **options)
        return
    if meta.get("choices"):
        options["choices"] = list(meta["choices"])
    if kind == tuple[int, ...]:
        options["type"] = horizons
    elif kind in (int, float, str):
        options["type"] = kind
    elif typing.get_origin(kind) in (typing.Union, getattr(__import__("types"), "UnionType", None)):
        options["type"] = next(a for a in typing.get_args(kind) if a is not type(None))
    else:
        raise TypeError(f"no command-line type for the field {f.name}: {kind}")
    parser.add_argument(name, **options)


def config_from_args(cls: type[C], args: argparse.Namespace, **given: Any) -> C:
    """Build ``cls`` from the parsed flags (fields without a flag keep their defaults, unless in ``given``)."""
    hints = typing.get_type_hints(cls)
    values: dict[str, Any] = {}
    for f in dataclasses.fields(cls):  # type: ignore[arg-type]
        kind = hints[f.name]
        if f.name in given:
            values[f.name] = given[f.name]
        elif dataclasses.is_dataclass(kind) and "help" in f.metadata:
            sub = typing.cast(type, kind)
            values[f.name] = sub(**{g.name: getattr(args, g.name) for g in dataclasses.fields(sub)
                                    if hasattr(args, g.name)})
        elif "help" in f.metadata and hasattr(args, f.name):
            values[f.name] = getattr(args, f.name)
    return cls(**values)
