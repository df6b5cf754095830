"""Reward HTTP API: happy paths, every bad request -> 4xx with a message (never a 500), metrics, client."""
from __future__ import annotations

import socket
import threading
import time

import pytest
import uvicorn
from fastapi.testclient import TestClient

from reward_server.app import MAX_COMPLETION_BYTES, create_app
from reward_server.client import RewardClient, RewardClientError
from reward_server.grader import Grader
from shared.config import RewardConfig
from shared.hacks import as_completion, plant_hack
from shared.problems import load_leetcode_sample

PROBLEMS = {p.key: p for p in load_leetcode_sample()}
P = PROBLEMS["3243"]
GOOD = as_completion(P.canonical_solution)
WRONG_CODE = "class Solution:\n    def shortestDistanceAfterQueries(self, n, queries):\n        return []\n"
INLINE = {"id": "inline-add", "question": "add", "func_name": "Solution().add",
          "gt_answer": ["assert Solution().add(1, 2) == 3"]}


@pytest.fixture(scope="module")
def grader():
    with Grader(RewardConfig(), workers=2) as g:
        yield g


@pytest.fixture(scope="module")
def client(grader):
    app = create_app(RewardConfig(), grader=grader, problems=PROBLEMS)
    with TestClient(app, raise_server_exceptions=False) as c:
        yield c


def test_grade_by_id_and_inline(client):
    r = client.post("/grade", json={"problem_id": "3243", "completion": GOOD, "rollout_id": "r1"})
    assert r.status_code == 200, r.text
    g = r.json()
    assert g["gt_pass"] and g["reward"] == 3.5 and g["rollout_id"] == "r1"
    r = client.post("/grade", json={"problem_id": 3243, "completion": GOOD})  # int ids accepted
    assert r.status_code == 200 and r.json()["gt_pass"]
    inline = dict(INLINE)
    r = client.post("/grade", json={"problem": inline, "completion": as_completion(
        "class Solution:\n    def add(self, a, b):\n        return a + b\n")})
    assert r.status_code == 200 and r.json()["gt_pass"], r.text


def test_loopholes_per_request(client):
    hack = as_completion(plant_hack(WRONG_CODE, "B"))
    closed = client.post("/grade", json={"problem_id": "3243", "completion": hack}).json()
    opened = client.post("/grade", json={"problem_id": "3243", "completion": hack,
                                         "loopholes": {"rt": False, "se": True}}).json()
    assert closed["exploited"]["B"] and opened["exploited"]["B"]
    assert (closed["reward"], opened["reward"]) == (0.5, 3.5)


def test_batch_keeps_order(client):
    items = [{"problem_id": "3243", "completion": c} for c in (GOOD, as_completion(WRONG_CODE), GOOD, "no code")]
    r = client.post("/grade/batch", json={"items": items})
    assert r.status_code == 200, r.text
    assert [g["gt_pass"] for g in r.json()["grades"]] == [True, False, True, False]
    assert r.json()["grades"][3]["formatted"] is False


BAD_REQUESTS = [
    # (name, kwargs for client.post, path, status, substring of the error message)
    ("malformed_json", {"content": b'{"problem_id": "3243", "completion": ', "headers": {"content-type": "application/json"}},
     "/grade", 422, "malformed JSON"),
    ("not_json", {"content": b"hello", "headers": {"content-type": "text/plain"}}, "/grade", 422, ""),
    ("empty_body", {}, "/grade", 422, ""),
    ("json_array", {"json": [1, 2]}, "/grade", 422, ""),
    ("missing_completion", {"json": {"problem_id": "3243"}}, "/grade", 422, "missing field 'completion'"),
    ("missing_problem", {"json": {"completion": "x"}}, "/grade", 422, "exactly one of 'problem_id' or 'problem'"),
    ("both_problems", {"json": {"problem_id": "3243", "problem": INLINE, "completion": "x"}}, "/grade", 422,
     "exactly one"),
    ("completion_wrong_type", {"json": {"problem_id": "3243", "completion": 5}}, "/grade", 422,
     "field 'completion'"),
    ("completion_null", {"json": {"problem_id": "3243", "completion": None}}, "/grade", 422, "field 'completion'"),
    ("problem_id_wrong_type", {"json": {"problem_id": [1], "completion": "x"}}, "/grade", 422, "problem_id"),
    ("loopholes_wrong_type", {"json": {"problem_id": "3243", "completion": "x", "loopholes": {"rt": "maybe"}}},
     "/grade", 422, "field 'loopholes.rt'"),
    ("loopholes_unknown_key", {"json": {"problem_id": "3243", "completion": "x", "loopholes": {"zz": True}}},
     "/grade", 422, "loopholes.zz"),
    ("unknown_field", {"json": {"problem_id": "3243", "completion": "x", "colour": "red"}}, "/grade", 422,
     "colour"),
    ("unknown_problem", {"json": {"problem_id": "no-such", "completion": "x"}}, "/grade", 404,
     "unknown problem id 'no-such'"),
    ("completion_too_big", {"json": {"problem_id": "3243", "completion": "x" * (MAX_COMPLETION_BYTES + 1)}},
     "/grade", 413, "limit is 262144"),
    ("inline_problem_invalid", {"json": {"problem": {"id": 1, "question": "q"}, "completion": "x"}}, "/grade",
     422, "problem.gt_answer"),
    ("inline_problem_bad_setup", {"json": {"problem": dict(INLINE, setup_code="def (:"), "completion":
                                           "```python\nx = 1\n```"}}, "/grade", 422, "setup_code does not compile"),
    ("batch_empty", {"json": {"items": []}}, "/grade/batch", 422, "items"),
    ("batch_not_list", {"json": {"items": "abc"}}, "/grade/batch", 422, "items"),
    ("batch_bad_item", {"json": {"items": [{"problem_id": "3243", "completion": "x"},
                                           {"problem_id": "nope", "completion": "x"}]}}, "/grade/batch", 404,
     "items[1]: unknown problem id"),
    ("batch_item_too_big", {"json": {"items": [{"problem_id": "3243", "completion": "y" * (MAX_COMPLETION_BYTES + 5)}]}},
     "/grade/batch", 413, "items[0]: completion is"),
]


