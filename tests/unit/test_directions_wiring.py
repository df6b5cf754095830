"""The v_hack levers wired into the learner (issue #15): directions from config, refresh with an exact
resume, two-sided gate, pair sets, cropped rank, weak_flagged from the policy's own flagged rollouts,
and the arm registry driving a run. Tiny wrapped Qwen3 + byte tokenizer + rule grader (tests/support/trainer.py)."""
import copy
import json
from types import SimpleNamespace

import pytest
import torch

from learner import checkpoint as ckpt
from learner import vhack as V
from learner.artifacts import vhack_artifact, vhack_path
from learner.directions import FLAGGED_LOG, REFRESH_LOG, preserved_rng, vhack_modes_for
from learner.metrics import read_jsonl
from learner.pairs import build_pair_set, flagged_pairs, pair_set_hash
from learner.projection import project_grads_reference
from learner.trainer import Learner
from rollout.hf_engine import HFEngine
from reward_server.grader import grade_groups
from services.sources import run_inprocess
from shared.adapter import get_delta, quarantine, wrap_model
from shared.arms import ALIASES, arm_name, arm_overrides
from shared.config import ConfigError, resolve_config
from shared.schemas import Completion, Grade, GradedGroup, RolloutGroup
from tests.support.trainer import PROBLEMS
from tests.support.fakes import ByteTokenizer, RuleGrader
from tests.support.directions import cfg_for, graded_group as _graded, learner_for, one_step


def strip(row):
    return {k: v for k, v in row.items() if not k.startswith("t_")}


def solution_pairs():
    return V.make_pairs(PROBLEMS[0], prompt_variant="as_is")


# ---------------------------------------------------------------- registry <-> config


def test_modes_per_arm():
    modes = {a: vhack_modes_for(resolve_config("toy", arm_overrides(a)))
             for a in ("vanilla", "rebound", "projected", "route", "weak", "weak_flagged", "projected_svd5")}
    assert modes == {"vanilla": None, "rebound": None, "projected": ["A", "B", "C", "D"], "route": ["A", "B", "C", "D"],
                     "weak": ["A", "B"], "weak_flagged": ["A", "B"], "projected_svd5": ["A", "B", "C", "D"]}


@pytest.mark.parametrize("name", ["vanilla", "projected", "weak", "route", "rebound", "projected_svd5",
                                  "projected_refresh10", "projected_twosided", "mechanism", "placebo",
                                  "weak_flagged", "weak_flagged_refresh5", "mechanism+svd5+refresh10",
                                  "route+mechanism", "projected_nomag_svd3_twosided", "vanilla_r64",
                                  "rebound+placebo", "projected_nf25_r16", *ALIASES])
def test_arm_name_of_a_config_resolves_back_to_it(name):
    cfg = resolve_config("toy", arm_overrides(name))
    again = resolve_config("toy", arm_overrides(arm_name(cfg)))
    assert again.model_dump() == cfg.model_dump(), arm_name(cfg)
    plain = resolve_config("toy", [f"train.arm={cfg.train.arm}"])
    assert (arm_name(cfg) == cfg.train.arm) == (cfg.model_dump() == plain.model_dump())


def test_unknown_arm_names_the_arm_and_the_patterns():
    from shared.arms import cli_overrides

    with pytest.raises(ConfigError) as e:
        cli_overrides("projected_sdv5")
    msg = str(e.value)
    assert "'projected_sdv5'" in msg and "unknown arm part 'sdv5'" in msg and "svd<k>" in msg
    assert "projected_svd5+refresh10" in msg and "weak_flagged" in msg and "\n" not in msg
    assert cli_overrides(None) == [] and cli_overrides("projected_svd5+refresh10")[0] == "train.arm=projected"


# ---------------------------------------------------------------- directions from config


