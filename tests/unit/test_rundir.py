"""Run-dir contract (shared.rundir): resume by default, nothing deleted implicitly, --fresh moves a run
aside, config drift refused with a diff (allow-listed keys amended and recorded), a broken
config.json stops with file:line, non-positive values rejected; the CLIs (`up`, `train`, `prepare`)
go through the same door."""
import errno
import json
import os

import pytest
import typer
from typer.testing import CliRunner

from shared.config import ConfigError, RunConfig, resolve_config
from shared.rundir import (RESUME_MUTABLE, RunDirError, check_config_drift, prepare_run_dir, read_config,
                           run_outputs)


def cfg_for(run_dir, *sets):
    return resolve_config("toy", list(sets), run_dir=str(run_dir))


def fake_run(run_dir, steps=(20, 30), rows=35):
    """What a run leaves behind: config.json, checkpoints, metric rows, logs."""
    prepare_run_dir(cfg_for(run_dir))
    for s in steps:
        (run_dir / "checkpoints" / f"step-{s}").mkdir(parents=True)
        (run_dir / "checkpoints" / f"step-{s}" / "state.json").write_text(json.dumps({"step": s}))
    (run_dir / "metrics.jsonl").write_text("".join(json.dumps({"step": i}) + "\n" for i in range(rows)))
    (run_dir / "logs").mkdir()
    (run_dir / "logs" / "up.log").write_text("hello\n")


# ------------------------------------------------------------------------------ prepare_run_dir

def test_new_run_dir_gets_its_config(tmp_path):
    p = prepare_run_dir(cfg_for(tmp_path / "r"))
    assert p.status == "new" and read_config(tmp_path / "r" / "config.json") == cfg_for(tmp_path / "r")


def test_resume_keeps_everything_and_rewrites_nothing(tmp_path):
    run = tmp_path / "r"
    fake_run(run)
    before = {p: p.stat().st_mtime_ns for p in run.rglob("*")}
    p = prepare_run_dir(cfg_for(run))
    assert p.status == "resume" and p.message() == f"run dir {run} matches this config; continuing it"
    assert {p: p.stat().st_mtime_ns for p in run.rglob("*")} == before


def test_fresh_moves_the_run_aside_and_names_what_it_held(tmp_path):
    run = tmp_path / "r"
    fake_run(run)
    p = prepare_run_dir(cfg_for(run, "train.lr=0.5"), "fresh")
    assert p.status == "fresh" and p.moved_to.parent == tmp_path and p.moved_to.name.startswith("r.old-")
    assert "checkpoints step-20, step-30" in p.message() and "metrics.jsonl 35 rows" in p.message()
    assert str(p.moved_to) in p.message()
    assert sorted(x.name for x in run.iterdir()) == ["config.json"]  # the new run starts empty
    assert read_config(run / "config.json").train.lr == 0.5
    old = p.moved_to  # nothing was deleted
    assert len((old / "metrics.jsonl").read_text().splitlines()) == 35
    assert sorted(x.name for x in (old / "checkpoints").iterdir()) == ["step-20", "step-30"]
    assert read_config(old / "config.json").train.lr == 0.01
    p2 = prepare_run_dir(cfg_for(run), "fresh")  # again, within the same second: another free name
    assert p2.moved_to != old and old.exists() and p2.moved_to.exists()


def test_fresh_on_an_empty_dir_or_empty_mount_point_moves_nothing(tmp_path):
    run = tmp_path / "r"
    (run / "checkpoints").mkdir(parents=True)  # e.g. a docker volume mounted there, still empty
    assert run_outputs(run) == []
    p = prepare_run_dir(cfg_for(run), "fresh")
    assert p.status == "new" and p.moved_to is None and list(tmp_path.iterdir()) == [run]


def test_fresh_that_cannot_move_says_so_and_deletes_nothing(tmp_path, monkeypatch):
    run = tmp_path / "r"
    fake_run(run)

    def busy(a, b):
        raise OSError(errno.EBUSY, os.strerror(errno.EBUSY))

    monkeypatch.setattr(os, "rename", busy)
    with pytest.raises(RunDirError, match=r"cannot move .*r aside to .*r\.old-.*Device or resource busy"):
        prepare_run_dir(cfg_for(run), "fresh")
    assert len((run / "metrics.jsonl").read_text().splitlines()) == 35


