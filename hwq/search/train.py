"""`hwq train`: a resumable CC-EDA run whose every fitness comes from the integer datapath.

A run directory holds `config.json` (what defines the run), `log.jsonl` (one line per
generation), `state.pkl` (the full search state, written atomically every few
generations), `initial.ir` (round-to-nearest), and at the end `final.ir` and
`summary.json`. `--resume` continues from `state.pkl` exactly: the same generations,
candidates and weights as a run that was never interrupted.
"""

from __future__ import annotations

import dataclasses
import json
import pickle
import signal
import time
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
import torch
from tqdm import tqdm

from accel_sim.ir import Accumulator, Program, atomic_write_bytes, save_program

from .. import HwqError, __version__
from ..data import load_split
from ..quant.evaluate import evaluate_program, prepare
from ..quant.lower import weight_positions
from ..quant.model import QuantConfig
from ..results import write_json
from . import FITNESS_MODES
from .cceda import CCEDA, EDAConfig, SearchSpace
from .evaluator import (
    BrevitasEvaluator,
    Evaluator,
    IntegerFitness,
    SimEvaluator,
    Targets,
    integer_logits,
)
from .start import POSITIONS_FROM_CHECKPOINT, init_digest, start_from

TARGETS = ("accel_sim", "brevitas")
STATE_FILE = "state.pkl"
RUN_DEFINING = (
    "checkpoint",
    "data",
    "wbits",
    "abits",
    "per_channel",
    "first_wbits",
    "last_wbits",
    "target",
    "accumulator_bits",
    "overflow",
    "mult_bits",
    "seed",
    "radius",
    "eda",
    "fitness",
    "margin_clip",
    "fitness_images",
    "new_batch_every",
    "val_fraction",
    "split_seed",
    "calibration_images",
    "layers",
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
    target: str = "accel_sim"
    accumulator_bits: int = 32
    overflow: str = "wrap"
    mult_bits: int = 16
    hw: str | None = None  # the accelerator TOML the widths and accumulator came from
    seed: int = 0
    budget_evals: int | None = None
    budget_minutes: float | None = None
    radius: int = 1
    eda: EDAConfig = field(default_factory=EDAConfig)
    fitness: str = "distill"
    margin_clip: float = 4.0
    fitness_images: int = 256
    new_batch_every: int = 16
    eval_every: int = 25
    checkpoint_every: int = 10
    val_fraction: float = 0.2
    split_seed: int = 0
    calibration_images: int = 512
    layers: tuple[str, ...] | None = None
    init_ir: str | None = None  # start from this integer program instead of round-to-nearest
    init_ir_sha256: str | None = None  # its digest, recorded when the run starts
    device: str = "cpu"
    compile: bool = False
    progress: bool = True

    def quant(self) -> QuantConfig:
        return QuantConfig(self.wbits, self.abits, self.per_channel, self.first_wbits, self.last_wbits)

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
        if (self.budget_evals or 1) <= 0 or (self.budget_minutes or 1) <= 0:
            raise HwqError("the budget must be positive")
        for name in ("fitness_images", "new_batch_every", "eval_every", "checkpoint_every"):
            if getattr(self, name) < 1:
                raise HwqError(f"--{name.replace('_', '-')} must be at least 1")
        if self.margin_clip <= 0:
            raise HwqError("--margin-clip must be positive")

    def to_json(self) -> dict:
        return json.loads(json.dumps(dataclasses.asdict(self)))

    def defining(self) -> dict:
        d = self.to_json()
        return {k: d[k] for k in RUN_DEFINING}

    @classmethod
    def from_json(cls, d: dict) -> TrainConfig:
        known = {f.name for f in dataclasses.fields(cls)}
        values = {k: v for k, v in d.items() if k in known}
        values["eda"] = EDAConfig(**values.get("eda", {}))
        if values.get("layers") is not None:
            values["layers"] = tuple(values["layers"])
        return cls(**values)


class _Run:
    """One training run: the search, its evaluator, its data, its files."""

    def __init__(self, cfg: TrainConfig, resume: bool):
        cfg.validate()
        cfg = with_init_digest(cfg)
        self.cfg = cfg
        self.dir = Path(cfg.out)
        self.check_run_dir(resume)
        prepared = prepare(
            cfg.checkpoint,
            cfg.quant(),
            cfg.data,
            cfg.calibration_images,
            cfg.val_fraction,
            cfg.split_seed,
            cfg.accumulator(),
            cfg.mult_bits,
        )
        self.float_model = prepared.float_model
        self.train = load_split(cfg.data, "train", cfg.val_fraction, cfg.split_seed)
        self.val = load_split(cfg.data, "val", cfg.val_fraction, cfg.split_seed)
        if cfg.fitness_images > len(self.train):
            raise HwqError(
                f"--fitness-images {cfg.fitness_images} exceeds the {len(self.train)} training images"
            )
        with torch.no_grad():
            positions = weight_positions(prepared.qmodel, prepared.program)
        self.initial, positions, self.start = starting_point(cfg, prepared.program, positions)
        self.space = search_space(self.initial, cfg, positions)
        self.search = CCEDA(self.space, cfg.eda, cfg.seed)
        self.fitness = IntegerFitness(cfg.fitness, logit_lsbs(self.initial, cfg.margin_clip))
        self.evaluator: Evaluator
        if cfg.target == "brevitas":
            self.evaluator = BrevitasEvaluator(prepared.qmodel, self.initial, self.fitness)
        else:
            self.evaluator = SimEvaluator(self.initial, self.fitness, cfg.device, cfg.compile)
        self.batch_rng = np.random.default_rng([cfg.seed, 1])
        self.batch = np.empty(0, dtype=np.int64)
        self.targets = Targets(torch.empty(0, dtype=torch.int64))
        self.elapsed = 0.0
        self.history: list[dict] = []
        self.best_val: dict | None = None
        self.stop_requested = False

    def check_run_dir(self, resume: bool) -> None:
        state = self.dir / STATE_FILE
        if resume:
            if not state.exists():
                raise HwqError(f"nothing to resume: {state} does not exist")
            saved = json.loads((self.dir / "config.json").read_text())
            differ = [k for k in RUN_DEFINING if saved.get(k) != self.cfg.defining()[k]]
            if differ:
                raise HwqError(f"--resume with settings that differ from the run's: {', '.join(differ)}")
        elif state.exists():
            raise HwqError(f"{self.dir} already holds a run; pass --resume or choose another --out")

    # ----- state -------------------------------------------------------------------------

    def new_batch(self) -> None:
        self.batch = np.sort(self.batch_rng.choice(len(self.train), self.cfg.fitness_images, replace=False))
        self.set_batch()
        self.search.best_fitness = self.evaluator.set_solution(self.best_weights())

    def set_batch(self, teacher: torch.Tensor | None = None) -> None:
        """Hand the evaluator the drawn images with their labels and, for `distill`, the
        float network's integer logits: computed here for a new batch, restored from the
        state on resume (float convolutions may round differently on another machine or
        thread count, and the resumed run must go on exactly)."""
        images = self.train.images[self.batch]
        if teacher is None and self.fitness.needs_teacher:
            scale = self.initial.tensors[self.initial.output].scale
            teacher = integer_logits(self.float_model, images, scale)
        self.targets = Targets(self.train.labels[self.batch], teacher)
        self.evaluator.set_batch(images, self.targets)

    def best_weights(self) -> dict[str, np.ndarray]:
        return self.space.unflatten(self.search.best_values())

    def best_program(self) -> Program:
        return self.initial.with_weights(self.best_weights())

    def save_state(self) -> None:
        state = {
            "search": self.search.state_dict(),
            "batch_rng": self.batch_rng.bit_generator.state,
            "batch": self.batch,
            "teacher": self.targets.teacher,
            "elapsed": self.elapsed,
            "evaluations": self.evaluator.evaluations,
            "macs": self.evaluator.macs,
            "history": self.history,
            "best_val": self.best_val,
        }
        atomic_write_bytes(self.dir / STATE_FILE, pickle.dumps(state))

    def load_state(self) -> None:
        with open(self.dir / STATE_FILE, "rb") as f:
            state = pickle.load(f)
        saved_fitness = state["search"]["best_fitness"]
        self.search.load_state_dict(state["search"])
        self.batch_rng.bit_generator.state = state["batch_rng"]
        self.batch = state["batch"]
        self.elapsed = state["elapsed"]
        self.evaluator.evaluations, self.evaluator.macs = state["evaluations"], state["macs"]
        self.history = state["history"]
        self.best_val = state.get("best_val")
        self.set_batch(state.get("teacher"))
        if self.evaluator.set_solution(self.best_weights()) != saved_fitness:
            raise HwqError(f"{self.dir / STATE_FILE} does not reproduce its own best fitness")
        self.truncate_log(self.search.generation)

    def truncate_log(self, generation: int) -> None:
        """Drop log lines written after the checkpoint (by a run that was then killed)."""
        path = self.dir / "log.jsonl"
        if path.exists():
            lines = [ln for ln in path.read_text().splitlines() if json.loads(ln)["generation"] <= generation]
            atomic_write_bytes(path, "".join(ln + "\n" for ln in lines).encode())

    # ----- loop --------------------------------------------------------------------------

    def budget_left(self) -> bool:
        if self.cfg.budget_evals is not None:
            return self.evaluator.evaluations < self.cfg.budget_evals
        return self.elapsed < 60 * self.cfg.budget_minutes

    def held_out_accuracy(self) -> float:
        return evaluate_program(self.best_program(), self.val).accuracy

    def log(self, entry: dict) -> None:
        with open(self.dir / "log.jsonl", "a") as f:
            f.write(json.dumps(entry) + "\n")

    def generation(self) -> dict:
        samples = self.search.ask()
        candidates = self.search.candidate_values(samples)
        fitness = self.evaluator.evaluate(candidates)
        improved = self.search.tell(fitness)
        if improved:
            self.evaluator.set_solution({n: self.best_weights()[n] for n in candidates})
        return {
            "generation": self.search.generation,
            "layers": sorted(candidates),
            "group_size": int(len(self.search.group)),
            "best_fitness": int(self.search.best_fitness),
            "population_max": int(fitness.max()),
            "population_mean": float(fitness.mean()),
            "improved": improved,
        }

    def run(self) -> dict:
        self.dir.mkdir(parents=True, exist_ok=True)
        resumed = (self.dir / STATE_FILE).exists()
        if resumed:
            self.load_state()
        else:
            write_json(self.dir / "config.json", {**self.cfg.to_json(), "hwq_version": __version__})
            save_program(self.initial, self.dir / "initial.ir")
            self.new_batch()
            self.record({"generation": 0, "best_fitness": int(self.search.best_fitness)}, evaluate=True)
            self.save_state()
        previous = signal.signal(signal.SIGINT, self.request_stop)
        try:
            self.loop()
        finally:
            signal.signal(signal.SIGINT, previous)
        self.save_state()
        return self.finish()

    def request_stop(self, *_: object) -> None:
        if self.stop_requested:
            raise KeyboardInterrupt
        self.stop_requested = True

    def loop(self) -> None:
        total = self.cfg.budget_evals or int(60 * self.cfg.budget_minutes)
        done = lambda: self.evaluator.evaluations if self.cfg.budget_evals else int(self.elapsed)  # noqa: E731
        bar = tqdm(
            total=total,
            initial=done(),
            unit="eval" if self.cfg.budget_evals else "s",
            disable=None if self.cfg.progress else True,
            desc="cc-eda",
        )
        while self.budget_left() and not self.stop_requested:
            start = time.perf_counter()
            if self.search.generation > 0 and self.search.generation % self.cfg.new_batch_every == 0:
                self.new_batch()
            entry = self.generation()
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
        if self.stop_requested:
            print(f"interrupted at generation {self.search.generation}; continue with --resume")

    def record(self, entry: dict, evaluate: bool) -> None:
        entry.update(
            evaluations=self.evaluator.evaluations,
            macs=self.evaluator.macs,
            elapsed_s=round(self.elapsed, 3),
            evals_per_s=round(self.evaluator.evaluations / self.elapsed, 2) if self.elapsed else None,
        )
        if evaluate:
            entry["val_accuracy"] = self.held_out_accuracy()
            point = {k: entry[k] for k in ("generation", "evaluations", "elapsed_s", "val_accuracy")}
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
            "evaluations": self.evaluator.evaluations,
        }
        program = self.best_program()
        return dataclasses.replace(program, meta={**program.meta, "training": training})

    def finish(self) -> dict:
        final = self.trained_program()
        digest = save_program(final, self.dir / "final.ir")
        changed = int((self.search.best_values() != self.space.base).sum())
        summary = {
            "initial_val_accuracy": self.history[0]["val_accuracy"],
            "final_val_accuracy": evaluate_program(final, self.val).accuracy,
            "val_images": len(self.val),
            "generations": self.search.generation,
            "evaluations": self.evaluator.evaluations,
            "elapsed_s": round(self.elapsed, 1),
            "evals_per_s": round(self.evaluator.evaluations / max(self.elapsed, 1e-9), 2),
            "macs_per_eval": self.evaluator.macs // max(self.evaluator.evaluations, 1),
            "weights_changed": changed,
            "weights_searched": self.space.size,
            "final_ir": str(self.dir / "final.ir"),
            "final_ir_sha256": digest,
            "best_val": {**self.best_val, "ir": str(self.dir / "best_val.ir")} if self.best_val else None,
            "complete": self.budget_left() is False,
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


def starting_point(
    cfg: TrainConfig, lowered: Program, positions: dict[str, np.ndarray]
) -> tuple[Program, dict[str, np.ndarray], dict]:
    """The initial program, the float positions of its weights, and a record of both:
    round-to-nearest (the lowering itself), or --init-ir checked against it."""
    if cfg.init_ir is None:
        return lowered, positions, {"init_ir": None, "positions": POSITIONS_FROM_CHECKPOINT}
    what = f"{cfg.checkpoint} at W{cfg.wbits}A{cfg.abits}{' per-channel' if cfg.per_channel else ''}"
    start = start_from(cfg.init_ir, lowered, positions, what)
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


def search_space(program: Program, cfg: TrainConfig, positions: dict[str, np.ndarray]) -> SearchSpace:
    convs = {op.name: op for op in program.conv_ops()}
    names = cfg.layers or tuple(convs)
    unknown = [n for n in names if n not in convs]
    if unknown:
        raise HwqError(f"--layers names unknown layers {unknown}; the program has {list(convs)}")
    return SearchSpace.from_weights(
        {n: convs[n].weight for n in names},
        {n: convs[n].weight_bits for n in names},
        cfg.radius,
        {n: positions[n] for n in names},
    )


def logit_lsbs(program: Program, real: float) -> int:
    """A margin given in real logit units, in LSBs of the program's integer logits."""
    return max(1, round(real / program.tensors[program.output].scale))


def train(cfg: TrainConfig, resume: bool = False) -> dict:
    """Run (or continue) a training run; returns the summary written to summary.json."""
    torch.set_grad_enabled(False)
    return _Run(cfg, resume).run()