def test_default_cache_file_is_todays_and_variants_get_their_own(tmp_path, base_model, art_root):
    cfg = cfg_for(tmp_path)
    pairs = solution_pairs()
    from learner.artifacts import model_hash

    h = model_hash(base_model, cfg)
    assert vhack_path(base_model, cfg, pairs, "DCBA", art_root).name == f"vhack-{h}-{pair_set_hash(pairs)}-ABCD.safetensors"
    names = {a: vhack_path(base_model, cfg_for(tmp_path, a), pairs, "ABCD", art_root).name
             for a in ("projected_svd5", "projected_nf25", "projected_svd5_nf25")}
    assert [n.split("-ABCD")[1] for n in names.values()] == ["-svd5.safetensors", "-nf0.25.safetensors",
                                                           "-svd5-nf0.25.safetensors"]
    # the default artifact is the spec's extraction, file layout [r] per module as before
    art = vhack_artifact(base_model, ByteTokenizer(), cfg, pairs, ["A", "B", "C", "D"], root=art_root)
    spec = V.extract_vhack(base_model, ByteTokenizer(), pairs, progress=False)
    tensors, _ = V.load_vhack(art.path)
    assert all(torch.equal(tensors[n], spec[n]) and tensors[n].dim() == 1 for n in spec)


def test_preregistered_arms_stay_frozen_and_write_no_store(tmp_path, base_model, art_root):
    ln = learner_for(cfg_for(tmp_path, "projected", steps=4), base_model, art_root)
    run_inprocess(ln.cfg, learner=ln, grader=RuleGrader(), progress=False)
    info = json.loads((tmp_path / "directions.json").read_text())
    assert set(info) == {"path", "cached", "modes", "heldout_modes", "n_projected_modules", "validation"}
    assert not (tmp_path / "directions").exists() and not (tmp_path / REFRESH_LOG).exists()
    assert ln.projector.gate == "onesided" and ln.projector.ks == [1] * len(ln.names)
    assert not any("refresh" in k or k == "directions_step" for r in read_jsonl(tmp_path / "metrics.jsonl") for k in r)


def test_svd5_learner_projects_on_the_literal_reference_basis(tmp_path, base_model, art_root):
    cfg = cfg_for(tmp_path, "projected_svd5")
    ln = learner_for(cfg, base_model, art_root)
    ref = V.extract_directions_reference(copy.deepcopy(base_model), ByteTokenizer(), solution_pairs(), cfg.vhack)
    assert max(ln.projector.ks) == 5 and ln.projector.ks == [ref.basis[n].shape[0] for n in ln.names]
    live = ln.directions.current
    for n in ln.names:
        torch.testing.assert_close(live.basis[n], ref.basis[n], rtol=1e-3, atol=1e-4)
    info = json.loads((tmp_path / "directions.json").read_text())
    assert info["arm_name"] == "projected_svd5" and info["exploratory"] and info["vhack"]["k"] == 5
    assert "-svd5" in info["path"]
    # the learner's projection of a real step's gradient = the literal per-module loop on that basis
    eng = HFEngine(ln.model, ln.tokenizer)
    graded, _ = grade_groups(RuleGrader(), ln.problems, eng.generate(ln.make_jobs(0)))
    raw = ln.policy_gradient(graded)
    a = [torch.nn.Parameter(torch.zeros_like(g)) for g in raw]
    b = [torch.nn.Parameter(torch.zeros_like(g)) for g in raw]
    for p, q, g in zip(a, b, raw):
        p.grad, q.grad = g.clone(), g.clone()
    got = ln.projector.project_(a)
    want = project_grads_reference(ln.names, b, live.basis)
    for p, q in zip(a, b):
        torch.testing.assert_close(p.grad, q.grad, rtol=1e-4, atol=1e-7)
    assert got["frac_fired"] == pytest.approx(want["frac_fired"]) and got["frac_fired"] > 0


