"""Experiment runner with an injected fake run function: plan/layout, skip finished runs, resume
interrupted ones, refuse a folder with a different config, prepare once, bad arm/seed/mode errors."""
from __future__ import annotations

import json
import os
from pathlib import Path

import pytest
import typer
from typer.testing import CliRunner

from analysis.experiment import (ExperimentError, parse_arms, parse_seeds, plan_runs, run_experiment,
                                 run_progress)
from shared.config import ARMS, RunConfig

VALID = (f"valid arms: {', '.join(ARMS)}, or exploratory names such as projected_svd5, mechanism, placebo, "
         "weak_flagged, oracle (shared/arms.py)")


class FakeTrainer:
    """Writes what the trainer writes (config.json, metrics/evals rows, DONE), optionally dying mid-run."""

    def __init__(self, die_at: dict[str, int] | None = None, fail: set[str] = frozenset()):
        self.calls: list[tuple[str, int]] = []  # (arm/seed, first step of this call)
        self.die_at, self.fail = dict(die_at or {}), set(fail)

    def __call__(self, cfg: RunConfig) -> dict:
        run_dir = Path(cfg.run_dir)
        name = f"{run_dir.parent.name}/seed{cfg.train.seed}"  # the arm's registry name is the folder
        run_dir.mkdir(parents=True, exist_ok=True)
        if not (run_dir / "config.json").exists():
            cfg.save()
        start, _ = run_progress(run_dir)
        self.calls.append((name, start))
        if name in self.fail:
            raise RuntimeError("boom")
        stop = self.die_at.pop(name, None)
        with open(run_dir / "metrics.jsonl", "a") as m, open(run_dir / "evals.jsonl", "a") as e:
            for step in range(start, cfg.train.steps):
                if step == stop:
                    raise KeyboardInterrupt
                hack = 0.5 if cfg.train.arm == "vanilla" else 0.1 + 0.05 * (run_dir.parent.name == "mechanism")
                m.write(json.dumps({"step": step, "hack_strict": hack, "pass_rate": 0.4, "t_generate": 0.01}) + "\n")
                m.flush()
                if (step + 1) % cfg.train.eval_every == 0:
                    e.write(json.dumps({"step": step + 1, "hack_strict": hack, "pass_rate": 0.4, "kl": 0.0}) + "\n")
        (run_dir / "DONE").write_text("ok\n")
        return {}


def _run(tmp_path, fake, prepared=None, **kw):
    kw.setdefault("arms", "vanilla,projected")
    kw.setdefault("seeds", 2)
    return run_experiment(preset="toy", out=tmp_path, mode="inprocess", steps=4,
                          overrides=["train.eval_every=2"], run_fn=fake,
                          prepare_fn=(lambda cfgs: prepared.append([c.run_dir for c in cfgs]) if prepared is not None
                                      else None),
                          progress=False, **kw)


def test_plan_layout_and_overrides(tmp_path):
    runs = plan_runs("toy", ["vanilla", "weak"], [0, 1], tmp_path, steps=7, overrides=["train.lr=0.5"])
    assert [r.name for r in runs] == ["vanilla/seed0", "weak/seed0", "vanilla/seed1", "weak/seed1"]  # seed-major
    assert runs[1].run_dir == tmp_path / "weak" / "seed0"
    assert runs[3].cfg.train.steps == 7 and runs[3].cfg.train.seed == 1 and runs[3].cfg.train.lr == 0.5


