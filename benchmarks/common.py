"""Shared benchmark plumbing: timing (CUDA events via triton.testing.do_bench, or repeated wall-clock on the CPU),
the machine's measured copy bandwidth, and result rows written as JSON with the commit and date."""

from __future__ import annotations

import datetime
import json
import os
import platform
import statistics
import subprocess
import time
from pathlib import Path
from typing import Callable

import torch


def commit() -> str:
    """FCK_COMMIT when set (a lent GPU machine's copy of the tree carries a stale git HEAD), else git's HEAD."""
    if os.environ.get("FCK_COMMIT"):
        return os.environ["FCK_COMMIT"]
    try:
        return subprocess.run(["git", "rev-parse", "--short", "HEAD"], capture_output=True, text=True,
                              cwd=Path(__file__).parent, check=True).stdout.strip()
    except (OSError, subprocess.CalledProcessError):
        return "unknown"


def device_name(device: torch.device) -> str:
    if device.type == "cuda":
        return torch.cuda.get_device_name(device)
    # The CPU model and its widest vector ISA: the hosts this runs on differ (an AMD EPYC with AVX2, a Xeon with
    # AVX-512), and the kernels take different paths on each.
    model = platform.processor() or platform.machine()
    try:
        with open("/proc/cpuinfo") as f:
            model = next((line.split(":", 1)[1].strip() for line in f if line.startswith("model name")), model)
    except OSError:
        pass
    isa = torch.backends.cpu.get_cpu_capability() if hasattr(torch.backends, "cpu") else "?"
    return f"{model}, {isa} ({torch.get_num_threads()} threads)"


def _quantiles(samples: list[float]) -> tuple[float, float, float]:
    samples = sorted(samples)
    q = statistics.quantiles(samples, n=10, method="inclusive") if len(samples) > 1 else samples * 9
    return q[1], statistics.median(samples), q[7]


def time_ms(fn: Callable[[], object], device: torch.device, reps: int = 20) -> tuple[float, float, float]:
    """(p20, p50, p80) milliseconds of fn()."""
    if device.type == "cuda":
        import triton.testing

        # FCK_BENCH_REP_MS: a lent GPU's minutes are few; 100 ms of repeats is hundreds of samples of these ops.
        rep = float(os.environ.get("FCK_BENCH_REP_MS", "100"))
        return tuple(triton.testing.do_bench(fn, warmup=rep / 4, rep=rep, quantiles=[0.2, 0.5, 0.8]))
    fn()  # warm-up: lazy state init, first-touch page faults
    samples = []
    for _ in range(reps):
        t0 = time.perf_counter()
        fn()
        samples.append((time.perf_counter() - t0) * 1e3)
    return _quantiles(samples)


def interleaved_time_ms(fns: dict[str, Callable[[], object]], reps: int = 20) -> dict[str, tuple]:
    """CPU timing of several competitors in round-robin, so drift in the machine's load (shared cores, turbo,
    other processes) falls on all of them alike instead of on whichever ran during the noisy minute."""
    for fn in fns.values():
        fn()
    samples: dict[str, list[float]] = {name: [] for name in fns}
    for _ in range(reps):
        for name, fn in fns.items():
            t0 = time.perf_counter()
            fn()
            samples[name].append((time.perf_counter() - t0) * 1e3)
    return {name: _quantiles(s) for name, s in samples.items()}


def device_time_ms(fn: Callable[[], object], steps: int = 20, kernels: list | None = None) -> float:
    """GPU time per call summed over the kernels and copies fn() launches (torch.profiler), without the host time
    between them: the difference to time_ms() is host overhead that the GPU waited for. `kernels`, if given, gets
    each kernel's (name, GPU us per call, launches per call), largest first: where the GPU time goes, from the same
    profile."""
    from torch.profiler import ProfilerActivity, profile

    fn()
    torch.cuda.synchronize()
    with profile(activities=[ProfilerActivity.CUDA]) as prof:
        for _ in range(steps):
            fn()
        torch.cuda.synchronize()
    total_us = 0.0
    rows = []
    for event in prof.key_averages():
        us = getattr(event, "self_device_time_total", None)
        us = us if us is not None else event.self_cuda_time_total
        total_us += us
        if us > 0:
            rows.append((event.key[:90], round(us / steps, 2), round(event.count / steps, 2)))
    if kernels is not None:
        kernels.extend(sorted(rows, key=lambda r: -r[1]))
    return total_us / steps / 1e3


def device_profile(fn: Callable[[], object], label: str, steps: int = 5, show: int = 4) -> dict:
    """{"device_ms", "kernels": the 8 costliest (name, us per call, launches per call)} of fn() on a GPU, the top
    `show` printed under `label`: a later session reads where the GPU time went without another device run."""
    kernels = []
    ms = device_time_ms(fn, steps=steps, kernels=kernels)
    for name, us, calls in kernels[:show]:
        print(f"    {label:<24}{us:9.1f} us  x{calls:<6g} {name}")
    return {"device_ms": round(ms, 4), "kernels": kernels[:8]}


