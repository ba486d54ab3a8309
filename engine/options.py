"""Options defined once: a config dataclass field carries its help, its choices and its command-line
flag, and the command line, the TOML file, validation and ``--print-config`` all read them there.

    sensitivity: float = option(1.0, "threshold divisor: 1.0 = calibrated, 1.2 = 20 % more sensitive",
                                flag="--sensitivity")

``flag`` adds ``--flag VALUE`` (parsed as the default's type, or with ``parse``); ``switches``
maps flags without a value to the value they set and their help
(``{"--realtime": (True, "play files at their frame rate"), "--fast": (False, "every frame")}``;
two or more are mutually exclusive). Options without a flag live in the config file only.
"""

from __future__ import annotations

import argparse
import dataclasses
import textwrap
from typing import Any, Callable

from engine.errors import CemdError

_UNSET: Any = dataclasses.MISSING


def option(default: Any = _UNSET, help: str = "", *, choices: tuple[Any, ...] | None = None,  # noqa: A002
           flag: str | None = None, switches: dict[str, tuple[Any, str]] | None = None, metavar: str | None = None,
           parse: Callable[[str], Any] | None = None, default_factory: Callable[[], Any] = _UNSET) -> Any:
    """A dataclass field with its documentation (see the module docstring)."""
    meta = {"help": help, "choices": choices, "flag": flag, "switches": switches, "metavar": metavar, "parse": parse}
    if default_factory is not _UNSET:
        return dataclasses.field(default_factory=default_factory, metadata=meta)
    return dataclasses.field(default=default, metadata=meta)


def one_of(choices: tuple[Any, ...]) -> str:
    words = [str(c) for c in choices]
    return words[0] if len(words) == 1 else f"{', '.join(words[:-1])} or {words[-1]}"


def check_choices(section: Any) -> None:
    """Every field of ``section`` that has choices holds one of them."""
    for f in dataclasses.fields(section):
        choices = f.metadata.get("choices")
        value = getattr(section, f.name)
        if choices and value not in choices:
            raise CemdError(f"{f.name} must be {one_of(choices)}, not {value!r}")


def _help(f: dataclasses.Field, default: Any) -> str:
    text = f.metadata.get("help", "")
    if "default" in text or default is None or isinstance(default, bool):
        return text.replace("%", "%%")
    return f"{text} (default {default})".replace("%", "%%")


def add_arguments(parser: argparse.ArgumentParser, sections: dict[str, Any]) -> None:
    """The command-line flags of every section's options (``sections``: name → default instance);
    each lands in ``args`` as ``SECTION.KEY``, None when not given."""
    for name, section in sections.items():
        for f in dataclasses.fields(section):
            md, dest, default = f.metadata, f"{name}.{f.name}", getattr(section, f.name)
            if md.get("flag"):
                kind = md.get("parse") or (type(default) if default is not None else str)
                parser.add_argument(md["flag"], dest=dest, default=None, type=kind, choices=md.get("choices"),
                                    metavar=md.get("metavar") or (None if md.get("choices") else f.name.upper()),
                                    help=_help(f, default))
            switches = md.get("switches") or {}
            target = parser.add_mutually_exclusive_group() if len(switches) > 1 else parser
            for flag, (value, says) in switches.items():
                target.add_argument(flag, dest=dest, action="store_const", const=value, default=None,
                                    help=says.replace("%", "%%"))


def apply_arguments(config: Any, args: argparse.Namespace) -> None:
    """Set every option given on the command line (``SECTION.KEY`` not None) in ``config``."""
    for dest, value in vars(args).items():
        if "." in dest and value is not None:
            section, key = dest.split(".", 1)
            setattr(getattr(config, section), key, value)


def toml_value(value: Any) -> str:
    if isinstance(value, bool):
        return str(value).lower()
    if isinstance(value, (tuple, list)):
        return f"[{', '.join(toml_value(v) for v in value)}]"
    if isinstance(value, str):
        return f'"{value}"'
    return str(value)


def example_toml(title: str, sections: dict[str, Any]) -> str:
    """A TOML file with every option at its default, each under its help as a comment (options
    without a default commented out)."""
    lines = [f"# {title}", ""]
    for name, section in sections.items():
        lines.append(f"[{name}]")
        for f in dataclasses.fields(section):
            value = getattr(section, f.name)
            text = f.metadata.get("help", "")
            if f.metadata.get("choices"):
                text += f" ({one_of(tuple(c for c in f.metadata['choices'] if c is not None))})"
            lines += textwrap.wrap(text, 100, initial_indent="# ", subsequent_indent="# ")
            lines.append(f"# {f.name} = ..." if value is None else f"{f.name} = {toml_value(value)}")
        lines.append("")
    return "\n".join(lines)