def test_runs_then_skips_finished(tmp_path):
    fake, prepared = FakeTrainer(), []
    rec = _run(tmp_path, fake, prepared)
    assert [c for c, _ in fake.calls] == ["vanilla/seed0", "projected/seed0", "vanilla/seed1", "projected/seed1"]
    assert len(prepared) == 1 and len(prepared[0]) == 4  # artifacts prepared once, before all runs
    on_disk = json.loads((tmp_path / "experiment.json").read_text())
    assert on_disk["arms"] == ["vanilla", "projected"] and on_disk["seeds"] == [0, 1] and on_disk["steps"] == 4
    assert on_disk["mode"] == "inprocess" and on_disk["status"] == "finished" and on_disk["preset"] == "toy"
    assert all(r["status"] == "finished" and r["wall_s"] is not None for r in on_disk["runs"])
    assert on_disk["runs"][0]["timing"]["steps_logged"] == 4
    assert rec["report"].endswith("report.md") and (tmp_path / "pareto.png").exists()
    md = (tmp_path / "report.md").read_text()
    assert "| Ours (b) n=2 | 40.0 ± 0.0 | 10.0 ± 0.0 | 40.0 ± 0.0 |" in md

    fake2, prepared2 = FakeTrainer(), []
    rec2 = _run(tmp_path, fake2, prepared2)
    assert fake2.calls == [] and prepared2 == []  # all four skipped, nothing to prepare
    assert {r["status"] for r in rec2["runs"]} == {"skipped"}
    # the skipped runs keep the timings recorded when they ran
    assert [r["wall_s"] for r in rec2["runs"]] == [r["wall_s"] for r in on_disk["runs"]]
    assert rec2["runs"][0]["timing"]["steps_logged"] == 4
    # the first invocation's totals survive the re-run in its history
    assert [h["wall_s"] for h in rec2["history"]] == [on_disk["wall_s"]]
    assert rec2["history"][0]["status"] == "finished" and rec2["history"][0]["started"] == on_disk["started"]


def test_interrupted_run_resumes_where_it_stopped(tmp_path):
    fake = FakeTrainer(die_at={"projected/seed0": 2})
    with pytest.raises(KeyboardInterrupt):
        _run(tmp_path, fake, report=False)
    rec = json.loads((tmp_path / "experiment.json").read_text())
    assert rec["status"] == "interrupted"
    assert [r["status"] for r in rec["runs"]] == ["finished", "interrupted", "pending", "pending"]
    assert not (tmp_path / "projected" / "seed0" / "DONE").exists()

    fake2 = FakeTrainer()
    rec2 = _run(tmp_path, fake2, report=False)
    assert fake2.calls == [("projected/seed0", 2), ("vanilla/seed1", 0), ("projected/seed1", 0)]
    states = {f"{r['arm']}/seed{r['seed']}": r["state_before"] for r in rec2["runs"]}
    assert states == {"vanilla/seed0": "done", "projected/seed0": "resume", "vanilla/seed1": "new",
                      "projected/seed1": "new"}
    assert run_progress(tmp_path / "projected" / "seed0")[0] == 4


def test_failed_run_is_recorded_and_others_continue(tmp_path):
    fake = FakeTrainer(fail={"vanilla/seed0"})
    rec = _run(tmp_path, fake, seeds=1, report=False)
    assert [c for c, _ in fake.calls] == ["vanilla/seed0", "projected/seed0"]
    assert rec["status"] == "failed"
    assert rec["runs"][0]["status"] == "failed" and rec["runs"][0]["error"] == "RuntimeError: boom"
    assert rec["runs"][1]["status"] == "finished"


def test_folder_with_other_config_is_refused(tmp_path):
    _run(tmp_path, FakeTrainer(), seeds=1, report=False)
    with pytest.raises(ExperimentError, match=r"different config: train\.steps: 4 \(on disk\) != 6 \(planned\)"):
        run_experiment(preset="toy", arms="vanilla", seeds=1, out=tmp_path, mode="inprocess", steps=6,
                       overrides=["train.eval_every=2"], run_fn=FakeTrainer(), prepare_fn=lambda c: None,
                       progress=False, report=False)