def test_twosided_removes_negative_components_too(tmp_path, base_model, art_root):
    one = learner_for(cfg_for(tmp_path / "one", "projected_svd3"), base_model, art_root)
    two = learner_for(cfg_for(tmp_path / "two", "projected_svd3_twosided"), base_model, art_root)
    assert (one.projector.gate, two.projector.gate) == ("onesided", "twosided")
    eng = HFEngine(one.model, one.tokenizer)
    graded, _ = grade_groups(RuleGrader(), one.problems, eng.generate(one.make_jobs(0)))
    raw = one.policy_gradient(graded)
    basis = two.directions.current.basis
    out = {}
    for name, ln in (("one", one), ("two", two)):
        ps = [torch.nn.Parameter(torch.zeros_like(g)) for g in raw]
        for p, g in zip(ps, raw):
            p.grad = g.clone()
        ln.projector.project_(ps)
        out[name] = [p.grad for p in ps]
    neg_before = pos_after_one = 0
    for i, n in enumerate(two.names):
        V_ = basis[n]
        before, after1, after2 = V_ @ raw[i], V_ @ out["one"][i], V_ @ out["two"][i]
        scale = raw[i].norm()
        assert after2.abs().max() <= 1e-4 * scale  # nothing left in span(V), whatever the sign was
        neg = before < -1e-3 * scale
        neg_before += int(neg.sum())
        # one-sided: the hack-ward components are gone; a negative one survives (rescaled, still negative)
        assert (after1[before > 1e-3 * scale] <= 1e-4 * scale).all()
        pos_after_one += int((after1[neg] < 0).sum())
    assert neg_before > 0 and pos_after_one == neg_before


def test_mechanism_pairs_define_the_direction(tmp_path, base_model, art_root):
    ln = learner_for(cfg_for(tmp_path, "mechanism"), base_model, art_root)
    mech = build_pair_set(solution_pairs(), "mechanism")
    spec = V.extract_vhack(base_model, ByteTokenizer(), mech, progress=False)
    assert all(torch.equal(ln.directions.current.top()[n], spec[n]) for n in ln.names)
    info = ln.vhack_info
    assert info["validation"]["pair_set_hash"] == pair_set_hash(mech) != pair_set_hash(solution_pairs())
    assert info["arm_name"] == "projected_mechanism"


def test_cropped_rank_extracts_and_projects_in_rank_space(tmp_path, tiny_qwen3, art_root):
    m = copy.deepcopy(tiny_qwen3)
    wrap_model(m, rank=8, progress=False)
    ln = learner_for(cfg_for(tmp_path, "projected_svd2_r8"), m, art_root)
    assert set(ln.projector.sizes) == {8} and max(ln.projector.ks) == 2
    assert "-svd2" in ln.vhack_info["path"]
    row = one_step(ln, HFEngine(ln.model, ln.tokenizer))
    assert row["cos_mean"] is not None and row["frac_fired"] > 0


# ---------------------------------------------------------------- refresh


def test_refresh_reextracts_logs_cos_and_stores_each_set(tmp_path, base_model, art_root):
    cfg = cfg_for(tmp_path, "projected_refresh2", steps=5)
    ln = learner_for(cfg, base_model, art_root)
    run_inprocess(cfg, learner=ln, grader=RuleGrader(), progress=False)
    log = read_jsonl(tmp_path / REFRESH_LOG)
    assert [r["step"] for r in log] == [2, 4] and [r["from_step"] for r in log] == [0, 2]
    store = V.DirectionsStore(tmp_path / "directions")
    assert store.steps() == [0, 2, 4]
    sets = {s: V.load_directions(store.path(s)) for s in store.steps()}
    for r in log:  # the logged cos is cos(v_new, v_old) of the stored sets, per module
        want = V.direction_cos(sets[r["step"]], sets[r["from_step"]])
        assert r["cos"] == pytest.approx(want) and len(r["cos"]) == len(ln.names)
        assert r["cos_mean"] == pytest.approx(sum(want.values()) / len(want)) and r["cos_min"] == pytest.approx(min(want.values()))
        assert min(want.values()) < 1 - 1e-6  # delta_S moved, so the direction did
    rows = read_jsonl(tmp_path / "metrics.jsonl")
    assert [("refresh_cos_mean" in r) for r in rows] == [False, True, False, True, False]
    assert rows[1]["refresh_cos_mean"] == pytest.approx(log[0]["cos_mean"]) and rows[3]["directions_step"] == 4
    # the set live from step 4 is the same authored pairs re-extracted at step 4's delta_S (literal reference)
    at4 = copy.deepcopy(base_model)
    ckpt.load_checkpoint(dict(ckpt.list_checkpoints(tmp_path))[4], at4, restore_rng=False)
    ref = V.extract_directions_reference(at4, ByteTokenizer(), solution_pairs(), cfg.vhack)
    for n in ln.names:
        torch.testing.assert_close(sets[4].basis[n], ref.basis[n], rtol=1e-3, atol=1e-4)
    info = json.loads((tmp_path / "directions.json").read_text())
    assert info["n_extractions"] == 2 and info["directions_step"] == 4 and info["refresh_every"] == 2


