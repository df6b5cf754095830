"""Issue #21.1: a checkpoint carries its run's identity (run id + config fingerprint); a resume refuses
another run's checkpoint with one line, and pruning never touches another run's checkpoints.

The reproduction: two runs whose `checkpoints` folders are one folder (what compose's single named
volume mounted at /runs/$RUN_NAME/checkpoints did): run B must not resume from run A's step-N."""
import json
import os

import pytest

from learner import checkpoint as ckpt
from learner.metrics import read_jsonl
from rollout.hf_engine import HFEngine
from shared.rundir import (RUN_ID_NAME, config_fingerprint, prepare_run_dir, run_id, run_identity)
from tests.support.trainer import make_cfg, make_learner, one_step


def _mount(volume, run_dir):
    """run_dir/checkpoints -> volume, after `prepare` (compose's init did not mount the checkpoints
    volume, so it saw an empty run dir; only the learner had it mounted)."""
    volume.mkdir(exist_ok=True)
    os.symlink(volume, run_dir / "checkpoints")


def _run(cfg, base_model, art_root, steps, volume=None):  # noqa: F811
    prepare_run_dir(cfg)
    if volume is not None:
        _mount(volume, tmp_dir(cfg))
    ln = make_learner(cfg, base_model, art_root)
    eng = HFEngine(ln.model, ln.tokenizer)
    for _ in range(steps):
        one_step(ln, eng)
        eng.version = ln.policy_version
        ln.save_checkpoint()
    ln.close()
    return ln


def tmp_dir(cfg):
    from pathlib import Path
    return Path(cfg.run_dir)


def test_run_b_refuses_run_a_checkpoint_in_a_shared_folder(tmp_path, base_model, art_root):  # noqa: F811
    volume, a, b = tmp_path / "volume", tmp_path / "vanilla", tmp_path / "other"
    _run(make_cfg(a, extra=["train.keep_checkpoints=2"]), base_model, art_root, 3, volume)
    assert sorted(p.name for p in volume.iterdir()) == ["step-2", "step-3"]
    cfg_b = make_cfg(b, extra=["train.seed=1"])
    prepare_run_dir(cfg_b)
    _mount(volume, b)
    with pytest.raises(ckpt.CheckpointError) as err:
        make_learner(cfg_b, base_model, art_root)
    msg = str(err.value)
    assert "\n" not in msg and "step-3 belongs to another run" in msg
    assert run_id(a) in msg and run_id(b) in msg
    assert "train.seed: 0 (on disk) != 1 (planned)" in msg  # what differs, when the configs do
    assert not (b / "metrics.jsonl").exists() or read_jsonl(b / "metrics.jsonl") == []
    assert sorted(p.name for p in volume.iterdir()) == ["step-2", "step-3"]  # A's checkpoints untouched


def test_same_config_other_run_dir_is_still_another_run(tmp_path, base_model, art_root):  # noqa: F811
    """Same config, two RUN_NAMEs (a repeat): the run ids differ, so B still refuses A's checkpoint."""
    volume, a, b = tmp_path / "volume", tmp_path / "a", tmp_path / "b"
    _run(make_cfg(a), base_model, art_root, 1, volume)
    cfg_b = make_cfg(b)
    assert config_fingerprint(make_cfg(a)) == config_fingerprint(cfg_b)  # run_dir is not outcome-relevant
    prepare_run_dir(cfg_b)
    _mount(volume, b)
    with pytest.raises(ckpt.CheckpointError, match="belongs to another run"):
        make_learner(cfg_b, base_model, art_root)


def test_own_checkpoints_resume_and_pruning_spares_a_foreign_one(tmp_path, base_model, art_root):  # noqa: F811
    run = tmp_path / "run"
    cfg = make_cfg(run, extra=["train.keep_checkpoints=1"])
    _run(cfg, base_model, art_root, 2)
    ident = run_identity(cfg)
    saved = ckpt.checkpoint_identity(run / "checkpoints" / "step-2")
    assert saved == ident and json.loads((run / "checkpoints" / "step-2" / "state.json").read_text())["identity"] == ident
    # a stray checkpoint of another run, older than ours, stays where it is when ours are pruned
    stray = run / "checkpoints" / "step-1"
    stray.mkdir()
    (stray / "manifest.json").write_text(json.dumps({"step": 1, "files": {}, "identity": {
        "run_id": "someone-else", "config_fingerprint": "x"}}))
    (stray / "complete").write_text("x\n")
    ln = make_learner(cfg, base_model, art_root)  # resumes from its own step-2
    assert ln.step == 2
    one_step(ln, HFEngine(ln.model, ln.tokenizer))
    ln.save_checkpoint()
    ln.close()
    assert sorted(p.name for p in (run / "checkpoints").iterdir()) == ["step-1", "step-3"]


def test_amended_steps_keep_the_fingerprint_and_fresh_gets_a_new_id(tmp_path):
    cfg = make_cfg(tmp_path / "r")
    assert prepare_run_dir(cfg).status == "new"
    first = run_id(cfg.run_dir)
    longer = make_cfg(tmp_path / "r", steps=9, extra=["train.keep_checkpoints=5"])
    assert config_fingerprint(longer) == config_fingerprint(cfg)  # RESUME_MUTABLE keys are not identity
    assert config_fingerprint(make_cfg(tmp_path / "r", arm="projected")) != config_fingerprint(cfg)
    prepare_run_dir(longer)
    assert run_id(cfg.run_dir) == first
    prepare_run_dir(cfg, "fresh")
    assert run_id(cfg.run_dir) != first and (tmp_path / "r" / RUN_ID_NAME).read_text().strip() == run_id(cfg.run_dir)


def test_checkpoint_without_identity_is_accepted(tmp_path, base_model, art_root):  # noqa: F811
    """Checkpoints written before identities existed resume as before (this run's by assumption)."""
    cfg = make_cfg(tmp_path / "r")
    _run(cfg, base_model, art_root, 1)
    step = tmp_path / "r" / "checkpoints" / "step-1"
    m = json.loads((step / "manifest.json").read_text())
    m.pop("identity")
    (step / "manifest.json").write_text(json.dumps(m))
    (tmp_path / "r" / RUN_ID_NAME).write_text("a-new-id\n")
    assert make_learner(cfg, base_model, art_root).step == 1