def _status_kib(field: str) -> int:
    for line in Path("/proc/self/status").read_text().splitlines():
        if line.startswith(field + ":"):
            return int(line.split()[1])
    raise RuntimeError(f"no {field} in /proc/self/status")


def step_peak_mib(step: Callable[[], object], device: torch.device) -> float:
    """Memory one call of step() needs beyond what is allocated before it, in MiB: the caching allocator's
    high-water mark on CUDA; on the CPU the process's peak resident set (the kernel's mark reset first)."""
    if device.type == "cuda":
        torch.cuda.synchronize()
        torch.cuda.reset_peak_memory_stats()
        base = torch.cuda.memory_allocated()
        step()
        torch.cuda.synchronize()
        return (torch.cuda.max_memory_allocated() - base) / 2**20
    Path("/proc/self/clear_refs").write_text("5")  # resets VmHWM to the current VmRSS
    before = _status_kib("VmRSS")
    step()
    return (_status_kib("VmHWM") - before) / 1024


def copy_bandwidth_gbs(device: torch.device, nbytes: int = 1 << 30) -> float:
    """Measured device-to-device (or RAM-to-RAM) copy rate, counting bytes read plus bytes written."""
    n = nbytes // 4
    src = torch.rand(n, device=device)
    dst = torch.empty_like(src)
    _, p50, _ = time_ms(lambda: dst.copy_(src), device, reps=10)
    return 2 * nbytes / (p50 * 1e-3) / 1e9


class Results:
    def __init__(self, device: torch.device, out: str | Path | None = None):
        self.device, self.out = device, out  # with out, every row is written as it comes (a run cut off keeps them)
        self.rows: list[dict] = []
        self.copy_gbs = copy_bandwidth_gbs(device)
        self.meta = dict(device=device_name(device), commit=commit(),
                         date=datetime.datetime.now(datetime.timezone.utc).isoformat(timespec="seconds"),
                         torch=torch.__version__, copy_gbs=round(self.copy_gbs, 1))

    def add(self, op: str, provider: str, mode: str, shape: str, times: tuple[float, float, float],
            nbytes: int, peak_mem_mb: float | None = None, **extra) -> dict:
        p20, p50, p80 = times
        gbs = nbytes / (p50 * 1e-3) / 1e9
        row = dict(op=op, provider=provider, mode=mode, shape=shape, p20_ms=round(p20, 4), p50_ms=round(p50, 4),
                   p80_ms=round(p80, 4), gbs=round(gbs, 1), frac_copy_bw=round(gbs / self.copy_gbs, 3),
                   peak_mem_mb=None if peak_mem_mb is None else round(peak_mem_mb, 1), **extra, **self.meta)
        self.rows.append(row)
        if self.out:
            self.write(self.out, quiet=True)
        return row

    def print_table(self, baseline: str) -> None:
        print(f"\n{self.meta['device']} | commit {self.meta['commit']} | torch {self.meta['torch']} | "
              f"measured copy bandwidth {self.copy_gbs:.1f} GB/s")
        w = max([22] + [len(r["shape"]) + 2 for r in self.rows])
        mw = max([9] + [len(r["mode"]) + 1 for r in self.rows])
        hdr = (f"{'op':<14}{'shape':<{w}}{'mode':<{mw}}{'provider':<15}{'p50 ms':>10}{'GPU ms':>9}{'GB/s':>9}"
               f"{'of copy':>9}{'peak MiB':>10}{'vs ' + baseline:>14}")
        print(hdr)
        print("-" * len(hdr))
        base = {(r["op"], r["mode"], r["shape"]): r["p50_ms"] for r in self.rows if r["provider"] == baseline}
        for r in self.rows:
            b = base.get((r["op"], r["mode"], r["shape"]))
            speedup = f"{b / r['p50_ms']:.2f}x" if b else "-"
            mem = "-" if r["peak_mem_mb"] is None else f"{r['peak_mem_mb']:.1f}"
            dev = f"{r['device_ms']:.3f}" if "device_ms" in r else "-"
            print(f"{r['op']:<14}{r['shape']:<{w}}{r['mode']:<{mw}}{r['provider']:<15}{r['p50_ms']:>10.3f}{dev:>9}"
                  f"{r['gbs']:>9.1f}{r['frac_copy_bw']:>9.2f}{mem:>10}{speedup:>14}")

    def finish(self, baseline: str, out: str | Path | None) -> "Results":
        """The end of every benchmark script: the table, then the JSON rows where asked."""
        self.print_table(baseline)
        if out:
            self.write(out)
        return self

    def write(self, path: str | Path, quiet: bool = False) -> None:
        path = Path(path)
        path.parent.mkdir(parents=True, exist_ok=True)
        path.write_text(json.dumps(self.rows, indent=1) + "\n")
        if not quiet:
            print(f"wrote {len(self.rows)} rows to {path}")