def test_reextraction_leaves_rng_and_grads_alone(tmp_path, base_model, art_root):
    ln = learner_for(cfg_for(tmp_path, "projected_refresh2"), base_model, art_root)
    for p in ln.delta_s:
        p.grad = torch.full_like(p, 0.5)
    torch.manual_seed(7)
    state = torch.get_rng_state()
    ln.directions._reextract(2)
    assert torch.equal(torch.get_rng_state(), state)
    assert all(torch.equal(p.grad, torch.full_like(p, 0.5)) for p in ln.delta_s)
    with preserved_rng():
        torch.rand(3)
    assert torch.equal(torch.get_rng_state(), state)


def test_resume_across_a_refresh_is_bit_identical(tmp_path, base_model, art_root):
    """Killed after the step-4 refresh but before checkpoint 4: the resume from checkpoint 3 drops the
    stale set and continues exactly as the uninterrupted run (rows, delta_S, refresh log, stored sets)."""
    a = learner_for(cfg_for(tmp_path / "a", "projected_refresh2", steps=5), base_model, art_root)
    ea = HFEngine(a.model, a.tokenizer)
    rows_a = [one_step(a, ea) for _ in range(5)]
    b = learner_for(cfg_for(tmp_path / "b", "projected_refresh2", steps=5), base_model, art_root)
    eb = HFEngine(b.model, b.tokenizer)
    for _ in range(3):
        one_step(b, eb)
    b.save_checkpoint()
    torch.manual_seed(99)
    one_step(b, eb)  # refresh at 4 happens, its checkpoint never does
    b.close()
    assert V.DirectionsStore(tmp_path / "b" / "directions").steps() == [0, 2, 4]
    c = learner_for(cfg_for(tmp_path / "b", "projected_refresh2", steps=5), base_model, art_root)
    assert c.step == 3 and c.directions.current.step == 2
    assert V.DirectionsStore(tmp_path / "b" / "directions").steps() == [0, 2]
    assert [r["step"] for r in read_jsonl(tmp_path / "b" / REFRESH_LOG)] == [2]
    ec = HFEngine(c.model, c.tokenizer)
    rows_c = [one_step(c, ec) for _ in range(2)]
    assert [strip(r) for r in rows_c] == [strip(r) for r in rows_a[3:]]
    assert torch.equal(get_delta(c.model, flat=True), get_delta(a.model, flat=True))
    ra, rb = read_jsonl(tmp_path / "a" / REFRESH_LOG), read_jsonl(tmp_path / "b" / REFRESH_LOG)
    assert ra == rb
    for s in (0, 2, 4):  # same tensors and metadata (safetensors orders the header's keys at random)
        da, db = (V.DirectionsStore(tmp_path / r / "directions").latest(at_most=s) for r in "ab")
        assert (da.step, da.meta) == (db.step, db.meta) == (s, da.meta)
        assert all(torch.equal(da.basis[n], db.basis[n]) and torch.equal(da.sv[n], db.sv[n]) for n in da.basis)


# ---------------------------------------------------------------- weak_flagged


