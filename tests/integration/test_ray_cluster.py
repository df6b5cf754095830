"""`rankguard experiment --backend ray` on a local two-node Ray cluster (ray.cluster_utils.Cluster: head +
one worker node, each declaring one GPU that stands in for a real one): a 2-arm x 2-seed toy grid, the
worker node killed while one of its runs is mid-way. That run must be retried on the head node, resume
from its checkpoint in the shared run folder, and every run must end with DONE and each step's metrics
row exactly once.

Loopback: Ray rewrites 127.0.0.1 / localhost in an address to the machine's interface address
(`ray._private.services.resolve_ip_for_localhost`, ray-project/ray#59110), so nodes started with
node_ip_address=127.0.0.1 are then looked for on another address and the driver times out. Any other
127.x.y.z is left as it is and still routed over `lo` on Linux, so the nodes are started with
`node_ip_address` 127.0.0.2 (the ray_params behind `ray start --node-ip-address`): every node registers,
and is reached, on loopback. (Ray's GCS and raylets still listen on the wildcard address; Ray 2.60
enables token authentication by default.)
"""
from __future__ import annotations

import json
import shutil
import subprocess
import threading
import time
from pathlib import Path

import pytest

ray = pytest.importorskip("ray")

LOOPBACK = "127.0.0.2"
STEPS = 8
KILL_AFTER_ROWS = 3  # the step-2 checkpoint exists, the run is not finished


def _node_args() -> dict:
    return {"num_cpus": 1, "num_gpus": 1, "node_ip_address": LOOPBACK, "include_dashboard": False,
            "object_store_memory": 80 * 1024 * 1024}


def _rows(run_dir: Path) -> list[int]:
    path = run_dir / "metrics.jsonl"
    return [json.loads(line)["step"] for line in path.read_text().splitlines() if line.strip()] if path.exists() else []


def _ray_pids(session_dir: str) -> list[int]:
    """Processes whose command line names this test's Ray session (raylet, gcs, workers, agents)."""
    out = subprocess.run(["pgrep", "-f", session_dir], capture_output=True, text=True).stdout.split()
    return [int(p) for p in out]


@pytest.mark.slow
def test_grid_on_two_nodes_survives_a_node_kill(tmp_path, monkeypatch, capfd):
    from ray.cluster_utils import Cluster

    from analysis.experiment import run_experiment
    from analysis.ray_backend import read_attempts

    monkeypatch.setenv("RANKGUARD_ARTIFACTS", str(tmp_path / "artifacts"))  # forwarded to the Ray workers
    monkeypatch.delenv("RAY_ADDRESS", raising=False)
    t0 = time.monotonic()
    cluster = Cluster(initialize_head=True, head_node_args=_node_args())
    session = cluster.head_node.get_session_dir_path()
    try:
        worker = cluster.add_node(**_node_args())
        head_id, worker_id = cluster.head_node.node_id, worker.node_id
        assert cluster.head_node.node_ip_address == worker.node_ip_address == LOOPBACK
        out = tmp_path / "exp"
        result: dict = {}

        def experiment() -> None:
            try:
                result["rec"] = run_experiment(
                    preset="toy", arms="vanilla,projected", seeds=2, out=out, mode="inprocess", steps=STEPS,
                    overrides=["train.checkpoint_every=2", "train.eval_every=0", "train.eval_problems=4",
                               "train.eval_samples=2", "placement.learner_gpus=1"],
                    backend="ray", ray_address=cluster.address, ray_retries=2, parallel=None, progress=False,
                    report=True)
            except BaseException as e:  # noqa: BLE001 - re-raised in the test thread
                result["error"] = e

        thread = threading.Thread(target=experiment, daemon=True)
        thread.start()
        victim = None
        deadline = time.monotonic() + 150
        while victim is None and thread.is_alive() and time.monotonic() < deadline:
            for run_dir in sorted(out.glob("*/seed*")):
                tries = read_attempts(run_dir)
                if tries and tries[-1]["node_id"] == worker_id and len(_rows(run_dir)) >= KILL_AFTER_ROWS:
                    victim = run_dir
                    break
            time.sleep(0.1)
        assert victim is not None, f"no run reached {KILL_AFTER_ROWS} steps on the worker node: {result}"
        rows_at_kill = len(_rows(victim))
        assert rows_at_kill < STEPS, "the run finished before the kill; nothing was tested"
        cluster.remove_node(worker)
        t_kill = time.monotonic() - t0
        thread.join(timeout=200)
        assert not thread.is_alive(), "the experiment did not finish after the node kill"
        if "error" in result:
            raise result["error"]
        rec = result["rec"]
    finally:
        if ray.is_initialized():
            ray.shutdown()
        cluster.shutdown()
    wall = time.monotonic() - t0
    logs = capfd.readouterr()

    assert rec["status"] == "finished" and rec["backend"] == "ray", rec
    assert [r["status"] for r in rec["runs"]] == ["finished"] * 4
    for r in rec["runs"]:
        run_dir = Path(r["run_dir"])
        assert (run_dir / "DONE").exists(), run_dir
        assert _rows(run_dir) == list(range(STEPS)), (run_dir, _rows(run_dir))  # every step once, in order
        tries = read_attempts(run_dir)
        assert all("done" in t for t in tries[-1:]) and all(t["gpus"] == ["0"] for t in tries)
        if run_dir == victim:
            assert [t["node_id"] for t in tries] == [worker_id, head_id]  # killed there, finished here
            assert "done" not in tries[0]
            assert tries[1]["steps_on_disk"] >= rows_at_kill - 1  # found the dead attempt's rows on disk
            assert 2 <= tries[1]["resumed_at_step"] <= rows_at_kill  # from a checkpoint, not from step 0
            assert tries[1]["resumed_at_step"] % 2 == 0
            assert [a["node_id"] for a in r["attempts"]] == [worker_id, head_id]
        else:
            assert len(tries) == 1 and tries[0]["resumed_at_step"] == 0
    assert Path(rec["report"]).exists()  # the report read the shared runs folder
    assert _ray_pids(session) == []  # every raylet, GCS and worker of this cluster is gone
    shutil.rmtree(session, ignore_errors=True)  # its logs
    with capfd.disabled():
        victim_name = f"{victim.parent.name}/{victim.name}"
        excerpt = [line for line in (logs.out + logs.err).splitlines()
                   if "node it was running on is dead" in line or ("rankguard:" in line and victim_name in line)
                   or ("resumed" in line and victim.name in line)]
        print(f"\nray grid: wall {wall:.1f} s, node killed at {t_kill:.1f} s with {rows_at_kill} rows of "
              f"{victim_name}\n" + "\n".join(excerpt[:12]))


