"""CIMD: Ambiguous Medical Image Segmentation using Diffusion Models (Rahman et al., CVPR 2023), as released.

Original code: github.com/aimansnigdha/Ambiguous-Medical-Image-Segmentation-using-Diffusion-Models (built on
OpenAI's guided diffusion and Wolleb et al.'s diffusion segmentation; files cited below are in that repo).

Model (``guided_diffusion/gaussian_diffusion.py``, ``training_losses_segmentation``):

- Gaussian diffusion of the reader mask in {0, 1} (``res = where(mask > 0, 1, 0)``; no +-1 code):
  q(x_t | x_0) = N(sqrt(abar_t) x_0, (1 - abar_t) I), T = 1000, linear betas 1e-4 .. 0.02, step index
  t in 0..T-1 (0 = one step) fed to the network unscaled (``rescale_timesteps False``).
- Denoiser: guided diffusion's ``UNetModel`` (:class:`~amisbench.nn.openai_unet.OpenAIUNet`, 128 channels,
  multipliers 1,1,2,3,4, 2 residual blocks per level, one-head attention at downsampling 8, no scale-shift
  norm) on [image x ``image_repeat``, x_t] (``lidcloader.py`` concatenates the greyscale slice 4 times;
  ``script_util.create_model`` fixes ``in_channels=5``). Two output channels: eps and the variance
  interpolation v (``learn_sigma True`` -> ``LEARNED_RANGE``: log var = (v+1)/2 log beta_t + (1-v)/2
  log beta~_t).
- Loss per image: ``mse + vb + kl / 1000`` (loss type MSE with learnt sigmas: the hybrid loss of improved
  diffusion without rescaling). mse = mean over pixels of (eps - eps_theta)^2; vb = the variational-bound
  term on a stop-gradient mean (KL(q(x_{t-1}|x_t,x_0) || p(x_{t-1}|x_t)) in bits per pixel, or the
  discretised-Gaussian decoder NLL at t = 0); kl = KL(posterior || prior) of two Prob. U-Net axis-aligned
  Gaussian encoders (latent 6, widths 32/64/128/192, 3 convs per block, ``script_util``), where the
  *posterior* sees [image, reader mask] and the *prior* sees [image, eps_theta] -- the denoiser's output,
  not the image alone -- so the term only shapes the denoiser.
- Only the denoiser is optimised (``train_util.TrainLoop`` builds AdamW over the model's parameters; the
  prior and posterior stay at their random initialisation): ``train_encoders: false``.
- Sampling (``p_sample_loop_known``): x ~ N(0, I) at t = T-1, then ancestral steps with the learnt variance
  and the x_0 estimate clipped to [-1, 1], through t = 0 (T = 1000 network calls, ``sample_steps: 0``).
  z is never drawn and the encoders are not used. The mask is the final x thresholded at 1/2 (the midpoint of
  the {0, 1} code; the release saves the real-valued sample). ``sample_steps: N`` respaces sampling to N
  steps the improved-diffusion way (``respace.space_timesteps``: N evenly spaced, rounded step indices,
  betas recomputed from abar at the kept steps, the network still sees the original indices): the ATFM
  paper's Table 3 setting is N = 100, a labelled option (variant ``respaced100``), not the release.
  ``sampler: ddim`` is the release's ``--use_ddim True`` switch (``ddim_sample_loop_known``, eta 0: each step
  goes to sqrt(abar_prev) x_0 + sqrt(1 - abar_prev) eps, with eps re-derived from the clipped x_0), used by
  the CPU-sized ``quick`` profile, where 5-10 respaced ancestral steps leave the masks noisy.

NFE: ``nfe(n) = n * sampling steps`` (nothing runs once per image).

Deviations from the release: one optimiser step per batch (``run_loop`` calls ``run_step`` twice on each
batch, so the release takes two steps per batch with fresh t and noise); the prior and posterior run in the
network's dtype (the release builds them in float64); reader masks are exact {0, 1} (the release reads JPEG
masks / 255 for the posterior input); for C-channel images the prior and posterior see all C channels (the
release's encoders take the first channel of its greyscale stack).
"""