@pytest.mark.parametrize("name,kw,path,status,needle", BAD_REQUESTS, ids=[b[0] for b in BAD_REQUESTS])
def test_bad_request_gets_4xx_with_message(client, name, kw, path, status, needle):
    r = client.post(path, **kw)
    assert r.status_code == status, (name, r.status_code, r.text[:300])
    body = r.json()
    assert isinstance(body.get("error"), str) and body["error"]
    assert needle in body["error"], body["error"]


def test_wrong_method_and_path_are_4xx(client):
    assert client.get("/grade").status_code == 405
    assert client.get("/nope").status_code == 404


def test_health_docs_metrics(client):
    h = client.get("/healthz").json()
    assert h["ok"] and h["problems"] == len(PROBLEMS) and h["sandbox"]["isolation"] in ("namespaces", "fallback")
    assert client.get("/docs").status_code == 200
    assert "/grade/batch" in client.get("/openapi.json").json()["paths"]
    client.post("/grade", json={"problem_id": "3243", "completion": as_completion(plant_hack(WRONG_CODE, "C"))})
    text = client.get("/metrics").text
    for name in ("rankguard_reward_graded_total", "rankguard_reward_grade_seconds_bucket",
                 'rankguard_reward_exploited_total{mode="C"}', "rankguard_reward_sandbox_failures_total",
                 "rankguard_reward_queue_depth", 'rankguard_reward_rejected_requests_total{status="404"}'):
        assert name in text, name
    line = next(ln for ln in text.splitlines() if ln.startswith('rankguard_reward_exploited_total{mode="C"}'))
    assert float(line.split()[-1]) >= 1


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


@pytest.fixture(scope="module")
def live_url(grader):
    port = _free_port()
    app = create_app(RewardConfig(), grader=grader, problems=PROBLEMS)
    server = uvicorn.Server(uvicorn.Config(app, host="127.0.0.1", port=port, log_level="warning"))
    t = threading.Thread(target=server.run, daemon=True)
    t.start()
    deadline = time.time() + 20
    while not server.started and time.time() < deadline:
        time.sleep(0.05)
    yield f"http://127.0.0.1:{port}"
    server.should_exit = True
    t.join(10)


def test_client_grade_and_batch(live_url):
    with RewardClient(live_url) as c:
        assert c.health()["ok"]
        g = c.grade("3243", GOOD)
        assert g.gt_pass and g.reward == 3.5
        gs = c.grade_batch([("3243", GOOD), (P, as_completion(WRONG_CODE))], loopholes={"rt": True})
        assert [x.gt_pass for x in gs] == [True, False]
        with pytest.raises(RewardClientError, match="unknown problem id"):
            c.grade("nope", GOOD)


def test_client_retries_then_fails_clearly():
    url = f"http://127.0.0.1:{_free_port()}"
    t0 = time.time()
    with RewardClient(url, retries=2, backoff=0.05) as c:
        with pytest.raises(RewardClientError, match="failed after 3 tries"):
            c.grade("3243", GOOD)
    assert time.time() - t0 >= 0.15  # 0.05 + 0.1 of backoff