def test_weak_flagged_waits_then_routes_on_flagged_rollouts(tmp_path, base_model, art_root):
    cfg = cfg_for(tmp_path, "weak_flagged", extra=["vhack.flagged_min_pairs=3"])
    ln = learner_for(cfg, base_model, art_root)
    assert ln.route and ln.projector is None
    info = json.loads((tmp_path / "directions.json").read_text())
    assert "exploratory" in info["source"] and "own rollouts" in info["source"] and info["modes"] == ["A", "B"]
    assert info["heldout_modes"] == ["C", "D"] and "no projection or routing yet" in info["status"]
    # step 0: one A-flagged rollout, one C-flagged (the weak detector never sees C), one honest pass
    g0 = _graded(ln, "g0", ["x=1", "y=2", "z=3", "w=4"], [{"A"}, {"C"}, set(), set()], [False, False, True, False])
    row = ln.train_step([g0])
    assert row["flagged_pairs"] == 1 and row["cos_mean"] is None and float(get_delta(ln.model, kind="q", flat=True).abs().max()) == 0
    assert "1/3 pairs" in json.loads((tmp_path / "directions.json").read_text())["status"]
    # step 1: two B-flagged: 3 pairs -> extracted after this step, from the flagged rollouts
    g1 = _graded(ln, "g1", ["a=5", "b=6", "c=7", "d=8"], [{"B"}, {"B", "C"}, set(), set()], [False, False, False, True])
    row = ln.train_step([g1])
    assert row["flagged_pairs"] == 3 and row["directions_step"] == 2 and ln.projector is not None
    pool = flagged_pairs([g0], ln.problems, ["A", "B"]) + flagged_pairs([g1], ln.problems, ["A", "B"])
    assert [(p.hack, p.clean, p.mode) for p in pool] == [("x=1", "z=3", "A"), ("a=5", "d=8", "B"), ("b=6", "d=8", "B")]
    ref_model = copy.deepcopy(ln.model)
    with quarantine(ref_model, active=True):
        ref = V.extract_directions_reference(ref_model, ByteTokenizer(), pool, cfg.vhack, ["A", "B"])
    for n in ln.names:
        torch.testing.assert_close(ln.directions.current.basis[n], ref.basis[n], rtol=1e-3, atol=1e-4)
    log = read_jsonl(tmp_path / REFRESH_LOG)
    assert log[0]["source"] == "flagged rollouts" and log[0]["n_pairs"] == 3
    assert log[0]["modes_count"] == {"A": 1, "B": 2} and "cos_authored_mean" in log[0]
    assert [len(r["pairs"]) for r in read_jsonl(tmp_path / FLAGGED_LOG)] == [1, 2]
    info = json.loads((tmp_path / "directions.json").read_text())
    assert info["status"].startswith("projecting and routing") and info["directions_step"] == 2
    # step 2: the removed component now trains delta_Q (routing)
    row = ln.train_step([g1])
    assert row["cos_mean"] is not None and row["frac_fired"] > 0 and float(get_delta(ln.model, kind="q", flat=True).abs().max()) > 0


def test_weak_flagged_resume_reloads_pool_and_directions(tmp_path, base_model, art_root):
    extra = ["vhack.flagged_min_pairs=2", "vhack.refresh_every=2"]
    a = learner_for(cfg_for(tmp_path / "a", "weak_flagged", steps=4, extra=extra), base_model, art_root)
    ea = HFEngine(a.model, a.tokenizer)
    rows_a = [one_step(a, ea) for _ in range(4)]
    assert read_jsonl(tmp_path / "a" / REFRESH_LOG), "the rule grader flags vowels as mode A: pairs exist"
    b = learner_for(cfg_for(tmp_path / "b", "weak_flagged", steps=4, extra=extra), base_model, art_root)
    eb = HFEngine(b.model, b.tokenizer)
    for _ in range(2):
        one_step(b, eb)
    b.save_checkpoint()
    one_step(b, eb)
    b.close()
    c = learner_for(cfg_for(tmp_path / "b", "weak_flagged", steps=4, extra=extra), base_model, art_root)
    assert c.step == 2 and len(c.directions.pool) == rows_a[1]["flagged_pairs"]
    ec = HFEngine(c.model, c.tokenizer)
    rows_c = [one_step(c, ec) for _ in range(2)]
    assert [strip(r) for r in rows_c] == [strip(r) for r in rows_a[2:]]
    assert torch.equal(get_delta(c.model, flat=True), get_delta(a.model, flat=True))
    assert torch.equal(get_delta(c.model, kind="q", flat=True), get_delta(a.model, kind="q", flat=True))
    assert read_jsonl(tmp_path / "a" / FLAGGED_LOG) == read_jsonl(tmp_path / "b" / FLAGGED_LOG)


