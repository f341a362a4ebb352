"""The IR file format: round trip, integrity, and validation that names the problem."""

from __future__ import annotations

import dataclasses
import hashlib
import io
import json
import re
import zipfile
from pathlib import Path

import numpy as np
import pytest

from accel_sim.functional import FunctionalSim
from accel_sim.ir import (
    MAX_ACC_BITS,
    MAX_OFFSET,
    REQUANT_BOUND,
    REQUANT_BOUND_TEXT,
    Accumulator,
    Conv2d,
    GlobalAvgPool,
    IRError,
    Program,
    Requant,
    Residual,
    TensorSpec,
    load_program,
    program_digest,
    program_to_dict,
    save_program,
)
from hwq.quant.model import QuantConfig

from .helpers import program_for
from .reference_datapath import run_reference

CFG = QuantConfig(4, 8)


def rewrite_member(path, member: str, transform) -> None:
    """Rewrite one archive member (keeping the stored checksum): a tampered file."""
    with zipfile.ZipFile(path) as zf:
        members = {n: zf.read(n) for n in zf.namelist()}
    members[member] = transform(members[member])
    with zipfile.ZipFile(path, "w") as zf:
        for name, data in members.items():
            zf.writestr(name, data)


def test_round_trip_preserves_every_array_and_setting(tmp_path):
    program = program_for(CFG).with_accumulator(Accumulator(20, "saturate"))
    digest = save_program(program, tmp_path / "p.ir")
    loaded = load_program(tmp_path / "p.ir")
    assert program_digest(loaded) == digest == program_digest(program)
    assert loaded.accumulator == Accumulator(20, "saturate")
    for a, b in zip(program.ops, loaded.ops, strict=True):
        assert a.name == b.name
        np.testing.assert_array_equal(a.requant.mult, b.requant.mult)
        np.testing.assert_array_equal(a.requant.offset, b.requant.offset)
    np.testing.assert_array_equal(program.op("layer2.0.conv1").weight, loaded.op("layer2.0.conv1").weight)


def test_flipped_byte_is_refused_by_checksum(tmp_path):
    path = tmp_path / "p.ir"
    save_program(program_for(CFG), path)
    rewrite_member(path, "arrays/layer1.0.conv1.weight.npy", lambda b: b[:-1] + bytes([b[-1] ^ 1]))
    with pytest.raises(IRError, match="checksum"):
        load_program(path)


def test_truncated_file_is_refused(tmp_path):
    path = tmp_path / "p.ir"
    save_program(program_for(CFG), path)
    path.write_bytes(path.read_bytes()[:1000])
    with pytest.raises(IRError, match="not a readable IR file"):
        load_program(path)


def test_consistently_edited_file_is_still_validated(tmp_path):
    """Someone edits the JSON and recomputes the checksum: the datapath rules still hold."""
    program = program_for(CFG)
    bad = program.op("conv1")
    bad_weight = bad.weight.copy()
    bad_weight[0, 0, 0, 0] = 99
    ops = [dataclasses.replace(op, weight=bad_weight) if op.name == "conv1" else op for op in program.ops]
    with pytest.raises(IRError, match="conv1.*outside the 4-bit range"):
        dataclasses.replace(program, ops=ops).validate()


def test_unknown_version_is_named(tmp_path):
    path = tmp_path / "p.ir"
    save_program(program_for(CFG), path)

    def bump(data: bytes) -> bytes:
        header = json.loads(data)
        header["version"] = 99
        return json.dumps(header).encode()

    rewrite_member(path, "program.json", bump)
    with pytest.raises(IRError, match="checksum"):
        load_program(path)
    with zipfile.ZipFile(path) as zf:
        header = json.loads(zf.read("program.json"))
    from accel_sim.ir import program_from_dict

    with pytest.raises(IRError, match="version 99"):
        program_from_dict(header, {})


@pytest.mark.parametrize(
    "change,message",
    [
        (lambda p: p.with_accumulator(Accumulator(4, "wrap")), "accumulator bits 4"),
        (lambda p: p.with_accumulator(Accumulator(32, "clip")), "overflow mode 'clip'"),
        (lambda p: dataclasses.replace(p, rounding="half_even"), "rounding mode"),
        (lambda p: dataclasses.replace(p, output="nowhere"), "not a declared tensor"),
        (lambda p: dataclasses.replace(p, ops=p.ops[1:]), "reads 'conv1' before it is written"),
    ],
)
def test_validation_names_the_problem(change, message):
    with pytest.raises(IRError, match=message):
        change(program_for(CFG)).validate()


