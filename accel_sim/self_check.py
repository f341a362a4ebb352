"""The device self-check: refuse a device whose arithmetic differs from the int64 reference.

Exactness on a GPU rests on properties of its libraries (IEEE float GEMMs once TF32 is off,
no reordering that leaves the integers) that a driver, a library version or a torch
setting could break without a sign. So before a simulator first runs on a device other
than the CPU, it runs a probe batch through that device, on both of its paths (one
program, and the population path with every searchable parameter as a candidate), and the
same batch through the CPU's int64 path (`force_int64`), and compares every layer's
accumulators (where an error of one LSB shows even when the requantization would round it
away on this batch) and outputs. The first difference is reported with its layer and
element; nothing is computed inexactly.
A check is kept per arithmetic (each layer's dtype, overflow mode and requant form) and
device, so it runs once per process for each.
"""

from __future__ import annotations

import numpy as np
import torch

from .errors import DeviceError, ExactnessError
from .ir import BIAS, MULT, WEIGHT, Conv2d, ParamKey, Program, param_of

Activations = tuple[dict[str, torch.Tensor], dict[str, torch.Tensor]]
PROBE_IMAGES = 2
PROBE_POPULATION = 2
_verified: set[tuple] = set()


def probe_images(program: Program) -> torch.Tensor:
    """Random integers over the input's whole range (fixed seed): every bound gets exercised."""
    spec = program.tensors[program.input]
    generator = torch.Generator().manual_seed(0)
    return torch.randint(spec.qmin, spec.qmax + 1, (PROBE_IMAGES, *spec.shape), generator=generator)


def probe_candidates(program: Program) -> dict[ParamKey, np.ndarray]:
    """Every searchable parameter of every op as a candidate, each candidate the program's own."""
    return {
        (op.name, f): np.stack([param_of(op, f)] * PROBE_POPULATION)
        for op in program.ops
        for f in ((WEIGHT, BIAS, MULT) if isinstance(op, Conv2d) else (MULT,))
    }


def first_difference(program: Program, got: Activations, want: Activations) -> str | None:
    """Where `got` (tensors and accumulators of any number of candidates) first differs
    from `want`, in op order, accumulators before outputs."""
    for op in program.ops:
        for what, key, table in (("accumulator", op.name, 1), ("output", op.output, 0)):
            ref = want[table][key]
            out = got[table][key].cpu().to(torch.int64).reshape(-1, *ref.shape)
            wrong = (out != ref).nonzero()
            if len(wrong):
                candidate, *where = (int(i) for i in wrong[0])
                values = f"{int(out[(candidate, *where)])} instead of {int(ref[tuple(where)])}"
                which = f"candidate {candidate}, " if len(out) > 1 else ""
                return f"layer {op.name!r} ({which}{what} element {tuple(where)}: {values})"
    return None


def run_probe(sim, images: torch.Tensor, population: bool) -> Activations | None:
    """Tensors and accumulators of the probe, on one program or as a population."""
    env = {sim.program.input: sim.input_carrier(images)}
    accumulators: dict[str, torch.Tensor] = {}
    if not population:
        sim.execute(env, accumulators=accumulators)
        return env, accumulators
    tensors = sim.population_activations(env, 0, probe_candidates(sim.program), accumulators)
    return None if tensors is None else (tensors, accumulators)


def check_exactness(sim, cached: bool = True) -> None:
    """Raise ExactnessError unless `sim` (a FunctionalSim) computes the int64 reference's
    integers on a probe batch, through both paths; DeviceError if the device cannot run it."""
    key = sim.arithmetic()
    if cached and key in _verified:
        return
    program = sim.program
    images = probe_images(program)
    reference = type(sim)(program, "cpu", force_int64=True, self_check=False)
    tensors, accumulators = run_probe(reference, images, population=False)
    want = ({k: v.to(torch.int64) for k, v in tensors.items()}, accumulators)
    for path in ("", "population path, "):
        try:
            got = run_probe(sim, images, population=bool(path))
        except (RuntimeError, TypeError, NotImplementedError) as exc:
            first = (str(exc).strip().splitlines() or [type(exc).__name__])[0]
            raise DeviceError(f"accel_sim cannot run on {sim.device}: {first}") from None
        where = None if got is None else first_difference(program, got, want)
        if where is not None:
            raise ExactnessError(
                f"accel_sim on {sim.device} ({sim.backend.name} convolutions) differs from the int64 "
                f"reference: {path}{where}; refusing to run inexactly (run on the CPU instead)"
            )
    _verified.add(key)
