"""How `rankguard experiment` hands out its runs: the local backend on this box's devices, or Ray.

The Experiment's run threads call one RunFn per run; `Dispatch` decides what that RunFn does:

- local, no devices (a CPU box, nothing asked): as before — in one thread (services: a process tree;
  in-process: this interpreter, or a spawned one per run when several go at once);
- local with devices (`--devices`, CUDA_VISIBLE_DEVICES, or torch.cuda.device_count): each run first takes
  its devices from a `DevicePool` (waiting while they are busy), then runs with every process restricted
  to its share (analysis.placement): services get a per-service CUDA_VISIBLE_DEVICES, an in-process run
  a spawned interpreter with its devices;
- ray: each run a Ray task with the run's resources, retried after a node loss (analysis.ray_backend).

It also says how many runs to keep in flight (`parallel`): with devices, as many as fit at once unless
--parallel says otherwise; with Ray, every run (Ray queues them by resources).
"""
from __future__ import annotations

import os
import threading
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Callable, Sequence

from analysis.placement import DevicePool, Needs, Placement, PlacementError, detect_devices, split
from analysis.runners import Note, RunFn, run_name  # noqa: F401 - re-exported
from shared.config import RunConfig

BACKENDS = ("local", "ray")
Runner = Callable[[RunConfig, Placement], Any]  # one run on its placement


@dataclass(frozen=True)
class EnvRun:
    """`run_fn(cfg)` after `os.environ.update(env)`: what a spawned run process executes first, before
    anything initialises CUDA (which reads CUDA_VISIBLE_DEVICES once)."""

    run_fn: RunFn
    env: dict[str, str]

    def __call__(self, cfg: RunConfig) -> Any:
        os.environ.update(self.env)
        return self.run_fn(cfg)


class PlacedRun:
    """RunFn of the local backend with devices: take the run's devices from the pool (blocking while they
    are busy), hand them to its processes, run, give them back."""

    def __init__(self, pool: DevicePool, mode: str, runner: Runner, stop: threading.Event | None = None,
                 note: Note | None = None, say: Callable[[str], None] | None = None):
        self.pool, self.mode, self.runner, self.stop = pool, mode, runner, stop
        self.note, self.say = note, say

    def __call__(self, cfg: RunConfig) -> Any:
        name = run_name(cfg)
        needs = Needs.of(cfg, self.mode)
        wait = (lambda: self.say(f"{name} waits for {needs.total} free GPU(s)")) if self.say else None
        devices = self.pool.acquire(needs.total, name, self.stop, on_wait=wait)
        try:
            placement = split(needs, devices, name)
            if self.note:
                self.note(cfg, {"devices": list(placement.devices),
                                "placement": {k: ",".join(v) for k, v in placement.processes.items()}})
            if self.say:
                self.say(f"{name} on GPU(s) {','.join(devices) or '-'}: {placement.describe()}")
            return self.runner(cfg, placement)
        finally:
            self.pool.release(devices, name)


def services_runner(stop: threading.Event | None) -> Runner:
    """A run through the services, each service seeing only its devices."""
    def run(cfg: RunConfig, placement: Placement) -> Any:
        from services.launcher import run_services

        return run_services(cfg, resume=True, stop=stop, child_env=placement.env)
    return run


def inprocess_runner(run_fn: RunFn, stop: threading.Event) -> Runner:
    """An in-process run in a spawned interpreter that sees only the run's devices."""
    def run(cfg: RunConfig, placement: Placement) -> Any:
        from analysis.runners import ChildProcessRun

        return ChildProcessRun(EnvRun(run_fn, placement.env("learner")), stop)(cfg)
    return run


@dataclass
class Dispatch:
    """The backend of one experiment invocation: what each run thread calls, and how many run at once."""

    backend: str = "local"
    mode: str = "inprocess"
    parallel: int = 1
    pool: DevicePool | None = None
    ray_address: str | None = None
    ray_retries: int = 3
    devices: list[str] | None = None
    _closers: list[Callable[[], None]] = field(default_factory=list)

    @classmethod
    def plan(cls, cfgs: Sequence[RunConfig], mode: str, backend: str = "local", parallel: int | None = None,
             default_parallel: int = 1, devices: Sequence[str] | None = None, runs_per_device: int = 1,
             ray_address: str | None = None, ray_retries: int = 3) -> "Dispatch":
        """Check every run can be placed (fail fast, before any prepare) and size `parallel`."""
        if backend not in BACKENDS:
            raise PlacementError(f"unknown backend {backend!r}; valid backends: {', '.join(BACKENDS)}")
        if ray_address and backend != "ray":
            raise PlacementError("--ray-address needs --backend ray")
        if ray_retries < 0:
            raise PlacementError(f"ray retries must be >= 0, got {ray_retries}")
        needs = {run_name(c): Needs.of(c, mode).total for c in cfgs}
        if backend == "ray":
            import importlib.util

            if importlib.util.find_spec("ray") is None:
                raise PlacementError("--backend ray needs the ray package: pip install 'rankguard[ray]' (ray==2.60.0)")
            n = len(cfgs) if parallel is None else parallel
            return cls("ray", mode, max(n, 1), None, ray_address, ray_retries,
                       list(devices) if devices is not None else None)
        found = list(devices) if devices is not None else detect_devices()
        if not found and not any(needs.values()):
            return cls("local", mode, parallel or default_parallel)  # a CPU box: runs go as before
        pool = DevicePool(found, runs_per_device)
        for name, need in needs.items():
            pool.check(need, name)
        wanted = [n for n in needs.values() if n > 0]
        fit = pool.capacity(max(wanted)) if wanted else 0
        n = parallel if parallel is not None else (fit or default_parallel)
        return cls("local", mode, max(n, 1), pool, devices=found)

    def run_fn(self, run_fn: RunFn | None, stop: threading.Event, note: Note | None = None,
               say: Callable[[str], None] | None = None, progress: bool = False) -> RunFn:
        """What each run thread calls. `run_fn` (tests: a fake trainer) replaces the real training; with
        devices or Ray it still runs where and as the backend says."""
        from analysis.runners import ChildProcessRun, InProcessRun, default_run_fn

        if self.backend == "ray":
            from analysis.ray_backend import RayRunFn

            fn = RayRunFn(self.mode, address=self.ray_address, retries=self.ray_retries, stop=stop, note=note,
                          say=say, devices=self.devices, run_fn=run_fn)
            self._closers.append(fn.close)
            return fn
        if self.pool is None:
            if self.mode == "inprocess" and self.parallel > 1:  # N interpreters, never N runs in one
                return ChildProcessRun(run_fn or InProcessRun(progress=False), stop)  # no N tqdm bars
            return run_fn or default_run_fn(self.mode, progress=progress, stop=stop)
        if self.mode == "inprocess":  # always a child: this process may have initialised CUDA in prepare
            runner = inprocess_runner(run_fn or InProcessRun(progress=False), stop)
        elif run_fn is not None:
            runner = lambda cfg, placement: run_fn(cfg)  # noqa: E731 - an injected services stand-in
        else:
            runner = services_runner(stop)
        return PlacedRun(self.pool, self.mode, runner, stop, note, say)

    def record(self) -> dict:
        """What experiment.json says about the dispatch."""
        out: dict[str, Any] = {"backend": self.backend}
        if self.pool is not None:
            out.update(devices=list(self.pool.devices), runs_per_device=self.pool.runs_per_device)
        if self.backend == "ray":
            out.update(ray_address=self.ray_address or "embedded", ray_retries=self.ray_retries)
        return out

    def close(self) -> None:
        while self._closers:
            self._closers.pop()()