def test_missing_file_is_named(tmp_path):
    with pytest.raises(IRError, match="does not exist"):
        load_program(tmp_path / "nope.ir")


def test_not_a_zip_is_refused(tmp_path):
    path = tmp_path / "p.ir"
    path.write_bytes(io.BytesIO(b"hello").getvalue())
    with pytest.raises(IRError, match="not a readable IR file"):
        load_program(path)


# ---------------------------------------------------------------------------------------
# A small hand-written program: every op kind, a residual, per-channel input zero points


def tiny_program() -> Program:
    rng = np.random.default_rng(0)

    def requant(n: int, residual: Residual | None = None) -> Requant:
        mult, offset = rng.integers(1, 1 << 14, n), rng.integers(-(1 << 18), 1 << 18, n)
        return Requant(mult=mult, shift=np.full(n, 20), offset=offset, residual=residual)

    def conv(name: str, x: str, y: str, shape: tuple, padding: int, rq: Requant) -> Conv2d:
        weight, bias = rng.integers(-8, 8, shape), rng.integers(-500, 500, shape[0])
        return Conv2d(name, x, y, weight, 4, bias, stride=1, padding=padding, requant=rq)

    tensors = [
        TensorSpec("image", (3, 4, 4), 8, False, (124, 116, 104)),
        TensorSpec("a", (3, 4, 4), 8, False, (0,), 0.05),
        TensorSpec("b", (3, 4, 4), 8, False, (0,), 0.05),
        TensorSpec("pool", (3, 1, 1), 8, False, (0,), 0.05),
        TensorSpec("logits", (2, 1, 1), 32, True, (0,), 0.01),
    ]
    shortcut = Residual("a", rng.integers(1, 1 << 14, 3), np.full(3, 4))
    ops = [
        conv("conv1", "image", "a", (3, 3, 3, 3), 1, requant(3)),
        conv("conv2", "a", "b", (3, 3, 3, 3), 1, requant(3, shortcut)),
        GlobalAvgPool("pool", "b", "pool", requant(3)),
        conv("fc", "pool", "logits", (2, 3, 1, 1), 0, requant(2)),
    ]
    program = Program(
        {t.name: t for t in tensors},
        ops,
        "image",
        "logits",
        Accumulator(20, "saturate"),
        meta={"model": "tiny"},
    )
    program.validate()
    return program


def with_requant(program: Program, op_name: str, **changes) -> Program:
    """A copy (not validated) with fields of one op's requant stage replaced."""
    ops = [
        dataclasses.replace(op, requant=dataclasses.replace(op.requant, **changes))
        if op.name == op_name
        else op
        for op in program.ops
    ]
    return dataclasses.replace(program, ops=ops)


def write_ir(path, header, blobs: dict[str, bytes]) -> None:
    """An IR file with a correct checksum, as docs/datapath.md "File format" defines it:
    SHA-256 over program.json, then each array's name and bytes in sorted order."""
    header_bytes = json.dumps(header).encode()
    checksum = hashlib.sha256(header_bytes)
    for key in sorted(blobs):
        checksum.update(key.encode())
        checksum.update(blobs[key])
    with zipfile.ZipFile(path, "w") as zf:
        zf.writestr("program.json", header_bytes)
        for key, blob in blobs.items():
            zf.writestr(f"arrays/{key}", blob)
        zf.writestr("sha256", checksum.hexdigest())


def file_members(program: Program) -> tuple[dict, dict[str, bytes]]:
    """The header and array blobs of `program`, without validating it."""
    header, arrays = program_to_dict(program)
    return header, {f"{key}.npy": npy(arr) for key, arr in arrays.items()}


def npy(arr: np.ndarray, allow_pickle: bool = False) -> bytes:
    buf = io.BytesIO()
    np.save(buf, arr, allow_pickle=allow_pickle)
    return buf.getvalue()


# ---------------------------------------------------------------------------------------
# The requantization bound: the validator and docs/datapath.md name the same one

DATAPATH_DOC = Path(__file__).resolve().parents[1] / "docs" / "datapath.md"


def test_the_documented_bound_is_the_one_the_validator_checks():
    assert REQUANT_BOUND == 2**61 and REQUANT_BOUND_TEXT == "2**61"
    section = DATAPATH_DOC.read_text().split("### The requantization bound")[1].split("\n## ")[0]
    formula = "+ |offset| + 2**(shift-1) + (|zp_out| << shift) < "
    assert f"{formula}{REQUANT_BOUND_TEXT}`" in section
    assert f"`|acc|max = 2**{MAX_ACC_BITS - 1}` for a convolution" in section


