"""The errors the CLI reports as one line."""


class MoeExportError(Exception):
    """An error the CLI reports as one line (bad input, unsupported graph, missing build); exit 1."""


class UsageError(MoeExportError):
    """A command line that cannot be acted on whatever the files (a flag's value out of its
    range, flags that exclude each other), found before any file is read; exit 2, as argparse's."""
