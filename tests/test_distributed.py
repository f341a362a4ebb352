"""The Ray evaluator: the same fitness, the same runs, through a dead worker, and clear errors."""

from __future__ import annotations

import dataclasses
import json
import os
import secrets
import signal
import socket
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import numpy as np
import pytest
import torch

from accel_sim.ir import WEIGHT, ParamKey
from hwq.cli import main
from hwq.quant.model import QuantConfig
from hwq.search import FITNESS_MODES
from hwq.search.distributed import RayEvaluator, connect, decode, encode, serialized_bytes, shard_total, split
from hwq.search.evaluator import IntegerFitness, SimEvaluator, Targets
from hwq.search.train import logit_lsbs, train

from .helpers import calibration_images, program_for
from .test_train import config, final_weights, log_lines, workspace  # noqa: F401 (a fixture)


@pytest.fixture(scope="module")
def local_ray():
    """One local Ray for the module (started the way `hwq train --workers` starts one)."""
    ray = pytest.importorskip("ray")
    assert not ray.is_initialized()
    assert connect(None, local_cpus=3) is True
    yield ray
    ray.shutdown()


def random_targets(rng: np.random.Generator, n: int) -> Targets:
    return Targets(torch.as_tensor(rng.integers(0, 10, n)), torch.as_tensor(rng.integers(-60, 60, (n, 10))))


@pytest.mark.parametrize("mode", FITNESS_MODES)
@pytest.mark.parametrize("clip", [1, 7])
def test_shard_scores_add_up_to_the_batch_score(mode, clip):
    rng = np.random.default_rng(3)
    n, population = 23, 6
    logits = torch.as_tensor(rng.integers(-40, 40, (population, n, 10)))
    logits[:, :4] = logits[:, :4, :1]  # ties for the argmax and zero margins
    targets = random_targets(rng, n)
    fitness = IntegerFitness(mode, clip)
    parts = [slice(0, 7), slice(7, 8), slice(8, 23)]
    shards = [fitness.score(logits[:, p], Targets(targets.labels[p], targets.teacher[p])) for p in parts]
    whole = fitness.score(logits, targets)
    np.testing.assert_array_equal(shard_total(fitness, np.stack(shards), [7, 1, 15]), whole)
    if mode == "accuracy":  # the packed scores do not simply add up
        assert not np.array_equal(np.sum(shards, axis=0), whole)


def test_differences_travel_instead_of_whole_layers():
    rng = np.random.default_rng(0)
    base = rng.integers(-7, 8, (64, 64, 3, 3))
    population = np.repeat(base[None], 16, axis=0)
    group = rng.choice(base.size, 256, replace=False)
    population.reshape(16, -1)[:, group] += rng.integers(-1, 2, (16, 256))
    arrays = {"layer": population, "fresh": rng.integers(0, 9, (16, 5))}
    encoded = encode(arrays, {"layer": base})
    decoded = decode(encoded, {"layer": base})
    for key, array in arrays.items():
        np.testing.assert_array_equal(decoded[key], array)
        assert decoded[key].dtype == array.dtype
    assert serialized_bytes(encoded["layer"]) < serialized_bytes(population) / 100
    solution = decode(encode({"layer": population[3]}, {"layer": base}), {"layer": base})
    np.testing.assert_array_equal(solution["layer"], population[3])


def candidates(program, layer: str, population: int, seed: int) -> dict[ParamKey, np.ndarray]:
    weight = program.op(layer).weight
    rng = np.random.default_rng(seed)
    values = np.repeat(weight[None], population, axis=0).reshape(population, -1)
    group = rng.choice(weight.size, min(64, weight.size), replace=False)
    values[:, group] = np.clip(values[:, group] + rng.integers(-1, 2, (population, len(group))), -7, 7)
    return {(layer, WEIGHT): values.reshape(population, *weight.shape)}


