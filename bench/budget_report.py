"""The budget/report framework of bench/gpu_check.py, apart from what it measures: sections run one after
another, each under its own SIGALRM budget inside a global wall-clock budget (a hard stop that keeps the
files), and a JSON + markdown report rewritten after every figure, so a section that fails or runs out of
time is recorded as such and the rest still report. Device timing helpers (sync, peak memory) live here too.
"""
from __future__ import annotations

import contextlib
import json
import math
import os
import platform
import re
import signal
import subprocess
import threading
import time
import traceback
from pathlib import Path
from typing import Callable

import torch

MIN_START_S = 5.0  # a section is skipped when less than this is left of the global budget


class SectionTimeout(Exception):
    """Raised (by SIGALRM) inside a section that ran past its budget."""


class Report:
    """The JSON + markdown pair, rewritten after every figure (partial results survive any failure)."""

    def __init__(self, out: Path, meta: dict):
        self.out = out
        self.data: dict = {"meta": meta, "sections": {}, "figures": []}
        self.lock = threading.RLock()
        self.t0 = time.perf_counter()
        out.mkdir(parents=True, exist_ok=True)

    def put(self, section: str, **values) -> None:
        with self.lock:
            self.data["sections"].setdefault(section, {}).update(jsonable(values))
            self.flush()

    def figure(self, section: str, what: str, value: float | None, unit: str, baseline: float | None = None,
               baseline_what: str = "", ratio: float | None = None, note: str = "") -> None:
        """One row of the table; ratio defaults to value / baseline when both are there."""
        if ratio is None and value is not None and baseline:
            ratio = value / baseline
        with self.lock:
            self.data["figures"].append(jsonable(dict(section=section, what=what, value=value, unit=unit,
                                                       baseline=baseline, baseline_what=baseline_what,
                                                       ratio=ratio, note=note)))
            self.flush()

    def flush(self) -> None:
        with self.lock:
            self.data["meta"]["wall_s"] = round(time.perf_counter() - self.t0, 2)
            tmp = self.out / "gpu_check.json.tmp"
            tmp.write_text(json.dumps(self.data, indent=1))
            tmp.replace(self.out / "gpu_check.json")
            (self.out / "gpu_check.md").write_text(render_markdown(self.data))


def jsonable(x):
    if isinstance(x, dict):
        return {str(k): jsonable(v) for k, v in x.items()}
    if isinstance(x, (list, tuple)):
        return [jsonable(v) for v in x]
    if isinstance(x, float):
        return None if not math.isfinite(x) else float(f"{x:.6g}")
    if isinstance(x, (str, int, bool)) or x is None:
        return x
    if isinstance(x, torch.Tensor) and x.numel() == 1:
        return jsonable(x.item())
    return str(x)


def fmt(v, unit: str = "") -> str:
    if v is None:
        return "-"
    if isinstance(v, float):
        text = f"{v:.3g}" if abs(v) < 1000 else f"{v:,.0f}"
    else:
        text = f"{v:,}" if isinstance(v, int) else str(v)
    return f"{text} {unit}".strip()


def render_markdown(data: dict) -> str:
    m = data["meta"]
    lines = [f"# GPU check — {m.get('device_name')} ({m.get('mode')})", "",
             f"{m.get('date')} · torch {m.get('torch')} (CUDA {m.get('cuda')}) · transformers {m.get('transformers')} · "
             f"{m.get('dtype')} · commit {m.get('commit') or '?'} · wall {m.get('wall_s')} s of a {m.get('budget_s')} s budget",
             "", f"Model: {m.get('model')}", "", f"Notes: {m.get('notes')}", "",
             "| section | figure | value | side by side | ratio | note |", "|---|---|---|---|---|---|"]
    for f in data["figures"]:
        side = f"{fmt(f['baseline'], f['unit'])} ({f['baseline_what']})" if f["baseline"] is not None else "-"
        ratio = "-" if f["ratio"] is None else f"{f['ratio']:.3g}x" if f["ratio"] >= 0.01 else f"{f['ratio']:.2e}x"
        cell = [str(c).replace("|", "\\|") for c in (f["what"], f["note"])]  # "|Δlogit|" must not split a row
        lines.append(f"| {f['section']} | {cell[0]} | {fmt(f['value'], f['unit'])} | {side} | {ratio} | {cell[1]} |")
    lines += ["", "| section | status | seconds |", "|---|---|---|"]
    for name, s in data["sections"].items():
        lines.append(f"| {name} | {s.get('status', '?')} | {s.get('seconds', '-')} |")
    return "\n".join(lines) + "\n"


