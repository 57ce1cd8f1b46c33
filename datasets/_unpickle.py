"""A restricted unpickler for the LIDC pickle of the Prob. U-Net PyTorch port (``data_lidc.pickle``).

A pickle is a program: loading one with :mod:`pickle` lets the file call any importable function. This
unpickler resolves only an allow-list of names, so a file that references anything else (``os.system``,
``builtins.eval``, ``subprocess.Popen``, a user class ...) is refused when that reference is read, before any
call is made. Allowed:

* builtin containers and scalar constructors (``dict``, ``list``, ``set``, ``float``, ...), which call no
  user code;
* numpy arrays, dtypes and scalars, under both module names: ``numpy.core.multiarray`` (files written with
  numpy 1.x, like the real ``data_lidc.pickle``) and ``numpy._core.multiarray`` (numpy 2.x); object arrays are
  refused, since their items would be arbitrary objects;
* the pydicom value classes stored in the real file (``pydicom.uid.UID``, ``pydicom.valuerep.DSfloat``,
  ``pydicom.multival.MultiValue``, a few relatives and the pre-1.0 ``dicom.*`` names). They are replaced by
  inert stand-ins without importing pydicom and turned into ``str`` / ``float`` / ``int`` / ``list`` by
  :func:`plain`.

The file is read as a stream (never slurped into one ``bytes`` object, which would double the memory of a
3.4 GB pickle); a byte-count callback drives a progress bar and the bytes are hashed as they pass.
"""

from __future__ import annotations

import hashlib
import io
import pickle
from pathlib import Path
from typing import Any, Callable

import numpy as np

from amisbench.errors import UserError

try:  # numpy >= 2: the real module is numpy._core; numpy.core is a deprecated alias
    from numpy._core import multiarray as _multiarray
    from numpy._core import numeric as _numeric
except ImportError:  # numpy 1.x
    from numpy.core import multiarray as _multiarray  # type: ignore[no-redef]
    from numpy.core import numeric as _numeric  # type: ignore[no-redef]


class Refused(pickle.UnpicklingError):
    """The pickle references a name outside the allow-list."""

    def __init__(self, what: str):
        super().__init__(what)
        self.what = what


# -- inert stand-ins for pydicom's value classes --------------------------------------------------------

class _StandIn:
    """Marker base of the stand-ins (used by :func:`plain`)."""


class UIDStandIn(str, _StandIn):
    """Stands in for ``pydicom.uid.UID`` (a ``str`` subclass)."""

    def __setstate__(self, state: Any) -> None:  # pydicom may pickle cached attributes; they are dropped
        pass


class FloatStandIn(float, _StandIn):
    """Stands in for ``pydicom.valuerep.DSfloat`` / ``DSdecimal`` (``float`` subclasses)."""

    def __new__(cls, value: Any = 0.0, *args: Any, **kwargs: Any):
        if not isinstance(value, (int, float, str, bytes)):
            raise Refused(f"a pydicom decimal string built from {type(value).__name__}")
        return super().__new__(cls, value)

    def __setstate__(self, state: Any) -> None:  # original_string, auto_format: not needed
        pass


class IntStandIn(int, _StandIn):
    """Stands in for ``pydicom.valuerep.IS`` (an ``int`` subclass)."""

    def __new__(cls, value: Any = 0, *args: Any, **kwargs: Any):
        if not isinstance(value, (int, float, str, bytes)):
            raise Refused(f"a pydicom integer string built from {type(value).__name__}")
        return super().__new__(cls, int(float(value)) if isinstance(value, (str, bytes)) else int(value))

    def __setstate__(self, state: Any) -> None:
        pass


class MultiValueStandIn(list, _StandIn):
    """Stands in for ``pydicom.multival.MultiValue``.

    pydicom >= 1 pickles it as an empty object plus the state ``{'_list': [...], 'type_constructor': cls}``;
    pre-1.0 versions subclassed ``list`` (items arrive through ``append``/``extend``). Both end up as the
    list's items.
    """

    def __init__(self, *args: Any, **kwargs: Any):
        super().__init__()

    def __setstate__(self, state: Any) -> None:
        if isinstance(state, tuple) and len(state) == 2:  # (dict state, slot state)
            state = {**(state[0] or {}), **(state[1] or {})}
        if isinstance(state, dict) and "_list" in state:
            self[:] = list(state["_list"])


# -- safe replacements of the numpy/copyreg constructors that a numpy pickle calls ----------------------

def _check_dtype(dtype: Any) -> np.dtype:
    dt = np.dtype(dtype)
    if dt.hasobject:
        raise Refused("a numpy array of Python objects (dtype object)")
    return dt


