"""The prepared layout of a real dataset: what ``amisbench data prepare`` writes and the adapters read.

::

    DIR/
      manifest.json          format, kind, source (format, file name, sha256), count, readers, image shape,
                             every file below with bytes + sha256 (+ shape/dtype for .npy), the protocols
      images.npy             (N,C,H,W) float32 in [0,1] (LIDC) or uint8 0..255 (ISIC3); open with mmap_mode
      masks.npy              (N,A,H,W) uint8 in {0,1}, reader slot = axis 1
      meta.csv               one row per image: id, group, patient, series, readers, source_key,
                             source_split, source_index, extra (see each converter)
      splits/<protocol>/{train,val,test}.txt   the ID lists of each protocol's default split, one id a line

The folder is built under a temporary sibling name and renamed at the end, so a failed or interrupted
prepare leaves nothing that looks like a prepared folder. :class:`Prepared` verifies the manifest on open
(sizes, ``.npy`` headers, sha256 of every file, cached per process) so that a truncated or edited file is
reported instead of read.
"""

from __future__ import annotations

import csv
import errno
import hashlib
import io
import json
import os
import re
import secrets
import shutil
from collections import Counter
from pathlib import Path
from typing import Any, Iterable

import numpy as np

from amisbench.errors import UserError
from amisbench.store import sha256_file, write_problem

FORMAT = "amisbench-prepared"
VERSION = 1
SPLITS = ("train", "val", "test")
READ_FILES = ("images.npy", "masks.npy", "meta.csv")  # opened by every reader; the split lists are checked on use
META_COLUMNS = ("id", "group", "patient", "series", "readers", "source_key", "source_split", "source_index",
                "extra")


# ----------------------------------------------------------------------------------------------------
# splits
# ----------------------------------------------------------------------------------------------------

def group_split(groups: list[str], val_fraction: float, test_fraction: float, seed: int
                ) -> dict[str, list[int]]:
    """Group-disjoint split of rows: no group is cut.

    Groups are ordered by ``sha256(seed, group)`` (stable: adding a patient elsewhere does not move the
    others) and filled into test, then val, until each holds at least its fraction of the rows; the rest
    is train. Rows keep their source order within a split.

    Args:
        groups: the group of each row.
        val_fraction, test_fraction: wanted fractions of rows, each in [0, 1), summing below 1.
        seed: the split seed.

    Returns:
        Row indices per split (``train``, ``val``, ``test``).
    """
    if not (0 <= val_fraction < 1 and 0 <= test_fraction < 1 and val_fraction + test_fraction < 1):
        raise UserError(f"dataset.val_fraction and dataset.test_fraction: expected fractions in [0, 1) that sum "
                        f"to less than 1, got {val_fraction} and {test_fraction}")
    count = Counter(groups)
    order = sorted(count, key=lambda g: (hashlib.sha256(f"{seed}\0{g}".encode()).hexdigest(), g))
    n = len(groups)
    target = {"test": test_fraction * n, "val": val_fraction * n}
    filled = {"test": 0, "val": 0}
    assign: dict[str, str] = {}
    for g in order:
        for s in ("test", "val"):
            if filled[s] < target[s]:
                assign[g] = s
                filled[s] += count[g]
                break
        else:
            assign[g] = "train"
    out: dict[str, list[int]] = {s: [] for s in SPLITS}
    for i, g in enumerate(groups):
        out[assign[g]].append(i)
    return out


def release_permutation(n: int) -> list[int]:
    """The shuffle of the ATFM and Zepf et al. dataloaders: ``indices = list(range(n));
    np.random.seed(42); np.random.shuffle(indices)`` (here with a local ``RandomState(42)``, the same
    stream, so the global numpy state is left alone)."""
    indices = list(range(n))
    np.random.RandomState(42).shuffle(indices)
    return indices


def release_cut(n: int, fraction: float) -> int:
    """``int(np.floor(fraction * n))``, the releases' split sizes (``dataloaders.py``)."""
    return int(np.floor(fraction * n))


