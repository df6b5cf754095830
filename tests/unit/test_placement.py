"""GPU placement with a fake device list (analysis/placement.py, analysis/dispatch.py): which devices each
run gets, that no device is shared by two live runs unless runs_per_device says so, that runs wait for
free devices, and that every process's environment names exactly its own devices."""
from __future__ import annotations

import json
import threading
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import pytest

from analysis.dispatch import Dispatch, PlacedRun
from analysis.experiment import ExperimentError, run_experiment
from analysis.placement import (DevicePool, Needs, PlacementError, detect_devices, parse_devices, split)
from shared.config import resolve_config
from shared.rundir import OUTCOME_NEUTRAL, check_config_drift, prepare_run_dir

EIGHT = [str(i) for i in range(8)]


def full_cfg(tmp_path: Path, name: str = "vanilla/seed0", *overrides: str):
    return resolve_config("full", list(overrides), run_dir=str(tmp_path / name))


def test_device_lists_parse_and_detect():
    assert parse_devices("0,1,3") == ["0", "1", "3"] and parse_devices(" 2 , 5") == ["2", "5"]
    assert parse_devices("") == [] and parse_devices(None) is None
    assert parse_devices("GPU-a1b2,GPU-c3d4") == ["GPU-a1b2", "GPU-c3d4"]
    with pytest.raises(PlacementError, match="names a device twice"):
        parse_devices("0,1,0")
    with pytest.raises(PlacementError, match="bad device list '0,,1'"):
        parse_devices("0,,1")
    assert detect_devices({"CUDA_VISIBLE_DEVICES": "4,6"}, count=lambda: 8) == ["4", "6"]
    assert detect_devices({"CUDA_VISIBLE_DEVICES": ""}, count=lambda: 8) == []  # hidden on purpose
    assert detect_devices({}, count=lambda: 3) == ["0", "1", "2"]


def test_needs_follow_the_config(tmp_path):
    assert Needs.of(full_cfg(tmp_path), "services").total == 2  # full preset: learner 1 + rollout 1
    assert Needs.of(full_cfg(tmp_path, "a", "placement.colocate=true"), "services").total == 1
    assert Needs.of(full_cfg(tmp_path, "a", "pipeline.rollout_workers=3"), "services").total == 4
    assert Needs.of(full_cfg(tmp_path, "a", "placement.learner_gpus=2", "placement.colocate=true",
                             "pipeline.rollout_workers=3"), "services").total == 3
    assert Needs.of(full_cfg(tmp_path), "inprocess").total == 1  # one process does both jobs
    assert Needs.of(resolve_config("toy"), "services").total == 0
    with pytest.raises(PlacementError, match=r"vllm.tensor_parallel_size=2 needs placement.rollout_gpus >= 2 \(got 1\)"):
        Needs.of(full_cfg(tmp_path, "a", "vllm.tensor_parallel_size=2"), "services")


def test_split_gives_each_process_its_own_devices(tmp_path):
    p = split(Needs.of(full_cfg(tmp_path, "a", "pipeline.rollout_workers=2", "placement.rollout_gpus=2",
                                "vllm.tensor_parallel_size=2"), "services"), ["3", "4", "5", "6", "7"], "a")
    assert p.devices == ("3", "4", "5", "6", "7")
    assert p.processes == {"learner": ("3",), "rollout-0": ("4", "5"), "rollout-1": ("6", "7"), "reward": ()}
    assert p.env("learner") == {"CUDA_VISIBLE_DEVICES": "3"}
    assert p.env("rollout-1") == {"CUDA_VISIBLE_DEVICES": "6,7"}
    assert p.env("reward-0") == {"CUDA_VISIBLE_DEVICES": ""} and p.env("reward-7") == {"CUDA_VISIBLE_DEVICES": ""}
    shared = split(Needs.of(full_cfg(tmp_path, "b", "placement.colocate=true"), "services"), ["2"], "b")
    assert shared.processes == {"learner": ("2",), "rollout-0": ("2",), "reward": ()}
    one = split(Needs.of(full_cfg(tmp_path), "inprocess"), ["5"], "c")
    assert one.env("learner") == {"CUDA_VISIBLE_DEVICES": "5"}
    with pytest.raises(PlacementError, match="needs 2 GPU"):
        split(Needs.of(full_cfg(tmp_path), "services"), ["0"], "d")