def _reconstruct(subtype: Any, shape: Any, dtype: Any) -> np.ndarray:
    # ndarray.__reduce__ (protocol < 5) = _reconstruct(ndarray, (0,), b'b') followed by __setstate__.
    if subtype is not np.ndarray:
        raise Refused(f"an array of class {getattr(subtype, '__name__', subtype)!r}")
    return _multiarray._reconstruct(np.ndarray, shape, dtype)


def _frombuffer(buf: Any, dtype: Any, shape: Any, order: Any) -> np.ndarray:
    # ndarray.__reduce_ex__(5) = _frombuffer(PickleBuffer or bytearray, dtype, shape, order)
    dt = _check_dtype(dtype)
    if not isinstance(buf, (bytes, bytearray, pickle.PickleBuffer, memoryview)):
        raise Refused(f"an array buffer of type {type(buf).__name__}")
    return _numeric._frombuffer(buf, dt, shape, order)


def _scalar(dtype: Any, *args: Any) -> Any:
    if not isinstance(dtype, np.dtype):
        raise Refused(f"a numpy scalar of dtype {dtype!r}")
    _check_dtype(dtype)
    return _multiarray.scalar(dtype, *args)


def _dtype(*args: Any, **kwargs: Any) -> np.dtype:
    return _check_dtype(np.dtype(*args, **kwargs))


def _codecs_encode(obj: Any, encoding: str = "utf-8", errors: str = "strict") -> bytes:
    # protocol-2 pickles of bytes (numpy raw data) go through _codecs.encode(str, 'latin1')
    if not isinstance(obj, str) or encoding not in ("latin1", "latin-1", "utf-8", "utf8"):
        raise Refused(f"_codecs.encode of {type(obj).__name__} with encoding {encoding!r}")
    return obj.encode(encoding, errors)


_STAND_INS = (UIDStandIn, FloatStandIn, IntStandIn, MultiValueStandIn)


def _copyreg_reconstructor(cls: Any, base: Any, state: Any) -> Any:
    # protocol 0/1 pickles of objects: copyreg._reconstructor(cls, base, state)
    if cls not in _STAND_INS:
        raise Refused(f"copyreg._reconstructor of {getattr(cls, '__name__', cls)!r}")
    if base is object:
        return cls.__new__(cls)
    return cls.__new__(cls, state)


def _allowed() -> dict[tuple[str, str], Any]:
    table: dict[tuple[str, str], Any] = {}
    for name, obj in [("dict", dict), ("list", list), ("tuple", tuple), ("set", set), ("frozenset", frozenset),
                      ("str", str), ("bytes", bytes), ("bytearray", bytearray), ("int", int), ("float", float),
                      ("complex", complex), ("bool", bool), ("object", object)]:  # object: copyreg base
        table[("builtins", name)] = obj
        table[("__builtin__", name)] = obj
    table[("__builtin__", "unicode")] = str  # Python-2 names (protocols 0-2 written with fix_imports)
    table[("__builtin__", "long")] = int
    for core in ("numpy.core", "numpy._core"):
        table[(f"{core}.multiarray", "_reconstruct")] = _reconstruct
        table[(f"{core}.multiarray", "scalar")] = _scalar
        table[(f"{core}.numeric", "_frombuffer")] = _frombuffer
    table[("numpy", "ndarray")] = np.ndarray
    table[("numpy", "dtype")] = _dtype
    table[("_codecs", "encode")] = _codecs_encode
    table[("copyreg", "_reconstructor")] = _copyreg_reconstructor
    table[("copy_reg", "_reconstructor")] = _copyreg_reconstructor
    for pkg in ("pydicom", "dicom"):
        table[(f"{pkg}.uid", "UID")] = UIDStandIn
        table[(f"{pkg}.UID", "UID")] = UIDStandIn
        for cls_name in ("DSfloat", "DSdecimal", "DS"):
            table[(f"{pkg}.valuerep", cls_name)] = FloatStandIn
        table[(f"{pkg}.valuerep", "IS")] = IntStandIn
        table[(f"{pkg}.multival", "MultiValue")] = MultiValueStandIn
    # numpy dtype *classes* (numpy >= 1.25 may pickle dtypes as numpy.dtypes.Float64DType): the class
    # objects only construct dtypes
    dtypes_mod = getattr(np, "dtypes", None)
    if dtypes_mod is not None:
        for name in dir(dtypes_mod):
            cls = getattr(dtypes_mod, name)
            if isinstance(cls, type) and issubclass(cls, np.dtype) and name != "ObjectDType":
                table[("numpy.dtypes", name)] = cls
    return table


ALLOWED = _allowed()


class RestrictedUnpickler(pickle.Unpickler):
    """:class:`pickle.Unpickler` that resolves only the names in :data:`ALLOWED`."""

    def find_class(self, module: str, name: str) -> Any:
        obj = ALLOWED.get((module, name))
        if obj is None:
            raise Refused(f"{module}.{name}")
        return obj

    def persistent_load(self, pid: Any) -> Any:
        raise Refused(f"a persistent id ({type(pid).__name__})")


