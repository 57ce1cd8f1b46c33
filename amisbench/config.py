"""Typed, strict configuration: dataclass defaults (the paper's settings) overridden by YAML layers.

Resolution order for ``amisbench run --method M --dataset D --profile P [--variant V] [--set k=v ...]``:

1. dataclass defaults (``M.Config``, ``D.Config``, :class:`StageConfig` per stage, :class:`EvalConfig`);
2. ``configs/profiles/P.yaml``;
3. ``configs/datasets/D.yaml`` (layer file, see below);
4. the method's own ``config_layers`` class attribute (for third-party plugins), then
   ``configs/methods/M.yaml``;
5. ``--set section.key=value`` overrides.

A *layer file* is a mapping with optional keys ``description``, ``base`` (an override tree for every
profile), ``profiles`` (profile -> tree), ``datasets`` (dataset -> nested layer) and ``variants``
(variant -> nested layer). An override tree has the sections ``method``, ``dataset``, ``train`` and
``eval``; ``train`` holds ``default`` (applied to every stage) and stage names. Unknown keys, wrong types,
unknown profiles and variants are :class:`~amisbench.errors.UserError`\\ s naming the file and the key.
"""

from __future__ import annotations

import dataclasses
import hashlib
import json
import types
import typing
from dataclasses import dataclass, field, fields, is_dataclass
from importlib import resources
from pathlib import Path
from typing import Any, Literal, Union

import yaml

from .errors import UserError

PROFILES = ("smoke", "quick", "paper")


@dataclass
class StageConfig:
    """Optimisation of one training stage. Defaults follow the ATFM paper (Adam, lr 1e-4)."""

    steps: int | None = None  # optimizer steps; when None, derived from ``epochs``
    epochs: float | None = None  # passes over the training split (the papers' unit)
    batch_size: int = 16
    optimizer: Literal["adam", "adamw", "sgd"] = "adam"
    lr: float = 1e-4
    weight_decay: float = 0.0
    betas: tuple[float, float] = (0.9, 0.999)
    schedule: Literal["constant", "linear", "cosine", "step", "plateau"] = "constant"
    min_lr: float = 0.0  # ``linear`` / ``cosine`` decay from ``lr`` to ``min_lr`` at the last step
    step_size: int = 0  # for ``step``: decay every ``step_size`` steps by ``gamma``
    gamma: float = 0.1  # ``step`` and ``plateau``: the factor of each decay
    # ``plateau``: multiply the lr by ``gamma`` when the validation metric ``plateau_metric`` (default: the
    # one of ``select``) has not improved by more than ``plateau_threshold`` (relative) for ``patience``
    # evaluations (one every ``eval_every`` steps), never below ``min_lr`` (torch's ReduceLROnPlateau, rel mode);
    # ``plateau_metric: train_loss`` watches the mean training loss of the ``eval_every`` steps before each
    # observation instead (no validation set needed), ``train_loss_cumulative`` the mean since the stage began
    plateau_metric: str = ""
    patience: int = 10
    plateau_threshold: float = 1e-4
    # Checkpoint selection: ``last``, or ``best:<metric>`` (GED, GED_true, HMIoU, MDM, diversity) scored on
    # the validation split every ``eval_every`` steps (eval.val_images x eval.val_samples); ckpt/best.pt
    eval_every: int = 0
    select: str = "last"
    # Augmentation of this stage's training batches (datasets/_augment.py): None keeps the dataset's default,
    # a list replaces it (``[]``: none), e.g. [hflip, vflip, rot90, {rotate: 15}, {scale: [0.9, 1.1]}]
    augment: list[Any] | None = None
    warmup_steps: int = 0
    grad_clip: float | None = None
    ema_decay: float | None = None
    amp: bool = False  # bfloat16 autocast of the forward pass and loss on CUDA (ignored on CPU)
    ckpt_every: int = 500
    log_every: int = 50


