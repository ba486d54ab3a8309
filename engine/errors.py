"""User-facing errors: one clear message naming the thing that is wrong and the fix."""


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
