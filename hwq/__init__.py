"""hwq: train low-bit networks whose accuracy is measured on a bit-exact accelerator model."""

__version__ = "0.1.0"


class HwqError(Exception):
    """A problem with the user's input; the CLI prints it as one line and exits."""