@dataclass
class EvalConfig:
    """Evaluation protocol: GED at n = 16, 32, 100 and HM-IoU / MDM at 32, prefixes of one 100-sample draw."""

    split: Literal["train", "val", "test"] = "test"
    n_samples: int = 100
    ged_ns: tuple[int, ...] = (16, 32, 100)
    hm_iou_n: int = 32
    mdm_n: int = 32
    true_samples: int = 100  # synthetic only: draws from the true reader distribution for GED_true
    batch_images: int = 8
    max_images: int | None = None  # None: the whole split
    amp: bool = False  # bfloat16 autocast while sampling on CUDA (ignored on CPU)
    compile: bool = False  # torch.compile the method's networks before sampling (Method.compile_targets)
    # validation during training (train.<stage>.select / schedule plateau): the first val_images images of the
    # validation split, val_samples samples each. Where a protocol's validation split is its test split, a
    # seeded part of the training split (val_carve_fraction of its groups) is held out instead.
    val_images: int = 100
    val_samples: int = 16
    val_carve_fraction: float = 0.1


LOGGERS = ("csv", "tensorboard")


@dataclass
class RunConfig:
    method: Any
    dataset: Any
    train: dict[str, StageConfig]
    eval: EvalConfig = field(default_factory=EvalConfig)
    # ``train.logger``: where the training scalars go besides train_log.csv (always written): csv (nothing
    # more) or tensorboard (``<run>/tensorboard/``, needs the tensorboard extra). Not part of the config hash.
    logger: Literal["csv", "tensorboard"] = "csv"


# ----------------------------------------------------------------------------------------------------
# typed overrides
# ----------------------------------------------------------------------------------------------------

def _hints(cls: type) -> dict[str, Any]:
    return typing.get_type_hints(cls)


def coerce(value: Any, hint: Any, where: str) -> Any:
    """Check ``value`` against the type ``hint`` (int, float, bool, str, Literal, Optional, tuple, list,
    dict, nested dataclass) and convert the harmless cases (int -> float, list -> tuple)."""
    origin = typing.get_origin(hint)
    args = typing.get_args(hint)
    if hint is Any:
        return value
    if origin in (Union, types.UnionType):
        if value is None and type(None) in args:
            return None
        options = [a for a in args if a is not type(None)]
        if len(options) == 1:
            return coerce(value, options[0], where)
        for a in options:
            try:
                return coerce(value, a, where)
            except UserError:
                pass
        raise UserError(f"{where}: expected {_type_name(hint)}, got {value!r}")
    if origin is Literal:
        if value in args:
            return value
        raise UserError(f"{where}: expected one of {', '.join(map(str, args))}, got {value!r}")
    if hint is bool:
        if isinstance(value, bool):
            return value
        raise UserError(f"{where}: expected true or false, got {value!r}")
    if hint is int:
        if isinstance(value, int) and not isinstance(value, bool):
            return value
        if isinstance(value, float) and value.is_integer():
            return int(value)
        raise UserError(f"{where}: expected an integer, got {value!r}")
    if hint is float:
        if isinstance(value, (int, float)) and not isinstance(value, bool):
            return float(value)
        if isinstance(value, str):  # YAML 1.1 reads "1e-4" as a string
            try:
                return float(value)
            except ValueError:
                pass
        raise UserError(f"{where}: expected a number, got {value!r}")
    if hint is str:
        if isinstance(value, str):
            return value
        raise UserError(f"{where}: expected a string, got {value!r}")
    if origin in (tuple, list):
        if not isinstance(value, (list, tuple)):
            raise UserError(f"{where}: expected a list, got {value!r}")
        if origin is tuple and len(args) == 2 and args[1] is Ellipsis:
            return tuple(coerce(v, args[0], f"{where}[{i}]") for i, v in enumerate(value))
        if origin is tuple and args:
            if len(value) != len(args):
                raise UserError(f"{where}: expected a list of {len(args)} values, got {value!r}")
            return tuple(coerce(v, a, f"{where}[{i}]") for i, (v, a) in enumerate(zip(value, args)))
        inner = args[0] if args else Any
        out = [coerce(v, inner, f"{where}[{i}]") for i, v in enumerate(value)]
        return tuple(out) if origin is tuple else out
    if origin is dict:
        if not isinstance(value, dict):
            raise UserError(f"{where}: expected a mapping, got {value!r}")
        kt, vt = args if args else (Any, Any)
        return {coerce(k, kt, where): coerce(v, vt, f"{where}.{k}") for k, v in value.items()}
    if is_dataclass(hint):
        if isinstance(value, hint):
            return value
        if not isinstance(value, dict):
            raise UserError(f"{where}: expected a mapping, got {value!r}")
        obj = hint()
        apply_tree(obj, value, where)
        return obj
    if isinstance(hint, type) and isinstance(value, hint):
        return value
    raise UserError(f"{where}: expected {_type_name(hint)}, got {value!r}")