class Cyclic(ValueError):
    """The pickle holds a container that contains itself."""


def _leaf(obj: Any) -> Any:
    if isinstance(obj, UIDStandIn):
        return str(obj)
    if isinstance(obj, FloatStandIn):
        return float(obj)
    if isinstance(obj, IntStandIn):
        return int(obj)
    return obj


def _items(obj: Any) -> list:
    return list(obj.values()) if isinstance(obj, dict) else list(obj)


def plain(obj: Any) -> Any:
    """Turn the stand-ins into ``str``/``float``/``int``/``list`` through dicts/lists/tuples.

    Iterative (an explicit stack, children before parents), so a deeply nested pickle cannot exhaust the
    interpreter's recursion limit; a container shared twice is converted once; a cycle raises :class:`Cyclic`.
    """
    def container(o: Any) -> bool:
        return isinstance(o, (dict, list, tuple))

    if not container(obj):
        return _leaf(obj)
    done: dict[int, Any] = {}
    open_: set[int] = set()  # containers whose children are being converted: the path from the root
    stack: list[tuple[Any, bool]] = [(obj, False)]
    while stack:
        o, expanded = stack.pop()
        if id(o) in done:
            continue
        if not expanded:
            open_.add(id(o))
            stack.append((o, True))
            for c in _items(o):
                if container(c) and id(c) not in done:
                    if id(c) in open_:
                        raise Cyclic("a container holds itself")
                    stack.append((c, False))
            continue

        def get(v: Any) -> Any:
            return done[id(v)] if container(v) else _leaf(v)

        if isinstance(o, dict):
            done[id(o)] = {k: get(v) for k, v in o.items()}
        elif isinstance(o, tuple):
            done[id(o)] = tuple(get(v) for v in o)
        else:  # list, MultiValueStandIn
            done[id(o)] = [get(v) for v in o]
        open_.discard(id(o))
    return done[id(obj)]


class _CountingReader(io.RawIOBase):
    """File wrapper that reports bytes read and hashes them in order (the unpickler reads sequentially)."""

    def __init__(self, f: Any, on_bytes: Callable[[int], None] | None, hasher: Any):
        self._f = f
        self._on = on_bytes
        self._h = hasher

    def _seen(self, data: bytes | memoryview) -> None:
        if self._h is not None:
            self._h.update(data)
        if self._on is not None and len(data):
            self._on(len(data))

    def readable(self) -> bool:
        return True

    def read(self, n: int = -1) -> bytes:
        data = self._f.read(n)
        self._seen(data)
        return data

    def readline(self, size: int = -1) -> bytes:
        data = self._f.readline(size)
        self._seen(data)
        return data

    def readinto(self, b: Any) -> int:
        k = self._f.readinto(b)
        if k:
            self._seen(memoryview(b)[:k])
        return k or 0


def load(path: Path | str, *, on_bytes: Callable[[int], None] | None = None) -> tuple[Any, str]:
    """Load one pickle file with :class:`RestrictedUnpickler`.

    Args:
        path: the pickle file.
        on_bytes: called with the number of bytes read, for a progress bar.

    Returns:
        The object with the pydicom stand-ins turned into plain values, and the sha256 of the file.

    Raises:
        UserError: the file references a name outside the allow-list (nothing was executed), or it is
            truncated or not a pickle.
    """
    path = Path(path)
    hasher = hashlib.sha256()
    try:
        with open(path, "rb", buffering=1 << 20) as f:
            reader = _CountingReader(f, on_bytes, hasher)
            try:
                obj = RestrictedUnpickler(reader).load()
            except Refused as e:
                raise UserError(
                    f"{path}: refused to load the pickle: it references {e.what}, which is not an allowed data "
                    "type (only dicts, lists, numpy arrays and pydicom values are read; nothing in the file "
                    "was executed)") from None
            except MemoryError:
                raise UserError(f"{path}: not enough memory to load the pickle") from None
            except Exception as e:  # any other failure of a corrupt stream (EOFError, UnpicklingError, ...)
                detail = f"{type(e).__name__}: {e}" if str(e) else type(e).__name__
                raise UserError(f"{path}: cannot read the pickle, it is truncated or corrupt ({detail})") from None
            while True:  # hash whatever follows the pickle's STOP opcode, so the digest covers the file
                chunk = reader.read(1 << 24)
                if not chunk:
                    break
    except OSError as e:
        raise UserError(f"{path}: cannot read the file ({e.strerror or e})") from None
    try:
        return plain(obj), hasher.hexdigest()
    except Cyclic:
        raise UserError(f"{path}: the pickle holds a list or dict that contains itself, which is not data") from None