def test_pool_assignments_table():
    """The documented packing: distinct devices per run, most free slots first, waiting when full."""
    pool = DevicePool(EIGHT)
    table = {f"run{i}": pool.try_acquire(2, f"run{i}") for i in range(5)}
    assert table == {"run0": ("0", "1"), "run1": ("2", "3"), "run2": ("4", "5"), "run3": ("6", "7"), "run4": None}
    pool.release(("2", "3"), "run1")
    assert pool.try_acquire(2, "run4") == ("2", "3")  # the freed pair, nothing else is free
    assert pool.try_acquire(1, "run5") is None
    # two runs per device, one device each: spread over all devices before doubling up
    pool2 = DevicePool(["0", "1", "2"], runs_per_device=2)
    got = [pool2.try_acquire(1, f"r{i}") for i in range(7)]
    assert got == [("0",), ("1",), ("2",), ("0",), ("1",), ("2",), None]
    assert pool.capacity(2) == 4 and pool2.capacity(1) == 6 and DevicePool(EIGHT).capacity(3) == 2


class GatedRunner:
    """A run that records what it was given and ends only when the test opens its gate."""

    def __init__(self):
        self.live: dict[str, tuple[str, ...]] = {}
        self.log: list[tuple[str, str, tuple[str, ...]]] = []
        self.envs: dict[str, dict[str, str]] = {}
        self.gates: dict[str, threading.Event] = {}
        self.cond = threading.Condition()
        self.overlaps: list[str] = []

    def __call__(self, cfg, placement) -> None:
        name = Path(cfg.run_dir).parent.name + "/" + Path(cfg.run_dir).name
        with self.cond:
            mine = set(placement.devices)
            self.overlaps += [f"{name} and {o}" for o, d in self.live.items() if mine & set(d)]
            self.live[name] = placement.devices
            self.log.append(("start", name, placement.devices))
            self.envs[name] = {p: placement.env(p)["CUDA_VISIBLE_DEVICES"] for p in ("learner", "rollout-0", "reward-0")}
            gate = self.gates.setdefault(name, threading.Event())
            self.cond.notify_all()
        assert gate.wait(30), f"{name} was never released"
        with self.cond:
            del self.live[name]
            self.log.append(("end", name, placement.devices))
            self.cond.notify_all()

    def wait_for(self, what, n: int) -> None:
        with self.cond:
            assert self.cond.wait_for(lambda: sum(e[0] == what for e in self.log) >= n, timeout=30), self.log

    def release(self, name: str) -> None:
        with self.cond:
            self.gates.setdefault(name, threading.Event()).set()


def test_runs_wait_for_free_devices_and_never_share_one(tmp_path):
    cfgs = [full_cfg(tmp_path, f"vanilla/seed{i}") for i in range(6)]
    pool, runner = DevicePool(EIGHT), GatedRunner()
    placed = PlacedRun(pool, "services", runner)
    with ThreadPoolExecutor(6) as ex:
        futures = [ex.submit(placed, c) for c in cfgs]
        runner.wait_for("start", 4)
        with runner.cond:  # four pairs are taken; the other two runs wait in the pool
            assert sorted(d for _, _, d in runner.log) == [("0", "1"), ("2", "3"), ("4", "5"), ("6", "7")]
            assert all(v == 0 for v in pool.free.values())
            first = {n: d for _, n, d in runner.log}
        waiting = sorted({f"vanilla/seed{i}" for i in range(6)} - set(first))
        assert len(waiting) == 2
        freed = sorted(first)[1]
        runner.release(freed)
        runner.wait_for("start", 5)
        with runner.cond:
            fifth = runner.log[-1]
            assert runner.log.index(("end", freed, first[freed])) < runner.log.index(fifth)  # after it ended
            assert fifth[1] in waiting and fifth[2] == first[freed]  # on the devices it freed
        for i in range(6):
            runner.release(f"vanilla/seed{i}")
        for f in futures:
            f.result(timeout=30)
    assert runner.overlaps == []
    assert all(v == 1 for v in pool.free.values()) and len(runner.log) == 12
    for name, env in runner.envs.items():  # learner on the first of the pair, rollout on the second, reward none
        a, b = dict((n, d) for _, n, d in runner.log)[name]
        assert env == {"learner": a, "rollout-0": b, "reward-0": ""}, name


def test_a_stop_ends_the_wait(tmp_path):
    pool = DevicePool(["0"])
    assert pool.try_acquire(1, "holder") == ("0",)
    stop = threading.Event()
    stop.set()
    from analysis.placement import PlacementStopped

    with pytest.raises(PlacementStopped, match="waited for 1 free GPU"):
        pool.acquire(1, "late", stop=stop, poll_s=0.01)


