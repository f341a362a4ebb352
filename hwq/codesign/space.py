"""The co-design space: what `hwq codesign` may choose, read from a TOML file and checked.

Every choice is a list of allowed values (a single value fixes it). The genome is one
integer gene per choice that has more than one value: an index into that choice's list,
so pymoo's integer operators (and any other integer search) work on it unchanged. With
`precision.per_layer = true` every weight layer of the network has its own weight-width
gene (mixed precision); `precision.layers` narrows the choices of named layers (a fixed
8-bit stem, say). docs/codesign.md lists every key.
"""

from __future__ import annotations

import dataclasses
import itertools
import math
import sys
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np

from accel_sim.hardware import DATAFLOWS, Accelerator, EnergyTable
from accel_sim.ir import (
    MAX_ACC_BITS,
    MAX_ACT_BITS,
    MAX_WEIGHT_BITS,
    MIN_ACC_BITS,
    MIN_ACT_BITS,
    MIN_WEIGHT_BITS,
    OVERFLOW_MODES,
    IRError,
)

from .. import HwqError
from ..quant import WEIGHT_RANGES

if sys.version_info >= (3, 11):
    import tomllib
else:
    import tomli as tomllib

OBJECTIVES = ("accuracy", "energy", "area", "cycles")
STARTS = ("rtn", "gptq", "gpfq")
# (table, key) -> (lowest, highest) for integer choices; None: no upper bound.
INT_CHOICES: dict[tuple[str, str], tuple[int, int | None]] = {
    ("precision", "weight_bits"): (max(2, MIN_WEIGHT_BITS), min(8, MAX_WEIGHT_BITS)),
    ("precision", "act_bits"): (max(2, MIN_ACT_BITS), min(8, MAX_ACT_BITS)),
    ("accumulator", "bits"): (MIN_ACC_BITS, MAX_ACC_BITS),
    ("array", "rows"): (1, None),
    ("array", "cols"): (1, None),
    ("buffers", "weight_bytes"): (1, None),
    ("buffers", "input_bytes"): (1, None),
    ("buffers", "output_bytes"): (1, None),
}
WORD_CHOICES = {("accumulator", "overflow"): OVERFLOW_MODES, ("array", "dataflow"): ("os", "ws")}
SCALARS = {
    ("array", "clock_mhz"): 500.0,
    ("dram", "bytes_per_cycle"): 16.0,
}
CONSTRAINTS = ("max_area_um2", "max_energy_uj", "max_cycles", "min_accuracy")
SEARCH_DEFAULTS: dict[str, Any] = {
    "generations": 4,
    "population": 8,
    "seed": 0,
    "finetune_per_generation": 2,
    "finetune_evals": 200,
    "fitness_images": 128,
    "start": "rtn",
    "objectives": list(OBJECTIVES),
    "per_channel": True,
    "weight_range": "narrow",
    "fit_accumulator": False,
    "overflow_penalty": 0,
}
TABLES = {"precision", "accumulator", "array", "buffers", "dram", "energy", "constraints", "search"}


@dataclass(frozen=True)
class Gene:
    """One searched choice: its name in the design and the values it may take."""

    name: str
    choices: tuple


def kib(size: int) -> str:
    return f"{size / 1024:g}"


@dataclass(frozen=True)
class Design:
    """A decoded genome: the network's widths and the accelerator that runs it."""

    layer_wbits: tuple[int, ...]
    act_bits: int
    acc_bits: int
    overflow: str
    rows: int
    cols: int
    dataflow: str
    weight_bytes: int
    input_bytes: int
    output_bytes: int

    @property
    def precision_key(self) -> str:
        """Designs with one precision share one lowered network."""
        return f"a{self.act_bits}-w" + ".".join(str(b) for b in self.layer_wbits)

    @property
    def numerics_key(self) -> str:
        """Designs with one key compute the same integers: the array, dataflow and buffers
        change when and where each product is taken, never the reduction order the IR
        fixes (docs/datapath.md), so one accuracy serves them all."""
        return f"{self.precision_key}-acc{self.acc_bits}{self.overflow}"

    @property
    def name(self) -> str:
        ws = sorted(set(self.layer_wbits))
        weights = f"w{ws[0]}" if len(ws) == 1 else f"w{ws[0]}-{ws[-1]}"
        return (
            f"{weights}a{self.act_bits}-acc{self.acc_bits}{self.overflow[0]}-{self.rows}x{self.cols}"
            f"{self.dataflow}-b{kib(self.weight_bytes)}.{kib(self.input_bytes)}.{kib(self.output_bytes)}k"
        )

    def to_json(self) -> dict:
        d = dataclasses.asdict(self)
        d["layer_wbits"] = list(self.layer_wbits)
        return d