def test_bad_arms_seeds_mode():
    with pytest.raises(ExperimentError) as e:
        parse_arms("vanilla,projectd")
    assert str(e.value) == f"unknown arm 'projectd'; {VALID}"
    with pytest.raises(ExperimentError, match="bad arm name 'projected_svdx': unknown arm part 'svdx'"):
        parse_arms("projected_svdx")
    with pytest.raises(ExperimentError, match="no arms given; valid arms: vanilla"):
        parse_arms(" , ")
    assert parse_arms("weak, vanilla,weak") == ["weak", "vanilla"]
    assert parse_seeds("3") == [0, 1, 2] and parse_seeds("41,42") == [41, 42] and parse_seeds("7,") == [7]
    with pytest.raises(ExperimentError, match="bad --seeds 'x'"):
        parse_seeds("x")
    with pytest.raises(ExperimentError, match="bad --seeds '0'"):
        parse_seeds("0")
    with pytest.raises(ExperimentError, match="unknown mode 'local'; valid modes: services, inprocess"):
        run_experiment(mode="local", arms="vanilla", run_fn=FakeTrainer(), progress=False)


def test_cli_bad_arm_is_one_error_line(tmp_path):
    from analysis.cli import register

    app = typer.Typer()
    register(app)

    @app.command("noop")
    def _noop() -> None:  # a second command so typer keeps sub-command names
        pass

    r = CliRunner().invoke(app, ["experiment", "--arms", "vanilla,bogus", "--out", str(tmp_path)])
    assert r.exit_code == 2
    lines = [ln for ln in r.output.splitlines() if ln.strip()]
    assert lines == [f"error: unknown arm 'bogus'; {VALID}"]
    r = CliRunner().invoke(app, ["experiment", "--help"])
    assert r.exit_code == 0 and "--seeds" in r.output and "skipped" in r.output


def test_parallel_runs_overlap_and_all_finish(tmp_path):
    import threading
    import time

    live, peak, lock = [0], [0], threading.Lock()
    inner = FakeTrainer()

    def fake(cfg: RunConfig) -> dict:
        with lock:
            live[0] += 1
            peak[0] = max(peak[0], live[0])
        try:
            time.sleep(0.3)  # long enough that two runs must overlap
            return inner(cfg)
        finally:
            with lock:
                live[0] -= 1

    run_experiment(preset="toy", out=tmp_path, mode="services", steps=4, arms="vanilla,projected", seeds=2,
                         overrides=["train.eval_every=2"], run_fn=fake, prepare_fn=lambda c: None,
                         progress=False, report=False, parallel=2)
    assert peak[0] == 2 and sorted(c for c, _ in inner.calls) == sorted(
        ["vanilla/seed0", "projected/seed0", "vanilla/seed1", "projected/seed1"])
    on_disk = json.loads((tmp_path / "experiment.json").read_text())
    assert on_disk["parallel"] == 2 and on_disk["status"] == "finished"
    assert all(r["status"] == "finished" and r["timing"]["steps_logged"] == 4 for r in on_disk["runs"])


def test_parallel_must_be_positive(tmp_path):
    with pytest.raises(ExperimentError, match="parallel must be >= 1, got 0"):
        run_experiment(preset="toy", out=tmp_path, mode="services", arms="vanilla", run_fn=FakeTrainer(),
                       progress=False, parallel=0)


def test_config_written_before_a_field_existed_still_matches():
    from analysis.experiment import config_diff
    from shared.config import resolve_config

    planned = resolve_config("toy").model_dump(mode="json")
    old = json.loads(json.dumps(planned))
    del old["train"]["measure_kl"], old["pipeline"]["claim_idle_s"]  # a config.json from before these fields
    assert config_diff(old, planned) == []
    changed = resolve_config("toy", ["train.measure_kl=false"]).model_dump(mode="json")
    assert config_diff(old, changed) == ["train.measure_kl: None (on disk) != False (planned)"]
    assert config_diff(planned, resolve_config("toy", ["train.lr=0.5"]).model_dump(mode="json")) == [
        "train.lr: 0.01 (on disk) != 0.5 (planned)"]


# ---------------------------------------------------------------- arm registry, oracle arm, in-process --parallel

