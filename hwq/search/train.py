"""`hwq train`: a resumable CC-EDA run whose every fitness comes from the integer datapath.

A run directory holds `config.json` (what defines the run), `log.jsonl` (one line per
generation), `state.npz` (the full search state, written atomically every few
generations), `initial.ir` (round-to-nearest), and at the end `final.ir` and
`summary.json`. `--resume` continues from `state.npz` exactly: the same generations,
candidates and weights as a run that was never interrupted. One process at a time owns
the directory (hwq.outdir.DirectoryLock); Ctrl-C or SIGTERM stops the run at the end of
its generation, saves it and raises KeyboardInterrupt saying how to continue it.
"""

from __future__ import annotations

import dataclasses
import functools
import json
import shlex
import signal
import threading
import time
import uuid
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
import torch
from tqdm import tqdm

from accel_sim.ir import MAX_MULT_BITS, WEIGHT, Accumulator, ParamKey, Program, program_digest, save_program

from .. import HwqError, __version__
from ..data import load_split
from ..flags import accumulator_fit
from ..outdir import DirectoryLock
from ..quant.evaluate import prepare
from ..quant.lower import weight_positions
from ..quant.model import QuantConfig, file_sha256, float64_copy
from ..results import write_json
from . import FITNESS_MODES, rundir
from .cceda import CCEDA, EDAConfig
from .confirm import Confirmation
from .distributed import require_ray, validate_settings
from .evaluator import (
    BrevitasEvaluator,
    Evaluator,
    IntegerFitness,
    SimEvaluator,
    Targets,
    integer_logits,
)
from .heldout import float_logits, held_out_figures
from .rundir import CONFIG_FILE, LOG_FILE, STATE_FILE
from .schedule import BatchSchedule
from .space import SEARCHABLE, program_space
from .start import POSITIONS_FROM_CHECKPOINT, init_digest, start_from
from .state import check_identity, read_state, write_state

TARGETS = ("accel_sim", "brevitas")
DEFAULT_CONFIRM_IMAGES = 1024
HELD_OUT = ("val_accuracy", "val_agreement", "val_logit_l1")
STOP_SIGNALS = (signal.SIGINT, signal.SIGTERM)
AT_LEAST_ONE = ("fitness_images", "new_batch_every", "eval_every", "checkpoint_every", "calibration_images")
RUN_DEFINING = (
    "checkpoint",
    "data",
    "wbits",
    "abits",
    "per_channel",
    "first_wbits",
    "last_wbits",
    "layer_wbits",
    "weight_range",
    "target",
    "accumulator_bits",
    "overflow",
    "mult_bits",
    "seed",
    "radius",
    "max_radius",
    "eda",
    "fitness",
    "margin_clip",
    "overflow_penalty",
    "fitness_images",
    "new_batch_every",
    "grow_batch",
    "grow_window",
    "grow_below",
    "max_fitness_images",
    "confirm_images",
    "val_fraction",
    "split_seed",
    "calibration_images",
    "fit_accumulator",
    "layers",
    "search",
    "init_ir",
    "init_ir_sha256",
)