def test_resume_with_a_changed_config_is_refused_with_the_diff(tmp_path):
    run = tmp_path / "r"
    fake_run(run)
    before = (run / "config.json").read_text()
    with pytest.raises(RunDirError) as e:
        prepare_run_dir(cfg_for(run, "train.lr=0.5", "sampling.group_size=4"))
    msg = str(e.value)
    assert "train.lr: 0.01 (on disk) != 0.5 (planned)" in msg and "sampling.group_size: 8 (on disk) != 4" in msg
    assert "--fresh" in msg and "train.steps" in msg  # what to do, and what a resume may change
    assert (run / "config.json").read_text() == before  # config.json still describes the run


def test_resume_with_allowed_changes_amends_and_records(tmp_path):
    run = tmp_path / "r"
    fake_run(run)
    p = prepare_run_dir(cfg_for(run, "train.steps=400", "pipeline.reward_workers=2"))
    assert p.status == "resume" and [c.key for c in p.amended] == ["pipeline.reward_workers", "train.steps"]
    assert "train.steps 200 -> 400" in p.message()
    on_disk = read_config(run / "config.json")
    assert on_disk.train.steps == 400 and on_disk.pipeline.reward_workers == 2 and p.config == on_disk
    rec = [json.loads(x) for x in (run / "amendments.jsonl").read_text().splitlines()]
    assert rec[0]["changes"] == {"pipeline.reward_workers": {"from": 1, "to": 2},
                                 "train.steps": {"from": 200, "to": 400}} and rec[0]["at"][:2] == "20"


def test_drift_check_is_shared_with_the_experiment_runner():
    import analysis.experiment as ex
    import shared.rundir as rd

    assert ex.check_config_drift is rd.check_config_drift and ex.config_diff is rd.config_diff
    saved = resolve_config("toy").model_dump(mode="json")
    new = resolve_config("toy", ["train.steps=5"]).model_dump(mode="json")
    assert not check_config_drift(saved, new) and "train.steps" in RESUME_MUTABLE  # a single run: allowed
    strict = check_config_drift(saved, new, allowed_keys=())  # the experiment runner: a different run
    assert strict and strict.describe() == "train.steps: 200 (on disk) != 5 (planned)"


def test_outputs_without_a_config_are_not_resumed_blindly(tmp_path):
    run = tmp_path / "r"
    (run / "checkpoints" / "step-5").mkdir(parents=True)
    (run / "checkpoints" / "step-5" / "state.json").write_text("{}")
    with pytest.raises(RunDirError, match=r"holds checkpoints step-5 but no config\.json.*--fresh"):
        prepare_run_dir(cfg_for(run))


# ------------------------------------------------------------------------------ broken config.json

def write_broken(run, edit):
    fake_run(run)
    path = run / "config.json"
    path.write_text(edit(path.read_text()))
    return path