def atfm_paper_split(n: int) -> dict[str, list[int]]:
    """The slice-level split of the ATFM release (leaky; reproduced for comparability).

    ``get_dataloader_2(splitratio=[0.8, 0.0, 0.2])`` of the release's ``dataloaders.py``: SFM trains on
    ``perm[:floor(0.8 n)]`` of :func:`release_permutation` (``randomsplit=True``, ``train_prior_*.py``), the
    test set is the *unshuffled* ``[floor(0.8 n), n)`` (``randomsplit=False``, ``test_prior_*.py``), so about
    80 % of the test rows are training rows. For N = 15,096 LIDC slices: 12,076 train, 3,020 test. The
    release has no validation set; ``val`` is the test set. Training rows are listed in permutation order.
    On ISIC3 the release splits each style subset (one entry per image, in image order) the same way, so
    the split by image is this one with n = number of images.
    """
    n_train = release_cut(n, 0.8)
    test = list(range(n_train, n))
    return {"train": release_permutation(n)[:n_train], "val": list(test), "test": test}


def atfm_gtr_rows(n: int) -> list[int]:
    """The rows the ATFM release trains GTR on: ``perm[:floor(0.6 n)]`` of the same permutation
    (``train_GTR.py`` calls ``get_dataloader(splitratio=[0.6, 0.2, 0.2], randomsplit=True)``); 9,057 of
    15,096 LIDC slices, all of them inside the SFM training rows."""
    return release_permutation(n)[:release_cut(n, 0.6)]


def zepf_split(n: int) -> dict[str, list[int]]:
    """Zepf et al.'s ISIC3 split (``dataloaders.py`` of kilianzepf/conditioned_uncertain_segmentation, called
    without ``randomsplit``): contiguous and unshuffled, ``[0, floor(0.6 n))`` train, the next
    ``floor(0.2 n)`` val, the rest test, cut in each style subset; with one mask of each style per image
    every subset lists the images in the same order, so this is a split by image."""
    n_train, n_val = release_cut(n, 0.6), release_cut(n, 0.2)
    return {"train": list(range(n_train)), "val": list(range(n_train, n_train + n_val)),
            "test": list(range(n_train + n_val, n))}


def check_disjoint(groups: list[str], split: dict[str, list[int]], where: str) -> None:
    """Raise :class:`UserError` when a group sits in two splits."""
    seen: dict[str, str] = {}
    for s in SPLITS:
        for i in split[s]:
            g = groups[i]
            if seen.setdefault(g, s) != s:
                raise UserError(f"{where}: group '{g}' is in both the {seen[g]} and the {s} split, so the split "
                                "stored in the source is not leak-free")


def id_list_text(ids: Iterable[str]) -> str:
    return "".join(f"{i}\n" for i in ids)


def split_hash(ids: Iterable[str]) -> str:
    """sha256 of a split's ID list, as written in its ``splits/<protocol>/<split>.txt`` file."""
    return hashlib.sha256(id_list_text(ids).encode()).hexdigest()


# ----------------------------------------------------------------------------------------------------
# writing
# ----------------------------------------------------------------------------------------------------

_BAD_ID = re.compile(r"[\x00-\x1f\x7f/\\]")
_CONTROL = re.compile(r"[\x00-\x1f\x7f]")


def check_id_part(part: str, where: str, separators: bool = True) -> str:
    """An id (or one component of a composed id such as ``<patient>/<stem>``) from a source: printable, no path
    separator, not empty, ``.`` or ``..``. Ids are written one a line in the split files and shown in tables.
    ``separators=False`` checks a composed id for control characters only."""
    m = (_BAD_ID if separators else _CONTROL).search(part)
    if m:
        what = "a path separator" if m.group() in "/\\" else f"the control character U+{ord(m.group()):04X}"
        raise UserError(f"{where}: the id {part!r} holds {what}; ids must be printable names without / or \\")
    if separators and part in ("", ".", ".."):
        raise UserError(f"{where}: the id {part!r} is not a name")
    return part


def not_finite(a: np.ndarray) -> str | None:
    """'NaN' / 'inf' when the float array holds such values (named as such), else None."""
    if a.dtype.kind != "f":
        return None
    if np.isnan(a).any():
        return f"NaN ({int(np.isnan(a).sum())} values)"
    if np.isinf(a).any():
        return f"infinite values ({int(np.isinf(a).sum())})"
    return None


