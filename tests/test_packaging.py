"""The folders methods/ and datasets/ import as amisbench.methods / amisbench.datasets, never as top-level
packages (a top-level `datasets` would shadow Hugging Face's)."""

import os
import subprocess
import sys
import venv
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]


def _py(python, code, cwd, extra_path=None):
    env = {k: v for k, v in os.environ.items() if k not in ("PYTHONPATH", "PYTHONSAFEPATH")}
    if extra_path:
        env["PYTHONPATH"] = str(extra_path)
    return subprocess.run([str(python), "-P", "-c", code], cwd=cwd, env=env, capture_output=True, text=True)


@pytest.mark.slow
def test_amisbench_datasets_resolves_beside_another_datasets_package(tmp_path):
    fake = tmp_path / "site" / "datasets"
    fake.mkdir(parents=True)
    (fake / "__init__.py").write_text("IS_HF_STANDIN = True\n")
    code = ("import datasets, amisbench.datasets, amisbench.methods;"
            "from amisbench.registry import DATASETS;"
            "assert datasets.IS_HF_STANDIN;"
            "assert amisbench.datasets.__name__ == 'amisbench.datasets';"
            "assert 'synthetic' in DATASETS.names();"
            "import datasets as d2; assert d2.IS_HF_STANDIN; print('ok')")
    out = _py(sys.executable, code, tmp_path, tmp_path / "site")
    assert out.returncode == 0, out.stderr
    assert out.stdout.strip() == "ok"


def test_importing_the_folder_as_top_level_datasets_fails_loudly(tmp_path):
    out = _py(sys.executable, "import datasets", tmp_path, ROOT)
    assert out.returncode != 0 and "must be imported as amisbench.datasets" in out.stderr


@pytest.mark.slow
def test_wheel_install_in_a_fresh_venv_imports_from_another_folder(tmp_path):
    """`pip install .` (not editable) into a fresh venv that sees this interpreter's packages."""
    env_dir = tmp_path / "venv"
    venv.create(env_dir, with_pip=True)
    python = env_dir / "bin" / "python"
    # the dependencies (torch, ...) come from this interpreter's site-packages, appended to the new venv's
    # path by a .pth line; the project itself is installed as a wheel into the new venv
    site = subprocess.run([str(python), "-c", "import sysconfig; print(sysconfig.get_paths()['purelib'])"],
                          capture_output=True, text=True, check=True).stdout.strip()
    outer = [p for p in sys.path if p.endswith("site-packages")]
    Path(site, "outer_deps.pth").write_text("\n".join(outer) + "\n")
    build = subprocess.run([str(python), "-m", "pip", "install", "-q", "--no-deps", "--no-build-isolation",
                            "--no-index", str(ROOT)], capture_output=True, text=True, cwd=tmp_path)
    assert build.returncode == 0, build.stderr[-2000:]
    elsewhere = tmp_path / "elsewhere"
    elsewhere.mkdir()
    code = ("import amisbench, amisbench.datasets, amisbench.methods;"
            "from amisbench.registry import METHODS, DATASETS;"
            "from amisbench.config import packaged_config;"
            "assert 'site-packages' in amisbench.__file__, amisbench.__file__;"
            "assert 'ssn' in METHODS.names() and 'synthetic' in DATASETS.names();"
            "assert packaged_config('profiles', 'smoke.yaml') is not None;"
            "import amisbench.metrics as M;"
            "print(amisbench.datasets.__file__);"
            "print(M._C.__file__ if M._C is not None else 'none')")
    out = _py(python, code, elsewhere)
    assert out.returncode == 0, out.stderr
    datasets_file, counts_file = out.stdout.split()
    assert str(env_dir) in datasets_file
    from amisbench import metrics
    if metrics._C is not None:  # built here, so the wheel's build (same compiler) carries it too
        assert str(env_dir) in counts_file and "_counts" in counts_file, counts_file
