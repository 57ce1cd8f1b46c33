"""P2SAM: Probabilistically Prompted SAMs Are Efficient Segmentator for Ambiguous Medical Images (Huang et al.,
ACM MM 2024).

Built from the paper's description and its public training scripts (``train_first_stage.py``,
``train_second_stage.py``, ``p2sam.py``), which build on SAMed (SAM ViT-B at 128 px with LoRA) and on the
Prob. U-Net PyTorch port.

Model. SAM (:mod:`amisbench.nn.sam`, ViT-B, an official checkpoint supplied by the user) at the dataset's
image size with ``masks`` = 8 multimask outputs, prompted only by the dense "no mask" embedding, and a
learnable convex-ish combination of the 8 mask logits: ``w_0 = 1 - (w_1 + ... + w_7)``, ``w_k`` initialised to
1/8 (the release's ``MaskWeights``); the prediction is ``sum_k w_k * logits_k > 0``.

Stage ``adapt`` (release: first stage): LoRA of rank 4 on q and v of every encoder block, the prompt encoder,
the mask decoder and the mask weights are trained; the pretrained encoder stays frozen. Stage ``prompt``
(release: second stage): SAM and the weights are frozen; a Prob. U-Net-style prior net (conv encoder
32/64/128/192, three convs per block, spatial mean, 1x1 conv to mean and log-sigma of a 256-d diagonal
Gaussian) reads the image, a latent sample is tiled over the prompt grid, concatenated with the dense prompt
embedding and mapped back by ``fcomb`` (1x1 convs 512->256, ReLU, two 256->256 with ReLU, a last 256->256), and
the perturbed dense embedding prompts SAM. Sampling draws one latent per sample: the image encoder and the
prior run once per image, the mask decoder once per sample (``nfe(n) = 1 + n``).

Losses (both stages, one random reader per image and step): sigmoid focal loss (alpha 0.25, gamma 2) and
soft Dice (smoothing 1, per image) on the combined logit, plus the release's cross-entropy that treats the 8
weighted mask logits as 8 classes with the 0/1 label as class index (``mask_ce``; it pushes mask 0 up on
background and mask 1 up on lesion pixels). Stage ``prompt`` adds 1e-5 x the sum of the L2 norms of the prior
and ``fcomb`` weights (the Prob. U-Net port's ``l2_regularisation``). The stage-2 learning rate of the release
is 1e-6 with 500 training images (the paper's few-shot setting); ``paper`` keeps the learning rate and gives
the stage 5,000 steps of batch 10 (= the release's 100 epochs of 500 images) over our training split.

Deviations: one Adam optimizer for all stage-1 parameters (the release gives the mask weights their own
AdamW with eps 1e-4); the IoU head keeps its first two pretrained layers (unused by P2SAM either way).

``sam_init: random`` builds the same model without pretrained weights (``quick``/``smoke`` and tests, which
also train the encoder, ``train_encoder: true``, since a random encoder has nothing to adapt). That is not
the published method: the table row of P2SAM is only comparable with a real checkpoint.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Literal

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from amisbench.api import DataSpec, Method, at_least
from amisbench.errors import UserError
from amisbench.nn.sam import SAM, SAMConfig, load_sam_checkpoint
from amisbench.registry import register_method

from ._blocks import check_chunk, chunks, he_init, pick_reader
from .prob_unet import AxisAlignedConvGaussian


@dataclass
class P2SAMConfig:
    sam: SAMConfig = field(default_factory=SAMConfig)  # ViT-B (release: sam_model_registry["vit_b"])
    sam_init: Literal["checkpoint", "random"] = "checkpoint"
    sam_checkpoint: str = ""  # path of an official SAM checkpoint, e.g. sam_vit_b_01ec64.pth
    masks: int = 8  # multimask outputs combined by the learnt weights (release: num_classes = 8)
    lora_rank: int = 4  # release: LoRA_Sam(sam, 4)
    train_encoder: bool = False  # train the whole image encoder in stage adapt (only sensible from random init)
    prior_widths: tuple[int, ...] = (32, 64, 128, 192)
    prior_convs: int = 3
    latent_dim: int = 256
    fcomb_convs: int = 4  # release: no_convs_fcomb = 4 (first + two middle + last 1x1 conv)
    mask_ce: bool = True  # the release's cross-entropy over the 8 weighted mask logits
    focal_alpha: float = 0.25
    focal_gamma: float = 2.0
    l2_weight: float = 1e-5  # release: reg_weight
    sample_chunk: int = 256  # most (image, sample) pairs per mask-decoder batch (0: all at once); memory only

    def __post_init__(self) -> None:
        check_chunk(self.sample_chunk)
        at_least(self, masks=1, latent_dim=1, lora_rank=0)


def sigmoid_focal_loss(logits: Tensor, target: Tensor, alpha: float, gamma: float) -> Tensor:
    """Focal loss of Lin et al. (2017) on sigmoid logits, averaged over every element."""
    p = torch.sigmoid(logits)
    ce = F.binary_cross_entropy_with_logits(logits, target, reduction="none")
    p_t = p * target + (1 - p) * (1 - target)
    loss = ce * (1 - p_t) ** gamma
    if alpha >= 0:
        loss = (alpha * target + (1 - alpha) * (1 - target)) * loss
    return loss.mean()


def soft_dice_loss(logits: Tensor, target: Tensor, smooth: float = 1.0) -> Tensor:
    """1 - (2|P Y| + s) / (|P| + |Y| + s) per image on sigmoid probabilities, averaged over images."""
    p = torch.sigmoid(logits).flatten(1)
    y = target.flatten(1)
    return (1 - (2 * (p * y).sum(1) + smooth) / (p.sum(1) + y.sum(1) + smooth)).mean()


class Fcomb(nn.Module):
    """Dense prompt embedding (B,C,g,g) and latent (B,L) -> perturbed dense embedding (B,C,g,g)."""

    def __init__(self, dim: int, latent: int, convs: int):
        super().__init__()
        if convs < 2:
            raise UserError(f"method.fcomb_convs: expected at least 2 (first and last 1x1 conv), got {convs}")
        layers: list[nn.Module] = [nn.Conv2d(dim + latent, dim, 1), nn.ReLU()]
        for _ in range(convs - 2):
            layers += [nn.Conv2d(dim, dim, 1), nn.ReLU()]
        layers.append(nn.Conv2d(dim, dim, 1))
        self.layers = nn.Sequential(*layers)
        for m in self.layers:
            if isinstance(m, nn.Conv2d):  # the port's init_weights_orthogonal_normal
                nn.init.orthogonal_(m.weight)
                nn.init.trunc_normal_(m.bias, std=1e-3)

    def forward(self, dense: Tensor, z: Tensor) -> Tensor:
        tiled = z[:, :, None, None].expand(-1, -1, dense.shape[2], dense.shape[3])
        return self.layers(torch.cat([dense, tiled], dim=1))


@register_method("p2sam")
class P2SAM(Method):
    """P2SAM: LoRA-adapted SAM with weighted multimask outputs, prompted by a learnt Gaussian prior.

    Stage ``adapt`` trains SAM's LoRA (or whole encoder), prompt encoder, mask decoder and mask weights; stage
    ``prompt`` freezes them and trains the prior and the prompt combiner.
    """

    Config = P2SAMConfig
    stages = ("adapt", "prompt")

    def __init__(self, cfg: P2SAMConfig, spec: DataSpec):
        super().__init__(cfg, spec)
        if spec.height != spec.width:
            raise UserError(f"p2sam needs square images; dataset {spec.name!r} has {spec.height}x{spec.width}")
        # on the meta device (`amisbench methods --verbose` counting parameters) no weights are needed
        load = cfg.sam_init == "checkpoint" and not torch.empty(0).is_meta
        if load and not cfg.sam_checkpoint:
            raise UserError("method.sam_checkpoint: p2sam needs an official SAM checkpoint (e.g. "
                            "sam_vit_b_01ec64.pth, which you download yourself; amisbench never downloads): "
                            "--set method.sam_checkpoint=PATH, or method.sam_init=random for a model trained from "
                            "scratch that is not the published method")
        self.sam = SAM(cfg.sam, spec.height, cfg.masks, cfg.lora_rank)
        if load:
            load_sam_checkpoint(self.sam, cfg.sam_checkpoint)
        self.mask_weights = nn.Parameter(torch.full((cfg.masks - 1,), 1.0 / cfg.masks))
        self.prior = AxisAlignedConvGaussian(spec.channels, tuple(cfg.prior_widths), cfg.prior_convs, cfg.latent_dim)
        he_init(self.prior)
        nn.init.normal_(self.prior.head.bias)  # release: nn.init.normal_(conv_layer.bias), i.e. std 1
        self.fcomb = Fcomb(cfg.sam.prompt_dim, cfg.latent_dim, cfg.fcomb_convs)

    # -- stages ---------------------------------------------------------------------------------------------
    def trainable(self, stage: str):
        if stage == "adapt":
            enc = self.sam.image_encoder.parameters() if self.cfg.train_encoder else self.sam.lora_parameters()
            return [*enc, *self.sam.prompt_encoder.parameters(), *self.sam.mask_decoder.parameters(),
                    self.mask_weights]
        if stage == "prompt":
            return [*self.prior.parameters(), *self.fcomb.parameters()]
        raise UserError(f"p2sam: unknown stage '{stage}'; known: {', '.join(self.stages)}")

    def on_stage_start(self, stage: str) -> None:
        self.requires_grad_(False)  # the pretrained encoder (stage adapt) and SAM + weights (stage prompt)
        for p in self.trainable(stage):
            p.requires_grad_(True)

    def compile_targets(self) -> list[str]:
        return ["sam.image_encoder", "sam.mask_decoder", "prior", "fcomb"]  # SAM is used through its parts

    # -- model ------------------------------------------------------------------------------------------------
    def weights(self) -> Tensor:
        """(masks,) combination weights: w_0 = 1 - sum of the learnt others."""
        return torch.cat([1 - self.mask_weights.sum()[None], self.mask_weights])

    def mask_logits(self, emb: Tensor, dense: Tensor) -> Tensor:
        """(B,masks,S,S) weighted mask logits (each mask multiplied by its weight, not yet summed)."""
        return self.sam.decode(emb, dense) * self.weights()[None, :, None, None]

    def loss(self, stage, images, masks):
        y = pick_reader(masks)
        b = images.shape[0]
        emb = self.sam.encode(images)
        dense = self.sam.prompt_encoder.dense_no_mask(b)
        if stage == "prompt":
            mu, sigma = self.prior(images)
            dense = self.fcomb(dense, mu + sigma * torch.randn_like(mu))
        weighted = self.mask_logits(emb, dense)
        logit = weighted.sum(1)
        focal = sigmoid_focal_loss(logit, y, self.cfg.focal_alpha, self.cfg.focal_gamma)
        dice = soft_dice_loss(logit, y)
        loss = focal + dice
        logs = {"focal": float(focal.detach()), "dice": float(dice.detach())}
        if self.cfg.mask_ce:
            ce = F.cross_entropy(weighted, y.long())
            loss = loss + ce
            logs["mask_ce"] = float(ce.detach())
        if stage == "prompt":
            l2 = sum(p.norm(2) for p in (*self.prior.parameters(), *self.fcomb.parameters()))
            loss = loss + self.cfg.l2_weight * l2
        return loss, logs

    @torch.no_grad()
    def sample(self, images, n, *, generator=None, context=None):
        b, _, h, w = images.shape
        emb = self.sam.encode(images)
        mu, sigma = self.prior(images)
        eps = torch.randn((b, n, self.cfg.latent_dim), generator=generator, device=images.device, dtype=mu.dtype)
        z = mu[:, None] + sigma[:, None] * eps  # all noise drawn up front: chunking changes nothing
        out = torch.empty((b, n, h, w), dtype=torch.bool, device=images.device)
        per = max(1, self.cfg.sample_chunk // max(1, b)) if self.cfg.sample_chunk else n
        for s0, s1 in chunks(n, per):
            k = s1 - s0
            zk = z[:, s0:s1].reshape(b * k, -1)
            dense = self.fcomb(self.sam.prompt_encoder.dense_no_mask(b * k), zk)
            logit = self.mask_logits(emb.repeat_interleave(k, dim=0), dense).sum(1)
            out[:, s0:s1] = (logit > 0).view(b, k, h, w)
        return out

    def nfe(self, n: int) -> int:
        return 1 + n  # image encoder + prior once per image, the mask decoder once per sample