from __future__ import annotations

import math
from dataclasses import dataclass, field

import torch
from torch import Tensor, nn

from amisbench.api import DataSpec, Method, at_least, check_config
from amisbench.nn.openai_unet import OpenAIUNet, OpenAIUNetConfig
from amisbench.registry import register_method

from ._blocks import check_chunk, kl_diag_gaussians, pick_reader, sample_in_chunks
from ._diffusion import linear_alpha_bar
from .prob_unet import AxisAlignedConvGaussian


# ---------------------------------------------------------------------------------------------------
# Gaussian diffusion with a learnt variance (the release's GaussianDiffusion / SpacedDiffusion tables)
# ---------------------------------------------------------------------------------------------------

def space_timesteps(steps: int, count: int) -> list[int]:
    """Kept step indices (ascending) of improved diffusion's ``space_timesteps(steps, str(count))``:
    ``count`` indices ``round(i * (steps - 1) / (count - 1))``; ``count`` 0 or >= ``steps``: all of them."""
    if not count or count >= steps:
        return list(range(steps))
    stride = (steps - 1) / (count - 1) if count > 1 else 1
    return sorted({round(i * stride) for i in range(count)})


class LearntVarianceDiffusion:
    """Tables of a (possibly respaced) Gaussian diffusion over the kept steps ``use`` of a T-step process.

    With abar_k the cumulative products at the kept steps and abar_{-1} = 1: beta_k = 1 - abar_k / abar_{k-1},
    posterior q(x_{k-1} | x_k, x_0) = N(c1_k x_0 + c2_k x_k, beta~_k) with c1 = beta sqrt(abar_prev) /
    (1 - abar), c2 = (1 - abar_prev) sqrt(1 - beta) / (1 - abar), beta~ = beta (1 - abar_prev) / (1 - abar),
    and log beta~ clipped at k = 0 to log beta~_1 (the release's ``posterior_log_variance_clipped``).
    Index k runs over 0..len(use)-1; ``use[k]`` is the step index the network sees.
    """

    def __init__(self, abar_full: Tensor, use: list[int]):
        ab = abar_full[use].double()
        prev = torch.cat([ab.new_ones(1), ab[:-1]])
        self.use = list(use)
        self.abar = ab
        self.betas = 1.0 - ab / prev
        self.post_var = self.betas * (1.0 - prev) / (1.0 - ab)
        clip_from = self.post_var[1] if len(use) > 1 else self.betas[0]
        self.post_logvar = torch.log(torch.cat([clip_from.reshape(1), self.post_var[1:]]))
        self.coef1 = self.betas * prev.sqrt() / (1.0 - ab)
        self.coef2 = (1.0 - prev) * (1.0 - self.betas).sqrt() / (1.0 - ab)

    @staticmethod
    def _at(table: Tensor, k: Tensor, like: Tensor) -> Tensor:
        return table.to(like.device)[k].to(like.dtype).view(-1, *([1] * (like.ndim - 1)))

    def q_sample(self, x0: Tensor, k: Tensor, noise: Tensor) -> Tensor:
        a = self._at(self.abar, k, x0)
        return a.sqrt() * x0 + (1 - a).sqrt() * noise

    def q_posterior(self, x0: Tensor, xt: Tensor, k: Tensor) -> tuple[Tensor, Tensor]:
        """Mean and clipped log variance of q(x_{k-1} | x_k, x_0)."""
        mean = self._at(self.coef1, k, xt) * x0 + self._at(self.coef2, k, xt) * xt
        return mean, self._at(self.post_logvar, k, xt).expand_as(xt)

    def p_mean_logvar(self, eps: Tensor, v: Tensor, xt: Tensor, k: Tensor, clip: bool) -> tuple[Tensor, Tensor, Tensor]:
        """Model mean, log variance (``LEARNED_RANGE``) and x_0 estimate of p(x_{k-1} | x_k)."""
        frac = (v + 1) / 2
        logvar = frac * self._at(self.betas.log(), k, xt) + (1 - frac) * self._at(self.post_logvar, k, xt)
        a = self._at(self.abar, k, xt)
        x0 = (xt - (1 - a).sqrt() * eps) / a.sqrt()
        if clip:
            x0 = x0.clamp(-1.0, 1.0)
        mean, _ = self.q_posterior(x0, xt, k)
        return mean, logvar, x0


    def ddim_step(self, x0: Tensor, xt: Tensor, k: Tensor, eta: float) -> tuple[Tensor, Tensor]:
        """Mean and standard deviation of the DDIM step from kept step k to k - 1 (guided-diffusion's
        ``ddim_sample``): eps re-derived from the (clipped) x_0 estimate, sigma = eta sqrt((1 - abar_prev) /
        (1 - abar)) sqrt(1 - abar / abar_prev), mean = sqrt(abar_prev) x_0 + sqrt(1 - abar_prev - sigma^2) eps."""
        a = self._at(self.abar, k, xt)
        prev = self._at(torch.cat([self.abar.new_ones(1), self.abar[:-1]]), k, xt)
        eps = (xt / a.sqrt() - x0) / (1.0 / a - 1.0).sqrt()
        sigma = eta * ((1 - prev) / (1 - a)).sqrt() * (1 - a / prev).sqrt()
        mean = prev.sqrt() * x0 + (1 - prev - sigma.square()).clamp_min(0).sqrt() * eps
        return mean, sigma.expand_as(xt)


