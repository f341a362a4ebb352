"""An accelerator's description: the systolic array, its buffers, off-chip bandwidth and energy.

It is read from a TOML file that a hardware designer can write by hand (examples/*.toml),
and it is the one place the trainer and the sweeps take the target's operand widths and
accumulator from, so the numbers they optimize for are the numbers the timing model uses.
Every energy default is an estimate with its published source beside it.
"""

from __future__ import annotations

import math
import os
import sys
from dataclasses import dataclass, field, fields
from pathlib import Path
from typing import Any

from .ir import (
    MAX_ACC_BITS,
    MAX_ACT_BITS,
    MAX_WEIGHT_BITS,
    MIN_ACC_BITS,
    MIN_ACT_BITS,
    MIN_WEIGHT_BITS,
    OVERFLOW_MODES,
    Accumulator,
    IRError,
)

if sys.version_info >= (3, 11):
    import tomllib
else:
    import tomli as tomllib

DATAFLOWS = ("os", "ws", "is")  # output, weight and input stationary (SCALE-Sim's names)


@dataclass(frozen=True)
class EnergyTable:
    """Energy per operation in pJ. Defaults: 45 nm CMOS, 0.9 V (Horowitz, "Computing's energy
    problem (and what we can do about it)", ISSCC 2014, the table reproduced as Table I of
    Han et al., "EIE", ISCA 2016). Estimates for relative comparisons, not a signoff number."""

    mult_8b_pj: float = 0.2  # 8-bit integer multiply (Horowitz 2014)
    add_32b_pj: float = 0.1  # 32-bit integer add (Horowitz 2014; 8-bit add is 0.03 pJ)
    buffer_pj_per_byte: float = 1.25  # 32-bit read of an 8 KB SRAM is 5 pJ (Horowitz 2014)
    dram_pj_per_byte: float = 160.0  # 32-bit DRAM read is 640 pJ (Horowitz 2014)

    def mult_pj(self, weight_bits: int, act_bits: int) -> float:
        """An array multiplier's energy grows with its partial-product count, the product of
        the operand widths, so an a x b multiply costs mult_8b * a * b / 64."""
        return self.mult_8b_pj * weight_bits * act_bits / 64

    def add_pj(self, bits: int) -> float:
        """A ripple/prefix adder's energy grows about linearly with its width."""
        return self.add_32b_pj * bits / 32

    def mac_pj(self, weight_bits: int, act_bits: int, acc_bits: int) -> float:
        """One multiply plus one accumulator-wide add."""
        return self.mult_pj(weight_bits, act_bits) + self.add_pj(acc_bits)


@dataclass(frozen=True)
class Accelerator:
    """A rows x cols systolic MAC array with three on-chip buffers and one off-chip link.

    `weight_bits` / `act_bits` are the PE operand widths; left unset, every layer runs at
    the widths of the program (a flexible-precision array). When set they override the
    program: operands are stored, moved and multiplied at the hardware's width.
    """

    rows: int
    cols: int
    dataflow: str
    clock_mhz: float
    weight_buffer_bytes: int
    input_buffer_bytes: int
    output_buffer_bytes: int
    dram_bytes_per_cycle: float
    acc_bits: int = 32
    overflow: str = "wrap"
    weight_bits: int | None = None
    act_bits: int | None = None
    name: str = "accelerator"
    energy: EnergyTable = field(default_factory=EnergyTable)

    def accumulator(self) -> Accumulator:
        return Accumulator(self.acc_bits, self.overflow)

    @property
    def pes(self) -> int:
        return self.rows * self.cols

    def validate(self) -> None:
        """Raise IRError naming the first field (as written in the TOML file) that is wrong."""
        for attr in ("rows", "cols", "weight_buffer_bytes", "input_buffer_bytes", "output_buffer_bytes"):
            _need_int(getattr(self, attr), attr, lo=1)
        for attr in ("clock_mhz", "dram_bytes_per_cycle"):
            _need_number(getattr(self, attr), attr, positive=True)
        if self.dataflow not in DATAFLOWS:
            raise IRError(f"{toml_key('dataflow')} = {self.dataflow!r} is not one of {DATAFLOWS}")
        _need_int(self.acc_bits, "acc_bits", MIN_ACC_BITS, MAX_ACC_BITS)
        if self.overflow not in OVERFLOW_MODES:
            raise IRError(f"{toml_key('overflow')} = {self.overflow!r} is not one of {OVERFLOW_MODES}")
        if self.weight_bits is not None:
            _need_int(self.weight_bits, "weight_bits", MIN_WEIGHT_BITS, MAX_WEIGHT_BITS)
        if self.act_bits is not None:
            _need_int(self.act_bits, "act_bits", MIN_ACT_BITS, MAX_ACT_BITS)
        if self.weight_bits and self.act_bits and self.acc_bits < self.weight_bits + self.act_bits:
            raise IRError(
                f"{toml_key('acc_bits')} = {self.acc_bits} cannot hold one {self.weight_bits} x "
                f"{self.act_bits}-bit product (needs at least {self.weight_bits + self.act_bits})"
            )
        self._validate_stationary_tile()
        for f in fields(EnergyTable):
            _need_number(getattr(self.energy, f.name), f"energy.{f.name}", positive=False)

    def _validate_stationary_tile(self) -> None:
        """Each dataflow holds one operand in the array, a rows x cols tile of it, which
        moves between the array and that operand's buffer one tile at a time: `os` drains
        a tile of outputs into the output buffer, `ws` loads a tile of weights, `is` a tile
        of activations. That buffer must hold one tile, at the hardware's operand width or,
        left unset, the narrowest width the IR allows."""
        held = {
            "os": ("output_buffer_bytes", "outputs", self.act_bits or MIN_ACT_BITS),
            "ws": ("weight_buffer_bytes", "weights", self.weight_bits or MIN_WEIGHT_BITS),
            "is": ("input_buffer_bytes", "activations", self.act_bits or MIN_ACT_BITS),
        }
        attr, operand, bits = held[self.dataflow]
        need = math.ceil(self.pes * bits / 8)
        if getattr(self, attr) < need:
            raise IRError(
                f"{toml_key(attr)} = {getattr(self, attr)} is smaller than one {self.rows}x{self.cols} "
                f"tile of the {self.dataflow} dataflow's stationary {operand} "
                f"({need} bytes at {bits} bits)"
            )


