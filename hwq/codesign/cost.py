"""The hardware objectives of a design: energy and cycles per image, and area.

Energy and cycles come from accel_sim's timing model of the design's program on its
accelerator. The timing model reads only shapes and widths, so a design is costed on a
view of one lowered network at the design's widths (`timing_view`), in a millisecond and
without lowering it. Area is the MAC array's, from Yosys (a 2x2 mac_array synthesized at
the PE's operand and accumulator widths, scaled by the PE count, its gates as 45 nm
cells: rtl_models.area.CELL_AREA_UM2) plus the three SRAM buffers at a 45 nm bit cell.
"""

from __future__ import annotations

import dataclasses
import json
from dataclasses import dataclass
from pathlib import Path

from accel_sim.hardware import Accelerator
from accel_sim.ir import Conv2d, Program
from accel_sim.timing import program_timing

from ..results import write_json
from .space import Design

# Intel's 45 nm 6T SRAM cell is 0.346 um^2 (Mistry et al., IEDM 2007); an SRAM macro spends
# about 30 % of its area on decoders, sense amplifiers and I/O, hence / 0.7.
SRAM_UM2_PER_BIT = 0.346 / 0.7
SYNTH_SIDE = 2  # the array synthesized; its area per PE is scaled to the design's PE count


@dataclass(frozen=True)
class HardwareCost:
    energy_uj: float  # per image
    cycles: int  # per image
    area_um2: float
    array_um2: float
    sram_um2: float

    def to_json(self) -> dict:
        return dataclasses.asdict(self)


def timing_view(program: Program, design: Design) -> Program:
    """`program` with the design's weight width per layer and activation width on every
    inner tensor (the lowering's layout: the raw 8-bit image in, wide logits out)."""
    convs = iter(design.layer_wbits)
    ops = [
        dataclasses.replace(op, weight_bits=next(convs)) if isinstance(op, Conv2d) else op
        for op in program.ops
    ]
    tensors = {
        name: spec
        if name in (program.input, program.output)
        else dataclasses.replace(spec, bits=design.act_bits)
        for name, spec in program.tensors.items()
    }
    return dataclasses.replace(program, ops=ops, tensors=tensors)


class AreaModel:
    """Yosys area per PE, one synthesis per (weight, activation, accumulator width,
    overflow mode), kept in a JSON file so that a resumed run reads the numbers it used."""

    def __init__(self, cache_file: Path | None = None):
        self.cache_file = cache_file
        self.per_pe: dict[str, float] = {}
        if cache_file is not None and cache_file.exists():  # a resumed run: the numbers it used
            self.per_pe = json.loads(cache_file.read_text())

    def keep_in(self, cache_file: Path) -> None:
        """From now on, write every synthesized number to `cache_file`."""
        self.cache_file = cache_file
        write_json(cache_file, self.per_pe)

    def pe_um2(self, weight_bits: int, act_bits: int, acc_bits: int, overflow: str) -> float:
        key = f"w{weight_bits}a{act_bits}acc{acc_bits}{overflow}"
        if key not in self.per_pe:
            from rtl_models.area import synthesize
            from rtl_models.sim import ArrayConfig

            config = ArrayConfig(
                rows=SYNTH_SIDE,
                cols=SYNTH_SIDE,
                weight_bits=weight_bits,
                act_bits=act_bits,
                acc_bits=acc_bits,
                overflow=overflow,
            )
            row = synthesize(config, "mac_array", "generic")
            self.per_pe[key] = row["area_um2"] / SYNTH_SIDE**2
            if self.cache_file is not None:
                write_json(self.cache_file, self.per_pe)
        return self.per_pe[key]

    def array_um2(self, design: Design) -> float:
        """The PE is as wide as the widest layer's weights: narrower layers run on it too."""
        pe = self.pe_um2(max(design.layer_wbits), design.act_bits, design.acc_bits, design.overflow)
        return pe * design.rows * design.cols


def sram_um2(design: Design) -> float:
    return 8 * (design.weight_bytes + design.input_bytes + design.output_bytes) * SRAM_UM2_PER_BIT


def hardware_cost(
    program: Program, design: Design, accelerator: Accelerator, area: AreaModel
) -> HardwareCost:
    timing = program_timing(timing_view(program, design), accelerator, batch=1)
    array, sram = area.array_um2(design), sram_um2(design)
    return HardwareCost(
        energy_uj=timing.energy_pj / 1e6,
        cycles=timing.cycles,
        area_um2=array + sram,
        array_um2=array,
        sram_um2=sram,
    )
