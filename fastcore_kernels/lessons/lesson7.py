"""Lesson 7 parts. human-numbers: the four language models of fastcore_kernels.lessons.human_numbers, each trained
with the fused kernels and with stock PyTorch on the same data and seed. mnist-resnet: a ResNet for MNIST digits
from scratch (fastcore_kernels.lessons.vision), its conv-BN-ReLU layers fused. restoration: a U-Net restoring
crappified digits (pixel loss, then a GAN phase); wgan: digits generated from noise (fastcore_kernels.lessons.gan)."""

from __future__ import annotations

from pathlib import Path

import torch
import torch.nn.functional as F

from fastcore_kernels.learner import DataLoaders, accuracy
from fastcore_kernels.learner.metrics import AvgMetric
from fastcore_kernels.lessons import RunResult, train_kernel_sets
from fastcore_kernels.lessons import foundations as fd
from fastcore_kernels.lessons import gan
from fastcore_kernels.lessons import human_numbers as hn
from fastcore_kernels.lessons import vision as vis

# model: (bptt, epochs, lr) -- the course's settings (bptt 20 for the hand-written loops, 70 for GRU/LSTM)
SETTINGS = {"scratch": (20, 10, 3e-3), "stateful": (20, 10, 3e-3), "gru": (70, 20, 1e-2), "lstm": (70, 20, 1e-2)}


def make_data(data_dir, bs: int, bptt: int, device, quick: bool):
    train, valid = hn.read_lines(data_dir, "train"), hn.read_lines(data_dir, "valid")
    if quick:
        train, valid = train[:1500], valid[:1000]
    train_tok, valid_tok = hn.tokens(train), hn.tokens(valid)
    vocab = hn.Vocab(train_tok)
    dls = DataLoaders(hn.StreamLoader(vocab.encode(train_tok), bs, bptt, device),
                      hn.StreamLoader(vocab.encode(valid_tok), bs, bptt, device), device=device)
    return dls, vocab


def run_human_numbers(*, data=None, epochs=None, kernel_sets=("fused", "stock"), device="cpu", quick=False,
                      out: Path = Path("lesson_out")) -> list[RunResult]:
    results = []
    for name, (bptt, n_epoch, lr) in SETTINGS.items():
        n_epoch = 1 if quick else (epochs or n_epoch)
        dls, vocab = make_data(data, 64, bptt, device, quick)
        results += train_kernel_sets(
            7, "human-numbers", name, lambda: hn.MODELS[name](len(vocab)), dls, hn.flat_cross_entropy,
            kernel_sets=kernel_sets, out=out, metrics=[AvgMetric(hn.flat_accuracy, "accuracy")], cbs=lambda: [hn.ResetState()],
            fit=lambda learn: learn.fit_one_cycle(n_epoch, lr), learner_kwargs={"lr": lr})
    return results


def run_mnist_resnet(*, data=None, epochs=None, kernel_sets=("fused", "stock"), device="cpu", quick=False,
                     out: Path = Path("lesson_out")) -> list[RunResult]:
    """A ResNet for MNIST trained from scratch (random-shift augmentation, 1cycle), fused vs stock."""
    (xt, yt), (xv, yv) = fd.load_mnist_images(data, quick)
    print(f"lesson 7 mnist-resnet: {len(yt)} training digits, {len(yv)} held out", flush=True)
    dls = DataLoaders.from_tensors((xt, yt), (xv, yv), batch_size=64, device=device, seed=0)
    n_epoch = 1 if quick else (epochs or 8)
    return train_kernel_sets(7, "mnist-resnet", "resnet", vis.mnist_resnet, dls, F.cross_entropy,
                             kernel_sets=kernel_sets, out=out, metrics=[accuracy],
                             fit=lambda learn: learn.fit_one_cycle(n_epoch, 1e-2))


def _save_grid(rows: list[torch.Tensor], titles: list[str], fname: Path) -> None:
    from fastcore_kernels.learner.callbacks import _pyplot, _save_fig

    plt = _pyplot()
    n = rows[0].shape[0]
    fig, axs = plt.subplots(len(rows), n, figsize=(1.4 * n, 1.5 * len(rows)), squeeze=False)
    for r, (imgs, title) in enumerate(zip(rows, titles)):
        for c in range(n):
            axs[r, c].imshow(imgs[c, 0].detach().float().cpu().numpy(), cmap="gray", vmin=0, vmax=1)
            axs[r, c].axis("off")
        axs[r, 0].set_title(title, fontsize=8, loc="left")
    _save_fig(fig, fname)