@dataclass(frozen=True)
class Space:
    """The parsed space file: choices, fixed hardware values, constraints, search settings."""

    weight_bits: tuple[int, ...]
    per_layer: bool
    layer_choices: dict[str, tuple[int, ...]]
    act_bits: tuple[int, ...]
    acc_bits: tuple[int, ...]
    overflow: tuple[str, ...]
    rows: tuple[int, ...]
    cols: tuple[int, ...]
    dataflow: tuple[str, ...]
    weight_bytes: tuple[int, ...]
    input_bytes: tuple[int, ...]
    output_bytes: tuple[int, ...]
    clock_mhz: float
    dram_bytes_per_cycle: float
    energy: EnergyTable
    constraints: dict[str, float]
    search: dict[str, Any] = field(default_factory=dict)

    @property
    def per_channel(self) -> bool:
        return bool(self.search["per_channel"])

    @property
    def weight_range(self) -> str:
        return str(self.search["weight_range"])

    @property
    def objectives(self) -> tuple[str, ...]:
        return tuple(self.search["objectives"])

    def genes(self, layers: list[str]) -> list[Gene]:
        """The searched genes for a network whose weight layers are `layers` (IR order);
        choices with one value are fixed and take no gene."""
        unknown = sorted(set(self.layer_choices) - set(layers))
        if unknown:
            raise HwqError(
                f"precision.layers names {unknown[0]!r}, which is not a weight layer of the network"
            )
        weights = list(dict.fromkeys(self.weight_gene(n) for n in layers))
        hardware = [Gene(n, getattr(self, n)) for n in HARDWARE_GENES]
        return [g for g in (*weights, *hardware) if len(g.choices) > 1]

    def weight_gene(self, layer: str) -> Gene:
        """A layer's weight-width gene: its own with per_layer or when precision.layers
        names it, otherwise the one every other layer shares."""
        if layer in self.layer_choices:
            return Gene(f"w:{layer}", self.layer_choices[layer])
        return Gene(f"w:{layer}" if self.per_layer else "w:all", self.weight_bits)

    def decode(self, genes: list[Gene], genome: list[int], layers: list[str]) -> Design:
        chosen = {g.name: g.choices[int(i)] for g, i in zip(genes, genome, strict=True)}

        def pick(name: str, default: tuple) -> Any:
            return chosen.get(name, default[0])

        wbits = tuple(pick(g.name, g.choices) for g in map(self.weight_gene, layers))
        return Design(wbits, *(pick(n, getattr(self, n)) for n in HARDWARE_GENES))

    def uniform_genomes(self, genes: list[Gene], layers: list[str], n: int, seed: int) -> np.ndarray:
        """`n` genomes with one weight width in every layer (the nearest choice where a layer
        has its own), the other genes at random: the grid's kind of design, where the
        search starts; crossover and mutation then mix the widths per layer."""
        rng = np.random.default_rng(seed)
        genomes = np.stack([rng.integers(0, len(g.choices), n) for g in genes], axis=1)
        widths = rng.choice(np.array(self.weight_bits), n)
        for j, gene in enumerate(genes):
            if gene.name.startswith("w:"):
                choices = np.array(gene.choices)
                genomes[:, j] = np.abs(choices[None, :] - widths[:, None]).argmin(axis=1)
        return genomes

    def hardware_variants(self, design: Design) -> list[Design]:
        """Every design of the space with the numerics of `design`: each array, dataflow and
        buffer sizes (they share its accuracy, see Design.numerics_key)."""
        choices = [getattr(self, n) for n in ARRAY_GENES]
        return [
            dataclasses.replace(design, **dict(zip(ARRAY_GENES, values, strict=True)))
            for values in itertools.product(*choices)
        ]

    def accelerator(self, design: Design) -> Accelerator:
        """The design's accelerator; IRError when the combination cannot exist (a buffer
        smaller than one stationary tile, say). Operand widths are left to the program, so
        energy follows each layer's own widths (a flexible-precision array)."""
        hw = Accelerator(
            rows=design.rows,
            cols=design.cols,
            dataflow=design.dataflow,
            clock_mhz=self.clock_mhz,
            weight_buffer_bytes=design.weight_bytes,
            input_buffer_bytes=design.input_bytes,
            output_buffer_bytes=design.output_bytes,
            dram_bytes_per_cycle=self.dram_bytes_per_cycle,
            acc_bits=design.acc_bits,
            overflow=design.overflow,
            name=design.name,
            energy=self.energy,
        )
        hw.validate()
        return hw

    def to_json(self) -> dict:
        d = dataclasses.asdict(self)
        d["energy"] = dataclasses.asdict(self.energy)
        return d


