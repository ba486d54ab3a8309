"""User-facing errors: one clear message naming the thing that is wrong and the fix."""

from __future__ import annotations

from pathlib import Path
from typing import Any, Callable


class CemdError(Exception):
    """An error caused by the user's input (a file, a folder, an option).

    The command line prints its message without a traceback and exits with status 2.
    """


class BundleError(CemdError):
    """A model bundle is missing, truncated, edited or does not fit the request."""


class DatasetError(CemdError):
    """A dataset folder is missing, empty, mislabelled or holds unreadable images."""


def shown(value: object, limit: int = 60) -> str:
    """``repr(value)`` cut to ``limit`` characters, for quoting a bad value in a one-line message."""
    try:
        text = repr(value)
    except (ValueError, RecursionError):  # an int past the digit limit, a deeply nested list
        text = f"<{type(value).__name__}>"
    return text if len(text) <= limit else text[: limit - 1] + "…"


def first_line(exc: BaseException, limit: int = 120) -> str:
    """The first line of ``exc``'s message (its type's name when empty), cut to ``limit`` characters."""
    text = str(exc).strip()
    line = text.splitlines()[0] if text else type(exc).__name__
    return line if len(line) <= limit else line[: limit - 1] + "…"


def read_document(path: Path, parse: Callable[[str], Any], what: str, fmt: str,
                  error: type[CemdError] = CemdError, fix: str = "") -> Any:
    """``parse`` of the UTF-8 text in ``path``; any failure to read or parse it is one ``error`` line naming
    ``what`` (e.g. "config file"; may be empty) and ``path``, ending with ``fix`` when given."""
    name = f"{what} {path}".strip()
    tail = f"; {fix}" if fix else ""
    try:
        return parse(path.read_text(encoding="utf-8"))
    except FileNotFoundError:
        raise error(f"{name} does not exist{tail}") from None
    except IsADirectoryError:
        raise error(f"{name} is a directory, not a {fmt} file{tail}") from None
    except OSError as exc:
        raise error(f"cannot read {name} ({exc.strerror or type(exc).__name__}){tail}") from None
    except UnicodeDecodeError as exc:
        raise error(f"{name} is not UTF-8 text (byte {exc.start}){tail}") from None
    except RecursionError:
        raise error(f"{name} nests too deeply to be valid{tail}") from None
    except ValueError as exc:  # JSONDecodeError, TOMLDecodeError, a number past Python's digit limit
        raise error(f"{name} is not valid {fmt} ({first_line(exc)}){tail}") from None