def test_truncated_config_json_names_file_and_line(tmp_path):
    path = write_broken(tmp_path / "r", lambda t: t[: len(t) // 2])
    n_lines = len(path.read_text().splitlines())
    with pytest.raises(ConfigError) as e:
        prepare_run_dir(cfg_for(tmp_path / "r"))
    msg = str(e.value)
    assert msg.startswith(f"{path}:") and "not valid JSON" in msg and "truncated?" in msg, msg
    assert int(msg[len(str(path)) + 1:].split(":")[0]) >= n_lines  # where the file stops


def test_bad_value_in_config_json_names_file_line_key_and_value(tmp_path):
    path = write_broken(tmp_path / "r", lambda t: t.replace('"steps": 200', '"steps": -5'))
    line = next(i for i, x in enumerate(path.read_text().splitlines(), 1) if '"steps": -5' in x)
    for load in (lambda: prepare_run_dir(cfg_for(tmp_path / "r")), lambda: RunConfig.load(path)):
        with pytest.raises(ConfigError) as e:
            load()
        assert str(e.value) == f"{path}:{line}: train.steps: Input should be greater than or equal to 1 (got -5)"
    path.write_text(path.read_text().replace('"steps": -5', '"steps": 200').replace('"lr": 0.01', '"lr": "fast"'))
    with pytest.raises(ConfigError, match=r'config\.json:\d+: train\.lr: Input should be a valid number.*\'fast\''):
        read_config(path)


@pytest.mark.parametrize("key,value", [("train.steps", -5), ("train.steps", 0), ("train.prompts_per_step", 0),
                                       ("sampling.group_size", 0), ("sampling.max_new_tokens", 0),
                                       ("train.lr", 0), ("pipeline.rollout_workers", 0),
                                       ("train.keep_checkpoints", 0), ("sampling.top_p", 1.5)])
def test_non_positive_values_are_rejected(key, value):
    with pytest.raises(ConfigError, match=rf"bad config value for '{key}': Input should be .* \(got {value}\)"):
        resolve_config("toy", [f"{key}={value}"])


def test_zero_means_off_where_it_always_did():
    cfg = resolve_config("toy", ["train.eval_every=0", "train.checkpoint_every=0", "sampling.top_k=0",
                                 "sampling.temperature=0", "reward.workers=0", "train.warmup_steps=0"])
    assert cfg.train.eval_every == 0 and cfg.sampling.top_k == 0


# ------------------------------------------------------------------------------ the CLIs

def cli() -> typer.Typer:
    from services.train_cli import register as reg_train
    from services.pipeline_cli import register as reg_pipeline

    app = typer.Typer()
    reg_train(app)
    reg_pipeline(app)
    return app


def invoke(*args):
    res = CliRunner().invoke(cli(), [str(a) for a in args])
    return res.exit_code, (res.stderr if getattr(res, "stderr", None) else "") + res.output


@pytest.mark.parametrize("command", ["up", "train", "prepare"])
def test_cli_rejects_negative_steps_before_writing(tmp_path, command):
    code, out = invoke(command, "--steps", "-5", "--run-dir", tmp_path / "r", "--set", "toy.dir=/nonexistent")
    assert code == 2 and "train.steps" in out and "greater than or equal to 1" in out and "got -5" in out, out
    assert not (tmp_path / "r").exists()


@pytest.mark.parametrize("command", ["up", "train", "prepare"])
def test_cli_resume_with_other_lr_is_refused(tmp_path, command):
    run = tmp_path / "r"
    prepare_run_dir(cfg_for(run, "train.steps=40"))
    before = (run / "config.json").read_text()
    code, out = invoke(command, "--steps", "40", "--run-dir", run, "--set", "train.lr=0.5")
    assert code == 2 and "train.lr: 0.01 (on disk) != 0.5 (planned)" in out.replace("\n", " "), out
    assert (run / "config.json").read_text() == before and sorted(p.name for p in run.iterdir()) == ["config.json"]


@pytest.mark.parametrize("command", ["up", "train", "prepare"])
def test_cli_resume_on_a_truncated_config_stops_and_keeps_the_file(tmp_path, command):
    path = write_broken(tmp_path / "r", lambda t: t[:-40])
    broken = path.read_text()
    code, out = invoke(command, "--run-dir", tmp_path / "r")
    assert code == 2 and f"{path}:" in out.replace("\n", "") and "not valid JSON" in out, out
    assert path.read_text() == broken  # not silently overwritten


def test_prepare_resumes_amends_and_moves_aside(tmp_path):
    from tests.support.pipeline import quick_toy_dir

    toy = quick_toy_dir()
    run = tmp_path / "r"
    sets = ["--set", f"toy.dir={toy}"]
    assert invoke("prepare", "--run-dir", run, "--steps", "10", *sets)[0] == 0
    (run / "metrics.jsonl").write_text('{"step": 0}\n')
    code, out = invoke("prepare", "--run-dir", run, "--steps", "20", *sets)
    assert code == 0 and "train.steps 10 -> 20" in out and read_config(run / "config.json").train.steps == 20
    code, out = invoke("prepare", "--run-dir", run, "--arm", "projected", *sets)
    assert code == 2 and "train.arm: 'vanilla' (on disk) != 'projected' (planned)" in out.replace("\n", " ")
    code, out = invoke("prepare", "--run-dir", run, "--arm", "projected", "--fresh", *sets)
    assert code == 0 and "moved the earlier run" in out and "metrics.jsonl 1 row" in out, out
    aside = [p for p in tmp_path.iterdir() if p.name.startswith("r.old-")]
    assert len(aside) == 1 and (aside[0] / "metrics.jsonl").exists()
    assert read_config(run / "config.json").train.arm == "projected"


def test_help_shows_resume_default_and_fresh():
    for command in ("up", "train", "prepare"):
        code, out = invoke(command, "--help")
        text = " ".join(out.replace("│", " ").split())
        assert code == 0 and "--fresh" in text and "--resume" in text and "Nothing is deleted" in text, text