HARDWARE_GENES = (
    "act_bits",
    "acc_bits",
    "overflow",
    "rows",
    "cols",
    "dataflow",
    "weight_bytes",
    "input_bytes",
    "output_bytes",
)
ARRAY_GENES = ("rows", "cols", "dataflow", "weight_bytes", "input_bytes", "output_bytes")
GENE_KEYS = {
    "weight_bits": ("precision", "weight_bits"),
    "act_bits": ("precision", "act_bits"),
    "acc_bits": ("accumulator", "bits"),
    "overflow": ("accumulator", "overflow"),
    "rows": ("array", "rows"),
    "cols": ("array", "cols"),
    "dataflow": ("array", "dataflow"),
    "weight_bytes": ("buffers", "weight_bytes"),
    "input_bytes": ("buffers", "input_bytes"),
    "output_bytes": ("buffers", "output_bytes"),
}
REQUIRED = {("precision", "weight_bits"), ("array", "rows"), ("array", "cols")}
DEFAULTS: dict[tuple[str, str], tuple] = {
    ("precision", "act_bits"): (8,),
    ("accumulator", "bits"): (32,),
    ("accumulator", "overflow"): ("wrap",),
    ("array", "dataflow"): ("os",),
    ("buffers", "weight_bytes"): (65536,),
    ("buffers", "input_bytes"): (65536,),
    ("buffers", "output_bytes"): (65536,),
}


def choice_list(doc: dict, table: str, key: str) -> tuple:
    """A choice as a sorted tuple of distinct allowed values (a lone value is a list of one)."""
    section = doc.get(table, {})
    if key not in section:
        if (table, key) in REQUIRED:
            raise HwqError(f"{table}.{key} is missing (a list of allowed values)")
        return DEFAULTS[(table, key)]
    raw = section[key]
    values = raw if isinstance(raw, list) else [raw]
    if not values:
        raise HwqError(f"{table}.{key} is an empty list")
    if (table, key) in WORD_CHOICES:
        allowed = WORD_CHOICES[(table, key)]
        for v in values:
            if v not in allowed:
                raise HwqError(f"{table}.{key} value {v!r} is not one of {', '.join(allowed)}")
        return tuple(dict.fromkeys(values))
    lo, hi = INT_CHOICES[(table, key)]
    for v in values:
        if isinstance(v, bool) or not isinstance(v, int):
            raise HwqError(f"{table}.{key} value {v!r} is not an integer")
        if v < lo or (hi is not None and v > hi):
            bound = f"[{lo}, {hi}]" if hi is not None else f">= {lo}"
            raise HwqError(f"{table}.{key} value {v} is out of range {bound}")
    return tuple(sorted(set(values)))


def positive_number(value: Any, where: str) -> float:
    if (
        isinstance(value, bool)
        or not isinstance(value, int | float)
        or not math.isfinite(value)
        or value <= 0
    ):
        raise HwqError(f"{where} must be a positive number, got {value!r}")
    return float(value)


def refuse_unknown(doc: dict) -> None:
    known = {(t, k) for t, k in (*INT_CHOICES, *WORD_CHOICES, *SCALARS)}
    known |= {("precision", "per_layer"), ("precision", "layers")}
    known |= {("constraints", c) for c in CONSTRAINTS} | {("search", s) for s in SEARCH_DEFAULTS}
    for table, section in doc.items():
        if table not in TABLES:
            raise HwqError(f"unknown table [{table}] (expected {', '.join(sorted(TABLES))})")
        if not isinstance(section, dict):
            raise HwqError(f"{table} must be a table ([{table}])")
        if table == "energy":
            continue
        for key in section:
            if (table, key) not in known:
                raise HwqError(f"unknown key {table}.{key}")


def read_constraints(doc: dict) -> dict[str, float]:
    found = {}
    for name, value in doc.get("constraints", {}).items():
        found[name] = positive_number(value, f"constraints.{name}")
    if found.get("min_accuracy", 0) > 1:
        raise HwqError(f"constraints.min_accuracy = {found['min_accuracy']} is above 1 (accuracy is 0-1)")
    return found


