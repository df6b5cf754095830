"""Helpers for the end-to-end pipeline and fault tests: a quick toy world, `rankguard up` as a
subprocess, process inspection."""
from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

REPO = Path(__file__).resolve().parents[2]
QUICK_TOY = REPO / ".cache" / "test-toy-quick"

# small and fast: 4 prompts x 4 samples, 12 new tokens, tiny evals
SMALL = ["train.prompts_per_step=4", "sampling.group_size=4", "sampling.max_new_tokens=12",
         "train.eval_every=2", "train.eval_problems=4", "train.eval_samples=2", "train.checkpoint_every=2",
         "reward.workers=1"]


def quick_toy_dir() -> Path:
    """A toy world with the quick warm start (cached across test sessions under .cache/)."""
    import torch

    from reward_server.grader import Grader
    from shared.config import ToyConfig
    from shared.toy.build import QUICK_WARM, build_toy

    torch.set_num_threads(1)
    build_toy(ToyConfig(dir=str(QUICK_TOY), n_train=60, n_eval=16), warm=QUICK_WARM, progress=False,
              make_grader=Grader)
    return QUICK_TOY


def small_sets(toy_dir: Path, **extra) -> list[str]:
    return SMALL + [f"toy.dir={toy_dir}"] + [f"{k}={v}" for k, v in extra.items()]


class Up:
    """`rankguard up` in its own session; output captured to RUN_DIR/../<name>.out."""

    def __init__(self, run_dir: Path, sets: list[str], steps: int, extra_args: list[str] = (),
                 env: dict | None = None):
        self.run_dir = Path(run_dir)
        self.run_dir.parent.mkdir(parents=True, exist_ok=True)
        args = [sys.executable, "-m", "services.cli", "up", "--preset", "toy", "--steps", str(steps),
                "--run-dir", str(run_dir), "--no-progress", *extra_args]
        for s in sets:
            args += ["--set", s]
        self.out_path = self.run_dir.parent / f"{self.run_dir.name}.out"
        self.out = open(self.out_path, "ab")
        self.proc = subprocess.Popen(args, cwd=REPO, stdout=self.out, stderr=subprocess.STDOUT,
                                     start_new_session=True,
                                     env={**os.environ, "RANKGUARD_CLAIM_IDLE_S": "2", "HF_HUB_OFFLINE": "1",
                                          **(env or {})})

    def state(self, timeout: float = 120) -> dict:
        """services.json once every service has been spawned."""
        path = self.run_dir / "services.json"
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            if path.exists():
                try:
                    st = json.loads(path.read_text())
                    if "learner" in st.get("services", {}) and st.get("launcher_pid") == self.proc.pid:
                        return st
                except json.JSONDecodeError:
                    pass
            if self.proc.poll() is not None:
                raise AssertionError(f"launcher exited {self.proc.returncode}:\n{self.output()[-3000:]}")
            time.sleep(0.1)
        raise AssertionError(f"no services.json after {timeout} s:\n{self.output()[-3000:]}")

    def wait_for_log(self, service: str, text: str, timeout: float = 180) -> None:
        path = self.run_dir / "logs" / f"{service}.log"
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            if path.exists() and text in path.read_text(errors="replace"):
                return
            if self.proc.poll() is not None:
                raise AssertionError(f"launcher exited {self.proc.returncode} before {service} logged "
                                     f"{text!r}:\n{self.output()[-3000:]}")
            time.sleep(0.1)
        raise AssertionError(f"{service} did not log {text!r} in {timeout} s:\n{self.output()[-3000:]}")

    def wait_rows(self, n: int, timeout: float = 240) -> None:
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            if len(metrics(self.run_dir)) >= n:
                return
            if self.proc.poll() is not None:
                raise AssertionError(f"launcher exited {self.proc.returncode}:\n{self.output()[-3000:]}")
            time.sleep(0.1)
        raise AssertionError(f"fewer than {n} metrics rows after {timeout} s:\n{self.output()[-3000:]}")

    def wait(self, timeout: float = 300) -> int:
        try:
            return self.proc.wait(timeout)
        except subprocess.TimeoutExpired:
            self.kill()
            raise AssertionError(f"launcher still running after {timeout} s:\n{self.output()[-3000:]}") from None

    def output(self) -> str:
        self.out.flush()
        return self.out_path.read_text(errors="replace")

    def kill(self) -> None:
        if self.proc.poll() is None:
            os.killpg(self.proc.pid, signal.SIGKILL)
            self.proc.wait()
        st_path = self.run_dir / "services.json"
        if st_path.exists():
            st = json.loads(st_path.read_text())
            for pid in [*st["services"].values(), st.get("redis_pid")]:
                if pid:
                    kill_group_quietly(pid)


def kill_group_quietly(pid: int) -> None:
    for fn in (lambda: os.killpg(pid, signal.SIGKILL), lambda: os.kill(pid, signal.SIGKILL)):
        try:
            fn()
        except (ProcessLookupError, PermissionError):
            pass


def metrics(run_dir: Path, name: str = "metrics.jsonl") -> list[dict]:
    path = Path(run_dir) / name
    if not path.exists():
        return []
    rows = []
    for line in path.read_text().splitlines():
        try:
            rows.append(json.loads(line))
        except json.JSONDecodeError:
            pass
    return rows


def alive(pid: int) -> bool:
    """True for a live, non-zombie process."""
    try:
        with open(f"/proc/{pid}/stat") as f:
            return f.read().rsplit(")", 1)[1].split()[0] != "Z"
    except FileNotFoundError:
        return False


def group_members(pgid: int) -> list[int]:
    out = []
    for d in os.listdir("/proc"):
        if d.isdigit():
            try:
                with open(f"/proc/{d}/stat") as f:
                    fields = f.read().rsplit(")", 1)[1].split()
                if int(fields[2]) == pgid and fields[0] != "Z":
                    out.append(int(d))
            except (FileNotFoundError, ProcessLookupError, IndexError):
                pass
    return out


def wait_all_dead(pids: list[int], timeout: float = 15) -> list[int]:
    """Wait until no process in these process groups is alive; returns the survivors."""
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        left = [p for p in pids if alive(p) or group_members(p)]
        if not left:
            return []
        time.sleep(0.1)
    return [p for p in pids if alive(p) or group_members(p)]


def consumer_pid(consumer: str) -> int:
    return int(consumer.rsplit("-", 1)[1])


def stop_until_holding(redis_client, stream_key: str, group: str, pid: int, timeout: float = 60) -> None:
    """SIGSTOP `pid` while it is blocked reading, and keep it stopped once Redis has handed it a
    message (pending for its consumer): it now holds work mid-batch and cannot finish it."""
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        os.kill(pid, signal.SIGSTOP)
        t_end = time.monotonic() + 2.0
        while time.monotonic() < t_end:
            try:
                for c in redis_client.xinfo_consumers(stream_key, group):
                    name = c["name"].decode() if isinstance(c["name"], bytes) else c["name"]
                    if consumer_pid(name) == pid and c["pending"] > 0:
                        return
            except Exception:  # noqa: BLE001 - group not created yet
                pass
            time.sleep(0.02)
        os.kill(pid, signal.SIGCONT)
        time.sleep(0.05)
    raise AssertionError(f"process {pid} never held a message of {stream_key}")
