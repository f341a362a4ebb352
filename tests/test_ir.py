"""The IR file format: round trip, integrity, and validation that names the problem."""

from __future__ import annotations

import dataclasses
import io
import json
import zipfile

import numpy as np
import pytest

from accel_sim.ir import Accumulator, IRError, load_program, program_digest, save_program
from hwq.quant.model import QuantConfig

from .helpers import program_for

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
