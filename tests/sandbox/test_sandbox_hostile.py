"""Hostile programs against the sandbox: each gets a clear verdict and the server keeps serving.

Runs in every isolation mode this machine offers (namespaces needs root; fallback always works).
All cases run once per mode in parallel (module fixture); each test then checks one verdict.
"""
from __future__ import annotations

import os
import socket
import threading
import uuid
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import pytest

from reward_server import judge
from reward_server.grader import EMPTY_PROGRAM, ProblemChecks, compile_program
from reward_server.sandbox import REPO_ROOT, ExecJob, SandboxConfig, SandboxPool, bwrap_works
from shared.problems import Problem

TINY = Problem(
    id="tiny-add", question="add two numbers", func_name="Solution().add", setup_code="from typing import *",
    gt_answer=["assert Solution().add(1, 2) == 3", "assert Solution().add(2, 2) == 4"],
    canonical_solution="class Solution:\n    def add(self, a, b):\n        return a + b\n",
)
GOOD = TINY.canonical_solution
CK = ProblemChecks(TINY)
ESCAPE = f"/tmp/rankguard-escape-{uuid.uuid4().hex}"
SECRET = REPO_ROOT / "reward_server" / "grader.py"


def _listener() -> int:
    srv = socket.socket()
    srv.bind(("127.0.0.1", 0))
    srv.listen(8)

    def accept():
        while True:
            try:
                c, _ = srv.accept()
                c.close()
            except OSError:
                return

    threading.Thread(target=accept, daemon=True).start()
    return srv.getsockname()[1]


PORT = _listener()

