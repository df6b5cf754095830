"""deploy/: the compose file parses and agrees with the code (no Docker engine here to run it)."""
import re
from pathlib import Path

import pytest
import yaml

from services import queues
from services.procs import HEALTH_ENV
from services.pipeline_cli import WORKERS

DEPLOY = Path(__file__).resolve().parents[2] / "deploy"


@pytest.fixture(scope="module")
def compose():
    return yaml.safe_load((DEPLOY / "docker-compose.yml").read_text())


def env_defaults() -> dict[str, str]:
    out = {}
    for line in (DEPLOY / ".env.example").read_text().splitlines():
        if line.strip() and not line.startswith("#"):
            k, _, v = line.partition("=")
            out[k] = v
    return out


def test_services_and_dependencies(compose):
    svc = compose["services"]
    assert set(svc) == {"redis", "init", "reward", "rollout", "learner"}
    for name in ("reward", "rollout", "learner"):
        dep = svc[name]["depends_on"]
        assert dep["redis"]["condition"] == "service_healthy"
        assert dep["init"]["condition"] == "service_completed_successfully"


def test_gpu_reservations(compose):
    for name in ("rollout", "learner"):
        devices = compose["services"][name]["deploy"]["resources"]["reservations"]["devices"]
        assert devices[0]["driver"] == "nvidia" and devices[0]["capabilities"] == ["gpu"]
    assert "deploy" not in compose["services"]["reward"]  # CPU only


def test_reward_is_scalable(compose):
    reward = compose["services"]["reward"]
    assert "container_name" not in reward  # `--scale reward=8` needs generated names
    # published on a host port *range* (one per replica), so --scale does not collide on one port
    assert reward["ports"] == ["${REWARD_API_HOST:-127.0.0.1}:${REWARD_API_PORTS:-8100-8115}:8100"]
    assert "--http-port" in reward["command"]


def test_healthchecks(compose):
    for name, svc in compose["services"].items():
        if name == "init":
            continue
        test = svc["healthcheck"]["test"]
        assert test[0] == "CMD"
        if name != "redis":
            assert test[1:4] == ["rankguard", "health", "--service"] and test[4] == name
            assert svc["environment"][HEALTH_ENV].endswith(f"{name}.health")


def test_volumes_declared_and_used(compose):
    declared = set(compose["volumes"])
    assert {"runs", "hf-cache", "svd-cache", "redis-data"} <= declared
    used = set()
    for svc in compose["services"].values():
        for v in svc.get("volumes", []):
            used.add(v.split(":")[0])
    assert used == declared
    # issue #21: checkpoints live in the run's own folder of the runs volume (one volume mounted at
    # /runs/${RUN_NAME}/checkpoints for every RUN_NAME let run B resume run A's checkpoints)
    for svc in compose["services"].values():
        assert not any("/checkpoints" in v for v in svc.get("volumes", [])), svc["volumes"]
    assert "runs:/runs" in compose["services"]["learner"]["volumes"]
    assert "--set model.svd_cache_dir=/cache/svd" in compose["services"]["init"]["command"]


def test_commands_match_the_code(compose):
    svc = compose["services"]
    config_paths = set()
    for name in ("reward", "rollout", "learner"):
        cmd = svc[name]["command"].split()
        assert cmd[:3] == ["rankguard", "worker", name] and name in WORKERS
        config_paths.add(cmd[cmd.index("--config") + 1])
    init = svc["init"]["command"].split()
    assert init[:2] == ["rankguard", "prepare"]
    run_dir = init[init.index("--run-dir") + 1]
    assert config_paths == {f"{run_dir}/config.json"}  # everyone reads what init wrote


def test_env_vars_are_the_ones_the_code_reads(compose):
    env = compose["x-common-env"]
    assert env[queues.REDIS_URL_ENV] == "redis://redis:6379/0"
    assert queues.RUN_ID_ENV in env and "RANKGUARD_CLAIM_IDLE_S" in env
    src = (Path(queues.__file__)).read_text()
    assert '"RANKGUARD_CLAIM_IDLE_S"' in src
    for svc in ("reward", "rollout", "learner"):
        assert compose["services"][svc]["environment"][queues.REDIS_URL_ENV] == "redis://redis:6379/0"


def test_every_compose_variable_has_an_example():
    text = (DEPLOY / "docker-compose.yml").read_text()
    used = set(re.findall(r"\$\{([A-Z_]+)(?::-[^}]*)?\}", text))
    assert used <= set(env_defaults()), used - set(env_defaults())
    assert env_defaults()["PRESET"] in ("toy", "lite", "qwen35-2b", "full")


def test_dockerfiles_exist_and_copy_the_packages(compose):
    for name in ("init", "reward"):
        build = compose["services"][name]["build"]
        df = DEPLOY.parent / build["dockerfile"]
        assert df.exists() and build["context"] == ".."
        text = df.read_text()
        for pkg in ("shared", "learner", "rollout", "reward_server", "services"):
            assert f"COPY {pkg} /app/{pkg}" in text
    assert "requirements-gpu.txt" in (DEPLOY / "Dockerfile.gpu").read_text()
    assert compose["services"]["rollout"]["image"] == compose["services"]["init"]["image"]


def test_readme_walks_through_compose_up():
    text = (DEPLOY / "README.md").read_text()
    assert "docker compose -f deploy/docker-compose.yml --env-file deploy/.env up --scale reward=8" in text
    assert "cp deploy/.env.example deploy/.env" in text
