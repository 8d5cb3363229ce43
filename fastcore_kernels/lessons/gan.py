"""Lesson 7's image generation: U-Net restoration of "crappified" digits (pixel loss, then a GAN phase against a
critic) and a WGAN that generates digits from noise. The GAN loops are written out (generator and critic steps
alternate), on fastcore_kernels' fused modules and FusedAdam for the fused kernel set and stock PyTorch otherwise."""

from __future__ import annotations

import time
from dataclasses import dataclass

import torch
import torch.nn.functional as F
from torch import nn

from fastcore_kernels import fuse
from fastcore_kernels.optim import FusedAdam
from fastcore_kernels.lessons import vision as vis


def crappify(x: torch.Tensor, generator: torch.Generator | None = None) -> torch.Tensor:
    """The course's crappifier for digits: halve the resolution, scale back up, add noise, quantize to 16 levels."""
    h, w = x.shape[-2:]
    small = F.interpolate(x, size=(h // 2, w // 2), mode="bilinear", align_corners=False, antialias=True)
    up = F.interpolate(small, size=(h, w), mode="bilinear", align_corners=False)
    noisy = up + 0.08 * torch.randn(up.shape, generator=generator).to(x)
    return (noisy.clamp(0, 1) * 15).round() / 15


def psnr(pred: torch.Tensor, target: torch.Tensor) -> float:
    mse = F.mse_loss(pred.clamp(0, 1), target).item()
    return 10 * torch.log10(torch.tensor(1.0 / max(mse, 1e-12))).item()


def restorer(width: int = 16) -> nn.Module:
    """A U-Net on a ResNet-18 encoder predicting the clean image (sigmoid output)."""
    return nn.Sequential(vis.UNet(vis.resnet18(n_classes=1, width=width, in_channels=1, stem="small"), 1),
                         nn.Sigmoid())


def critic(width: int = 16) -> nn.Module:
    """Real-or-generated: stride-2 conv layers with batch norm (the course's gan_critic uses spectral norm + dropout;
    batch norm keeps it on the fused kernels), one score per image."""
    return nn.Sequential(vis.conv_layer(1, width, 2), vis.conv_layer(width, 2 * width, 2),
                         vis.conv_layer(2 * width, 4 * width, 2), nn.AdaptiveAvgPool2d(1), nn.Flatten(),
                         nn.Linear(4 * width, 1))


def adam(params, kernels: str, lr: float, betas=(0.5, 0.99)):
    """FusedAdam for the fused kernel set, torch's Adam for stock."""
    return FusedAdam(params, lr=lr, betas=betas) if kernels == "fused" else torch.optim.Adam(params, lr=lr, betas=betas)


def _prepare(model: nn.Module, kernels: str, lr: float, betas=(0.5, 0.99)):
    if kernels == "fused":
        model = fuse(model, inplace=True)
    return model, adam(model.parameters(), kernels, lr, betas)


def critic_loss(crit: nn.Module, real: torch.Tensor, fake: torch.Tensor) -> torch.Tensor:
    """fastai's GAN critic loss: the mean of BCE(real -> 1) and BCE(generated -> 0). Real and generated images go
    through the critic as one batch: batch norm over a real-only and a generated-only batch would let the critic
    tell them apart by their batch statistics, which eval mode and the generator's steps never see."""
    logits = crit(torch.cat([real, fake]))
    real_logit, fake_logit = logits[: len(real)], logits[len(real):]
    return (F.binary_cross_entropy_with_logits(real_logit, torch.ones_like(real_logit)) +
            F.binary_cross_entropy_with_logits(fake_logit, torch.zeros_like(fake_logit))) / 2


@torch.no_grad()
def restore(gen: nn.Module, images: torch.Tensor, device, bs: int = 256) -> torch.Tensor:
    """The generator's eval-mode outputs for a stack of images, on the CPU."""
    was_training = gen.training
    gen.eval()
    out = torch.cat([gen(b.to(device)).cpu() for b in images.split(bs)])
    gen.train(was_training)
    return out


@torch.no_grad()
def critic_accuracy(crit: nn.Module, real: torch.Tensor, fake: torch.Tensor, bs: int = 256) -> float:
    """Fraction of images the critic puts on the right side (real > 0 > generated), in eval mode."""
    was_training = crit.training
    crit.eval()
    right = sum(int((crit(r) > 0).sum()) + int((crit(f) <= 0).sum()) for r, f in zip(real.split(bs), fake.split(bs)))
    crit.train(was_training)
    return right / (len(real) + len(fake))


def pretrain_critic(crit: nn.Module, crit_opt, pairs) -> float:
    """One epoch of the course's critic pretraining: real images against the pixel-trained generator's outputs,
    saved once beforehand, so the GAN phase starts against a critic that already tells them apart. `pairs` yields
    (real, generated) batches. Returns seconds taken."""
    t0 = time.perf_counter()
    crit.train()
    for real, fake in pairs:
        loss = critic_loss(crit, real, fake)
        crit_opt.zero_grad()
        loss.backward()
        crit_opt.step()
    return time.perf_counter() - t0


@dataclass
class GanPhaseStats:
    seconds: float = 0.0
    gen_steps: int = 0
    critic_steps: int = 0
    last_critic_loss: float = float("nan")
    gen_mode: bool = False  # fastai's GANTrainer starts with the critic


def gan_phase(gen: nn.Module, crit: nn.Module, gen_opt, crit_opt, batches, weights_gen=(1.0, 50.0),
              critic_thresh: float | None = 0.65, stats: GanPhaseStats | None = None) -> GanPhaseStats:
    """One epoch of the course's GAN fine-tuning over the Learner's (crappified, clean) batches, switched the way
    fastai's AdaptiveGANSwitcher(critic_thresh=0.65) does: the critic trains on real vs restored images until its
    loss drops below critic_thresh (None: one batch), then the generator takes one batch, minimising
    weights_gen[0] * (fool the critic) + weights_gen[1] * L1 pixel loss, and the critic takes over again.
    As fastai's GANLearner (switch_eval=True), the model not being trained runs in eval mode: a batch-norm critic
    then judges the generator's batch with its running statistics instead of that batch's own, and neither model's
    running statistics move while it is not trained. Pass the returned stats back in to carry the switch state
    across epochs."""
    stats = stats or GanPhaseStats()
    t0 = time.perf_counter()
    for bad, clean in batches:
        gen.train(stats.gen_mode)
        crit.train(not stats.gen_mode)
        if stats.gen_mode:
            out = gen(bad)
            fool = crit(out)
            loss_g = weights_gen[0] * F.binary_cross_entropy_with_logits(fool, torch.ones_like(fool)) + \
                weights_gen[1] * F.l1_loss(out, clean)
            gen_opt.zero_grad()
            loss_g.backward()
            gen_opt.step()
            stats.gen_steps += 1
            stats.gen_mode = False
        else:
            with torch.no_grad():
                fake = gen(bad)
            loss_c = critic_loss(crit, clean, fake)
            crit_opt.zero_grad()
            loss_c.backward()
            crit_opt.step()
            stats.critic_steps += 1
            stats.last_critic_loss = loss_c.item()
            stats.gen_mode = critic_thresh is None or stats.last_critic_loss < critic_thresh
    gen.train(), crit.train()
    stats.seconds += time.perf_counter() - t0
    return stats


def wgan_generator(nz: int = 32, width: int = 32) -> nn.Module:
    """Noise (nz) -> 16x16 image: a linear layer to 4x4 features, then two upsample + conv-BN-ReLU stages."""
    return nn.Sequential(nn.Linear(nz, 2 * width * 16), nn.Unflatten(1, (2 * width, 4, 4)),
                         nn.BatchNorm2d(2 * width), nn.ReLU(inplace=True),
                         nn.Upsample(scale_factor=2), vis.conv_layer(2 * width, width),
                         nn.Upsample(scale_factor=2), vis.conv_layer(width, width),
                         nn.Conv2d(width, 1, 3, 1, 1), nn.Sigmoid())


def wgan_critic(width: int = 32) -> nn.Module:
    """No batch norm in a WGAN critic (it breaks the per-sample Lipschitz constraint): conv + LeakyReLU."""
    return nn.Sequential(nn.Conv2d(1, width, 4, 2, 1), nn.LeakyReLU(0.2), nn.Conv2d(width, 2 * width, 4, 2, 1),
                         nn.LeakyReLU(0.2), nn.Flatten(), nn.Linear(2 * width * 16, 1))


def wgan_epoch(gen, crit, gen_opt, crit_opt, real_batches, nz: int, n_critic: int = 5, clip: float = 0.01):
    """Arjovsky et al.'s WGAN: n_critic critic steps (weights clipped to [-clip, clip]) per generator step.
    Returns (seconds, last Wasserstein estimate)."""
    t0, w_est = time.perf_counter(), float("nan")
    for i, real in enumerate(real_batches):
        noise = torch.randn(real.shape[0], nz, device=real.device)
        with torch.no_grad():
            fake = gen(noise)
        loss_c = crit(fake).mean() - crit(real).mean()
        crit_opt.zero_grad()
        loss_c.backward()
        crit_opt.step()
        with torch.no_grad():
            for p in crit.parameters():
                p.clamp_(-clip, clip)
        w_est = -loss_c.item()
        if i % n_critic == n_critic - 1:
            loss_g = -crit(gen(torch.randn(real.shape[0], nz, device=real.device))).mean()
            gen_opt.zero_grad()
            loss_g.backward()
            gen_opt.step()
    return time.perf_counter() - t0, w_est


def digit_judge(images: torch.Tensor, labels: torch.Tensor, epochs: int = 8, seed: int = 0) -> nn.Module:
    """A small CNN trained on real digits (any size), to judge generated ones: a stand-in for the Inception score
    where no pretrained network can ship. Returns it in eval mode."""
    torch.manual_seed(seed)
    model = nn.Sequential(nn.Conv2d(1, 32, 3, 1, 1), nn.ReLU(), nn.Conv2d(32, 64, 3, 2, 1), nn.ReLU(),
                          nn.Conv2d(64, 64, 3, 2, 1), nn.ReLU(), nn.AdaptiveAvgPool2d(2), nn.Flatten(),
                          nn.Linear(256, 10))
    opt = torch.optim.Adam(model.parameters(), lr=3e-3)
    g = torch.Generator().manual_seed(seed)
    for _ in range(epochs):
        for idx in torch.randperm(len(labels), generator=g).split(128):
            loss = F.cross_entropy(model(images[idx]), labels[idx])
            opt.zero_grad()
            loss.backward()
            opt.step()
    return model.eval()


@torch.no_grad()
def digit_scores(judge: nn.Module, images: torch.Tensor, confident: float = 0.9) -> dict:
    """How digit-like a set of images looks to `judge`: the fraction it classifies with probability >= `confident`,
    and how many of the ten classes those confident ones cover (a generator stuck on one digit covers one)."""
    probs = F.softmax(judge(images), 1)
    top, cls = probs.max(1)
    sure = top >= confident
    return {"confident_fraction": round(float(sure.float().mean()), 4),
            "classes_covered": int(cls[sure].unique().numel())}
