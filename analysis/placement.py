"""GPU placement for `rankguard experiment`: which devices each run gets, and what each of its processes sees.

Pure bookkeeping (no torch, no processes), so it is tested with a fake device list:

- A run asks for counts (`shared.config.PlacementConfig`, `Needs.of`). `DevicePool` hands it that many
  distinct devices that each have a free slot (`runs_per_device` slots per device; the default 1 means no
  device is shared by two runs at once). Devices with the most free slots go first, ties in list order,
  so runs spread over idle devices before any device is doubled up. A run that does not fit waits until
  running runs release theirs.
- `split` gives each process of the run its own share: the learner the first `learner_gpus`, then each
  rollout worker the next `rollout_gpus` (colocated: the rollout workers reuse the learner's devices).
  An in-process run is one process and gets them all. Reward workers and Redis see none.
- `Placement.env(process)` is what enforces it: CUDA_VISIBLE_DEVICES with the process's device ids
  (empty: the process sees no GPU), so every process addresses its first device as cuda:0.
"""
from __future__ import annotations

import os
import threading
from dataclasses import dataclass, field
from typing import Callable, Mapping, Sequence

from shared.config import RunConfig

VISIBLE = "CUDA_VISIBLE_DEVICES"
CPU_HINT = "--set placement.learner_gpus=0 --set placement.rollout_gpus=0 runs it on CPU"


class PlacementError(ValueError):
    """A run that cannot be placed (more devices than the list has, a bad device list); says what to change."""


class PlacementStopped(RuntimeError):
    """The experiment was stopped while a run waited for devices."""


def parse_devices(text: str | Sequence[str] | None) -> list[str] | None:
    """'0,1,3' -> ['0', '1', '3'] (ids as CUDA_VISIBLE_DEVICES takes them: indexes or GPU-UUIDs); '' -> [];
    None stays None (detect)."""
    if text is None:
        return None
    if isinstance(text, str) and not text.strip():
        return []
    items = [str(d).strip() for d in (text.split(",") if isinstance(text, str) else text)]
    if any(not d or any(c.isspace() for c in d) for d in items):
        raise PlacementError(f"bad device list {text!r}; give ids separated by commas, e.g. --devices 0,1,2,3")
    if len(set(items)) != len(items):
        raise PlacementError(f"device list {text!r} names a device twice")
    return items


def detect_devices(environ: Mapping[str, str] | None = None, count: Callable[[], int] | None = None) -> list[str]:
    """This box's devices: CUDA_VISIBLE_DEVICES when set (empty -> none), else torch.cuda.device_count()."""
    environ = os.environ if environ is None else environ
    if VISIBLE in environ:
        return parse_devices(environ[VISIBLE]) or []
    if count is None:
        def count() -> int:
            try:
                import torch
            except ImportError:
                return 0
            return torch.cuda.device_count()
    return [str(i) for i in range(count())]


@dataclass(frozen=True)
class Needs:
    """What one run asks for, from its config and the experiment's mode."""

    learner: int
    rollout: int  # per rollout worker
    rollout_workers: int
    colocate: bool
    inprocess: bool

    @classmethod
    def of(cls, cfg: RunConfig, mode: str) -> "Needs":
        p = cfg.placement
        tp = cfg.vllm.tensor_parallel_size
        if mode != "inprocess" and p.rollout_gpus and tp > p.rollout_gpus:
            raise PlacementError(f"vllm.tensor_parallel_size={tp} needs placement.rollout_gpus >= {tp} "
                                 f"(got {p.rollout_gpus})")
        return cls(p.learner_gpus, p.rollout_gpus, cfg.pipeline.rollout_workers, p.colocate, mode == "inprocess")

    @property
    def total(self) -> int:
        """Devices the run occupies: in-process one process does both jobs; services mode gives the learner
        and every rollout worker their own (or, colocated, lets them share)."""
        if self.inprocess:
            return max(self.learner, self.rollout)
        rollout = self.rollout * self.rollout_workers
        return max(self.learner, rollout) if self.colocate else self.learner + rollout

    def describe(self) -> str:
        if self.inprocess:
            return f"{self.total} GPU(s) for its one in-process run"
        how = "shared" if self.colocate else "own"
        return (f"{self.total} GPU(s): learner {self.learner}, {self.rollout_workers} rollout worker(s) x "
                f"{self.rollout} ({how})")


