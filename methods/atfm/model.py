"""ATFM: Ambiguity-aware Truncated Flow Matching (Li et al., AAAI 2026; arXiv 2511.06857).

Original code: github.com/PerceptionComputingLab/ATFM at eeaa1b4 (the release); every number of the
``paper`` profile cites its file there (``configs/methods/atfm.yaml``). Two training stages:

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
drawn up front from the caller's generator, so the output does not depend on the chunk size
(``sample_chunk: auto``, the default: the largest chunk the free CUDA memory holds). Speed switches, none of
which changes the model: ``attention: sdpa`` (``F.scaled_dot_product_attention`` in the bottleneck; ``einsum``
as released), ``channels_last``, ``cuda_graphs`` (the Euler loop of a chunk replayed as one CUDA graph);
bf16 autocast and ``torch.compile`` of the ST-Net are ``eval.amp`` / ``eval.compile`` (``timing --dtype`` /
``--compile``), under which the flow's state stays float32.
``sampler: release_loop`` draws the samples one at a time (one GTR pass per image, then one sample per
pass with its own Euler steps), like the release's test script (kept for the timing comparison).

The truncation: the full flow would start at Gaussian noise; ATFM starts it at the explicit Gaussian of
GTR at T_trunc (paper Theorems 1-2: a Gaussian over logits is an admissible diffusion marginal), so the
flow from t = 0 (GTR) to t = 1 (masks) is the part after truncation. lambda = 1e-3 (T = 1000, linear
schedule) is read as the training time grid t = k / T, as released; the ST-Net sees t in [0, 1) as is;
inference covers the same [0, 1] with ``steps`` uniform steps, the paper's "T_Trunc = 25 steps"
(Table 3). The source sits at t = 0 exactly; the paper names no offset t0, so there is none.

Table 4 variants are config values (``configs/methods/atfm.yaml``, ``variants``):
``act_gtr`` (``flow: false``: GTR samples through the sigmoid, thresholded; the sfm stage is skipped),
``sfm`` (``source: gaussian``: x0 ~ N(0, I), the gtr stage is skipped), ``sfm_no_lsf`` and
``atfm_no_lsf`` (``alpha: 0``).

Switches between the paper and the release (the paper is the default):

* ``dice: soft | release | detached`` -- the release thresholds x_1t before a batch-global Dice, so L_SF
  has no gradient (:mod:`.sfm`); the ``release`` variant sets ``dice: release``;
* ``time_per: image | reader`` -- one flow time per image shared by its readers (release) or per reader;
* ``likelihood: logmeanexp | mean_nll`` -- the release's (and SSN's) log-mean-exp vs. the paper's
  literal Eq. 5 (mean of per-sample NLLs);
* ``dice_targets: own | all`` -- Dice against the flow's own reader (release) or all readers (a literal
  reading of Algorithm 1);
* ``sampler: batched | release_loop``.

Networks: the GTR (:mod:`.gtr`) and the ST-Net (:mod:`.st_net`) have the release's layouts (2,260,524 and
38,547,585 parameters at 128 px; 152,133,889 for the ST-Net at 256 px), so the release's checkpoint files
load through :mod:`.release`: ``method.init_gtr=GTR_LIDC.pt`` / ``method.init_sfm=SFM-for-ATFM-LIDC.pth``
start a run from them (with ``train.gtr.steps=0 train.sfm.steps=0`` the run evaluates the authors'
model). Such runs carry the leaky label (:attr:`ATFM.weights_label`) whatever the protocol: those
weights were trained on the release's slice-level split. ``cond: grey`` conditions the ST-Net on the
greyscale image 0.299 R + 0.587 G + 0.114 B (the release on ISIC) while GTR sees RGB.

Deviations: a single logit per pixel (Bernoulli) instead of two softmax classes (the same model for
binary masks; the release also uses one class); L_Prior divided by the number of pixels (a constant
factor); the soft Dice is taken of ``clamp(x_1t, 0, 1)``; the release's ISIC script averages its three
reader losses with 0.33 instead of 1/3 (not reproduced: a 1 % loss scale).

Frozen GTR during ``sfm``: :meth:`on_stage_start` sets ``requires_grad = False`` on the GTR and puts it in
eval mode; because the runner calls ``model.train()`` every step, :meth:`train` keeps a frozen GTR in
eval mode, and the sfm loss additionally evaluates GTR in eval mode under ``no_grad``.
"""

from __future__ import annotations

import sys
import weakref
from dataclasses import dataclass, field
from typing import Literal

import torch
from torch import Tensor

from amisbench.api import DataSpec, Method, at_least, check_config
from amisbench.errors import UserError
from amisbench.nn import UNetConfig
from amisbench.registry import register_method