# name -> (program, check(res, passed, n) -> bool, what it means)
CASES: dict[str, tuple[str, object]] = {
    "infinite_loop": ("while True:\n    pass\n", lambda r, p: r.timed_out and p == 0),
    "infinite_loop_in_method": (
        "class Solution:\n    def add(self, a, b):\n        while True:\n            pass\n",
        lambda r, p: r.timed_out and p == 0),
    "sleep_forever": ("import time\ntime.sleep(1000)\n", lambda r, p: r.timed_out and p == 0),
    "fork_bomb": (
        "import os\nwhile True:\n    try:\n        os.fork()\n    except Exception:\n        pass\n",
        lambda r, p: p == 0 and r.error is None),
    "daemon_escape": (
        "import os, time\nif os.fork() == 0:\n    os.setsid()\n    time.sleep(60)\n" + GOOD,
        lambda r, p: r.error is None),
    "memory_bomb": ("x = bytearray(8 << 30)\n", lambda r, p: p == 0 and "MemoryError" in r.stderr),
    "memory_creep": ("a = []\nwhile True:\n    a.append(' ' * 10**7)\n", lambda r, p: p == 0 and not r.error),
    "fork_memory_bomb": ("import os\nfor i in range(5):\n    try:\n        if os.fork() == 0:\n            break\n"
                         "    except Exception:\n        pass\nx = b'x' * (600 << 20)\nimport time\ntime.sleep(5)\n",
                         lambda r, p: p == 0 and r.error is None),
    "output_flood": ("import sys\nwhile True:\n    sys.stdout.write('x' * 65536)\n",
                     lambda r, p: p == 0 and r.stdout_bytes <= 4 << 20 and len(r.stdout) < 20000),
    "stderr_flood": ("import sys\nwhile True:\n    sys.stderr.write('y' * 65536)\n",
                     lambda r, p: p == 0 and len(r.stderr) < 20000),
    "kill_parent": ("import os, signal\nfor pid in (os.getppid(), 1):\n    try:\n        os.kill(pid, 9)\n"
                    "    except Exception as e:\n        print('kill', pid, type(e).__name__)\n" + GOOD,
                    lambda r, p: r.error is None),
    "kill_group_and_all": ("import os\ntry:\n    os.kill(-1, 9)\nexcept Exception:\n    pass\nos.killpg(0, 9)\n",
                           lambda r, p: p == 0 and r.error is None),
    "read_server_code": (f"try:\n    open({str(SECRET)!r}).read()\n    print('READ_OK')\nexcept Exception as e:\n"
                         "    print('READ_DENIED', type(e).__name__)\n" + GOOD,
                         lambda r, p: "READ_OK" not in r.stdout and "READ_DENIED" in r.stdout and p == 2),
    "read_problem_file": (f"try:\n    open({str(REPO_ROOT / 'shared/data/leetcode_medhard_dev.jsonl')!r}).read()\n"
                          "    print('READ_OK')\nexcept Exception as e:\n    print('READ_DENIED', type(e).__name__)\n",
                          lambda r, p: "READ_OK" not in r.stdout and "READ_DENIED" in r.stdout),
    # The server's own code and data (the repo, wherever it is checked out) and home must be hidden.
    "list_problem_data": ("import glob, os\nprint('FOUND', glob.glob(os.path.expanduser('~') + '/**/*.jsonl',"
                          f" recursive=True) + glob.glob({str(REPO_ROOT)!r} + '/**/*.jsonl', recursive=True))\n",
                          lambda r, p: "FOUND []" in r.stdout),
    "write_outside": (f"for path in ({ESCAPE!r}, {str(REPO_ROOT / 'ESCAPED')!r}, '../escaped'):\n"
                      "    try:\n        open(path, 'w').write('x')\n        print('WROTE', path)\n"
                      "    except Exception as e:\n        print('DENIED', type(e).__name__)\n",
                      lambda r, p: "WROTE" not in r.stdout and r.stdout.count("DENIED") == 3),
    "socket_outbound": ("import socket\ntry:\n    socket.create_connection(('1.1.1.1', 80), timeout=1)\n"
                        "    print('NET_OPEN')\nexcept Exception as e:\n    print('NET_BLOCKED', type(e).__name__)\n",
                        lambda r, p: "NET_OPEN" not in r.stdout and "NET_BLOCKED" in r.stdout),
    "socket_localhost": (f"import socket\ntry:\n    socket.create_connection(('127.0.0.1', {PORT}), timeout=1)\n"
                         "    print('NET_OPEN')\nexcept Exception as e:\n    print('NET_BLOCKED', type(e).__name__)\n",
                         lambda r, p: "NET_OPEN" not in r.stdout and "NET_BLOCKED" in r.stdout),
    "ctypes_segfault": ("import ctypes\nctypes.string_at(0)\n", lambda r, p: p == 0 and r.error is None),
    "ctypes_libc_kill": ("import ctypes, os\nlibc = ctypes.CDLL(None)\nlibc.kill(os.getppid(), 9)\nlibc.kill(-1, 9)\n",
                         lambda r, p: p == 0 and r.error is None),
    "deep_recursion": ("import sys\nsys.setrecursionlimit(10**7)\ndef f(n):\n    return f(n + 1) + 1\nf(0)\n",
                       lambda r, p: p == 0 and r.error is None),
    "huge_integer": ("x = 10 ** (10 ** 10)\n", lambda r, p: p == 0 and r.error is None),
    "huge_int_str": ("print(str(10 ** 100000))\n", lambda r, p: p == 0 and "ValueError" in r.stderr),
    "sigstop_self": ("import os, signal\nos.kill(os.getpid(), signal.SIGSTOP)\n", lambda r, p: p == 0 and r.timed_out),
    "sigkill_self": ("import os, signal\nos.kill(os.getpid(), signal.SIGKILL)\n", lambda r, p: p == 0),
    "ignore_signals": ("import signal\nfor s in (signal.SIGTERM, signal.SIGINT, signal.SIGXCPU, signal.SIGHUP):\n"
                       "    signal.signal(s, signal.SIG_IGN)\nwhile True:\n    pass\n",
                       lambda r, p: p == 0 and r.timed_out),
    # The verdict travels over its own pipe: closing stdout/stderr does not change it.
    "close_stdout": ("import os\nos.close(1)\nos.close(2)\n" + GOOD, lambda r, p: p == 2),
    "close_verdict_fds": ("import os\nfor fd in range(3, 64):\n    try:\n        os.close(fd)\n    except OSError:\n"
                          "        pass\n" + GOOD, lambda r, p: p == 0 and r.error is None),
    "forge_verdict": ("import os\nfor fd in range(3, 16):\n    try:\n        os.write(fd, b'deadbeef D 2 2\\nL\\n')\n"
                      "    except OSError:\n        pass\n", lambda r, p: p == 0),
    "env_scrubbed": ("import os\nprint('ENV', sorted(os.environ))\n",
                     lambda r, p: "ENV ['HOME', 'LANG', 'PATH', 'TMPDIR']" in r.stdout),
}


def _modes() -> list[str]:
    """auto = namespaces as root, else bubblewrap when it works, else fallback; plus the others here."""
    modes = ["auto", "fallback"]
    if os.geteuid() == 0 and bwrap_works():
        modes.insert(1, "bwrap")
    return modes


def expected_values(pool, ck: ProblemChecks) -> list:
    """The expected sides, evaluated as the grader does: setup only, no program."""
    n = len(ck.split.expected_exprs)
    res = pool.run(ExecJob("eval", ck.setup, EMPTY_PROGRAM, {}, {"exprs": ck.expected_exprs}))
    lines = judge.parse_results(res.verdict, n)
    return [judge.decode(lines.get(k)) for k in range(n)]