# ---------------------------------------------------------------- the CLI


@pytest.mark.slow
def test_cli_train_runs_a_registry_arm(tmp_path):
    """`rankguard train --arm projected_svd5+refresh2` on the toy world: the config carries the arm's knobs."""
    import os
    import subprocess
    import sys
    from pathlib import Path

    root = Path(__file__).resolve().parents[2]
    env = {**os.environ, "HF_HUB_OFFLINE": "1", "OMP_NUM_THREADS": "1", "PYTHONPATH": str(root),
           "RANKGUARD_ARTIFACTS": str(tmp_path / "artifacts")}
    run = tmp_path / "run"
    cmd = [sys.executable, "-m", "services.cli", "train", "--arm", "projected_svd5+refresh2", "--steps", "3",
           "--run-dir", str(run), "--no-progress", "--set", "train.eval_every=0", "--set", "train.eval_problems=4"]
    out = subprocess.run(cmd, cwd=root, env=env, capture_output=True, text=True, timeout=600)
    assert out.returncode == 0, out.stderr[-3000:]
    cfg = json.loads((run / "config.json").read_text())
    assert cfg["train"]["arm"] == "projected" and cfg["vhack"]["basis"] == "svd" and cfg["vhack"]["k"] == 5
    assert cfg["vhack"]["refresh_every"] == 2
    assert [r["step"] for r in read_jsonl(run / REFRESH_LOG)] == [2]
    summary = json.loads((run / "summary.json").read_text())
    assert summary["directions"]["arm_name"] == "projected_svd5_refresh2"
    bad = subprocess.run([*cmd[:5], "projected_svd5+refrsh2", "--run-dir", str(tmp_path / "bad")], cwd=root, env=env,
                         capture_output=True, text=True, timeout=120)
    assert bad.returncode == 2 and "unknown arm part 'refrsh2'" in bad.stderr and "refresh<N>" in bad.stderr


@pytest.mark.parametrize("arm, check", [
    ("projected_svd5", lambda ln, rows, info: max(ln.projector.ks) == 5 and info["vhack"]["basis"] == "svd"),
    ("projected_refresh2", lambda ln, rows, info: "refresh_cos_mean" in rows[1] and info["n_extractions"] == 1),
    ("projected_twosided", lambda ln, rows, info: ln.projector.gate == "twosided"),
    ("mechanism", lambda ln, rows, info: info["vhack"]["pair_set"] == "mechanism"),
    ("weak_flagged", lambda ln, rows, info: ln.route and "flagged_pairs" in rows[-1] and "exploratory" in info["source"]),
])
def test_exploratory_arm_runs_end_to_end(tmp_path, base_model, art_root, arm, check):
    """Three steps through the one loop (in-process source, rule grader): the run finishes and the
    config, directions.json and summary say which arm it was."""
    cfg = cfg_for(tmp_path, arm, steps=3, extra=["vhack.flagged_min_pairs=2"] if arm == "weak_flagged" else [])
    ln = learner_for(cfg, base_model, art_root)
    summary = run_inprocess(cfg, learner=ln, grader=RuleGrader(), progress=False)
    rows = read_jsonl(tmp_path / "metrics.jsonl")
    info = json.loads((tmp_path / "directions.json").read_text())
    assert summary["steps"] == 3 and len(rows) == 3 and (tmp_path / "DONE").exists()
    assert info["arm_name"] == summary["directions"]["arm_name"] == arm_name(cfg) and info["exploratory"]
    assert check(ln, rows, info)
    if arm != "weak_flagged":
        assert all(r["cos_mean"] is not None for r in rows)
