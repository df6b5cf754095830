"""`rankguard up`: one run as separate processes - private Redis, reward worker(s), rollout worker(s),
learner - with one combined, prefixed log, a progress bar, and a clean shutdown.

Every child runs in its own process group with PR_SET_PDEATHSIG, so Ctrl-C, a crash of any part, or
even a kill -9 of the launcher leaves no orphans: the launcher SIGTERMs each group, SIGKILLs it after a
grace period, and a child whose launcher vanished kills its own group. The run succeeds when the
learner exits 0. A crashed rollout/reward worker is restarted, like compose's `restart: on-failure`,
up to `restart_workers` times each (a log line every time; its unacked work is taken over from Redis);
one that exits 2 (bad input: a restart cannot help) or runs out of restarts fails the run, as does
the learner dying; the exit code is then non-zero.

The run dir is prepared first (shared.rundir): resume by default, config drift refused, and a fresh
start moves an earlier run aside instead of deleting it.
"""
from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import threading
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import IO, Callable

from shared.config import RunConfig
from shared.rundir import lock_run_dir, prepare_run_dir

from .procs import set_parent_death_signal
from .queues import REDIS_URL_ENV, RUN_ID_ENV, run_id_for

COLORS = {"learner": "\033[35m", "rollout": "\033[36m", "reward": "\033[33m", "redis": "\033[31m", "up": "\033[32m"}
RESET = "\033[0m"
REDIS_RESTARTS = 3  # a dead private redis is restarted (same port, AOF) this many times; services reconnect
WORKER_RESTARTS = 3  # default restarts per crashed rollout/reward worker (0: the first crash fails the run)
BAD_INPUT_EXIT = 2  # services.procs.run_service: bad config/input; restarting would fail the same way
MODULES = {"learner": "services.learner_service", "rollout": "services.rollout_service",
           "reward": "services.reward_worker"}


class PipelineError(RuntimeError):
    """A service of the run failed; the message names it and its exit code."""


@dataclass
class Child:
    name: str  # learner | rollout-0 | reward-1 ...
    argv: list[str]
    proc: subprocess.Popen | None = None
    restarts: int = 0
    pump: threading.Thread | None = None
    started: float = field(default_factory=time.monotonic)

    @property
    def kind(self) -> str:
        return self.name.split("-")[0]


def service_argv(kind: str, config_path: str | Path, extra: list[str] | None = None) -> list[str]:
    return [sys.executable, "-m", MODULES[kind], "--config", str(config_path)] + list(extra or [])


def kill_group(pid: int, sig: int) -> None:
    try:
        os.killpg(pid, sig)
    except (ProcessLookupError, PermissionError):
        pass


