"""The vLLM child-process plumbing without vLLM: protocol errors, clean close, death with the parent."""
import os
import signal
import subprocess
import sys
import textwrap
import time

import pytest

from rollout.vllm_engine import _spawn_child, _stop_child


def _alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    try:  # a zombie (exited, not yet reaped) counts as dead
        with open(f"/proc/{pid}/stat") as f:
            return f.read().split(")")[-1].split()[0] != "Z"
    except FileNotFoundError:
        return False


def test_child_answers_errors_and_closes(tmp_path):
    proc, conn = _spawn_child(tmp_path / "child.log")
    try:
        conn.send(("generate", []))
        assert conn.poll(60)
        kind, msg, tb = conn.recv()
        assert kind == "error" and msg == "RuntimeError: 'generate' before 'start'" and "Traceback" in tb
        conn.send(("frobnicate",))
        kind, msg, _ = conn.recv()
        assert msg == "RuntimeError: 'frobnicate' before 'start'"
    finally:
        _stop_child(proc, conn)
    assert proc.returncode == 0  # "close" ends it with os._exit(0), no interpreter teardown


def test_child_dies_with_its_parent(tmp_path):
    """A parent killed with SIGKILL (no cleanup at all) still takes the engine child with it."""
    script = textwrap.dedent("""
        import sys, time
        from rollout.vllm_engine import _spawn_child
        proc, conn = _spawn_child(sys.argv[1])
        conn.send(("ping",)); conn.recv()  # the child is up and serving
        print(proc.pid, flush=True)
        time.sleep(600)
    """)
    parent = subprocess.Popen([sys.executable, "-c", script, str(tmp_path / "child.log")], stdout=subprocess.PIPE,
                              text=True)
    try:
        child_pid = int(parent.stdout.readline())
        assert _alive(child_pid)
        parent.send_signal(signal.SIGKILL)
        parent.wait(10)
        deadline = time.monotonic() + 10
        while _alive(child_pid) and time.monotonic() < deadline:
            time.sleep(0.1)
        assert not _alive(child_pid), "engine child outlived its parent"
    finally:
        if parent.poll() is None:
            parent.kill()


@pytest.mark.parametrize("payload", ["not a tuple", ("start",)])
def test_child_start_failure_is_one_line(tmp_path, payload):
    proc, conn = _spawn_child(tmp_path / "child.log")
    try:
        conn.send(payload)
        assert conn.poll(60)
        kind, msg, _ = conn.recv()
        assert kind == "error" and "\n" not in msg
    finally:
        _stop_child(proc, conn)
