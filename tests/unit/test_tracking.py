"""Experiment tracking (learner/tracking.py): TensorBoard events read back with tensorboard's own reader,
wandb / trackio through stand-in modules (their offline paths, without the packages), loud failures."""
from __future__ import annotations

import logging
import sys
import types

import pytest
from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

from learner.tracking import TrackingError, check_trackers, open_trackers, scalar_tags, tracking_lines
from shared.config import ConfigError, TrackingConfig, resolve_config

TRAIN_ROW = {"step": 3, "reward_mean": 1.25, "pass_rate": 0.5, "cos_mean": 0.2, "frac_fired": 0.75,
             "t_generate": 1.5, "t_train": 0.25, "kl": None, "note": "text", "flag": True, "t_refresh": 0.1}
EVAL_ROW = {"step": 3, "pass_rate": 0.625, "hack_strict": 0.125}


def read_scalars(log_dir) -> dict[str, list[tuple[int, float]]]:
    ea = EventAccumulator(str(log_dir))
    ea.Reload()
    return {tag: [(e.step, e.value) for e in ea.Scalars(tag)] for tag in ea.Tags()["scalars"]}


def test_scalar_tags_group_train_projection_timing_eval():
    tags = scalar_tags("train", TRAIN_ROW)
    assert tags == {"train/reward_mean": 1.25, "train/pass_rate": 0.5, "projection/cos_mean": 0.2,
                    "projection/frac_fired": 0.75, "timing/t_generate": 1.5, "timing/t_train": 0.25,
                    "timing/t_refresh": 0.1}
    assert scalar_tags("eval", EVAL_ROW) == {"eval/pass_rate": 0.625, "eval/hack_strict": 0.125}
    assert scalar_tags("train", {"step": 1, "loss": float("nan")}) == {}


def test_tensorboard_events_read_back(tmp_path):
    tr = open_trackers(TrackingConfig(), tmp_path)
    assert [b.name for b in tr.backends] == ["tensorboard"]
    tr.log("train", TRAIN_ROW, 3)
    tr.log("train", {**TRAIN_ROW, "reward_mean": 2.0}, 4)
    tr.log("eval", EVAL_ROW, 4)
    tr.close()
    got = read_scalars(tmp_path / "tb")
    assert set(got) == {f"{k}" for k in scalar_tags("train", TRAIN_ROW)} | {"eval/pass_rate", "eval/hack_strict"}
    assert [s for s, _ in got["train/reward_mean"]] == [3, 4]
    assert [v for _, v in got["train/reward_mean"]] == pytest.approx([1.25, 2.0], abs=1e-6)
    assert got["eval/pass_rate"][0][0] == 4 and got["eval/pass_rate"][0][1] == pytest.approx(0.625, abs=1e-6)
    assert got["projection/cos_mean"][0][1] == pytest.approx(0.2, abs=1e-6)


def test_none_opens_nothing(tmp_path):
    tr = open_trackers(TrackingConfig(report_to="none"), tmp_path)
    tr.log("train", TRAIN_ROW, 0)
    tr.close()
    assert tr.backends == [] and not (tmp_path / "tb").exists()


class FakeWandbRun:
    def __init__(self, calls):
        self.calls = calls

    def log(self, data, step):
        self.calls.append(("log", dict(data), step))

    def finish(self):
        self.calls.append(("finish",))


@pytest.fixture
def fake_wandb(monkeypatch):
    calls: list = []
    mod = types.ModuleType("wandb")
    mod.init = lambda **kw: (calls.append(("init", kw)), FakeWandbRun(calls))[1]
    monkeypatch.setitem(sys.modules, "wandb", mod)
    return calls


def test_wandb_offline_by_default(tmp_path, fake_wandb):
    run_dir = tmp_path / "projected-s1"
    tr = open_trackers(TrackingConfig(report_to="wandb"), run_dir, {"train": {"arm": "projected"}})
    tr.log("train", TRAIN_ROW, 3)
    tr.close()
    (_, init), (_, logged, step), (fin,) = fake_wandb
    assert init["mode"] == "offline" and init["dir"] == str(run_dir) and init["name"] == "projected-s1"
    assert init["project"] == "rankguard" and init["config"] == {"train": {"arm": "projected"}}
    assert step == 3 and logged["train/reward_mean"] == 1.25 and logged["timing/t_generate"] == 1.5
    assert fin == "finish"
    assert "wandb sync" in tr_where(TrackingConfig(report_to="wandb"), run_dir)


def test_experiment_runs_are_named_with_their_arm(tmp_path, fake_wandb):
    open_trackers(TrackingConfig(report_to="wandb"), tmp_path / "exp" / "projected_svd5" / "seed3").close()
    assert fake_wandb[0][1]["name"] == "projected_svd5/seed3"


