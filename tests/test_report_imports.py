"""`amisbench --help` and `amisbench table` answer without importing torch (they read result files only)."""

import json
import subprocess
import sys


def _run(args: list[str]) -> tuple[int, bool, str]:
    """Exit code of ``amisbench ARGS`` in a fresh interpreter, whether torch got imported, and the output."""
    code = ("import sys; from amisbench import cli; rc = cli.main(%r); "
            "print('RC', rc, 'TORCH', 'torch' in sys.modules)" % (args,))
    r = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=120)
    last = r.stdout.strip().splitlines()[-1].split()
    return int(last[1]), last[3] == "True", r.stdout + r.stderr


def test_help_and_table_do_not_import_torch(tmp_path):
    for m, vals in [("ssn", [0.30, 0.34]), ("atfm", [0.20, 0.22])]:
        for seed, g in enumerate(vals):
            d = tmp_path / "runs" / "lidc" / m / "quick" / f"seed-{seed}"
            d.mkdir(parents=True)
            (d / "metrics.json").write_text(json.dumps({"GED_100": g, "HMIoU_32": 1 - g}))
            (d / "run.json").write_text(json.dumps({"status": "done", "method": m, "variant": None,
                                                    "dataset": "lidc", "profile": "quick", "seed": seed}))
    outs = {}
    for name, args in {"help": ["--help"], "runs": ["table", "--dataset", "lidc", "--results", str(tmp_path)],
                       "table 1": ["table", "--table", "1", "--results", str(tmp_path), "--format", "latex"],
                       "table 3": ["table", "--table", "3", "--results", str(tmp_path)]}.items():
        rc, torch_loaded, outs[name] = _run(args)
        assert rc == 0, outs[name]
        assert not torch_loaded, f"amisbench {' '.join(args)} imported torch"
    assert "usage: amisbench" in outs["help"]
    assert "**0.210 ± 0.014 (n=2)**" in outs["runs"] and "0.320 ± 0.028 (n=2)" in outs["runs"]
    assert r"\textbf{0.210}" in outs["table 1"] and "not run" in outs["table 3"]