def test_plan_refuses_what_cannot_fit(tmp_path):
    cfgs = [full_cfg(tmp_path)]
    with pytest.raises(PlacementError, match=r"run vanilla/seed0 needs 2 GPU\(s\), the device list has 1: 3$"):
        Dispatch.plan(cfgs, "services", devices=["3"])
    with pytest.raises(PlacementError, match="the device list has none .*placement.learner_gpus=0"):
        Dispatch.plan(cfgs, "services", devices=[])
    with pytest.raises(PlacementError, match="unknown backend 'slurm'; valid backends: local, ray"):
        Dispatch.plan(cfgs, "services", backend="slurm")
    with pytest.raises(PlacementError, match="--ray-address needs --backend ray"):
        Dispatch.plan(cfgs, "services", ray_address="10.0.0.1:6379")
    d = Dispatch.plan([full_cfg(tmp_path, f"a/seed{i}") for i in range(9)], "services", devices=EIGHT)
    assert d.parallel == 4 and d.pool is not None  # as many as fit at once
    assert Dispatch.plan(cfgs, "services", devices=EIGHT, parallel=2).parallel == 2
    assert Dispatch.plan([full_cfg(tmp_path)], "services", devices=EIGHT, runs_per_device=2).parallel == 8
    cpu = Dispatch.plan([resolve_config("toy", run_dir=str(tmp_path / "t"))], "inprocess", devices=[],
                        default_parallel=2)
    assert cpu.pool is None and cpu.parallel == 2  # a CPU box: as before


def fake_services_run(cfg) -> None:
    run_dir = Path(cfg.run_dir)
    run_dir.mkdir(parents=True, exist_ok=True)
    with open(run_dir / "metrics.jsonl", "w") as f:
        for step in range(cfg.train.steps):
            f.write(json.dumps({"step": step, "hack_strict": 0.1, "pass_rate": 0.5}) + "\n")
    (run_dir / "DONE").write_text("ok\n")


def test_experiment_records_each_runs_devices(tmp_path):
    rec = run_experiment(preset="full", arms="vanilla,projected", seeds=3, out=tmp_path, mode="services", steps=2,
                         run_fn=fake_services_run, prepare_fn=lambda c: None, report=False, progress=False,
                         parallel=None, devices=["0", "1", "2", "3", "4", "5"])
    assert rec["status"] == "finished" and rec["backend"] == "local" and rec["parallel"] == 3
    assert rec["devices"] == ["0", "1", "2", "3", "4", "5"] and rec["runs_per_device"] == 1
    for r in rec["runs"]:
        assert len(r["devices"]) == 2 and r["placement"]["learner"] == r["devices"][0]
        assert r["placement"]["rollout-0"] == r["devices"][1] and r["placement"]["reward"] == ""
    with pytest.raises(ExperimentError, match="needs 2 GPU"):
        run_experiment(preset="full", arms="vanilla", seeds=1, out=tmp_path / "x", mode="services",
                       run_fn=fake_services_run, prepare_fn=lambda c: None, progress=False, devices=["0"])


class EnvRecorder:
    """An in-process run (in its spawned child) that writes down which devices its process sees."""

    def __call__(self, cfg) -> None:
        import os

        fake_services_run(cfg)
        (Path(cfg.run_dir) / "env.json").write_text(json.dumps({"visible": os.environ.get("CUDA_VISIBLE_DEVICES"),
                                                                "pid": os.getpid()}))


def test_inprocess_child_sees_only_its_devices(tmp_path):
    import os

    rec = run_experiment(preset="toy", arms="vanilla", seeds=2, out=tmp_path, mode="inprocess", steps=2,
                         overrides=["placement.learner_gpus=1"], run_fn=EnvRecorder(), prepare_fn=lambda c: None,
                         report=False, progress=False, parallel=None, devices=["7", "9"])
    assert rec["status"] == "finished" and rec["parallel"] == 2
    seen = {r["seed"]: json.loads((Path(r["run_dir"]) / "env.json").read_text()) for r in rec["runs"]}
    assert sorted(s["visible"] for s in seen.values()) == ["7", "9"]
    assert {s["visible"] for s in seen.values()} == {r["devices"][0] for r in rec["runs"]}
    assert os.getpid() not in {s["pid"] for s in seen.values()}  # a spawned child, never this process


def test_launcher_gives_each_service_its_devices(tmp_path):
    from services.launcher import Launcher

    cfg = full_cfg(tmp_path, "a", "pipeline.reward_workers=2")
    placement = split(Needs.of(cfg, "services"), ["4", "5"], "a")
    launcher = Launcher(cfg, console=False, child_env=placement.env)
    launcher.env = {"RANKGUARD_RUN_ID": "a", "CUDA_VISIBLE_DEVICES": "0,1,2,3,4,5,6,7"}
    assert launcher.env_for("learner") == {"RANKGUARD_RUN_ID": "a", "CUDA_VISIBLE_DEVICES": "4"}
    assert launcher.env_for("rollout-0")["CUDA_VISIBLE_DEVICES"] == "5"
    assert launcher.env_for("reward-1")["CUDA_VISIBLE_DEVICES"] == ""
    assert Launcher(cfg, console=False).env_for("learner") == {}  # no placement: the run's env as is


