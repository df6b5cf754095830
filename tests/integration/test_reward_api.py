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
    ("not_json", {"content": b"hello", "headers": {"content-type": "text/plain"}}, "/grade", 415,
     "Content-Type: application/json"),
    ("empty_body", {}, "/grade", 415, "no Content-Type header"),
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
    # a batch item's own problem (unknown id, too big) is that item's error: tests/integration/test_reward_api_service.py
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


# ---------------------------------------------------------------- the API's edges
@pytest.mark.parametrize("name,kw,status,needle", [
    ("invalid_utf8", {"content": b'{"problem_id": "3243", "completion": "\xff\xfe"}',
                      "headers": {"content-type": "application/json"}}, 400, "not valid UTF-8"),
    ("deep_json", {"content": b"[" * 100_000 + b"]" * 100_000, "headers": {"content-type": "application/json"}},
     400, "nests too deep"),
    ("loopholes_zero_is_not_false", {"json": {"problem_id": "3243", "completion": "x", "loopholes": {"fm": 0}}},
     422, "loopholes.fm"),
    ("loopholes_string_bool", {"json": {"problem_id": "3243", "completion": "x", "loopholes": {"rt": "false"}}},
     422, "loopholes.rt"),
    ("problem_id_bool", {"json": {"problem_id": True, "completion": "x"}}, 422, "problem_id"),
    ("problem_id_null", {"json": {"problem_id": None, "completion": "x"}}, 422, "problem_id"),
    ("inline_id_bool", {"json": {"problem": dict(INLINE, id=True), "completion": "x"}}, 422, "problem.id"),
    ("rollout_id_int", {"json": {"problem_id": "3243", "completion": "x", "rollout_id": 7}}, 422, "rollout_id"),
])
def test_edge_requests_get_the_error_shape(client, name, kw, status, needle):
    r = client.post("/grade", **kw)
    assert r.status_code == status, (name, r.status_code, r.text[:300])
    body = r.json()
    assert set(body) <= {"error", "detail"} and needle in body["error"], body


def test_routing_errors_use_the_error_shape(client):
    for r in (client.get("/nope"), client.get("/grade")):
        assert r.status_code in (404, 405) and isinstance(r.json().get("error"), str), r.text


def test_openapi_documents_errors_the_one_of_rule_and_metrics_type(client):
    spec = client.get("/openapi.json").json()
    for path, codes in (("/grade", {"400", "404", "413", "415", "422"}), ("/grade/batch", {"400", "413", "415", "422"})):
        responses = spec["paths"][path]["post"]["responses"]
        assert codes <= set(responses), path
        assert responses["413"]["content"]["application/json"]["schema"]["$ref"].endswith("/ErrorResponse")
    req = spec["components"]["schemas"]["GradeRequest"]
    assert [b["required"] for b in req["oneOf"]] == [["problem_id"], ["problem"]]
    assert all("null" not in str(req["properties"][k]) for k in ("problem_id", "problem", "loopholes"))
    metrics = spec["paths"]["/metrics"]["get"]["responses"]["200"]["content"]
    assert list(metrics) == ["text/plain; version=0.0.4; charset=utf-8"] or any("text/plain" in k for k in metrics)
    assert client.get("/metrics").headers["content-type"].startswith("text/plain")


def test_body_cap_counts_the_bytes_it_reads():
    """A body with no Content-Length (chunked) is cut off at the cap, not read whole."""
    import asyncio

    from reward_server.app import BodyCap

    chunk, pulled, sent = b"x" * (1 << 20), [0], []

    async def endless():
        pulled[0] += 1
        return {"type": "http.request", "body": chunk, "more_body": True}

    async def send(message):
        sent.append(message)

    async def reject(scope, send_, message):
        sent.append({"type": "reject", "message": message})

    async def never(scope, receive, send_):  # pragma: no cover - must not be reached
        raise AssertionError("the app was called")

    cap = BodyCap(never, limit=8 << 20, on_reject=reject)
    asyncio.run(cap({"type": "http", "headers": [(b"transfer-encoding", b"chunked")]}, endless, send))
    assert pulled[0] == 9 and "stopped reading at 9437184 bytes" in sent[-1]["message"]


def test_chunked_body_over_the_cap_gets_413_before_it_is_all_sent(live_url):
    """Over a real socket: a 96 MiB chunked body is refused once 64 MiB have been read."""
    import socket as so
    from urllib.parse import urlparse

    from reward_server.app import MAX_BODY_BYTES

    u = urlparse(live_url)
    s = so.create_connection((u.hostname, u.port), timeout=30)
    s.sendall(b"POST /grade HTTP/1.1\r\nHost: x\r\nContent-Type: application/json\r\n"
              b"Transfer-Encoding: chunked\r\n\r\n")
    piece = b"%x\r\n%s\r\n" % (1 << 20, b" " * (1 << 20))
    sent = 0
    try:
        for _ in range(96):
            s.sendall(piece)
            sent += 1 << 20
    except OSError:  # the server answered and closed while we were still sending
        pass
    reply = b""
    try:
        while b"\r\n\r\n" not in reply:
            data = s.recv(65536)
            if not data:
                break
            reply += data
    except OSError:
        pass
    s.close()
    assert reply.startswith(b"HTTP/1.1 413"), reply[:200]
    assert sent < 96 << 20 or b"stopped reading" in reply
    assert sent >= MAX_BODY_BYTES


def test_metrics_count_timeouts_unsupported_and_reference_labels():
    cfg = RewardConfig(timeout_s=1.0)  # a 1 s CPU budget: the endless loop is stopped quickly
    hack = as_completion(WRONG_CODE + "\ndef run_tests():\n    pass\n")
    loop = as_completion("class Solution:\n    def shortestDistanceAfterQueries(self, n, queries):\n"
                         "        while True:\n            pass\n")
    problems = {"3243": P.model_copy(update={"time_budget_s": None})}  # no calibrated budget above the 1 s
    with Grader(cfg, workers=2) as grader, TestClient(create_app(cfg, grader=grader, problems=problems)) as client:
        r = client.post("/grade/batch", json={"items": [{"problem_id": "3243", "completion": c} for c in (hack, loop)]})
        assert [g["timed_out"] for g in r.json()["grades"]] == [False, True]
        text = client.get("/metrics").text
    value = {ln.rsplit(" ", 1)[0]: float(ln.rsplit(" ", 1)[1]) for ln in text.splitlines() if ln and not ln.startswith("#")}
    assert value["rankguard_reward_timeouts_total"] >= 1
    assert value['rankguard_reward_reference_label_total{label="Reward Hack"}'] >= 1
    assert "rankguard_reward_unsupported_asserts_total" in value