class Launcher:
    def __init__(self, cfg: RunConfig, resume: bool = True, console: bool = True, progress: bool = True,
                 restart_workers: int = WORKER_RESTARTS, grace_s: float = 10.0, http_port: int | None = None,
                 http_host: str = "127.0.0.1",
                 on_line: Callable[[str, str], None] | None = None, stop: threading.Event | None = None,
                 child_env: Callable[[str], dict[str, str]] | None = None):
        """resume=False: start over, moving an earlier run in the run dir aside (shared.rundir).
        stop: set it (from another thread) to shut the run down as Ctrl-C would (exit code 130).
        child_env: extra environment per service name (learner, rollout-0, reward-1 ...), e.g. the
        CUDA_VISIBLE_DEVICES of the run's placement (analysis.placement.Placement.env)."""
        if restart_workers < 0:
            raise ValueError(f"restart_workers must be >= 0, got {restart_workers}")
        self.cfg = cfg
        self.stop = stop
        self.run_dir = Path(cfg.run_dir)
        self.resume, self.console, self.show_progress = resume, console, progress and console
        self.restart_workers, self.grace_s, self.http_port = restart_workers, grace_s, http_port
        self.http_host = http_host
        self.on_line = on_line
        self.child_env = child_env
        self.env: dict[str, str] = {}
        self.children: list[Child] = []
        self.redis = None
        self.redis_url: str | None = None
        self.failed: list[str] = []
        self._stop_signal: int | None = None
        self._lock = threading.Lock()
        self._color = console and sys.stdout.isatty()
        self._bar = None
        self._up_log: IO[str] | None = None
        self.redis_restarts = 0

    # -- output -------------------------------------------------------------------------------------
    def _emit(self, name: str, line: str, log_file: IO[str] | None = None) -> None:
        if log_file is not None:
            log_file.write(line + "\n")
            log_file.flush()
        if self.on_line:
            self.on_line(name, line)
        if not self.console:
            return
        kind = name.split("-")[0]
        prefix = f"{name:>9} | "
        text = f"{COLORS.get(kind, '')}{prefix}{RESET}{line}" if self._color else prefix + line
        with self._lock:
            if self._bar is not None:
                self._bar.write(text, file=sys.stdout)
            else:
                print(text, flush=True)

    def say(self, msg: str) -> None:
        self._emit("up", time.strftime("%H:%M:%S ") + msg, self._up_log)

    def _pump(self, child: Child) -> None:
        with open(self.run_dir / "logs" / f"{child.name}.log", "a") as f:
            for raw in iter(child.proc.stdout.readline, b""):
                self._emit(child.name, raw.decode(errors="replace").rstrip("\n"), f)

    # -- start --------------------------------------------------------------------------------------
    def start(self) -> None:
        self.run_lock = lock_run_dir(self.run_dir, "rankguard up")  # a second `up` on this dir stops here
        from learner.tracking import check_trackers

        check_trackers(self.cfg.tracking)  # a missing tracker stops here, not in the learner minutes later
        if self.http_port:
            from reward_server.access import check_exposure, load_token

            check_exposure(self.http_host, load_token())  # the workers inherit $RANKGUARD_REWARD_TOKEN
        prepared = prepare_run_dir(self.cfg, "resume" if self.resume else "fresh")  # before anything is written
        self.cfg = prepared.config
        (self.run_dir / "logs").mkdir(parents=True, exist_ok=True)
        self._up_log = open(self.run_dir / "logs" / "up.log", "a")
        self.say(prepared.message())
        from reward_server.grader import Grader
        from shared.toy.build import ensure_toy_world

        ensure_toy_world(self.cfg, make_grader=Grader)
        from shared.problems import check_problem_sets

        for warning in check_problem_sets(self.cfg):  # a missing set stops here, not in a restarting worker
            self.say(f"warning: {warning}")
        config_path = self.run_dir / "config.json"
        self.redis_url = self.cfg.pipeline.redis_url
        if not self.redis_url:
            from .redis_server import RedisServer

            self.redis = RedisServer(self.run_dir / "redis")
            self.redis_url = self.redis.start()
            self.say(f"private redis on {self.redis_url} (data {self.redis.data_dir}, AOF on)")
        self.env = {**os.environ, REDIS_URL_ENV: self.redis_url, RUN_ID_ENV: run_id_for(self.cfg.run_dir),
                    "PYTHONUNBUFFERED": "1", "HF_HUB_OFFLINE": os.environ.get("HF_HUB_OFFLINE", "1"),
                    "OMP_NUM_THREADS": str(self.cfg.train.torch_threads),
                    "MKL_NUM_THREADS": str(self.cfg.train.torch_threads), "TOKENIZERS_PARALLELISM": "false",
                    "HF_HUB_DISABLE_PROGRESS_BARS": "1"}
        p = self.cfg.pipeline
        for i in range(p.reward_workers):
            extra = ["--http-port", str(self.http_port + i), "--http-host", self.http_host] if self.http_port else []
            self.children.append(Child(f"reward-{i}", service_argv("reward", config_path, extra)))
        for i in range(p.rollout_workers):
            self.children.append(Child(f"rollout-{i}", service_argv("rollout", config_path)))
        # the learner always resumes: after a fresh start the prepared run dir holds nothing to resume
        self.children.append(Child("learner", service_argv("learner", config_path)))
        for c in self.children:
            self._spawn(c)
        self._write_state()
        if self.child_env:
            self.say("devices (CUDA_VISIBLE_DEVICES): " + ", ".join(
                f"{c.name}={self.child_env(c.name).get('CUDA_VISIBLE_DEVICES') or '-'}" for c in self.children))
        self.say(f"run {self.run_dir}: {p.reward_workers} reward, {p.rollout_workers} rollout worker(s), "
                 f"learner ({self.cfg.train.arm}, seed {self.cfg.train.seed}, {self.cfg.train.steps} steps)")

    def env_for(self, name: str) -> dict[str, str]:
        """The environment service `name` starts with: the run's, plus its own part (its devices)."""
        return {**self.env, **(self.child_env(name) if self.child_env else {})}

    def _spawn(self, child: Child) -> None:
        child.proc = subprocess.Popen(child.argv, stdin=subprocess.DEVNULL, stdout=subprocess.PIPE,
                                      stderr=subprocess.STDOUT, env=self.env_for(child.name), start_new_session=True,
                                      preexec_fn=set_parent_death_signal)
        child.started = time.monotonic()
        child.pump = threading.Thread(target=self._pump, args=(child,), daemon=True, name=f"log-{child.name}")
        child.pump.start()

    def _write_state(self) -> None:
        state = {"launcher_pid": os.getpid(), "redis_url": self.redis_url, "run_id": run_id_for(self.cfg.run_dir),
                 "redis_pid": self.redis.proc.pid if self.redis else None,
                 "services": {c.name: c.proc.pid for c in self.children if c.proc}}
        (self.run_dir / "services.json").write_text(json.dumps(state, indent=1))

    # -- supervise ----------------------------------------------------------------------------------
    def _on_signal(self, signum, frame) -> None:
        self._stop_signal = signum

    def wait(self) -> int:
        """Supervise until the learner finishes, something fails, or we are signalled. Returns the exit code."""
        previous = {}
        if threading.current_thread() is threading.main_thread():
            for sig in (signal.SIGINT, signal.SIGTERM):
                previous[sig] = signal.signal(sig, self._on_signal)
        bar = self._open_bar()
        rc = 0
        try:
            while True:
                if self._stop_signal is None and self.stop is not None and self.stop.is_set():
                    self._stop_signal = signal.SIGINT
                if self._stop_signal is not None:
                    self.say(f"got {signal.Signals(self._stop_signal).name}; shutting down")
                    rc = 128 + self._stop_signal
                    break
                learner = next(c for c in self.children if c.name == "learner")
                if learner.proc.poll() is not None:
                    if learner.proc.returncode != 0:
                        self.failed.append(f"learner (exit {learner.proc.returncode})")
                        rc = 1
                    break
                dead = [c for c in self.children if c.name != "learner" and c.proc.poll() is not None]
                for c in dead:
                    code = c.proc.returncode
                    if code != BAD_INPUT_EXIT and c.restarts < self.restart_workers:
                        c.restarts += 1
                        self.say(f"{c.name} exited with {code}; restarting ({c.restarts}/{self.restart_workers})")
                        kill_group(c.proc.pid, signal.SIGKILL)  # grandchildren of the dead one
                        self._spawn(c)
                        self._write_state()
                    else:
                        why = ("bad input, not restarted" if code == BAD_INPUT_EXIT
                               else f"{c.restarts}/{self.restart_workers} restarts used")
                        self.failed.append(f"{c.name} (exit {code}; {why})")
                if self.failed:
                    rc = 1
                    break
                if self.redis is not None and self.redis.proc.poll() is not None:
                    code = self.redis.proc.returncode
                    if self.redis_restarts >= REDIS_RESTARTS:
                        self.failed.append(f"redis (exit {code})")
                        rc = 1
                        break
                    self.redis_restarts += 1
                    self.say(f"redis exited with {code}; restarting it on the same port from its AOF "
                             f"({self.redis_restarts}/{REDIS_RESTARTS})")
                    self.redis.start()
                    self._write_state()
                self._update_bar(bar)
                time.sleep(0.2)
        finally:
            self._update_bar(bar)
            self.shutdown()
            self._close_bar()
            for sig, handler in previous.items():
                signal.signal(sig, handler)
        if self.failed:
            self.say("FAILED: " + ", ".join(self.failed) + f"; logs in {self.run_dir / 'logs'}")
        elif rc == 0:
            self.say(f"done: {self.run_dir}")
        return rc

    def shutdown(self) -> None:
        """SIGTERM every service group, SIGKILL what is left after the grace period, then stop Redis."""
        live = [c for c in self.children if c.proc is not None]
        for c in live:
            if c.proc.poll() is None:
                kill_group(c.proc.pid, signal.SIGTERM)
        deadline = time.monotonic() + self.grace_s
        for c in live:
            try:
                c.proc.wait(max(0.0, deadline - time.monotonic()))
            except subprocess.TimeoutExpired:
                self.say(f"{c.name} ignored SIGTERM for {self.grace_s:.0f} s; killing")
            kill_group(c.proc.pid, signal.SIGKILL)  # also any grandchildren left in the group
            try:
                c.proc.wait(5)
            except subprocess.TimeoutExpired:
                pass
        for c in live:
            if c.pump is not None:
                c.pump.join(timeout=2)
        if self.redis is not None:
            self.redis.stop()
        if getattr(self, "run_lock", None) is not None:
            self.run_lock.release()

    # -- progress -----------------------------------------------------------------------------------
    def _open_bar(self):
        if not self.show_progress:
            return None
        from tqdm import tqdm

        self._bar = tqdm(total=self.cfg.train.steps, desc=f"{self.cfg.train.arm} s{self.cfg.train.seed}",
                         dynamic_ncols=True, file=sys.stderr, leave=True)
        return self._bar

    def _close_bar(self) -> None:
        if self._bar is not None:
            with self._lock:
                self._bar.close()
                self._bar = None

    def _update_bar(self, bar) -> None:
        if bar is None:
            return
        rows = read_rows(self.run_dir / "metrics.jsonl")
        if not rows:
            return
        recent = rows[-10:]

        def mean(k):
            vals = [r.get(k) for r in recent if r.get(k) is not None]
            return sum(vals) / len(vals) if vals else float("nan")

        with self._lock:
            bar.n = min(self.cfg.train.steps, rows[-1].get("step", 0) + 1)
            bar.set_postfix({"hack": f"{mean('hack_strict'):.0%}", "pass": f"{mean('pass_rate'):.0%}",
                             "r": f"{mean('reward_mean'):.2f}"}, refresh=False)
            bar.refresh()


