"""`rankguard experiment --backend ray`: every run one Ray task, beyond one box.

Why Ray and not a scheduler of our own: it already places tasks by resources across nodes, notices a
lost node and retries what ran there. Each run is a task asking for the run's resources
(`task_options`: num_gpus = the devices its placement needs, num_cpus = placement.cpus, plus any custom
placement.resources) with `max_retries`, so a task whose node dies is started again on another node. The
task resumes the run from its folder — config.json, metrics and verified checkpoints on storage every
node mounts at the same path — exactly as `rankguard train` / `up` resume (shared.rundir.prepare_run_dir,
learner.checkpoint): rows after the loaded checkpoint are dropped and those steps run again, so every
step is in metrics.jsonl once. Each attempt appends a line (node, pid, devices, rows on disk) to
`<run>/attempts.jsonl`.

No address: an embedded local Ray instance (`ray.init()`, started and stopped with the experiment; it
uses RAY_ADDRESS when that is set). `--ray-address HOST:PORT`: a running cluster (deploy/README.md,
"Placement and scale-out"). Ray workers are separate processes: their runtime_env pins OMP/MKL to one
thread, and forwards RANKGUARD_*, HF_* and VLLM_* variables from the experiment's environment.
"""
from __future__ import annotations

import json
import logging
import os
import threading
import time
from pathlib import Path
from typing import Any, Callable, Mapping

from analysis.runners import Note, RunFn, run_name
from analysis.placement import CPU_HINT, Needs, split
from shared.config import RunConfig

ATTEMPTS_FILE = "attempts.jsonl"
WORKER_ENV = {"OMP_NUM_THREADS": "1", "MKL_NUM_THREADS": "1", "TOKENIZERS_PARALLELISM": "false"}
FORWARD_PREFIXES = ("RANKGUARD_", "HF_", "VLLM_")


class RayBackendError(RuntimeError):
    """Ray is missing, unreachable, or a run was lost more often than its retries allow."""


def import_ray():
    try:
        import ray
    except ImportError:
        raise RayBackendError("--backend ray needs the ray package: pip install 'rankguard[ray]' "
                              "(ray==2.60.0)") from None
    return ray


def runtime_env(environ: Mapping[str, str] | None = None) -> dict:
    """The Ray workers' environment: one OMP/MKL thread, plus the experiment's RANKGUARD_/HF_/VLLM_ vars."""
    environ = os.environ if environ is None else environ
    env = {k: v for k, v in environ.items() if k.startswith(FORWARD_PREFIXES)}
    return {"env_vars": {**env, **WORKER_ENV}}


def task_options(cfg: RunConfig, mode: str, retries: int, environ: Mapping[str, str] | None = None) -> dict:
    """Ray options of one run's task: its resources from the placement config, retries after a lost worker
    or node (never after the run's own exception), and the workers' runtime_env."""
    return {"num_cpus": cfg.placement.cpus, "num_gpus": Needs.of(cfg, mode).total,
            "resources": dict(cfg.placement.resources), "max_retries": retries, "retry_exceptions": False,
            "runtime_env": runtime_env(environ), "name": f"rankguard:{run_name(cfg)}"}


def infeasible(opts: dict, nodes: list[dict]) -> str | None:
    """Why no live node could ever run a task with these options (None: one can)."""
    want = {"CPU": opts.get("num_cpus") or 0, "GPU": opts.get("num_gpus") or 0, **(opts.get("resources") or {})}
    want = {k: float(v) for k, v in want.items() if v}
    alive = [n.get("Resources", {}) for n in nodes if n.get("Alive", True)]
    if any(all(res.get(k, 0.0) >= v for k, v in want.items()) for res in alive):
        return None
    fmt = lambda d: ", ".join(f"{k} {v:g}" for k, v in sorted(d.items()))  # noqa: E731
    have = "; ".join(fmt({k: v for k, v in r.items() if k in want}) or "none of it" for r in alive) or "no live node"
    return f"no Ray node has {fmt(want)} (per node: {have})"


def log_attempt(run_dir: str | Path, attempt: int, event: str, **info: Any) -> None:
    """One line in <run>/attempts.jsonl: an attempt's start (node, devices, steps on disk), the step its
    training resumed at, its end."""
    Path(run_dir).mkdir(parents=True, exist_ok=True)
    with open(Path(run_dir) / ATTEMPTS_FILE, "a") as f:
        f.write(json.dumps({"attempt": attempt, "event": event, "at": round(time.time(), 3), **info}) + "\n")


def read_attempts(run_dir: str | Path) -> list[dict]:
    """Every attempt of a run, its events merged, in order (attempt 1 first)."""
    path = Path(run_dir) / ATTEMPTS_FILE
    merged: dict[int, dict] = {}
    for line in (path.read_text().splitlines() if path.exists() else []):
        try:
            row = json.loads(line)
        except ValueError:
            continue  # a line cut by a node that died mid-write
        event = row.pop("event", "start")
        at = row.pop("at", None)
        merged.setdefault(int(row["attempt"]), {}).update(row, **{event: at})
    return [merged[k] for k in sorted(merged)]