def _pid_alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except (PermissionError, OSError):
        return True
    return True


def clean_partials(out: Path) -> list[Path]:
    """Remove ``.<name>.partial-<pid>-<hex>/`` folders of ``out`` left by a killed prepare (its pid no longer
    runs); a live prepare's folder is left alone."""
    removed = []
    pattern = re.compile(re.escape(f".{out.name}.partial-") + r"(\d+)-[0-9a-f]+")
    try:
        siblings = list(out.parent.iterdir()) if out.parent.is_dir() else []
    except OSError:
        return removed
    for p in siblings:
        m = pattern.fullmatch(p.name)
        if m and p.is_dir() and not _pid_alive(int(m.group(1))):
            shutil.rmtree(p, ignore_errors=True)
            removed.append(p)
    return removed


def check_out(out: Path) -> Path:
    """Refuse an ``--out`` that exists and is not an empty folder."""
    out = Path(out).expanduser()
    if out.exists():
        if not out.is_dir():
            raise UserError(f"--out {out}: exists and is not a folder; give a new folder name")
        if any(out.iterdir()):
            raise UserError(f"--out {out}: the folder exists and is not empty; give a new folder (nothing is "
                            "overwritten)")
    return out


def reserve(path: Path) -> None:
    """Allocate the whole file on disk (``posix_fallocate``) where the system supports it."""
    if not hasattr(os, "posix_fallocate"):
        return
    with open(path, "r+b") as f:
        try:
            os.posix_fallocate(f.fileno(), 0, os.fstat(f.fileno()).st_size)
        except OSError as e:
            if e.errno in (errno.ENOSPC, errno.EDQUOT):
                raise
            # EOPNOTSUPP / EINVAL: a file system without fallocate; the writes find out instead