from . import release, sfm
from .._blocks import check_chunk, chunks, pick_reader
from .gtr import GTR, release_backbone
from .st_net import STNet, STNetConfig

AUTO_CHUNK = 256  # sample_chunk: auto off CUDA
AUTO_MEMORY_FRACTION = 0.8  # sample_chunk: auto on CUDA: share of the free memory one chunk may take
_SAMPLE_BYTES: dict[tuple, int] = {}  # CUDA memory of one sample's ST-Net call, per shape and dtype (auto chunk)
_GRAPHS: "weakref.WeakKeyDictionary[ATFM, dict]" = weakref.WeakKeyDictionary()  # captured Euler loops, per model
_NOTED: set[str] = set()  # devices on which the cuda_graphs note was printed
GREY = (0.299, 0.587, 0.114)  # the release's RGB -> grey weights for the ST-Net condition (train_prior_ISIC.py)
RELEASE_WEIGHTS_LABEL = "leaky: ATFM release weights (trained on the release's slice-level split)"


@dataclass
class ATFMConfig:
    """ATFM settings; defaults are the paper's (LIDC, 128 px)."""

    # GTR (truncation distribution): the release's U-Net (models/unet.py), rank 10, eps added twice
    gtr: UNetConfig = field(default_factory=release_backbone)
    rank: int = 10
    mc_samples: int = 20  # M
    antithetic: bool = True
    eps: float = 1e-5
    eps_twice: bool = True  # models/GTR.py adds eps to the diagonal twice
    likelihood: Literal["logmeanexp", "mean_nll"] = "logmeanexp"
    # SFM: the release's conditional U-Net (models/Condition_Unet.py); dim 0 = the image size
    st_net: STNetConfig = field(default_factory=STNetConfig)
    cond: Literal["image", "grey"] = "image"  # grey: ST-Net sees 0.299 R + 0.587 G + 0.114 B (release, ISIC)
    flow: bool = True  # False: Act. GTR (Table 4 row A)
    source: Literal["gtr", "gaussian"] = "gtr"
    alpha: float = 1e-3  # LIDC; 1e-4 on ISIC3 (configs/methods/atfm.yaml)
    dice: Literal["soft", "release", "detached"] = "soft"
    dice_targets: Literal["own", "all"] = "own"
    dice_smooth: float = 1.0
    timesteps: int = 1000  # T = 1 / lambda: training times k / T
    time_sampling: Literal["discrete", "uniform"] = "discrete"
    time_per: Literal["image", "reader"] = "image"  # one t per image shared by its readers (release)
    # release checkpoint files ({"model_state_dict": ...}) to start from; see .release
    init_gtr: str = ""
    init_sfm: str = ""
    # sampling
    steps: int = 25
    solver: Literal["euler", "heun"] = "euler"
    threshold: float = 0.5
    # most samples per ST-Net batch; 0: all at once; auto: the most that fit in 80 % of the free CUDA memory
    # (one probe call measures the memory of a sample), 256 on other devices; the output does not depend on it
    sample_chunk: int | Literal["auto"] = "auto"
    sampler: Literal["batched", "release_loop"] = "batched"
    channels_last: bool = True  # NHWC layout for both networks (speed only)
    attention: Literal["sdpa", "einsum"] = "sdpa"  # bottleneck attention: fused kernel, or as released (einsum)
    cuda_graphs: bool = False  # replay the fixed-shape Euler loop of a chunk as one CUDA graph (CUDA only)

    def __post_init__(self) -> None:
        at_least(self, steps=1, timesteps=1)
        check_config("mc_samples", not (self.antithetic and self.mc_samples % 2),
                     "an even number (antithetic sampling draws pairs)", self.mc_samples)
        if self.sample_chunk != "auto":
            check_chunk(self.sample_chunk)


