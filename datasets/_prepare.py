"""``amisbench data prepare NAME --from PATH --out DIR``: convert a real dataset once into the prepared
layout of :mod:`._layout` (``.npy`` arrays opened with ``mmap_mode``, a metadata table, split ID lists and a
manifest with checksums).

Each dataset adapter owns its conversion: a ``prepare(src, out, progress)`` on the registered class
(``LIDC.prepare`` detects the Prob. U-Net pickle, the PHiSeg/CCDM HDF5 file or the DeepMind PNG crop tree, see
:mod:`._lidc_formats`; ``ISIC3.prepare`` reads Zepf et al.'s ``isic256_3_style`` folder, see
:mod:`._isic_format`); ``NAME`` is any registered dataset that has one, a plugin's included. Every bad input
is a :class:`UserError` (exit code 2 on the command line), and the output appears only when complete: it is
written to a temporary sibling folder and renamed.
"""

from __future__ import annotations

import errno
from pathlib import Path

from amisbench.errors import UserError
from amisbench.store import write_problem

from ._layout import check_out
from ._progress import Progress


def preparable() -> list[str]:
    """The registered datasets whose adapter converts source files (a ``prepare(src, out, progress)``)."""
    from amisbench.registry import DATASETS

    return [e.name for e in DATASETS.entries() if callable(getattr(e.obj, "prepare", None))]


def prepare(kind: str, src: str | Path, out: str | Path, *, show_progress: bool = True) -> Path:
    """Convert a real dataset into a prepared folder with the ``prepare`` of its registered adapter.

    The adapter's ``prepare(src, out, progress)`` (a class or static method) reads ``src`` and writes ``out``
    (through :class:`~amisbench.datasets._layout.PreparedWriter`, which renames a temporary folder at the
    end); the checks of ``--from``/``--out`` and the translation of system errors into one-sentence
    :class:`UserError` messages happen here, once for every dataset.

    Args:
        kind: a registered dataset with a ``prepare`` (``lidc``, ``isic3``, or a plugin's).
        src: the source file or folder (``--from``).
        out: the prepared folder to create (``--out``); it must not exist or be empty.
        show_progress: draw a progress bar on stderr.

    Returns:
        The prepared folder.

    Raises:
        UserError: an unknown kind, an existing non-empty ``out``, or any problem with the source (the
            message names the file and what was expected); nothing is left at ``out``.
    """
    from amisbench.registry import DATASETS

    adapter = DATASETS.get(kind) if kind in DATASETS else None
    if adapter is None or not callable(getattr(adapter, "prepare", None)):
        raise UserError(f"unknown dataset '{kind}' for prepare; known: {', '.join(preparable())}")
    src = Path(src).expanduser()
    out = check_out(Path(out))
    if src.exists() and out.resolve() == src.resolve():
        raise UserError(f"--out {out}: must differ from --from")
    progress = Progress(show_progress)
    try:
        return Path(adapter.prepare(src, out, progress))
    except MemoryError:
        raise UserError(f"{src}: not enough memory to convert the source") from None
    except RecursionError:
        raise UserError(f"{src}: the source is nested too deeply to be data (nothing was written)") from None
    except OSError as e:
        name = getattr(e, "filename", None)
        ours = [q for q in (Path(str(name)), *Path(str(name)).parents)
                if q.name == out.name or q.name.startswith(f".{out.name}.partial-")]
        if name and not ours and e.errno not in (errno.ENOSPC, errno.EDQUOT, errno.EROFS):  # the source's
            raise UserError(f"{name}: cannot read it ({e.strerror or e})") from None
        raise UserError(f"--out {out}: cannot write the prepared data: {write_problem(e)}; nothing was left at "
                        "--out") from None
    finally:
        progress.close()
