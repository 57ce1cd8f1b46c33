"""ATFM: Ambiguity-aware Truncated Flow Matching (Li et al., AAAI 2026; arXiv 2511.06857).

Original code: github.com/PerceptionComputingLab/ATFM (commit not checked here; what it does is taken
from the suite's DESIGN.md, section 6). Two training stages:

1. ``gtr``: the Gaussian Truncation Representation (:mod:`.gtr`), a U-Net with a rank-10 Gaussian head
   over the logits, trained with L_Prior on one random reader per image per step.
2. ``sfm``: Segmentation Flow Matching (:mod:`.sfm`). GTR is frozen; the source is x0 = sigmoid(z),
   z ~ GTR (one draw per image per step, shared by its readers), the target x1 a binary reader mask, and
   the ST-Net (:mod:`.st_net`) learns the velocity of the straight path with
   L_SF = L_FM + alpha * (1 - Dice(x_1t, y)).

Data-Hierarchical Inference (:meth:`ATFM.sample`): one GTR pass per image gives the explicit truncation
distribution; n logit maps are drawn from it, squashed by the sigmoid, and carried to masks by ``steps``
Euler steps of the ST-Net (25 by default, Heun as an option), thresholded at 0.5. All n samples of all
images run as one batched tensor, cut into chunks of ``sample_chunk`` samples; every random number is
drawn up front from the caller's generator, so the output does not depend on the chunk size.
``sampler: release_loop`` draws the samples one at a time (one image and one sample per pass, each with
its own GTR pass and Euler steps), like the release's per-sample loop (kept for the timing comparison).

The truncation: the full flow would start at Gaussian noise; ATFM starts it at the explicit Gaussian of
GTR at T_trunc (paper Theorems 1-2: a Gaussian over logits is an admissible diffusion marginal), so the
flow from t = 0 (GTR) to t = 1 (masks) is the part after truncation. lambda = 1e-3 (T = 1000, linear
schedule) is read as the training time grid t = k / T (and the scale of the ST-Net's time features);
inference covers the same [0, 1] with ``steps`` uniform steps, the paper's "T_Trunc = 25 steps"
(Table 3). The source sits at t = 0 exactly; the paper names no offset t0, so there is none.

Table 4 variants are config values (``configs/methods/atfm.yaml``, ``variants``):
``act_gtr`` (``flow: false``: GTR samples through the sigmoid, thresholded; the sfm stage is skipped),
``sfm`` (``source: gaussian``: x0 ~ N(0, I), the gtr stage is skipped), ``sfm_no_lsf`` and
``atfm_no_lsf`` (``alpha: 0``).

Switches between the paper and the release (the paper is the default):

* ``dice: soft | detached`` -- the release thresholds x_1t before its Dice, so L_SF has no gradient;
* ``likelihood: logmeanexp | mean_nll`` -- the release's (and SSN's) log-mean-exp vs. the paper's
  literal Eq. 5 (mean of per-sample NLLs);
* ``dice_targets: own | all`` -- Dice against the flow's own reader (release) or all readers (a literal
  reading of Algorithm 1);
* ``sampler: batched | release_loop``.

Deviations: a single logit per pixel (Bernoulli) instead of two softmax classes (the same model for
binary masks); L_Prior divided by the number of pixels; the ST-Net is the suite's time-conditioned U-Net
(FiLM scale/shift per block, group norm, attention at the lowest level, 4 convolutions per block) rather
than the release's exact DDPM U-Net, at the same widths (about 18 M parameters at 128 px, against about
38 M); the soft Dice is taken of ``clamp(x_1t, 0, 1)``.

Frozen GTR during ``sfm``: :meth:`on_stage_start` sets ``requires_grad = False`` on the GTR and puts it in
eval mode; because the runner calls ``model.train()`` every step, :meth:`train` keeps a frozen GTR in
eval mode (its BatchNorm uses the running statistics of the gtr stage), and the sfm loss additionally
evaluates GTR in eval mode under ``no_grad`` whatever the module's mode.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Literal

import torch
from torch import Tensor

from amisbench.api import DataSpec, Method
from amisbench.errors import UserError
from amisbench.nn import UNetConfig
from amisbench.registry import register_method

from . import sfm
from .._blocks import check_chunk, chunks, pick_reader
from .gtr import GTR
from .st_net import STNet


@dataclass
class ATFMConfig:
    """ATFM settings; defaults are the paper's (LIDC, 128 px)."""

    # GTR (truncation distribution)
    gtr: UNetConfig = field(default_factory=lambda: UNetConfig(widths=(32, 64, 128, 192)))
    rank: int = 10
    mc_samples: int = 20  # M
    antithetic: bool = True
    eps: float = 1e-5
    likelihood: Literal["logmeanexp", "mean_nll"] = "logmeanexp"
    # SFM (ST-Net): base width = image size, multipliers (1, 2, 4), attention at the lowest level
    st_net: UNetConfig = field(default_factory=lambda: UNetConfig(
        widths=(128, 256, 512), convs_per_block=4, norm="group", groups=32, activation="silu",
        attention_levels=(2,)))
    time_dim: int = 0  # 0: 4 x base width
    flow: bool = True  # False: Act. GTR (Table 4 row A)
    source: Literal["gtr", "gaussian"] = "gtr"
    alpha: float = 1e-3  # LIDC; 1e-4 on ISIC3 (configs/methods/atfm.yaml)
    dice: Literal["soft", "detached"] = "soft"
    dice_targets: Literal["own", "all"] = "own"
    dice_smooth: float = 1.0
    timesteps: int = 1000  # T = 1 / lambda
    time_sampling: Literal["discrete", "uniform"] = "discrete"
    # sampling
    steps: int = 25
    solver: Literal["euler", "heun"] = "euler"
    threshold: float = 0.5
    sample_chunk: int = 256  # most samples per ST-Net batch (0: all at once)
    sampler: Literal["batched", "release_loop"] = "batched"
    channels_last: bool = True  # NHWC layout for both networks (speed only)


