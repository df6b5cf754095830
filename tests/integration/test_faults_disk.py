"""Disk full while checkpointing (issue 20 item 6): the write fails, the previous checkpoint stays
intact, the run goes on with every row kept and writes the checkpoint as soon as the disk takes it."""
from __future__ import annotations

import errno
import logging

from learner import checkpoint as ckpt
from learner.metrics import read_jsonl
from services.sources import run_inprocess
from tests.support.trainer import make_cfg, make_learner
from tests.support.fakes import RuleGrader


def test_disk_full_at_a_checkpoint_loses_nothing(tmp_path, base_model, art_root, monkeypatch, caplog):  # noqa: F811
    cfg = make_cfg(tmp_path, steps=5, extra=["train.checkpoint_every=2"])
    ln = make_learner(cfg, base_model, art_root)
    real = ckpt.save_file
    calls = []

    def full_at_step_4(tensors, path, metadata=None):
        calls.append(int(metadata["step"]))
        if int(metadata["step"]) == 4 and calls.count(4) == 1:
            raise OSError(errno.ENOSPC, "No space left on device")
        return real(tensors, path, metadata=metadata)

    monkeypatch.setattr(ckpt, "save_file", full_at_step_4)
    with caplog.at_level(logging.WARNING, logger="rankguard.learner"):
        run_inprocess(cfg, learner=ln, grader=RuleGrader(), progress=False)
    assert any("checkpoint at step 4 failed (No space left on device)" in r.getMessage()
               and "step-2" in r.getMessage() for r in caplog.records)
    assert calls == [2, 4, 5]  # step 4 refused; tried again (and written) after the next step
    assert [s for s, _ in ckpt.list_checkpoints(tmp_path)] == [2, 5]
    assert all(ckpt.checkpoint_problem(p) is None for _, p in ckpt.list_checkpoints(tmp_path))
    assert not list((tmp_path / "checkpoints").glob(".tmp-*"))
    assert [r["step"] for r in read_jsonl(tmp_path / "metrics.jsonl")] == [0, 1, 2, 3, 4]
    assert (tmp_path / "DONE").exists()