def run_eval(pool, ck: ProblemChecks, code: str, expected: list):
    """(result, asserts passed) of the honest check's child on `code`, judged outside it."""
    blob, err = compile_program(code)
    assert blob is not None, err
    res = pool.run(ExecJob("eval", ck.setup, blob, {}, {"exprs": ck.program_exprs}))
    results = judge.parse_results(res.verdict, len(ck.split.program_exprs))
    return res, judge.judge(ck.split, results, expected).passed


@pytest.fixture(scope="module", params=_modes())
def results(request):
    pool = SandboxPool(SandboxConfig(workers=4, timeout_s=1.0, isolation=request.param))
    try:
        expected = expected_values(pool, CK)

        def run(code: str):
            return run_eval(pool, CK, code, expected)

        with ThreadPoolExecutor(4) as ex:  # most hostile runs sleep or wait for their timeout
            futs = {name: ex.submit(run, code) for name, (code, _) in CASES.items()}
            out = {name: f.result() for name, f in futs.items()}
        after = run(GOOD)  # still serving, still correct
        uids = [s.uid for s in pool.servers]
        yield {"pool": pool, "res": out, "after": after, "uids": uids, "mode": pool.info["isolation"]}
    finally:
        pool.close()


@pytest.mark.parametrize("case", list(CASES))
def test_hostile_case_gets_clear_verdict(results, case):
    res, passed = results["res"][case]
    check = CASES[case][1]
    assert res.error is None, f"{case}: sandbox failure {res.error}"
    assert check(res, passed), (f"{case} [{results['mode']}]: status={res.status} passed={passed} "
                                f"stdout={res.stdout[-300:]!r} stderr={res.stderr[-300:]!r}")


def test_server_still_serving_after_hostile_cases(results):
    res, passed = results["after"]
    assert res.status == "ok" and passed == 2
    assert all(s.proc.poll() is None for s in results["pool"].servers)


def test_nothing_escaped_to_host(results):
    assert not Path(ESCAPE).exists()
    assert not (REPO_ROOT / "ESCAPED").exists()


def _procs_of_uid(uid: int) -> list[str]:
    found = []
    for d in Path("/proc").iterdir():
        if not d.name.isdigit():
            continue
        try:
            status = (d / "status").read_text()
        except OSError:
            continue
        for line in status.splitlines():
            if line.startswith("Uid:") and int(line.split()[1]) == uid:
                state = next((x for x in status.splitlines() if x.startswith("State:")), "")
                found.append(f"{d.name} {state}")
    return found


@pytest.mark.skipif(os.geteuid() != 0, reason="per-slot uids need root")
def test_no_orphans_or_zombies_left(results):
    if results["mode"] != "namespaces":
        pytest.skip("per-slot uid sweep only in namespaces mode")
    for uid in results["uids"]:
        assert _procs_of_uid(uid) == []


SECRET_PROBLEM = Problem(
    id="tiny-secret", question="concat", func_name="Solution().cat", setup_code="",
    gt_answer=["assert Solution().cat('zebra', 'quokka') == 'zebraquokka'"],
)
SNOOP = """
import gc, os, sys
found = [o for o in gc.get_objects() if isinstance(o, (str, bytes)) and ('quokka' in str(o))]
codes = [o for o in gc.get_objects() if hasattr(o, 'co_consts')]
codes += [o.__code__ for o in gc.get_objects() if hasattr(o, '__code__')]
for code in codes:
    found += [c for c in code.co_consts if isinstance(c, str) and 'quokka' in c]
leak = b''
for fd in range(3, 32):
    try:
        os.set_blocking(fd, False)
        leak += os.read(fd, 1 << 20)
    except OSError:
        pass
print('SNOOP', len(found), b'quokka' in leak)
class Solution:
    def cat(self, a, b):
        return a + b
"""


def test_asserts_invisible_while_the_program_loads():
    ck = ProblemChecks(SECRET_PROBLEM)
    pool = SandboxPool(SandboxConfig(workers=1, timeout_s=1.0))
    try:
        res, passed = run_eval(pool, ck, SNOOP, expected_values(pool, ck))
        assert "SNOOP 0 False" in res.stdout, res.stdout + res.stderr
        assert passed == 1
        # Mode A is the reference layout: run_tests() (with the asserts) exists before the program.
        blob, _ = compile_program(SNOOP)
        nonce = uuid.uuid4().hex.encode()
        res = pool.run(ExecJob("A", ck.setup, blob, {"run_tests": ck.run_tests},
                               {"nonce": nonce, "call": compile("run_tests()", "<call>", "exec")}))
        assert "SNOOP 0" not in res.stdout
    finally:
        pool.close()
