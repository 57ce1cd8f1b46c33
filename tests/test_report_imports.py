"""`amisbench --help` and `amisbench table` answer without importing torch (they read result files only)."""

import ast
import json
import re
import subprocess
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]


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


def _imports(path: Path, package: str) -> set[str]:
    """The amisbench modules (dotted, without ``amisbench.``) that a file imports, at any depth."""
    out = set()
    for node in ast.walk(ast.parse(path.read_text())):
        if isinstance(node, ast.ImportFrom) and node.level:
            base = package.split(".")[: len(package.split(".")) - node.level + 1] if package else []
            parts = [p for p in [*base, *(node.module or "").split(".")] if p]
            if node.module:
                out.add(".".join(parts))
            else:
                out |= {".".join([*parts, a.name]) for a in node.names}
        elif isinstance(node, ast.ImportFrom) and (node.module or "").startswith("amisbench."):
            out.add(node.module.split(".", 1)[1])
        elif isinstance(node, ast.Import):
            out |= {a.name.split(".", 1)[1] for a in node.names if a.name.startswith("amisbench.")}
    return out


def test_imports_follow_the_layers_of_architecture_md():
    """Every import between modules of ARCHITECTURE.md's layer table goes to the same or an earlier layer,
    and no module imports cli (the commands import the library, never the other way)."""
    layers: dict[str, int] = {}
    table = ROOT.joinpath("ARCHITECTURE.md").read_text().split("## Modules", 1)[1].split("\n## ", 1)[0]
    rows = [r for r in table.splitlines() if r.startswith("| ") and "`" in r.split("|")[2]]
    for i, row in enumerate(rows):
        for name in re.findall(r"`([a-z_]+)/?`", row.split("|")[2]):
            layers[name] = i
    assert {"errors", "metric_registry", "config", "metrics", "runner", "report", "options", "cli"} <= set(layers)
    bad = []
    for path in sorted((ROOT / "amisbench").rglob("*.py")):
        rel = path.relative_to(ROOT / "amisbench").with_suffix("")
        module = ".".join(rel.parts).removesuffix(".__init__")
        package = ".".join(rel.parts[:-1])
        mine = layers.get(module.split(".")[0])
        for dep in _imports(path, package):
            top = dep.split(".")[0]
            if top == "cli" and module != "cli":
                bad.append(f"{module} imports cli")
            elif mine is not None and top in layers and layers[top] > mine:
                bad.append(f"{module} (layer {mine}) imports {dep} (layer {layers[top]})")
    assert not bad, bad
