"""Segmentation Flow Matching (SFM): the flow from the truncation distribution to the reader masks.

Paper Algorithm 1, with x0 the source (``sigmoid(z)``, z drawn from the frozen GTR) and x1 a reader mask:

* ``x_t = t x1 + (1 - t) x0`` (straight, "optimal transport" path) and velocity target ``x1 - x0``;
* ``x_1t = x_t + v (1 - t)``, the end point the predicted velocity leads to from x_t;
* ``L_SF = L_FM + alpha * mean_i (1 - Dice(x_1t, y_i))``, L_FM the mean squared velocity error.

Every reader of an image is its own target: the image's source draw is shared by its A readers, and
both terms are means over readers (``dice_targets: own``, the release). The flow time t is drawn once per
image and shared by its readers (``time_per: image``, the release's ``train_prior_*.py``); ``time_per:
reader`` draws one t per (image, reader) flow. ``dice_targets: all`` is the literal reading of Algorithm 1
line 4, where one x_1t is compared with all N readers of its image.

Dice (which one a table used is stated in its caption):

* ``soft`` (default, the paper's L_SF): a differentiable Dice of ``clamp(x_1t, 0, 1)`` per flow, smoothing
  ``(2 |p y| + s) / (|p| + |y| + s)`` with s = 1 (two empty masks: Dice 1, the suite's convention);
* ``release``: as released -- x_1t thresholded (``>= 0.5``), one hard Dice per reader over the whole batch
  (smoothing 1e-8), averaged over readers, detached (no gradient, so "w/o L_SF" trains the same network);
* ``detached``: the per-flow Dice of thresholded masks, without gradient (s = 1).

Time: lambda = 1e-3 (T = 1000, paper Implementation Details) is the training time grid, as released:
t = k / T with k uniform in {0, ..., T - 1} (``time_sampling: discrete``); ``uniform`` draws t from
U[0, 1). The ST-Net sees t as is. Sampling integrates t from 0 to 1 with ``steps`` Euler (or Heun) steps,
25 by default (the paper and ``test_prior_LIDC.py``; ``test_prior_ISIC.py`` uses 50).
"""

from __future__ import annotations

from typing import Callable, Literal

import torch
from torch import Tensor

Velocity = Callable[[Tensor, Tensor, Tensor], Tensor]  # (x_t (N,1,H,W), t (N,), images (N,C,H,W)) -> v


def _bcast(t: Tensor, like: Tensor) -> Tensor:
    return t.reshape(-1, *([1] * (like.dim() - 1))).to(like.dtype)


def interpolate(x0: Tensor, x1: Tensor, t: Tensor) -> Tensor:
    """x_t = t x1 + (1 - t) x0, with t (N,) broadcast over (N,...)."""
    tb = _bcast(t, x0)
    return tb * x1 + (1 - tb) * x0


def velocity_target(x0: Tensor, x1: Tensor) -> Tensor:
    """The constant velocity of the straight path: x1 - x0."""
    return x1 - x0


def project(x_t: Tensor, v: Tensor, t: Tensor) -> Tensor:
    """x_1t = x_t + v (1 - t): where velocity v leads from x_t at time t (Algorithm 1, line 3)."""
    return x_t + v * (1 - _bcast(t, x_t))


def sample_times(n: int, *, timesteps: int = 1000, mode: Literal["discrete", "uniform"] = "discrete",
                 device: torch.device | str = "cpu", generator: torch.Generator | None = None) -> Tensor:
    """Training times (n,) in [0, 1): k / T on the grid of T = 1 / lambda steps, or uniform."""
    if mode == "discrete":
        return torch.randint(0, timesteps, (n,), device=device, generator=generator).float() / timesteps
    return torch.rand((n,), device=device, generator=generator)


def dice_scores(pred: Tensor, target: Tensor, *, smooth: float = 1.0) -> Tensor:
    """Dice of (...,D) predictions in [0,1] against (...,D) masks: (2 sum p y + s) / (sum p + sum y + s)."""
    inter = (pred * target).sum(-1)
    return (2 * inter + smooth) / (pred.sum(-1) + target.sum(-1) + smooth)


DiceMode = Literal["soft", "release", "detached"]
RELEASE_SMOOTH = 1e-8  # the release's Dice smoothing (train_prior_*.py)