def _type_name(hint: Any) -> str:
    return getattr(hint, "__name__", None) or str(hint).replace("typing.", "")


def apply_tree(obj: Any, tree: dict, where: str) -> None:
    """Apply a nested mapping of overrides to the dataclass instance ``obj`` in place, strictly."""
    if not isinstance(tree, dict):
        raise UserError(f"{where}: expected a mapping, got {tree!r}")
    hints = _hints(type(obj))
    names = [f.name for f in fields(obj)]
    for key, value in tree.items():
        if key not in hints:
            raise UserError(f"{where}: unknown key '{key}'; known: {', '.join(names)}")
        current = getattr(obj, key)
        if is_dataclass(current) and isinstance(value, dict):
            apply_tree(current, value, f"{where}.{key}")
        else:
            setattr(obj, key, coerce(value, hints[key], f"{where}.{key}"))


def apply_section_tree(cfg: RunConfig, tree: dict, where: str) -> None:
    """Apply an override tree with sections method/dataset/train/eval to ``cfg``."""
    if tree is None:
        return
    if not isinstance(tree, dict):
        raise UserError(f"{where}: expected a mapping with sections method, dataset, train, eval")
    for section, sub in tree.items():
        w = f"{where}: {section}"
        if section == "train":
            if not isinstance(sub, dict):
                raise UserError(f"{w}: expected a mapping of stage names (or 'default') to settings")
            if "logger" in sub:  # train.logger: a setting of the run, not of a stage
                cfg.logger = coerce(sub["logger"], _hints(RunConfig)["logger"], f"{w}.logger")
            if "default" in sub:
                for stage_cfg in cfg.train.values():
                    apply_tree(stage_cfg, sub["default"], f"{w}.default")
            for stage, st in sub.items():
                if stage in ("default", "logger"):
                    continue
                if stage not in cfg.train:
                    raise UserError(f"{w}: unknown stage '{stage}'; this method's stages: "
                                    f"{', '.join(['default', *cfg.train])} (and logger)")
                apply_tree(cfg.train[stage], st, f"{w}.{stage}")
        elif section in ("method", "dataset", "eval"):
            apply_tree(getattr(cfg, section), sub, w)
        else:
            raise UserError(f"{where}: unknown section '{section}'; known: method, dataset, train, eval")


LAYER_KEYS = ("description", "base", "profiles", "datasets", "variants")


def apply_layer(cfg: RunConfig, layer: dict | None, where: str, *, profile: str, dataset: str,
                variant: str | None, used_variant: list[bool]) -> None:
    """Apply a layer file (see module docstring) for the given profile / dataset / variant."""
    if not layer:
        return
    if not isinstance(layer, dict):
        raise UserError(f"{where}: expected a mapping with keys {', '.join(LAYER_KEYS)}")
    for key in layer:
        if key not in LAYER_KEYS:
            raise UserError(f"{where}: unknown key '{key}'; known: {', '.join(LAYER_KEYS)}")
    apply_section_tree(cfg, layer.get("base"), f"{where} base")
    profiles = layer.get("profiles") or {}
    for p in profiles:
        if p not in PROFILES:
            raise UserError(f"{where}: unknown profile '{p}'; known: {', '.join(PROFILES)}")
    apply_section_tree(cfg, profiles.get(profile), f"{where} profiles.{profile}")
    ds_layers = layer.get("datasets") or {}
    if dataset in ds_layers:
        apply_layer(cfg, ds_layers[dataset], f"{where} datasets.{dataset}", profile=profile,
                    dataset=dataset, variant=variant, used_variant=used_variant)
    variants = layer.get("variants") or {}
    if variant is not None and variant in variants:
        used_variant[0] = True
        apply_layer(cfg, variants[variant], f"{where} variants.{variant}", profile=profile,
                    dataset=dataset, variant=None, used_variant=used_variant)


