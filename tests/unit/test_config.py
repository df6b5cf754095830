import json

import pytest

from shared.config import PRESETS, ConfigError, RunConfig, resolve_config


def test_presets_resolve_and_differ():
    models = {name: resolve_config(name).model.name_or_path for name in PRESETS}
    assert models == {
        "toy": "toy",
        "lite": "Qwen/Qwen2.5-Coder-1.5B-Instruct",
        "qwen35-2b": "Qwen/Qwen3.5-2B",
        "full": "Qwen/Qwen3-4B",
    }
    full = resolve_config("full")
    assert (full.sampling.group_size, full.sampling.max_new_tokens, full.train.beta_kl, full.train.steps) == (
        12, 1024, 1e-3, 200)


def test_overrides_parse_types():
    cfg = resolve_config("toy", ["train.lr=3e-3", "train.arm=projected", "reward.loopholes.se=false",
                                 "train.vhack_modes=[\"A\",\"B\"]", "run_dir=runs/x"])
    assert cfg.train.lr == pytest.approx(3e-3)
    assert cfg.train.arm == "projected"
    assert cfg.reward.loopholes.se is False
    assert cfg.train.vhack_modes == ["A", "B"]
    assert cfg.run_dir == "runs/x"


@pytest.mark.parametrize(
    "preset,overrides,needle",
    [
        ("nope", [], "unknown preset 'nope'; valid presets: toy, lite, qwen35-2b, full"),
        ("toy", ["train.lrr=1"], "unknown config key 'train.lrr'"),
        ("toy", ["train.lr"], "is not KEY=VALUE"),
        ("toy", ["train.arm=bogus"], "'train.arm'"),
        ("toy", ["sampling.group_size=many"], "'sampling.group_size'"),
    ],
)
def test_bad_config_names_the_value(preset, overrides, needle):
    with pytest.raises(ConfigError) as e:
        resolve_config(preset, overrides)
    assert needle in str(e.value)


def test_save_load_round_trip(tmp_path):
    cfg = resolve_config("toy", ["train.seed=7"], run_dir=str(tmp_path / "r"))
    path = cfg.save()
    assert json.loads(path.read_text())["train"]["seed"] == 7
    assert RunConfig.load(path) == cfg
