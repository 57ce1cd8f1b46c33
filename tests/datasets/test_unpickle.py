"""The restricted unpickler of the LIDC pickle: what it reads, what it refuses, and that refused code never runs."""

import os
import pickle
import subprocess
import sys

import numpy as np
import pytest

from amisbench.datasets._prepare import prepare
from amisbench.datasets._unpickle import load
from amisbench.errors import UserError

import data_formats as F  # tests/fixtures, put on sys.path by tests/conftest.py


class RunsShell:
    """A payload: unpickling it with plain pickle would run a shell command."""

    def __init__(self, cmd):
        self.cmd = cmd

    def __reduce__(self):
        return (os.system, (self.cmd,))


class RunsEval:
    def __init__(self, code):
        self.code = code

    def __reduce__(self):
        return (eval, (self.code,))


class RunsPopen:
    def __init__(self, args):
        self.args = args

    def __reduce__(self):
        return (subprocess.Popen, (self.args,))


def _entry(seed=0):
    rng = np.random.default_rng(seed)
    return F.lidc_entry(rng.random((8, 8)), (rng.random((4, 8, 8)) < 0.3), "1.2.3.4")


@pytest.mark.parametrize("where", ["top", "entry", "mask"])
def test_code_in_the_pickle_is_refused_and_never_runs(tmp_path, where):
    marker = tmp_path / "marker"
    payload = RunsShell(f"touch {marker}")
    entries = {"a_slice0": _entry(0), "b_slice0": _entry(1)}
    if where == "top":
        obj = payload
    elif where == "entry":
        entries["b_slice0"]["series_uid"] = payload
        obj = entries
    else:
        entries["a_slice0"]["masks"][2] = payload
        obj = entries
    with F.fake_pydicom():
        data = pickle.dumps(obj, protocol=3)
    # the payload is real: plain pickle runs it (checked with a control marker)
    control = tmp_path / "control"
    pickle.loads(pickle.dumps(RunsShell(f"touch {control}"), protocol=3))
    assert control.exists()
    control.unlink()
    src = tmp_path / "data_lidc.pickle"
    src.write_bytes(data)
    out = tmp_path / "out"
    with pytest.raises(UserError, match=r"refused.*(posix|os|nt)\.system.*nothing in the file was executed"):
        prepare("lidc", src, out, show_progress=False)
    assert not marker.exists()
    assert not out.exists()
    assert [p.name for p in tmp_path.iterdir()] == ["data_lidc.pickle"]  # no half-written folder either


@pytest.mark.parametrize("payload, name", [(RunsEval("__import__('os').getcwd()"), "builtins.eval"),
                                           (RunsPopen(["true"]), "subprocess.Popen")])
def test_other_callables_are_refused(tmp_path, payload, name):
    p = tmp_path / "x.pickle"
    p.write_bytes(pickle.dumps({"k": payload}, protocol=4))
    with pytest.raises(UserError, match=name.replace(".", r"\.")):
        load(p)


def test_object_arrays_and_persistent_ids_are_refused(tmp_path):
    p = tmp_path / "obj.pickle"
    p.write_bytes(pickle.dumps({"image": np.array([1, "a"], dtype=object)}, protocol=3))
    with pytest.raises(UserError, match="dtype object"):
        load(p)

    class PidPickler(pickle.Pickler):
        def persistent_id(self, obj):
            return "ref" if isinstance(obj, str) and obj == "external" else None

    import io

    buf = io.BytesIO()
    PidPickler(buf, protocol=3).dump({"k": "external"})
    p.write_bytes(buf.getvalue())
    with pytest.raises(UserError, match="persistent id"):
        load(p)


def test_user_classes_are_refused(tmp_path):
    p = tmp_path / "cls.pickle"
    p.write_bytes(pickle.dumps({"k": np.ma.masked_array([1.0, 2.0])}, protocol=3))
    with pytest.raises(UserError, match=r"numpy\.ma\.core"):
        load(p)


@pytest.mark.parametrize("protocol, numpy1", [(3, True), (3, False), (2, True), (0, False), (5, False)])
def test_pydicom_values_and_numpy_arrays_load_as_plain_values(tmp_path, protocol, numpy1):
    entries = {"k_slice0": _entry(0), "k_slice1": _entry(1)}
    p = tmp_path / "d.pickle"
    p.write_bytes(F.dumps_lidc(entries, protocol=protocol, numpy1=numpy1))
    if numpy1:
        assert b"numpy.core.multiarray" in p.read_bytes() and b"numpy._core" not in p.read_bytes()
    had_pydicom = "pydicom" in sys.modules
    obj, sha = load(p)
    assert ("pydicom" in sys.modules) == had_pydicom  # nothing was imported
    import hashlib

    assert sha == hashlib.sha256(p.read_bytes()).hexdigest()
    assert list(obj) == ["k_slice0", "k_slice1"]
    for k, e in obj.items():
        assert type(e["series_uid"]) is str and e["series_uid"] == "1.2.3.4"
        assert type(e["pixel_spacing"]) is list and e["pixel_spacing"] == [0.703125, 0.703125]
        assert all(type(v) is float for v in e["pixel_spacing"])
        assert type(e["image"]) is np.ndarray and e["image"].dtype == np.float64
        np.testing.assert_array_equal(e["image"], entries[k]["image"])
        for m, m0 in zip(e["masks"], entries[k]["masks"]):
            np.testing.assert_array_equal(m, m0)


@pytest.mark.parametrize("cut", [0.5, 0.99])
def test_truncated_pickle_is_a_clear_error(tmp_path, cut):
    p = tmp_path / "data_lidc.pickle"
    data = F.dumps_lidc({"k_slice0": _entry(0), "k_slice1": _entry(1)})
    p.write_bytes(data[: int(len(data) * cut)])
    with pytest.raises(UserError, match="truncated or corrupt"):
        load(p)