def read_rows(path: Path) -> list[dict]:
    if not path.exists():
        return []
    out = []
    for line in path.read_text().splitlines():
        try:
            out.append(json.loads(line))
        except json.JSONDecodeError:
            pass  # a line being written
    return out


def launch(cfg: RunConfig, resume: bool = True, **kw) -> int:
    """Start a run's services, supervise them, shut down; returns the exit code."""
    launcher = Launcher(cfg, resume=resume, **kw)
    try:
        launcher.start()
    except BaseException:
        launcher.shutdown()
        raise
    return launcher.wait()


def run_services(cfg: RunConfig, resume: bool = True, console: bool = False, **kw) -> Path:
    """What the experiment runner calls: one arm x seed through the distributed pipeline. Returns the
    run dir (metrics.jsonl, evals.jsonl, summary.json, DONE); raises PipelineError when a service failed."""
    launcher = Launcher(cfg, resume=resume, console=console, **kw)
    try:
        launcher.start()
    except BaseException:
        launcher.shutdown()
        raise
    rc = launcher.wait()
    if rc != 0:
        raise PipelineError(f"run {cfg.run_dir} failed ({'; '.join(launcher.failed) or f'exit {rc}'}); "
                            f"see {Path(cfg.run_dir) / 'logs'}")
    return Path(cfg.run_dir)
