"""Images/s of accel_sim's bit-exact ResNet-20 against float PyTorch, Brevitas and onnxruntime.

All engines run in this one process on the same images, in the same batch size, after a
warm-up; each is timed over several repetitions and the best is kept (the least disturbed
by the machine). The ratio column is engine / float PyTorch.

    python bench/bench_functional.py --data ../shared/data/cifar10-subset \
        --checkpoint ../shared/models/resnet20-12fca82f.th
"""

from __future__ import annotations

import argparse
import tempfile
import time
import warnings
from collections.abc import Callable
from pathlib import Path

import torch

warnings.filterwarnings("ignore")

from accel_sim.functional import FunctionalSim  # noqa: E402
from hwq.data import load_split  # noqa: E402
from hwq.quant.evaluate import prepare  # noqa: E402
from hwq.quant.model import QuantConfig  # noqa: E402


def best_rate(run: Callable[[torch.Tensor], object], images: torch.Tensor, batch: int, repeats: int) -> float:
    """Best images/s over `repeats` passes through `images` in chunks of `batch`."""
    chunks = images.split(batch)
    run(chunks[0])
    best = float("inf")
    for _ in range(repeats):
        start = time.perf_counter()
        for chunk in chunks:
            run(chunk)
        best = min(best, time.perf_counter() - start)
    return len(images) / best


def onnx_runner(model: torch.nn.Module, batch: int) -> Callable[[torch.Tensor], object] | None:
    try:
        import onnxruntime as ort
    except ImportError:
        return None
    path = Path(tempfile.mkdtemp()) / "resnet20.onnx"
    example = torch.zeros(batch, 3, 32, 32)
    torch.onnx.export(
        model,
        (example,),
        str(path),
        input_names=["x"],
        output_names=["y"],
        dynamic_axes={"x": {0: "n"}},
        dynamo=False,
    )
    opts = ort.SessionOptions()
    opts.intra_op_num_threads = torch.get_num_threads()
    session = ort.InferenceSession(str(path), opts, providers=["CPUExecutionProvider"])
    return lambda x: session.run(None, {"x": x.float().numpy()})


def main() -> None:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("--data")
    parser.add_argument("--checkpoint", default="resnet20")
    parser.add_argument("--images", type=int, default=512)
    parser.add_argument("--batch", type=int, default=128)
    parser.add_argument("--repeats", type=int, default=5)
    parser.add_argument("--wbits", type=int, default=4)
    parser.add_argument("--abits", type=int, default=8)
    args = parser.parse_args()

    cfg = QuantConfig(args.wbits, args.abits)
    prepared = prepare(args.checkpoint, cfg, args.data)
    images = load_split(args.data, "val").images[: args.images]
    sim = FunctionalSim(prepared.program)
    fused = FunctionalSim(prepared.program, compile=True)
    start = time.perf_counter()
    fused.run(images[: args.batch])
    compile_seconds = time.perf_counter() - start

    def no_grad(model: torch.nn.Module) -> Callable[[torch.Tensor], object]:
        def run(x: torch.Tensor) -> object:
            with torch.no_grad():
                return model(x)

        return run

    engines: dict[str, Callable[[torch.Tensor], object]] = {
        "float PyTorch": no_grad(prepared.float_model),
        f"accel_sim W{args.wbits}A{args.abits} eager": sim.run,
        f"accel_sim W{args.wbits}A{args.abits} compiled": fused.run,
        f"Brevitas W{args.wbits}A{args.abits} fake-quant": no_grad(prepared.qmodel),
    }
    ort = onnx_runner(prepared.float_model, args.batch)
    if ort is not None:
        engines["onnxruntime float"] = ort
    print(
        f"{len(images)} CIFAR-10 images, batch {args.batch}, {torch.get_num_threads()} threads, "
        f"best of {args.repeats}; accel_sim compiled after a one-time {compile_seconds:.1f} s compilation"
    )
    rates = {name: best_rate(run, images, args.batch, args.repeats) for name, run in engines.items()}
    base = rates["float PyTorch"]
    print(f"{'engine':<36} {'images/s':>10} {'vs float PyTorch':>18}")
    for name, rate in rates.items():
        print(f"{name:<36} {rate:>10.0f} {rate / base:>17.2f}x")


if __name__ == "__main__":
    main()
