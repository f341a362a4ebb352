"""Fitness on Ray actors: each generation's work spread over workers, with the in-process result.

Every fitness mode is a sum over the images of the batch (for `accuracy`, of two integers
packed into one), so the batch is cut into image shards, one SimEvaluator per shard in a
Ray actor, and the shards' scores are added back up exactly (`shard_total`). When there are
more workers than shards worth their per-call overhead, workers that share a shard split
the population instead. A worker keeps its shard's cached activations between
generations and receives only what changed: its images once per batch, the changed
layers on `set_solution`, the candidates (as their differences from the context) on
`evaluate`. A worker that dies is replaced and brought back to the current state before
its call is repeated. As in EvoTorch's `Problem(num_actors=...)`, the driver starts a
local Ray unless one is running or an address is given. docs/distributed.md.
"""

from __future__ import annotations

import logging
import math
import os
import pickle
import re
import socket
from collections import Counter
from collections.abc import Callable, Hashable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import torch

from .. import HwqError
from .evaluator import Evaluator, IntegerFitness, Targets

INSTALL_HINT = "pip install 'hwq[distributed]'"
# Shards below this many images spend more on the per-layer overhead of a call than they
# save; extra workers then split the population (bench/bench_scale.py measures both).
MIN_SHARD_IMAGES = 32
# A worker that dies this many times in a row on one call is taken as a problem of the run
# (out of memory on every node, a broken install), not of a machine.
MAX_REPLACEMENTS = 3
ACTOR_START_TIMEOUT_S = 300.0
REACH_TIMEOUT_S = 10.0
# The local Ray's shared-memory object store: a generation moves kilobytes, a batch's
# images a few hundred; Ray's default (30 % of RAM) would reserve gigabytes of /dev/shm.
LOCAL_OBJECT_STORE_BYTES = 256 << 20
ADDRESS = re.compile(r"(?P<client>ray://)?(?P<host>[A-Za-z0-9._-]+|\[[0-9A-Fa-f:.]+\]):(?P<port>\d{1,5})")


def require_ray() -> Any:
    """The ray module, or a one-line error saying how to install it."""
    try:
        import ray
    except ImportError:
        raise HwqError(f"--workers needs Ray, which is not installed: {INSTALL_HINT}") from None
    return ray


def validate_settings(
    workers: int | None, address: str | None, cpus_per_worker: int | None, target: str
) -> None:
    """Check the distributed flags without importing Ray."""
    if workers is None:
        if address is not None or cpus_per_worker is not None:
            raise HwqError("--ray-address and --cpus-per-worker need --workers N")
        return
    if workers < 1:
        raise HwqError(f"--workers must be at least 1, not {workers}")
    if cpus_per_worker is not None and cpus_per_worker < 1:
        raise HwqError(f"--cpus-per-worker must be at least 1, not {cpus_per_worker}")
    if target != "accel_sim":
        raise HwqError(
            "--workers needs --target accel_sim: Brevitas' float convolutions round differently "
            "on other batch sizes, so shards would not add up to the in-process fitness"
        )
    if address is not None and address != "auto":
        match = ADDRESS.fullmatch(address)
        if match is None or not 0 < int(match["port"]) < 65536:
            raise HwqError(f"--ray-address {address!r}: expected auto, host:port or ray://host:port")


def check_reachable(address: str) -> None:
    """Fail at once when nothing listens at host:port (ray.init would retry for minutes)."""
    match = ADDRESS.fullmatch(address)
    assert match is not None, "validate_settings checks the address first"
    host = match["host"].strip("[]")
    try:
        socket.create_connection((host, int(match["port"])), timeout=REACH_TIMEOUT_S).close()
    except OSError as exc:
        raise HwqError(f"no Ray cluster answers at {address}: {exc.strerror or exc}") from None


def code_dirs() -> list[str]:
    """The packages a worker imports, shipped by Ray so that every node runs this driver's code."""
    import accel_sim
    import hwq

    return [str(Path(hwq.__file__).parent), str(Path(accel_sim.__file__).parent)]


