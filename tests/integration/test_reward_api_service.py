"""The reward API as a network service: typed responses in /openapi.json, /docs from local assets,
per-item batch errors, a clear 415 without a JSON content type, loopback by default and a bearer token
(constant-time compared) whenever it binds beyond loopback; the compose file publishes it on loopback."""
from __future__ import annotations

import re
import subprocess
import sys
from pathlib import Path

import pytest
import yaml
from fastapi.testclient import TestClient

from reward_server.access import AccessError, check_exposure, is_loopback, load_token, token_matches
from reward_server.api_models import MAX_BATCH, MAX_COMPLETION_BYTES, GradeResponse
from reward_server.app import create_app
from reward_server.client import RewardClient, RewardClientError
from reward_server.grader import Grader
from shared.config import RewardConfig
from shared.hacks import as_completion
from shared.problems import load_leetcode_sample

PROBLEMS = {p.key: p for p in load_leetcode_sample()}
P = PROBLEMS["3243"]
GOOD = as_completion(P.canonical_solution)
TOKEN = "t0ken-" + "x" * 26
REPO = Path(__file__).resolve().parents[2]


@pytest.fixture(scope="module")
def grader():
    with Grader(RewardConfig(), workers=2) as g:
        yield g


@pytest.fixture(scope="module")
def client(grader):
    with TestClient(create_app(RewardConfig(), grader=grader, problems=PROBLEMS), raise_server_exceptions=False) as c:
        yield c


@pytest.fixture(scope="module")
def locked(grader):
    app = create_app(RewardConfig(), grader=grader, problems=PROBLEMS, token=TOKEN)
    with TestClient(app, raise_server_exceptions=False) as c:
        yield c


# ---------------------------------------------------------------- typed, documented responses
def test_openapi_types_every_grade_field(client):
    spec = client.get("/openapi.json").json()
    ok = spec["paths"]["/grade"]["post"]["responses"]["200"]["content"]["application/json"]["schema"]
    assert ok["$ref"].endswith("/GradeResponse")
    grade = spec["components"]["schemas"]["GradeResponse"]
    fields = grade["properties"]
    assert len(fields) >= 25 and set(GradeResponse.model_fields) == set(fields)
    undocumented = [k for k, v in fields.items() if not v.get("description")]
    assert undocumented == []
    real = client.post("/grade", json={"problem_id": "3243", "completion": GOOD}).json()
    assert set(real) <= set(fields) | {"cached"}, set(real) - set(fields)  # nothing comes back undocumented
    batch = spec["paths"]["/grade/batch"]["post"]
    assert batch["responses"]["200"]["content"]["application/json"]["schema"]["$ref"].endswith("/BatchResponse")
    assert str(MAX_BATCH) in batch["description"] and str(MAX_BATCH) in spec["info"]["description"]
    items = spec["components"]["schemas"]["BatchRequest"]["properties"]["items"]
    assert items["maxItems"] == MAX_BATCH and str(MAX_BATCH) in items["description"]
    assert "securitySchemes" not in spec.get("components", {})  # no token: nothing to authorize


def test_health_states_limits_and_auth(client, locked):
    h = client.get("/healthz").json()
    assert h["limits"] == {"max_batch": MAX_BATCH, "max_completion_bytes": MAX_COMPLETION_BYTES,
                           "max_body_bytes": 64 << 20} and h["auth"] == "none"
    assert locked.get("/healthz").json()["auth"] == "bearer"  # open: liveness probes need no token


def test_docs_load_only_local_assets(client):
    page = client.get("/docs")
    assert page.status_code == 200 and "SwaggerUIBundle" in page.text
    refs = re.findall(r'(?:src|href)="([^"]+)"', page.text)
    assert len(refs) >= 3 and not [r for r in refs if r.startswith(("http:", "https:", "//"))], refs
    assert "cdn" not in page.text.lower()
    for ref in refs:
        asset = client.get(ref)
        assert asset.status_code == 200 and len(asset.content) > 500, ref
    assert client.get("/redoc").status_code == 404  # ReDoc would load from a CDN: not offered


# ---------------------------------------------------------------- batches: per-item errors
def test_one_bad_item_does_not_fail_the_batch(client):
    items = [{"problem_id": "3243", "completion": GOOD},
             {"problem_id": "nope", "completion": GOOD},
             {"problem_id": "3243", "completion": "y" * (MAX_COMPLETION_BYTES + 5)},
             {"problem_id": "3243", "completion": "no code"}]
    r = client.post("/grade/batch", json={"items": items})
    assert r.status_code == 200, r.text
    body = r.json()
    assert [g is None for g in body["grades"]] == [False, True, True, False]
    assert body["grades"][0]["gt_pass"] is True and body["grades"][3]["formatted"] is False
    assert [(e["index"], e["status"]) for e in body["errors"]] == [(1, 404), (2, 413)]
    assert "items[1]: unknown problem id 'nope'" in body["errors"][0]["error"]
    assert "limit is 262144" in body["errors"][1]["error"]