@dataclass
class TrainConfig:
    """Everything that defines a run; docs/training.md explains each default."""

    checkpoint: str
    out: str
    wbits: int
    abits: int
    data: str | None = None
    per_channel: bool = False
    first_wbits: int | None = None
    last_wbits: int | None = None
    layer_wbits: tuple[int, ...] | None = None  # every weight layer's width (hwq codesign)
    weight_range: str = "narrow"  # Brevitas' narrow_range: the levels a weight may take
    target: str = "accel_sim"
    accumulator_bits: int = 32
    overflow: str = "wrap"
    mult_bits: int = 16
    hw: str | None = None  # the accelerator TOML the widths and accumulator came from
    seed: int = 0
    budget_evals: int | None = None
    budget_minutes: float | None = None
    radius: int = 1
    max_radius: int = 2  # how far --widen-after may widen a flat weight's radius
    eda: EDAConfig = field(default_factory=EDAConfig)
    fitness: str = "distill"
    margin_clip: float = 4.0
    overflow_penalty: int = 0  # fitness points per overflowed accumulator output on the batch
    fitness_images: int = 256
    new_batch_every: int = 16
    grow_batch: bool = False
    grow_window: int = 4
    grow_below: float = 0.5
    max_fitness_images: int | None = None  # None: the whole training split
    confirm_images: int | None = None  # a winner must also win on this many fresh images (0: off;
    # None: DEFAULT_CONFIRM_IMAGES from an --init-ir, off from round-to-nearest)
    patience_evals: int | None = None
    eval_every: int = 25
    checkpoint_every: int = 10
    val_fraction: float = 0.2
    split_seed: int = 0
    calibration_images: int = 512
    fit_accumulator: float | None = None  # quantile of measured sums fitted to the accumulator
    layers: tuple[str, ...] | None = None
    search: tuple[str, ...] = ("weights",)  # hwq.search.space.SEARCHABLE: weights, bias, mult
    init_ir: str | None = None  # start from this integer program instead of round-to-nearest
    init_ir_sha256: str | None = None  # its digest, recorded when the run starts
    device: str = "cpu"
    compile: bool = False
    workers: int | None = None  # Ray actors the fitness is spread over (None: in process)
    ray_address: str | None = None  # an existing Ray cluster (None: a local Ray)
    cpus_per_worker: int | None = None
    progress: bool = True

    def quant(self) -> QuantConfig:
        return QuantConfig.of(self)

    def accumulator(self) -> Accumulator:
        return Accumulator(self.accumulator_bits, self.overflow)

    def validate(self) -> None:
        self.quant().validate()
        self.accumulator().validate()
        self.eda.validate()
        if self.target not in TARGETS:
            raise HwqError(f"--target must be one of {TARGETS}")
        if self.fitness not in FITNESS_MODES:
            raise HwqError(f"--fitness must be one of {FITNESS_MODES}")
        if (self.budget_evals is None) == (self.budget_minutes is None):
            raise HwqError("give exactly one of --budget-evals or --budget-minutes")
        if (self.budget_evals is not None and self.budget_evals <= 0) or (
            self.budget_minutes is not None and not self.budget_minutes > 0
        ):
            raise HwqError("the budget (--budget-evals or --budget-minutes) must be positive")
        if not 2 <= self.mult_bits <= MAX_MULT_BITS:
            raise HwqError(f"--mult-bits {self.mult_bits} is out of range [2, {MAX_MULT_BITS}]")
        if self.seed < 0 or self.split_seed < 0:
            raise HwqError("--seed and --split-seed must be non-negative")
        for name in (*AT_LEAST_ONE, "grow_window"):
            if getattr(self, name) < 1:
                raise HwqError(f"--{name.replace('_', '-')} must be at least 1")
        if self.margin_clip <= 0:
            raise HwqError("--margin-clip must be positive")
        IntegerFitness(self.fitness, 1, self.overflow_penalty)  # refuses a penalty it cannot apply
        if self.overflow_penalty and self.target == "brevitas":
            raise HwqError("--overflow-penalty needs --target accel_sim (Brevitas has no accumulator)")
        validate_settings(self.workers, self.ray_address, self.cpus_per_worker, self.target)
        if self.workers is not None:
            require_ray()
        if not self.search or set(self.search) - set(SEARCHABLE):
            raise HwqError(f"--search must name some of {', '.join(SEARCHABLE)}")
        if self.target == "brevitas" and self.search != ("weights",):
            raise HwqError("--target brevitas searches weights only; --search bias or mult needs accel_sim")
        if self.patience_evals is not None and self.patience_evals < 1:
            raise HwqError("--patience-evals must be at least 1")
        if self.confirm_images is not None and self.confirm_images < 0:
            raise HwqError("--confirm-images must be non-negative")
        if self.confirm_images and self.target == "brevitas":
            raise HwqError("--confirm-images needs --target accel_sim")
        if self.eda.widen_after and self.max_radius <= self.radius:
            raise HwqError(f"--widen-after needs a --max-radius above --radius {self.radius}")

    def to_json(self) -> dict:
        return json.loads(json.dumps(dataclasses.asdict(self)))

    def defining(self) -> dict:
        d = self.to_json()
        return {k: d[k] for k in RUN_DEFINING}

    @classmethod
    def from_json(cls, d: dict) -> TrainConfig:
        known = {f.name for f in dataclasses.fields(cls)}
        values = {k: v for k, v in d.items() if k in known}
        try:
            values["eda"] = EDAConfig(**values.get("eda", {}))
            if values.get("layers") is not None:
                values["layers"] = tuple(values["layers"])
            if "search" in values:
                values["search"] = tuple(values["search"])
            if values.get("layer_wbits") is not None:
                values["layer_wbits"] = tuple(values["layer_wbits"])
            values.setdefault("confirm_images", 0)  # a run saved before --confirm-images existed
            return cls(**values)
        except TypeError as exc:
            raise HwqError(f"not the configuration of an hwq train run ({exc})") from None

    def with_absolute_paths(self) -> TrainConfig:
        """Checkpoint and data as absolute paths, so the run resumes from any directory."""
        return dataclasses.replace(
            self,
            checkpoint=rundir.absolute_checkpoint(self.checkpoint),
            data=rundir.absolute_data(self.data),
            init_ir=None if self.init_ir is None else str(Path(self.init_ir).absolute()),
        )