@register_method("atfm")
class ATFM(Method):
    """Ambiguity-aware Truncated Flow Matching: GTR truncation distribution + Segmentation Flow Matching.

    Stage ``gtr`` trains the GTR (a low-rank Gaussian over logits); stage ``sfm`` freezes it and trains the
    ST-Net flow from its samples to the masks.
    """

    Config = ATFMConfig
    stages = ("gtr", "sfm")

    def __init__(self, cfg: ATFMConfig, spec: DataSpec):
        super().__init__(cfg, spec)
        if cfg.cond == "grey" and spec.channels != 3:
            raise UserError(f"method.cond: 'grey' needs RGB images, {spec.name or 'the dataset'} has "
                            f"{spec.channels} channel(s); use cond: image")
        self.gtr = GTR(spec.channels, cfg.gtr, cfg.rank, cfg.eps, cfg.channels_last, cfg.eps_twice)
        self.st_net = STNet(1 if cfg.cond == "grey" else spec.channels, cfg.st_net, dim=spec.height,
                            channels_last=cfg.channels_last, attention=cfg.attention)
        self._gtr_frozen = False
        for key, net, load in (("init_gtr", self.gtr, release.load_gtr),
                               ("init_sfm", self.st_net, release.load_st_net)):
            path = getattr(cfg, key)
            if path and not next(net.parameters()).is_meta:  # a meta build (parameter count) holds no weights
                state = release.read_checkpoint(path, f"method.{key}")
                try:
                    load(net, state)
                except ValueError as e:
                    raise UserError(f"method.{key} {path}: {e} (the config builds another network: check the "
                                    "profile and dataset)") from None

    @property
    def weights_label(self) -> str:
        """The leaky label of a run started from the release's weights ('' otherwise)."""
        return RELEASE_WEIGHTS_LABEL if (self.cfg.init_gtr or self.cfg.init_sfm) else ""

    def condition(self, images: Tensor) -> Tensor:
        """The ST-Net's condition: the image, or its greyscale 0.299 R + 0.587 G + 0.114 B (``cond: grey``)."""
        if self.cfg.cond == "grey":
            w = torch.tensor(GREY, device=images.device, dtype=images.dtype)
            return (images * w.view(1, 3, 1, 1)).sum(dim=1, keepdim=True)
        return images

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
            self.gtr.eval()  # a frozen GTR stays in eval mode
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
            return sfm.sfm_loss(self.st_net, x0, masks, self.condition(images), alpha=c.alpha, dice=c.dice,
                                dice_targets=c.dice_targets, smooth=c.dice_smooth, timesteps=c.timesteps,
                                time_sampling=c.time_sampling, time_per=c.time_per)
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
    def _sources(self, images: Tensor, n: int, generator: torch.Generator | None, dist=None) -> Tensor:
        """All sources of a call, drawn up front: (B,n,H*W); for ``flow: false`` the GTR probabilities.
        ``dist``: the GTR distribution of ``images`` when already computed (:meth:`_truncation`)."""
        b, _, h, w = images.shape
        if self.cfg.flow and self.cfg.source == "gaussian":
            return torch.randn((n, b, h * w), generator=generator, device=images.device,
                               dtype=images.dtype).transpose(0, 1)
        dist = dist if dist is not None else self._truncation(images)
        with torch.autocast(images.device.type, enabled=False):
            z = dist.rsample(n, generator=generator)  # n draws: (n,B,D)
        return torch.sigmoid(z).transpose(0, 1)

    def _truncation(self, images: Tensor):
        """One GTR pass: the truncation distribution of ``images``, None for a Gaussian source. In float32
        also under autocast (one pass per image: the draws stay exact at no cost worth saving, and the flow
        is integrated in float32)."""
        if self.cfg.flow and self.cfg.source == "gaussian":
            return None
        with torch.autocast(images.device.type, enabled=False):
            return self.gtr(images.float())

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
            cond = self.condition(images)
            out = torch.empty((b * n, h, w), dtype=torch.bool, device=images.device)
            owner = torch.arange(b * n, device=images.device) // n  # image of each flat sample
            chunk = self.chunk_size(b * n, flat, cond)
            for s, e in chunks(b * n, chunk):
                x1 = self._integrate(flat[s:e], cond[owner[s:e]], min(chunk, b * n) if chunk else b * n)
                out[s:e] = x1[:, 0] > self.cfg.threshold
            return out.reshape(b, n, h, w)
        finally:
            self.train(was)

    def chunk_size(self, total: int, flat: Tensor, cond: Tensor) -> int:
        """``sample_chunk``, with ``auto`` resolved: on CUDA the most samples whose ST-Net call fits in
        ``AUTO_MEMORY_FRACTION`` of the free memory (free on the device plus cached by torch), the memory of one
        sample measured once per shape and autocast dtype by a probe call on a few samples; elsewhere
        ``AUTO_CHUNK`` (a CPU gains nothing from larger batches)."""
        c = self.cfg.sample_chunk
        if c != "auto":
            return c
        dev = flat.device
        if dev.type != "cuda":
            return min(total, AUTO_CHUNK)
        amp = torch.get_autocast_dtype("cuda") if torch.is_autocast_enabled("cuda") else None
        key = (tuple(flat.shape[1:]), tuple(cond.shape[1:]), flat.dtype, amp, dev)
        per = _SAMPLE_BYTES.get(key)
        if per is None:
            k = min(total, 8)
            torch.cuda.synchronize(dev)
            torch.cuda.reset_peak_memory_stats(dev)
            base = torch.cuda.memory_allocated(dev)
            self.st_net(flat[:k], torch.zeros(k, device=dev, dtype=flat.dtype), cond[:k])
            torch.cuda.synchronize(dev)
            per = _SAMPLE_BYTES[key] = max(1, (torch.cuda.max_memory_allocated(dev) - base) // k)
        free, _ = torch.cuda.mem_get_info(dev)
        free += torch.cuda.memory_reserved(dev) - torch.cuda.memory_allocated(dev)
        return max(1, min(total, int(AUTO_MEMORY_FRACTION * free) // per))

    def _integrate(self, x0: Tensor, cond: Tensor, size: int) -> Tensor:
        """The Euler (or Heun) steps of one chunk; with ``cuda_graphs`` on CUDA, replayed from a CUDA graph
        captured once per chunk shape (a shorter last chunk runs padded to ``size``). The graph's output
        buffer is returned: read it before the next call."""
        c = self.cfg
        if not c.cuda_graphs or x0.device.type != "cuda":
            if c.cuda_graphs and x0.device.type not in _NOTED:
                _NOTED.add(x0.device.type)
                print(f"atfm: method.cuda_graphs has no effect on {x0.device.type} (CUDA only); sampling eagerly",
                      file=sys.stderr)
            return sfm.integrate(self.st_net, x0, cond, steps=c.steps, solver=c.solver)
        n = x0.shape[0]
        amp = torch.get_autocast_dtype("cuda") if torch.is_autocast_enabled("cuda") else None
        key = (size, tuple(x0.shape[1:]), tuple(cond.shape[1:]), x0.dtype, amp, c.steps, c.solver, x0.device,
               next(self.st_net.parameters()).data_ptr())  # moved weights: a new graph
        graphs = _GRAPHS.setdefault(self, {})
        entry = graphs.get(key)
        if entry is None:
            graphs.clear()  # one graph per model: its memory pool holds a chunk's activations
            sx = x0.new_zeros((size, *x0.shape[1:]))
            sc = cond.new_zeros((size, *cond.shape[1:]))
            sx[:n], sc[:n] = x0, cond

            def run() -> Tensor:
                # autocast's weight cache would be freed when the caller's autocast exits: off inside graphs
                with torch.autocast("cuda", dtype=amp or torch.bfloat16, enabled=amp is not None,
                                    cache_enabled=False):
                    return sfm.integrate(self.st_net, sx, sc, steps=c.steps, solver=c.solver)

            side = torch.cuda.Stream(x0.device)
            side.wait_stream(torch.cuda.current_stream(x0.device))
            with torch.cuda.stream(side):
                run()  # warm-up outside the graph (lazy initialisation, kernel selection)
            torch.cuda.current_stream(x0.device).wait_stream(side)
            graph = torch.cuda.CUDAGraph()
            with torch.cuda.graph(graph):
                so = run()
            entry = graphs[key] = (graph, sx, sc, so)
        graph, sx, sc, so = entry
        sx[:n].copy_(x0)
        sc[:n].copy_(cond)
        graph.replay()
        return so[:n]

    @torch.no_grad()
    def sample_loop(self, images: Tensor, n: int, *, generator: torch.Generator | None = None) -> Tensor:
        """The release's way of sampling (``test_prior_LIDC.py``): one GTR pass per image, then one sample
        at a time, each with its own ``steps`` ST-Net evaluations on a batch of one.

        Same distribution as :meth:`sample`, different random stream; kept to measure the batched sampler
        against (``tests/methods/test_atfm_benchmark.py``). Returns bool (B,n,H,W).
        """
        b, _, h, w = images.shape
        out = torch.empty((b, n, h, w), dtype=torch.bool, device=images.device)
        was = self.training
        self.eval()
        try:
            for i in range(b):
                image = images[i:i + 1]
                dist = self._truncation(image)
                for j in range(n):
                    x = self._sources(image, 1, generator, dist).reshape(1, 1, h, w)
                    if self.cfg.flow:
                        x = sfm.integrate(self.st_net, x, self.condition(image), steps=self.cfg.steps,
                                          solver=self.cfg.solver)
                    out[i, j] = x[0, 0] > self.cfg.threshold
            return out
        finally:
            self.train(was)

    def nfe(self, n: int) -> int:
        """Network evaluations for n samples of one image: 1 GTR pass + n x steps ST-Net evaluations
        (x2 for Heun); 1 for Act. GTR; no GTR pass with a Gaussian source; the release loop, too, runs the GTR
        once per image."""
        c = self.cfg
        if not c.flow:
            return 1
        st = n * c.steps * (2 if c.solver == "heun" else 1)
        return st if c.source == "gaussian" else st + 1
