"""Process plumbing shared by the services and the launcher: parent-death signal, SIGTERM handling,
prefixed stdout logging, per-process torch threads.
"""
from __future__ import annotations

import ctypes
import logging
import os
import signal
import sys
import threading

PR_SET_PDEATHSIG = 1


def set_parent_death_signal(sig: int = signal.SIGTERM) -> None:
    """Ask Linux to send `sig` to this process when its parent dies (used as Popen preexec_fn), so a
    kill -9 of the launcher still takes every service down."""
    try:
        libc = ctypes.CDLL("libc.so.6", use_errno=True)
        libc.prctl(PR_SET_PDEATHSIG, int(sig), 0, 0, 0)
    except OSError:  # not Linux: the launcher's own cleanup still runs on a normal exit
        pass


class StopFlag:
    """Set by SIGTERM/SIGINT; service loops check it between blocking reads (which time out every
    ~0.5 s), so a stop takes effect within one batch. If the signal arrives because the parent died
    (PR_SET_PDEATHSIG) the whole process group is killed at once: nobody is left to wait for us."""

    def __init__(self) -> None:
        self.event = threading.Event()
        self.parent = os.getppid()

    def install(self) -> "StopFlag":
        if threading.current_thread() is threading.main_thread():
            signal.signal(signal.SIGTERM, self._handle)
            signal.signal(signal.SIGINT, self._handle)
        return self

    def _handle(self, signum, frame) -> None:
        if os.getppid() != self.parent and os.getpgrp() == os.getpid():
            os.killpg(os.getpgrp(), signal.SIGKILL)  # orphaned: take our own children with us
        if self.event.is_set():  # second signal: stop now
            raise KeyboardInterrupt
        self.event.set()

    def __bool__(self) -> bool:
        return self.event.is_set()

    def wait(self, seconds: float) -> bool:
        return self.event.wait(seconds)


def setup_logging(service: str) -> logging.Logger:
    """One line per event on stdout, prefixed with the service name (the launcher colors/aggregates)."""
    handler = logging.StreamHandler(sys.stdout)
    handler.setFormatter(logging.Formatter(f"%(asctime)s.%(msecs)03d [{service}] %(levelname)s %(message)s",
                                           datefmt="%H:%M:%S"))
    root = logging.getLogger()
    root.handlers[:] = [handler]
    root.setLevel(os.environ.get("RANKGUARD_LOG_LEVEL", "INFO"))
    for noisy in ("httpx", "urllib3", "filelock", "transformers"):
        logging.getLogger(noisy).setLevel(logging.WARNING)
    try:
        sys.stdout.reconfigure(line_buffering=True)
    except AttributeError:
        pass
    return logging.getLogger(service)


def set_torch_threads(n: int) -> None:
    """One small pool per process: several torch processes on few cores otherwise oversubscribe."""
    os.environ.setdefault("OMP_NUM_THREADS", str(n))
    os.environ.setdefault("MKL_NUM_THREADS", str(n))
    os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")
    os.environ.setdefault("HF_HUB_OFFLINE", "1")
    os.environ.setdefault("HF_HUB_DISABLE_PROGRESS_BARS", "1")  # no tqdm bars in service logs
    import torch

    torch.set_num_threads(max(1, n))
    try:
        torch.set_num_interop_threads(1)
    except RuntimeError:  # already set (parallel work started)
        pass


def service_parser(name: str, description: str):
    """Arguments every service takes: `python -m services.<name> --config RUN_DIR/config.json`."""
    import argparse

    p = argparse.ArgumentParser(prog=f"python -m services.{name}", description=description)
    p.add_argument("--config", required=True, help="resolved run config (RUN_DIR/config.json)")
    p.add_argument("--redis-url", default=None,
                   help="redis://host:port/db (default: $RANKGUARD_REDIS_URL, then pipeline.redis_url)")
    p.add_argument("--run-id", default=None, help="key namespace in redis (default: the run dir)")
    return p


def load_service_config(path: str):
    from shared.config import RunConfig

    return RunConfig.load(path)


def run_service(name: str, body) -> int:
    """Common main(): logging, exit codes (0 ok/stopped, 1 crash with the traceback logged, 2 bad input)."""
    log = setup_logging(name)
    try:
        body(log)
        return 0
    except KeyboardInterrupt:
        log.info("stopped")
        return 0
    except ValueError as e:  # ConfigError & friends: one line
        log.error("error: %s", e)
        return 2
    except Exception:  # noqa: BLE001 - log the crash, exit non-zero so the launcher notices
        log.exception("crashed")
        return 1


def exit_now(code: int) -> None:
    """Flush and leave without interpreter teardown: freeing torch/model state at exit took seconds,
    which a clean SIGTERM shutdown should not wait for. Everything the service owns is closed by now."""
    for stream in (sys.stdout, sys.stderr):
        try:
            stream.flush()
        except Exception:  # noqa: BLE001 - a closed pipe
            pass
    logging.shutdown()
    os._exit(code)


HEALTH_ENV = "RANKGUARD_HEALTH_FILE"


def health_file(service: str) -> str:
    return os.environ.get(HEALTH_ENV) or f"/tmp/rankguard-{service}.health"


class Health:
    """Liveness for container healthchecks: the service loop touches a file (at most once a second);
    `rankguard health --service S --max-age N` checks its age."""

    def __init__(self, service: str):
        self.path = health_file(service)
        self._last = 0.0

    def beat(self) -> None:
        import time

        now = time.monotonic()
        if now - self._last >= 1.0:
            self._last = now
            try:
                with open(self.path, "a"):
                    os.utime(self.path, None)
            except OSError:
                pass


def check_health(service: str, max_age_s: float) -> tuple[bool, str]:
    import time

    path = health_file(service)
    try:
        age = time.time() - os.path.getmtime(path)
    except OSError:
        return False, f"{service}: no heartbeat file {path} yet"
    return age <= max_age_s, f"{service}: last heartbeat {age:.1f} s ago (limit {max_age_s:.0f} s)"