def test_evaluator_matches_in_process_over_image_and_population_splits(local_ray):
    """Three workers on two image shards: one shard's two workers split the population."""
    program = program_for(QuantConfig(4, 8))
    images = calibration_images()[:40]
    targets = Targets(torch.as_tensor(np.random.default_rng(1).integers(0, 10, 40)))
    fitness = IntegerFitness("accuracy", logit_lsbs(program, 4.0))
    local = SimEvaluator(program, fitness)
    remote = RayEvaluator(lambda: SimEvaluator(program, fitness), fitness, workers=3, min_shard_images=20)
    with remote:
        start = {(op.name, WEIGHT): op.weight for op in program.conv_ops()}
        for e in (local, remote):
            e.set_batch(images, targets)
            e.set_solution(start)  # as the trainer does: the context the candidates differ from
        assert remote.shard_sizes == [20, 20] and remote.shard_of == [0, 1, 0]
        first = candidates(program, "layer3.2.conv2", 5, seed=0)
        np.testing.assert_array_equal(remote.evaluate(first), local.evaluate(first))
        best = {name: w[2] for name, w in first.items()}
        assert remote.set_solution(best) == local.set_solution(best)
        second = {**candidates(program, "fc", 5, seed=1), **candidates(program, "layer3.2.conv2", 5, seed=2)}
        np.testing.assert_array_equal(remote.evaluate(second), local.evaluate(second))
        assert (remote.evaluations, remote.macs) == (local.evaluations, local.macs)
        assert remote.sent["set_batch"] > 40 * 3 * 32 * 32
        dense = 3 * (serialized_bytes(first) + serialized_bytes(second))
        assert 0 < remote.sent["evaluate"] < dense / 100


def ray_config(workspace, out: str, budget: int, **kw):  # noqa: F811
    """test_train's tiny run, on 64 images so that two workers get one image shard each."""
    return dataclasses.replace(config(workspace, out, budget), fitness_images=64, **kw)


@pytest.fixture(scope="module")
def in_process(workspace):  # noqa: F811
    summary = train(ray_config(workspace, "in_process", 24))
    return summary, final_weights(workspace, "in_process"), log_lines(workspace, "in_process")


def assert_same_run(workspace, out: str, summary: dict, reference) -> None:  # noqa: F811
    ref_summary, weights, log = reference
    assert summary["final_ir_sha256"] == ref_summary["final_ir_sha256"]
    got = final_weights(workspace, out)
    for name in weights:
        np.testing.assert_array_equal(got[name], weights[name], err_msg=name)
    assert log_lines(workspace, out) == log


def gone(pid: int, seconds: float = 60.0) -> bool:
    """Whether the process has exited within `seconds`: Ray reaps a killed actor's worker
    asynchronously, and on a loaded machine (five processes on two cores) that took over 20 s."""
    deadline = time.monotonic() + seconds
    while time.monotonic() < deadline:
        try:
            os.kill(pid, 0)
        except ProcessLookupError:
            return True
        time.sleep(0.1)
    return False


def test_two_workers_train_exactly_as_in_process(local_ray, workspace, in_process, monkeypatch):  # noqa: F811
    original = RayEvaluator.evaluate
    pids: set[int] = set()

    def recording(self, candidates):
        pids.update(self.pids())
        return original(self, candidates)

    monkeypatch.setattr(RayEvaluator, "evaluate", recording)
    summary = train(ray_config(workspace, "two_workers", 24, workers=2))
    assert_same_run(workspace, "two_workers", summary, in_process)
    assert in_process[2][-1]["generation"] == 6 and summary["macs_per_eval"] > 0
    assert len(pids) == 2 and all(gone(pid) for pid in pids)  # closed at the end of the run
    assert local_ray.is_initialized()  # a Ray the process had started is left running


def test_a_killed_worker_is_replaced_and_the_resumed_run_is_unchanged(
    local_ray,
    workspace,  # noqa: F811
    in_process,
    monkeypatch,
):
    """Half the run in process, the rest resumed on two workers, one of which is killed
    (SIGKILL of its process) between generations."""
    train(ray_config(workspace, "killed", 12))
    original = RayEvaluator.evaluate
    seen: dict[str, RayEvaluator] = {}

    def killing(self, candidates):
        seen["evaluator"] = self
        if self.evaluations == 16:
            os.kill(self.pids()[1], signal.SIGKILL)
        return original(self, candidates)

    monkeypatch.setattr(RayEvaluator, "evaluate", killing)
    summary = train(ray_config(workspace, "killed", 24, workers=2), resume=True)
    assert seen["evaluator"].replacements == 1 and seen["evaluator"].sent["restore"] > 0
    assert_same_run(workspace, "killed", summary, in_process)
    assert seen["evaluator"].actors == []


def cli_train(workspace, out: str, *flags: str) -> list[str]:  # noqa: F811
    root, data, checkpoint = workspace
    common = ["--wbits", "4", "--abits", "8", "--layers", "fc", "--budget-evals", "4", "--population", "4"]
    common += ["--selected", "2", "--fitness-images", "16", "--calibration-images", "32"]
    return ["train", "--checkpoint", checkpoint, "--data", data, *common, "--out", str(root / out), *flags]