def test_plan_resolves_registry_names_into_real_configs(tmp_path):
    runs = plan_runs("toy", ["vanilla", "projected_svd5", "mechanism", "placebo", "weak_flagged", "oracle"], [0, 1],
                     tmp_path, steps=5)
    by = {r.name: r for r in runs}
    assert [r.name for r in runs][-2:] == ["oracle/seed0", "oracle/seed1"]  # after every other run
    assert by["projected_svd5/seed0"].run_dir == tmp_path / "projected_svd5" / "seed0"
    c = by["projected_svd5/seed1"].cfg
    assert (c.train.arm, c.vhack.basis, c.vhack.k, c.train.seed, c.train.steps) == ("projected", "svd", 5, 1, 5)
    assert by["mechanism/seed0"].cfg.vhack.pair_set == "mechanism" and by["placebo/seed0"].cfg.train.arm == "projected"
    wf = by["weak_flagged/seed0"].cfg
    assert wf.train.arm == "route" and wf.vhack.from_rollouts and wf.train.vhack_modes == ["A", "B"]
    o0, o1 = by["oracle/seed0"], by["oracle/seed1"]
    assert o0.cfg.train.arm == "projected" and o0.oracle_source == 1 and o1.oracle_source == 0
    assert o0.cfg.vhack_path == str(tmp_path / "artifacts" / "v_oracle-vanilla-seed1.safetensors")
    assert by["vanilla/seed0"].cfg.vhack_path is None


def test_oracle_source_seed_is_the_next_seed_cyclically():
    from analysis.experiment import oracle_source_seed

    seeds = [3, 5, 9]
    assert [oracle_source_seed(seeds, s) for s in seeds] == [5, 9, 3]
    assert [oracle_source_seed(list(range(8)), s) for s in range(8)] == [1, 2, 3, 4, 5, 6, 7, 0]
    with pytest.raises(ExperimentError, match="arm oracle needs >= 2 seeds"):
        plan_runs("toy", ["vanilla", "oracle"], [0], Path("x"))
    with pytest.raises(ExperimentError, match="arm oracle needs vanilla in --arms"):
        plan_runs("toy", ["projected", "oracle"], [0, 1], Path("x"))


def test_oracle_runs_after_the_vanilla_runs_with_the_next_seeds_direction(tmp_path):
    events: list[str] = []
    inner = FakeTrainer(fail={"vanilla/seed9"})

    def fake_run(cfg: RunConfig) -> dict:
        name = f"{Path(cfg.run_dir).parent.name}/seed{cfg.train.seed}"
        events.append(f"run {name}")
        if name.startswith("oracle/"):
            assert cfg.train.arm == "projected" and Path(cfg.vhack_path).read_text().startswith("v_oracle of")
        return inner(cfg)

    def fake_oracle(src_dir: Path, out_path: Path) -> None:
        events.append(f"oracle {src_dir.parent.name}/{src_dir.name} -> {out_path.name}")
        out_path.parent.mkdir(parents=True, exist_ok=True)
        out_path.write_text(f"v_oracle of {src_dir}")

    prepared = []
    rec = run_experiment(preset="toy", out=tmp_path, mode="inprocess", steps=4, arms="vanilla,projected,oracle",
                         seeds="3,5,9", overrides=["train.eval_every=2"], run_fn=fake_run, oracle_fn=fake_oracle,
                         prepare_fn=lambda cfgs: prepared.extend(cfgs), progress=False, report=False)
    first_oracle = next(i for i, e in enumerate(events) if e.startswith("oracle"))
    assert all(not e.startswith("run oracle") for e in events[:first_oracle])
    assert sum(e.startswith("run vanilla") or e.startswith("run projected") for e in events[:first_oracle]) == 6
    assert [e for e in events if e.startswith("oracle")] == [
        "oracle vanilla/seed5 -> v_oracle-vanilla-seed5.safetensors",  # for oracle seed 3
        "oracle vanilla/seed3 -> v_oracle-vanilla-seed3.safetensors"]  # for oracle seed 9; vanilla/seed9 failed
    assert [e for e in events if e.startswith("run oracle")] == ["run oracle/seed3", "run oracle/seed9"]
    st = {f"{r['arm']}/seed{r['seed']}": r for r in rec["runs"]}
    assert st["oracle/seed3"]["status"] == "finished" and st["oracle/seed3"]["oracle_source_seed"] == 5
    assert st["oracle/seed5"]["status"] == "failed"
    assert st["oracle/seed5"]["error"] == "no v_oracle from vanilla/seed9: source run vanilla/seed9 is not finished"
    assert rec["oracle"]["sources"]["9"]["error"].endswith("is not finished")
    # prepare never sees an oracle run's vhack_path (it would fill it with an authored v_hack)
    oracle_prep = [c for c in prepared if Path(c.run_dir).parent.name == "oracle"]
    assert len(oracle_prep) == 3 and all(c.vhack_path is None and c.train.arm == "vanilla" for c in oracle_prep)

    events.clear()
    inner.fail.clear()
    rec2 = run_experiment(preset="toy", out=tmp_path, mode="inprocess", steps=4, arms="vanilla,projected,oracle",
                          seeds="3,5,9", overrides=["train.eval_every=2"], run_fn=fake_run, oracle_fn=fake_oracle,
                          prepare_fn=lambda cfgs: None, progress=False, report=False)
    assert events == ["run vanilla/seed9", "oracle vanilla/seed9 -> v_oracle-vanilla-seed9.safetensors",
                      "run oracle/seed5"]  # finished runs and existing directions are reused
    assert rec2["status"] == "finished"