def test_placement_and_vllm_knobs_are_operational_not_identity(tmp_path):
    cfg = full_cfg(tmp_path)
    assert cfg.vllm.memory_fraction(colocate=False) == 0.9 and cfg.vllm.memory_fraction(colocate=True) == 0.45
    assert resolve_config("full", ["vllm.gpu_memory_utilization=0.7"]).vllm.memory_fraction(True) == 0.7
    saved = cfg.model_dump(mode="json")
    moved = full_cfg(tmp_path, "vanilla/seed0", "placement.learner_gpus=2", "placement.resources={\"a100\": 1}",
                     "vllm.tensor_parallel_size=1", "vllm.gpu_memory_utilization=0.8").model_dump(mode="json")
    assert not check_config_drift(saved, moved, OUTCOME_NEUTRAL)  # a finished grid cell stays done
    longer = full_cfg(tmp_path, "vanilla/seed0", "vllm.max_model_len=2048").model_dump(mode="json")
    assert "vllm.max_model_len" in check_config_drift(saved, longer, OUTCOME_NEUTRAL).describe()
    prepare_run_dir(cfg)
    again = prepare_run_dir(full_cfg(tmp_path, "vanilla/seed0", "placement.resources={\"a100\": 1}"))
    assert again.config.placement.resources == {"a100": 1.0}
    assert [c.key for c in again.amended] == ["placement.resources"]  # compared whole, amended whole


def test_ray_task_options_come_from_the_placement(tmp_path):
    from analysis.ray_backend import task_options

    opts = task_options(full_cfg(tmp_path, "vanilla/seed3", "placement.cpus=4", "placement.resources={\"a100\": 1}"),
                        "services", retries=5, environ={"RANKGUARD_ARTIFACTS": "/shared/art", "PATH": "/bin",
                                                        "HF_HUB_OFFLINE": "1"})
    assert (opts["num_gpus"], opts["num_cpus"], opts["resources"]) == (2, 4.0, {"a100": 1.0})
    assert opts["max_retries"] == 5 and opts["retry_exceptions"] is False and opts["name"] == "rankguard:vanilla/seed3"
    assert opts["runtime_env"]["env_vars"] == {"RANKGUARD_ARTIFACTS": "/shared/art", "HF_HUB_OFFLINE": "1",
                                               "OMP_NUM_THREADS": "1", "MKL_NUM_THREADS": "1",
                                               "TOKENIZERS_PARALLELISM": "false"}
    assert task_options(full_cfg(tmp_path), "inprocess", 3, environ={})["num_gpus"] == 1


def test_cli_grid_command_checks_devices_first(tmp_path):
    """The documented one-box command, with too few devices or a bad list: one error line, nothing run."""
    import typer
    from typer.testing import CliRunner

    from analysis.cli import register

    app = typer.Typer()
    register(app)

    @app.command("noop")
    def _noop() -> None:  # a second command so typer keeps sub-command names
        pass

    base = ["experiment", "--preset", "full", "--seeds", "3", "--out", str(tmp_path / "exp")]
    r = CliRunner().invoke(app, base + ["--devices", "0"])
    assert r.exit_code == 2, r.output
    assert [ln for ln in r.output.splitlines() if ln.strip()] == [
        "error: run vanilla/seed0 needs 2 GPU(s), the device list has 1: 0"]
    r = CliRunner().invoke(app, base + ["--devices", "0,0"])
    assert r.exit_code == 2 and "error: device list '0,0' names a device twice" in r.output
    r = CliRunner().invoke(app, base + ["--devices", "0,1", "--ray-address", "10.1.2.3:6379"])
    assert r.exit_code == 2 and "error: --ray-address needs --backend ray" in r.output
    assert not (tmp_path / "exp").exists()
    r = CliRunner().invoke(app, ["experiment", "--help"])
    assert r.exit_code == 0 and all(f in r.output for f in ("--devices", "--backend", "--ray-address",
                                                            "--runs-per-device", "--ray-retries"))


def test_ray_infeasible_names_what_is_missing(tmp_path):
    from analysis.ray_backend import infeasible, task_options

    opts = task_options(full_cfg(tmp_path, "vanilla/seed0", "placement.resources={\"a100\": 1}"), "services", 3,
                        environ={})
    gpu8 = {"Alive": True, "Resources": {"CPU": 64.0, "GPU": 8.0, "a100": 8.0}}
    assert infeasible(opts, [gpu8]) is None
    cpu_only = {"Alive": True, "Resources": {"CPU": 2.0, "memory": 1e9}}
    assert infeasible(opts, [cpu_only]) == ("no Ray node has CPU 1, GPU 2, a100 1 (per node: CPU 2)")
    assert infeasible(opts, [{**gpu8, "Alive": False}]) == "no Ray node has CPU 1, GPU 2, a100 1 (per node: no live node)"
