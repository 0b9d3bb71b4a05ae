"""Command lines built from config dataclasses: every setting is written once, as a field.

A :class:`ConfigParser` is an :class:`argparse.ArgumentParser` with one flag per field of a
frozen config dataclass. The flag is the field's name with ``-`` for ``_`` (``seq_len`` →
``--seq-len``); its type, default and metavar come from the field's type hint and default,
its help from the class docstring's ``Attributes:`` section (or ``field(metadata={"help":
...})``, or :data:`COMMON_HELP` for the settings several configs share):

==============================  ==================================================
field                           flag
==============================  ==================================================
``int``, ``float``, ``str``      one value of that type
``X | None``                     as ``X``; not given means ``None``
``tuple[X, ...]``                one or more values (``nargs="+"``), back as a tuple
``Literal["a", "b"]``            a string, shown as ``{a,b}``; ``validate()`` checks it
``bool`` (default ``False``)     ``--flag`` sets it
``bool`` (default ``True``)      ``--no-flag`` clears it
==============================  ==================================================

:meth:`ConfigParser.parse_config` builds the config and calls its ``validate()``. Library
messages name fields as Python does (``rank=0 is invalid``) and list them in
:attr:`InputError.fields <signal_drift._errors.InputError.fields>`; the parser names them
by their flags instead (``--rank=0 is invalid``). :meth:`ConfigParser.add_output` adds
``--out`` and ``--no-plot``; other flags that are not settings (``--json``) are added with
``add_argument`` as usual.

>>> from dataclasses import dataclass
>>> @dataclass(frozen=True)
... class Demo:
...     '''A demo.
...
...     Attributes:
...         seq_len: tokens per window.
...     '''
...     seq_len: int = 128
...     ranks: tuple[int, ...] = (4, 8)
...     def validate(self):
...         if self.seq_len < 1:
...             raise InputError(f"seq_len={self.seq_len} is invalid: need >= 1", fields=["seq_len"])
>>> ConfigParser(Demo, prog="demo").parse_config(["--ranks", "1", "2"])[0]
Demo(seq_len=128, ranks=(1, 2))
>>> ConfigParser(Demo, prog="demo").parse_config(["--seq-len", "0"])
Traceback (most recent call last):
signal_drift._errors.InputError: --seq-len=0 is invalid: need >= 1
"""

from __future__ import annotations

import argparse
import dataclasses
import inspect
import re
import types
import typing
from collections.abc import Mapping, Sequence
from typing import Any, Literal

from ._errors import InputError

__all__ = ["ConfigParser", "COMMON_HELP", "flag", "field_help", "with_flags"]

#: What the settings that several configs share mean, in one place; a config's own
#: ``Attributes:`` entry for a field wins.
COMMON_HELP = {
    "dim": "MLP width d.",
    "rank": "LoRA rank r.",
    "depth": "number of linear layers.",
    "samples": "training samples N.",
    "seed": "random seed.",
    "model": "local Hugging Face model directory (default: build a small Llama offline).",
    "data": ".txt or .jsonl corpus (default: offline standard-library docstrings).",
    "batch_size": "sequences per step.",
    "seq_len": "tokens per sequence.",
    "pretrain_steps": "pre-training of the default offline model.",
    "gamma": "γ of the LoRA scale γ·α/r.",
    "out": "output folder.",
    "workers": (
        "run the cells in this many processes, torch's threads divided among them (finished "
        "cells are kept on Ctrl-C; numbers equal a serial run's up to round-off)."
    ),
}


def flag(name: str) -> str:
    """The command-line flag of the field ``name``.

    >>> flag("seq_len")
    '--seq-len'
    """
    return "--" + name.replace("_", "-")


def field_help(cls: type) -> dict[str, str]:
    """Each field's description from the ``Attributes:`` section of ``cls``'s docstring.

    An entry ``a, b: text`` describes both ``a`` and ``b``; continuation lines are joined.

    >>> from signal_drift.train.sweep import TrainSweepConfig
    >>> field_help(TrainSweepConfig)["multipliers"]
    'the k of Eq. 2.'
    """
    doc = inspect.getdoc(cls) or ""
    out: dict[str, str] = {}
    lines = doc.splitlines()
    try:
        start = next(i for i, line in enumerate(lines) if line.strip() == "Attributes:")
    except StopIteration:
        return out
    indent, names = None, []
    for line in lines[start + 1 :]:
        if not line.strip():
            continue
        depth = len(line) - len(line.lstrip())
        if indent is None:
            indent = depth
        if depth < indent:
            break
        m = re.match(r"([\w, ]+):\s*(.*)$", line.strip()) if depth == indent else None
        if m:
            names = [n.strip() for n in m.group(1).split(",")]
            for n in names:
                out[n] = m.group(2)
        else:
            for n in names:
                out[n] += " " + line.strip()
    return out