def test_validator_refuses_a_residual_sum_beyond_the_bound(tmp_path):
    """The issue's case: res_shift 48 with a large residual multiplier (v near -9e19 would
    wrap in int64), and mult_bits 20, where res_mult << res_shift alone overflows int64."""
    program = dataclasses.replace(tiny_program(), mult_bits=20)
    big = np.full(3, (1 << 19) - 1)
    shortcut = dataclasses.replace(program.op("conv2").requant.residual, mult=big, shift=np.full(3, 48))
    bad = with_requant(program, "conv2", residual=shortcut)
    # 255 (the largest |R - zp_R|, zp_R = 0) * (2**19 - 1) * 2**48 is about 2**75.
    bound = re.escape(f"requantization bound {REQUANT_BOUND_TEXT} of docs/datapath.md")
    message = (
        f"op 'conv2': requantization sum can reach [0-9]+ on output channel [0-2], not below the {bound}"
    )
    with pytest.raises(IRError, match=message):
        bad.validate()
    path = tmp_path / "bad.ir"  # the same program in a file whose checksum is right
    write_ir(path, *file_members(bad))
    with pytest.raises(IRError, match=message):
        load_program(path)


def boundary_program(excess: int) -> Program:
    """One conv whose worst-case requantization sum is REQUANT_BOUND - 1 + excess, mostly in
    the residual term. The residual's zero point 128 makes accel_sim's folded form of the sum
    (raw R times the multiplier, minus the zero point's share in a constant) larger than v."""
    rng = np.random.default_rng(1)
    mult, shift, res_mult, res_shift, zp_out = (1 << 19) - 1, 40, (1 << 19) - 1, 34, 1000
    # Worst case by hand (docs/datapath.md): |acc|max = 2**39 for a conv, |r|max = 128.
    known = (1 << 39) * mult + 128 * (res_mult << res_shift) + (1 << (shift - 1)) + (zp_out << shift)
    offset = -(REQUANT_BOUND - 1 + excess - known)
    assert 0 < -offset < MAX_OFFSET
    channels = np.ones(3, dtype=np.int64)
    requant = Requant(
        mult=mult * channels,
        shift=shift * channels,
        offset=offset * channels,
        residual=Residual("x", res_mult * channels, res_shift * channels),
    )
    weight, bias = rng.integers(-8, 8, (3, 3, 3, 3)), rng.integers(-500, 500, 3)
    tensors = {
        "x": TensorSpec("x", (3, 4, 4), 8, False, (128,)),
        "y": TensorSpec("y", (3, 4, 4), 32, True, (zp_out,)),
    }
    conv = Conv2d("conv", "x", "y", weight, 4, bias, stride=1, padding=1, requant=requant)
    return Program(tensors, [conv], "x", "y", Accumulator(32, "wrap"), mult_bits=20)


def test_sums_just_below_the_bound_are_accepted_and_computed_exactly():
    program = boundary_program(excess=0)
    program.validate()
    with pytest.raises(IRError, match=re.escape(REQUANT_BOUND_TEXT)):
        boundary_program(excess=1).validate()
    images = np.random.default_rng(2).integers(0, 256, (6, 3, 4, 4), dtype=np.uint8)
    images[0], images[1] = 0, 255  # residual operand -128 and +127 everywhere
    want = run_reference(program, images)["y"]
    assert np.abs(want).max() > 1 << 19  # outputs of about v / 2**40: the sums are near 2**60
    for force_int64 in (False, True):
        got = FunctionalSim(program, force_int64=force_int64).run(images, record=True).activations["y"]
        np.testing.assert_array_equal(got.numpy(), want)


# ---------------------------------------------------------------------------------------
# IR files: deterministic bytes, and every damaged or malformed file is one IRError line


def test_saving_twice_gives_the_same_bytes_and_the_digest_is_the_files_sha256(tmp_path, monkeypatch):
    program = tiny_program()
    first = save_program(program, tmp_path / "a.ir")
    monkeypatch.setattr("time.time", lambda: 2_000_000_000.0)  # a zip member stamped now would differ
    second = save_program(load_program(tmp_path / "a.ir"), tmp_path / "b.ir")
    data = (tmp_path / "a.ir").read_bytes()
    assert data == (tmp_path / "b.ir").read_bytes()
    assert first == second == program_digest(program) == hashlib.sha256(data).hexdigest()


