"""CLI frictions (issue #22): `logs -f` waits for a log not written yet and stops at the run's finish line;
`report` finds symlinked run folders; the demo's tables have their headers and say whose seconds they show."""
from __future__ import annotations

import io
import json
import os
import subprocess
import sys
from pathlib import Path

import pytest
from typer.testing import CliRunner

from analysis.rundata import find_runs
from services.cli import app
from services.log_follow import finish_line, follow

REPO = Path(__file__).resolve().parents[2]


def dead_pid() -> int:
    p = subprocess.Popen([sys.executable, "-c", "pass"])
    p.wait()
    return p.pid


def script(*actions):
    """A fake sleep that performs the next action each time the follower waits (no real time passes)."""
    todo = list(actions)
    calls = []

    def sleep(_s):
        calls.append(_s)
        if todo:
            todo.pop(0)()
        elif len(calls) > 100:
            raise AssertionError("follower never stopped")

    return sleep, calls


def test_follow_waits_for_the_log_then_stops_at_done(tmp_path):
    """No launcher (compose-style): the log appears, grows, the learner writes DONE, the follower stops."""
    log = tmp_path / "logs" / "learner.log"

    def create():
        log.parent.mkdir()
        log.write_text("step 1\n")

    def grow():
        with log.open("a") as f:
            f.write("step 2\n")

    def finish():
        with log.open("a") as f:
            f.write("finished: {}\n")  # the last line lands with DONE: must still be printed
        (tmp_path / "DONE").write_text("x\n")

    sleep, calls = script(lambda: None, create, grow, finish)
    out, notes = io.StringIO(), []
    why = follow(log, tmp_path, out, lines=10, sleep=sleep, note=notes.append)
    assert why == "the run finished (DONE)"
    assert out.getvalue() == "step 1\nstep 2\nfinished: {}\n"
    assert notes == [f"waiting for {log} ..."]


def test_follow_keeps_going_while_the_launcher_lives_then_stops(tmp_path):
    (tmp_path / "logs").mkdir()
    log = tmp_path / "logs" / "reward-0.log"
    log.write_text("a\nb\nc\n")
    (tmp_path / "services.json").write_text(json.dumps({"launcher_pid": os.getpid()}))
    (tmp_path / "DONE").write_text("old run\n")  # the launcher still lives: not the finish line yet

    def more():
        with log.open("a") as f:
            f.write("d\n")

    def launcher_exits():
        (tmp_path / "services.json").write_text(json.dumps({"launcher_pid": dead_pid()}))
        (tmp_path / "DONE").unlink()

    sleep, calls = script(more, lambda: None, launcher_exits)
    out = io.StringIO()
    assert follow(log, tmp_path, out, lines=2, sleep=sleep) == "the run's launcher exited"
    assert out.getvalue() == "b\nc\nd\n" and len(calls) == 3


def test_follow_gives_up_when_the_run_ends_without_that_log(tmp_path):
    (tmp_path / "DONE").write_text("x\n")
    sleep, calls = script()
    why = follow(tmp_path / "logs" / "rollout-3.log", tmp_path, io.StringIO(), sleep=sleep)
    assert why == "the run finished (DONE) before rollout-3.log was written" and calls == []


def test_finish_line_rules(tmp_path):
    assert finish_line(tmp_path) is None
    (tmp_path / "services.json").write_text(json.dumps({"launcher_pid": os.getpid()}))
    (tmp_path / "DONE").write_text("x")
    assert finish_line(tmp_path) is None
    (tmp_path / "services.json").write_text(json.dumps({"launcher_pid": dead_pid()}))
    assert finish_line(tmp_path) == "the run finished (DONE)"


def test_logs_cli_finished_run_and_bad_names(tmp_path):
    run = tmp_path / "run"
    (run / "logs").mkdir(parents=True)
    (run / "logs" / "learner.log").write_text("one\ntwo\n")
    (run / "DONE").write_text("x\n")
    res = CliRunner().invoke(app, ["logs", "-f", "learner", "--run-dir", str(run), "-n", "1"])
    assert res.exit_code == 0, res.output
    assert "two" in res.output and "one" not in res.output and "stopped following" in res.output
    res = CliRunner().invoke(app, ["logs", "bogus", "--run-dir", str(run)])
    assert res.exit_code == 2 and "unknown service 'bogus'" in res.output
    res = CliRunner().invoke(app, ["logs", "reward", "--run-dir", str(run)])
    assert res.exit_code == 2 and "no log 'reward-0'" in res.output and "-f waits" in res.output