def read_search(doc: dict) -> dict[str, Any]:
    search = {**SEARCH_DEFAULTS, **doc.get("search", {})}
    for key in ("generations", "population", "finetune_evals", "fitness_images"):
        v = search[key]
        if isinstance(v, bool) or not isinstance(v, int) or v < 1:
            raise HwqError(f"search.{key} must be a positive integer, got {v!r}")
    for key in ("seed", "finetune_per_generation", "overflow_penalty"):
        v = search[key]
        if isinstance(v, bool) or not isinstance(v, int) or v < 0:
            raise HwqError(f"search.{key} must be a non-negative integer, got {v!r}")
    if search["population"] < 2:
        raise HwqError("search.population must be at least 2 (NSGA-II mates pairs)")
    if search["start"] not in STARTS:
        raise HwqError(f"search.start = {search['start']!r} is not one of {', '.join(STARTS)}")
    objectives = search["objectives"]
    if not isinstance(objectives, list) or not objectives or set(objectives) - set(OBJECTIVES):
        raise HwqError(f"search.objectives must be a list of some of {', '.join(OBJECTIVES)}")
    if "accuracy" not in objectives:
        raise HwqError("search.objectives must include accuracy")
    if not isinstance(search["per_channel"], bool):
        raise HwqError("search.per_channel must be true or false")
    if search["weight_range"] not in WEIGHT_RANGES:
        raise HwqError(
            f"search.weight_range = {search['weight_range']!r} is not one of {', '.join(WEIGHT_RANGES)}"
        )
    search["fit_accumulator"] = read_fit(search["fit_accumulator"])
    search["objectives"] = list(dict.fromkeys(objectives))
    return search


def read_fit(value: Any) -> float | None:
    """`search.fit_accumulator`: false (off), true (fit the largest measured sum) or the
    quantile of the measured sums to fit, as `--fit-accumulator [QUANTILE]`."""
    if value is False:
        return None
    if value is True:
        return 1.0
    if isinstance(value, (int, float)) and 0.5 <= value <= 1:
        return float(value)
    raise HwqError(f"search.fit_accumulator must be true, false or a quantile in [0.5, 1], got {value!r}")


def read_layer_choices(doc: dict) -> dict[str, tuple[int, ...]]:
    layers = doc.get("precision", {}).get("layers", {})
    if not isinstance(layers, dict):
        raise HwqError("precision.layers must be a table of layer name = [allowed weight bits]")
    return {
        name: choice_list({"precision": {"weight_bits": v}}, "precision", "weight_bits")
        for name, v in layers.items()
    }


def space_from_dict(doc: dict) -> Space:
    """Parse and check a space document; every problem is one HwqError naming the key."""
    refuse_unknown(doc)
    choices = {name: choice_list(doc, *key) for name, key in GENE_KEYS.items()}
    per_layer = doc.get("precision", {}).get("per_layer", False)
    if not isinstance(per_layer, bool):
        raise HwqError("precision.per_layer must be true or false")
    scalars = {
        key: positive_number(doc.get(key[0], {}).get(key[1], default), f"{key[0]}.{key[1]}")
        for key, default in SCALARS.items()
    }
    try:
        energy = EnergyTable(**doc.get("energy", {}))
    except TypeError as exc:
        raise HwqError(f"energy: {exc}") from None
    for f in dataclasses.fields(EnergyTable):
        positive_number(getattr(energy, f.name), f"energy.{f.name}")
    space = Space(
        **choices,
        per_layer=per_layer,
        layer_choices=read_layer_choices(doc),
        clock_mhz=scalars[("array", "clock_mhz")],
        dram_bytes_per_cycle=scalars[("dram", "bytes_per_cycle")],
        energy=energy,
        constraints=read_constraints(doc),
        search=read_search(doc),
    )
    check_some_accelerator(space)
    return space


def check_some_accelerator(space: Space) -> None:
    """At least one accelerator of the space must be valid, or nothing could be searched."""
    narrowest = Design(
        layer_wbits=(min(space.weight_bits),),
        act_bits=min(space.act_bits),
        acc_bits=max(space.acc_bits),
        overflow=space.overflow[0],
        rows=min(space.rows),
        cols=min(space.cols),
        dataflow=space.dataflow[0],
        weight_bytes=max(space.weight_bytes),
        input_bytes=max(space.input_bytes),
        output_bytes=max(space.output_bytes),
    )
    try:
        space.accelerator(narrowest)
    except IRError as exc:
        raise HwqError(f"no accelerator of the space is valid: {exc}") from None
    assert set(space.dataflow) <= set(DATAFLOWS)


def load_space(path: str | Path) -> Space:
    path = Path(path)
    try:
        doc = tomllib.loads(path.read_text())
    except FileNotFoundError:
        raise HwqError(f"space file {path} does not exist") from None
    except (tomllib.TOMLDecodeError, UnicodeDecodeError, OSError) as exc:
        raise HwqError(f"{path} is not a readable TOML file ({exc})") from None
    try:
        return space_from_dict(doc)
    except HwqError as exc:
        raise HwqError(f"{path}: {exc}") from None
