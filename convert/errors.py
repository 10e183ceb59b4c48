"""The one error type the converter raises for bad input: the CLI prints it on one line and exits 2."""

from .safejson import clean


class ConversionError(Exception):
    """Bad input or an impossible request. The message names the file or key, what was expected, what was
    found and what to do. Names in it come from hostile files: control characters are escaped here, once, so
    the message stays one line and no escape code reaches the terminal."""

    exit_code = 2

    def __init__(self, message: object = "") -> None:
        super().__init__(clean(message))