def test_report_names_exploratory_arms_by_their_folder(tmp_path):
    run_experiment(preset="toy", out=tmp_path, mode="inprocess", steps=4, arms="vanilla,projected,mechanism",
                   seeds=2, overrides=["train.eval_every=2"], run_fn=FakeTrainer(), prepare_fn=lambda c: None,
                   progress=False)
    md = (tmp_path / "report.md").read_text()
    assert "Exploratory arms (not preregistered; the preregistered check below uses only the spec's arms): " \
           "`mechanism`." in md
    assert "| Ours (b) n=2 | 40.0 ± 0.0 | 10.0 ± 0.0 | 40.0 ± 0.0 |" in md  # its own row, not merged with mechanism
    assert "| mechanism n=2 | 35.0 ± 0.0 | 15.0 ± 0.0 | 40.0 ± 0.0 |" in md


def test_report_labels_the_oracle_arm_a_cheat():
    from analysis.report import exploratory_line

    line = exploratory_line(["vanilla", "projected", "oracle", "placebo"])
    assert "`oracle` (ceiling: projects against v_oracle from another seed's vanilla rollouts, a cheat)" in line
    assert "`placebo`" in line and "`projected`" not in line
    assert exploratory_line(["vanilla", "rebound"]) is None


def test_toy_defaults_are_eight_seeds_in_process():
    from analysis.experiment import default_mode, default_parallel, default_seeds

    assert default_seeds("toy") == 8 and default_mode("toy") == "inprocess" and default_parallel("toy") == 2
    assert default_seeds("full") == 3 and default_mode("full") == "services" and default_parallel("full") == 1


class ChildRecorder(FakeTrainer):
    """Runs in a spawned child: notes its pid and torch threads, then waits (hang guard `wait_s`) until two
    runs have started, counting the runs live at that moment (marker files next to the run dirs, so the
    concurrency is read from the order of events, not from wall-clock intervals), then trains (fake)."""

    def __init__(self, wait_s: float = 120.0):
        super().__init__()
        self.wait_s = wait_s

    def __call__(self, cfg: RunConfig) -> dict:
        import os
        import time

        import torch

        shared = Path(cfg.run_dir).parent
        shared.mkdir(parents=True, exist_ok=True)
        live = shared / f"live-{os.getpid()}"
        live.write_text("1")
        (shared / f"started-{os.getpid()}").write_text("1")
        deadline = time.monotonic() + self.wait_s  # hang guard only
        while len(list(shared.glob("started-*"))) < 2 and time.monotonic() < deadline:
            time.sleep(0.05)
        seen_live = len(list(shared.glob("live-*")))
        out = super().__call__(cfg)
        live.unlink()
        (Path(cfg.run_dir) / "child.json").write_text(json.dumps(
            {"pid": os.getpid(), "threads": torch.get_num_threads(), "live": seen_live,
             "started": len(list(shared.glob("started-*")))}))
        return out