def test_without_ray_the_flag_says_what_to_install(workspace, monkeypatch, capsys):  # noqa: F811
    monkeypatch.setitem(sys.modules, "ray", None)
    assert main(cli_train(workspace, "no_ray", "--workers", "2")) == 2
    err = capsys.readouterr().err.strip()
    assert len(err.splitlines()) == 1 and "pip install 'hwq[distributed]'" in err
    assert not (workspace[0] / "no_ray").exists()


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


@pytest.mark.parametrize(
    "flags, message",
    [
        (["--workers", "0"], "--workers must be at least 1"),
        (["--ray-address", "auto"], "need --workers N"),
        (["--workers", "2", "--ray-address", "head-node"], "expected auto, host:port or ray://host:port"),
        (["--workers", "2", "--target", "brevitas"], "--workers needs --target accel_sim"),
        (["--workers", "2", "--ray-address", f"127.0.0.1:{free_port()}"], "no Ray cluster answers at"),
    ],
)
def test_bad_distributed_settings_are_one_line_errors(workspace, capsys, flags, message):  # noqa: F811
    pytest.importorskip("ray")
    assert main(cli_train(workspace, "bad", *flags)) == 2
    err = capsys.readouterr().err.strip()
    assert len(err.splitlines()) == 1 and message in err, err


def test_split_is_contiguous_and_balanced():
    assert split(10, 3) == [slice(0, 3), slice(3, 7), slice(7, 10)]
    assert split(2, 3) == [slice(0, 1), slice(1, 1), slice(1, 2)]


def wait_for_port(port: int, seconds: float = 120.0) -> None:
    deadline = time.monotonic() + seconds
    while time.monotonic() < deadline:
        try:
            socket.create_connection(("127.0.0.1", port), timeout=1).close()
            return
        except OSError:
            time.sleep(0.5)
    raise TimeoutError(f"nothing listens on port {port}")


@pytest.mark.slow
def test_a_cluster_of_ray_start_nodes_trains_exactly_as_in_process(workspace, in_process):  # noqa: F811
    """`ray start --head` and `ray start --address` (two nodes on this machine, one CPU each),
    then `hwq train --workers 2 --ray-address HOST:PORT` in its own process."""
    pytest.importorskip("ray")
    ray_cli = str(Path(sys.executable).parent / "ray")
    port = free_port()
    token = {"RAY_AUTH_MODE": "token", "RAY_AUTH_TOKEN": secrets.token_hex(32)}  # every node and the driver
    env = {**os.environ, **token, "PYTHONPATH": str(Path(__file__).resolve().parents[1])}
    common = ["--block", "--num-cpus", "1", "--node-ip-address", "127.0.0.1", "--disable-usage-stats"]
    head = [ray_cli, "start", "--head", "--port", str(port), "--include-dashboard", "false"]
    temp = tempfile.TemporaryDirectory(prefix="hwqray", dir="/tmp")  # Ray's socket paths must be short
    nodes = [subprocess.Popen([*head, *common, "--temp-dir", temp.name], env=env)]
    try:
        wait_for_port(port)
        nodes.append(subprocess.Popen([ray_cli, "start", "--address", f"127.0.0.1:{port}", *common], env=env))
        root, data, checkpoint = workspace
        cfg = ray_config(workspace, "cluster", 24)
        flags = ["--layers", ",".join(cfg.layers), "--population", "4", "--selected", "2"]
        flags += ["--group-size", "64", "--fitness-images", "64", "--new-batch-every", "3"]
        flags += ["--eval-every", "2", "--checkpoint-every", "2", "--calibration-images", "32"]
        flags += ["--budget-evals", "24"]
        command = [sys.executable, "-m", "hwq.cli", "train", "--checkpoint", checkpoint, "--data", data]
        command += ["--wbits", "4", "--abits", "8", *flags, "--out", cfg.out]
        command += ["--workers", "2", "--cpus-per-worker", "1", "--ray-address", f"127.0.0.1:{port}"]
        subprocess.run(command, env=env, check=True, timeout=900)
    finally:
        for node in nodes:  # `ray start --block` stops its node's processes on SIGTERM
            node.terminate()
        for node in nodes:
            node.wait(timeout=60)
        temp.cleanup()
    summary = json.loads((root / "cluster" / "summary.json").read_text())
    assert_same_run(workspace, "cluster", summary, in_process)