def normal_kl(mean1: Tensor, logvar1: Tensor, mean2: Tensor, logvar2: Tensor) -> Tensor:
    """KL(N(mean1, e^logvar1) || N(mean2, e^logvar2)) elementwise, in nats."""
    return 0.5 * (-1.0 + logvar2 - logvar1 + torch.exp(logvar1 - logvar2) + (mean1 - mean2).square() * torch.exp(-logvar2))


def _std_normal_cdf(x: Tensor) -> Tensor:
    # the tanh approximation of the release (losses.approx_standard_normal_cdf)
    return 0.5 * (1.0 + torch.tanh(math.sqrt(2.0 / math.pi) * (x + 0.044715 * x.pow(3))))


def discretized_gaussian_log_likelihood(x: Tensor, mean: Tensor, log_scale: Tensor) -> Tensor:
    """Log-probability (nats) of x under N(mean, e^{2 log_scale}) integrated over bins of width 2/255 (the
    8-bit grid on [-1, 1]); the outer bins (x < -0.999, x > 0.999) extend to -inf / +inf."""
    inv = torch.exp(-log_scale)
    cdf_plus = _std_normal_cdf(inv * (x - mean + 1.0 / 255.0))
    cdf_min = _std_normal_cdf(inv * (x - mean - 1.0 / 255.0))
    log_cdf_plus = cdf_plus.clamp(min=1e-12).log()
    log_one_minus_cdf_min = (1.0 - cdf_min).clamp(min=1e-12).log()
    log_delta = (cdf_plus - cdf_min).clamp(min=1e-12).log()
    return torch.where(x < -0.999, log_cdf_plus, torch.where(x > 0.999, log_one_minus_cdf_min, log_delta))


def vb_term_bits(diff: LearntVarianceDiffusion, x0: Tensor, xt: Tensor, k: Tensor, eps: Tensor, v: Tensor) -> Tensor:
    """The variational-bound term per image (N,), bits per pixel: KL(q(x_{k-1}|x_k,x_0) || p(x_{k-1}|x_k))
    averaged over pixels for k > 0, the discretised-Gaussian NLL of x_0 for k = 0 (no clipping of x_0)."""
    true_mean, true_logvar = diff.q_posterior(x0, xt, k)
    mean, logvar, _ = diff.p_mean_logvar(eps, v, xt, k, clip=False)
    kl = normal_kl(true_mean, true_logvar, mean, logvar).flatten(1).mean(1) / math.log(2.0)
    nll = -discretized_gaussian_log_likelihood(x0, mean, 0.5 * logvar).flatten(1).mean(1) / math.log(2.0)
    return torch.where(k == 0, nll, kl)