def test_batch_over_the_limit_says_the_limit(client):
    r = client.post("/grade/batch", json={"items": [{"problem_id": "3243", "completion": "x"}] * (MAX_BATCH + 1)})
    assert r.status_code == 422 and f"at most {MAX_BATCH} items per batch (got {MAX_BATCH + 1})" in r.json()["error"]


def test_client_batch_errors_raise_or_come_back_as_none(client, monkeypatch):
    rc = RewardClient("http://testserver", retries=0)
    rc._http = client  # the TestClient speaks httpx
    pairs = [("3243", GOOD), ("nope", GOOD)]
    with pytest.raises(RewardClientError, match=r"item 1: HTTP 404: items\[1\]: unknown problem id 'nope'"):
        rc.grade_batch(pairs)
    got = rc.grade_batch(pairs, errors="none")
    assert got[0].gt_pass and got[1] is None


# ---------------------------------------------------------------- content type
@pytest.mark.parametrize("headers, shown", [({}, "no Content-Type header"),
                                            ({"content-type": "text/plain"}, "'text/plain'"),
                                            ({"content-type": "application/x-www-form-urlencoded"}, "form")])
def test_post_without_json_content_type_is_415(client, headers, shown):
    r = client.post("/grade", content=b'{"problem_id": "3243", "completion": "x"}', headers=headers)
    assert r.status_code == 415, r.text
    assert "Content-Type: application/json" in r.json()["error"] and shown in r.json()["error"]


def test_json_with_charset_still_works(client):
    r = client.post("/grade", content=b'{"problem_id": "3243", "completion": "x"}',
                    headers={"content-type": "application/json; charset=utf-8"})
    assert r.status_code == 200 and r.json()["formatted"] is False


# ---------------------------------------------------------------- bearer token
def test_token_guards_everything_but_health_and_docs(locked):
    body = {"problem_id": "3243", "completion": "x"}
    missing = locked.post("/grade", json=body)
    assert missing.status_code == 401 and "missing bearer token" in missing.json()["error"]
    assert missing.headers["www-authenticate"] == "Bearer"
    wrong = locked.post("/grade", json=body, headers={"Authorization": "Bearer " + "y" * 32})
    assert wrong.status_code == 401 and wrong.json()["error"] == "wrong bearer token"
    assert locked.post("/grade", json=body, headers={"Authorization": "Basic " + TOKEN}).status_code == 401
    assert locked.get("/problems").status_code == 401 and locked.get("/metrics").status_code == 401
    auth = {"Authorization": f"Bearer {TOKEN}"}
    assert locked.post("/grade", json=body, headers=auth).status_code == 200
    assert locked.get("/problems", headers=auth).json()["count"] == len(PROBLEMS)
    for open_path in ("/healthz", "/docs", "/openapi.json"):
        assert locked.get(open_path).status_code == 200, open_path
    # checked before the body is read: an unauthenticated malformed body is a 401, not a 422
    assert locked.post("/grade", content=b"{", headers={"content-type": "application/json"}).status_code == 401
    spec = locked.get("/openapi.json").json()
    assert spec["components"]["securitySchemes"]["HTTPBearer"]["scheme"] == "bearer"
    assert spec["paths"]["/grade"]["post"]["security"] == [{"HTTPBearer": []}]


def test_client_sends_the_token(locked, monkeypatch):
    monkeypatch.setenv("RANKGUARD_REWARD_TOKEN", TOKEN)
    rc = RewardClient("http://testserver", retries=0)
    assert rc._http.headers["authorization"] == f"Bearer {TOKEN}"


def test_token_compare_is_constant_time_and_exact(monkeypatch):
    import hmac

    calls = []
    real = hmac.compare_digest
    monkeypatch.setattr(hmac, "compare_digest", lambda a, b: calls.append((a, b)) or real(a, b))
    assert token_matches(f"Bearer {TOKEN}", TOKEN) and token_matches(f"bearer {TOKEN}", TOKEN)
    assert not token_matches(f"Bearer {TOKEN}x", TOKEN) and not token_matches(TOKEN, TOKEN)
    assert not token_matches(None, TOKEN) and not token_matches("Bearer ", TOKEN)
    assert calls and all(isinstance(a, bytes) for a, _ in calls)


