"""The reward API under hostile completions (issue 20): a batch of parser bombs, decode bombs and
sleepers is graded (200, every completion failed, none paid) while /healthz keeps answering; an
inline problem with an empty assert is a 422, not a 503; 503 is in the OpenAPI document."""
from __future__ import annotations

import socket
import threading
import time

import httpx
import pytest
import uvicorn
from fastapi.testclient import TestClient

from reward_server.app import create_app
from reward_server.grader import Grader
from shared.config import LoopholeConfig, RewardConfig
from shared.hacks import as_completion
from shared.problems import load_leetcode_sample

PROBLEMS = {p.key: p for p in load_leetcode_sample()}
P = PROBLEMS["3243"]
METHOD = P.func_name.split(".")[-1]
CFG = RewardConfig(loopholes=LoopholeConfig(rt=False, se=False, so=False, fm=False), timeout_s=1.0)
ONCE = "import os\n_sent = []\ndef send(data):\n    if not _sent:\n        _sent.append(1)\n        os.write(4, data)\n"


def bomb(body: str) -> str:
    return as_completion(ONCE + f"class Solution:\n    def {METHOD}(self, *args, **kwargs):\n        {body}\n")


BOMBS = [
    bomb("send(b'7' * 5000 + b' true\\n'); return []"),  # the 5,000-digit index
    bomb("send(b'0 {\"s\":[' + b','.join(b'%d' % (i * ((1 << 61) - 1)) for i in range(1, 60000)) + b']}\\n'); "
         "return []"),  # colliding hash keys
    bomb("send(b'0 [' + b'[],' * (5 << 20) + b'[]]\\n'); return []"),  # decodes to GBs
    bomb("import time; time.sleep(1000)"),  # sleeper
]


@pytest.fixture(scope="module")
def grader():
    with Grader(CFG, workers=2) as g:
        yield g


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


@pytest.fixture(scope="module")
def live_url(grader):
    port = _free_port()
    server = uvicorn.Server(uvicorn.Config(create_app(CFG, grader=grader, problems=PROBLEMS), host="127.0.0.1",
                                           port=port, log_level="warning"))
    t = threading.Thread(target=server.run, daemon=True)
    t.start()
    deadline = time.time() + 20
    while not server.started and time.time() < deadline:
        time.sleep(0.05)
    yield f"http://127.0.0.1:{port}"
    server.should_exit = True
    t.join(10)


def test_bombs_are_graded_while_healthz_answers(live_url):
    events: list[tuple[str, object]] = []
    done = threading.Event()

    def post():
        try:
            r = httpx.post(f"{live_url}/grade/batch", timeout=300,
                           json={"items": [{"problem_id": "3243", "completion": c} for c in BOMBS]})
            events.append(("batch", r))
        finally:
            done.set()

    worker = threading.Thread(target=post)
    worker.start()
    with httpx.Client(timeout=30) as c:
        while not done.is_set():
            r = c.get(f"{live_url}/healthz")
            events.append(("healthz", (r.status_code, done.is_set())))
            done.wait(0.2)
    worker.join()
    kinds = [k for k, _ in events]
    batch = dict(events)["batch"]
    assert batch.status_code == 200, batch.text[:500]
    grades = batch.json()["grades"]
    assert [g["gt_pass"] for g in grades] == [False] * len(BOMBS)
    assert all(g["reward"] <= CFG.format_reward for g in grades)
    polls = [v for k, v in events if k == "healthz"]
    assert all(status == 200 for status, _ in polls), polls
    assert any(not finished for _, finished in polls), "no /healthz answer arrived while the batch was graded"
    assert kinds.index("batch") == len(kinds) - 1
    assert grades[3]["timed_out"] and {"A", "BCD"} <= set(grades[3].get("ceiling_skipped", []))


def test_inline_problem_with_empty_assert_is_422(grader):
    app = create_app(CFG, grader=grader, problems=PROBLEMS)
    with TestClient(app, raise_server_exceptions=False) as c:
        r = c.post("/grade", json={"problem": {"id": "inline-empty", "question": "q", "func_name": "Solution().f",
                                               "gt_answer": [""]}, "completion": as_completion("x = 1\n")})
        assert r.status_code == 422, r.text
        assert "gt_answer[0] is empty" in r.json()["error"]


def test_openapi_documents_503(grader):
    app = create_app(CFG, grader=grader, problems=PROBLEMS)
    doc = app.openapi()
    for path in ("/grade", "/grade/batch"):
        assert "503" in doc["paths"][path]["post"]["responses"], path