def connect(address: str | None, local_cpus: int) -> bool:
    """Join the cluster at `address`, or start a private local Ray when there is none.

    Returns True when this call initialized Ray (its caller shuts it down when done); a Ray
    the process had already initialized (a notebook, a test) is used as it is.
    """
    ray = require_ray()
    if address not in (None, "auto"):
        check_reachable(address)
    if ray.is_initialized():
        return False
    quiet = {"logging_level": logging.WARNING, "log_to_driver": False}
    try:
        if address is None:
            # Ray warns that it enabled token authentication, its safe default, on every start.
            logging.getLogger("ray._private.authentication.authentication_token_setup").setLevel(
                logging.ERROR
            )
            ray.init(
                address="local",
                num_cpus=max(os.cpu_count() or 1, local_cpus),
                object_store_memory=LOCAL_OBJECT_STORE_BYTES,
                include_dashboard=False,
                **quiet,
            )
        else:
            ray.init(address=address, runtime_env={"py_modules": code_dirs()}, **quiet)
    except (ConnectionError, ValueError, RuntimeError) as exc:
        where = f"the Ray cluster at {address}" if address else "a local Ray"
        # Ray enables tokens by itself only for `ray start --head` and local clusters.
        hint = "; a cluster with token authentication needs RAY_AUTH_MODE=token here too" if address else ""
        hint = hint if "RAY_AUTH_MODE" not in os.environ else ""
        raise HwqError(f"cannot start or join {where}: {first_line(exc)}{hint}") from None
    return True


def first_line(exc: BaseException) -> str:
    text = str(exc).strip()
    return text.splitlines()[0] if text else type(exc).__name__


# ----- what travels -------------------------------------------------------------------------


@dataclass(frozen=True)
class Sparse:
    """Arrays of `shape` given as their differences from a context array of the same trailing
    shape: `values` (*leading, len(index)) at the flat positions `index`, in the narrowest
    integer type that holds them. A CC-EDA population changes one group of a layer."""

    shape: tuple[int, ...]
    dtype: np.dtype
    index: np.ndarray
    values: np.ndarray


def narrowest(values: np.ndarray) -> np.ndarray:
    if values.dtype.kind not in "iu" or values.size == 0:
        return values
    lo, hi = int(values.min()), int(values.max())
    for dtype in (np.int8, np.int16, np.int32):
        if np.iinfo(dtype).min <= lo and hi <= np.iinfo(dtype).max:
            return values.astype(dtype)
    return values


def encode(arrays: dict[Hashable, np.ndarray], context: dict[Hashable, np.ndarray]) -> dict[Hashable, Any]:
    """Each array as its difference from the context's array under the same key, where there is one."""
    encoded: dict[Hashable, Any] = {}
    for key, array in arrays.items():
        base = context.get(key)
        if base is None or array.shape[array.ndim - base.ndim :] != base.shape:
            encoded[key] = array
            continue
        flat = array.reshape(-1, base.size)
        index = np.flatnonzero((flat != base.reshape(1, -1)).any(axis=0))
        values = flat[:, index].reshape(*array.shape[: array.ndim - base.ndim], len(index))
        encoded[key] = Sparse(array.shape, array.dtype, index.astype(np.int64), narrowest(values))
    return encoded


def decode(encoded: dict[Hashable, Any], context: dict[Hashable, np.ndarray]) -> dict[Hashable, np.ndarray]:
    arrays = {}
    for key, item in encoded.items():
        if not isinstance(item, Sparse):
            arrays[key] = item
            continue
        base = context[key]
        rows = math.prod(item.shape[: len(item.shape) - base.ndim])
        flat = np.tile(base.reshape(1, -1).astype(item.dtype), (rows, 1))
        flat[:, item.index] = item.values.reshape(rows, -1)
        arrays[key] = flat.reshape(item.shape)
    return arrays


def serialized_bytes(payload: object) -> int:
    """What Ray moves for an argument: its pickle (Ray uses pickle protocol 5 too)."""
    return len(pickle.dumps(payload, protocol=5))


def shard_total(fitness: IntegerFitness, scores: np.ndarray, sizes: list[int]) -> np.ndarray:
    """The whole batch's scores (P,) from the scores (S, P) of S image shards of `sizes` images.

    `distill` and `margin` are sums over images. `accuracy` packs a shard's correct count c
    and offset margin sum m + clip*n (in [0, 2*clip*n]) as c * (2*clip*n + 1) + m + clip*n,
    so each shard's pair is recovered exactly by one integer division and repacked with
    the whole batch's n.
    """
    scores = np.asarray(scores, dtype=np.int64)
    if fitness.mode != "accuracy":
        return scores.sum(axis=0)
    n = np.asarray(sizes, dtype=np.int64)[:, None]
    correct, offset = np.divmod(scores, 2 * fitness.clip * n + 1)
    return correct.sum(axis=0) * (2 * fitness.clip * int(n.sum()) + 1) + offset.sum(axis=0)


def split(length: int, parts: int) -> list[slice]:
    """`parts` contiguous slices of range(length), sizes differing by at most one."""
    bounds = np.linspace(0, length, parts + 1).round().astype(int)
    return [slice(int(a), int(b)) for a, b in zip(bounds[:-1], bounds[1:], strict=True)]


