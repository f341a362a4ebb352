"""The state file of a training run: a nested dict of JSON values and numpy arrays, saved
atomically, that cannot run code when read and says which run it belongs to.

The file is an ordinary `.npz` (`np.load(path, allow_pickle=False)` opens it): one `.npy`
member per array, and `__header__`, the UTF-8 JSON of the tree with every array replaced
by `{"__array__": name}`, beside the file's format, version and the identity of its run
(whatever the caller names it by, e.g. a run id and digests of its configuration). A
truncated, random or foreign file is refused with one line; tuples come back as lists
and numpy scalars as Python numbers, everything else as it went in.
"""

from __future__ import annotations

import io
import json
import os
import zipfile
from pathlib import Path
from typing import Any

import numpy as np

from accel_sim.ir import atomic_write_bytes

from .. import HwqError

FORMAT = "hwq-train-state"
VERSION = 1
HEADER = "__header__"
ARRAY = "__array__"


def encode(tree: Any, arrays: dict[str, np.ndarray]) -> Any:
    """`tree` as JSON values, its arrays moved into `arrays` (named a0, a1, ...)."""
    if isinstance(tree, dict):
        if ARRAY in tree or not all(isinstance(k, str) for k in tree):
            raise TypeError(f"state dicts need str keys other than {ARRAY!r}: {list(tree)[:5]}")
        return {k: encode(v, arrays) for k, v in tree.items()}
    if isinstance(tree, list | tuple):
        return [encode(v, arrays) for v in tree]
    if isinstance(tree, np.ndarray):
        if tree.dtype.hasobject:
            raise TypeError("object arrays cannot be stored in a state")
        name = f"a{len(arrays)}"
        arrays[name] = tree
        return {ARRAY: name}
    if isinstance(tree, np.generic):
        return tree.item()
    if tree is None or isinstance(tree, bool | int | float | str):
        return tree
    raise TypeError(f"a state holds JSON values and numpy arrays, not {type(tree).__name__}")


def decode(tree: Any, arrays: Any) -> Any:
    if isinstance(tree, dict):
        if set(tree) == {ARRAY}:
            return arrays[tree[ARRAY]]
        return {k: decode(v, arrays) for k, v in tree.items()}
    if isinstance(tree, list):
        return [decode(v, arrays) for v in tree]
    return tree


def write_state(path: str | os.PathLike, state: dict, identity: dict) -> None:
    """Save `state` for the run `identity` names; a reader never sees half a file."""
    arrays: dict[str, np.ndarray] = {}
    header = {"format": FORMAT, "version": VERSION, "identity": identity, "state": encode(state, arrays)}
    header_bytes = np.frombuffer(json.dumps(header).encode(), dtype=np.uint8)
    buf = io.BytesIO()
    np.savez(buf, allow_pickle=False, **{HEADER: header_bytes}, **arrays)
    atomic_write_bytes(Path(path), buf.getvalue())


def read_state(path: str | os.PathLike) -> tuple[dict, dict]:
    """The state and the identity it was saved with; any damage is one line of HwqError."""
    path = Path(path)
    try:
        with np.load(path, allow_pickle=False) as npz:
            if not isinstance(npz, np.lib.npyio.NpzFile) or HEADER not in npz.files:
                raise HwqError(f"{path} is not an hwq training state")
            header = json.loads(npz[HEADER].tobytes())
            if not isinstance(header, dict) or header.get("format") != FORMAT:
                raise HwqError(f"{path} is not an hwq training state")
            if header.get("version") != VERSION:
                raise HwqError(
                    f"{path} is a training state of version {header.get('version')}; "
                    f"this hwq reads version {VERSION}"
                )
            arrays = {name: npz[name] for name in npz.files if name != HEADER}
            return decode(header["state"], arrays), header["identity"]
    except HwqError:
        raise
    except (OSError, ValueError, EOFError, KeyError, TypeError, zipfile.BadZipFile, MemoryError) as exc:
        raise HwqError(f"{path} is damaged: not a readable training state ({type(exc).__name__})") from None


def check_identity(path: str | os.PathLike, stored: dict, expected: dict) -> None:
    """Refuse a state saved by another run: every key of `expected` must match."""
    differ = [k for k, v in expected.items() if stored.get(k) != v]
    if differ:
        raise HwqError(
            f"{path} belongs to another run (its {', '.join(differ)} differ from this run's); "
            "a state cannot be moved between runs"
        )