# ---------------------------------------------------------------------------------------------- helpers
def sync(dev: torch.device) -> None:
    if dev.type == "cuda":
        torch.cuda.synchronize(dev)


def reset_peak(dev: torch.device) -> None:
    if dev.type == "cuda":
        torch.cuda.empty_cache()
        torch.cuda.reset_peak_memory_stats(dev)


def peak_gb(dev: torch.device) -> float | None:
    return torch.cuda.max_memory_allocated(dev) / 1e9 if dev.type == "cuda" else None


def timed(fn, dev: torch.device):
    sync(dev)
    t0 = time.perf_counter()
    out = fn()
    sync(dev)
    return out, time.perf_counter() - t0


@contextlib.contextmanager
def time_budget(seconds: float):
    """SIGALRM after `seconds` raises SectionTimeout in the main thread (after the running kernel returns)."""
    def on_alarm(signum, frame):
        raise SectionTimeout(f"ran past its {seconds:g} s budget")

    old = signal.signal(signal.SIGALRM, on_alarm)
    signal.setitimer(signal.ITIMER_REAL, max(seconds, 1e-3))
    try:
        yield
    finally:
        signal.setitimer(signal.ITIMER_REAL, 0)
        signal.signal(signal.SIGALRM, old)


# ---------------------------------------------------------------------------------------------- driver
SectionFn = Callable[[str, float, Callable[..., None]], None]


def run_sections(report: Report, sections: list[str], budgets: dict[str, float], deadline: float, run: SectionFn,
                 after_each: Callable[[], None] | None = None, tag: str = "gpu_check") -> None:
    """`run(name, budget_s, put)` per section in order, each under min(its budget, what is left of the global
    one); status ok / timeout / failed (with the traceback) / skipped and seconds go into the report."""
    for name in sections:
        left = deadline - time.monotonic()
        rec = {"status": "running", "budget_s": budgets[name]}
        if left < MIN_START_S:
            report.put(name, status=f"skipped: global budget spent ({left:.0f} s left)")
            continue
        budget = min(budgets[name], left - 2.0)
        report.put(name, **rec)
        t0 = time.perf_counter()
        status = "ok"
        try:
            with time_budget(budget):
                run(name, budget, lambda **kv: report.put(name, **kv))
        except SectionTimeout as e:
            status = f"timeout: {e}"
        except Exception as e:  # noqa: BLE001 - recorded; the other sections still run
            status = f"failed: {type(e).__name__}: {str(e).strip().splitlines()[0][:300] if str(e).strip() else ''}"
            report.put(name, traceback=traceback.format_exc()[-3000:])
        finally:
            if after_each is not None:
                after_each()
        report.put(name, status=status, seconds=round(time.perf_counter() - t0, 2))
        print(f"[{tag}] {name}: {status} ({time.perf_counter() - t0:.1f} s)", flush=True)


def start_hard_stop(report: Report, budget_s: float, deadline: float, tag: str = "gpu_check") -> threading.Timer:
    """The global budget is a promise: at `deadline` whatever runs is cut off (exit 124), the files stay."""
    def hard_stop():
        with report.lock:
            for s in report.data["sections"].values():
                if s.get("status") == "running":
                    s["status"] = f"killed: global budget of {budget_s:.0f} s spent"
            report.flush()
        print(f"[{tag}] global budget of {budget_s:.0f} s spent; results so far in {report.out}", flush=True)
        os._exit(124)

    timer = threading.Timer(max(1.0, deadline - time.monotonic()), hard_stop)
    timer.daemon = True
    timer.start()
    return timer


def parse_budgets(text: str | None, sections: tuple[str, ...]) -> dict[str, float]:
    """--budgets NAME=SECONDS,... with NAME one of `sections`."""
    out = {}
    for item in filter(None, (text or "").split(",")):
        name, _, sec = item.partition("=")
        if name not in sections or not sec:
            raise SystemExit(f"error: --budgets takes NAME=SECONDS with NAME in {', '.join(sections)} (got {item!r})")
        out[name] = float(sec)
    return out


def device_slug(dev: torch.device) -> str:
    name = torch.cuda.get_device_name(dev) if dev.type == "cuda" else platform.processor() or "cpu"
    return re.sub(r"[^a-z0-9]+", "-", name.lower()).strip("-") or dev.type


def git_commit(root: Path) -> str | None:
    try:
        return subprocess.run(["git", "-C", str(root), "rev-parse", "--short", "HEAD"], capture_output=True,
                              text=True, timeout=5).stdout.strip() or None
    except (OSError, subprocess.SubprocessError):
        return None
