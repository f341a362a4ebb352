"""accel_sim's timing model against SCALE-Sim v3 on the same ResNet-20, array and dataflow.

SCALE-Sim (https://github.com/scalesim-project/scale-sim-v3) is installed on first use in
its own virtual environment, bench/.scalesim-venv (it needs numpy<2). For each array size
and dataflow, the program's conv layers are written as a SCALE-Sim topology (see
topology_csv for padding and stride), SCALE-Sim runs with buffers and
bandwidth large enough that it never stalls, and its per-layer compute cycles are printed
beside accel_sim's, with the relative difference and each simulator's run time (SCALE-Sim:
its run_scale call only, not its interpreter start-up; accel_sim: program_timing of the
whole program, best of --repeats). GlobalAvgPool has no MACs and SCALE-Sim no such layer.

    python bench/scalesim_compare.py --checkpoint ../shared/models/resnet20-12fca82f.th \
        --data ../shared/data/cifar10-subset --wbits 4 --abits 8 [--array 16x16] [--dataflow os]

`--test-layers` instead runs the three small conv layers of tests/test_timing.py
(TEST_LAYERS) on a 4x4 array, os and ws, and prints the six cycle counts SCALE-Sim reports
that the test holds accel_sim to:

    python bench/scalesim_compare.py --test-layers
"""

from __future__ import annotations

import argparse
import csv
import subprocess
import sys
import tempfile
import time
import venv
from pathlib import Path

from accel_sim.hardware import Accelerator
from accel_sim.ir import Program
from accel_sim.timing import Gemm, gemm_compute_cycles, program_timing
from hwq.flags import add_model_flags, program_from_args

VENV = Path(__file__).resolve().parent / ".scalesim-venv"
SCALESIM = "scalesim==3.0.0"
UNLIMITED = 1 << 40

# Times SCALE-Sim's own simulation, not the interpreter or its imports.
DRIVER = """
import sys, time
from scalesim.scale_sim import scalesim
config, topology, out = sys.argv[1:4]
sim = scalesim(save_disk_space=True, verbose=False, config=config, topology=topology, layout=topology)
start = time.perf_counter()
sim.run_scale(top_path=out)
print(time.perf_counter() - start)
"""

CONFIG = """[general]
run_name = hwq

[architecture_presets]
ArrayHeight: {rows}
ArrayWidth: {cols}
IfmapSramSzkB: 65536
FilterSramSzkB: 65536
OfmapSramSzkB: 65536
IfmapOffset: 0
FilterOffset: 10000000
OfmapOffset: 20000000
Bandwidth: 10
Dataflow: {dataflow}
MemoryBanks: 1
ReadRequestBuffer: 512
WriteRequestBuffer: 512

[layout]
IfmapCustomLayout: False
IfmapSRAMBankBandwidth: 10
IfmapSRAMBankNum: 10
IfmapSRAMBankPort: 2
FilterCustomLayout: False
FilterSRAMBankBandwidth: 10
FilterSRAMBankNum: 10
FilterSRAMBankPort: 2

[sparsity]
SparsitySupport: false
SparseRep: ellpack_block
OptimizedMapping: false
BlockSize: 8
RandomNumberGeneratorSeed: 40

[run_presets]
InterfaceBandwidth: CALC
UseRamulatorTrace: False
"""


def scalesim_python() -> Path:
    """The SCALE-Sim interpreter, creating its environment on first use."""
    python = VENV / "bin" / "python"
    if not python.exists():
        print(f"installing {SCALESIM} into {VENV} ...", flush=True)
        venv.create(VENV, with_pip=True)
        subprocess.run([python, "-m", "pip", "install", "-q", "numpy<2", SCALESIM], check=True)
    return python


TOPOLOGY_HEADER = (
    "Layer name,IFMAP Height,IFMAP Width,Filter Height,Filter Width,Channels,Num Filter,Strides,"
)

# The layers of tests/test_timing.py::test_layer_cycles_agree_with_scalesim, as
# (name, input height = width, kernel, channels, filters), stride 1, no padding: GEMMs
# M x N x K of 16 x 4 x 9, 16 x 10 x 18 and 36 x 7 x 18, on a 4x4 array, os and ws.
TEST_LAYERS = (("a", 6, 3, 1, 4), ("b", 6, 3, 2, 10), ("c", 8, 3, 2, 7))
TEST_ARRAY = (4, 4)


def topology_csv(program: Program) -> str:
    """SCALE-Sim's conv topology. SCALE-Sim has no padding and rounds the output size up
    (a partial window at the edge counts), so each layer's input is given as the extent
    its windows actually read, (H_out - 1) * stride + k, which has the same output size."""
    rows = [TOPOLOGY_HEADER]
    for op in program.conv_ops():
        channels = program.tensors[op.input].channels
        _, h_out, w_out = program.tensors[op.output].shape
        h, w = ((size - 1) * op.stride + op.kernel for size in (h_out, w_out))
        rows.append(f"{op.name},{h},{w},{op.kernel},{op.kernel},{channels},{op.out_channels},{op.stride},")
    return "\n".join(rows) + "\n"


def quoted_layers_csv() -> str:
    rows = [TOPOLOGY_HEADER] + [f"{n},{h},{h},{k},{k},{c},{f},1," for n, h, k, c, f in TEST_LAYERS]
    return "\n".join(rows) + "\n"


