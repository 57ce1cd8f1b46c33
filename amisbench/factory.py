"""The one place a method's model is built: for training, for sampling, from a checkpoint, or on ``meta``.

Every command that needs a model (``run``, ``timing``, ``figures``, ``methods --verbose``) calls
:func:`build_method`; :func:`load_trained` rebuilds the model of a finished run folder through it.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any, Mapping

import torch

from .config import Resolved
from .errors import UserError
from .registry import DATASETS, METHODS
from .seeding import derive_seed
from .store import CheckpointError, is_done, load_torch, read_run_info

#: the keys of the runner's checkpoint dict
STATE_KEYS = ("config_hash", "model", "stage", "step", "done_stages", "log", "rng")


def check_state(state: Any, path: Path) -> dict:
    """A resume checkpoint must be a dict with the runner's keys (its checksum has passed already)."""
    if not isinstance(state, dict):
        raise CheckpointError(f"checkpoint {path} holds a {type(state).__name__}, expected the runner's dict; "
                              "delete it or pass --force to start over")
    missing = [k for k in STATE_KEYS if k not in state]
    if missing:
        raise CheckpointError(f"checkpoint {path} lacks {', '.join(missing)}; delete it or pass --force to start "
                              "over")
    return state


def load_weights(model: torch.nn.Module, weights: Any, path: Path | str) -> None:
    """``model.load_state_dict`` with a one-sentence error for missing or unexpected keys and wrong shapes."""
    try:
        model.load_state_dict(weights)
    except (RuntimeError, TypeError, AttributeError, KeyError, ValueError) as e:
        first = str(e).strip().splitlines()
        detail = " ".join(line.strip() for line in first[:3])[:300]
        raise CheckpointError(f"checkpoint {path} does not fit this model ({detail}); delete it or pass --force "
                              "to start over") from None


def build_method(resolved: Resolved, dataspec: Any, *, device: torch.device | str,
                 checkpoint: Path | str | Mapping[str, Any] | None = None, seed: int | None = None,
                 sampling: bool | None = None) -> torch.nn.Module:
    """The model of ``resolved.method`` with config ``resolved.cfg.method`` for data of shape ``dataspec``.

    Args:
        device: where its weights live; ``"meta"`` builds it without allocating anything (parameter counts).
        checkpoint: the runner's checkpoint file (checksum and contents verified) or a ``state_dict`` whose
            weights are loaded into the model.
        seed: the run's seed; the weights are initialised from the generator seeded by ("init", seed).
        sampling: run every stage's :meth:`~amisbench.api.Method.on_stage_start` hook in order and put the
            model in eval mode, as after training (default: when a checkpoint is given).

    Raises:
        UserError: the method cannot be built with this config for this data (a ValueError or TypeError of
            its constructor), or the checkpoint does not verify or does not fit
            (:class:`~amisbench.store.CheckpointError`).
    """
    mcls = METHODS.get(resolved.method)
    dev = torch.device(device)
    if seed is not None:
        torch.manual_seed(derive_seed("init", seed))
    try:
        if dev.type == "meta":
            with torch.device("meta"):
                model = mcls(resolved.cfg.method, dataspec)
        else:
            model = mcls(resolved.cfg.method, dataspec).to(dev)
    except (ValueError, TypeError) as e:
        size = f"{getattr(dataspec, 'height', '?')}x{getattr(dataspec, 'width', '?')}"
        raise UserError(f"{resolved.method} cannot be built with this config for {resolved.dataset} ({size}): {e}"
                        ) from None
    if checkpoint is not None:
        if isinstance(checkpoint, Mapping):
            load_weights(model, checkpoint, "given")
        else:
            path = Path(checkpoint)
            load_weights(model, check_state(load_torch(path, map_location=dev), path)["model"], path)
    if sampling if sampling is not None else checkpoint is not None:
        for stage in mcls.stages:
            model.on_stage_start(stage)
        model.eval()
    return model


def load_trained(folder: Path | str, device: str = "cpu") -> tuple[torch.nn.Module, Any, Resolved]:
    """Rebuild the trained model of a finished run folder (for timing, figures and re-evaluation).

    Returns:
        The model in eval mode on ``device``, the evaluation dataset of the run, and its resolved config.
    """
    from .config import apply_section_tree, read_yaml, resolve
    from .env import pick_device

    folder = Path(folder)
    if not is_done(folder):
        raise UserError(f"{folder} is not a finished run (no run.json)")
    info = read_run_info(folder)
    saved = read_yaml(folder / "config.yaml", "run config")
    sections = ("method", "dataset", "train", "eval")
    if not isinstance(saved, dict) or any(k not in saved for k in sections):
        raise UserError(f"run config file {folder / 'config.yaml'} lacks the sections method, dataset, train, eval; "
                        "the file is damaged")
    res = resolve(info["method"], info["dataset"], info["profile"], info.get("variant"))
    apply_section_tree(res.cfg, {k: saved[k] for k in sections}, str(folder))
    eval_ds = DATASETS.get(res.dataset)(res.cfg.dataset, res.cfg.eval.split)
    model = build_method(res, eval_ds.spec, device=pick_device(device), checkpoint=folder / "ckpt" / "last.pt")
    return model, eval_ds, res