def test_parallel_inprocess_runs_in_separate_processes(tmp_path):
    import os

    rec = run_experiment(preset="toy", out=tmp_path, mode="inprocess", steps=4, arms="vanilla", seeds=3,
                         overrides=["train.eval_every=2"], run_fn=ChildRecorder(), prepare_fn=lambda c: None,
                         progress=False, report=False, parallel=2)
    assert rec["status"] == "finished" and rec["parallel"] == 2 and rec["mode"] == "inprocess"
    kids = [json.loads((Path(r["run_dir"]) / "child.json").read_text()) for r in rec["runs"]]
    assert len({k["pid"] for k in kids}) == 3 and os.getpid() not in {k["pid"] for k in kids}
    assert all(k["threads"] == 1 for k in kids)
    # concurrency from the order of events: a run waits until two have started, and never sees three live
    assert max(k["live"] for k in kids) == 2
    assert all(k["started"] >= 2 for k in kids)
    assert all(r["status"] == "finished" and r["timing"]["steps_logged"] == 4 for r in rec["runs"])


class Sleeper:
    """A child run that waits to be stopped, noting that it saw the interrupt (or fails on request)."""

    def __init__(self, fail: bool = False):
        self.fail = fail

    def __call__(self, cfg: RunConfig) -> None:
        import time

        run_dir = Path(cfg.run_dir)
        run_dir.mkdir(parents=True, exist_ok=True)
        if self.fail:
            raise ValueError("boom in the child")
        (run_dir / "started").write_text("1")
        try:
            time.sleep(60)
        except KeyboardInterrupt:
            (run_dir / "interrupted").write_text("1")
            raise


def test_child_run_stops_cleanly_and_reports_errors(tmp_path):
    import threading
    import time

    from analysis.experiment import ChildProcessRun, RunInterrupted
    from shared.config import resolve_config

    cfg = resolve_config("toy", run_dir=str(tmp_path / "a"))
    stop = threading.Event()

    def stop_when_started() -> None:
        while not (tmp_path / "a" / "started").exists():
            time.sleep(0.05)
        stop.set()

    threading.Thread(target=stop_when_started, daemon=True).start()
    with pytest.raises(RunInterrupted, match=r"exit 130"):  # the child's own SIGINT exit, not the SIGKILL (-9)
        ChildProcessRun(Sleeper(), stop, grace_s=300)(cfg)
    assert (tmp_path / "a" / "interrupted").exists()
    with pytest.raises(RuntimeError, match="ValueError: boom in the child"):
        ChildProcessRun(Sleeper(fail=True), threading.Event())(resolve_config("toy", run_dir=str(tmp_path / "b")))


class Vanisher:
    """A child run that exits without reporting a status (as a crash in the child's start-up would)."""

    def __init__(self, code: int):
        self.code = code

    def __call__(self, cfg: RunConfig) -> None:
        os._exit(self.code)


@pytest.mark.parametrize("code", [3, 0])
def test_child_that_exits_without_a_status_is_a_failed_run(tmp_path, code):
    """EOF on the status pipe (poll() is true there) is a failed run with the exit code, never EOFError;
    exit code 0 without an "ok" is a failure too."""
    import threading

    from analysis.experiment import ChildProcessRun
    from shared.config import resolve_config

    cfg = resolve_config("toy", run_dir=str(tmp_path / "v"))
    with pytest.raises(RuntimeError, match=f"run process exited with code {code} before reporting its status"):
        ChildProcessRun(Vanisher(code), threading.Event())(cfg)