class PreparedWriter:
    """Builds a prepared folder under a temporary sibling name; :meth:`commit` renames it into place.

    Use as a context manager: on any exception the temporary folder is removed.
    """

    def __init__(self, out: Path | str, kind: str):
        self.out = check_out(Path(out))
        self.kind = kind
        self.tmp = self.out.parent / f".{self.out.name}.partial-{os.getpid()}-{secrets.token_hex(4)}"
        self.images: np.ndarray | None = None
        self.masks: np.ndarray | None = None
        try:
            self.out.parent.mkdir(parents=True, exist_ok=True)
            clean_partials(self.out)  # of a prepare of the same --out that was killed
            self.tmp.mkdir()
        except OSError as e:
            raise UserError(f"--out {self.out}: cannot write there: {write_problem(e)}") from None

    def __enter__(self) -> "PreparedWriter":
        return self

    def __exit__(self, exc_type: Any, exc: Any, tb: Any) -> None:
        if exc_type is not None:
            self.abort()

    def abort(self) -> None:
        self.images = self.masks = None
        shutil.rmtree(self.tmp, ignore_errors=True)

    def allocate(self, n: int, image_shape: tuple[int, int, int], readers: int, image_dtype: Any) -> None:
        """Create ``images.npy`` (N,C,H,W) and ``masks.npy`` (N,A,H,W) as writable memory maps."""
        c, h, w = image_shape
        self.images = np.lib.format.open_memmap(self.tmp / "images.npy", mode="w+", dtype=image_dtype,
                                                shape=(n, c, h, w))
        self.masks = np.lib.format.open_memmap(self.tmp / "masks.npy", mode="w+", dtype=np.uint8,
                                               shape=(n, readers, h, w))
        for name in ("images.npy", "masks.npy"):  # reserve the blocks now: a full disk is an error here, not a
            reserve(self.tmp / name)               # SIGBUS when a page of the memory map is first written

    def commit(self, *, meta: list[dict[str, Any]], source: dict[str, Any], image_scale: float,
               protocols: dict[str, dict[str, Any]], notes: dict[str, Any] | None = None) -> Path:
        """Write meta.csv, the split lists and the manifest, then rename the folder into place.

        Args:
            meta: one dict per row with the keys of :data:`META_COLUMNS`.
            source: the source description (format, name, sha256, ...).
            image_scale: factor that maps stored image values to [0, 1] (1.0 or 1/255).
            protocols: name -> {"split": {split: row indices}, "params": {...}, "label": str}.
            notes: extra manifest entries.
        """
        assert self.images is not None and self.masks is not None
        n, readers = self.masks.shape[:2]
        image_shape = self.images.shape[1:]
        for arr in (self.images, self.masks):
            arr.flush()
        self.images = self.masks = None  # close the memory maps before hashing
        ids = [str(r["id"]) for r in meta]
        for i in ids:  # composed ids (<patient>/<stem>) join parts checked by the converters with '/'
            check_id_part(i, str(source.get("name", "source")), separators=False)
        dup = [i for i, c in Counter(ids).items() if c > 1]
        if dup:
            raise UserError(f"{source.get('name', 'source')}: duplicate image id(s) {', '.join(dup[:5])}")
        buf = io.StringIO()
        w = csv.DictWriter(buf, fieldnames=META_COLUMNS, lineterminator="\n")
        w.writeheader()
        for r in meta:
            w.writerow({k: r.get(k, "") for k in META_COLUMNS})
        (self.tmp / "meta.csv").write_text(buf.getvalue())
        proto_out = {}
        for name, p in protocols.items():
            d = self.tmp / "splits" / name
            d.mkdir(parents=True)
            for s in SPLITS:
                (d / f"{s}.txt").write_text(id_list_text(ids[i] for i in p["split"][s]))
            proto_out[name] = {"params": p.get("params", {}), "label": p.get("label", ""),
                               "sizes": {s: len(p["split"][s]) for s in SPLITS}}
        files: dict[str, Any] = {}
        for path in sorted(self.tmp.rglob("*")):
            if path.is_file():
                rel = path.relative_to(self.tmp).as_posix()
                entry: dict[str, Any] = {"bytes": path.stat().st_size, "sha256": sha256_file(path)}
                if path.suffix == ".npy":
                    arr = np.load(path, mmap_mode="r")
                    entry.update(shape=list(arr.shape), dtype=str(arr.dtype))
                    del arr
                files[rel] = entry
        manifest = {
            "format": FORMAT, "version": VERSION, "kind": self.kind, "source": source, "count": n,
            "readers": readers, "image": {"channels": image_shape[0], "height": image_shape[1],
                                          "width": image_shape[2], "scale": image_scale},
            "protocols": proto_out, "files": files, **(notes or {}),
        }
        (self.tmp / "manifest.json").write_text(json.dumps(manifest, indent=2) + "\n")
        if self.out.exists():  # an empty folder (checked at the start); rename needs it gone
            self.out.rmdir()
        os.replace(self.tmp, self.out)
        return self.out


# ----------------------------------------------------------------------------------------------------
# reading
# ----------------------------------------------------------------------------------------------------

_VERIFIED: dict[tuple, str] = {}  # (path, size, mtime_ns, inode) -> sha256, so each process hashes a file once


def _file_sha(path: Path) -> str:
    st = path.stat()
    key = (str(path.resolve()), st.st_size, st.st_mtime_ns, st.st_ino)
    if key not in _VERIFIED:
        _VERIFIED[key] = sha256_file(path)
    return _VERIFIED[key]


