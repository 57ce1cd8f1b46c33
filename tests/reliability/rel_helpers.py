"""Helpers of the reliability tests: run the CLI in-process, check the one-sentence contract, and
snapshot folders to prove that a refused command wrote nothing."""

from __future__ import annotations

from pathlib import Path

from amisbench import cli

SMOKE_RUN = ["run", "--method", "ssn", "--dataset", "synthetic", "--profile", "smoke", "--quiet"]


def call(capsys, *argv) -> tuple[int, str, str]:
    """``amisbench ARGV`` in-process: (exit code, stdout, stderr)."""
    rc = cli.main([str(a) for a in argv])
    out = capsys.readouterr()
    return rc, out.out, out.err


def assert_refused(rc: int, err: str, words: list[str], code: int = 2) -> None:
    """Exit ``code``, no traceback, the error is the last line of stderr and holds every key word."""
    assert rc == code, err
    assert "Traceback" not in err
    lines = err.strip().splitlines()
    assert lines and "error:" in lines[-1], err
    for w in words:
        assert w in lines[-1], (w, lines[-1])


def snapshot(root: Path) -> dict[str, tuple[int, int]]:
    """Every file under ``root`` with its size and modification time (empty when ``root`` is absent)."""
    root = Path(root)
    if not root.exists():
        return {}
    return {p.relative_to(root).as_posix(): (p.stat().st_size, p.stat().st_mtime_ns)
            for p in sorted(root.rglob("*")) if p.is_file()}


RUN_FOLDER = Path("runs/synthetic/ssn/smoke/seed-0")
