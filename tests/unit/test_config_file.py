"""`--config run.toml` (shared/config_file.py) and `rankguard config show`: same keys as --set, every
problem named by file and line, --set wins, and the printed file documents and round-trips every key."""
from __future__ import annotations

import json
import tomllib

import pytest
from pydantic import BaseModel
from typer.testing import CliRunner

from services.cli import app
from shared.config import PRESETS, ConfigError, RunConfig, resolve_config
from shared.config_file import documented_toml, read_config_file, toml_key_lines, with_config_file

RUN_TOML = '''# a run file
preset = "full"
run_dir = "runs/from-file"

[train]
arm = "projected"
lr = 3e-5   # peak

[reward.loopholes]
se = true

[sampling]
group_size = 4
'''


def write(tmp_path, text, name="run.toml"):
    path = tmp_path / name
    path.write_text(text)
    return path


def resolved(preset, config, sets=()):
    p, s = with_config_file(preset, config, list(sets))
    return resolve_config(p, s)


def test_file_applies_over_its_preset_and_set_wins(tmp_path):
    path = write(tmp_path, RUN_TOML)
    cfg = resolved(None, path)
    assert cfg.preset == "full" and cfg.model.name_or_path == "Qwen/Qwen3-4B"  # the file's preset
    assert cfg.train.arm == "projected" and cfg.train.lr == pytest.approx(3e-5, rel=1e-12)
    assert cfg.reward.loopholes.se is True and cfg.sampling.group_size == 4 and cfg.run_dir == "runs/from-file"
    assert cfg.train.steps == PRESETS["full"]["train"]["steps"]  # keys the file leaves alone keep the preset's
    over = resolved(None, path, ["train.lr=1e-3", "sampling.group_size=6"])
    assert over.train.lr == pytest.approx(1e-3, rel=1e-12) and over.sampling.group_size == 6
    assert resolved("toy", path).model.name_or_path == "toy"  # --preset beats the file's preset


def test_no_file_is_the_preset(tmp_path):
    assert with_config_file(None, None, ["train.lr=2"]) == ("toy", ["train.lr=2"])


def test_key_lines_follow_headers_dotted_keys_and_inline_tables():
    text = 'a = 1\n[train]\n# lr = 9\nlr = 2\n"seed" = 3\n[reward.loopholes]\nse = true\nsampling.top_k = 5\n' \
           'model = { dtype = "float16" }\n'
    lines = toml_key_lines(text)
    assert lines["a"] == 1 and lines["train"] == 2 and lines["train.lr"] == 4 and lines["train.seed"] == 5
    assert lines["reward.loopholes"] == 6 and lines["reward.loopholes.se"] == 7
    assert lines["reward.loopholes.sampling.top_k"] == 8 and lines["reward.loopholes.model"] == 9


@pytest.mark.parametrize("text, where, words", [
    ('[train]\narm = "projected"\n\n# note\nlr = -1\n', ":5:", ["train.lr", "greater than 0", "-1"]),
    ('[train]\nlrr = 3\n', ":2:", ["unknown config key 'train.lrr'", "did you mean train.lr"]),
    ('[reward.loopholes]\nse = 3\n', ":2:", ["reward.loopholes.se", "boolean"]),
    ('train.steps = "many"\n', ":1:", ["train.steps", "integer"]),
    ('sampling = { group_size = 0 }\n', ":1:", ["sampling.group_size", "greater than or equal to 1"]),
    ('[train]\nlr = \n', ":2:6:", ["not valid TOML"]),
    ('preset = "huge"\n', ":1:", ["unknown preset 'huge'", "full"]),
    ('[tracking]\nreport_to = ["mlflow"]\n', ":2:", ["tracking.report_to", "tensorboard"]),
])
def test_every_problem_names_file_and_line(tmp_path, text, where, words):
    path = write(tmp_path, text)
    with pytest.raises(ConfigError) as e:
        with_config_file(None, path, [])
    msg = str(e.value)
    assert msg.startswith(f"{path}{where}"), msg
    for w in words:
        assert w in msg, msg
    assert "\n" not in msg


def test_missing_file(tmp_path):
    with pytest.raises(ConfigError, match="not found"):
        with_config_file(None, tmp_path / "nope.toml", [])


