"""Checkpoints survive truncation and bit rot: manifest + `complete` marker, verification on resume,
fallback to the newest good checkpoint with a warning naming the bad one, errors that name the
file, pruning that never touches what is newer than the kept ones, and exact resume after a fallback."""
import json
import logging

import pytest
import torch

from learner import checkpoint as ckpt
from learner.metrics import read_jsonl
from rollout.hf_engine import HFEngine
from shared.adapter import get_delta
from tests.support.trainer import make_cfg, make_learner, one_step, strip_times


@pytest.fixture
def live(base_model):  # noqa: F811
    import copy

    model = copy.deepcopy(base_model)
    params = [p for n, p in model.named_parameters() if n.endswith("delta_S")]
    opt = torch.optim.AdamW(params, lr=0.1)
    sched = torch.optim.lr_scheduler.LambdaLR(opt, lambda s: 1.0)
    return model, opt, sched


def _save(run, live, step, keep=3):
    model, opt, sched = live
    with torch.no_grad():
        for p in opt.param_groups[0]["params"]:
            p.fill_(float(step))
    return ckpt.save_checkpoint(run, step, step, model, opt, sched, {"step": step}, keep=keep)


def _truncate(path, keep_bytes=40):
    data = path.read_bytes()
    path.write_bytes(data[:keep_bytes])


def test_checkpoint_has_manifest_and_marker(tmp_path, live):
    path = _save(tmp_path, live, 1)
    assert sorted(p.name for p in path.iterdir()) == ["adapter.safetensors", "complete", "manifest.json",
                                                     "optimizer.pt", "rng.pt", "state.json"]
    files = json.loads((path / "manifest.json").read_text())["files"]
    assert set(files) == {"adapter.safetensors", "optimizer.pt", "rng.pt", "state.json"}
    assert all(files[n]["size"] == (path / n).stat().st_size and len(files[n]["sha256"]) == 64 for n in files)
    assert ckpt.checkpoint_problem(path) is None
    assert not list((tmp_path / "checkpoints").glob(".tmp-*"))  # the temp folder was renamed, not copied


@pytest.mark.parametrize("damage,needle", [
    (lambda p: _truncate(p / "adapter.safetensors"), "adapter.safetensors has 40 bytes, the manifest says"),
    (lambda p: _truncate(p / "optimizer.pt"), "optimizer.pt has 40 bytes"),
    (lambda p: _truncate(p / "state.json", 10), "state.json has 10 bytes"),
    (lambda p: (p / "complete").unlink(), "incomplete (no 'complete' marker)"),
    (lambda p: (p / "rng.pt").unlink(), "rng.pt is missing"),
    (lambda p: _flip_last_byte(p / "adapter.safetensors"), "does not match its sha256 in the manifest (corrupt)"),
])
def test_bad_newest_checkpoint_is_skipped_with_a_warning(tmp_path, live, caplog, damage, needle):
    _save(tmp_path, live, 1)
    good = _save(tmp_path, live, 2)
    bad = _save(tmp_path, live, 3)
    damage(bad)
    with caplog.at_level(logging.WARNING, logger="rankguard.checkpoint"):
        assert ckpt.latest_checkpoint(tmp_path) == good
    warnings = [r.getMessage() for r in caplog.records if r.levelno == logging.WARNING]
    assert len(warnings) == 1 and "skipping checkpoint step-3" in warnings[0] and needle in warnings[0], warnings
    assert "\n" not in warnings[0]
    with pytest.raises(ckpt.CheckpointError, match="step-3"):  # loaded explicitly it names what is wrong
        ckpt.load_checkpoint(bad, live[0], live[1], live[2])
    c = ckpt.load_checkpoint(good, live[0], live[1], live[2])
    assert c.step == 2 and all(float(p.detach().flatten()[0]) == 2.0 for p in live[1].param_groups[0]["params"])


def _flip_last_byte(path):
    data = bytearray(path.read_bytes())
    data[-1] ^= 0xFF
    path.write_bytes(bytes(data))


def test_no_good_checkpoint_means_none(tmp_path, live, caplog):
    _truncate(_save(tmp_path, live, 1) / "adapter.safetensors")
    with caplog.at_level(logging.WARNING, logger="rankguard.checkpoint"):
        assert ckpt.latest_checkpoint(tmp_path) is None
    assert "no checkpoint yet" in ckpt.resume_point(tmp_path)
    good = _save(tmp_path, live, 2)
    assert ckpt.resume_point(tmp_path) == f"a resume continues from {good}"


@pytest.mark.parametrize("name,what", [("adapter.safetensors", "the adapter weights"),
                                       ("optimizer.pt", "the optimizer state"), ("state.json", "the checkpoint state")])
