"""The results store: one folder per run, every file written to a temporary name and renamed.

``<results>/runs/<dataset>[-<protocol>]/<method>[-<variant>][+<tag>]/<profile>/seed-<k>/`` holds ``config.yaml``,
``train_log.csv``, ``ckpt/last.pt``, ``per_image.csv``, ``groups.csv``, ``metrics.json`` and ``run.json``, written last as
the completion marker. A folder with ``run.json`` is finished; one with ``ckpt/last.pt`` resumes.

Reliability (see README, "Reliability"): a write that fails (a full disk, a read-only folder) is a
:class:`WriteFailed` naming the file and leaves the previous version of the file in place; every checkpoint
``X.pt`` has a checksum file ``X.pt.sha256`` beside it, verified before the checkpoint is read; a run folder is
held by one command at a time through :class:`FolderLock`.
"""

from __future__ import annotations

import errno
import hashlib
import io
import json
import os
import shutil
import socket
import sys
import tempfile
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import yaml

from .errors import UserError

RUNS = "runs"
TIMING = "timing"  # <results>/timing/<device>/<dataset>__<label>.json, written by `amisbench timing`
RESULTS_ENV = "AMISBENCH_RESULTS"


def default_results() -> Path:
    """The results folder when no ``--results`` is given: ``$AMISBENCH_RESULTS``, else ``./results``."""
    return Path(os.environ.get(RESULTS_ENV, "results"))


def run_label(method: str, variant: str | None = None, tag: str | None = None) -> str:
    """``method[-variant][+tag]``: the name of a run's folder and of its row in the tables (the one place it is
    built; :meth:`RunSpec.parse_label` splits it)."""
    return method + (f"-{variant}" if variant else "") + (f"+{tag}" if tag else "")


@dataclass
class RunSpec:
    """One run: what names its folder (method, variant, tag, dataset, protocol, profile, seed) and how the
    command runs it (overrides, data folder, device, results folder).

    ``data_root`` and ``protocol`` are typed settings that the runner sets on the resolved dataset config
    (``dataset.root`` / ``dataset.protocol``); ``sets`` are ``section.key=value`` overrides and
    ``set_labels`` where each came from (default ``--set``, for ``--print-config``).
    """

    method: str
    dataset: str
    seed: int = 0
    profile: str = "quick"
    variant: str | None = None
    sets: list[str] | None = None
    device: str = "cpu"
    results: Path | str | None = None
    force: bool = False
    data_root: str | None = None
    protocol: str | None = None
    tag: str | None = None  # the run folder is <method>[-<variant>]+<tag>: a changed setting beside the others
    set_labels: list[str] | None = None
    estimate: bool = True  # time a short warm-up and print the expected time before training (not quiet)

    @property
    def label(self) -> str:
        """``method[-variant][+tag]``."""
        return run_label(self.method, self.variant, self.tag)

    @property
    def dataset_label(self) -> str:
        """``dataset[-protocol]``: the folder of the dataset's runs."""
        return self.dataset if not self.protocol else f"{self.dataset}-{self.protocol}"

    def path(self, root: Path | str) -> Path:
        """``<root>/runs/<dataset>[-<protocol>]/<method>[-<variant>][+<tag>]/<profile>/seed-<k>``."""
        return Path(root) / RUNS / self.dataset_label / self.label / self.profile / f"seed-{self.seed}"

    @staticmethod
    def parse_label(label: str) -> tuple[str, str | None, str | None]:
        """``method[-variant][+tag]`` -> (method, variant or None, tag or None); method names hold no ``-``
        and tags no ``+``, a tag may hold ``-`` (``ssn+lr3e-4``).

        Example:
            >>> RunSpec.parse_label("atfm-act_gtr+lr3e-4")
            ('atfm', 'act_gtr', 'lr3e-4')
        """
        head, _, tag = label.partition("+")
        method, _, variant = head.partition("-")
        return method, variant or None, tag or None


class WriteFailed(UserError):
    """A file of the results could not be written (disk full, read-only folder, a file where a folder should
    be); the previous version of the file, if any, is untouched."""

    def __init__(self, path: Path, err: OSError):
        self.path, self.errno = Path(path), err.errno
        super().__init__(f"cannot write {path}: {write_problem(err)}")


def write_problem(err: OSError) -> str:
    """What an OSError of a write means, in words (the strerror, with the usual causes spelled out)."""
    if err.errno in (errno.ENOSPC, errno.EDQUOT):
        return "no space left on the device (the disk or quota is full)"
    if err.errno in (errno.EACCES, errno.EPERM, errno.EROFS):
        return f"the folder is not writable ({err.strerror or err})"
    if err.errno in (errno.ENOTDIR, errno.EEXIST):
        return f"a part of the path is a file, not a folder ({err.strerror or err})"
    return str(err.strerror or err)


