"""`amisbench data prepare NAME` comes from the dataset registry: a plugin dataset whose adapter has its own
``prepare`` (tests/plugins/amisbench_toy_dataset.py, installed through an entry point) is listed, converts its
files and is read back, with no edit to amisbench."""

from pathlib import Path

import numpy as np
import pytest

from amisbench import cli
from amisbench.datasets._prepare import preparable
from amisbench.registry import DATASETS
from method_helpers import install_entry_point  # tests/fixtures, on sys.path by tests/conftest.py

PLUGINS = Path(__file__).parents[1] / "plugins"


@pytest.fixture
def toy_dataset(monkeypatch):
    """What `pip install` of a package declaring [project.entry-points."amisbench.datasets"] does."""
    install_entry_point(monkeypatch, DATASETS, "toyset", "amisbench_toy_dataset:ToySet", "amisbench.datasets", PLUGINS)
    yield
    DATASETS.unregister("toyset")


def _source(root: Path) -> tuple[np.ndarray, np.ndarray]:
    rng = np.random.default_rng(0)
    images = rng.random((8, 1, 12, 12), dtype=np.float32)
    masks = (rng.random((8, 2, 12, 12)) > 0.5).astype(np.uint8)
    root.mkdir()
    np.save(root / "images.npy", images)
    np.save(root / "masks.npy", masks)
    return images, masks


def test_builtin_datasets_with_a_prepare_step_are_the_choices():
    assert preparable() == ["isic3", "lidc"]  # synthetic has nothing to prepare


def test_a_plugin_dataset_with_its_own_prepare_needs_no_edit_in_amisbench(toy_dataset, tmp_path, capsys):
    assert "toyset" in preparable()
    assert cli.main(["data", "prepare", "--help"]) == 0
    assert "isic3, lidc, toyset" in capsys.readouterr().out
    images, masks = _source(tmp_path / "src")
    out = tmp_path / "prepared"
    assert cli.main(["data", "prepare", "toyset", "--from", str(tmp_path / "src"), "--out", str(out),
                     "--quiet"]) == 0
    assert capsys.readouterr().out.strip() == str(out)
    adapter = DATASETS.get("toyset")
    ds = adapter(adapter.Config(root=str(out)), "test")
    assert 0 < len(ds) < 8
    for item in (ds[i] for i in range(len(ds))):
        k = int(item["id"][3:])
        assert np.array_equal(item["image"].numpy(), images[k])
        assert np.array_equal(item["masks"].numpy().astype(np.uint8), masks[k])
    # a bad source: one sentence from the plugin's prepare, exit 2, nothing left at --out
    assert cli.main(["data", "prepare", "toyset", "--from", str(tmp_path), "--out", str(tmp_path / "o2")]) == 2
    assert "expected a folder with images.npy and masks.npy" in capsys.readouterr().err
    assert not (tmp_path / "o2").exists() and not list(tmp_path.glob(".o2.partial-*"))


def test_a_dataset_without_prepare_is_refused_naming_the_ones_with_it(tmp_path, capsys):
    assert cli.main(["data", "prepare", "synthetic", "--from", str(tmp_path), "--out", str(tmp_path / "o")]) == 2
    err = capsys.readouterr().err
    choices = err.split("choose from", 1)[1]
    assert "invalid choice: 'synthetic'" in err and "isic3" in choices and "lidc" in choices
