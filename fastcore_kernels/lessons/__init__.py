"""The course's lessons as one command each: `fastcore-kernels lesson N [--part NAME] ...` (also
`python -m fastcore_kernels.lessons lesson N ...`). Every part trains with fastcore_kernels' fused modules and with
stock PyTorch (`--kernels both`, the default) and prints the metric and time per epoch side by side.

Parts (PARTS below): lesson 1 digits; lesson 2 sgd, webapp; lesson 3 multi-label, segmentation, points, imdb-lm;
lesson 4 tabular, collab, imdb; lesson 5 collab-wd, mnist-sgd; lesson 6 rossmann, cnn-gradcam; lesson 7
human-numbers, mnist-resnet, restoration, wgan.
"""

from __future__ import annotations

import importlib
import inspect
import json
import statistics
import time
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Callable

import torch

from fastcore_kernels.learner import Learner, MixedPrecision, Timer

# (lesson, part) -> "module:function" in this package; every function takes
# (data, epochs, kernel_sets, device, quick, out) and returns a list of RunResult.
PARTS = {
    (1, "digits"): "lesson1:run_digits",
    (2, "sgd"): "lesson2:run_sgd",
    (2, "webapp"): "lesson2:run_webapp",
    (3, "multi-label"): "lesson3:run_multilabel",
    (3, "segmentation"): "lesson3:run_segmentation",
    (3, "points"): "lesson3:run_points",
    (3, "imdb-lm"): "ulmfit:run_imdb_lm",
    (4, "imdb"): "ulmfit:run_imdb",
    (4, "tabular"): "lesson4:run_tabular",
    (4, "collab"): "lesson4:run_collab",
    (5, "collab-wd"): "lesson5:run_collab_wd",
    (5, "mnist-sgd"): "lesson5:run_mnist_sgd",
    (6, "rossmann"): "lesson6:run_rossmann",
    (6, "cnn-gradcam"): "lesson6:run_cnn_gradcam",
    (7, "human-numbers"): "lesson7:run_human_numbers",
    (7, "mnist-resnet"): "lesson7:run_mnist_resnet",
    (7, "restoration"): "lesson7:run_restoration",
    (7, "wgan"): "lesson7:run_wgan",
}
LESSONS: dict[int, tuple[str, ...]] = {}
for _lesson, _part in PARTS:
    LESSONS[_lesson] = LESSONS.get(_lesson, ()) + (_part,)


@dataclass
class RunResult:
    lesson: int
    part: str
    model: str
    kernels: str
    metric: str
    value: float
    epochs: int
    sec_per_epoch: float
    extra: dict = field(default_factory=dict)


def print_results(results: list[RunResult]) -> None:
    """One row per model: the metric and the time per epoch of each kernel set, and fused vs stock speed."""
    by_model: dict[str, dict[str, RunResult]] = {}
    for r in results:
        by_model.setdefault(r.model, {})[r.kernels] = r
    w = max([len("model")] + [len(m) for m in by_model]) + 2
    wm = max([len("metric")] + [len(r.metric) for r in results]) + 2
    print(f"\n{'model':<{w}}{'metric':<{wm}}{'fused':>9}{'stock':>9}{'s/epoch fused':>15}{'s/epoch stock':>15}"
          f"{'speed-up':>10}")
    for model, runs in by_model.items():
        f, s = runs.get("fused"), runs.get("stock")

        def cell(r, attr, width, fmt):
            return format(getattr(r, attr), f"{width}{fmt}") if r else format("-", f">{width}")
        speed = f"{s.sec_per_epoch / f.sec_per_epoch:.2f}x" if f and s else "-"
        print(f"{model:<{w}}{(f or s).metric:<{wm}}{cell(f, 'value', 9, '.4f')}{cell(s, 'value', 9, '.4f')}"
              f"{cell(f, 'sec_per_epoch', 15, '.3f')}{cell(s, 'sec_per_epoch', 15, '.3f')}{speed:>10}")


def write_results(results: list[RunResult], out: Path) -> Path:
    out.mkdir(parents=True, exist_ok=True)
    path = out / "results.json"
    path.write_text(json.dumps([asdict(r) for r in results], indent=1) + "\n")
    return path