def _process_umask() -> int:
    """The process's umask (read once: setting it back at once is the only way to read it)."""
    mask = os.umask(0o022)
    os.umask(mask)
    return mask


_UMASK = _process_umask()


def _new_file_mode(path: Path) -> int:
    """The mode a plain ``open(path, "w")`` would leave: an existing file's own, else 0o666 less the umask
    (a temporary file of :mod:`tempfile` is 0o600, which would hide results pages and tables from others)."""
    try:
        return path.stat().st_mode & 0o7777
    except OSError:
        return 0o666 & ~_UMASK


def atomic_write_bytes(path: Path, data: bytes) -> None:
    """Write ``data`` to a temporary file ``.<name>.<random>.tmp`` beside ``path``, fsync, and rename it over
    ``path``: readers see the old or the new file, never a part; the file gets the mode ``open()`` would give
    it. Raises :class:`WriteFailed` on an OSError."""
    path = Path(path)
    tmp = None
    try:
        path.parent.mkdir(parents=True, exist_ok=True)
        fd, tmp = tempfile.mkstemp(prefix=f".{path.name}.", suffix=".tmp", dir=path.parent)
        if hasattr(os, "fchmod"):
            os.fchmod(fd, _new_file_mode(path))
        with os.fdopen(fd, "wb") as f:
            f.write(data)
            f.flush()
            os.fsync(f.fileno())
        os.replace(tmp, path)
    except OSError as e:
        if tmp is not None:
            Path(tmp).unlink(missing_ok=True)
        raise WriteFailed(path, e) from None
    except BaseException:
        if tmp is not None:
            Path(tmp).unlink(missing_ok=True)
        raise


def clean_temporaries(folder: Path) -> list[Path]:
    """Remove the ``.<name>.<random>.tmp`` files that :func:`atomic_write_bytes` leaves when its process is
    killed mid-write (e.g. ``ckpt/.last.pt.k2j4.tmp``). Call it only while holding the folder's
    :class:`FolderLock`, so that no live writer owns them."""
    removed = []
    folder = Path(folder)
    if folder.is_dir():
        for p in folder.rglob(".*.tmp"):
            if p.is_file():
                p.unlink(missing_ok=True)
                removed.append(p)
    return removed


def atomic_write_text(path: Path, text: str) -> None:
    atomic_write_bytes(path, text.encode())


def write_json(path: Path, obj: Any) -> None:
    atomic_write_text(path, json.dumps(obj, indent=2, sort_keys=True, allow_nan=True) + "\n")


def write_yaml(path: Path, obj: Any) -> None:
    atomic_write_text(path, yaml.safe_dump(obj, sort_keys=False))


CHECKSUM_SUFFIX = ".sha256"


def sha256_file(path: Path) -> str:
    h = hashlib.sha256()
    with open(path, "rb") as f:
        while chunk := f.read(1 << 24):
            h.update(chunk)
    return h.hexdigest()


def checksum_path(path: Path) -> Path:
    """The checksum file of a checkpoint: ``ckpt/last.pt`` -> ``ckpt/last.pt.sha256``."""
    path = Path(path)
    return path.with_name(path.name + CHECKSUM_SUFFIX)


def _read_checksums(path: Path) -> list[str]:
    try:
        return [w for w in checksum_path(path).read_text().split() if len(w) == 64]
    except (OSError, UnicodeDecodeError):
        return []


def save_torch(path: Path, obj: Any) -> None:
    """Save a checkpoint (any name: ``last.pt``, ``best.pt``, ...) atomically with its sha256 beside it.

    The order keeps every moment consistent: the checksum file first lists the new hash and those it listed
    already, then the checkpoint is renamed into place, then the checksum file keeps the new hash only; a
    process killed at any point leaves a checkpoint whose hash is listed.
    """
    import torch  # here, so that reading results (tables) does not import torch

    buf = io.BytesIO()
    torch.save(obj, buf)
    data = buf.getvalue()
    new = hashlib.sha256(data).hexdigest()
    old = _read_checksums(path) if Path(path).is_file() else []  # all: an earlier save may have been killed
    atomic_write_text(checksum_path(path), "\n".join([new, *old]) + "\n")
    atomic_write_bytes(path, data)
    if old:
        atomic_write_text(checksum_path(path), new + "\n")


class CheckpointError(UserError):
    """A checkpoint of a run folder that fails its checksum, cannot be read, or does not hold what it should."""


