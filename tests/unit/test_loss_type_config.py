"""train.unbiased (bool) became train.loss_type ("dr_grpo" | "grpo"): old files migrate, old flags are named."""
import json

import pytest

from shared.config import ConfigError, RunConfig, resolve_config
from shared.rundir import prepare_run_dir, read_config


def test_loss_type_default_and_values():
    assert resolve_config("toy").train.loss_type == "dr_grpo"
    assert resolve_config("toy", ["train.loss_type=grpo"]).train.loss_type == "grpo"
    with pytest.raises(ConfigError, match="train.loss_type.*'dr_grpo' or 'grpo'"):
        resolve_config("toy", ["train.loss_type=ppo"])


def test_old_override_names_the_new_key():
    with pytest.raises(ConfigError, match=r"'train.unbiased' was renamed: use train.loss_type \(\"dr_grpo\" = "
                                          r"unbiased true, \"grpo\" = unbiased false\)"):
        resolve_config("toy", ["train.unbiased=false"])


@pytest.mark.parametrize("old,new", [(True, "dr_grpo"), (False, "grpo")])
def test_old_config_json_migrates_and_resumes_without_drift(tmp_path, old, new):
    cfg = resolve_config("toy", [f"run_dir={json.dumps(str(tmp_path))}", f"train.loss_type={new}"])
    data = json.loads(cfg.model_dump_json())
    del data["train"]["loss_type"]
    data["train"]["unbiased"] = old  # as a run written before the rename stored it
    (tmp_path / "config.json").write_text(json.dumps(data, indent=2))
    assert read_config(tmp_path / "config.json").train.loss_type == new
    prepared = prepare_run_dir(cfg, "resume")
    assert prepared.config.train.loss_type == new


def test_contradicting_old_and_new_keys_are_refused(tmp_path):
    with pytest.raises(ValueError, match="train.unbiased=False contradicts train.loss_type='dr_grpo'"):
        RunConfig.model_validate({"train": {"unbiased": False, "loss_type": "dr_grpo"}})
    data = json.loads(RunConfig().model_dump_json())
    data["train"]["unbiased"] = "yes"
    (tmp_path / "config.json").write_text(json.dumps(data))
    with pytest.raises(ConfigError, match="config.json: train.unbiased .renamed train.loss_type. must be true or false"):
        read_config(tmp_path / "config.json")