def read_yaml(path: Path | str, what: str = "config") -> Any:
    """Read a YAML file with a one-sentence error for a missing or malformed file."""
    path = Path(path)
    try:
        raw = path.read_bytes()
    except FileNotFoundError:
        raise UserError(f"{what} file {path} does not exist") from None
    except OSError as e:
        raise UserError(f"{what} file {path} cannot be read ({e.strerror or e})") from None
    if raw.startswith((b"\xff\xfe", b"\xfe\xff")):
        raise UserError(f"{what} file {path} is UTF-16 text (it starts with a UTF-16 byte-order mark); save it as "
                        "UTF-8")
    try:
        text = raw.decode("utf-8-sig")
    except UnicodeDecodeError as e:
        raise UserError(f"{what} file {path} is not UTF-8 text (byte {e.start} is invalid); save it as UTF-8"
                        ) from None
    try:
        return yaml.safe_load(text)
    except yaml.YAMLError as e:
        mark = getattr(e, "problem_mark", None)
        pos = f" at line {mark.line + 1}, column {mark.column + 1}" if mark else ""
        raise UserError(f"{what} file {path} is not valid YAML{pos}: {getattr(e, 'problem', e)}") from None


def packaged_config(*parts: str) -> Path | None:
    """Path of a YAML file shipped in ``configs/`` (the ``amisbench.configs`` package), or None."""
    res = resources.files("amisbench.configs").joinpath(*parts)
    return Path(str(res)) if res.is_file() else None


def layer_variants(layer: dict | None) -> set[str]:
    out: set[str] = set()
    if isinstance(layer, dict):
        out |= set((layer.get("variants") or {}).keys())
        for sub in (layer.get("datasets") or {}).values():
            out |= layer_variants(sub)
    return out


def parse_set(items: list[str] | None) -> list[tuple[str, Any]]:
    """Parse ``--set key=value`` items; values are YAML scalars/lists (``1e-3``, ``true``, ``[16, 32]``)."""
    out = []
    for item in items or []:
        if "=" not in item:
            raise UserError(f"--set {item!r}: expected key=value, e.g. train.default.lr=3e-4")
        key, raw = item.split("=", 1)
        key = key.strip()
        try:
            value = yaml.safe_load(raw) if raw.strip() else ""
        except yaml.YAMLError:
            value = raw
        out.append((key, value))
    return out


def apply_set(cfg: RunConfig, items: list[tuple[str, Any]]) -> None:
    for key, value in items:
        parts = key.split(".")
        if len(parts) < 2:
            raise UserError(f"--set {key}: expected section.key=value with section one of "
                            "method, dataset, train, eval")
        tree: Any = value
        for p in reversed(parts):
            tree = {p: tree}
        apply_section_tree(cfg, tree, "--set")


def to_plain(obj: Any) -> Any:
    """Dataclasses/tuples -> plain dicts/lists for YAML and hashing."""
    if is_dataclass(obj):
        return {f.name: to_plain(getattr(obj, f.name)) for f in fields(obj)}
    if isinstance(obj, dict):
        return {str(k): to_plain(v) for k, v in obj.items()}
    if isinstance(obj, (list, tuple)):
        return [to_plain(v) for v in obj]
    return obj


def config_tree(cfg: RunConfig) -> dict:
    """``cfg`` as plain sections method, dataset, train (with ``train.logger``), eval."""
    p = to_plain(cfg)
    p["train"]["logger"] = p.pop("logger")
    return p