def test_a_runs_config_json_is_a_config_file(tmp_path):
    cfg = resolve_config("toy", ["train.arm=rebound", "train.seed=4"])
    path = cfg.save(tmp_path / "config.json")
    assert resolved(None, path) == cfg
    data = json.loads(path.read_text())
    data["train"]["seed"] = "x"
    path.write_text(json.dumps(data, indent=2))
    line = next(i for i, s in enumerate(path.read_text().splitlines(), 1) if '"seed": "x"' in s)
    with pytest.raises(ConfigError, match=rf"{path}:{line}: train.seed"):
        with_config_file(None, path, [])


def _all_fields(model: type[BaseModel], prefix=""):
    for name, field in model.model_fields.items():
        yield prefix + name, field
        ann = field.annotation
        if isinstance(ann, type) and issubclass(ann, BaseModel):
            yield from _all_fields(ann, f"{prefix}{name}.")


def test_every_config_field_is_documented():
    missing = [k for k, f in _all_fields(RunConfig) if not (f.description or "").strip()]
    assert missing == []


@pytest.mark.parametrize("preset", list(PRESETS))
def test_config_show_round_trips_and_documents_every_key(tmp_path, preset):
    cfg = resolve_config(preset, ["train.lr=0.125", "model.revision=abc"])
    text = documented_toml(cfg)
    tomllib.loads(text)  # valid TOML
    path = write(tmp_path, text)
    assert resolved(None, path) == cfg
    for dotted, field in _all_fields(RunConfig):
        if isinstance(field.annotation, type) and issubclass(field.annotation, BaseModel):
            assert f"[{dotted}]" in text
            continue
        name = dotted.rsplit(".", 1)[-1]
        first_help_line = field.description.split()[0]
        assert f"\n{name} = " in text or f"\n# {name} =   (unset)" in text, dotted
        assert first_help_line in text


def test_config_show_cli_prints_help_text_and_json(tmp_path):
    res = CliRunner().invoke(app, ["config", "show", "--preset", "full"])
    assert res.exit_code == 0, res.output
    assert 'name_or_path = "Qwen/Qwen3-4B"' in res.output
    assert "# Stale samples: dual-clip bound c on pi/pi_behaviour when the advantage < 0." in res.output
    path = write(tmp_path, res.output)
    res2 = CliRunner().invoke(app, ["config", "show", "--config", str(path), "--set", "train.seed=9", "--json"])
    assert res2.exit_code == 0, res2.output
    got = json.loads(res2.output)
    assert got["model"]["name_or_path"] == "Qwen/Qwen3-4B" and got["train"]["seed"] == 9


def test_prepare_writes_the_files_config(tmp_path):
    path = write(tmp_path, '[train]\narm = "weak"\nsteps = 7\n[tracking]\nreport_to = "none"\n')
    run = tmp_path / "run"
    res = CliRunner().invoke(app, ["prepare", "--config", str(path), "--run-dir", str(run), "--seed", "3",
                                   "--set", "train.steps=9"])
    assert res.exit_code == 0, res.output
    cfg = RunConfig.load(run / "config.json")
    assert (cfg.train.arm, cfg.train.steps, cfg.train.seed, cfg.tracking.report_to) == ("weak", 9, 3, [])


def test_cli_bad_file_is_one_line(tmp_path):
    path = write(tmp_path, "[train]\n\nlrr = 1\n")
    for cmd in (["train"], ["up"], ["prepare", "--run-dir", str(tmp_path / "r")], ["experiment"]):
        res = CliRunner().invoke(app, [*cmd, "--config", str(path)])
        assert res.exit_code == 2, (cmd, res.output)
        assert f"error: {path}:3: unknown config key 'train.lrr'" in res.output
    assert not (tmp_path / "r").exists()


def test_experiment_takes_the_file_but_not_its_run_dir(tmp_path, monkeypatch):
    import analysis.experiment as experiment

    seen = {}

    def fake_run_experiment(**kw):
        seen.update(kw)
        return {"status": "done", "wall_s": 0.0, "out": str(tmp_path), "runs": []}

    monkeypatch.setattr(experiment, "run_experiment", fake_run_experiment)
    path = write(tmp_path, 'preset = "lite"\nrun_dir = "x"\n[train]\nlr = 0.5\n')
    res = CliRunner().invoke(app, ["experiment", "--config", str(path), "--set", "train.seed=1",
                                   "--report-to", "none", "--no-report", "--no-progress"])
    assert res.exit_code == 0, res.output
    assert seen["preset"] == "lite"
    assert seen["overrides"] == ["train.lr=0.5", "train.seed=1", 'tracking.report_to="none"']