# ---------------------------------------------------------------- report and symlinked runs
def write_run(path: Path, arm: str, seed: int, hack: float) -> None:
    path.mkdir(parents=True)
    (path / "config.json").write_text(json.dumps({"preset": "toy", "train": {"arm": arm, "seed": seed, "steps": 2}}))
    (path / "evals.jsonl").write_text(json.dumps({"step": 2, "pass_rate": 0.5, "hack_strict": hack}) + "\n")
    (path / "DONE").write_text("x\n")


def test_find_runs_follows_symlinked_run_folders(tmp_path):
    store = tmp_path / "store"
    write_run(store / "a" / "vanilla" / "seed0", "vanilla", 0, 0.5)
    write_run(store / "b" / "projected" / "seed0", "projected", 0, 0.25)
    exp = tmp_path / "exp"
    (exp / "projected").mkdir(parents=True)
    (exp / "vanilla").symlink_to(store / "a" / "vanilla", target_is_directory=True)  # a linked arm folder
    (exp / "projected" / "seed0").symlink_to(store / "b" / "projected" / "seed0")  # a linked run folder
    (exp / "loop").symlink_to(exp, target_is_directory=True)  # a cycle must not hang or duplicate
    runs = find_runs(exp)
    assert [(r.arm, r.seed) for r in runs] == [("vanilla", 0), ("projected", 0)]
    assert [r.last_eval["hack_strict"] for r in runs] == [0.5, 0.25]
    assert all(r.done for r in runs)


# ---------------------------------------------------------------- the demo's tables
def test_demo_prints_whole_tables():
    demo = (REPO / "scripts" / "demo.sh").read_text()
    assert "tail -n" not in demo and "grep -E" not in demo  # no table cut off from its header
    assert "adapter report --preset toy --brief" in demo


def test_toy_table_says_whose_seconds():
    from services.toy_cli import stats_table
    from rich.console import Console

    meta = {"created": "2026-12-01T09:19:37", "seconds": 226.15,
            "timings": {"problems": 0.72, "tokenizer": 0.22, "warm_start": 223.97, "stats": 1.07}}
    console = Console(file=io.StringIO(), width=120)
    console.print(stats_table(meta, here="unpacked the shipped build in 0.84 s"))
    text = console.file.getvalue()
    assert "built 2026-12-01: s (prob/tok/warm/stats)" in text and "226.15" in text
    assert "this command" in text and "unpacked the shipped build in 0.84 s" in text
    assert text.index("what") < text.index("built 2026-12-01")  # the header comes with the table


@pytest.mark.parametrize("brief", [True, False])
def test_adapter_report_brief_has_a_header_and_names_what_is_not_wrapped(brief, monkeypatch):
    import shared.adapter_cli as adapter_cli

    rep = {"model_id": "m", "modules_wrapped": 2, "per_target": {"q_proj": 2}, "delta_s_params": 64, "rank": "full",
           "dtype": "float32", "device": "cpu", "svd_build_s": None, "cache_reload_s": 0.01,
           "cache_modules_loaded": 2, "max_abs_dlogit_at_zero": 1e-5, "written_to": "x.json",
           "layer_linear_params_wrapped_share": 1.0, "linear_params_wrapped_share": 0.8, "target_modules": ["q_proj"],
           "linear_kinds": [{"kind": "model.layers.*.self_attn.q_proj", "wrapped": True, "count": 2, "params": 8,
                             "share_in_layers": 1.0, "share": 0.8},
                            {"kind": "lm_head", "wrapped": False, "count": 1, "params": 2, "share_in_layers": None,
                             "share": 0.2}]}
    monkeypatch.setattr(adapter_cli, "build_report", lambda *a, **k: rep)
    monkeypatch.setenv("COLUMNS", "120")
    res = CliRunner().invoke(app, ["adapter", "report"] + (["--brief"] if brief else []))
    assert res.exit_code == 0, res.output
    assert "what" in res.output and "lm_head (20.0% of params)" in res.output
    assert ("share of all" in res.output) is (not brief)