def shard_count(images: int, workers: int, min_images: int) -> int:
    return max(1, min(workers, images // min_images))


# ----- the worker ---------------------------------------------------------------------------


class ShardWorker:
    """A Ray actor: a SimEvaluator on one image shard, with a mirror of the driver's context
    (the solution arrays it was sent) against which the driver's differences are decoded."""

    def __init__(self, make_evaluator: Callable[[], Evaluator]):
        import ray

        cpus = ray.get_runtime_context().get_assigned_resources().get("CPU", 1)
        torch.set_num_threads(max(1, int(cpus)))
        torch.set_grad_enabled(False)
        self.evaluator = make_evaluator()
        self.context: dict[Hashable, np.ndarray] = {}

    def pid(self) -> int:
        return os.getpid()

    def set_batch(self, shard: tuple[torch.Tensor, Targets]) -> None:
        self.evaluator.set_batch(*shard)

    def set_solution(self, changes: dict[Hashable, Any]) -> int:
        weights = decode(changes, self.context)
        self.context.update(weights)
        return self.evaluator.set_solution(weights)

    def evaluate(self, candidates: dict[Hashable, Any]) -> tuple[np.ndarray, int]:
        before = self.evaluator.macs
        scores = self.evaluator.evaluate(decode(candidates, self.context))
        return scores, self.evaluator.macs - before


# ----- the driver ---------------------------------------------------------------------------


class RayEvaluator(Evaluator):
    """An Evaluator whose work runs on `workers` Ray actors, each a `make_evaluator()`.

    `make_evaluator` builds the in-process evaluator (picklable: a functools.partial of
    SimEvaluator); its fitness must be a sum over images, described by `fitness`. `sent`
    counts the serialized bytes delivered to the actors per kind of call, `replacements`
    the workers replaced after dying. Call `close()` (or use it as a context manager).
    """

    def __init__(
        self,
        make_evaluator: Callable[[], Evaluator],
        fitness: IntegerFitness,
        workers: int,
        address: str | None = None,
        cpus_per_worker: int | None = None,
        gpus_per_worker: float = 0,
        min_shard_images: int = MIN_SHARD_IMAGES,
    ):
        super().__init__()
        validate_settings(workers, address, cpus_per_worker, "accel_sim")
        self.ray = require_ray()
        self.fitness = fitness
        self.workers = workers
        self.min_shard_images = min_shard_images
        self.sent: Counter[str] = Counter()
        self.replacements = 0
        self.actors: list[Any] = []
        self.context: dict[Hashable, np.ndarray] = {}
        self.shards: list[tuple[Any, int]] = []  # per image shard: (object ref, bytes)
        self.shard_sizes: list[int] = []
        self.shard_of: list[int] = []  # per worker
        if cpus_per_worker is None:
            cpus_per_worker = max(1, (os.cpu_count() or 1) // workers) if address is None else 1
        self.started_ray = connect(address, workers * cpus_per_worker)
        try:
            self.factory = self.ray.put(make_evaluator)
            self.actor_class = self.ray.remote(ShardWorker).options(
                num_cpus=cpus_per_worker, num_gpus=gpus_per_worker, max_restarts=0
            )
            self.actors = [self.actor_class.remote(self.factory) for _ in range(workers)]
            self.wait_for_actors(cpus_per_worker)
        except BaseException:
            self.close()
            raise

    def wait_for_actors(self, cpus_per_worker: int) -> None:
        try:
            self.ray.get([a.pid.remote() for a in self.actors], timeout=ACTOR_START_TIMEOUT_S)
        except self.ray.exceptions.GetTimeoutError:
            cpus = self.ray.cluster_resources().get("CPU", 0)
            raise HwqError(
                f"{self.workers} Ray workers of {cpus_per_worker} CPU(s) each did not start within "
                f"{ACTOR_START_TIMEOUT_S:.0f} s; the cluster has {cpus:g} CPUs"
            ) from None
        except self.ray.exceptions.RayTaskError as exc:
            raise exc.cause from None
        except self.ray.exceptions.RayActorError as exc:  # its constructor failed
            raise HwqError(f"the Ray workers did not start: {first_line(exc)}") from None

    def pids(self) -> list[int]:
        """The worker processes' ids (what a test kills)."""
        return self.ray.get([a.pid.remote() for a in self.actors])

    # ----- the Evaluator interface --------------------------------------------------------

    def set_batch(self, images: torch.Tensor, targets: Targets) -> None:
        n = len(targets.labels)
        parts = split(n, shard_count(n, self.workers, self.min_shard_images))
        self.shards = [self.put(shard_of_batch(images, targets, part)) for part in parts]
        self.shard_sizes = [part.stop - part.start for part in parts]
        self.shard_of = [w % len(parts) for w in range(self.workers)]
        self.call("set_batch", {w: self.shards[s] for w, s in enumerate(self.shard_of)})

    def set_solution(self, weights: dict[Hashable, np.ndarray]) -> int:
        changes = {
            key: np.array(w) for key, w in weights.items() if not np.array_equal(w, self.context.get(key))
        }
        payload = self.put(encode(changes, self.context))
        self.context.update(changes)
        results = self.call("set_solution", dict.fromkeys(range(self.workers), payload))
        per_shard = [[results[self.shard_of.index(s)]] for s in range(len(self.shard_sizes))]
        return int(shard_total(self.fitness, np.array(per_shard), self.shard_sizes)[0])

    def evaluate(self, candidates: dict[Hashable, np.ndarray]) -> np.ndarray:
        population = len(next(iter(candidates.values())))
        parts = self.population_parts(population)
        payloads = {}  # one per distinct share (slices are unhashable before Python 3.12)
        for part in parts.values():
            if (part.start, part.stop) not in payloads:
                share = {k: v[part] for k, v in candidates.items()}
                payloads[part.start, part.stop] = self.put(encode(share, self.context))
        results = self.call("evaluate", {w: payloads[p.start, p.stop] for w, p in parts.items()})
        scores = np.zeros((len(self.shard_sizes), population), dtype=np.int64)
        for w, part in parts.items():
            scores[self.shard_of[w], part] = results[w][0]
        self.evaluations += population
        self.macs += sum(int(macs) for _, macs in results.values())
        return shard_total(self.fitness, scores, self.shard_sizes)

    def population_parts(self, population: int) -> dict[int, slice]:
        """The candidates each worker scores: all of them, or its share among the workers of its shard."""
        parts = {}
        for s in range(len(self.shard_sizes)):
            sharing = [w for w, shard in enumerate(self.shard_of) if shard == s]
            for w, part in zip(sharing, split(population, len(sharing)), strict=True):
                if part.stop > part.start:
                    parts[w] = part
        return parts

    # ----- calls, failures, shutdown ------------------------------------------------------

    def put(self, payload: object) -> tuple[Any, int]:
        return self.ray.put(payload), serialized_bytes(payload)

    def call(self, method: str, payloads: dict[int, tuple[Any, int]]) -> dict[int, Any]:
        """Run `method` on the workers in parallel, each with its payload; replace the dead."""
        pending = {w: getattr(self.actors[w], method).remote(ref) for w, (ref, _) in payloads.items()}
        self.sent[method] += sum(size for _, size in payloads.values())
        return {w: self.result(w, ref, method, payloads[w]) for w, ref in pending.items()}

    def result(self, worker: int, ref: Any, method: str, payload: tuple[Any, int]) -> Any:
        errors = self.ray.exceptions
        for _ in range(MAX_REPLACEMENTS):
            try:
                return self.ray.get(ref)
            except errors.RayTaskError as exc:
                raise exc.cause from None
            except errors.RayActorError:
                self.replace(worker)
                ref = getattr(self.actors[worker], method).remote(payload[0])
                self.sent[method] += payload[1]
        try:
            return self.ray.get(ref)
        except errors.RayActorError as exc:
            raise HwqError(
                f"Ray worker {worker} died {MAX_REPLACEMENTS + 1} times in a row: {first_line(exc)}"
            ) from None

    def replace(self, worker: int) -> None:
        """A new actor in the dead one's place, given its shard and the current solution.

        The calls are queued, not awaited: an actor runs one caller's calls in order, so the
        repeated call that follows sees the restored state, and reports the new actor's death.
        """
        self.kill(self.actors[worker])
        actor = self.actor_class.remote(self.factory)
        self.actors[worker] = actor
        self.replacements += 1
        if self.shards:
            ref, size = self.shards[self.shard_of[worker]]
            actor.set_batch.remote(ref)
            self.sent["restore"] += size
        if self.context:
            ref, size = self.put(encode(self.context, {}))
            actor.set_solution.remote(ref)
            self.sent["restore"] += size

    def kill(self, actor: Any) -> None:
        try:
            self.ray.kill(actor, no_restart=True)
        except Exception:  # noqa: BLE001 - an actor that is already gone needs no killing
            pass

    def close(self) -> None:
        """Stop the workers, and Ray itself when this evaluator started it."""
        for actor in self.actors:
            self.kill(actor)
        self.actors = []
        if self.started_ray and self.ray.is_initialized():
            self.ray.shutdown()
        self.started_ray = False

    def __enter__(self) -> RayEvaluator:
        return self

    def __exit__(self, *_: object) -> None:
        self.close()


def shard_of_batch(images: torch.Tensor, targets: Targets, part: slice) -> tuple[torch.Tensor, Targets]:
    """One shard's images and targets, copied: a pickled view would carry the whole batch."""
    teacher = None if targets.teacher is None else targets.teacher[part].clone()
    return images[part].clone(), Targets(targets.labels[part].clone(), teacher)