def run_attempt(cfg_json: str, mode: str, cwd: str, run_fn: RunFn | None = None) -> dict:
    """Body of one run's Ray task (on whichever node Ray picked): resume the run in its folder."""
    import ray

    if not os.path.isdir(cwd):
        raise RayBackendError(f"{cwd} (the experiment's working directory) does not exist on this node; run "
                              "the experiment from a folder every node mounts at the same path")
    os.chdir(cwd)  # relative paths in the config (toy world, caches, run dirs) mean the same folder everywhere
    cfg = RunConfig.model_validate_json(cfg_json)
    ctx = ray.get_runtime_context()
    gpus = [str(g) for g in ray.get_gpu_ids()]
    needs = Needs.of(cfg, mode)
    placement = split(needs, gpus, run_name(cfg))
    from analysis.runners import last_logged_step

    rows = last_logged_step(Path(cfg.run_dir))
    n = len(read_attempts(cfg.run_dir)) + 1
    where = {"node_id": ctx.get_node_id(), "node_ip": ray.util.get_node_ip_address(), "pid": os.getpid(),
             "gpus": gpus, "placement": {k: ",".join(v) for k, v in placement.processes.items()}}
    log_attempt(cfg.run_dir, n, "start", steps_on_disk=rows, **where)
    if not logging.getLogger().handlers:  # the learner's "resumed ... at step N" reaches the driver's log
        logging.basicConfig(level=logging.INFO, format="%(asctime)s [%(name)s] %(message)s", datefmt="%H:%M:%S")
    print(f"rankguard: {run_name(cfg)} attempt {n} on node {where['node_ip']} {where['node_id'][:8]} "
          f"(gpus {','.join(gpus) or '-'}): {f'resuming, {rows} step(s) on disk' if rows else 'new run'}", flush=True)
    import torch

    torch.set_num_threads(cfg.train.torch_threads)
    if run_fn is not None:  # a stand-in for the training (tests)
        os.environ.update(placement.env("learner"))
        run_fn(cfg)
    elif mode == "inprocess":
        os.environ.update(placement.env("learner"))  # Ray set the task's devices; the same ones, explicitly
        from learner.trainer import Learner
        from services.sources import run_inprocess

        learner = Learner(cfg, resume=True, progress=False)
        log_attempt(cfg.run_dir, n, "training", resumed_at_step=learner.step)
        run_inprocess(cfg, learner=learner, progress=False)
    else:
        from services.launcher import run_services

        run_services(cfg, resume=True, child_env=placement.env)
    log_attempt(cfg.run_dir, n, "done")
    return {"attempt": n, **where}


class RayRunFn:
    """RunFn of the Ray backend: submit the run's task, wait for it (a stop cancels it), record its attempts."""

    def __init__(self, mode: str, address: str | None = None, retries: int = 3,
                 stop: threading.Event | None = None, note: Note | None = None,
                 say: Callable[[str], None] | None = None, devices: list[str] | None = None,
                 run_fn: RunFn | None = None, poll_s: float = 0.5):
        self.mode, self.address, self.retries = mode, address, retries
        self.stop, self.note, self.say, self.devices, self.run_fn = stop, note, say, devices, run_fn
        self.poll_s = poll_s
        self._lock = threading.Lock()
        self._remote = None
        self._own = False

    def _ensure(self):
        ray = import_ray()
        with self._lock:
            if self._remote is None:
                if not ray.is_initialized():
                    kw: dict[str, Any] = {"include_dashboard": False, "log_to_driver": True}
                    if self.address is None and self.devices is not None:
                        kw["num_gpus"] = len(self.devices)  # the embedded instance uses only these
                        os.environ["CUDA_VISIBLE_DEVICES"] = ",".join(self.devices)
                    try:
                        ray.init(address=self.address, **kw)
                    except (ConnectionError, RuntimeError) as e:
                        raise RayBackendError(f"could not reach Ray at {self.address or 'an embedded instance'}: "
                                              f"{str(e).splitlines()[0] if str(e) else type(e).__name__}") from None
                    self._own = True
                    if self.say:
                        self.say(f"ray: {'connected to ' + self.address if self.address else 'embedded instance'}"
                                 f"; resources {ray.cluster_resources()}")
                self._remote = ray.remote(run_attempt)
        return ray

    def __call__(self, cfg: RunConfig) -> dict:
        ray = self._ensure()
        from analysis.runners import RunInterrupted

        opts = task_options(cfg, self.mode, self.retries)
        why = infeasible(opts, ray.nodes())
        if why and self._own and self.address is None:  # an embedded instance never grows: fail now
            raise RayBackendError(f"{run_name(cfg)} cannot run here: {why}; {CPU_HINT}")
        if why and self.say:
            self.say(f"{run_name(cfg)} waits for a node that has its resources: {why}")
        ref = self._remote.options(**opts).remote(cfg.model_dump_json(), self.mode, os.getcwd(), self.run_fn)
        try:
            while not ray.wait([ref], timeout=self.poll_s)[0]:
                if self.stop is not None and self.stop.is_set():
                    ray.cancel(ref, force=True)
                    raise RunInterrupted("stopped (its Ray task was cancelled)")
            try:
                return ray.get(ref)
            except ray.exceptions.RayTaskError as e:  # the run's own error: not retried, reported as is
                cause = e.cause if getattr(e, "cause", None) is not None else e
                raise RuntimeError(f"{type(cause).__name__}: {cause}") from None
            except ray.exceptions.RayError as e:  # lost node/worker more often than the retries allow
                first = (str(e).strip().splitlines() or [type(e).__name__])[0]
                raise RayBackendError(f"{run_name(cfg)} lost after {self.retries} retries: {first}") from None
        finally:
            if self.note:
                attempts = read_attempts(cfg.run_dir)
                self.note(cfg, {"attempts": [{k: a.get(k) for k in ("attempt", "node_ip", "node_id", "gpus",
                                                                     "steps_on_disk", "resumed_at_step", "done")
                                              if k in a} for a in attempts]})

    def close(self) -> None:
        if self._own:
            import ray

            ray.shutdown()
            self._own = False