class Prepared:
    """A verified prepared folder: manifest, metadata rows and memory-mapped arrays.

    Args:
        root: the folder written by ``amisbench data prepare``.
        kind: the dataset it must hold (``lidc``, ``isic3``).
        verify: hash every file against the manifest (sizes and ``.npy`` headers are always checked).
    """

    def __init__(self, root: Path | str, kind: str, *, verify: bool = True):
        root = Path(root).expanduser()
        again = f"run `amisbench data prepare {kind} --from SOURCE --out DIR` again"
        if not root.is_dir():
            raise UserError(f"dataset.root {root}: no such folder; prepare the data with "
                            f"`amisbench data prepare {kind} --from SOURCE --out {root}`")
        mpath = root / "manifest.json"
        try:
            manifest = json.loads(mpath.read_text())
        except FileNotFoundError:
            raise UserError(f"{root}: no manifest.json, so this is not a folder written by "
                            f"`amisbench data prepare {kind}`") from None
        except (json.JSONDecodeError, UnicodeDecodeError) as e:
            raise UserError(f"{mpath}: not valid JSON ({e}); {again}") from None
        if not isinstance(manifest, dict) or manifest.get("format") != FORMAT:
            raise UserError(f"{mpath}: not an amisbench prepared-data manifest")
        missing = [k for k in ("kind", "source", "count", "readers", "image", "protocols", "files")
                   if k not in manifest]
        if missing:
            raise UserError(f"{mpath}: the manifest lacks {', '.join(missing)}; {again}")
        if manifest.get("version") != VERSION:
            raise UserError(f"{mpath}: prepared-data format version {manifest.get('version')}, this amisbench "
                            f"reads version {VERSION}; {again}")
        if manifest.get("kind") != kind:
            raise UserError(f"{root}: holds prepared '{manifest.get('kind')}' data, not '{kind}'")
        files = manifest["files"]
        if not isinstance(files, dict) or not all(isinstance(e, dict) and isinstance(e.get("bytes"), int)
                                                  and isinstance(e.get("sha256"), str) for e in files.values()):
            raise UserError(f"{mpath}: 'files' must map each file to its bytes and sha256; {again}")
        unlisted = [f for f in READ_FILES if f not in files]
        if unlisted:  # the checksums cover every file read: a manifest cannot switch them off by leaving one out
            raise UserError(f"{mpath}: the manifest does not list {', '.join(unlisted)}, so the file cannot be "
                            f"verified; {again}")
        for rel, entry in files.items():
            path = root / rel
            if not path.is_file():
                raise UserError(f"{path}: listed in the manifest but missing; {again}")
            size = path.stat().st_size
            if size != entry["bytes"]:
                raise UserError(f"{path}: {size} bytes where the manifest says {entry['bytes']}: the file is "
                                f"truncated or was changed; {again}")
            if "shape" in entry:
                try:
                    arr = np.load(path, mmap_mode="r")
                except (ValueError, OSError) as e:
                    raise UserError(f"{path}: not a readable .npy file ({e}); {again}") from None
                if list(arr.shape) != entry["shape"] or str(arr.dtype) != entry["dtype"]:
                    raise UserError(f"{path}: shape {list(arr.shape)} {arr.dtype} where the manifest says "
                                    f"{entry['shape']} {entry['dtype']}; {again}")
            if verify and _file_sha(path) != entry["sha256"]:
                raise UserError(f"{path}: checksum differs from the manifest: the file was edited or corrupted; "
                                f"{again}")
        self.root = root
        self.kind = kind
        self.manifest = manifest
        with open(root / "meta.csv", newline="") as f:
            self.meta = list(csv.DictReader(f))
        if len(self.meta) != manifest["count"]:
            raise UserError(f"{root / 'meta.csv'}: {len(self.meta)} rows where the manifest says "
                            f"{manifest['count']}; {again}")
        self.ids = [r["id"] for r in self.meta]
        self.groups = [r["group"] for r in self.meta]
        self.images = np.load(root / "images.npy", mmap_mode="r")
        self.masks = np.load(root / "masks.npy", mmap_mode="r")
        self.image_scale = float(manifest["image"]["scale"])
        self.source_format = manifest["source"].get("format", "")

    @property
    def protocols(self) -> list[str]:
        return list(self.manifest["protocols"])

    def split_file(self, protocol: str, split: str) -> list[str]:
        rel = f"splits/{protocol}/{split}.txt"
        if rel not in self.manifest["files"]:
            raise UserError(f"{self.root / 'manifest.json'}: the manifest does not list {rel}, so the split cannot "
                            f"be verified; run `amisbench data prepare {self.kind} --from SOURCE --out DIR` again")
        text = (self.root / rel).read_text()
        return [line for line in text.splitlines() if line]

    def rows(self, ids: list[str]) -> list[int]:
        index = {i: k for k, i in enumerate(self.ids)}
        missing = [i for i in ids if i not in index]
        if missing:
            raise UserError(f"{self.root}: split lists name unknown id(s) {', '.join(missing[:5])}")
        return [index[i] for i in ids]
