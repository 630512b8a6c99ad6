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
    flags: set[str] = set()
    try:
        lines = Path("/proc/cpuinfo").read_text().splitlines()
    except OSError:
        lines = []
    # The first core's entries describe them all.
    cpu = next((ln.split(":", 1)[1].strip() for ln in lines if ln.startswith("model name")), cpu)
    flags = next((set(ln.split(":", 1)[1].split()) for ln in lines if ln.startswith("flags")), flags)
    # bf16 speed depends on these more than on the model name ("Intel(R) Xeon(R) Processor" says little):
    # avx512_bf16 converts and dots bf16 at twice the fp32 rate, AMX tiles multiply bf16 matrices.
    bf16_units = [f for f in ("avx512_bf16", "amx_bf16") if f in flags]
    if bf16_units:
        cpu += f" ({', '.join(bf16_units)})"
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


def op_ms(fn, device: torch.device, repeats: int = 3) -> dict[str, float]:
    """Self time of each operator in milliseconds per call of ``fn``, over ``repeats`` profiled calls
    after one warm-up call; the dict is ordered by time, longest first."""
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
    return {e.key.replace("|", "/"): getattr(e, key) / 1e3 / repeats for e in events}


def _op_name(name: str) -> str:
    return name if len(name) <= 90 else name[:87] + "..."  # CUDA kernel names run to thousands of characters


def profile_lines(fn, title: str, device: torch.device, repeats: int = 3, rows: int = 8) -> list[str]:
    """Markdown table of the ``rows`` operators with the most self time over ``repeats`` calls of ``fn``:
    where the time goes, for a target that is missed."""
    ms = op_ms(fn, device, repeats)
    total = sum(ms.values()) or 1.0
    out = [f"Profile: {title} ({repeats} calls; self time per call)", "", "| operator | ms per call | share |", "|---|---|---|"]
    for name, t in list(ms.items())[:rows]:
        out.append(f"| {_op_name(name)} | {t:.1f} | {100 * t / total:.0f}% |")
    return out + [""]


def compare_profiles(fns: dict, title: str, device: torch.device, repeats: int = 3, rows: int = 10) -> list[str]:
    """Markdown table of the operators' self time under each of two ``fns`` ({label: fn}) side by side,
    with the ratio first/second: which operators keep a faster variant from its expected gain. Rows:
    the ``rows`` operators with most time under the second, then the sum of the rest."""
    (la, fa), (lb, fb) = fns.items()
    a, b = op_ms(fa, device, repeats), op_ms(fb, device, repeats)
    names = list(b)[:rows]
    out = [f"Profile: {title} ({repeats} calls each; self time per call)", "",
           f"| operator | {la} ms | {lb} ms | {la} / {lb} | share of {lb} |", "|---|---|---|---|---|"]
    tb = sum(b.values()) or 1.0
    for name in names:
        x, y = a.get(name, 0.0), b[name]
        out.append(f"| {_op_name(name)} | {x:.1f} | {y:.1f} | {x / y if y else float('inf'):.2f}x | {100 * y / tb:.0f}% |")
    rest_a = sum(v for k, v in a.items() if k not in names)
    rest_b = sum(v for k, v in b.items() if k not in names)
    out.append(f"| (all other operators) | {rest_a:.1f} | {rest_b:.1f} | {rest_a / rest_b if rest_b else float('inf'):.2f}x | {100 * rest_b / tb:.0f}% |")
    ta = sum(a.values())
    out.append(f"| **total** | {ta:.1f} | {tb:.1f} | {ta / tb:.2f}x | 100% |")
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