def run_scalesim(topology: str, rows: int, cols: int, dataflow: str) -> tuple[list[int], float]:
    """Per-layer compute cycles (total minus stalls) and the seconds SCALE-Sim took."""
    with tempfile.TemporaryDirectory() as tmp:
        work = Path(tmp)
        (work / "hw.cfg").write_text(CONFIG.format(rows=rows, cols=cols, dataflow=dataflow))
        (work / "topology.csv").write_text(topology)
        done = subprocess.run(
            [scalesim_python(), "-c", DRIVER, work / "hw.cfg", work / "topology.csv", work / "out"],
            check=True,
            capture_output=True,
            text=True,
        )
        seconds = float(done.stdout.strip().splitlines()[-1])
        with open(next((work / "out").rglob("COMPUTE_REPORT.csv"))) as f:
            report = [{k.strip(): v.strip() for k, v in row.items() if k} for row in csv.DictReader(f)]
    return [int(r["Total Cycles"]) - int(r["Stall Cycles"]) for r in report], seconds


def unconstrained(rows: int, cols: int, dataflow: str) -> Accelerator:
    """Buffers and bandwidth that never limit, as in the SCALE-Sim run."""
    return Accelerator(
        rows=rows,
        cols=cols,
        dataflow=dataflow,
        clock_mhz=1000.0,
        weight_buffer_bytes=UNLIMITED,
        input_buffer_bytes=UNLIMITED,
        output_buffer_bytes=UNLIMITED,
        dram_bytes_per_cycle=float(UNLIMITED),
    )


def time_accel_sim(program: Program, accelerator: Accelerator, repeats: int) -> float:
    best = float("inf")
    for _ in range(repeats):
        start = time.perf_counter()
        program_timing(program, accelerator)
        best = min(best, time.perf_counter() - start)
    return best


def compare(program: Program, rows: int, cols: int, dataflow: str, repeats: int) -> float:
    """Print one table; returns the largest relative difference."""
    accelerator = unconstrained(rows, cols, dataflow)
    ours = {layer.name: layer for layer in program_timing(program, accelerator).layers}
    theirs, scalesim_s = run_scalesim(topology_csv(program), rows, cols, dataflow)
    accel_s = time_accel_sim(program, accelerator, repeats)
    print(f"\n{rows}x{cols} {dataflow}")
    print(f"  {'layer':<16} {'M x N x K':>14} {'SCALE-Sim':>10} {'accel_sim':>10} {'diff':>9}")
    worst = 0.0
    for op, cycles in zip(program.conv_ops(), theirs, strict=True):
        layer = ours[op.name]
        diff = (layer.compute_cycles - cycles) / cycles
        worst = max(worst, abs(diff))
        shape = f"{layer.gemm.m}x{layer.gemm.n}x{layer.gemm.k}"
        print(f"  {op.name:<16} {shape:>14} {cycles:>10,} {layer.compute_cycles:>10,} {100 * diff:>8.3f}%")
    total_theirs = sum(theirs)
    total_ours = sum(ours[op.name].compute_cycles for op in program.conv_ops())
    print(
        f"  {'total':<16} {'':>14} {total_theirs:>10,} {total_ours:>10,} "
        f"{100 * (total_ours - total_theirs) / total_theirs:>8.3f}%"
    )
    print(
        f"  max |relative difference| {100 * worst:.3f} %; run time SCALE-Sim {scalesim_s:.2f} s, "
        f"accel_sim {1e3 * accel_s:.3f} ms: {scalesim_s / accel_s:,.0f}x faster"
    )
    return worst


def compare_test_layers() -> None:
    """The six counts of tests/test_timing.py: SCALE-Sim's report, one below accel_sim's."""
    rows, cols = TEST_ARRAY
    print(f"{rows}x{cols} array: dataflow, layer, M x N x K, SCALE-Sim reported, accel_sim")
    for dataflow in ("os", "ws"):
        theirs, _ = run_scalesim(quoted_layers_csv(), rows, cols, dataflow)
        for (name, h, k, c, f), reported in zip(TEST_LAYERS, theirs, strict=True):
            gemm = Gemm(m=(h - k + 1) ** 2, n=f, k=c * k * k)
            ours = gemm_compute_cycles(gemm, rows, cols, dataflow)
            print(f"  {dataflow} {name} {gemm.m}x{gemm.n}x{gemm.k}: {reported} {ours}")


def array_shape(text: str) -> tuple[int, int]:
    rows, _, cols = text.partition("x")
    try:
        return int(rows), int(cols)
    except ValueError:
        raise argparse.ArgumentTypeError(f"{text!r} is not an array shape like 16x16") from None


def main() -> None:
    formatter = argparse.RawDescriptionHelpFormatter
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=formatter)
    parser.add_argument("--ir", help="an IR file instead of a checkpoint")
    add_model_flags(parser)
    parser.add_argument("--data", help="CIFAR-10 directory for calibration with --checkpoint")
    parser.add_argument("--array", type=array_shape, action="append", help="ROWSxCOLS, repeatable (16x16)")
    parser.add_argument("--dataflow", choices=("os", "ws", "is"), action="append", help="repeatable (os, ws)")
    parser.add_argument("--repeats", type=int, default=20, help="timings of accel_sim; the best is kept")
    parser.add_argument(
        "--test-layers", action="store_true", help="only the six layer runs tests/test_timing.py quotes"
    )
    args = parser.parse_args()
    if args.test_layers:
        compare_test_layers()
        return
    program = program_from_args(args)
    worst = max(
        compare(program, rows, cols, dataflow, args.repeats)
        for rows, cols in args.array or [(16, 16)]
        for dataflow in args.dataflow or ["os", "ws"]
    )
    print(f"\nlargest per-layer difference over all runs: {100 * worst:.3f} %")


if __name__ == "__main__":
    sys.exit(main())