def epoch_seconds(timer) -> float:
    """Median epoch wall time (the first epoch carries one-off warm-up)."""
    times = timer.epoch_times[1:] or timer.epoch_times
    return statistics.median(times)


# run(..., mixed_precision=True) sets this for its parts: every Learner they build gets MixedPrecision (autocast:
# bf16 on the CPU, fp16 with a GradScaler on CUDA), fused and stock alike.
_mixed_precision = False


def extra_callbacks() -> list:
    """The callbacks run()'s options add to every Learner a part builds."""
    return [MixedPrecision()] if _mixed_precision else []


class _StageTimer(Timer):
    """A Timer that keeps counting across several fits (freeze, then unfreeze stages)."""

    def before_fit(self):
        if not hasattr(self, "epoch_times"):
            super().before_fit()


def train_kernel_sets(lesson: int, part: str, model_name: str, make_model: Callable[[], torch.nn.Module], dls,
                      loss_func, *, kernel_sets, out: Path, fit: Callable, metrics=(), metric: str | None = None,
                      cbs: Callable[[], list] = list, learner_kwargs: dict | None = None,
                      extra: Callable | None = None) -> list[RunResult]:
    """Trains a fresh `make_model()` (seed 0) once per kernel set on the same data with `fit(learn)`, and returns one
    RunResult each: the last epoch's value of `metric` (the first metric by default) and the median epoch time."""
    results = []
    out.mkdir(parents=True, exist_ok=True)
    for kernels in kernel_sets:
        torch.manual_seed(0)
        timer = _StageTimer()
        learn = Learner(dls, make_model(), loss_func, metrics=metrics, cbs=[*cbs(), *extra_callbacks(), timer],
                        kernels=kernels, progress=False, **(learner_kwargs or {}))
        print(f"lesson {lesson} {part}: {model_name} ({kernels})", flush=True)
        fit(learn)
        name = metric or (learn.recorder.metric_names[3] if learn.metrics else "valid_loss")
        value = float(learn.recorder.value(name))
        learn.recorder.plot_loss(out / f"loss_{model_name}_{kernels}.png", skip_start=0)
        info = {"valid_loss": round(float(learn.recorder.value("valid_loss")), 4)}
        info.update(extra(learn) if extra else {})
        results.append(RunResult(lesson, part, model_name, kernels, name, round(value, 4), len(timer.epoch_times),
                                 round(epoch_seconds(timer), 4), info))
        print(f"  {name} {value:.4f}, {results[-1].sec_per_epoch:.3f} s/epoch", flush=True)
    return results


def run(lesson: int, part: str | None = None, *, data=None, epochs: int | None = None, kernels: str = "both",
        device: str | None = None, quick: bool = False, out: str | Path = "lesson_out",
        weights: str | Path | None = None, mixed_precision: bool = False) -> list[RunResult]:
    global _mixed_precision
    if lesson not in LESSONS:
        raise SystemExit(f"lesson {lesson} has no parts yet; available: "
                         + ", ".join(f"{n} ({', '.join(p)})" for n, p in LESSONS.items()))
    parts = LESSONS[lesson]
    if part is not None and part not in parts:
        raise SystemExit(f"lesson {lesson} has parts {', '.join(parts)}, not {part!r}")
    device = torch.device(device or ("cuda" if torch.cuda.is_available() else "cpu"))
    kernel_sets = ("fused", "stock") if kernels == "both" else (kernels,)
    out = Path(out)
    results = []
    t0 = time.perf_counter()
    _mixed_precision = mixed_precision
    try:
        for p in ([part] if part else parts):
            module, fn = PARTS[(lesson, p)].split(":")
            runner = getattr(importlib.import_module(f"fastcore_kernels.lessons.{module}"), fn)
            extra = {"weights": weights} if weights is not None else {}
            if extra and "weights" not in inspect.signature(runner).parameters:
                raise SystemExit(f"lesson {lesson} {p} takes no --weights")
            results += runner(data=data, epochs=epochs, kernel_sets=kernel_sets, device=device, quick=quick,
                              out=out / f"lesson{lesson}-{p}", **extra)
    finally:
        _mixed_precision = False
    print_results(results)
    path = write_results(results, out)
    print(f"\n{len(results)} runs in {time.perf_counter() - t0:.1f} s; results in {path}")
    return results
