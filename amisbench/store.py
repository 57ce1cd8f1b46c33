"""The results store: one folder per run, every file written to a temporary name and renamed.

``<results>/runs/<dataset>[-<protocol>]/<method>[-<variant>]/<profile>/seed-<k>/`` holds ``config.yaml``,
``train_log.csv``, ``ckpt/last.pt``, ``per_image.csv``, ``metrics.json`` and ``run.json``, written last as
the completion marker. A folder with ``run.json`` is finished; one with ``ckpt/last.pt`` resumes.
"""

from __future__ import annotations

import io
import json
import os
import tempfile
from pathlib import Path
from typing import Any

import yaml

RUNS = "runs"
TIMING = "timing"  # <results>/timing/<device>/<dataset>__<label>.json, written by `amisbench timing`


def run_dir(results: Path | str, dataset: str, method: str, profile: str, seed: int,
            variant: str | None = None, protocol: str | None = None) -> Path:
    ds = dataset if not protocol else f"{dataset}-{protocol}"
    m = method if not variant else f"{method}-{variant}"
    return Path(results) / RUNS / ds / m / profile / f"seed-{seed}"


def atomic_write_bytes(path: Path, data: bytes) -> None:
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(prefix=f".{path.name}.", suffix=".tmp", dir=path.parent)
    try:
        with os.fdopen(fd, "wb") as f:
            f.write(data)
            f.flush()
            os.fsync(f.fileno())
        os.replace(tmp, path)
    except BaseException:
        Path(tmp).unlink(missing_ok=True)
        raise


def atomic_write_text(path: Path, text: str) -> None:
    atomic_write_bytes(path, text.encode())


def write_json(path: Path, obj: Any) -> None:
    atomic_write_text(path, json.dumps(obj, indent=2, sort_keys=True, allow_nan=True) + "\n")


def write_yaml(path: Path, obj: Any) -> None:
    atomic_write_text(path, yaml.safe_dump(obj, sort_keys=False))


def save_torch(path: Path, obj: Any) -> None:
    import torch  # here, so that reading results (tables) does not import torch

    buf = io.BytesIO()
    torch.save(obj, buf)
    atomic_write_bytes(path, buf.getvalue())


def load_torch(path: Path, map_location: Any = "cpu") -> Any:
    """Load a checkpoint with ``weights_only=True`` (tensors, containers and plain values only)."""
    import torch

    return torch.load(path, map_location=map_location, weights_only=True)


def is_done(path: Path) -> bool:
    return (Path(path) / "run.json").is_file()


def finished_hash(path: Path) -> str | None:
    """Config hash of the finished run in ``path`` (None when unfinished or its run.json is unreadable)."""
    try:
        return json.loads((Path(path) / "run.json").read_text()).get("config_hash")
    except (OSError, ValueError):
        return None