@pytest.mark.parametrize("host, loop", [("127.0.0.1", True), ("::1", True), ("localhost", True), ("127.5.0.1", True),
                                        ("0.0.0.0", False), ("10.0.0.3", False), ("::", False), ("example.org", False)])
def test_loopback_detection(host, loop):
    assert is_loopback(host) is loop


def test_beyond_loopback_needs_a_token(tmp_path, monkeypatch):
    check_exposure("127.0.0.1", None)  # loopback: no token needed
    with pytest.raises(AccessError, match="binding 0.0.0.0 .* needs a bearer token; set RANKGUARD_REWARD_TOKEN"):
        check_exposure("0.0.0.0", None)
    check_exposure("0.0.0.0", TOKEN)
    with pytest.raises(AccessError, match="at least 16"):
        check_exposure("0.0.0.0", "short")
    monkeypatch.delenv("RANKGUARD_REWARD_TOKEN", raising=False)
    assert load_token() is None
    monkeypatch.setenv("RANKGUARD_REWARD_TOKEN", f"  {TOKEN}\n")
    assert load_token() == TOKEN
    f = tmp_path / "tok"
    f.write_text("from-file-" + "z" * 20 + "\n")
    assert load_token(f) == "from-file-" + "z" * 20
    f.write_text("")
    with pytest.raises(AccessError, match="empty"):
        load_token(f)


def test_serve_reward_refuses_all_interfaces_without_token(monkeypatch):
    from typer.testing import CliRunner

    from services.cli import app

    monkeypatch.delenv("RANKGUARD_REWARD_TOKEN", raising=False)
    res = CliRunner().invoke(app, ["serve-reward", "--host", "0.0.0.0", "--port", "1"])
    assert res.exit_code == 2 and "needs a bearer token" in res.output


def test_reward_worker_refuses_all_interfaces_without_token(tmp_path):
    """The worker exits 2 (bad input, no restart) before it grades anything or touches Redis."""
    from shared.config import resolve_config

    cfg = resolve_config("toy", [f"run_dir={tmp_path}"]).save(tmp_path / "config.json")
    env = {k: v for k, v in __import__("os").environ.items() if k != "RANKGUARD_REWARD_TOKEN"}
    res = subprocess.run([sys.executable, "-m", "services.reward_worker", "--config", str(cfg), "--redis-url",
                          "redis://127.0.0.1:1/0", "--http-port", "8999", "--http-host", "0.0.0.0"],
                         cwd=REPO, env=env, capture_output=True, text=True, timeout=120)
    assert res.returncode == 2, res.stdout + res.stderr
    assert "needs a bearer token" in res.stdout + res.stderr


def test_up_defaults_to_loopback_and_forwards_the_host(monkeypatch, tmp_path):
    from services.launcher import Launcher
    from shared.config import resolve_config

    cfg = resolve_config("toy", [f"run_dir={tmp_path / 'r'}"])
    assert Launcher(cfg, http_port=8100).http_host == "127.0.0.1"
    monkeypatch.delenv("RANKGUARD_REWARD_TOKEN", raising=False)
    with pytest.raises(AccessError):
        Launcher(cfg, http_port=8100, http_host="0.0.0.0", console=False).start()
    assert not (tmp_path / "r").exists()  # refused before the run dir was touched


def test_compose_publishes_on_loopback_with_a_token():
    deploy = REPO / "deploy"
    reward = yaml.safe_load((deploy / "docker-compose.yml").read_text())["services"]["reward"]
    host_ip, host_ports, container = re.fullmatch(r"(\$\{[^}]+\}):(\$\{[^}]+\}):(\d+)", reward["ports"][0]).groups()
    assert host_ip == "${REWARD_API_HOST:-127.0.0.1}" and host_ports.startswith("${REWARD_API_PORTS:-")
    assert container == "8100"
    assert "--http-port 8100" in reward["command"] and "--http-host 0.0.0.0" in reward["command"]
    assert reward["environment"]["RANKGUARD_REWARD_TOKEN"].startswith("${REWARD_API_TOKEN:?")
    env = dict(line.split("=", 1) for line in (deploy / ".env.example").read_text().splitlines()
               if line and not line.startswith("#"))
    assert env["REWARD_API_HOST"] == "127.0.0.1" and re.fullmatch(r"\d+-\d+", env["REWARD_API_PORTS"])
    assert env["REWARD_API_TOKEN"] == ""  # never a shipped secret
