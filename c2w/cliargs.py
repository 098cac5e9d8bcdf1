"""Typed dataclass configs double as the command line: one flag per field, help from metadata."""

from __future__ import annotations

import argparse
import dataclasses
import typing


def add_dataclass_args(parser: argparse.ArgumentParser, cls, skip: tuple[str, ...] = ()) -> None:
    hints = typing.get_type_hints(cls)
    for f in dataclasses.fields(cls):
        if f.name in skip:
            continue
        flag = "--" + f.name.replace("_", "-")
        tp = hints[f.name]
        default = f.default if f.default is not dataclasses.MISSING else (
            f.default_factory() if f.default_factory is not dataclasses.MISSING else None)
        help_ = f.metadata.get("help", "") + (f" (default: {default})" if default not in (None, [], "") else "")
        kw: dict = {"dest": f.name, "default": None, "help": help_}
        args = typing.get_args(tp)
        base = next((a for a in args if a is not type(None)), tp) if args and type(None) in args else tp
        if typing.get_origin(base) is list:
            kw.update(nargs="+", type=typing.get_args(base)[0])
        elif base is bool:
            kw.update(action=argparse.BooleanOptionalAction)
        else:
            kw["type"] = base
        if "choices" in f.metadata:
            kw["choices"] = f.metadata["choices"]
        parser.add_argument(flag, **kw)


def overrides(ns: argparse.Namespace, cls) -> dict:
    """Only the flags the user actually gave (None means: keep the config's or preset's value)."""
    names = {f.name for f in dataclasses.fields(cls)}
    return {k: v for k, v in vars(ns).items() if k in names and v is not None}
