"""What a sandboxed program can see (issue 20 item 1): an allow-list root in namespaces and bwrap
modes (interpreter, standard library, system libraries; a private tmp; its own /proc), and a Grader
that refuses the fallback mode unless it is explicitly allowed, saying why."""
from __future__ import annotations

import os

import pytest

from reward_server.grader import Grader
from reward_server.sandbox import ALLOW_FALLBACK_ENV, SandboxConfig, SandboxError, bwrap_works, default_allow
from shared.config import RewardConfig
from shared.hacks import as_completion
from shared.problems import Problem

TINY = Problem(id="allow-tiny", question="add", func_name="Solution().add", setup_code="from typing import *\n",
               gt_answer=["assert Solution().add(1, 2) == 3"],
               canonical_solution="class Solution:\n    def add(self, a, b):\n        return a + b\n")
LOOK = """
import os
def show(path):
    try:
        print('LS', path, sorted(os.listdir(path)))
    except OSError as e:
        print('LS', path, type(e).__name__)
for path in ('/', '/usr', '/proc', '/tmp', '/etc', os.path.dirname(os.__file__) + '/site-packages'):
    show(path)
""" + TINY.canonical_solution


def _modes() -> list[str]:
    modes = []
    if os.geteuid() == 0:
        modes.append("namespaces")
    if bwrap_works():
        modes.append("bwrap")
    return modes


def _listing(stdout: str, path: str) -> str:
    return next(line.split(" ", 2)[2] for line in stdout.splitlines() if line.startswith(f"LS {path} "))


@pytest.mark.parametrize("mode", _modes())
def test_program_sees_the_allow_list_only(mode):
    allow, mask, links = default_allow()
    tops = {p.split("/")[1] for p in allow + list(links)} | {"dev", "proc", "tmp"}
    with Grader(RewardConfig(), workers=1, sandbox=SandboxConfig(timeout_s=2.0, isolation=mode)) as g:
        grade = g.grade(TINY, as_completion(LOOK))
    assert grade.gt_pass, (grade.status, grade.stderr[-500:])  # setup_code's imports still work
    out = grade.stdout
    if mode == "bwrap":  # the audit guard refuses listing anything outside the allow-list too
        assert _listing(out, "/") == "PermissionError", out
        return
    assert set(eval(_listing(out, "/"))) <= tops, out
    assert set(eval(_listing(out, "/etc"))) <= {"ld.so.cache"}, out
    assert eval(_listing(out, os.path.dirname(os.__file__) + "/site-packages")) == [], out  # masked
    procs = [p for p in eval(_listing(out, "/proc")) if p.isdigit()]
    assert "1" not in procs and len(procs) <= 2, out  # its own processes only, not the server
    assert _listing(out, "/tmp") == "PermissionError", out  # the server's tmp: not the program's


def test_fallback_is_refused_unless_allowed(monkeypatch):
    monkeypatch.delenv(ALLOW_FALLBACK_ENV, raising=False)
    with pytest.raises(SandboxError, match=f"fallback isolation.*rewards are refused.*{ALLOW_FALLBACK_ENV}=1"):
        Grader(RewardConfig(), workers=1, sandbox=SandboxConfig(isolation="fallback"))
    monkeypatch.setenv(ALLOW_FALLBACK_ENV, "1")
    with Grader(RewardConfig(), workers=1, sandbox=SandboxConfig(isolation="fallback")) as g:
        assert g.sandbox_info["isolation"] == "fallback"
        assert g.grade(TINY, as_completion(TINY.canonical_solution)).gt_pass
