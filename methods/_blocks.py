"""Small pieces shared by the baseline plugins (Prob. U-Net, PHiSeg, CCDM, the U-Net floor).

Private module (leading underscore): the registry does not scan it.
"""

from __future__ import annotations

from typing import Callable, Literal

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from amisbench.api import check_config
from amisbench.nn.unet import make_norm


def pick_reader(masks: Tensor, return_index: bool = False):
    """One reader chosen uniformly at random per image (global torch RNG): (B,A,H,W) -> (B,H,W); with
    ``return_index`` also the chosen reader slots (B,)."""
    idx = torch.randint(0, masks.shape[1], (masks.shape[0],), device=masks.device)
    picked = masks[torch.arange(masks.shape[0], device=masks.device), idx]
    return (idx, picked) if return_index else picked


def one_hot(labels: Tensor, classes: int, dtype: torch.dtype = torch.float32) -> Tensor:
    """Integer (or {0,1} float) labels (B,H,W) -> one-hot (B,K,H,W)."""
    return F.one_hot(labels.long(), classes).permute(0, 3, 1, 2).to(dtype)


def kl_diag_gaussians(mu_q: Tensor, sigma_q: Tensor, mu_p: Tensor, sigma_p: Tensor, eps: float = 0.0) -> Tensor:
    """KL(N(mu_q, diag sigma_q^2) || N(mu_p, diag sigma_p^2)), summed over every dimension but the first.

    KL = 1/2 sum [ (s_q^2 + (m_q - m_p)^2) / s_p^2 + log s_p^2 - log s_q^2 - 1 ]. ``eps`` is added to the
    variances inside the logarithms and the division (PHiSeg's ``KL_two_gauss_with_diag_cov`` uses 1e-10);
    0 gives the exact value.

    Returns:
        (B,) float tensor.
    """
    dt = torch.promote_types(mu_q.dtype, torch.float32)  # bf16 activations under AMP: compute in fp32
    mu_q, sigma_q, mu_p, sigma_p = (t.to(dt) for t in (mu_q, sigma_q, mu_p, sigma_p))
    vq = sigma_q.square()
    vp = sigma_p.square()
    kl = 0.5 * ((vq + (mu_q - mu_p).square()) / (vp + eps) + torch.log(vp + eps) - torch.log(vq + eps) - 1.0)
    return kl.flatten(1).sum(1)


def conv_unit(cin: int, cout: int, norm: Literal["batch", "group", "none"] = "none", kernel: int = 3) -> nn.Sequential:
    """conv (``kernel`` x ``kernel``, same padding) -> [norm] -> ReLU: the TF wrappers' ``conv2D`` unit."""
    return nn.Sequential(nn.Conv2d(cin, cout, kernel, padding=kernel // 2, bias=(norm == "none")),
                         make_norm(norm, cout), nn.ReLU())


def he_init(module: nn.Module, bias_std: float = 1e-3) -> None:
    """He-normal (fan_in, ReLU) weights and N(0, ``bias_std``) biases for every conv / linear layer, the
    initialisation of the Prob. U-Net release (``he_normal`` weights, truncated-normal(0.001) biases)."""
    for m in module.modules():
        if isinstance(m, (nn.Conv2d, nn.Linear, nn.ConvTranspose2d)):
            if m.weight.is_meta:  # `amisbench methods --verbose` counts parameters on the meta device
                continue
            nn.init.kaiming_normal_(m.weight, mode="fan_in", nonlinearity="relu")
            if m.bias is not None:
                nn.init.normal_(m.bias, 0.0, bias_std)


def sample_one_hot(probs: Tensor, generator: torch.Generator | None = None) -> Tensor:
    """Draw one class per pixel from ``probs`` (N,K,H,W) (rows summing to 1); returns one-hot float (N,K,H,W).

    One uniform number per pixel, compared with the cumulative probabilities (inverse CDF), so that a
    seeded ``generator`` gives the same draw on every call.
    """
    u = torch.rand((probs.shape[0], 1, *probs.shape[2:]), generator=generator, device=probs.device,
                   dtype=probs.dtype)
    idx = (u > probs.cumsum(1)).sum(1).clamp_max(probs.shape[1] - 1)
    return one_hot(idx, probs.shape[1], probs.dtype)


def check_chunk(value: int) -> None:
    """``method.sample_chunk``: 0 (no chunking) or a positive count."""
    check_config("sample_chunk", value >= 0, "0 (no chunking) or a positive count", value)


def sample_in_chunks(images: Tensor, n: int, chunk: int, draw: Callable[[Tensor], Tensor]) -> Tensor:
    """``n`` masks per image, (B, n, H, W) bool, drawn at most ``chunk`` samples at a time (0: all at once) in
    image-major order: ``draw(owner)`` gets the image index (m,) of each sample of a chunk and returns their
    masks (m, H, W) bool."""
    b, _, h, w = images.shape
    out = torch.empty((b, n, h, w), dtype=torch.bool, device=images.device)
    flat = out.view(b * n, h, w)
    for s0, s1 in chunks(b * n, chunk):
        flat[s0:s1] = draw(torch.arange(s0, s1, device=images.device) // n)
    return out


def chunks(total: int, size: int):
    """Consecutive (start, stop) ranges of at most ``size`` items (``size`` 0: one range)."""
    size = size or total
    for start in range(0, total, size):
        yield start, min(total, start + size)