class _Run:
    """One training run: the search, its evaluator, its data, its files."""

    def __init__(self, cfg: TrainConfig, resume: bool):
        cfg.validate()
        self.cfg = cfg = with_init_digest(cfg.with_absolute_paths())
        self.dir = Path(cfg.out)
        saved = self.check_run_dir(resume)
        self.train = load_split(cfg.data, "train", cfg.val_fraction, cfg.split_seed)
        self.val = load_split(cfg.data, "val", cfg.val_fraction, cfg.split_seed)
        self.cfg = cfg = with_confirmation_default(self.cfg, len(self.train))
        self.identify(saved)
        self.saved_state = self.read_saved_state() if saved else None
        if cfg.fitness_images + cfg.confirm_images > len(self.train):
            raise HwqError(
                f"--fitness-images {cfg.fitness_images} and --confirm-images {cfg.confirm_images} "
                f"exceed the {len(self.train)} training images"
            )
        prepared = prepare(
            cfg.checkpoint,
            cfg.quant(),
            cfg.data,
            cfg.calibration_images,
            cfg.val_fraction,
            cfg.split_seed,
            cfg.accumulator(),
            cfg.mult_bits,
            accumulator_fit(cfg.fit_accumulator, cfg.accumulator()),
        )
        self.float_model = float64_copy(prepared.float_model)
        fitness_pool = len(self.train) - cfg.confirm_images
        if cfg.max_fitness_images is not None and cfg.max_fitness_images > fitness_pool:
            raise HwqError(
                f"--max-fitness-images {cfg.max_fitness_images} exceeds the {fitness_pool} training images "
                f"left beside --confirm-images"
            )
        self.schedule = batch_schedule(cfg, fitness_pool)
        self.period_start = np.empty(0, dtype=np.int64)  # the best solution at the last batch draw
        self.period_fitness = 0  # and its fitness on that batch
        self.val_reference = np.empty((0, 0))
        with torch.no_grad():
            positions = weight_positions(prepared.qmodel, prepared.program)
        self.initial, positions, self.start = starting_point(cfg, prepared.program, positions)
        self.identity["initial_ir_sha256"] = program_digest(self.initial)
        if saved:
            check_identity(self.dir / STATE_FILE, self.saved_identity, self.identity)
        self.space = program_space(
            self.initial,
            cfg.layers,
            cfg.search,
            cfg.radius,
            cfg.max_radius if cfg.eda.widen_after else cfg.radius,
            positions,
            cfg.quant().narrow_weights,
        )
        self.search = CCEDA(self.space, cfg.eda, cfg.seed)
        self.fitness = IntegerFitness(
            cfg.fitness, logit_lsbs(self.initial, cfg.margin_clip), cfg.overflow_penalty
        )
        make = functools.partial(SimEvaluator, self.initial, self.fitness, cfg.device, cfg.compile)
        self.evaluator: Evaluator
        if cfg.target == "brevitas":
            self.evaluator = BrevitasEvaluator(prepared.qmodel, self.initial, self.fitness)
        else:
            self.evaluator = make() if cfg.workers is None else self.ray_evaluator(make)
        self.confirmation = Confirmation(make()) if cfg.confirm_images else None
        self.batch_rng = np.random.default_rng([cfg.seed, 1])
        self.batch = np.empty(0, dtype=np.int64)
        self.targets = Targets(torch.empty(0, dtype=torch.int64))
        self.elapsed = 0.0
        self.history: list[dict] = []
        self.best_val: dict | None = None
        self.stopped_by: str | None = None

    def check_run_dir(self, resume: bool) -> dict | None:
        """The saved configuration when resuming (whose settings must be this run's)."""
        if not resume:
            rundir.check_new_run_dir(self.dir)
            return None
        saved = rundir.read_run_config(self.dir)
        if self.cfg.confirm_images is None:  # not given: the run's own
            self.cfg = dataclasses.replace(self.cfg, confirm_images=saved.get("confirm_images", 0))
        rundir.check_same_settings(saved, self.cfg.defining())
        rundir.check_inputs_exist(self.cfg.to_json())
        return saved

    def identify(self, saved: dict | None) -> None:
        """What names this run in its state file: its id, and digests of its settings with
        the checkpoint and images by content; on resume these must be the saved run's."""
        self.checkpoint_sha256 = rundir.checkpoint_sha256(self.cfg.checkpoint)
        self.data_sha256 = rundir.images_sha256(self.train, self.val)
        if saved:
            rundir.check_same_content(saved, self.cfg.to_json(), self.checkpoint_sha256, self.data_sha256)
        self.run_id = saved["run_id"] if saved else uuid.uuid4().hex
        digest = rundir.config_sha256(self.cfg.defining(), self.checkpoint_sha256, self.data_sha256)
        self.identity = {"run_id": self.run_id, "config_sha256": digest}

    def read_saved_state(self) -> dict:
        """The state to resume, refused now (before the setup's work) if another run's; its
        initial program is checked once lowered."""
        state, self.saved_identity = read_state(self.dir / STATE_FILE)
        check_identity(self.dir / STATE_FILE, self.saved_identity, self.identity)
        return state

    def ray_evaluator(self, make: functools.partial[SimEvaluator]) -> Evaluator:
        from .distributed import RayEvaluator

        gpus = 0 if self.cfg.device == "cpu" else 1
        return RayEvaluator(
            make, self.fitness, self.cfg.workers, self.cfg.ray_address, self.cfg.cpus_per_worker, gpus
        )

    def close(self) -> None:
        """Release what the evaluator holds (a distributed one: its Ray actors, and Ray if it
        started it)."""
        self.evaluator.close()

    @property
    def evaluations(self) -> int:
        """Fitness evaluations of both batches: what budgets and patience count."""
        return self.evaluator.evaluations + (
            self.confirmation.evaluator.evaluations if self.confirmation else 0
        )

    @property
    def macs(self) -> int:
        return self.evaluator.macs + (self.confirmation.evaluator.macs if self.confirmation else 0)

    # ----- state -------------------------------------------------------------------------

    def new_batch(self) -> None:
        """Draw the fitness batch and, with --confirm-images, a disjoint confirmation batch."""
        confirm = self.cfg.confirm_images
        drawn = self.batch_rng.choice(len(self.train), self.schedule.size + confirm, replace=False)
        self.batch = np.sort(drawn[: self.schedule.size])
        self.set_batch()
        self.search.best_fitness = self.evaluator.set_solution(self.best_params())
        if self.confirmation is not None:
            self.set_confirmation_batch(np.sort(drawn[self.schedule.size :]))

    def set_confirmation_batch(self, batch: np.ndarray, teacher: torch.Tensor | None = None) -> None:
        assert self.confirmation is not None
        self.confirmation.set_batch(
            batch, self.train.images[batch], self.targets_of(batch, teacher), self.best_params()
        )

    def next_batch(self) -> dict:
        """Draw the next fitness batch (grown, if the schedule says so). While the batch may
        still grow, the best solution of the last draw is scored on the new batch too (one
        evaluation), to measure how much of the last batch's gain held on new images."""
        self.schedule.grow()
        measure = self.schedule.grows
        batch_gain, last_size = self.search.best_fitness - self.period_fitness, len(self.batch)
        self.new_batch()
        entry = {}
        if measure:
            fresh_gain = self.search.best_fitness - self.fitness_of(self.period_start)
            self.schedule.observe(batch_gain / last_size, fresh_gain / len(self.batch))
            entry = {"batch_gain": int(batch_gain), "fresh_gain": int(fresh_gain)}
        self.start_period()
        return entry

    def start_period(self) -> None:
        self.period_start, self.period_fitness = self.search.best.copy(), int(self.search.best_fitness)

    def fitness_of(self, categories: np.ndarray) -> int:
        """Fitness on the current batch of another solution (an evaluation of its layers
        that differ from the best solution)."""
        if np.array_equal(categories, self.search.best):
            return int(self.search.best_fitness)
        theirs = self.space.unflatten(self.space.values(categories))
        ours = self.best_params()
        differ = {n: w[None] for n, w in theirs.items() if not np.array_equal(w, ours[n])}
        return int(self.evaluator.evaluate(differ)[0])

    def set_batch(self, teacher: torch.Tensor | None = None) -> None:
        """Hand the evaluator the drawn images with their targets."""
        self.targets = self.targets_of(self.batch, teacher)
        self.evaluator.set_batch(self.train.images[self.batch], self.targets)

    def targets_of(self, batch: np.ndarray, teacher: torch.Tensor | None) -> Targets:
        """The labels of training images and, for `distill`, the float network's integer
        logits: computed here for a new batch, restored from the state on resume (float
        convolutions may round differently on another machine or thread count, and the
        resumed run must go on exactly)."""
        if teacher is None and self.fitness.needs_teacher:
            scale = self.initial.tensors[self.initial.output].scale
            teacher = integer_logits(self.float_model, self.train.images[batch], scale)
        return Targets(self.train.labels[batch], teacher)

    def best_params(self) -> dict[ParamKey, np.ndarray]:
        return self.space.unflatten(self.search.best_values())

    def best_program(self) -> Program:
        return self.initial.with_params(self.best_params())

    def save_state(self) -> None:
        teacher = self.targets.teacher
        state = {
            "search": self.search.state_dict(),
            "batch_rng": self.batch_rng.bit_generator.state,
            "batch": self.batch,
            "teacher": None if teacher is None else teacher.numpy(),
            "elapsed": self.elapsed,
            "evaluations": self.evaluator.evaluations,
            "macs": self.evaluator.macs,
            "history": self.history,
            "best_val": self.best_val,
            "schedule": self.schedule.state_dict(),
            "period_start": self.period_start,
            "period_fitness": self.period_fitness,
            "val_reference": self.val_reference,
            "confirmation": None if self.confirmation is None else self.confirmation.state_dict(),
        }
        write_state(self.dir / STATE_FILE, state, self.identity)

    def load_state(self, state: dict) -> None:
        path = self.dir / STATE_FILE
        try:
            saved_fitness = state["search"]["best_fitness"]
            self.search.load_state_dict(state["search"])
            self.batch_rng.bit_generator.state = state["batch_rng"]
            self.batch = np.asarray(state["batch"], dtype=np.int64)
            self.elapsed = float(state["elapsed"])
            self.evaluator.evaluations, self.evaluator.macs = int(state["evaluations"]), int(state["macs"])
            self.history = state["history"]
            self.best_val = state["best_val"]
            self.schedule.load_state_dict(state["schedule"])
            self.period_start = np.asarray(state["period_start"], dtype=np.int64)
            self.period_fitness = int(state["period_fitness"])
            self.val_reference = np.asarray(state["val_reference"], dtype=np.float64)
            self.set_batch(saved_teacher(state))
            if self.confirmation is not None:
                self.load_confirmation(state["confirmation"])
        except (KeyError, TypeError, ValueError, IndexError) as exc:
            raise HwqError(f"{path} holds no state this hwq can resume ({type(exc).__name__})") from None
        if self.evaluator.set_solution(self.best_params()) != saved_fitness:
            raise HwqError(f"{path} does not reproduce its own best fitness")
        rundir.truncate_log(self.dir / LOG_FILE, self.search.generation)

    def load_confirmation(self, state: dict) -> None:
        assert self.confirmation is not None
        self.set_confirmation_batch(np.asarray(state["batch"], dtype=np.int64), saved_teacher(state))
        if self.confirmation.best_fitness != int(state["best_fitness"]):
            raise HwqError(
                f"{self.dir / STATE_FILE} does not reproduce its confirmation batch's best fitness"
            )
        self.confirmation.evaluator.evaluations = int(state["evaluations"])
        self.confirmation.evaluator.macs = int(state["macs"])
        self.confirmation.tested, self.confirmation.held = int(state["tested"]), int(state["held"])

    def write_config(self) -> None:
        """config.json: the run's settings with absolute paths, the digests of its checkpoint
        and images, and its id (rewritten on resume: the paths it now runs from)."""
        write_json(
            self.dir / CONFIG_FILE,
            {
                **self.cfg.to_json(),
                "hwq_version": __version__,
                "run_id": self.run_id,
                "checkpoint_sha256": self.checkpoint_sha256,
                "data_sha256": self.data_sha256,
            },
        )

    # ----- loop --------------------------------------------------------------------------

    def budget_left(self) -> bool:
        if self.cfg.budget_evals is not None:
            return self.evaluations < self.cfg.budget_evals
        return self.elapsed < 60 * self.cfg.budget_minutes

    def out_of_patience(self) -> bool:
        """The held-out accuracy has not improved for --patience-evals evaluations."""
        if self.cfg.patience_evals is None or self.best_val is None:
            return False
        return self.evaluations - self.best_val["evaluations"] >= self.cfg.patience_evals

    def stop_reason(self) -> str:
        if self.stopped_by:
            return "interrupted"
        return "patience" if self.out_of_patience() else "budget"

    def log(self, entry: dict) -> None:
        with open(self.dir / LOG_FILE, "a") as f:
            f.write(json.dumps(entry) + "\n")

    def generation(self) -> dict:
        samples = self.search.ask()
        candidates = self.search.candidate_values(samples)
        fitness = self.evaluator.evaluate(candidates)
        improved = self.search.tell(fitness, self.confirmed(candidates))
        if improved:
            changed = {n: self.best_params()[n] for n in candidates}
            self.evaluator.set_solution(changed)
            if self.confirmation is not None:
                self.confirmation.accept(changed)
        return {
            "generation": self.search.generation,
            "layers": sorted({name for name, _ in candidates}),
            "group_size": int(len(self.search.group)),
            "fitness_images": int(len(self.batch)),
            "best_fitness": int(self.search.best_fitness),
            "population_max": int(fitness.max()),
            "population_mean": float(fitness.mean()),
            "improved": improved,
        }

    def confirmed(self, candidates: dict[ParamKey, np.ndarray]) -> Callable[[int], bool] | None:
        """With --confirm-images: whether candidate i also wins on the confirmation batch."""
        if self.confirmation is None:
            return None
        confirmation = self.confirmation
        return lambda i: confirmation.holds({n: v[i : i + 1] for n, v in candidates.items()})

    def run(self) -> dict:
        if self.saved_state is not None:
            self.load_state(self.saved_state)
            self.saved_state = None
            self.write_config()
        else:
            self.write_config()
            (self.dir / LOG_FILE).unlink(missing_ok=True)  # of an attempt that died before its first state
            save_program(self.initial, self.dir / "initial.ir")
            self.val_reference = float_logits(self.float_model, self.val)
            self.new_batch()
            self.start_period()
            self.record({"generation": 0, "best_fitness": int(self.search.best_fitness)}, evaluate=True)
            self.save_state()
        with signal_handler(STOP_SIGNALS, self.request_stop):
            self.loop()
        self.save_state()
        summary = self.finish()
        if self.stopped_by:
            raise KeyboardInterrupt(
                f"run incomplete: stopped by {self.stopped_by} at generation {self.search.generation} "
                f"({self.evaluations} evaluations), state saved; continue it with: "
                f"hwq train --out {shlex.quote(str(self.dir.absolute()))} --resume"
            )
        return summary

    def request_stop(self, signum: int, _frame: object) -> None:
        """The first Ctrl-C or SIGTERM ends the run after its generation; a second one at once."""
        if self.stopped_by:
            raise KeyboardInterrupt
        self.stopped_by = signal.Signals(signum).name

    def loop(self) -> None:
        total = self.cfg.budget_evals or int(60 * self.cfg.budget_minutes)
        done = lambda: self.evaluations if self.cfg.budget_evals else int(self.elapsed)  # noqa: E731
        bar = tqdm(
            total=total,
            initial=done(),
            unit="eval" if self.cfg.budget_evals else "s",
            disable=None if self.cfg.progress else True,
            desc="cc-eda",
        )
        while self.budget_left() and not self.stopped_by and not self.out_of_patience():
            start = time.perf_counter()
            drawn = {}
            if self.search.generation > 0 and self.search.generation % self.cfg.new_batch_every == 0:
                drawn = self.next_batch()
            entry = self.generation() | drawn
            self.elapsed += time.perf_counter() - start
            start = time.perf_counter()
            g = self.search.generation
            self.record(entry, evaluate=g % self.cfg.eval_every == 0)
            if g % self.cfg.checkpoint_every == 0:
                self.save_state()
            self.elapsed += time.perf_counter() - start
            bar.update(done() - bar.n)
            bar.set_postfix(fitness=entry["best_fitness"], val=self.last_val(), refresh=False)
        bar.close()
        if self.out_of_patience() and not self.stopped_by:
            print(
                f"stopped at generation {self.search.generation}: no better held-out accuracy in "
                f"{self.cfg.patience_evals} evaluations (--patience-evals)"
            )

    def record(self, entry: dict, evaluate: bool) -> None:
        entry.update(
            evaluations=self.evaluations,
            macs=self.macs,
            elapsed_s=round(self.elapsed, 3),
            evals_per_s=round(self.evaluations / self.elapsed, 2) if self.elapsed else None,
        )
        if evaluate:
            entry.update(held_out_figures(self.best_program(), self.val, self.val_reference))
            point = {k: entry[k] for k in ("generation", "evaluations", "elapsed_s", *HELD_OUT)}
            self.history.append(point)
            self.keep_if_best_on_val(point)
        self.log(entry)

    def keep_if_best_on_val(self, point: dict) -> None:
        """Model selection on the held-out split: the solution with the highest held-out
        accuracy so far is kept as best_val.ir (the search itself never sees that split)."""
        if self.best_val is not None and point["val_accuracy"] <= self.best_val["val_accuracy"]:
            return
        save_program(self.trained_program(), self.dir / "best_val.ir")
        self.best_val = point

    def last_val(self) -> str:
        return f"{100 * self.history[-1]['val_accuracy']:.2f}%" if self.history else "-"

    def trained_program(self) -> Program:
        """The best solution so far, with where it came from in its metadata."""
        training = {
            "method": "cc-eda",
            "target": self.cfg.target,
            "seed": self.cfg.seed,
            "generations": self.search.generation,
            "evaluations": self.evaluations,
        }
        program = self.best_program()
        return dataclasses.replace(program, meta={**program.meta, "training": training})

    def changed_by_field(self) -> tuple[dict[str, int], dict[str, int]]:
        """Per searched field (weight, bias, mult): how many parameters the best solution
        changed from their start, and how many were searched."""
        moved = self.search.best_values() != self.space.base
        changed: dict[str, int] = {}
        searched: dict[str, int] = {}
        off = self.space.offsets
        for i, block in enumerate(self.space.blocks):
            changed[block.field] = changed.get(block.field, 0) + int(moved[off[i] : off[i + 1]].sum())
            searched[block.field] = searched.get(block.field, 0) + block.size
        return changed, searched

    def confirmation_summary(self) -> dict | None:
        """How many winners were tested on the confirmation batch and how many held."""
        if self.confirmation is None:
            return None
        c = self.confirmation
        return {
            "images": self.cfg.confirm_images,
            "tested": c.tested,
            "held": c.held,
            "evaluations": c.evaluator.evaluations,
        }

    def finish(self) -> dict:
        final = self.trained_program()
        save_program(final, self.dir / "final.ir")
        changed, searched = self.changed_by_field()
        figures = held_out_figures(final, self.val, self.val_reference)
        summary = {
            "initial_val_accuracy": self.history[0]["val_accuracy"],
            **{f"final_{name}": value for name, value in figures.items()},
            "val_images": len(self.val),
            "generations": self.search.generation,
            "evaluations": self.evaluations,
            "elapsed_s": round(self.elapsed, 1),
            "evals_per_s": round(self.evaluations / max(self.elapsed, 1e-9), 2),
            "macs_per_eval": self.macs // max(self.evaluations, 1),
            "weights_changed": changed.get(WEIGHT, 0),
            "weights_searched": searched.get(WEIGHT, 0),
            "params_changed": changed,
            "params_searched": searched,
            "confirmation": self.confirmation_summary(),
            "weights_widened": int((self.search.radius > self.space.radius).sum()),
            "final_ir": str(self.dir / "final.ir"),
            "final_ir_sha256": file_sha256(self.dir / "final.ir"),  # of the bytes written: sha256sum agrees
            "best_val": {**self.best_val, "ir": str(self.dir / "best_val.ir")} if self.best_val else None,
            "stopped": self.stop_reason(),
            "complete": self.stop_reason() != "interrupted",
            "start": self.start,
        }
        write_json(self.dir / "summary.json", summary)
        return summary