def flipped(data: bytes, bit: int) -> bytes:
    out = bytearray(data)
    out[bit // 8] ^= 1 << (bit % 8)
    return bytes(out)


def test_every_single_bit_flip_is_refused_or_harmless(tmp_path):
    """Flips in the zip structure, the CRCs, the JSON, the arrays and the checksum: each
    either raises one IRError line or leaves the content intact (a flipped timestamp)."""
    path = tmp_path / "p.ir"
    digest = save_program(tiny_program(), path)
    data = path.read_bytes()
    bad = tmp_path / "bad.ir"
    refused = 0
    for bit in np.random.default_rng(0).choice(8 * len(data), 400, replace=False):
        bad.write_bytes(flipped(data, int(bit)))
        try:
            loaded = load_program(bad)
        except IRError as exc:
            assert "\n" not in str(exc)
            refused += 1
        else:
            assert program_digest(loaded) == digest
    assert refused > 300


def deflated(path) -> bytes:
    """The file rewritten with deflated members, as earlier versions saved it."""
    with zipfile.ZipFile(path) as zf:
        content = {n: zf.read(n) for n in zf.namelist()}
    buf = io.BytesIO()
    with zipfile.ZipFile(buf, "w", compression=zipfile.ZIP_DEFLATED) as zf:
        for name, data in content.items():
            zf.writestr(name, data)
    return buf.getvalue()


def with_compression_method(data: bytes, member: str, method: int) -> bytes:
    """Rewrite the compression-method field of `member` in its local and central headers."""
    out = bytearray(data)
    with zipfile.ZipFile(io.BytesIO(data)) as zf:
        local, entry = zf.getinfo(member).header_offset, zf.start_dir
    out[local + 8 : local + 10] = method.to_bytes(2, "little")
    while data[entry + 46 : entry + 46 + len(member)] != member.encode():
        name, extra, comment = (
            int.from_bytes(data[entry + i : entry + i + 2], "little") for i in (28, 30, 32)
        )
        entry += 46 + name + extra + comment
    out[entry + 10 : entry + 12] = method.to_bytes(2, "little")
    return bytes(out)


def test_old_deflated_files_load_and_their_damage_is_refused(tmp_path):
    path = tmp_path / "p.ir"
    digest = save_program(tiny_program(), path)
    old = tmp_path / "old.ir"
    data = deflated(path)
    old.write_bytes(data)
    assert program_digest(load_program(old)) == digest
    # A deflate block of the reserved type 3 at the start of program.json: zlib.error inside.
    with zipfile.ZipFile(io.BytesIO(data)) as zf:
        local = zf.getinfo("program.json").header_offset
    start = local + 30 + sum(int.from_bytes(data[local + i : local + i + 2], "little") for i in (26, 28))
    old.write_bytes(data[:start] + b"\xff" + data[start + 1 :])
    with pytest.raises(IRError, match="not a readable IR file .*decompressing data: invalid block type"):
        load_program(old)
    old.write_bytes(with_compression_method(path.read_bytes(), "program.json", 99))  # NotImplementedError
    with pytest.raises(IRError, match="not a readable IR file .*compression method"):
        load_program(old)
    for bit in np.random.default_rng(1).choice(8 * len(data), 200, replace=False):
        old.write_bytes(flipped(data, int(bit)))
        try:
            assert program_digest(load_program(old)) == digest
        except IRError as exc:
            assert "\n" not in str(exc)


def set_in(header: dict, path: str, value) -> None:
    """header[...] = value at a dotted path with [i] indices ("tensors[0].shape")."""
    *parents, last = re.findall(r"[^.\[\]]+", path)
    target = header
    for key in parents:
        target = target[int(key)] if key.isdigit() else target[key]
    target[int(last) if last.isdigit() else last] = value


HEADER_CASES = {
    "meta a string": ("meta", "abc", "meta must be a JSON object"),
    "shape a string": ("tensors[0].shape", "abc", "tensors[0].shape must be a list"),
    "shape entry a string": ("tensors[0].shape", [3, "4", 4], "tensors[0].shape[1] must be an integer"),
    "bits a string": ("tensors[1].bits", "x", "tensors[1].bits must be an integer"),
    "bits true": ("tensors[1].bits", True, "tensors[1].bits must be an integer, got true"),
    "signed a string": ("tensors[1].signed", "false", "tensors[1].signed must be true or false"),
    "scale a string": ("tensors[1].scale", "0.1", "tensors[1].scale must be a number"),
    "scale beyond a float": ("tensors[1].scale", 10**400, "tensors[1].scale must be a number"),
    "zero point a float": ("tensors[0].zero_point", [124.5], "tensors[0].zero_point[0] must be an integer"),
    "tensors an object": ("tensors", {"image": 1}, "tensors must be a list"),
    "a tensor a number": ("tensors[0]", 7, "tensors[0] must be a JSON object"),
    "stride a float": ("ops[0].stride", 1.5, "ops[0].stride must be an integer"),
    "requant a list": ("ops[0].requant", [], "ops[0].requant must be a JSON object"),
    "channel_pad too short": (
        "ops[1].requant.residual.channel_pad",
        [0],
        "ops[1].requant.residual.channel_pad must have 2 entries",
    ),
    "unknown op kind": ("ops[2].kind", "maxpool", "ops[2].kind 'maxpool' of op 'pool' is not one of"),
    "accumulator a number": ("accumulator", 32, "accumulator must be a JSON object"),
    "overflow a number": ("accumulator.overflow", 1, "accumulator.overflow must be a string"),
    "mult_bits a string": ("mult_bits", "16", "mult_bits must be an integer"),
    "input a number": ("input", 0, "input must be a string"),
}


@pytest.mark.parametrize("path,value,message", HEADER_CASES.values(), ids=HEADER_CASES.keys())
def test_header_field_of_the_wrong_type_is_named(tmp_path, path, value, message):
    header, blobs = file_members(tiny_program())
    set_in(header, path, value)
    write_ir(tmp_path / "p.ir", header, blobs)
    with pytest.raises(IRError, match=re.escape(f"IR header: {message}")) as caught:
        load_program(tmp_path / "p.ir")
    assert "\n" not in str(caught.value)


def drop(mapping: dict, key: str) -> dict:
    return {k: v for k, v in mapping.items() if k != key}


STRUCTURE_CASES = {
    "header a JSON list": (lambda h, b: ([h], b), "IR header must be a JSON object, not a JSON list"),
    "header not JSON": (lambda h, b: ("{not json", b), "IR header must be a JSON object, not a JSON str"),
    "ops missing": (lambda h, b: (drop(h, "ops"), b), "IR header: ops is missing"),
    "version true": (lambda h, b: ({**h, "version": True}, b), "IR version True is not supported"),
    "tensor declared twice": (
        lambda h, b: ({**h, "tensors": [*h["tensors"], h["tensors"][1]]}, b),
        "tensor 'a' is declared twice",
    ),
    "array missing": (lambda h, b: (h, drop(b, "conv1.bias.npy")), "array 'conv1.bias' is missing"),
    "float weights": (
        lambda h, b: (h, {**b, "conv1.weight.npy": npy(np.zeros((3, 3, 3, 3)))}),
        "array 'conv1.weight' has dtype float64, not an integer type",
    ),
    "bool shift": (
        lambda h, b: (h, {**b, "conv1.shift.npy": npy(np.ones(3, dtype=bool))}),
        "array 'conv1.shift' has dtype bool",
    ),
    "uint64 beyond int64": (
        lambda h, b: (h, {**b, "conv1.offset.npy": npy(np.full(3, 1 << 63, dtype=np.uint64))}),
        "array 'conv1.offset' holds values beyond the int64 range",
    ),
    "mult of the wrong shape": (
        lambda h, b: (h, {**b, "conv1.mult.npy": npy(np.ones((3, 1), dtype=np.int64))}),
        "op 'conv1': requant mult must have 3 entries",
    ),
    "weight of the wrong rank": (
        lambda h, b: (h, {**b, "conv1.weight.npy": npy(np.ones((3, 27), dtype=np.int8))}),
        r"op 'conv1': weight must be \(O, C, k, k\)",
    ),
    "object array": (
        lambda h, b: (h, {**b, "conv1.bias.npy": npy(np.array([1, "x"], dtype=object), allow_pickle=True)}),
        "has unreadable content",
    ),
    "not an npy blob": (
        lambda h, b: (h, {**b, "conv1.bias.npy": b"\x93NUMPY garbage"}),
        "unreadable content",
    ),
}


@pytest.mark.parametrize("edit,message", STRUCTURE_CASES.values(), ids=STRUCTURE_CASES.keys())
def test_malformed_content_with_a_correct_checksum_is_named(tmp_path, edit, message):
    header, blobs = edit(*file_members(tiny_program()))
    write_ir(tmp_path / "p.ir", header, blobs)
    with pytest.raises(IRError, match=message) as caught:
        load_program(tmp_path / "p.ir")
    assert "\n" not in str(caught.value)
