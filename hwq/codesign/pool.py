"""Where candidates are evaluated: in this process, or on Ray actors.

A generation's candidates are independent, so each is one task; results come back in
the order the candidates were given, and a candidate's result depends only on it and on
designs of earlier generations, so in-process and on any number of workers the run is
the same. As `hwq train --workers`, the driver starts a local Ray unless it is given an
address (hwq.search.distributed.connect).
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

from .candidate import CandidateEvaluator, Settings


class InProcessPool:
    def __init__(self, settings: Settings):
        self.evaluator = CandidateEvaluator(settings)

    def map(self, method: str, calls: list[tuple], on_result: Callable[[int, Any], None]) -> None:
        for i, args in enumerate(calls):
            on_result(i, getattr(self.evaluator, method)(*args))

    def close(self) -> None:
        pass


class CandidateWorker:
    """A Ray actor holding one CandidateEvaluator (its val split and lowered networks)."""

    def __init__(self, settings: Settings, threads: int):
        import torch

        torch.set_num_threads(threads)
        torch.set_grad_enabled(False)
        self.evaluator = CandidateEvaluator(settings)

    def call(self, method: str, args: tuple) -> Any:
        return getattr(self.evaluator, method)(*args)


class RayPool:
    def __init__(self, settings: Settings, workers: int, address: str | None, cpus_per_worker: int | None):
        from ..search.distributed import connect, require_ray

        ray = require_ray()
        self.ray = ray
        cpus = cpus_per_worker or 1
        self.started_ray = connect(address, workers * cpus)
        actor = ray.remote(num_cpus=cpus)(CandidateWorker)
        self.actors = [actor.remote(settings, cpus) for _ in range(workers)]

    def map(self, method: str, calls: list[tuple], on_result: Callable[[int, Any], None]) -> None:
        """Each idle actor takes the next candidate; results are handed on in the given order."""
        from ray.util import ActorPool

        pool = ActorPool(self.actors)
        results = pool.map(lambda a, args: a.call.remote(method, args), calls)
        for i, result in enumerate(results):
            on_result(i, result)

    def close(self) -> None:
        for actor in self.actors:
            self.ray.kill(actor)
        if self.started_ray:
            self.ray.shutdown()


def make_pool(
    settings: Settings, workers: int | None, address: str | None, cpus_per_worker: int | None
) -> InProcessPool | RayPool:
    if workers is None:
        return InProcessPool(settings)
    return RayPool(settings, workers, address, cpus_per_worker)