def run_restoration(*, data=None, epochs=None, kernel_sets=("fused", "stock"), device="cpu", quick=False,
                    out: Path = Path("lesson_out")) -> list[RunResult]:
    """U-Net restoration of crappified digits: a pixel (L1) loss with the Learner, then a GAN phase against a critic."""
    (xt, _), (xv, _) = fd.load_mnist_images(data, quick)
    g = torch.Generator().manual_seed(0)
    bad_t, bad_v = gan.crappify(xt, g), gan.crappify(xv, g)
    base = gan.psnr(bad_v, xv)
    print(f"lesson 7 restoration: crappified held-out digits have PSNR {base:.2f} dB", flush=True)
    dls = DataLoaders.from_tensors((bad_t, xt), (bad_v, xv), batch_size=64, device=device, seed=0)
    n_epoch = 1 if quick else (epochs or 4)
    crit_epochs, gan_epochs = (1, 1) if quick else (2, 3)
    psnr_metric = AvgMetric(lambda p, t: 10 * torch.log10(1 / F.mse_loss(p.clamp(0, 1), t)), "psnr")
    info = {}

    def fit(learn):
        learn.fit_one_cycle(n_epoch, 1e-2)
        gen, dev, kernels = learn.model, learn.dls.device, learn.kernels
        pixel_psnr = learn.recorder.value("psnr")
        # The course's recipe: save the pixel-trained generator's outputs, pretrain a critic on real vs those, then
        # the GAN phase with both at lr 1e-4, betas (0, 0.99), switched adaptively (critic_thresh 0.65).
        torch.manual_seed(1)
        crit, crit_opt = gan._prepare(gan.critic().to(dev), kernels, 1e-3, betas=(0.0, 0.99))
        fake_t = gan.restore(gen, bad_t, dev)
        order = torch.randperm(len(xt), generator=torch.Generator().manual_seed(2))
        pairs = [(xt[i].to(dev), fake_t[i].to(dev)) for i in order.split(64)]
        crit_sec = sum(gan.pretrain_critic(crit, crit_opt, pairs) for _ in range(crit_epochs))
        crit_acc = gan.critic_accuracy(crit, xv.to(dev), gan.restore(gen, bad_v, dev).to(dev))
        for group in crit_opt.param_groups:
            group["lr"] = 1e-4
        gen_opt = gan.adam(gen.parameters(), kernels, 1e-4, betas=(0.0, 0.99))
        gen.train()
        stats = None
        for _ in range(gan_epochs):
            stats = gan.gan_phase(gen, crit, gen_opt, crit_opt, learn.dls.train, stats=stats)
        restored = gan.restore(gen, bad_v, dev)
        info[kernels] = {
            "input_psnr": round(base, 3), "pixel_phase_psnr": round(float(pixel_psnr), 3),
            "critic_pretrain_sec_per_epoch": round(crit_sec / crit_epochs, 3),
            "critic_accuracy_before_gan": round(crit_acc, 4), "gan_epochs": gan_epochs,
            "gan_generator_steps": stats.gen_steps, "gan_critic_steps": stats.critic_steps,
            "gan_sec_per_epoch": round(stats.seconds / gan_epochs, 3),
            "gan_phase_psnr": round(gan.psnr(restored, xv), 3),
            "critic_accuracy_after_gan": round(gan.critic_accuracy(crit, xv.to(dev), restored.to(dev)), 4)}
        print(f"  {info[kernels]}", flush=True)
        if kernels == kernel_sets[0]:
            _save_grid([bad_v[:8], restored[:8], xv[:8]], ["crappified", "restored (pixel + GAN)", "original"],
                       out / "restoration.png")

    return train_kernel_sets(7, "restoration", "resnet18 u-net restorer", gan.restorer, dls, F.l1_loss,
                             kernel_sets=kernel_sets, out=out, fit=fit, metrics=[psnr_metric],
                             extra=lambda learn: info[learn.kernels])


def run_wgan(*, data=None, epochs=None, kernel_sets=("fused", "stock"), device="cpu", quick=False,
             out: Path = Path("lesson_out")) -> list[RunResult]:
    """A WGAN generating 16x16 digits from noise, trained on the MNIST digits (weight clipping, 5 critic steps per
    generator step); saves a grid of samples."""
    (xt, yt), (xv, yv) = fd.load_mnist(data)
    small = lambda x: F.interpolate(x.view(-1, 1, 28, 28), size=(16, 16), mode="bilinear", antialias=True,  # noqa: E731
                                    align_corners=False)
    real = small(xt)[: 1000 if quick else len(xt)].to(device)
    n_epoch = 1 if quick else (epochs or 40)
    # Sample quality, judged by a digit classifier trained on the real training digits (held-out digits score
    # what a perfect generator would).
    judge = gan.digit_judge(small(xt), yt, epochs=1 if quick else 8)
    real_scores = gan.digit_scores(judge, small(xv))
    print(f"lesson 7 wgan: the judge is sure of {real_scores['confident_fraction']:.3f} of held-out real digits",
          flush=True)
    nz, results = 32, []
    out.mkdir(parents=True, exist_ok=True)
    for kernels in kernel_sets:
        torch.manual_seed(0)
        gen, gen_opt = gan._prepare(gan.wgan_generator(nz).to(device), kernels, 2e-4)
        crit, crit_opt = gan._prepare(gan.wgan_critic().to(device), kernels, 2e-4)
        times, w = [], float("nan")
        g = torch.Generator().manual_seed(0)
        print(f"lesson 7 wgan ({kernels})", flush=True)
        for _ in range(n_epoch):
            perm = torch.randperm(len(real), generator=g).to(device)
            batches = (real[perm[i: i + 64]] for i in range(0, len(real), 64))
            sec, w = gan.wgan_epoch(gen, crit, gen_opt, crit_opt, batches, nz)
            times.append(sec)
        gen.eval()
        with torch.no_grad():
            samples = gen(torch.randn(1000, nz, generator=torch.Generator().manual_seed(1)).to(device)).cpu()
        _save_grid([samples[:8], samples[8:16]], [f"WGAN samples ({kernels})", ""], out / f"wgan_{kernels}.png")
        scores = gan.digit_scores(judge, samples)
        sec = sorted(times[1:] or times)[len(times[1:] or times) // 2]
        results.append(RunResult(7, "wgan", "wgan 16x16", kernels, "confident_fraction", scores["confident_fraction"],
                                 n_epoch, round(sec, 4),
                                 {"classes_covered": scores["classes_covered"], "wasserstein_estimate": round(w, 5),
                                  "real_confident_fraction": real_scores["confident_fraction"],
                                  "sample_mean": round(float(samples.mean()), 4),
                                  "real_mean": round(float(real.mean()), 4)}))
        print(f"  judge sure of {scores['confident_fraction']:.3f} of 1000 samples ({scores['classes_covered']} "
              f"classes), Wasserstein estimate {w:.4f}, {sec:.3f} s/epoch", flush=True)
    return results
