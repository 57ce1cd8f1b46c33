"""``amisbench data prepare lidc|isic3 --from PATH --out DIR``: convert a real dataset once into the prepared
layout of :mod:`._layout` (``.npy`` arrays opened with ``mmap_mode``, a metadata table, split ID lists and a
manifest with checksums).

LIDC sources are detected automatically (see :mod:`._lidc_formats`): the Prob. U-Net pickle (a file, or a
folder of ``*.pickle`` parts), the PHiSeg/CCDM HDF5 file, or the DeepMind PNG crop tree. ISIC3 takes Zepf et
al.'s ``isic256_3_style`` folder (see :mod:`._isic_format`). Every bad input is a :class:`UserError` (exit
code 2 on the command line), and the output appears only when complete: it is written to a temporary
sibling folder and renamed.
"""

from __future__ import annotations

import errno
from pathlib import Path

from amisbench.errors import UserError
from amisbench.store import write_problem

from ._layout import PreparedWriter, check_out
from ._progress import Progress

KINDS = ("lidc", "isic3")


def prepare(kind: str, src: str | Path, out: str | Path, *, show_progress: bool = True) -> Path:
    """Convert a real dataset into a prepared folder.

    Args:
        kind: ``lidc`` or ``isic3``.
        src: the source file or folder (``--from``).
        out: the prepared folder to create (``--out``); it must not exist or be empty.
        show_progress: draw a progress bar on stderr.

    Returns:
        The prepared folder.

    Raises:
        UserError: an unknown kind, an existing non-empty ``out``, or any problem with the source (the
            message names the file and what was expected); nothing is left at ``out``.
    """
    if kind not in KINDS:
        raise UserError(f"unknown dataset '{kind}' for prepare; known: {', '.join(KINDS)}")
    src = Path(src).expanduser()
    out = check_out(Path(out))
    if src.exists() and out.resolve() == src.resolve():
        raise UserError(f"--out {out}: must differ from --from")
    progress = Progress(show_progress)
    try:
        if kind == "lidc":
            from . import _lidc_formats as lf

            fmt, what = lf.detect(src)  # before creating anything
            with PreparedWriter(out, kind) as w:
                if fmt == "pickle":
                    res = lf.from_pickle(what, src, w, progress)
                elif fmt == "hdf5":
                    res = lf.from_hdf5(what, w, progress)
                else:
                    res = lf.from_png_tree(what, w, progress)
                return w.commit(**res)
        from . import _isic_format as isf
        from .isic3 import ISIC3Config

        c = ISIC3Config()
        if not src.exists():
            raise UserError(f"--from {src}: no such folder; expected the ISIC3 folder (isic256_3_style) with Images/ "
                            "and Segmentations/")
        with PreparedWriter(out, kind) as w:
            res = isf.from_isic_folder(src, w, progress, val_fraction=c.val_fraction, test_fraction=c.test_fraction,
                                       seed=c.split_seed)
            return w.commit(**res)
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