def with_init_digest(cfg: TrainConfig) -> TrainConfig:
    """The config with the digest of its --init-ir, which must not change across resumes."""
    if cfg.init_ir is None:
        return cfg
    digest = init_digest(cfg.init_ir)
    if cfg.init_ir_sha256 not in (None, digest):
        raise HwqError(
            f"--init-ir {cfg.init_ir} changed since the run started (its sha256 was {cfg.init_ir_sha256})"
        )
    return dataclasses.replace(cfg, init_ir_sha256=digest)


def with_confirmation_default(cfg: TrainConfig, train_images: int) -> TrainConfig:
    """--confirm-images when not given: on for a run that fine-tunes an --init-ir (up to
    DEFAULT_CONFIRM_IMAGES, what the training split leaves beside the fitness batch), where
    most of a batch's winners do not hold on fresh images; off from round-to-nearest, where
    most do and the test only costs time (docs/training.md, Measured)."""
    if cfg.confirm_images is not None:
        return cfg
    fine_tuning = cfg.init_ir is not None and cfg.target == "accel_sim"
    images = min(DEFAULT_CONFIRM_IMAGES, train_images - cfg.fitness_images) if fine_tuning else 0
    return dataclasses.replace(cfg, confirm_images=max(images, 0))


def starting_point(
    cfg: TrainConfig, lowered: Program, positions: dict[str, np.ndarray]
) -> tuple[Program, dict[str, np.ndarray], dict]:
    """The initial program, the float positions of its weights, and a record of both:
    round-to-nearest (the lowering itself), or --init-ir checked against it."""
    if cfg.init_ir is None:
        return lowered, positions, {"init_ir": None, "positions": POSITIONS_FROM_CHECKPOINT}
    what = f"{cfg.checkpoint} at W{cfg.wbits}A{cfg.abits}{' per-channel' if cfg.per_channel else ''}"
    start = start_from(cfg.init_ir, lowered, positions, what, cfg.quant().narrow_weights)
    if cfg.target == "brevitas" and start.source != POSITIONS_FROM_CHECKPOINT:
        raise HwqError(
            f"--target brevitas writes integers into the Brevitas layers at the lowering's scales, but "
            f"--init-ir {cfg.init_ir} requantizes differently; use --target accel_sim"
        )
    record = {
        "init_ir": cfg.init_ir,
        "init_ir_sha256": cfg.init_ir_sha256,
        "positions": start.source,
        "positions_clipped": start.clipped,
    }
    return start.program, start.positions, record


