"""A training run's directory: which run it holds, and the checks that keep runs apart.

`config.json` records what defines the run with absolute paths, the sha256 of its
checkpoint and a digest of its train/val images, and a run id that its state file
repeats. A resume may name a moved checkpoint or data directory again (`--checkpoint`,
`--data`) as long as the content is the same; any other difference is refused, as is a
state that belongs to another run.
"""

from __future__ import annotations

import hashlib
import json
import os
from pathlib import Path

from accel_sim.ir import atomic_write_bytes

from .. import HwqError
from ..data import Dataset, data_root

CONFIG_FILE = "config.json"
LOG_FILE = "log.jsonl"
STATE_FILE = "state.npz"
LEGACY_STATE_FILE = "state.pkl"  # hwq <= 0.1.0: an unchecked pickle, never read
PATH_SETTINGS = ("checkpoint", "data")  # compared by content, not by path


def check_new_run_dir(out: Path) -> None:
    if (out / STATE_FILE).exists() or (out / LEGACY_STATE_FILE).exists():
        raise HwqError(f"{out} already holds a run; pass --resume or choose another --out")


def read_run_config(out: str | os.PathLike) -> dict:
    """config.json of the run to resume in `out`; a missing run or damaged file is one line."""
    out = Path(out)
    if not (out / STATE_FILE).exists():
        if (out / LEGACY_STATE_FILE).exists():
            raise HwqError(
                f"{out} was made by an older hwq (its state is {LEGACY_STATE_FILE}) and cannot be resumed "
                "by this one; start a new run"
            )
        stopped_early = " (it stopped before its first checkpoint)" if (out / CONFIG_FILE).exists() else ""
        raise HwqError(f"no run to resume in {out}{stopped_early}")
    path = out / CONFIG_FILE
    try:
        saved = json.loads(path.read_text())
    except FileNotFoundError:
        raise HwqError(f"{out} has a state but no {CONFIG_FILE}; the run cannot be resumed") from None
    except (OSError, UnicodeDecodeError, ValueError) as exc:
        raise HwqError(f"{path} is damaged ({type(exc).__name__}); the run cannot be resumed") from None
    if not isinstance(saved, dict) or not all(k in saved for k in ("run_id", "checkpoint", "wbits", "abits")):
        raise HwqError(f"{path} is not the configuration of an hwq train run")
    return saved


def absolute_checkpoint(spec: str) -> str:
    """A checkpoint file as an absolute path (a run resumes from any directory); a known
    name such as 'resnet20' stays a name."""
    path = Path(spec).expanduser()
    return str(path.absolute()) if path.exists() else spec


def absolute_data(data: str | None) -> str:
    """The data directory the run reads, made absolute ($HWQ_DATA and the default resolved)."""
    return str(data_root(data).absolute())


def checkpoint_sha256(spec: str) -> str:
    from ..quant.model import file_sha256, resolve_checkpoint

    return file_sha256(resolve_checkpoint(spec))


def images_sha256(*splits: Dataset) -> str:
    """Digest of the images and labels of the splits, in order: the same content gives the
    same digest wherever the files are and however they were pickled."""
    h = hashlib.sha256()
    for ds in splits:
        for tensor in (ds.images, ds.labels):
            h.update(tensor.contiguous().numpy().tobytes())
    return h.hexdigest()


def config_sha256(defining: dict, checkpoint_digest: str, data_digest: str) -> str:
    """Digest of what defines the run, its checkpoint and data by content, not path."""
    content = {k: v for k, v in defining.items() if k not in PATH_SETTINGS}
    content |= {"checkpoint_sha256": checkpoint_digest, "data_sha256": data_digest}
    return hashlib.sha256(json.dumps(content, sort_keys=True).encode()).hexdigest()


def check_same_settings(saved: dict, defining: dict) -> None:
    differ = [k for k in defining if k not in PATH_SETTINGS and saved.get(k) != defining[k]]
    if differ:
        raise HwqError(f"--resume with settings that differ from the run's: {', '.join(differ)}")


def check_inputs_exist(now: dict) -> None:
    """On resume: the checkpoint and data directory must be where the configuration says
    (a checkpoint given by name, such as 'resnet20', is found by name)."""
    for key in PATH_SETTINGS:
        path = Path(now[key])
        if path.is_absolute() and not path.exists():
            raise HwqError(
                f"the run's {key} {path} does not exist; if it moved, give its new place with --{key}"
            )


def check_same_content(saved: dict, now: dict, checkpoint_digest: str, data_digest: str) -> None:
    """The checkpoint and images a resume reads must be the run's, wherever they now are."""
    if checkpoint_digest != saved.get("checkpoint_sha256"):
        if now["checkpoint"] != saved["checkpoint"]:
            raise HwqError(
                f"--checkpoint {now['checkpoint']} is not the run's checkpoint {saved['checkpoint']}: "
                "their sha256 differ"
            )
        raise HwqError(f"the run's checkpoint {saved['checkpoint']} changed since the run started (sha256)")
    if data_digest != saved.get("data_sha256"):
        raise HwqError(
            f"--data {now['data']} does not hold the run's train/val images (from {saved['data']}): "
            "their digests differ"
        )


def truncate_log(path: Path, generation: int) -> None:
    """Keep the log lines up to the checkpoint's generation: those a killed run wrote after
    its last checkpoint are written again by the resumed run, and a last line cut short by
    the kill is dropped."""
    if not path.exists():
        return
    lines = path.read_bytes().split(b"\n")
    kept = []
    for number, line in enumerate(lines, 1):
        if not line.strip():
            continue
        try:
            if json.loads(line)["generation"] <= generation:
                kept.append(line)
        except (ValueError, KeyError, TypeError):
            if number == len(lines):  # the last line, without its newline: cut short
                break
            raise HwqError(f"{path} line {number} is damaged; the run cannot be resumed") from None
    atomic_write_bytes(path, b"".join(line + b"\n" for line in kept))
