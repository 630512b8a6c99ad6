"""Shared bits of the benchmark scripts: machine description, timing, appending to RESULTS.md."""
from __future__ import annotations

import datetime
import os
import shlex
import platform
import sys
import time
from pathlib import Path

import torch

HERE = Path(__file__).resolve().parent
sys.path.insert(0, str(HERE.parent / "src"))


def pick_device(name: str) -> torch.device:
    """``auto``: CUDA when present, else CPU; otherwise the named device."""
    if name == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    return torch.device(name)


def machine(device: torch.device) -> str:
    cpu = platform.processor() or platform.machine()
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                cpu = line.split(":", 1)[1].strip()
                break
    except OSError:
        pass
    text = f"{cpu}, {torch.get_num_threads()} threads, torch {torch.__version__}"
    if device.type == "cuda":
        text = f"{torch.cuda.get_device_name(device)} (CUDA {torch.version.cuda}); host {text}"
    return text


def _clock(fn, device: torch.device) -> float:
    """Seconds of one ``fn()``, waiting for the GPU before and after."""
    if device.type == "cuda":
        torch.cuda.synchronize(device)
    t = time.perf_counter()
    fn()
    if device.type == "cuda":
        torch.cuda.synchronize(device)
    return time.perf_counter() - t


def sgd_step(model, opt, xb, yb, bf16: bool, device: torch.device) -> None:
    """One training step as kmeansinit.train takes it: channels-last batch, optional bf16 autocast,
    float32 cross-entropy, zero_grad, backward, optimizer step."""
    import torch.nn.functional as F

    xb = xb.contiguous(memory_format=torch.channels_last)
    with torch.autocast(device.type, dtype=torch.bfloat16, enabled=bf16):
        loss = F.cross_entropy(model(xb).float(), yb)
    opt.zero_grad(set_to_none=True)
    loss.backward()
    opt.step()


def timed(fn, repeats: int, device: torch.device, warmup: int = 2) -> float:
    """Median seconds of ``fn()`` over ``repeats`` calls after ``warmup``."""
    times = [_clock(fn, device) for _ in range(warmup + repeats)][warmup:]
    return sorted(times)[len(times) // 2]


def timed_pair(f, g, repeats: int, device: torch.device, warmup: int = 2) -> tuple[float, float]:
    """Median seconds of ``f()`` and ``g()``, measured alternately so that drift hits both alike."""
    tf, tg = [], []
    for _ in range(warmup + repeats):
        tf.append(_clock(f, device))
        tg.append(_clock(g, device))
    tf, tg = sorted(tf[warmup:]), sorted(tg[warmup:])
    return tf[len(tf) // 2], tg[len(tg) // 2]


def timed_many(fns: list, repeats: int, device: torch.device, warmup: int = 2) -> list[float]:
    """Median seconds of each ``fn()``, calls interleaved round-robin so that drift (clock, other
    tenants of the cores) hits all alike: the ratios between them are what the targets compare."""
    times: list[list[float]] = [[] for _ in fns]
    for _ in range(warmup + repeats):
        for t, fn in zip(times, fns):
            t.append(_clock(fn, device))
    return [sorted(t[warmup:])[len(t[warmup:]) // 2] for t in times]


def profile_lines(fn, title: str, device: torch.device, repeats: int = 3, rows: int = 8) -> list[str]:
    """Markdown table of the ``rows`` operators with the most self time over ``repeats`` calls of ``fn``:
    where the time goes, for a target that is missed."""
    from torch.profiler import ProfilerActivity, profile

    fn()  # warm-up outside the profile
    acts = [ProfilerActivity.CPU] + ([ProfilerActivity.CUDA] if device.type == "cuda" else [])
    with profile(activities=acts) as prof:
        for _ in range(repeats):
            fn()
        if device.type == "cuda":
            torch.cuda.synchronize(device)
    key = "self_device_time_total" if device.type == "cuda" else "self_cpu_time_total"
    events = sorted(prof.key_averages(), key=lambda e: getattr(e, key), reverse=True)
    total = sum(getattr(e, key) for e in events) or 1.0
    out = [f"Profile: {title} ({repeats} calls; self time per call)", "", "| operator | ms per call | share |", "|---|---|---|"]
    for e in events[:rows]:
        t = getattr(e, key)
        name = e.key.replace("|", "/")
        name = name if len(name) <= 90 else name[:87] + "..."  # CUDA kernel names run to thousands of characters
        out.append(f"| {name} | {t / 1e3 / repeats:.1f} | {100 * t / total:.0f}% |")
    return out + [""]


def append_results(title: str, device: torch.device, lines: list[str], results: Path | None = None) -> Path:
    path = Path(os.environ.get("KMEANSINIT_RESULTS", results or HERE / "RESULTS.md"))
    script = Path(sys.argv[0]).resolve()
    shown = script.relative_to(HERE.parent).as_posix() if script.is_relative_to(HERE.parent) else sys.argv[0]
    cmd = "python " + shlex.join([shown] + sys.argv[1:])  # quoted: the line reruns as written
    stamp = datetime.datetime.now(datetime.timezone.utc).strftime("%Y-%m-%d %H:%M UTC")
    block = [f"## {title}", "", f"- date: {stamp}", f"- machine: {machine(device)}", f"- command: `{cmd}`", ""] + lines + [""]
    with open(path, "a") as f:
        f.write("\n".join(block) + "\n")
    print("\n".join(block))
    return path
