"""User-facing errors: one clear message naming the thing that is wrong and the fix."""


class CemdError(Exception):
    """An error caused by the user's input (a file, a folder, an option).

    The command line prints its message without a traceback and exits with status 2.
    """


class BundleError(CemdError):
    """A model bundle is missing, truncated, edited or does not fit the request."""


class DatasetError(CemdError):
    """A dataset folder is missing, empty, mislabelled or holds unreadable images."""
