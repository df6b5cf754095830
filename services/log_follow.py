"""`rankguard logs -f SERVICE`: print a service's log as it grows, from before it exists to the run's end.

Started before the run (or before that service) has written anything, it waits for the file. It stops
by itself at the run's finish line: the launcher that owns the run (services.json) has exited, or,
for runs without a launcher (docker compose, `rankguard worker`), the learner wrote DONE; then it
drains what is left and says why it stopped. Ctrl-C stops it any time.
"""
from __future__ import annotations

import json
import re
import time
from pathlib import Path
from typing import Callable, TextIO

from services.redis_server import pid_alive

SERVICE_NAME = re.compile(r"^(learner|up|redis|(rollout|reward)-\d+)$")
POLL_S = 0.2


def finish_line(run_dir: Path) -> str | None:
    """Why the run is over (one phrase), or None while it may still write."""
    state = run_dir / "services.json"
    if state.exists():
        try:
            pid = json.loads(state.read_text()).get("launcher_pid")
        except (OSError, ValueError):
            pid = None
        if isinstance(pid, int):
            if pid_alive(pid):
                return None
            return "the run finished (DONE)" if (run_dir / "DONE").exists() else "the run's launcher exited"
    return "the run finished (DONE)" if (run_dir / "DONE").exists() else None


def follow(path: Path, run_dir: Path, out: TextIO, lines: int = 40, follow: bool = True,
           sleep: Callable[[float], None] = time.sleep, note: Callable[[str], None] = lambda _m: None) -> str:
    """Print the last `lines` lines, then (follow) new ones until the finish line. Returns why it stopped."""
    if not path.exists():
        if not follow:
            return "no log"
        note(f"waiting for {path} ...")
        while not path.exists():
            if finish_line(run_dir) is not None and not path.exists():
                return f"{finish_line(run_dir)} before {path.name} was written"
            sleep(POLL_S)
    with path.open() as f:
        tail = f.readlines()[-lines:] if lines > 0 else []
        out.write("".join(tail))
        out.flush()
        while follow:
            line = f.readline()
            if line:
                out.write(line)
                out.flush()
                continue
            why = finish_line(run_dir)
            if why is not None:
                rest = f.read()  # anything written between the last read and the finish line
                out.write(rest)
                out.flush()
                return why
            sleep(POLL_S)
    return "printed"