def test_legacy_checkpoint_errors_name_the_file(tmp_path, live, name, what):
    """A checkpoint from before manifests is used unverified; a broken file in it is one line naming it."""
    path = _save(tmp_path, live, 1)
    (path / "manifest.json").unlink()
    (path / "complete").unlink()
    assert ckpt.latest_checkpoint(tmp_path) == path  # still resumable
    _truncate(path / name, 20)
    with pytest.raises(ckpt.CheckpointError) as e:
        ckpt.load_checkpoint(path, live[0], live[1], live[2])
    msg = str(e.value)
    assert msg.startswith(f"{path / name}: cannot read {what} (") and "\n" not in msg, msg


def test_pruning_keeps_the_newest_complete_and_everything_newer(tmp_path, live):
    for s in (1, 2, 3, 4):
        _save(tmp_path, live, s, keep=2)
    assert [s for s, _ in ckpt.list_checkpoints(tmp_path)] == [3, 4]
    (tmp_path / "checkpoints" / "step-4" / "complete").unlink()  # newest now incomplete
    _save(tmp_path, live, 5, keep=2)  # complete: 3, 5 -> keep both; the incomplete 4 sits between them
    assert [s for s, _ in ckpt.list_checkpoints(tmp_path)] == [3, 4, 5]
    _save(tmp_path, live, 6, keep=2)  # complete: 3, 5, 6 -> cutoff 5: 3 and the incomplete 4 go
    assert [s for s, _ in ckpt.list_checkpoints(tmp_path)] == [5, 6]
    with pytest.raises(ValueError, match="keep must be >= 1"):
        ckpt.prune_checkpoints(tmp_path, 0)


def test_stale_temp_folder_and_same_step_resave(tmp_path, live):
    root = tmp_path / "checkpoints"
    root.mkdir()
    (root / ".tmp-step-7-abc").mkdir()  # a writer killed mid-checkpoint
    (root / ".tmp-step-7-abc" / "adapter.safetensors").write_bytes(b"half")
    _save(tmp_path, live, 7)
    assert [p.name for p in root.iterdir()] == ["step-7"]
    _truncate(root / "step-7" / "optimizer.pt")
    _save(tmp_path, live, 7)  # the same step again replaces the broken one
    assert ckpt.checkpoint_problem(root / "step-7") is None and [p.name for p in root.iterdir()] == ["step-7"]


def test_resume_after_a_truncated_newest_checkpoint_is_exact(tmp_path, base_model, art_root, caplog):  # noqa: F811
    """Steps 0-2 checkpointed after each step; step-3 truncated; the resumed learner warns, starts at
    step 2 from step-2, and its next step is bit-identical to the uninterrupted run's."""
    a = make_learner(make_cfg(tmp_path / "a"), base_model, art_root)
    ea = HFEngine(a.model, a.tokenizer)
    rows_a = []
    for _ in range(3):
        rows_a.append(one_step(a, ea))
        ea.version = a.policy_version
    b = make_learner(make_cfg(tmp_path / "b"), base_model, art_root)
    eb = HFEngine(b.model, b.tokenizer)
    for _ in range(3):
        one_step(b, eb)
        eb.version = b.policy_version
        b.save_checkpoint()
    b.close()
    _truncate(tmp_path / "b" / "checkpoints" / "step-3" / "adapter.safetensors", 100)
    torch.manual_seed(99)
    with caplog.at_level(logging.WARNING, logger="rankguard.checkpoint"):
        c = make_learner(make_cfg(tmp_path / "b"), base_model, art_root)
    assert any("skipping checkpoint step-3" in r.getMessage() and "adapter.safetensors" in r.getMessage()
               for r in caplog.records)
    assert c.step == 2 and [r["step"] for r in read_jsonl(tmp_path / "b" / "metrics.jsonl")] == [0, 1]
    ec = HFEngine(c.model, c.tokenizer)
    ec.version = c.policy_version
    assert strip_times(one_step(c, ec)) == strip_times(rows_a[2])
    assert torch.equal(get_delta(c.model, flat=True), get_delta(a.model, flat=True))


def test_resume_with_no_good_checkpoint_starts_over_and_keeps_the_bad_one(tmp_path, base_model, art_root):  # noqa: F811
    b = make_learner(make_cfg(tmp_path), base_model, art_root)
    one_step(b, HFEngine(b.model, b.tokenizer))
    bad = b.save_checkpoint()
    b.close()
    _truncate(bad / "optimizer.pt")
    c = make_learner(make_cfg(tmp_path), base_model, art_root)
    assert c.step == 0 and read_jsonl(tmp_path / "metrics.jsonl") == []  # step 0 runs again
    assert (bad / "optimizer.pt").exists()  # kept, to be looked at (the warning named it)