def batch_schedule(cfg: TrainConfig, train_images: int) -> BatchSchedule:
    """Fixed at --fitness-images, or with --grow-batch doubling up to --max-fitness-images."""
    if not cfg.grow_batch:
        return BatchSchedule(cfg.fitness_images, cfg.fitness_images)
    cap = cfg.max_fitness_images or train_images
    return BatchSchedule(cfg.fitness_images, cap, cfg.grow_window, cfg.grow_below)


def saved_teacher(state: dict) -> torch.Tensor | None:
    return None if state["teacher"] is None else torch.from_numpy(state["teacher"])


def logit_lsbs(program: Program, real: float) -> int:
    """A margin given in real logit units, in LSBs of the program's integer logits."""
    return max(1, round(real / program.tensors[program.output].scale))


@contextmanager
def signal_handler(signals: tuple[signal.Signals, ...], handler: Callable) -> Iterator[None]:
    """`handler` for `signals` within the block (only the main thread may set handlers;
    elsewhere the block runs with the process's own)."""
    if threading.current_thread() is not threading.main_thread():
        yield
        return
    previous = {s: signal.signal(s, handler) for s in signals}
    try:
        yield
    finally:
        for s, h in previous.items():
            signal.signal(s, h)


def interrupt(*_: object) -> None:
    raise KeyboardInterrupt


def train(cfg: TrainConfig, resume: bool = False) -> dict:
    """Run (or continue) a training run; returns the summary written to summary.json.

    The run directory is owned by this call (a second run there is refused). Stopped by
    Ctrl-C or SIGTERM, the run saves its state and summary and raises KeyboardInterrupt,
    whose message says how to continue it."""
    torch.set_grad_enabled(False)
    with signal_handler((signal.SIGTERM,), interrupt), DirectoryLock(cfg.out):
        run = _Run(cfg, resume)
        try:
            return run.run()
        finally:
            run.close()
