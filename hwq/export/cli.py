"""`hwq export`: the integer program as a QONNX model for FINN, checked against accel_sim.

Given --data, the exported model is run by qonnx's own executor on real images before
the file is written, and the command prints how many logits it compared and how many
differ from accel_sim; a model that differs is not written.
"""

from __future__ import annotations

import argparse
import os
from pathlib import Path

from accel_sim.ir import atomic_write_bytes

from .. import HwqError
from ..flags import add_data_flags, add_model_flags, program_from_args
from . import FORMATS, INSTALL_HINT

DEFAULT_CHECK_IMAGES = 32


def writable_target(out: str) -> Path:
    """The --out path, checked before any work: not a directory, under a writable directory."""
    path = Path(out)
    if path.is_dir():
        raise HwqError(f"--out {out} is a directory; give a file name such as model.onnx")
    parent = path.parent
    while not parent.exists():
        parent = parent.parent
    if not parent.is_dir():
        raise HwqError(f"--out {out}: {parent} is not a directory")
    if not os.access(parent, os.W_OK):
        raise HwqError(f"--out {out}: cannot write in {parent}")
    return path


def import_exporter():
    try:
        from . import qonnx_export
    except ImportError as exc:
        missing = (exc.name or "qonnx").split(".")[0]
        raise HwqError(
            f"--format qonnx needs the {missing} package, not installed here: {INSTALL_HINT}"
        ) from None
    return qonnx_export


def cmd_export(args: argparse.Namespace) -> None:
    if args.format not in FORMATS:
        raise HwqError(f"unknown export format {args.format!r} (known: {', '.join(FORMATS)})")
    if args.limit is not None and (args.limit < 1 or not args.data):
        raise HwqError(f"--check-images {args.limit} needs --data and at least 1 image")
    out = writable_target(args.out)
    exporter = import_exporter()
    program = program_from_args(args)
    model = exporter.export_qonnx(program)
    if args.data:
        check_export(model, program, args)
    try:
        atomic_write_bytes(out, model.model.SerializeToString())
    except OSError as exc:
        raise HwqError(f"cannot write {out}: {exc.strerror}") from None
    ops = sorted({node.op_type for node in model.graph.node})
    print(f"wrote {out}: QONNX, {len(model.graph.node)} nodes ({', '.join(ops)})")
    if not args.data:
        print("  not checked: give --data to run it with qonnx's executor against accel_sim")


def check_export(model, program, args: argparse.Namespace) -> None:
    from ..data import load_split
    from .check import check_against_accel_sim

    n = args.limit or DEFAULT_CHECK_IMAGES
    ds = load_split(args.data, args.split, args.val_fraction, args.split_seed).head(n)
    if len(ds) == 0:
        raise HwqError(f"split {args.split} is empty")
    result = check_against_accel_sim(model, program, ds.images)
    print(f"qonnx execute_onnx vs accel_sim ({args.split} split): {result.summary()}")
    if result.mismatches:
        layers = ", ".join(f"{k} {v}" for k, v in result.max_difference.items() if v)
        raise HwqError(
            f"the exported model differs from accel_sim ({result.summary()}; max difference per tensor: "
            f"{layers}); nothing written"
        )


def register(sub: argparse._SubParsersAction) -> None:
    p = sub.add_parser("export", help="write the integer program as a QONNX model (FINN), checked on images")
    p.add_argument("--ir", help="an IR file (from hwq train or hwq eval --save-ir)")
    p.add_argument("--format", default="qonnx", help=f"output format ({', '.join(FORMATS)})")
    p.add_argument("--out", required=True, help="the model file to write (e.g. model.onnx)")
    add_model_flags(p)
    add_data_flags(p)
    p.add_argument(
        "--check-images",
        dest="limit",
        type=int,
        help=f"with --data: images run through both executors (default {DEFAULT_CHECK_IMAGES}; = --limit)",
    )
    p.set_defaults(func=cmd_export)