@register_method("atfm")
class ATFM(Method):
    """Ambiguity-aware Truncated Flow Matching: GTR truncation distribution + Segmentation Flow Matching."""

    Config = ATFMConfig
    stages = ("gtr", "sfm")

    def __init__(self, cfg: ATFMConfig, spec: DataSpec):
        super().__init__(cfg, spec)
        if cfg.steps < 1:
            raise UserError(f"method.steps: expected at least 1 sampling step, got {cfg.steps}")
        if cfg.antithetic and cfg.mc_samples % 2:
            raise UserError(f"method.mc_samples: antithetic sampling needs an even number, got {cfg.mc_samples}")
        if cfg.timesteps < 1:
            raise UserError(f"method.timesteps: expected T = 1 / lambda >= 1, got {cfg.timesteps}")
        check_chunk(cfg.sample_chunk)
        self.gtr = GTR(spec.channels, cfg.gtr, cfg.rank, cfg.eps, cfg.channels_last)
        self.st_net = STNet(spec.channels, cfg.st_net, cfg.time_dim, float(cfg.timesteps), cfg.channels_last)
        self._gtr_frozen = False

    # -- stages ---------------------------------------------------------------------------------------
    def trainable(self, stage: str):
        if stage == "gtr":
            return self.gtr.parameters()
        if stage == "sfm":
            return self.st_net.parameters()
        raise UserError(f"atfm: unknown stage '{stage}'; known: {', '.join(self.stages)}")

    def compile_targets(self) -> list[str]:
        return ["st_net"]  # 25 evaluations per sample; the GTR runs once and returns a distribution object

    def on_stage_start(self, stage: str) -> None:
        frozen = stage == "sfm"
        self._gtr_frozen = frozen
        self.gtr.requires_grad_(not frozen)
        if frozen:
            self.gtr.eval()

    def train(self, mode: bool = True):
        super().train(mode)
        if self._gtr_frozen:
            self.gtr.eval()  # BatchNorm of the frozen GTR keeps its gtr-stage running statistics
        return self

    # -- training -------------------------------------------------------------------------------------
    def loss(self, stage, images, masks):
        if stage == "gtr":
            y = pick_reader(masks)
            loss = self.gtr.prior_loss(images, y, mc_samples=self.cfg.mc_samples, antithetic=self.cfg.antithetic,
                                       likelihood=self.cfg.likelihood)
            return loss, {"l_prior": float(loss.detach())}
        if stage == "sfm":
            b, _, h, w = images.shape
            x0 = self._train_source(images).reshape(b, 1, h, w)
            c = self.cfg
            return sfm.sfm_loss(self.st_net, x0, masks, images, alpha=c.alpha, dice=c.dice,
                                dice_targets=c.dice_targets, smooth=c.dice_smooth, timesteps=c.timesteps,
                                time_sampling=c.time_sampling)
        raise UserError(f"atfm: unknown stage '{stage}'; known: {', '.join(self.stages)}")

    @torch.no_grad()
    def _train_source(self, images: Tensor) -> Tensor:
        """One source draw per image (global RNG): sigmoid of a frozen-GTR sample, or N(0, I)."""
        b, _, h, w = images.shape
        if self.cfg.source == "gaussian":
            return torch.randn((b, h * w), device=images.device, dtype=images.dtype)
        was = self.gtr.training
        self.gtr.eval()
        try:
            z = self.gtr(images).rsample(1)[0]
        finally:
            self.gtr.train(was)
        return torch.sigmoid(z)

    # -- sampling -------------------------------------------------------------------------------------
    def _sources(self, images: Tensor, n: int, generator: torch.Generator | None) -> Tensor:
        """All sources of a call, drawn up front: (B,n,H*W); for ``flow: false`` the GTR probabilities."""
        b, _, h, w = images.shape
        if self.cfg.flow and self.cfg.source == "gaussian":
            return torch.randn((n, b, h * w), generator=generator, device=images.device,
                               dtype=images.dtype).transpose(0, 1)
        z = self.gtr(images).rsample(n, generator=generator)  # one GTR pass, n draws: (n,B,D)
        if z.dtype in (torch.float16, torch.bfloat16):  # under autocast: integrate the flow in float32
            z = z.float()
        return torch.sigmoid(z).transpose(0, 1)

    @torch.no_grad()
    def sample(self, images, n, *, generator=None, context=None):
        if self.cfg.sampler == "release_loop":
            return self.sample_loop(images, n, generator=generator)
        b, _, h, w = images.shape
        was = self.training
        self.eval()
        try:
            x0 = self._sources(images, n, generator)  # (B,n,D)
            if not self.cfg.flow:
                return (x0 > self.cfg.threshold).reshape(b, n, h, w)
            flat = x0.reshape(b * n, 1, h, w)
            out = torch.empty((b * n, h, w), dtype=torch.bool, device=images.device)
            owner = torch.arange(b * n, device=images.device) // n  # image of each flat sample
            for s, e in chunks(b * n, self.cfg.sample_chunk):
                x1 = sfm.integrate(self.st_net, flat[s:e], images[owner[s:e]], steps=self.cfg.steps,
                                   solver=self.cfg.solver)
                out[s:e] = x1[:, 0] > self.cfg.threshold
            return out.reshape(b, n, h, w)
        finally:
            self.train(was)

    @torch.no_grad()
    def sample_loop(self, images: Tensor, n: int, *, generator: torch.Generator | None = None) -> Tensor:
        """The release's way of sampling: one image and one sample per pass, each with its own GTR pass
        and its own ``steps`` ST-Net evaluations on a batch of one.

        Same distribution as :meth:`sample`, different random stream; kept to measure the batched sampler
        against (``tests/test_atfm_benchmark.py``). Returns bool (B,n,H,W).
        """
        b, _, h, w = images.shape
        out = torch.empty((b, n, h, w), dtype=torch.bool, device=images.device)
        was = self.training
        self.eval()
        try:
            for i in range(b):
                image = images[i:i + 1]
                for j in range(n):
                    x = self._sources(image, 1, generator).reshape(1, 1, h, w)
                    if self.cfg.flow:
                        x = sfm.integrate(self.st_net, x, image, steps=self.cfg.steps, solver=self.cfg.solver)
                    out[i, j] = x[0, 0] > self.cfg.threshold
            return out
        finally:
            self.train(was)

    def nfe(self, n: int) -> int:
        """Network evaluations for n samples of one image: 1 GTR pass + n x steps ST-Net evaluations
        (x2 for Heun); 1 for Act. GTR; no GTR pass with a Gaussian source; the release loop repeats the GTR
        pass for every sample."""
        c = self.cfg
        if not c.flow:
            return 1 if c.sampler == "batched" else n
        st = n * c.steps * (2 if c.solver == "heun" else 1)
        if c.source == "gaussian":
            return st
        return st + (1 if c.sampler == "batched" else n)