def with_flags(err: InputError, names: Sequence[str]) -> InputError:
    """``err`` with those of its ``fields`` that are in ``names`` written as flags.

    >>> err = InputError("train_steps/pretrain_steps must be >= 0", fields=["train_steps", "pretrain_steps"])
    >>> str(with_flags(err, ["train_steps", "pretrain_steps", "lr"]))
    '--train-steps/--pretrain-steps must be >= 0'
    """
    msg = str(err)
    for name in err.fields:
        if name in names:
            msg = re.sub(rf"(?<![\w-]){re.escape(name)}(?!\w)", flag(name), msg)
    return InputError(msg, fields=err.fields)


class ConfigParser(argparse.ArgumentParser):
    """An argument parser with one flag per field of the frozen dataclass ``config``.

    Args:
        config: the config dataclass; its fields become flags (see the module docstring).
        prog, description, epilog: as for :class:`argparse.ArgumentParser`.
        help: help texts that override the docstring's, by field name.

    Raises:
        TypeError: a field whose type has no flag form.
    """

    def __init__(
        self,
        config: type,
        *,
        prog: str,
        description: str | None = None,
        epilog: str | None = None,
        help: Mapping[str, str] | None = None,
    ):
        super().__init__(prog=prog, description=description, epilog=epilog)
        self.config = config
        texts = COMMON_HELP | field_help(config) | dict(help or {})
        hints = typing.get_type_hints(config)
        self.names = [f.name for f in dataclasses.fields(config)]
        for f in dataclasses.fields(config):
            self._add_field(f, hints[f.name], f.metadata.get("help", texts.get(f.name, "")))

    def _plain(self, text: str) -> str:
        """Docstring markup as help text: ``field`` as its flag, roles as bare names, ``%`` escaped."""
        text = re.sub(r"``(\w+)``", lambda m: flag(m[1]) if m[1] in self.names else m[1], text)
        text = re.sub(r":\w+:`~?([\w.]+)`", lambda m: m[1].rsplit(".", 1)[-1], text)
        return text.replace("``", "").replace("%", "%%").rstrip(".")

    def _add_field(self, f: dataclasses.Field, hint: Any, text: str) -> None:
        default = f.default if f.default is not dataclasses.MISSING else f.default_factory()
        text = self._plain(text)
        if hint is bool:
            if default:
                self.add_argument("--no-" + f.name.replace("_", "-"), dest=f.name, action="store_false",
                                  help=text or None)  # fmt: skip
            else:
                self.add_argument(flag(f.name), action="store_true", help=text or None)
            return
        args = [a for a in typing.get_args(hint) if a is not type(None)]
        if _is_union(hint) and len(args) == 1:  # X | None
            hint = args[0]
        kw: dict[str, Any] = {"default": default}
        if typing.get_origin(hint) is tuple and typing.get_args(hint)[1:] == (Ellipsis,):
            kw["nargs"] = "+"
            hint = typing.get_args(hint)[0]
        if typing.get_origin(hint) is Literal:
            kw["metavar"] = "{" + ",".join(map(str, typing.get_args(hint))) + "}"
            hint = str
        if hint not in (int, float, str):
            raise TypeError(f"{self.config.__name__}.{f.name}: no flag for type {hint!r}")
        if default is not None:
            shown = " ".join(f"{v:g}" if isinstance(v, float) else str(v) for v in _values(default))
            text = f"{text} (default: {shown})".strip()
        self.add_argument(flag(f.name), type=hint, help=text or None, **kw)

    def add_output(self, default: str, figures: str | None = None) -> None:
        """``--out`` for a config without an ``out`` field and, with ``figures``, ``--no-plot``.

        Args:
            default: the output folder.
            figures: what ``--no-plot`` skips (e.g. ``"fig1.png"``); ``None``: no such flag.
        """
        self.add_argument("--out", default=default, help=f"output folder (default: {default})")
        if figures is not None:
            self.add_argument("--no-plot", action="store_true", help=f"skip {figures}")

    def parse_config(
        self, argv: Sequence[str] | None = None, **checks: Any
    ) -> tuple[Any, argparse.Namespace]:
        """Parse ``argv`` into a validated config and the namespace (for flags outside it).

        Args:
            argv: the arguments (default: ``sys.argv[1:]``).
            **checks: passed to the config's ``validate()``.

        Raises:
            InputError: from the config's ``validate()``, with the fields it names as flags.
        """
        ns = self.parse_args(argv)
        values = {n: tuple(v) if isinstance(v, list) else v for n, v in vars(ns).items() if n in self.names}
        cfg = self.config(**values)
        try:
            cfg.validate(**checks)
        except InputError as err:
            raise with_flags(err, self.names) from None
        return cfg, ns


def _is_union(hint: Any) -> bool:
    return typing.get_origin(hint) in (typing.Union, types.UnionType)


def _values(default: Any) -> tuple:
    return tuple(default) if isinstance(default, (tuple, list)) else (default,)
