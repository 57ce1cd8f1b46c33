"""Training loggers besides ``train_log.csv`` (always written): ``train.logger: csv`` (the default, nothing
more) or ``tensorboard`` (event files in ``<run>/tensorboard/``, the same scalars as train_log.csv under
``<stage>/<column>`` at the stage's step; needs the optional ``tensorboard`` package:
``pip install 'amisbench[tensorboard]'``)."""

from __future__ import annotations

from pathlib import Path
from typing import Any

from .errors import UserError


def check_tensorboard() -> None:
    """UserError unless the tensorboard package can be imported (checked before a run writes anything)."""
    try:
        import tensorboard  # noqa: F401
    except ImportError:
        raise UserError("train.logger: tensorboard needs the tensorboard package: pip install "
                        "'amisbench[tensorboard]' (or set train.logger=csv)") from None


class TensorBoardLogger:
    """Writes each train_log.csv row as scalars ``<stage>/<column>`` at ``step``."""

    def __init__(self, folder: Path):
        from torch.utils.tensorboard import SummaryWriter

        self.writer = SummaryWriter(log_dir=str(Path(folder) / "tensorboard"))

    def log(self, row: dict[str, Any]) -> None:
        stage, step = row["stage"], int(row["step"])
        for key, value in row.items():
            if key not in ("stage", "step") and isinstance(value, (int, float)) and not isinstance(value, bool):
                self.writer.add_scalar(f"{stage}/{key}", value, global_step=step)
        self.writer.flush()  # a killed run keeps what it logged

    def close(self) -> None:
        self.writer.close()


def open_logger(kind: str, folder: Path) -> TensorBoardLogger | None:
    """The extra logger of ``train.logger`` (None for csv: train_log.csv is written anyway)."""
    if kind == "tensorboard":
        check_tensorboard()
        return TensorBoardLogger(folder)
    return None