# ---------------------------------------------------------------------------------------------------
# CIMD
# ---------------------------------------------------------------------------------------------------

@dataclass
class CIMDConfig:
    # README MODEL_FLAGS at 128 px: --num_channels 128 --num_res_blocks 2 --num_heads 1 --attention_resolutions 16
    # (downsampling rate 128 // 16 = 8); script_util.py create_model: channel_mult (1, 1, 2, 3, 4) at 128 px,
    # num_head_channels -1, dropout 0; GroupNorm32 (32 groups)
    unet: OpenAIUNetConfig = field(default_factory=lambda: OpenAIUNetConfig(
        base_channels=128, channel_mult=(1, 1, 2, 3, 4), num_res_blocks=2, attention_resolutions=(8,),
        num_head_channels=-1, num_heads=1, dropout=0.0, groups=32))
    image_repeat: int = 4  # lidcloader.py: the slice concatenated 4 times -> in_channels 5 (script_util.py)
    encoder_widths: tuple[int, ...] = (32, 64, 128, 192)  # script_util.py: num_filters
    encoder_convs: int = 3  # script_util.py: no_convs_per_block
    latent_dim: int = 6  # script_util.py: latent_dim
    kl_weight: float = 1.0e-3  # gaussian_diffusion.py: terms["kl"] = kl_div / 1000
    learn_sigma: bool = True  # README: --learn_sigma True (LEARNED_RANGE variance + the vb term)
    train_encoders: bool = False  # train_util.py: AdamW over the denoiser's parameters only
    steps: int = 1000  # README: --diffusion_steps 1000
    beta_start: float = 1e-4  # gaussian_diffusion.get_named_beta_schedule("linear")
    beta_end: float = 0.02
    sample_steps: int = 0  # 0: all T steps (release); N: respaced to N steps (Table 3 of the ATFM paper: 100)
    clip_denoised: bool = True  # segmentation_sample.py: clip_denoised=True
    # segmentation_sample.py: use_ddim=False (ancestral p_sample_loop_known); its --use_ddim True switch runs
    # gaussian_diffusion.ddim_sample_loop_known with eta = 0.0 instead (``sampler: ddim``, ``ddim_eta``)
    sampler: str = "ancestral"
    ddim_eta: float = 0.0
    threshold: float = 0.5  # on the final {0,1}-coded sample
    sample_chunk: int = 64  # most chains per denoiser batch (0: all at once); memory only

    def __post_init__(self) -> None:
        check_chunk(self.sample_chunk)
        at_least(self, steps=2, sample_steps=0, latent_dim=1, image_repeat=1)
        check_config("sampler", self.sampler in ("ancestral", "ddim"), "'ancestral' or 'ddim'", self.sampler)
        check_config("ddim_eta", self.ddim_eta >= 0, "a non-negative number", self.ddim_eta)