def fake_run(cfg) -> None:
    """A run's outputs without the training (picklable: it travels to the Ray worker)."""
    import os

    run_dir = Path(cfg.run_dir)
    run_dir.mkdir(parents=True, exist_ok=True)
    with open(run_dir / "metrics.jsonl", "w") as f:
        for step in range(cfg.train.steps):
            f.write(json.dumps({"step": step, "hack_strict": 0.1, "pass_rate": 0.5}) + "\n")
    (run_dir / "seen.json").write_text(json.dumps({"omp": os.environ.get("OMP_NUM_THREADS"), "pid": os.getpid(),
                                                   "art": os.environ.get("RANKGUARD_ARTIFACTS")}))
    (run_dir / "DONE").write_text("ok\n")


@pytest.mark.slow
def test_embedded_ray_is_the_default_and_is_stopped_after(tmp_path, monkeypatch):
    """No --ray-address: the experiment starts its own Ray instance, runs each run as a task in a Ray
    worker process (one OMP thread, the command's RANKGUARD_* variables), and stops it at the end."""
    import os

    from analysis.experiment import run_experiment

    import sys

    from ray import cloudpickle

    cloudpickle.register_pickle_by_value(sys.modules[__name__])  # Ray workers cannot import tests/
    monkeypatch.delenv("RAY_ADDRESS", raising=False)
    monkeypatch.setenv("RANKGUARD_ARTIFACTS", str(tmp_path / "art"))
    assert not ray.is_initialized()
    rec = run_experiment(preset="toy", arms="vanilla", seeds=2, out=tmp_path / "exp", mode="inprocess", steps=3,
                         run_fn=fake_run, prepare_fn=lambda c: None, report=False, progress=False, parallel=None,
                         backend="ray")
    assert rec["status"] == "finished" and rec["ray_address"] == "embedded" and rec["parallel"] == 2
    for r in rec["runs"]:
        seen = json.loads((Path(r["run_dir"]) / "seen.json").read_text())
        assert seen["omp"] == "1" and seen["art"] == str(tmp_path / "art") and seen["pid"] != os.getpid()
        assert len(r["attempts"]) == 1 and r["attempts"][0]["gpus"] == [] and "done" in r["attempts"][0]
    assert not ray.is_initialized()  # the experiment's own instance is gone