def config_hash(plain: dict) -> str:
    return hashlib.sha256(json.dumps(plain, sort_keys=True).encode()).hexdigest()[:16]


def replace(obj: Any, **kw: Any) -> Any:
    return dataclasses.replace(obj, **kw)


def check_values(cfg: RunConfig) -> None:
    """Values the types alone do not check, refused before anything runs (the runner and the grid call it
    through ``runner.prepare``): sizes and intervals must be positive, rates positive and finite."""
    import math

    def positive(value: Any, where: str, what: str = "a positive integer") -> None:
        if value is not None and not value > 0:
            raise UserError(f"{where}: expected {what}, got {value}")

    for stage, sc in cfg.train.items():
        w = f"train.{stage}"
        positive(sc.batch_size, f"{w}.batch_size")
        positive(sc.ckpt_every, f"{w}.ckpt_every", "a positive number of steps")
        positive(sc.log_every, f"{w}.log_every", "a positive number of steps")
        if not (math.isfinite(sc.lr) and sc.lr > 0):
            raise UserError(f"{w}.lr: expected a positive finite learning rate, got {sc.lr}")
        if not 0.0 <= sc.min_lr <= sc.lr:
            raise UserError(f"{w}.min_lr: expected a value between 0 and lr ({sc.lr}), got {sc.min_lr}")
        if sc.epochs is not None and not (math.isfinite(sc.epochs) and sc.epochs >= 0):
            raise UserError(f"{w}.epochs: expected a non-negative finite number, got {sc.epochs}")
    ev = cfg.eval
    positive(ev.n_samples, "eval.n_samples")
    positive(ev.max_images, "eval.max_images", "a positive integer or null (the whole split)")
    positive(ev.batch_images, "eval.batch_images")


def validate(cfg: RunConfig) -> None:
    """The method's and the dataset's own rules (their ``Config.__post_init__``, which raises a
    :class:`UserError` naming the key) on the final values: a config is built with its defaults and then
    changed by the layers and ``--set``, which ``__post_init__`` alone would not see."""
    for section in (cfg.method, cfg.dataset):
        post_init = getattr(section, "__post_init__", None)
        if post_init is not None:
            post_init()


# ----------------------------------------------------------------------------------------------------
# resolution
# ----------------------------------------------------------------------------------------------------

@dataclass
class Resolved:
    """A resolved run configuration and where its values came from."""

    cfg: RunConfig
    method: str
    dataset: str
    profile: str
    variant: str | None
    sources: list[str]
    origins: dict[str, str] = field(default_factory=dict)  # dotted key -> the layer that gave its value

    def plain(self) -> dict:
        return {"method_name": self.method, "dataset_name": self.dataset, "profile": self.profile,
                "variant": self.variant, **config_tree(self.cfg)}

    def hash(self) -> str:
        """Hash of everything that changes the results (the logger does not)."""
        p = self.plain()
        del p["train"]["logger"]
        return config_hash(p)


def flat(tree: Any, prefix: str = "") -> dict[str, Any]:
    """A nested mapping as dotted keys (``{"a": {"b": 1}}`` -> ``{"a.b": 1}``); lists are values."""
    if not isinstance(tree, dict) or (prefix and not tree):
        return {prefix: tree}
    out: dict[str, Any] = {}
    for k, v in tree.items():
        out.update(flat(v, f"{prefix}.{k}" if prefix else str(k)))
    return out


class _Origins:
    """Which layer gave each value of a config its final content (the last one that changed it)."""

    def __init__(self, cfg: RunConfig):
        self.cfg = cfg
        self.values = self._now()
        self.where = {k: "defaults" for k in self.values}

    def _now(self) -> dict[str, Any]:
        return flat(config_tree(self.cfg))

    def after(self, where: str) -> None:
        now = self._now()
        for k, v in now.items():
            if self.values.get(k, self) != v:
                self.where[k] = where
        self.values = now