def load_torch(path: Path, map_location: Any = "cpu") -> Any:
    """Load a checkpoint written by :func:`save_torch`: its sha256 is checked against ``<path>.sha256`` first,
    then it is read with ``weights_only=True`` (tensors, containers and plain values only).

    Raises:
        CheckpointError: no checksum file, a checksum that differs (a flipped bit, a truncated or replaced
            file), or a file torch cannot read. (A user's own release checkpoint, e.g. SAM's, is read by its
            method with ``torch.load(weights_only=True)`` and carries no checksum file.)
    """
    import torch

    path = Path(path)
    fix = "delete the ckpt folder or pass --force to train again"
    listed = _read_checksums(path)
    if not listed:
        raise CheckpointError(f"checkpoint {path} has no checksum file {checksum_path(path).name} beside it, so it "
                              f"cannot be verified; {fix}")
    try:
        digest = sha256_file(path)
    except OSError as e:
        raise CheckpointError(f"checkpoint {path} cannot be read ({e.strerror or e}); {fix}") from None
    if digest not in listed:
        raise CheckpointError(f"checkpoint {path} does not match its checksum in {checksum_path(path).name}: the "
                              f"file is damaged or was replaced; {fix}")
    try:
        return torch.load(path, map_location=map_location, weights_only=True)
    except Exception as e:  # noqa: BLE001 - any failure of torch's reader is a damaged file here
        raise CheckpointError(f"checkpoint {path} cannot be read ({type(e).__name__}); {fix}") from None


def is_done(path: Path) -> bool:
    return (Path(path) / "run.json").is_file()


def read_json(path: Path, what: str, required: dict[str, type | tuple[type, ...]] | None = None) -> dict:
    """A JSON object from a results file, or a one-sentence :class:`UserError` naming the file and what is
    wrong with it (unreadable, empty, half-written, not an object, a missing or wrong-typed key)."""
    path = Path(path)
    try:
        text = path.read_text(encoding="utf-8")
    except UnicodeDecodeError:
        raise UserError(f"{what} {path} is not UTF-8 text; the file is damaged") from None
    except OSError as e:
        raise UserError(f"{what} {path} cannot be read ({e.strerror or e})") from None
    if not text.strip():
        raise UserError(f"{what} {path} is empty; the file is damaged")
    try:
        doc = json.loads(text)
    except ValueError as e:
        raise UserError(f"{what} {path} is not valid JSON (half-written or damaged: {e})") from None
    if not isinstance(doc, dict):
        raise UserError(f"{what} {path} holds a JSON {type(doc).__name__}, expected an object")
    for key, types in (required or {}).items():
        if key not in doc:
            raise UserError(f"{what} {path} lacks the key '{key}'; the file is damaged")
        if not isinstance(doc[key], types) or isinstance(doc[key], bool) and bool not in (
                types if isinstance(types, tuple) else (types,)):
            names = " or ".join(t.__name__ for t in (types if isinstance(types, tuple) else (types,)))
            raise UserError(f"{what} {path}: '{key}' is {type(doc[key]).__name__} {doc[key]!r}, expected {names}")
    return doc


RUN_JSON_KEYS: dict[str, type | tuple[type, ...]] = {"method": str, "dataset": str, "profile": str, "seed": int}


def read_run_info(folder: Path) -> dict:
    """``run.json`` of a finished run folder, checked (see :func:`read_json`)."""
    return read_json(Path(folder) / "run.json", "run file", RUN_JSON_KEYS)


def read_metrics(folder: Path) -> dict[str, float]:
    """``metrics.json`` of a finished run folder: metric -> number."""
    path = Path(folder) / "metrics.json"
    doc = read_json(path, "metrics file")
    for key, value in doc.items():
        if not isinstance(value, (int, float)) or isinstance(value, bool):
            raise UserError(f"metrics file {path}: '{key}' is {type(value).__name__} {value!r}, expected a number")
    return doc


def finished_hash(path: Path) -> str | None:
    """Config hash of the finished run in ``path``; None when unfinished. A damaged run.json is a UserError."""
    if not is_done(path):
        return None
    return read_json(Path(path) / "run.json", "run file", {"config_hash": str})["config_hash"]


# ----------------------------------------------------------------------------------------------------
# output folders and locks
# ----------------------------------------------------------------------------------------------------

MIN_FREE_BYTES = 16 << 20  # a results folder with less free space than this is refused before a run starts


def check_output_dir(path: Path, flag: str) -> Path:
    """Refuse an output folder that cannot be written before anything runs: a file where the folder (or one of
    its parents) should be, a read-only place, or a full disk. Writes nothing."""
    path = Path(path)
    if path.exists() and not path.is_dir():
        raise UserError(f"{flag} {path}: is a file, expected a folder")
    probe = path
    while not probe.exists():
        if probe.parent == probe:
            break
        probe = probe.parent
    if probe.exists() and not probe.is_dir():
        raise UserError(f"{flag} {path}: {probe} is a file, so the folder cannot be created there")
    if probe.exists() and not os.access(probe, os.W_OK | os.X_OK):
        raise UserError(f"{flag} {path}: {probe} is not writable")
    try:
        free = shutil.disk_usage(probe).free
    except OSError:
        return path
    if free < MIN_FREE_BYTES:
        raise UserError(f"{flag} {path}: the disk is full ({free / 2**20:.1f} MiB free, at least "
                        f"{MIN_FREE_BYTES >> 20} MiB needed)")
    return path