@dataclass(frozen=True)
class Placement:
    """One run's devices and each of its processes' share (process names as `rankguard up` names them)."""

    run: str
    devices: tuple[str, ...]
    processes: dict[str, tuple[str, ...]] = field(default_factory=dict)

    def env(self, process: str) -> dict[str, str]:
        """The environment that restricts `process` (learner, rollout-0, reward-1 ...) to its devices."""
        kind = process.split("-")[0]
        mine = self.processes.get(process, self.processes.get(kind, ()))
        return {VISIBLE: ",".join(mine)}

    def describe(self) -> str:
        return " ".join(f"{name}={','.join(devs) or '-'}" for name, devs in self.processes.items())


def split(needs: Needs, devices: Sequence[str], run: str = "") -> Placement:
    """Hand a run's devices to its processes (see the module docstring)."""
    devices = tuple(devices)
    if len(devices) < needs.total:
        raise PlacementError(f"run {run or '?'} needs {needs.describe()}, got {len(devices)}: {','.join(devices)}")
    if needs.inprocess:
        return Placement(run, devices[:needs.total], {"learner": devices[:needs.total], "reward": ()})
    procs: dict[str, tuple[str, ...]] = {"learner": devices[:needs.learner]}
    start = 0 if needs.colocate else needs.learner
    for i in range(needs.rollout_workers):
        procs[f"rollout-{i}"] = devices[start + i * needs.rollout:start + (i + 1) * needs.rollout]
    procs["reward"] = ()
    return Placement(run, devices[:needs.total], procs)


class DevicePool:
    """Free slots per device, shared by the experiment's run threads; `acquire` blocks until a run fits."""

    def __init__(self, devices: Sequence[str], runs_per_device: int = 1):
        if runs_per_device < 1:
            raise PlacementError(f"runs per device must be >= 1, got {runs_per_device}")
        self.devices = list(devices)
        self.runs_per_device = runs_per_device
        self.free = {d: runs_per_device for d in self.devices}
        self.events: list[tuple[str, str, tuple[str, ...]]] = []  # ("acquire"|"release", run, devices), in order
        self._cond = threading.Condition()

    def check(self, need: int, run: str) -> None:
        """Fail fast (before anything runs) when a run could never fit."""
        if need > len(self.devices):
            have = f"{len(self.devices)}: {','.join(self.devices)}" if self.devices else "none (no GPU found; " \
                "pass --devices or set CUDA_VISIBLE_DEVICES)"
            hint = f"; {CPU_HINT}" if not self.devices else ""
            raise PlacementError(f"run {run} needs {need} GPU(s), the device list has {have}{hint}")

    def capacity(self, need: int) -> int:
        """Runs of `need` devices that fit at once on an empty pool (0 devices asked: unlimited -> 0)."""
        if need <= 0:
            return 0
        return (len(self.devices) * self.runs_per_device) // need if need <= len(self.devices) else 0

    def try_acquire(self, need: int, run: str) -> tuple[str, ...] | None:
        """`need` distinct devices with a free slot (most free first, then list order), or None."""
        with self._cond:
            order = sorted((d for d in self.devices if self.free[d] > 0),
                           key=lambda d: (-self.free[d], self.devices.index(d)))
            if len(order) < need:
                return None
            got = tuple(sorted(order[:need], key=self.devices.index))
            for d in got:
                self.free[d] -= 1
            self.events.append(("acquire", run, got))
            return got

    def acquire(self, need: int, run: str, stop: threading.Event | None = None, poll_s: float = 0.5,
                on_wait: Callable[[], None] | None = None) -> tuple[str, ...]:
        """Block until the run fits (`on_wait` is called once if it has to wait); a set `stop` ends the wait."""
        self.check(need, run)
        waited = False
        with self._cond:
            while (got := self.try_acquire(need, run)) is None:
                if stop is not None and stop.is_set():
                    raise PlacementStopped(f"stopped while {run} waited for {need} free GPU(s)")
                if not waited and on_wait is not None:
                    on_wait()
                waited = True
                self._cond.wait(poll_s)
            return got

    def release(self, devices: Sequence[str], run: str) -> None:
        with self._cond:
            for d in devices:
                self.free[d] += 1
            self.events.append(("release", run, tuple(devices)))
            self._cond.notify_all()
