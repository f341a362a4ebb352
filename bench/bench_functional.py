"""Images/s of accel_sim's bit-exact ResNet-20 against float PyTorch, Brevitas and onnxruntime.

onnxruntime runs the float export and its own int8 model of it (W8A8, QOperator format,
calibrated on training images): the strongest integer inference on a CPU, the peer a
simulator that computes the integers exactly is measured against.

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


INT8 = "onnxruntime int8 W8A8 (QOperator)"


def export_onnx(model: torch.nn.Module, batch: int, folder: Path) -> Path:
    path = folder / "resnet20.onnx"
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
    return path


def ort_runner(path: Path) -> Callable[[torch.Tensor], object]:
    import onnxruntime as ort

    opts = ort.SessionOptions()
    opts.intra_op_num_threads = torch.get_num_threads()
    session = ort.InferenceSession(str(path), opts, providers=["CPUExecutionProvider"])
    return lambda x: session.run(None, {"x": x.float().numpy()})


def quantize_int8(path: Path, calibration: torch.Tensor, batch: int) -> Path:
    """onnxruntime's own W8A8 model of the same float export: QOperator format (QLinearConv
    kernels), per-tensor int8 weights, uint8 activations, min-max calibrated on training images."""
    from onnxruntime.quantization import CalibrationDataReader, QuantFormat, QuantType, quantize_static
    from onnxruntime.quantization.shape_inference import quant_pre_process

    class Images(CalibrationDataReader):
        def __init__(self) -> None:
            self.chunks = iter(calibration.split(batch))

        def get_next(self) -> dict | None:
            chunk = next(self.chunks, None)
            return None if chunk is None else {"x": chunk.float().numpy()}

    prepared = path.with_name("resnet20.pre.onnx")
    quant_pre_process(str(path), str(prepared))
    out = path.with_name("resnet20.int8.onnx")
    quantize_static(
        str(prepared),
        str(out),
        Images(),
        quant_format=QuantFormat.QOperator,
        activation_type=QuantType.QUInt8,
        weight_type=QuantType.QInt8,
    )
    return out


def onnx_engines(
    model: torch.nn.Module, batch: int, calibration: torch.Tensor
) -> dict[str, Callable[[torch.Tensor], object]]:
    """onnxruntime float and int8 (W8A8), from one export; none when onnxruntime is missing."""
    try:
        import onnxruntime  # noqa: F401
    except ImportError:
        return {}
    path = export_onnx(model, batch, Path(tempfile.mkdtemp()))
    return {
        "onnxruntime float": ort_runner(path),
        INT8: ort_runner(quantize_int8(path, calibration, batch)),
    }


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
    parser.add_argument("--calibration-images", type=int, default=512, help="onnxruntime int8 calibration")
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
    calibration = load_split(args.data, "train").images[: args.calibration_images]
    engines |= onnx_engines(prepared.float_model, args.batch, calibration)
    print(
        f"{len(images)} CIFAR-10 images, batch {args.batch}, {torch.get_num_threads()} threads, "
        f"best of {args.repeats}; accel_sim compiled after a one-time {compile_seconds:.1f} s compilation"
    )
    rates = {name: best_rate(run, images, args.batch, args.repeats) for name, run in engines.items()}
    base = rates["float PyTorch"]
    print(f"{'engine':<36} {'images/s':>10} {'vs float PyTorch':>18}")
    for name, rate in rates.items():
        print(f"{name:<36} {rate:>10.0f} {rate / base:>17.2f}x")
    if INT8 in engines:
        print(f"{INT8}: top-1 agreement with float PyTorch {100 * int8_agreement(engines, images):.2f} %")


def int8_agreement(engines: dict[str, Callable[[torch.Tensor], object]], images: torch.Tensor) -> float:
    """Shows the int8 model is the network, not a fast wrong one."""
    with torch.no_grad():
        reference = engines["float PyTorch"](images).argmax(1)
    int8 = torch.as_tensor(engines[INT8](images)[0]).argmax(1)
    return float((int8 == reference).double().mean())


if __name__ == "__main__":
    main()