def resolve(method: str, dataset: str, profile: str = "quick", variant: str | None = None,
            sets: list[str] | None = None, extra_files: list[Path] | None = None,
            set_labels: list[str] | None = None, *, data_root: str | None = None,
            protocol: str | None = None) -> Resolved:
    """Build the :class:`RunConfig` of a run (see the module docstring for the order).

    ``set_labels`` names where each entry of ``sets`` came from (default ``--set``), for
    :attr:`Resolved.origins`. ``protocol`` and ``data_root`` (``--protocol``, ``--data-root``) are set on the
    dataset config as they are, after the layers and before ``sets``: a folder named ``2024`` or ``a: b`` is
    a folder name, never YAML."""
    from .registry import DATASETS, METHODS

    if profile not in PROFILES:
        raise UserError(f"unknown profile '{profile}'; known: {', '.join(PROFILES)}")
    mcls = METHODS.get(method)
    dcls = DATASETS.get(dataset)
    for cls, kind in ((mcls, "method"), (dcls, "dataset")):
        if not is_dataclass(getattr(cls, "Config", None)):
            raise UserError(f"{kind} '{getattr(cls, 'registry_name', cls)}' has no Config dataclass")
    cfg = RunConfig(method=mcls.Config(), dataset=dcls.Config(),
                    train={s: StageConfig() for s in mcls.stages}, eval=EvalConfig())
    sources = ["defaults"]
    used_variant = [False]
    layers: list[tuple[str, Any]] = []
    p = packaged_config("profiles", f"{profile}.yaml")
    if p is not None:
        layers.append((f"configs/profiles/{profile}.yaml", {"base": read_yaml(p)}))
    for kind, name, cls in (("datasets", dataset, dcls), ("methods", method, mcls)):
        own = getattr(cls, "config_layers", None)
        if own:
            layers.append((f"{cls.__module__}.{cls.__name__}.config_layers", own))
        p = packaged_config(kind, f"{name}.yaml")
        if p is not None:
            layers.append((f"configs/{kind}/{name}.yaml", read_yaml(p)))
    for f in extra_files or []:
        layers.append((str(f), read_yaml(f)))
    known_variants: set[str] = set()
    for where, layer in layers:
        known_variants |= layer_variants(layer)
    if variant is not None and variant not in known_variants:
        known = ", ".join(sorted(known_variants)) or "none"
        raise UserError(f"unknown variant '{variant}' of method '{method}'; known: {known}")
    origins = _Origins(cfg)
    for where, layer in layers:
        apply_layer(cfg, layer, where, profile=profile, dataset=dataset, variant=variant,
                    used_variant=used_variant)
        sources.append(where)
        origins.after(where)
    for key, value, flag in (("protocol", protocol, "--protocol"), ("root", data_root, "--data-root")):
        if value is not None:
            hints = _hints(type(cfg.dataset))
            if key not in hints:
                raise UserError(f"{flag} {value}: dataset '{dataset}' has no setting dataset.{key}")
            setattr(cfg.dataset, key, coerce(value, hints[key], f"{flag}: dataset.{key}"))
            sources.append(f"{flag} {value}")
            origins.after(flag)
    set_items = parse_set(sets)
    labels = list(set_labels or [])
    for i, item in enumerate(set_items):
        apply_set(cfg, [item])
        origins.after(labels[i] if i < len(labels) else "--set")
    if set_items:
        sources.append("--set " + " ".join(f"{k}={v}" for k, v in set_items))
    validate(cfg)
    return Resolved(cfg, method, dataset, profile, variant, sources, origins.where)


def variants_of(method: str) -> list[str]:
    """The named variants of ``method``: those of its own ``config_layers`` and of configs/methods/<method>.yaml."""
    from .registry import METHODS

    cls = METHODS.get(method)
    out = layer_variants(getattr(cls, "config_layers", None))
    p = packaged_config("methods", f"{method}.yaml")
    if p is not None:
        out |= layer_variants(read_yaml(p))
    return sorted(out)
