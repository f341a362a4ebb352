"""`hwq codesign`: NSGA-II over accelerators and per-layer widths, CC-EDA inside.

The outer loop is pymoo's NSGA-II on the integer genome of hwq.codesign.space, driven by
ask and tell. Each generation: every candidate's hardware is costed (energy, cycles,
area: milliseconds, plus one Yosys run per new PE width); candidates that break a
hardware constraint stop there; the rest are screened (their start program's val
accuracy on their accumulator, bit-exact); the `search.finetune_per_generation` best
screened (first non-dominated rank, then accuracy) get CC-EDA for `search.finetune_evals`
evaluations, warm-started from the nearest design already trained. Objectives are
val accuracy, energy and cycles per image, area; `constraints` are pymoo's inequality
constraints.

The run directory: `codesign.json` (the space and inputs), `candidates.jsonl` (one row per
candidate and phase, appended and fsynced as each finishes), `state.pkl` (NSGA-II and its
random state after each generation), `area.json` (the Yosys numbers used), `candidates/`
(each candidate's programs and training run), `points.json` (every numerics measured on
its best hardware variants, see evaluated_points) with its front in `front.json` and
`front.csv` (rewritten after each generation), `summary.json` at the end, and `grid.json`
when the uniform grid is measured beside it. After a kill, `--resume` replays the saved
generations' state, reads back every finished candidate and resumes an interrupted
training run exactly, so the front is the one an uninterrupted run gives. One process owns
the directory at a time.
"""

from __future__ import annotations

import hashlib
import itertools
import json
import pickle
import random
import shlex
import time
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path

import numpy as np
from tqdm import tqdm

from accel_sim.ir import IRError, atomic_write_bytes

from .. import HwqError, __version__
from ..outdir import LOCK_FILE, DirectoryLock
from ..quant.evaluate import prepare
from ..quant.model import QuantConfig
from ..results import write_json
from ..search import rundir
from ..studies.rows import append_rows, drop_truncated_tail, read_results
from .candidate import Settings, nearest_trained
from .cost import AreaModel, HardwareCost, hardware_cost
from .front import OBJECTIVE_FIELDS, minimized, non_dominated, write_front
from .grid import GRID_FILE, measure_grid, write_grid
from .pool import make_pool
from .space import Design, Gene, Space, load_space

SETTINGS_FILE = "codesign.json"
CANDIDATES_FILE = "candidates.jsonl"
STATE_FILE = "state.pkl"
AREA_FILE = "area.json"
POINTS_FILE = "points.json"
INVALID = 1.0e12  # objective value of a design that cannot be built (its constraint rules it out)


@dataclass
class CodesignConfig:
    space: str
    checkpoint: str
    out: str
    data: str | None = None
    workers: int | None = None
    ray_address: str | None = None
    cpus_per_worker: int | None = None
    progress: bool = True
    grid_seconds: float = 0.0  # then the uniform grid for this long (hwq.codesign.grid)


@contextmanager
def own_random_state(holder: dict) -> Iterator[None]:
    """pymoo draws from numpy's and Python's global generators; NSGA-II gets its own saved
    state of both, so nothing else the process does (a library seeding numpy) moves it,
    and a resumed run draws what the uninterrupted one drew."""
    outside = (np.random.get_state(), random.getstate())
    if "numpy" in holder:
        np.random.set_state(holder["numpy"])
        random.setstate(holder["python"])
    try:
        yield
    finally:
        holder["numpy"], holder["python"] = np.random.get_state(), random.getstate()
        np.random.set_state(outside[0])
        random.setstate(outside[1])


def make_algorithm(space: Space, initial: np.ndarray):  # noqa: ANN201 - a pymoo NSGA2
    """NSGA-II on integer genes: pymoo's recipe for integer variables (SBX and polynomial
    mutation on the real line, rounded back), from the `initial` genomes."""
    from pymoo.algorithms.moo.nsga2 import NSGA2
    from pymoo.operators.crossover.sbx import SBX
    from pymoo.operators.mutation.pm import PM
    from pymoo.operators.repair.rounding import RoundingRepair

    return NSGA2(
        pop_size=space.search["population"],
        sampling=initial.astype(np.float64),
        crossover=SBX(prob=0.9, eta=15, vtype=float, repair=RoundingRepair()),
        mutation=PM(eta=20, vtype=float, repair=RoundingRepair()),
        eliminate_duplicates=True,
    )


