"""The one error type the converter raises for bad input: the CLI prints it on one line and exits 2."""


class ConversionError(Exception):
    """Bad input or an impossible request. The message names the file or key, what was expected, what was
    found and what to do."""

    exit_code = 2
