import pytest
import yaml

from amisbench import cli
from amisbench.config import StageConfig, apply_tree, coerce, parse_set, read_yaml, resolve
from amisbench.errors import UserError


def test_profiles_change_numbers_not_code():
    smoke = resolve("ssn", "synthetic", "smoke")
    paper = resolve("ssn", "synthetic", "paper")
    assert type(smoke.cfg.method) is type(paper.cfg.method)
    assert smoke.cfg.method.unet.widths == (8, 16)
    assert paper.cfg.method.unet.widths == (32, 64, 128, 192, 192, 192, 192)
    assert paper.cfg.method.rank == 10 and paper.cfg.method.mc_samples == 20
    assert paper.cfg.train["main"].steps == 500_000 and paper.cfg.train["main"].batch_size == 12
    assert smoke.cfg.dataset.size == 32 and paper.cfg.dataset.size == 128
    assert "configs/profiles/smoke.yaml" in smoke.sources


def test_set_overrides_are_typed():
    r = resolve("ssn", "synthetic", "smoke", sets=["train.main.lr=3e-4", "method.unet.widths=[4, 8]",
                                                     "eval.ged_ns=[16, 32]", "train.default.grad_clip=1"])
    assert r.cfg.train["main"].lr == pytest.approx(3e-4)
    assert r.cfg.method.unet.widths == (4, 8)
    assert r.cfg.eval.ged_ns == (16, 32)
    assert r.cfg.train["main"].grad_clip == 1.0
    assert r.hash() != resolve("ssn", "synthetic", "smoke").hash()


@pytest.mark.parametrize("item, message", [
    ("method.nope=1", "unknown key 'nope'; known: unet, rank"),
    ("train.main.lr=abc", "train.main.lr: expected a number, got 'abc'"),
    ("train.main.steps=1.5", "train.main.steps: expected an integer"),
    ("train.main.optimizer=lbfgs", "expected one of adam, adamw, sgd"),
    ("train.gtr.lr=1", "unknown stage 'gtr'; this method's stages: default, main"),
    ("lr=1", "expected section.key=value"),
    ("bogus.lr=1", "unknown section 'bogus'"),
    ("method.antithetic=3", "expected true or false"),
    ("noequals", "expected key=value"),
])
def test_bad_set_values_name_the_key(item, message):
    with pytest.raises(UserError, match=message.replace("(", r"\(").replace(")", r"\)")):
        resolve("ssn", "synthetic", "smoke", sets=[item])


def test_unknown_profile_and_variant():
    with pytest.raises(UserError, match="unknown profile 'huge'; known: smoke, quick, paper"):
        resolve("ssn", "synthetic", "huge")
    with pytest.raises(UserError, match="unknown variant 'v1' of method 'ssn'; known: flips"):
        resolve("ssn", "synthetic", "smoke", variant="v1")


def test_yaml_layer_errors_name_the_file_and_key(tmp_path):
    bad = tmp_path / "extra.yaml"
    bad.write_text("profiles:\n  smoke:\n    method: {rnak: 3}\n")
    with pytest.raises(UserError, match=r"extra.yaml profiles.smoke: method: unknown key 'rnak'"):
        resolve("ssn", "synthetic", "smoke", extra_files=[bad])
    bad.write_text("profiles:\n  smoke:\n    train: {main: {batch_size: many}}\n")
    with pytest.raises(UserError, match=r"extra.yaml profiles.smoke: train.main.batch_size: expected an integer"):
        resolve("ssn", "synthetic", "smoke", extra_files=[bad])
    bad.write_text("profiles: [unclosed\n")
    with pytest.raises(UserError, match=r"extra.yaml is not valid YAML at line"):
        resolve("ssn", "synthetic", "smoke", extra_files=[bad])
    bad.write_text("profiels: {}\n")
    with pytest.raises(UserError, match=r"unknown key 'profiels'; known: description, base, profiles"):
        resolve("ssn", "synthetic", "smoke", extra_files=[bad])
    with pytest.raises(UserError, match="does not exist"):
        read_yaml(tmp_path / "missing.yaml")