def make_problem(genes: list[Gene], space: Space):  # noqa: ANN201 - a pymoo Problem
    from pymoo.core.problem import Problem

    return Problem(
        n_var=len(genes),
        n_obj=len(space.objectives),
        n_ieq_constr=1 + len(space.constraints),
        xl=np.zeros(len(genes)),
        xu=np.array([len(g.choices) - 1 for g in genes], dtype=float),
        vtype=int,
    )


def constraint_values(space: Space, valid: bool, cost: HardwareCost | None, accuracy: float) -> list[float]:
    """pymoo's G <= 0: buildable, then each constraint as its relative excess."""
    values = [-1.0 if valid else 1.0]
    measured = {
        "max_area_um2": cost.area_um2 if cost else INVALID,
        "max_energy_uj": cost.energy_uj if cost else INVALID,
        "max_cycles": cost.cycles if cost else INVALID,
    }
    for name, limit in space.constraints.items():
        if name == "min_accuracy":
            values.append((limit - accuracy) / limit)
        else:
            values.append((measured[name] - limit) / limit)
    return values


def meets_constraints(space: Space, cost: HardwareCost, accuracy: float) -> bool:
    """A buildable design with this cost and accuracy is on the right side of every constraint."""
    return all(v <= 0 for v in constraint_values(space, True, cost, accuracy))


def hardware_violation(space: Space, cost: HardwareCost) -> str | None:
    for name, field in (
        ("max_area_um2", "area_um2"),
        ("max_energy_uj", "energy_uj"),
        ("max_cycles", "cycles"),
    ):
        if name in space.constraints and getattr(cost, field) > space.constraints[name]:
            return f"{field} {getattr(cost, field):.6g} > constraints.{name} {space.constraints[name]:.6g}"
    return None