def dice_loss(x1t: Tensor, masks: Tensor, *, mode: DiceMode = "soft",
              targets: Literal["own", "all"] = "own", smooth: float = 1.0, threshold: float = 0.5) -> Tensor:
    """Mean of 1 - Dice(x_1t, y) (the semantic term of L_SF).

    Args:
        x1t: (B,A,D) projected end points, one per (image, reader) flow.
        masks: (B,A,D) reader masks in {0,1}.
        mode: ``soft`` (clamp to [0,1], differentiable), ``release`` (threshold, one Dice per reader over
            the whole batch, smoothing 1e-8, no gradient) or ``detached`` (threshold, per flow, no gradient).
        targets: ``own`` (each flow against its own reader) or ``all`` (against every reader of the image);
            ``release`` is always ``own``.
        smooth: Dice smoothing s (not used by ``release``).
        threshold: binarisation threshold of ``release`` and ``detached``.

    Returns:
        scalar; without a graph unless ``mode`` is ``soft``.
    """
    if mode == "release":
        with torch.no_grad():
            hard = (x1t >= threshold).to(x1t.dtype).transpose(0, 1).flatten(1)  # (A, B*D): a batch per reader
            return (1 - dice_scores(hard, masks.transpose(0, 1).flatten(1), smooth=RELEASE_SMOOTH)).mean()
    if mode == "detached":
        with torch.no_grad():
            return dice_loss((x1t > threshold).to(x1t.dtype), masks, mode="soft", targets=targets,
                             smooth=smooth).detach()
    p = x1t.clamp(0, 1)
    if targets == "own":
        d = dice_scores(p, masks, smooth=smooth)  # (B,A)
    else:
        d = dice_scores(p[:, :, None], masks[:, None], smooth=smooth)  # (B,A,A')
    return (1 - d).mean()


def sfm_loss(net: Velocity, x0: Tensor, masks: Tensor, images: Tensor, *, alpha: float,
             dice: DiceMode = "soft", dice_targets: Literal["own", "all"] = "own",
             smooth: float = 1.0, timesteps: int = 1000,
             time_sampling: Literal["discrete", "uniform"] = "discrete",
             time_per: Literal["image", "reader"] = "image") -> tuple[Tensor, dict[str, float]]:
    """L_SF of one batch.

    Args:
        net: the ST-Net.
        x0: (B,1,H,W) source draws, one per image (shared by its readers).
        masks: (B,A,H,W) reader masks in {0,1} (the targets x1).
        images: (B,C,H,W) the ST-Net's condition.
        alpha: weight of the Dice term.
        time_per: one t per image shared by its readers (the release) or one per (image, reader).

    Returns:
        (loss, logs) with logs ``l_fm``, ``l_dice``.
    """
    b, a, h, w = masks.shape
    x1 = masks.reshape(b * a, 1, h, w).to(x0.dtype)
    x0r = x0.repeat_interleave(a, dim=0)
    if time_per == "image":
        t = sample_times(b, timesteps=timesteps, mode=time_sampling, device=x0.device).repeat_interleave(a)
    else:
        t = sample_times(b * a, timesteps=timesteps, mode=time_sampling, device=x0.device)
    x_t = interpolate(x0r, x1, t)
    v = net(x_t, t, images.repeat_interleave(a, dim=0))
    l_fm = (v - velocity_target(x0r, x1)).pow(2).mean()
    x1t = project(x_t, v, t).reshape(b, a, h * w)
    l_dice = dice_loss(x1t, masks.reshape(b, a, h * w).to(x0.dtype), mode=dice, targets=dice_targets,
                       smooth=smooth)
    loss = l_fm + alpha * l_dice
    return loss, {"l_fm": float(l_fm.detach()), "l_dice": float(l_dice.detach())}


def integrate(net: Velocity, x0: Tensor, images: Tensor, *, steps: int,
              solver: Literal["euler", "heun"] = "euler") -> Tensor:
    """Solve dx/dt = v(x, t) from t = 0 to 1 with ``steps`` uniform steps.

    Args:
        net: the ST-Net.
        x0: (N,1,H,W) start points.
        images: (N,C,H,W) the image of each start point.
        steps: number of steps (Euler: one evaluation each; Heun: two).
        solver: ``euler`` (the release) or ``heun`` (second order, trapezoidal corrector).

    Returns:
        (N,1,H,W) end points x_1.
    """
    x = x0
    n = x.shape[0]
    dt = 1.0 / steps
    for k in range(steps):
        t = torch.full((n,), k * dt, device=x.device, dtype=x.dtype)
        v = net(x, t, images).to(x.dtype)  # the state stays in its own precision under autocast
        if solver == "heun":
            x_pred = x + dt * v
            v2 = net(x_pred, torch.full_like(t, (k + 1) * dt), images).to(x.dtype)
            x = x + dt * 0.5 * (v + v2)
        else:
            x = x + dt * v
    return x