def test_coerce_cases():
    assert coerce(1, float, "x") == 1.0 and isinstance(coerce(1, float, "x"), float)
    assert coerce("1e-4", float, "x") == 1e-4  # YAML 1.1 reads 1e-4 as a string
    assert coerce(None, float | None, "x") is None
    assert coerce([1, 2], tuple[float, float], "x") == (1.0, 2.0)
    with pytest.raises(UserError, match="expected a list of 2 values"):
        coerce([1, 2, 3], tuple[float, float], "x")
    with pytest.raises(UserError):
        coerce(True, int, "x")  # a bool is not a count
    s = StageConfig()
    apply_tree(s, {"betas": [0.5, 0.9]}, "t")
    assert s.betas == (0.5, 0.9)


def test_parse_set_reads_yaml_scalars():
    assert parse_set(["a.b=1e-3", "a.c=true", "a.d=[1, 2]", "a.e=text"]) == [
        ("a.b", "1e-3"), ("a.c", True), ("a.d", [1, 2]), ("a.e", "text")]


def test_resolved_config_is_saved_with_the_run(tmp_path):
    rc = cli.main(["run", "--method", "ssn", "--dataset", "synthetic", "--profile", "smoke", "--quiet",
                   "--results", str(tmp_path), "--set", "train.main.steps=2"])
    assert rc == 0
    saved = yaml.safe_load((tmp_path / "runs/synthetic/ssn/smoke/seed-0/config.yaml").read_text())
    assert saved["train"]["main"]["steps"] == 2
    assert saved["method"]["unet"]["widths"] == [8, 16]
    assert saved["method_name"] == "ssn" and saved["profile"] == "smoke"
    assert any(s.startswith("--set") for s in saved["sources"])


@pytest.mark.parametrize("method, sets, message", [
    ("analog_bits", ["method.self_cond_prob=2"], "method.self_cond_prob: expected a probability in [0, 1], got 2.0"),
    ("atfm", ["method.steps=0"], "method.steps: expected at least 1, got 0"),
    ("atfm", ["method.mc_samples=3"], "method.mc_samples: expected an even number"),
    ("atfm", ["method.sample_chunk=-1"], "method.sample_chunk: expected 0 (no chunking) or a positive count, got -1"),
    ("c_prob_unet", ["method.fcomb_convs=1"], "method.fcomb_convs: expected at least 2, got 1"),
    ("c_ssn", ["method.mc_samples=5"], "method.mc_samples: expected an even number"),
    ("ccdm", ["method.votes=3", "method.last_step=sample"], "method.votes: expected 1 with last_step sample"),
    ("ccdm", ["method.classes=1"], "method.classes: expected at least 2, got 1"),
    ("cimd", ["method.steps=1"], "method.steps: expected at least 2, got 1"),
    ("mose", ["method.gamma0=0"], "method.gamma0: expected a value in (0, 1], got 0.0"),
    ("p2sam", ["method.lora_rank=-1"], "method.lora_rank: expected at least 0, got -1"),
    ("phiseg", ["method.latent_levels=9"], "method.latent_levels: expected a level between 1 and len(widths)"),
    ("prob_unet", ["method.latent_dim=0"], "method.latent_dim: expected at least 1, got 0"),
    ("ssn", ["method.rank=0"], "method.rank: expected at least 1, got 0"),
    ("ssn", ["method.eps=0"], "method.eps: expected a positive number, got 0.0"),
])
def test_a_bad_method_value_is_refused_before_anything_runs(tmp_path, capsys, method, sets, message):
    """Each method's Config.__post_init__ rules, applied by the resolver to the final values: one sentence
    naming the key, exit 2, nothing written (the model is never built)."""
    argv = ["run", "--method", method, "--dataset", "synthetic", "--profile", "smoke", "--results", str(tmp_path / "r")]
    for s in sets:
        argv += ["--set", s]
    assert cli.main(argv) == 2
    err = capsys.readouterr().err
    assert err.startswith("amisbench run: error: " + message) and err.count("\n") == 1
    assert not (tmp_path / "r").exists()
    with pytest.raises(UserError, match=message.split(":")[0]):  # a Config built in code is checked alike
        resolve(method, "synthetic", "smoke", sets=sets)