class Codesign:
    """One co-design run: the space, the genome, the pool, NSGA-II, the run directory."""

    def __init__(self, cfg: CodesignConfig, resume: bool):
        self.cfg = cfg
        self.dir = Path(cfg.out)
        self.space = load_space(cfg.space)
        self.check_directory(resume)
        self.settings = Settings(
            checkpoint=rundir.absolute_checkpoint(cfg.checkpoint),
            data=rundir.absolute_data(cfg.data),
            out=str(self.dir.absolute()),
            per_channel=self.space.per_channel,
            start=self.space.search["start"],
            finetune_evals=self.space.search["finetune_evals"],
            fitness_images=self.space.search["fitness_images"],
            seed=self.space.search["seed"],
            fit_accumulator=self.space.search["fit_accumulator"],
            overflow_penalty=self.space.search["overflow_penalty"],
            weight_range=self.space.weight_range,
        )
        self.reference = prepare(
            self.settings.checkpoint, QuantConfig(8, 8, self.space.per_channel), self.settings.data
        ).program
        self.layers = [op.name for op in self.reference.conv_ops()]
        self.genes = self.space.genes(self.layers)
        if not self.genes:
            raise HwqError(f"{cfg.space}: every choice has one value; there is nothing to search")
        self.area = AreaModel(self.dir / AREA_FILE if resume else None)
        self.costs: dict[Design, tuple[HardwareCost | None, str | None]] = {}
        self.check_constraints_reachable()  # before the directory holds anything
        self.identity = self.record_settings(resume)
        self.area.keep_in(self.dir / AREA_FILE)
        self.rows: dict[str, dict] = {}
        self.first_of: dict[tuple[str, str], dict] = {}  # (phase, numerics_key): its first row
        for row in read_results(self.candidates_path) if resume else []:
            self.keep(row)
        self.pool = make_pool(self.settings, cfg.workers, cfg.ray_address, cfg.cpus_per_worker)

    @property
    def candidates_path(self) -> Path:
        return self.dir / CANDIDATES_FILE

    # ----- the directory -----------------------------------------------------------------

    def check_directory(self, resume: bool) -> None:
        settings = self.dir / SETTINGS_FILE
        if resume and not settings.exists():
            raise HwqError(f"no co-design run to resume in {self.dir}")
        if not resume and self.dir.exists() and any(p.name != LOCK_FILE for p in self.dir.iterdir()):
            raise HwqError(
                f"{self.dir} is not empty; pass --resume to continue its run or choose another --out"
            )

    def record_settings(self, resume: bool) -> str:
        """codesign.json; on resume the space, checkpoint and data must be the run's (by
        content: the checkpoint's and images' digests)."""
        content = {
            "space": self.space.to_json(),
            "layers": self.layers,
            "checkpoint_sha256": rundir.checkpoint_sha256(self.settings.checkpoint),
            "data_sha256": rundir.images_sha256(*self.splits()),
        }
        identity = hashlib.sha256(json.dumps(content, sort_keys=True).encode()).hexdigest()
        path = self.dir / SETTINGS_FILE
        if resume:
            saved = json.loads(path.read_text())
            if saved.get("identity") != identity:
                raise HwqError(
                    f"{self.dir} holds a co-design run of another space, checkpoint or data; "
                    "resume it with the same --space, --checkpoint and --data"
                )
        self.dir.mkdir(parents=True, exist_ok=True)
        write_json(
            path,
            {
                **content,
                "identity": identity,
                "space_file": str(Path(self.cfg.space).absolute()),
                "checkpoint": self.settings.checkpoint,
                "data": self.settings.data,
                "genes": [{"name": g.name, "choices": list(g.choices)} for g in self.genes],
                "hwq_version": __version__,
            },
        )
        return identity

    def splits(self) -> tuple:
        from ..data import load_split

        s = self.settings
        return tuple(load_split(s.data, split, s.val_fraction, s.split_seed) for split in ("train", "val"))

    def check_constraints_reachable(self) -> None:
        """A hardware constraint no design of the space can meet is a mistake in the file:
        found now, from each cost's best case (narrowest widths, smallest array and
        buffers for area; the best array, dataflow and buffers for energy and cycles)."""
        s = self.space
        narrow = dict(
            layer_wbits=tuple(min(s.weight_bits) for _ in self.layers),
            act_bits=min(s.act_bits),
            acc_bits=min(s.acc_bits),
        )
        best: dict[str, float] = {}
        for rows, cols, dataflow, wb, ib, ob, overflow in itertools.product(
            s.rows, s.cols, s.dataflow, s.weight_bytes, s.input_bytes, s.output_bytes, s.overflow
        ):
            design = Design(
                **narrow,
                overflow=overflow,
                rows=rows,
                cols=cols,
                dataflow=dataflow,
                weight_bytes=wb,
                input_bytes=ib,
                output_bytes=ob,
            )
            try:
                accelerator = s.accelerator(design)
            except IRError:
                continue
            cost = hardware_cost(self.reference, design, accelerator, self.area)
            for name, field in (
                ("max_area_um2", "area_um2"),
                ("max_energy_uj", "energy_uj"),
                ("max_cycles", "cycles"),
            ):
                best[name] = min(best.get(name, float("inf")), getattr(cost, field))
        for name, limit in s.constraints.items():
            if name in best and best[name] > limit:
                raise HwqError(
                    f"{self.cfg.space}: constraints.{name} = {limit:g} cannot be met: the best design of "
                    f"the space needs {best[name]:.6g}"
                )

    # ----- state -------------------------------------------------------------------------

    def fresh_state(self) -> dict:
        search = self.space.search
        initial = self.space.uniform_genomes(self.genes, self.layers, search["population"], search["seed"])
        algorithm = make_algorithm(self.space, initial)
        state = {"generation": 0, "random": {}}
        with own_random_state(state["random"]):
            algorithm.setup(
                make_problem(self.genes, self.space),
                termination=("n_gen", self.space.search["generations"]),
                seed=self.space.search["seed"],
                verbose=False,
            )
        state["algorithm"] = algorithm
        return state

    def load_state(self) -> dict:
        path = self.dir / STATE_FILE
        if not path.exists():
            return self.fresh_state()
        try:
            state = pickle.loads(path.read_bytes())
        except (pickle.UnpicklingError, EOFError, AttributeError, ImportError) as exc:
            raise HwqError(
                f"{path} cannot be read ({type(exc).__name__}); the run cannot be resumed"
            ) from None
        if state.get("identity") != self.identity:
            raise HwqError(f"{path} belongs to another co-design run")
        return state

    def save_state(self, state: dict) -> None:
        atomic_write_bytes(self.dir / STATE_FILE, pickle.dumps({**state, "identity": self.identity}))

    # ----- one generation ----------------------------------------------------------------

    def row(self, key: str) -> dict | None:
        return self.rows.get(key)

    def append(self, row: dict) -> None:
        append_rows(self.candidates_path, [row])
        self.keep(row)

    def keep(self, row: dict) -> None:
        self.rows[row["key"]] = row
        self.first_of.setdefault((row["phase"], design_from_json(row["design"]).numerics_key), row)

    def earlier(self, design: Design, phase: str) -> dict | None:
        """A finished row of the same phase whose design computes the same integers (same
        numerics_key): a design NSGA-II proposes again, or one that differs from it only
        in the array, dataflow or buffers, is not paid for again."""
        return self.first_of.get((phase, design.numerics_key))

    def reuse(self, again: dict, generation: int, index: int, phase: str, design: Design) -> None:
        key = row_key(generation, index, phase)
        self.append(
            {
                **again,
                "key": key,
                "generation": generation,
                "index": index,
                "design": design.to_json(),
                "reused": again.get("reused", again["key"]),
            }
        )

    def trained(self, before: int) -> list[tuple[Design, str, float]]:
        rows = sorted(
            (r for r in self.rows.values() if r["phase"] == "finetune" and r["generation"] < before),
            key=lambda r: (r["generation"], r["index"]),
        )
        return [(design_from_json(r["design"]), r["ir"], r["accuracy"]) for r in rows]

    def run_phase(
        self, phase: str, generation: int, work: list[tuple[int, Design, tuple]], bar: tqdm
    ) -> None:
        """Evaluate the candidates of one phase that have no row yet; rows are appended in
        candidate order as results arrive."""
        todo, twins, first = [], [], {}
        for index, design, args in work:
            if row_key(generation, index, phase) in self.rows:
                continue
            again = self.earlier(design, phase)
            if again is not None:
                self.reuse(again, generation, index, phase, design)
            elif design.numerics_key in first:
                twins.append((index, design, first[design.numerics_key]))
            else:
                first[design.numerics_key] = row_key(generation, index, phase)
                todo.append((index, design, args))
        starts = [time.perf_counter()]

        def finished(i: int, result: dict) -> None:
            index, design, _ = todo[i]
            row = {
                "key": row_key(generation, index, phase),
                "generation": generation,
                "index": index,
                "phase": phase,
                "design": design.to_json(),
                **result,
                "seconds": round(time.perf_counter() - starts[-1], 2),
            }
            starts.append(time.perf_counter())
            self.append(row)
            bar.update(1)

        self.pool.map(phase, [(design, *args) for _, design, args in todo], finished)
        for index, design, key in twins:  # same numerics as a candidate of this generation
            self.reuse(self.rows[key], generation, index, phase, design)

    def generation(self, generation: int, genomes: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
        """Objectives (to minimize) and constraints of one generation's genomes."""
        designs = [self.space.decode(self.genes, list(g), self.layers) for g in genomes]
        hardware = [self.cost(d) for d in designs]
        directory = {
            i: str(self.dir / "candidates" / f"g{generation:03d}-{i:03d}") for i in range(len(designs))
        }
        screened = [
            (i, d, (directory[i],))
            for i, (d, (cost, why)) in enumerate(zip(designs, hardware, strict=True))
            if why is None
        ]
        desc = f"generation {generation + 1}/{self.space.search['generations']}"
        with tqdm(
            total=len(screened), desc=desc, unit="design", disable=None if self.cfg.progress else True
        ) as bar:
            self.run_phase("screen", generation, screened, bar)
            tuned = [c for c in screened if self.earlier(c[1], "finetune") is not None]
            fresh = [c for c in screened if c not in tuned]
            chosen = sorted(tuned + self.to_finetune(generation, fresh, hardware), key=lambda c: c[0])
            donors = self.trained(generation)
            bar.total += len(chosen)
            work = [
                (
                    i,
                    d,
                    (
                        directory[i],
                        self.row(row_key(generation, i, "screen"))["ir"],
                        nearest_trained(d, donors),
                    ),
                )
                for i, d, _ in chosen
            ]
            self.run_phase("finetune", generation, work, bar)
        return self.objectives(generation, designs, hardware)

    def cost(self, design: Design) -> tuple[HardwareCost | None, str | None]:
        """The design's hardware cost, or why it is not evaluated further (kept: the front
        costs every hardware variant of every numerics after each generation)."""
        if design not in self.costs:
            try:
                accelerator = self.space.accelerator(design)
            except IRError as exc:
                self.costs[design] = (None, f"cannot be built: {exc}")
            else:
                cost = hardware_cost(self.reference, design, accelerator, self.area)
                self.costs[design] = (cost, hardware_violation(self.space, cost))
        return self.costs[design]

    def to_finetune(self, generation: int, screened: list, hardware: list) -> list:
        """The screened candidates worth CC-EDA: first non-dominated rank on the screened
        objectives, then the more accurate, then the earlier; at most
        search.finetune_per_generation distinct numerics (with every candidate that shares
        one: it is trained once)."""
        from pymoo.util.nds.non_dominated_sorting import NonDominatedSorting

        k = self.space.search["finetune_per_generation"]
        if not screened or k == 0:
            return []
        points = [
            self.point(self.row(row_key(generation, i, "screen")), hardware[i][0]) for i, _, _ in screened
        ]
        fronts = NonDominatedSorting().do(minimized(points, self.space.objectives))
        rank = {i: r for r, front in enumerate(fronts) for i in front}
        order = sorted(range(len(screened)), key=lambda j: (rank[j], -points[j]["accuracy"], screened[j][0]))
        keys = list(dict.fromkeys(screened[j][1].numerics_key for j in order))[:k]
        return [c for c in screened if c[1].numerics_key in keys]

    @staticmethod
    def point(row: dict, cost: HardwareCost) -> dict:
        return {"accuracy": row["accuracy"], **cost.to_json()}

    def final_row(self, generation: int, index: int) -> dict | None:
        return self.row(row_key(generation, index, "finetune")) or self.row(
            row_key(generation, index, "screen")
        )

    def objectives(
        self, generation: int, designs: list[Design], hardware: list
    ) -> tuple[np.ndarray, np.ndarray]:
        f, g = [], []
        for i, (cost, why) in enumerate(hardware):
            row = self.final_row(generation, i) if why is None else None
            accuracy = row["accuracy"] if row else 0.0
            if cost is None:
                f.append([INVALID] * len(self.space.objectives))
            else:
                f.append(
                    list(minimized([{"accuracy": accuracy, **cost.to_json()}], self.space.objectives)[0])
                )
            g.append(constraint_values(self.space, cost is not None, cost, accuracy))
        return np.array(f, dtype=np.float64), np.array(g, dtype=np.float64)

    # ----- the loop ----------------------------------------------------------------------

    def run(self) -> dict:
        from pymoo.core.evaluator import Evaluator
        from pymoo.problems.static import StaticProblem

        drop_truncated_tail(self.candidates_path)
        state = self.load_state()
        algorithm = state["algorithm"]
        start = time.perf_counter()
        while algorithm.has_next():
            with own_random_state(state["random"]):
                population = algorithm.ask()
            genomes = np.rint(population.get("X")).astype(np.int64)
            f, g = self.generation(state["generation"], genomes)
            with own_random_state(state["random"]):
                Evaluator().eval(StaticProblem(algorithm.problem, F=f, G=g), population)
                algorithm.tell(infills=population)
            state["generation"] += 1
            self.save_state(state)
            self.report_generation(state["generation"])
        return self.finish(time.perf_counter() - start)

    def evaluated_points(self) -> list[dict]:
        """Every numerics measured, at its final accuracy (fine-tuned where it was), on every
        array, dataflow and buffer sizes of the space that meet the constraints: accuracy
        is the numerics' (Design.numerics_key) and a cost needs no simulation, so the front
        holds the best hardware for each network, not only the hardware NSGA-II proposed.
        Per numerics, only the variants no other variant beats on the hardware objectives."""
        hardware = tuple(o for o in self.space.objectives if o != "accuracy")
        points = []
        for row in self.measured_numerics():
            variants = []
            for design in self.space.hardware_variants(design_from_json(row["design"])):
                cost, why = self.cost(design)
                if why is None and cost is not None and meets_constraints(self.space, cost, row["accuracy"]):
                    variants.append(front_point(design, row, cost))
            points += non_dominated(variants, hardware) if hardware else variants
        return points

    def measured_numerics(self) -> list[dict]:
        """One row per numerics screened, in the order first screened: its fine-tuning row
        where it has one, else its screen."""
        rows, seen = [], set()
        screens = sorted(
            (r for r in self.rows.values() if r["phase"] == "screen"),
            key=lambda r: (r["generation"], r["index"]),
        )
        for screen in screens:
            design = design_from_json(screen["design"])
            if design.numerics_key not in seen:
                seen.add(design.numerics_key)
                rows.append(self.earlier(design, "finetune") or screen)
        return rows

    def write_points(self, generations: int) -> list[dict]:
        """points.json (every numerics measured so far, on its best hardware) and their front."""
        points = self.evaluated_points()
        write_json(self.dir / POINTS_FILE, {"generations": generations, "points": points})
        return write_front(self.dir, points, self.space.objectives, {"generations": generations})

    def report_generation(self, generation: int) -> None:
        front = self.write_points(generation)
        if self.cfg.progress:
            best = max((p["accuracy"] for p in front), default=0.0)
            print(
                f"generation {generation}: {len(front)} designs on the front, "
                f"best val accuracy {100 * best:.2f} %"
            )

    def finish(self, seconds: float) -> dict:
        front = self.write_points(self.space.search["generations"])
        rows = list(self.rows.values())
        summary = {
            "hwq_version": __version__,
            "objectives": list(self.space.objectives),
            "generations": self.space.search["generations"],
            "candidates": sum(1 for r in rows if r["phase"] == "screen"),
            "finetuned": sum(1 for r in rows if r["phase"] == "finetune"),
            "cc_eda_evaluations": sum(
                r.get("evaluations", 0) for r in rows if r["phase"] == "finetune" and "reused" not in r
            ),
            "front_points": len(front),
            "front": str(self.dir / "front.json"),
            "seconds_this_session": round(seconds, 1),
        }
        write_json(self.dir / "summary.json", summary)
        return summary

    def measure_grid(self, seconds: float) -> dict:
        """The uniform grid beside the front, for `seconds`, into grid.json."""
        start = time.perf_counter()
        points, size = measure_grid(self, seconds, self.space.search["seed"])
        write_grid(self.dir, points, size, round(time.perf_counter() - start, 1), self.space.search["seed"])
        return {"grid_points": len(points), "grid_size": size, "grid": str(self.dir / GRID_FILE)}

    def close(self) -> None:
        self.pool.close()


def row_key(generation: int, index: int, phase: str) -> str:
    return f"g{generation:03d}-{index:03d}-{phase}"


def design_from_json(d: dict) -> Design:
    return Design(**{**d, "layer_wbits": tuple(d["layer_wbits"])})


def front_point(design: Design, row: dict, cost: HardwareCost) -> dict:
    return {
        "name": design.name,
        "generation": row["generation"],
        "index": row["index"],
        "accuracy": row["accuracy"],
        "correct": row["correct"],
        "images": row["images"],
        "finetuned": row["phase"] == "finetune",
        **{k: v for k, v in cost.to_json().items()},
        **{k: v for k, v in design.to_json().items()},
        "ir": row["ir"],
    }


def codesign(cfg: CodesignConfig, resume: bool = False) -> dict:
    """Run (or continue) a co-design run; returns its summary."""
    import torch

    torch.set_grad_enabled(False)
    with DirectoryLock(cfg.out):
        run = Codesign(cfg, resume)
        try:
            summary = run.run()
            if cfg.grid_seconds > 0:
                summary = {**summary, **run.measure_grid(cfg.grid_seconds)}
            return summary
        except KeyboardInterrupt:
            raise KeyboardInterrupt(
                f"run incomplete: finished candidates are kept; continue it with: hwq codesign --space "
                f"{shlex.quote(cfg.space)} --checkpoint {shlex.quote(cfg.checkpoint)} --out "
                f"{shlex.quote(str(Path(cfg.out).absolute()))} --resume"
            ) from None
        finally:
            run.close()


__all__ = ["CodesignConfig", "codesign", "OBJECTIVE_FIELDS"]
