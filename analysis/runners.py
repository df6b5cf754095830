"""How one run of an experiment executes: `rankguard train` in this process, the services, or either in a
spawned child process (`ChildProcessRun`), and how far a run has got (`run_progress`). Shared by the
experiment runner, the dispatcher (devices) and the Ray backend, none of which import each other for it."""
from __future__ import annotations

import os
import threading
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Callable

from shared.config import RunConfig

MODES = ("services", "inprocess")
RunFn = Callable[[RunConfig], Any]
Note = Callable[[RunConfig, dict], None]  # record facts about a run (its devices, its attempts)


def run_name(cfg: RunConfig) -> str:
    """`arm/seed<k>` from the run folder OUT/<arm>/seed<k>."""
    path = Path(cfg.run_dir)
    return f"{path.parent.name}/{path.name}"


@dataclass(frozen=True)
class InProcessRun:
    """`rankguard train` as a picklable callable (a spawned child process can be handed it)."""

    progress: bool = False

    def __call__(self, cfg: RunConfig) -> Any:
        from services.sources import run_inprocess

        return run_inprocess(cfg, resume=True, progress=self.progress)


def default_run_fn(mode: str, progress: bool = False, stop: threading.Event | None = None) -> RunFn:
    """The real run: in one process (learner.trainer) or through the services (services.launcher).
    `stop` (services) shuts a run down from another thread, as Ctrl-C would."""
    if mode == "inprocess":
        return InProcessRun(progress=progress)
    if mode == "services":
        from services.launcher import run_services

        return lambda cfg: run_services(cfg, resume=True, stop=stop)
    raise ValueError(f"unknown mode {mode!r}; valid modes: {', '.join(MODES)}")


class RunInterrupted(RuntimeError):
    """A child-process run that was stopped (Ctrl-C / SIGTERM of the experiment); it resumes next time."""


def _child_main(run_fn: RunFn, cfg_json: str, conn, parent_pid: int) -> None:
    """Body of one spawned run process: its own process group (a terminal Ctrl-C reaches the runner, which
    forwards one SIGINT), torch threads from the config, a watchdog that stops the run if the runner dies."""
    import signal
    import sys

    os.setpgrp()
    cfg = RunConfig.model_validate_json(cfg_json)
    import torch

    torch.set_num_threads(cfg.train.torch_threads)

    def watchdog() -> None:
        while True:
            time.sleep(1.0)
            if os.getppid() != parent_pid:  # orphaned: the runner was killed
                os.kill(os.getpid(), signal.SIGINT)
                return

    threading.Thread(target=watchdog, daemon=True).start()
    try:
        run_fn(cfg)
    except KeyboardInterrupt:
        conn.send(("interrupted", ""))
        sys.exit(130)
    except BaseException as e:  # noqa: BLE001 - reported to the runner, which records it
        conn.send(("error", f"{type(e).__name__}: {e}"))
        sys.exit(1)
    conn.send(("ok", ""))


class ChildProcessRun:
    """Runs `run_fn(cfg)` in a fresh spawned interpreter: its own RNG, torch threads and imports, so N
    in-process runs can go at once on N cores. `stop` set -> one SIGINT to the child (the training loop
    stops at once; the run resumes from its last checkpoint next time), SIGKILL after `grace_s`."""

    def __init__(self, run_fn: RunFn, stop: threading.Event, grace_s: float = 30.0, poll_s: float = 0.2):
        self.run_fn, self.stop, self.grace_s, self.poll_s = run_fn, stop, grace_s, poll_s

    def __call__(self, cfg: RunConfig) -> None:
        import multiprocessing as mp
        import signal

        for var in ("OMP_NUM_THREADS", "MKL_NUM_THREADS"):  # read by torch at import in the child
            os.environ.setdefault(var, str(cfg.train.torch_threads))
        ctx = mp.get_context("spawn")
        recv, send = ctx.Pipe(duplex=False)
        proc = ctx.Process(target=_child_main, args=(self.run_fn, cfg.model_dump_json(), send, os.getpid()),
                           name=f"run-{cfg.train.arm}-s{cfg.train.seed}")
        proc.start()
        send.close()
        stopped_at = None
        try:
            while proc.is_alive():
                if self.stop.is_set() and stopped_at is None:
                    stopped_at = time.monotonic()
                    os.kill(proc.pid, signal.SIGINT)
                if stopped_at is not None and time.monotonic() - stopped_at > self.grace_s:
                    proc.kill()
                proc.join(self.poll_s)
        except BaseException:
            if proc.is_alive():
                proc.kill()
            proc.join()
            raise
        status, msg = _child_status(recv)
        if status == "ok" and proc.exitcode == 0:
            return None
        if stopped_at is not None or status == "interrupted":
            raise RunInterrupted(f"stopped (exit {proc.exitcode})")
        raise RuntimeError(msg or f"run process exited with code {proc.exitcode} before reporting its status")


def _child_status(recv) -> tuple[str, str]:
    """The (status, message) the child sent, or ("gone", "") when it exited without sending one: `poll()`
    is also true at end of file (the child's end closed), where `recv()` would raise EOFError."""
    try:
        return recv.recv() if recv.poll() else ("gone", "")
    except EOFError:
        return ("gone", "")
    finally:
        recv.close()


def last_logged_step(run_dir: Path) -> int:
    """Steps completed so far per metrics.jsonl (0 when none); cheap enough to poll every second."""
    return run_progress(run_dir)[0]


def run_progress(run_dir: Path, window: int = 10) -> tuple[int, str]:
    """(steps completed, short 'hack/pass' text over the last `window` steps) from metrics.jsonl.

    Rows carry the 0-based index of the step they completed, so completed = highest step + 1."""
    from analysis.report import read_jsonl

    rows = read_jsonl(Path(run_dir) / "metrics.jsonl")
    if not rows:
        return 0, ""
    done = max(int(r.get("step", -1)) for r in rows) + 1
    recent = rows[-window:]

    def avg(k: str) -> float | None:
        xs = [float(r[k]) for r in recent if isinstance(r.get(k), (int, float))]
        return sum(xs) / len(xs) if xs else None

    h, p = avg("hack_strict"), avg("pass_rate")
    text = "" if h is None or p is None else f"train hack {100 * h:.0f}% pass {100 * p:.0f}%"
    return done, text
