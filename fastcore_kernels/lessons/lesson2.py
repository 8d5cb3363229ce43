"""Lesson 2 parts. sgd: linear regression y = X a by hand-written gradient descent, the fit plotted. webapp: a digit
classifier trained (fused vs stock), exported with Learner.export, served by the Flask app of
fastcore_kernels.lessons.webapp on localhost and queried over real HTTP with held-out digits as PNG uploads."""

from __future__ import annotations

import io
import statistics
import threading
import time
from pathlib import Path

import torch
import torch.nn.functional as F

from fastcore_kernels.learner import DataLoaders, accuracy, load_learner
from fastcore_kernels.learner.callbacks import _pyplot, _save_fig
from fastcore_kernels.lessons import RunResult, train_kernel_sets
from fastcore_kernels.lessons import foundations as fd
from fastcore_kernels.lessons import vision as vis


def run_sgd(*, data=None, epochs=None, kernel_sets=("fused", "stock"), device="cpu", quick=False,
            out: Path = Path("lesson_out")) -> list[RunResult]:
    """The course's lesson 2 SGD: 100 points of y = 3 x + 2 + noise, a = (-1, 1) to start, MSE, lr 0.1."""
    out.mkdir(parents=True, exist_ok=True)
    g = torch.Generator().manual_seed(42)
    n = 100
    x = torch.ones(n, 2)
    x[:, 0] = torch.rand(n, generator=g) * 2 - 1
    a_true = torch.tensor([3.0, 2.0])
    y = x @ a_true + torch.randn(n, generator=g) * 0.5
    a = torch.tensor([-1.0, 1.0], requires_grad=True)
    steps = 10 if quick else (epochs or 100)
    losses = []
    t0 = time.perf_counter()
    for _ in range(steps):
        loss = ((x @ a - y) ** 2).mean()
        loss.backward()
        with torch.no_grad():
            a.sub_(0.1 * a.grad)
            a.grad.zero_()
        losses.append(loss.item())
    sec = time.perf_counter() - t0
    plt = _pyplot()
    fig, (ax1, ax2) = plt.subplots(1, 2, figsize=(9, 4))
    ax1.scatter(x[:, 0], y, s=8, label="data")
    xs = torch.linspace(-1, 1, 2)
    a = a.detach()
    ax1.plot(xs, a[0].item() * xs + a[1].item(), color="C1", label=f"fit a = ({a[0]:.2f}, {a[1]:.2f})")
    ax1.legend()
    ax2.plot(losses)
    ax2.set_xlabel("step")
    ax2.set_ylabel("MSE")
    _save_fig(fig, out / "sgd_fit.png")
    print(f"lesson 2 sgd: a = ({a[0]:.3f}, {a[1]:.3f}) after {steps} steps (true (3, 2)), MSE {losses[-1]:.4f}",
          flush=True)
    return [RunResult(2, "sgd", "linear regression hand-SGD", "stock", "mse", round(losses[-1], 4), steps,
                      sec / steps, {"a": [round(float(v), 4) for v in a.detach()], "a_true": [3.0, 2.0]})]


def _png(img: torch.Tensor) -> bytes:
    from PIL import Image

    buf = io.BytesIO()
    Image.fromarray((img[0] * 255).round().to(torch.uint8).numpy()).save(buf, format="PNG")
    return buf.getvalue()


def serve_and_query(export: Path, images: torch.Tensor, labels: torch.Tensor) -> dict:
    """Starts the web app on a free localhost port, uploads each image, and checks a bad upload is refused."""
    import requests
    from werkzeug.serving import make_server

    from fastcore_kernels.lessons.webapp import create_app

    classes = [str(i) for i in range(10)]
    server = make_server("127.0.0.1", 0, create_app(load_learner(export), classes))
    thread = threading.Thread(target=server.serve_forever, daemon=True)
    thread.start()
    url = f"http://127.0.0.1:{server.server_port}"
    try:
        correct, latencies = 0, []
        with requests.Session() as http:
            for img, label in zip(images, labels):
                t0 = time.perf_counter()
                r = http.post(f"{url}/predict", files={"file": ("digit.png", _png(img), "image/png")}, timeout=30)
                latencies.append(time.perf_counter() - t0)
                r.raise_for_status()
                correct += r.json()["class"] == classes[int(label)]
            bad = http.post(f"{url}/predict", files={"file": ("notes.txt", b"not an image", "text/plain")},
                            timeout=30)
    finally:
        server.shutdown()
        thread.join()
    return {"served_accuracy": round(correct / len(labels), 4), "requests": len(labels),
            "median_latency_ms": round(1000 * statistics.median(latencies), 2), "bad_upload_status": bad.status_code}


def run_webapp(*, data=None, epochs=None, kernel_sets=("fused", "stock"), device="cpu", quick=False,
               out: Path = Path("lesson_out")) -> list[RunResult]:
    (xt, yt), (xv, yv) = fd.load_mnist_images(data, quick)
    dls = DataLoaders.from_tensors((xt, yt), (xv, yv), batch_size=64, device=device, seed=0)
    n_epoch = 1 if quick else (epochs or 4)
    served = {}

    def fit(learn):
        learn.fit_one_cycle(n_epoch, 1e-2)
        learn.path = out
        export = learn.export(f"export_{learn.kernels}.pkl")
        served[learn.kernels] = serve_and_query(export, xv[: 20 if quick else 200], yv[: 20 if quick else 200])
        print(f"  served over HTTP: {served[learn.kernels]}", flush=True)

    return train_kernel_sets(2, "webapp", "digit classifier", lambda: vis.simple_cnn(10, augment=vis.Augment(pad=2)),
                             dls, F.cross_entropy, kernel_sets=kernel_sets, out=out, fit=fit, metrics=[accuracy],
                             extra=lambda learn: served[learn.kernels])
