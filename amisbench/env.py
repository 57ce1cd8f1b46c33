"""Facts about where a run happens: the device it asks for, the git commit of the code, the software versions.

Written into ``run.json`` (``git``, ``env``) and timing records, so that every number names its machine.
"""

from __future__ import annotations

import platform
import subprocess
from pathlib import Path
from typing import Any

import numpy as np
import torch

from . import __version__
from .errors import UserError


def pick_device(device: str) -> torch.device:
    """The torch device of ``--device`` (cpu, cuda, cuda:N, auto); UserError for one this machine lacks."""
    if device == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    if device.startswith("cuda") and not torch.cuda.is_available():
        raise UserError(f"--device {device}: CUDA is not available on this machine; use --device cpu or auto")
    if device != "cpu" and not device.startswith("cuda"):
        raise UserError(f"--device {device}: expected cpu, cuda, cuda:N or auto")
    return torch.device(device)



def git_info() -> dict[str, Any]:
    """The commit of the code that runs and whether tracked files differ from it (None outside a checkout)."""
    root = Path(__file__).resolve().parents[1]
    try:
        sha = subprocess.run(["git", "-C", str(root), "rev-parse", "HEAD"], capture_output=True, text=True,
                             timeout=5).stdout.strip()
        dirty = bool(subprocess.run(["git", "-C", str(root), "status", "--porcelain", "--untracked-files=no"],
                                    capture_output=True, text=True, timeout=5).stdout.strip())
        return {"commit": sha or None, "dirty": dirty if sha else None}
    except (OSError, subprocess.SubprocessError):
        return {"commit": None, "dirty": None}


def environment(device: torch.device) -> dict[str, Any]:
    """Versions, platform, device name and torch threads of this process."""
    env = {"python": platform.python_version(), "torch": torch.__version__, "numpy": np.__version__,
           "amisbench": __version__, "platform": platform.platform(), "device": str(device),
           "torch_threads": torch.get_num_threads()}
    if device.type == "cuda":
        env["device_name"] = torch.cuda.get_device_name(device)
    else:
        env["device_name"] = platform.processor() or platform.machine()
    return env
