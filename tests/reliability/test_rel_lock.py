"""One command per run folder: an exclusive lock held for the life of a run, released on any exit (kill -9
included), named by the command it refuses; the grid's local launcher never runs two jobs of one folder."""

from __future__ import annotations

import os
import signal
import socket
import subprocess
import sys
import time
from pathlib import Path

import pytest

from amisbench import store
from amisbench.errors import UserError
from amisbench.grid import Job, expand, run_local
from amisbench.runner import prepare
from amisbench.store import RunSpec
from rel_helpers import RUN_FOLDER, SMOKE_RUN, assert_refused, call, snapshot

HOLDER = """
import sys, time
from amisbench.store import FolderLock
lock = FolderLock(sys.argv[1]).__enter__()
print("locked", flush=True)
time.sleep(120)
"""


def test_a_held_folder_refuses_a_second_run_naming_the_holder(tmp_path, capsys):
    res = tmp_path / "res"
    folder = res / RUN_FOLDER
    with store.FolderLock(folder):
        rc, out, err = call(capsys, *SMOKE_RUN, "--results", res)
        assert_refused(rc, err, [f"{folder} is in use by another amisbench command", f"pid {os.getpid()}",
                                 f"on {socket.gethostname()} since", "wait for it to end"])
        assert not folder.exists()
    assert snapshot(res) == {}  # the lock file and the folders made for it are gone after release


@pytest.mark.slow
def test_two_processes_one_folder_the_second_exits_2_and_a_killed_holder_leaves_no_stale_lock(tmp_path):
    res = tmp_path / "res"
    folder = res / RUN_FOLDER
    holder = subprocess.Popen([sys.executable, "-c", HOLDER, str(folder)], stdout=subprocess.PIPE, text=True)
    try:
        assert holder.stdout.readline().strip() == "locked"
        second = subprocess.run([sys.executable, "-P", "-m", "amisbench.cli", *SMOKE_RUN, "--results", str(res),
                                 "--set", "train.main.steps=39"], capture_output=True, text=True, timeout=300)
        assert second.returncode == 2, second.stderr
        assert "Traceback" not in second.stderr and second.stderr.count("\n") == 1
        assert f"pid {holder.pid} on {socket.gethostname()}" in second.stderr
        assert str(folder) in second.stderr and " -c " in second.stderr  # the holder's command line
        assert not folder.exists()
    finally:
        holder.send_signal(signal.SIGKILL)
        holder.wait()
    assert store.lock_path(folder).exists()  # kill -9 left the file behind, but not the lock:
    with store.FolderLock(folder) as lock:
        info = store.lock_path(folder).read_text()
        assert f'"pid": {os.getpid()}' in info
    assert not lock.path.exists()


def test_the_lock_is_not_shared_through_a_replaced_lock_file(tmp_path):
    folder = tmp_path / "runs" / "seed-0"
    a = store.FolderLock(folder).__enter__()
    with pytest.raises(store.FolderBusy):
        store.FolderLock(folder).__enter__()
    a.release()
    b = store.FolderLock(folder).__enter__()  # after a release the next command takes it
    with pytest.raises(store.FolderBusy):
        store.FolderLock(folder).__enter__()
    b.release()


RECORDER = """
import sys, time
from pathlib import Path
log = Path(sys.argv[1])
with open(log, "a") as f:
    f.write(f"start {time.time()}\\n")
time.sleep(0.4)
with open(log, "a") as f:
    f.write(f"end {time.time()}\\n")
"""


def test_local_launcher_runs_jobs_of_one_folder_one_after_the_other(tmp_path):
    log = tmp_path / "events.txt"
    folder = tmp_path / "res" / RUN_FOLDER
    jobs = [Job(RunSpec("ssn", "synthetic", 0, "smoke", sets=[f"train.main.steps={k}"]), folder=folder) for k in (1, 2)]
    prefix = [sys.executable, "-c", RECORDER, str(log)]
    done = run_local(jobs, workers=2, log_dir=tmp_path / "logs", prefix=prefix, out=open(os.devnull, "w"))
    assert [rc for _, rc, _ in done] == [0, 0]
    events = [line.split() for line in log.read_text().splitlines()]
    assert [e[0] for e in events] == ["start", "end", "start", "end"]  # never two at once
    assert float(events[2][1]) >= float(events[1][1])


def test_grid_expansion_drops_a_repeated_job_and_refuses_two_configs_in_one_folder(tmp_path, monkeypatch):
    jobs = expand(["ssn", "ssn"], ["synthetic"], 1, profile="smoke", results=tmp_path)
    assert len(jobs) == 1
    # two sweep values whose folder names coincide (sweep_folder replaces odd characters by '_')
    monkeypatch.setattr("amisbench.grid.sweep_folder", lambda root, combo: Path(root) / "sweeps" / "same")
    with pytest.raises(UserError, match="grid jobs .* would both write the run folder"):
        expand(["ssn"], ["synthetic"], 1, profile="smoke", results=tmp_path,
               sweeps=["train.main.batch_size=4,8"])
    assert not any(Path(tmp_path).iterdir())
    assert prepare(RunSpec("ssn", "synthetic", 0, "smoke", results=tmp_path))[1] == tmp_path / RUN_FOLDER