# Where each field lives in the TOML file: (table, key). The file is grouped the way a
# hardware designer describes a chip; the dataclass is flat for the model's convenience.
TOML_LAYOUT: dict[str, tuple[str | None, str]] = {
    "name": (None, "name"),
    "rows": ("array", "rows"),
    "cols": ("array", "cols"),
    "dataflow": ("array", "dataflow"),
    "clock_mhz": ("array", "clock_mhz"),
    "weight_bits": ("precision", "weight_bits"),
    "act_bits": ("precision", "act_bits"),
    "acc_bits": ("accumulator", "bits"),
    "overflow": ("accumulator", "overflow"),
    "weight_buffer_bytes": ("buffers", "weight_bytes"),
    "input_buffer_bytes": ("buffers", "input_bytes"),
    "output_buffer_bytes": ("buffers", "output_bytes"),
    "dram_bytes_per_cycle": ("dram", "bytes_per_cycle"),
}
REQUIRED = (
    "rows",
    "cols",
    "dataflow",
    "clock_mhz",
    "weight_buffer_bytes",
    "input_buffer_bytes",
    "output_buffer_bytes",
    "dram_bytes_per_cycle",
)


def toml_key(attr: str) -> str:
    """The dotted name a field has in the TOML file (what error messages show)."""
    if attr.startswith("energy."):
        return attr
    table, key = TOML_LAYOUT[attr]
    return f"{table}.{key}" if table else key


def _need_int(value: Any, attr: str, lo: int, hi: int | None = None) -> None:
    if isinstance(value, bool) or not isinstance(value, int):
        raise IRError(f"{toml_key(attr)} must be an integer, got {value!r}")
    if value < lo or (hi is not None and value > hi):
        bound = f"in [{lo}, {hi}]" if hi is not None else f">= {lo}"
        raise IRError(f"{toml_key(attr)} = {value} must be {bound}")


def _need_number(value: Any, attr: str, positive: bool) -> None:
    if isinstance(value, bool) or not isinstance(value, int | float) or not math.isfinite(value):
        raise IRError(f"{toml_key(attr)} must be a number, got {value!r}")
    if value < 0 or (positive and value == 0):
        raise IRError(f"{toml_key(attr)} = {value} must be {'> 0' if positive else '>= 0'}")


def allowed_keys() -> dict[str | None, set[str]]:
    """Keys each table of the file may hold (None: the top level)."""
    allowed: dict[str | None, set[str]] = {"energy": {f.name for f in fields(EnergyTable)}}
    for table, key in TOML_LAYOUT.values():
        allowed.setdefault(table, set()).add(key)
    allowed[None] |= {table for table in allowed if table}
    return allowed


def refuse_unknown_keys(doc: dict[str, Any]) -> None:
    """A misspelt key would otherwise silently take its default."""
    allowed = allowed_keys()
    for top, section in doc.items():
        if top not in allowed[None]:
            raise IRError(f"unknown key {top!r} (expected one of {sorted(allowed[None])})")
        if top in allowed:
            if not isinstance(section, dict):
                raise IRError(f"{top} must be a table ([{top}])")
            unknown = sorted(set(section) - allowed[top])
            if unknown:
                raise IRError(f"unknown key {top}.{unknown[0]} (expected one of {sorted(allowed[top])})")


def accelerator_from_dict(doc: dict[str, Any]) -> Accelerator:
    """Build and validate an Accelerator from a parsed TOML document."""
    refuse_unknown_keys(doc)
    values = {}
    for attr, (table, key) in TOML_LAYOUT.items():
        section = doc.get(table, {}) if table else doc
        if key in section:
            values[attr] = section[key]
    missing = [toml_key(attr) for attr in REQUIRED if attr not in values]
    if missing:
        raise IRError(f"missing {', '.join(missing)}")
    if not isinstance(values.get("name", ""), str):
        raise IRError(f"name must be a string, got {values['name']!r}")
    accelerator = Accelerator(**values, energy=EnergyTable(**doc.get("energy", {})))
    accelerator.validate()
    return accelerator


def load_accelerator(path: str | os.PathLike) -> Accelerator:
    """Read an accelerator TOML file; every problem is an IRError naming the file and field."""
    path = Path(path)
    try:
        doc = tomllib.loads(path.read_text())
    except FileNotFoundError:
        raise IRError(f"hardware config {path} does not exist") from None
    except (tomllib.TOMLDecodeError, UnicodeDecodeError, OSError) as exc:
        raise IRError(f"{path} is not a readable TOML file ({exc})") from None
    try:
        return accelerator_from_dict(doc)
    except IRError as exc:
        raise IRError(f"{path}: {exc}") from None