def tr_where(cfg, run_dir) -> str:
    return " ".join(tracking_lines(cfg, run_dir))


def test_wandb_online_when_asked(tmp_path, fake_wandb):
    open_trackers(TrackingConfig(report_to="wandb", offline=False, project="p"), tmp_path).close()
    assert fake_wandb[0][1]["mode"] == "online" and fake_wandb[0][1]["project"] == "p"


def test_trackio_logs_with_steps(tmp_path, monkeypatch):
    calls: list = []
    mod = types.ModuleType("trackio")
    mod.init = lambda **kw: calls.append(("init", kw))
    mod.log = lambda data, step=None: calls.append(("log", dict(data), step))
    mod.finish = lambda: calls.append(("finish",))
    monkeypatch.setitem(sys.modules, "trackio", mod)
    tr = open_trackers(TrackingConfig(report_to="trackio,tensorboard"), tmp_path)
    assert [b.name for b in tr.backends] == ["trackio", "tensorboard"]
    tr.log("eval", EVAL_ROW, 7)
    tr.close()
    assert calls[0][1]["project"] == "rankguard" and calls[0][1]["name"] == tmp_path.name
    assert calls[1] == ("log", {"eval/pass_rate": 0.625, "eval/hack_strict": 0.125}, 7)
    assert calls[2] == ("finish",)
    assert read_scalars(tmp_path / "tb")["eval/pass_rate"][0][0] == 7


@pytest.mark.parametrize("name", ["wandb", "trackio"])
def test_missing_package_is_one_clear_error(tmp_path, monkeypatch, name):
    monkeypatch.setitem(sys.modules, name, None)  # import fails as if not installed
    cfg = TrackingConfig(report_to=f"tensorboard,{name}")
    with pytest.raises(TrackingError, match=rf"--report-to {name}: cannot import .*pip install {name}.*--report-to none"):
        check_trackers(cfg)
    with pytest.raises(TrackingError, match=name):
        open_trackers(cfg, tmp_path)


def test_failing_backend_is_loud_and_dropped(tmp_path, caplog, fake_wandb):
    tr = open_trackers(TrackingConfig(report_to="tensorboard,wandb"), tmp_path)
    wandb_backend = tr.backends[1]

    def broken(scalars, step):
        raise OSError("disk full")

    wandb_backend.log = broken
    with caplog.at_level(logging.ERROR, logger="rankguard.tracking"):
        tr.log("train", TRAIN_ROW, 0)
        tr.log("train", TRAIN_ROW, 1)
    assert [b.name for b in tr.backends] == ["tensorboard"]
    errors = [r.getMessage() for r in caplog.records if r.levelno >= logging.ERROR]
    assert len(errors) == 1 and "wandb stopped writing" in errors[0] and "disk full" in errors[0]
    tr.close()
    assert [s for s, _ in read_scalars(tmp_path / "tb")["train/reward_mean"]] == [0, 1]


def test_report_to_parses_comma_lists_and_none():
    assert resolve_config("toy").tracking.report_to == ["tensorboard"]
    assert resolve_config("toy", ["tracking.report_to=none"]).tracking.report_to == []
    assert resolve_config("toy", ["tracking.report_to=wandb,tensorboard"]).tracking.report_to == ["wandb", "tensorboard"]
    with pytest.raises(ConfigError, match="tracking.report_to"):
        resolve_config("toy", ["tracking.report_to=mlflow"])


def test_train_cli_writes_tensorboard_and_the_card_says_where(tmp_path):
    """`rankguard train` end to end on the shipped toy world: tb/ holds train, projection, timing and
    eval scalars for every step, and the run card names the folder."""
    from typer.testing import CliRunner

    from services.cli import app

    run = tmp_path / "run"
    toml = tmp_path / "run.toml"
    toml.write_text(f'run_dir = "{run}"\n[train]\narm = "projected"\nsteps = 2\neval_every = 2\neval_problems = 2\n'
                    'eval_samples = 1\nprompts_per_step = 2\n[sampling]\ngroup_size = 4\nmax_new_tokens = 16\n')
    res = CliRunner().invoke(app, ["train", "--config", str(toml), "--no-progress"])
    assert res.exit_code == 0, res.output
    assert f"tensorboard --logdir {run / 'tb'}" in res.output
    got = read_scalars(run / "tb")
    assert [s for s, _ in got["train/reward_mean"]] == [0, 1]
    assert [s for s, _ in got["eval/pass_rate"]] == [0, 2]
    assert {"projection/cos_mean", "projection/frac_fired", "timing/t_generate", "timing/t_train"} <= set(got)
