"""The `hwq` command. Each subcommand is defined next to what it drives (its stage's
`cli` module); errors in the user's input come out as one line naming the problem, never
as a traceback. Command modules import torch only when they run, so `hwq --help` and the
torch-free commands start at once."""

from __future__ import annotations

import argparse
import importlib
import logging
import sys
import warnings
from typing import NoReturn

from accel_sim.errors import DeviceError
from accel_sim.ir import IRError

from . import HwqError, __version__
from . import __doc__ as hwq_doc

# In pipeline order: quantize and lower, search, co-design, baselines, studies, hardware model, RTL, export.
COMMAND_MODULES = (
    "hwq.quant.cli",
    "hwq.search.cli",
    "hwq.codesign.cli",
    "hwq.baselines.cli",
    "hwq.studies.cli",
    "accel_sim.cli",
    "rtl_models.cli",
    "hwq.export.cli",
)


class Parser(argparse.ArgumentParser):
    """argparse, with a flag error as one line like every other error of the command (the
    subcommands' parsers are of this class too)."""

    def error(self, message: str) -> NoReturn:
        self.exit(2, f"{self.prog}: error: {message} (see {self.prog} --help)\n")


def build_parser() -> argparse.ArgumentParser:
    parser = Parser(prog="hwq", description=hwq_doc)
    parser.add_argument("--version", action="version", version=f"hwq {__version__}")
    sub = parser.add_subparsers(dest="command", required=True)
    for module in COMMAND_MODULES:
        importlib.import_module(module).register(sub)
    return parser


def quiet_libraries() -> None:
    logging.getLogger("torch.utils.cpp_extension").setLevel(logging.ERROR)
    warnings.filterwarnings("ignore", module="brevitas")


def main(argv: list[str] | None = None) -> int:
    """Exit status: 0 done, 2 bad input (one line on stderr), 130 stopped by Ctrl-C or
    SIGTERM (a command that saved its work says how to continue it)."""
    quiet_libraries()
    try:
        args = build_parser().parse_args(argv)
    except SystemExit as exc:  # --help, --version, or a flag error already printed
        return exc.code if isinstance(exc.code, int) else 2
    try:
        args.func(args)
    except (HwqError, IRError, DeviceError) as exc:
        print(f"hwq {args.command}: error: {exc}", file=sys.stderr)
        return 2
    except KeyboardInterrupt as exc:
        print(f"hwq {args.command}: {exc or 'interrupted'}", file=sys.stderr)
        return 130
    return 0


if __name__ == "__main__":
    sys.exit(main())