@register_method("cimd")
class CIMD(Method):
    """CIMD: guided-diffusion denoiser on {0,1} masks, hybrid loss + KL/1000 prior term (Rahman et al. 2023).

    Only the denoiser trains unless ``train_encoders`` (the release's optimiser holds the denoiser alone).
    """

    Config = CIMDConfig
    stages = ("main",)

    def __init__(self, cfg: CIMDConfig, spec: DataSpec):
        super().__init__(cfg, spec)
        enc = tuple(cfg.encoder_widths)
        c = spec.channels
        self.net = OpenAIUNet(cfg.image_repeat * c + 1, 2 if cfg.learn_sigma else 1, cfg.unet)
        self.prior = AxisAlignedConvGaussian(c + 1, enc, cfg.encoder_convs, cfg.latent_dim)
        self.posterior = AxisAlignedConvGaussian(c + 1, enc, cfg.encoder_convs, cfg.latent_dim)
        for enc_net in (self.prior, self.posterior):
            # distribution.py: He-normal weights, N(0, 0.001) biases, head bias N(0, 1) -- never trained in
            # the release, so the initialisation is part of the method
            for m in enc_net.modules():
                if isinstance(m, nn.Conv2d) and not m.weight.is_meta:
                    nn.init.kaiming_normal_(m.weight, mode="fan_in", nonlinearity="relu")
                    nn.init.normal_(m.bias, 0.0, 1.0 if m is enc_net.head else 1e-3)
            enc_net.requires_grad_(cfg.train_encoders)
        self.register_buffer("abar_full", linear_alpha_bar(cfg.steps, cfg.beta_start, cfg.beta_end)[1:],
                             persistent=False)

    def trainable(self, stage):
        return self.parameters() if self.cfg.train_encoders else self.net.parameters()

    def compile_targets(self) -> list[str]:
        return ["net"]

    def diffusion(self, sample_steps: int = 0) -> LearntVarianceDiffusion:
        return LearntVarianceDiffusion(self.abar_full.cpu(), space_timesteps(self.cfg.steps, sample_steps))

    def denoise(self, xt: Tensor, images: Tensor, t: Tensor) -> tuple[Tensor, Tensor]:
        """eps estimate and variance value v (N,1,H,W) each (v = 0 when the variance is not learnt)."""
        inp = torch.cat([images.repeat(1, self.cfg.image_repeat, 1, 1), xt], dim=1)
        out = self.net(inp, t.to(xt.dtype))
        if self.cfg.learn_sigma:
            return out[:, :1], out[:, 1:]
        return out, torch.ones_like(out)  # v = 1: log variance log beta_t (FIXED_LARGE but at t = 0)

    def loss(self, stage, images, masks):
        y = pick_reader(masks)[:, None]
        x0 = (y > 0).to(images.dtype)
        b = y.shape[0]
        diff = self.diffusion()
        k = torch.randint(0, self.cfg.steps, (b,), device=images.device)
        noise = torch.randn_like(x0)
        xt = diff.q_sample(x0, k, noise)
        eps, v = self.denoise(xt, images, k)
        mse = (noise - eps).square().flatten(1).mean(1)
        loss = mse
        logs = {"mse": float(mse.mean().detach())}
        if self.cfg.learn_sigma:
            vb = vb_term_bits(diff, x0, xt, k, eps.detach(), v)
            loss = loss + vb
            logs["vb"] = float(vb.mean().detach())
        if self.cfg.kl_weight:
            mu_p, sigma_p = self.prior(torch.cat([images, eps], dim=1))
            mu_q, sigma_q = self.posterior(torch.cat([images, y], dim=1))
            kl = kl_diag_gaussians(mu_q, sigma_q, mu_p, sigma_p)
            loss = loss + self.cfg.kl_weight * kl
            logs["kl"] = float(kl.mean().detach())
        return loss.mean(), logs

    @torch.no_grad()
    def sample(self, images, n, *, generator=None, context=None):
        b, _, h, w = images.shape
        dev, dt = images.device, images.dtype
        diff = self.diffusion(self.cfg.sample_steps)

        def draw(owner: Tensor) -> Tensor:
            m, img = len(owner), images[owner]
            x = torch.randn((m, 1, h, w), generator=generator, device=dev, dtype=dt)
            for k in range(len(diff.use) - 1, -1, -1):
                kk = torch.full((m,), k, device=dev, dtype=torch.long)
                eps, v = self.denoise(x, img, torch.full((m,), diff.use[k], device=dev))
                mean, logvar, x0 = diff.p_mean_logvar(eps, v, x, kk, self.cfg.clip_denoised)
                if self.cfg.sampler == "ddim":
                    mean, std = diff.ddim_step(x0, x, kk, self.cfg.ddim_eta)
                else:
                    std = torch.exp(0.5 * logvar)
                if k == 0:
                    x = mean
                else:
                    noise = torch.randn((m, 1, h, w), generator=generator, device=dev, dtype=dt)
                    x = mean + std * noise
            return x[:, 0] > self.cfg.threshold

        return sample_in_chunks(images, n, self.cfg.sample_chunk, draw)

    def nfe(self, n: int) -> int:
        return n * len(space_timesteps(self.cfg.steps, self.cfg.sample_steps))