def check_output_file(path: Path, flag: str) -> Path:
    """Refuse an output file that cannot be written (a folder, a read-only or missing place) before any work."""
    path = Path(path)
    if path.is_dir():
        raise UserError(f"{flag} {path}: is a folder, expected a file name")
    parent = path.parent if str(path.parent) else Path(".")
    if not parent.exists():
        raise UserError(f"{flag} {path}: the folder {parent} does not exist")
    if not parent.is_dir():
        raise UserError(f"{flag} {path}: {parent} is a file, not a folder")
    if not os.access(parent, os.W_OK | os.X_OK) or (path.exists() and not os.access(path, os.W_OK)):
        raise UserError(f"{flag} {path}: the folder {parent} is not writable")
    return path


class FolderBusy(UserError):
    """Another live process holds the lock of a run folder."""


def lock_path(folder: Path) -> Path:
    """The lock file of a run folder: ``.seed-0.lock`` beside ``seed-0/`` (outside it, so --force can delete
    the folder while the lock is held; hidden, so no scan takes it for a run)."""
    folder = Path(folder)
    return folder.parent / f".{folder.name}.lock"


class FolderLock:
    """Exclusive lock of one run folder for the life of one command.

    ``fcntl.flock`` on :func:`lock_path`: the kernel releases it when the process ends in any way (kill -9
    included), so a lock is never stale. The holder writes its pid, host, start time and command into the file;
    a second command reads them to say who holds the folder and raises :class:`FolderBusy`. On release the file
    and the folders created only for it are removed (so a refused run leaves nothing behind); a process that
    locked a file which was unlinked meanwhile notices (inode check) and locks the new one.
    """

    def __init__(self, folder: Path, what: str = "run folder"):
        self.folder = Path(folder)
        self.path = lock_path(self.folder)
        self.what = what
        self._fd: int | None = None
        self._created: list[Path] = []

    def __enter__(self) -> "FolderLock":
        import fcntl

        created = []
        d = self.path.parent
        while not d.exists() and d.parent != d:
            created.append(d)
            d = d.parent
        for _ in range(100):
            try:
                self.path.parent.mkdir(parents=True, exist_ok=True)
                fd = os.open(self.path, os.O_RDWR | os.O_CREAT, 0o644)
            except FileNotFoundError:  # a parent was removed by another releasing lock: try again
                continue
            except OSError as e:
                raise WriteFailed(self.path, e) from None
            try:
                fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
            except BlockingIOError:
                holder = _holder(fd)
                os.close(fd)
                raise FolderBusy(f"{self.folder} is in use by another amisbench command ({holder}); wait for it to "
                                 f"end or stop it, then rerun (the {self.what} is never shared)") from None
            try:
                same = os.fstat(fd).st_ino == os.stat(self.path).st_ino
            except FileNotFoundError:
                same = False
            if not same:  # the file was unlinked by a releasing holder after we opened it
                os.close(fd)
                continue
            info = {"pid": os.getpid(), "host": socket.gethostname(),
                    "started": time.strftime("%Y-%m-%dT%H:%M:%S%z"), "command": _command_line()}
            try:
                os.ftruncate(fd, 0)
                os.pwrite(fd, (json.dumps(info) + "\n").encode(), 0)
            except OSError as e:
                os.close(fd)
                raise WriteFailed(self.path, e) from None
            self._fd = fd
            self._created = created
            return self
        raise UserError(f"{self.path}: could not take the lock (the file keeps changing)")

    def __exit__(self, *exc: Any) -> None:
        self.release()

    def release(self) -> None:
        if self._fd is None:
            return
        try:
            self.path.unlink(missing_ok=True)  # still holding it: no one can lock the unlinked file after us
        finally:
            os.close(self._fd)
            self._fd = None
        for d in self._created:  # innermost first
            try:
                d.rmdir()
            except OSError:
                break


def _command_line() -> str:
    import shlex

    argv = list(sys.argv)
    if argv and argv[0].endswith(("cli.py", "__main__.py", "amisbench")):
        argv[0] = "amisbench"
    return shlex.join(argv)


def _holder(fd: int) -> str:
    try:
        info = json.loads(os.pread(fd, 4096, 0).decode() or "{}")
        return (f"pid {info['pid']} on {info['host']} since {info['started']}: {info['command']}")
    except (OSError, ValueError, KeyError, TypeError):
        return "holder unknown: it has just started"
