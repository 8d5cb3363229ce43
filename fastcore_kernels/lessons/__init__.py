"""The course's lessons as one command each: `fastcore-kernels lesson N [--part NAME] ...` (also
`python -m fastcore_kernels.lessons lesson N ...`). Every part trains with fastcore_kernels' fused modules and with
stock PyTorch (`--kernels both`, the default) and prints the metric and time per epoch side by side.

Parts so far: lesson 7 `human-numbers`.
"""

from __future__ import annotations

import json
import statistics
import time
from dataclasses import asdict, dataclass, field
from pathlib import Path

import torch

LESSONS = {7: ("human-numbers",)}


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
    print(f"\n{'model':<12}{'metric':<10}{'fused':>9}{'stock':>9}{'s/epoch fused':>15}{'s/epoch stock':>15}"
          f"{'speed-up':>10}")
    for model, runs in by_model.items():
        f, s = runs.get("fused"), runs.get("stock")
        any_run = f or s

        def cell(r, attr, fmt):
            return format(getattr(r, attr), fmt) if r else "-"
        speed = f"{s.sec_per_epoch / f.sec_per_epoch:.2f}x" if f and s else "-"
        print(f"{model:<12}{any_run.metric:<10}{cell(f, 'value', '9.4f')}{cell(s, 'value', '9.4f')}"
              f"{cell(f, 'sec_per_epoch', '15.3f')}{cell(s, 'sec_per_epoch', '15.3f')}{speed:>10}")


def write_results(results: list[RunResult], out: Path) -> Path:
    out.mkdir(parents=True, exist_ok=True)
    path = out / "results.json"
    path.write_text(json.dumps([asdict(r) for r in results], indent=1) + "\n")
    return path


def epoch_seconds(timer) -> float:
    """Median epoch wall time (the first epoch carries one-off warm-up)."""
    times = timer.epoch_times[1:] or timer.epoch_times
    return statistics.median(times)


def run(lesson: int, part: str | None = None, *, data=None, epochs: int | None = None, kernels: str = "both",
        device: str | None = None, quick: bool = False, out: str | Path = "lesson_out") -> list[RunResult]:
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
    for p in ([part] if part else parts):
        if (lesson, p) == (7, "human-numbers"):
            from fastcore_kernels.lessons.lesson7 import run_human_numbers
            results += run_human_numbers(data=data, epochs=epochs, kernel_sets=kernel_sets, device=device,
                                         quick=quick, out=out / f"lesson{lesson}-{p}")
    print_results(results)
    path = write_results(results, out)
    print(f"\n{len(results)} runs in {time.perf_counter() - t0:.1f} s; results in {path}")
    return results
