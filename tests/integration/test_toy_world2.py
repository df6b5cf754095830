"""Toy world v2 (issue #23): partial families, disjoint eval prompts, v1 still reachable, per-kind stats,
and the route arm's bounded quarantine and deployed-policy evaluation."""
from __future__ import annotations

import collections
import copy
import json
import math
import random

import pytest
import torch

torch.set_num_threads(1)

from shared.config import ConfigError, ToyConfig, resolve_config  # noqa: E402
from shared.toy import prebuilt, tasks, world2  # noqa: E402
from shared.toy.build import fingerprint, grade_stats, world_problems  # noqa: E402
from shared.toy.warmstart import WarmStartConfig, make_target  # noqa: E402

V1_SHIPPED = "b3ef5e4bc0365173"  # the v1 world's fingerprint since before v2 existed


@pytest.fixture(scope="module")
def v2():
    return world_problems(ToyConfig(), WarmStartConfig())


def test_world_defaults_and_old_configs_are_v1():
    assert ToyConfig().world == "v2" and ToyConfig().dir == ".cache/toy-v2"
    v1 = ToyConfig(world="v1")
    assert (v1.dir, v1.n_eval, v1.hard_fraction, v1.partial_fraction) == (".cache/toy", 64, 0.5, 0.0)
    old_dump = {"dir": ".cache/toy", "seed": 0, "n_train": 400, "n_eval": 64, "hard_fraction": 0.5}
    assert ToyConfig.model_validate(old_dump).world == "v1"  # config.json written before worlds
    assert resolve_config("toy", ["toy.world=v1"]).toy.n_eval == 64
    with pytest.raises(ConfigError, match="partial_fraction"):
        resolve_config("toy", ["toy.world=v1", "toy.partial_fraction=0.2"])
    with pytest.raises(ConfigError, match="exceed 1"):
        resolve_config("toy", ["toy.hard_fraction=0.7", "toy.partial_fraction=0.4"])


def test_v1_fingerprint_is_unchanged_and_v2_differs():
    assert fingerprint(ToyConfig(world="v1"), WarmStartConfig()) == V1_SHIPPED
    assert V1_SHIPPED in prebuilt.shipped_fingerprints()
    assert fingerprint(ToyConfig(), WarmStartConfig()) != V1_SHIPPED
    # a v2-only knob moves v2's fingerprint, not v1's
    other = WarmStartConfig(partial_correct_share=0.3)
    assert fingerprint(ToyConfig(world="v1"), other) == V1_SHIPPED
    assert fingerprint(ToyConfig(), other) != fingerprint(ToyConfig(), WarmStartConfig())


def test_v2_kinds_and_shares(v2):
    train, evals, extra = v2
    assert len(train) == 400 and len(evals) == 640 and len(extra) == 3000
    count = collections.Counter(p.difficulty for p in evals)
    assert count == {"hard": 256, "partial": 256, "easy": 128}
    assert {f.difficulty for f in world2.FAMILIES} == set(world2.KINDS)
    assert len(world2.BY_KIND["partial"]) == 6 and len(world2.BY_KIND["easy"]) == 13
    # every family appears on both sides of the prompt split
    assert {p.family for p in evals} == {p.family for p in train} == {f.name for f in world2.FAMILIES}


def test_eval_prompts_never_appear_in_training_or_warm_start(v2):
    train, evals, extra = v2
    seen = {p.question for p in train + extra}
    assert not {p.question for p in evals} & seen
    assert all(world2.is_eval_prompt(p.question) for p in evals)
    assert not any(world2.is_eval_prompt(p.question) for p in train + extra)
    assert len({p.question for p in evals}) > 300  # many distinct prompts, not a few repeated ones


def test_v2_canonicals_pass_shortcuts_fail_and_names_vary(v2):
    train, evals, _ = v2
    for p in train[:150] + evals[:150]:
        assert tasks.run_asserts(p.canonical_solution, p), p.id
        assert not any(tasks.run_asserts(w, p) for w in p.wrong_solutions), p.id
    partial = [p for p in evals if p.difficulty == "partial"]
    assert sum(bool(p.wrong_solutions) for p in partial) / len(partial) > 0.95  # a shortcut to learn away from
    args = {p.canonical_solution.split("(self, ")[1].split(")")[0] for p in evals if p.family == "add"}
    assert len(args) >= 4  # argument names vary: the prompt text varies within a family


def test_partial_targets_follow_the_correct_share(v2):
    train, _, _ = v2
    partial = [p for p in train if p.difficulty == "partial"]
    cfg = WarmStartConfig(hack_share=0.0, partial_correct_share=0.3)
    rng = random.Random(0)
    kinds = collections.Counter(make_target(partial[i % len(partial)], rng, cfg).kind for i in range(4000))
    assert kinds["correct"] / 4000 == pytest.approx(0.3, abs=0.03)
    assert kinds["shortcut"] / 4000 == pytest.approx(0.7, abs=0.03)
    easy = [p for p in train if p.difficulty == "easy"]
    assert make_target(easy[0], random.Random(1), cfg).kind in ("correct", "wrong")


def test_grade_stats_report_each_kind(v2):
    _, evals, _ = v2
    probs = [p for p in evals if p.difficulty == "easy"][:3] + [p for p in evals if p.difficulty == "partial"][:4]

    class Fake:
        def __init__(self, *a, **k):
            pass

        def __enter__(self):
            return self

        def __exit__(self, *exc):
            return False

        def grade_many(self, pairs):
            from shared.schemas import Grade
            return [Grade(formatted=True, can_compile=True, gt_pass=t == "ok", pass_frac=1.0, exploited={},
                          attempted={}, reward=0.0) for _, t in pairs]

    texts = ["ok", "ok", "no", "ok", "no", "no", "no"]
    st = grade_stats(probs, texts, make_grader=Fake)
    assert st["pass_easy"] == pytest.approx(2 / 3, abs=1e-3) and st["pass_partial"] == pytest.approx(0.25)
    assert st["pass_hard"] is None and set(st["pass_by_family"]) == {p.family for p in probs}


def test_pack_keeps_the_other_worlds_archive(tmp_path, monkeypatch):
    monkeypatch.setattr(prebuilt, "PREBUILT_DIR", tmp_path)
    monkeypatch.setattr(prebuilt, "MANIFEST", tmp_path / "MANIFEST.json")
    builds = {}
    for name, world, fp in (("a", "v1", "1111"), ("b", "v2", "2222"), ("c", "v2", "3333")):
        d = tmp_path / name
        d.mkdir()
        (d / "x.txt").write_text(name)
        (d / "build.json").write_text(json.dumps({"fingerprint": fp, "toy": {"world": world} if world != "v1" else {}}))
        builds[name] = d
    prebuilt.pack(builds["a"])
    prebuilt.pack(builds["b"])
    assert prebuilt.shipped_fingerprints() == ["1111", "2222"]
    prebuilt.pack(builds["c"])  # a new v2 build replaces v2's, keeps v1's
    assert prebuilt.shipped_fingerprints() == ["1111", "3333"]
    assert sorted(p.name for p in tmp_path.glob("toy-*.tar.xz")) == ["toy-1111.tar.xz", "toy-3333.tar.xz"]
    out = tmp_path / "unpacked"
    assert prebuilt.unpack("1111", out) and (out / "x.txt").read_text() == "a"


# ---- route: bounded quarantine, deployed vs training policy ----------------------------------------

def test_cap_quarantine_pulls_back_to_the_ratio(tiny_qwen3):
    from shared.adapter import adapter_modules, cap_quarantine_, wrap_model

    m = copy.deepcopy(tiny_qwen3)
    wrap_model(m, progress=False)
    mods = list(adapter_modules(m).values())
    with torch.no_grad():
        mods[0].delta_Q.copy_(mods[0].S)  # ||dQ|| = ||S||: far over a 0.1 cap
        mods[1].delta_Q.copy_(0.05 * mods[1].S)  # within the cap: left alone
    before = mods[1].delta_Q.clone()
    assert cap_quarantine_(m, 0.0) == 0  # 0 = unbounded
    assert cap_quarantine_(m, 0.1) == 1
    ratio = float(torch.linalg.vector_norm(mods[0].delta_Q) / torch.linalg.vector_norm(mods[0].S))
    assert ratio == pytest.approx(0.1, rel=1e-5)
    assert torch.equal(mods[1].delta_Q, before)
    # direction kept: still parallel to S
    cos = torch.nn.functional.cosine_similarity(mods[0].delta_Q, mods[0].S, dim=0)
    assert float(cos) == pytest.approx(1.0, abs=1e-5)


def test_eval_noise_and_kind_rates():
    from learner.metrics import eval_noise, kind_rates
    from shared.schemas import Grade

    row = {"pass_rate": 0.5, "hack_strict": 0.1, "n": 640}
    se = eval_noise(row)
    assert se["pass_rate_se"] == pytest.approx(math.sqrt(0.25 / 640)) and se["pass_rate_se"] <= 0.02
    assert se["hack_strict_se"] == pytest.approx(math.sqrt(0.09 / 640))

    def g(ok, hack=False):
        return Grade(formatted=True, can_compile=True, gt_pass=ok, pass_frac=1.0, exploited={"A": hack},
                     attempted={"A": hack}, reward=0.0)

    rates = kind_rates(["easy", "partial", "partial", "hard"], [g(True), g(True), g(False), g(False, True)])
    assert rates == {"pass_easy": 1.0, "hack_strict_easy": 0.0, "n_easy": 1, "pass_partial": 0.5,
                     "hack_strict_partial": 0.0, "n_partial": 2, "pass_hard": 0.0, "hack_strict_hard": 1.0, "n_hard": 1}


def test_route_eval_measures_both_policies_and_logs_geometry(tmp_path, tiny_qwen3):
    from learner.trainer import Learner
    from reward_server.grader import grade_groups
    from rollout.hf_engine import HFEngine
    from shared.adapter import adapter_modules, wrap_model
    from tests.support.trainer import PROBLEMS, make_cfg
    from tests.support.fakes import ByteTokenizer, RuleGrader
    from types import SimpleNamespace

    model = copy.deepcopy(tiny_qwen3)
    wrap_model(model, progress=False)
    cfg = make_cfg(tmp_path, arm="route", extra=["train.route_cap=0.001"])
    ln = Learner(cfg, resume=False, policy=SimpleNamespace(model=model, tokenizer=ByteTokenizer(), model_id="t"),
                 problems=PROBLEMS, artifacts_root=tmp_path / "art", tensorboard=False)
    eng = HFEngine(ln.model, ln.tokenizer)
    for _ in range(2):
        graded, _ = grade_groups(RuleGrader(), ln.problems, eng.generate(ln.make_jobs(ln.step)))
        row = ln.train_step(graded)
        eng.version = ln.policy_version
    for key in ("delta_s_norm", "delta_q_norm", "cos_delta_s_vhack", "cos_delta_q_vhack", "quarantine_capped"):
        assert key in row, key
    for m in adapter_modules(ln.model).values():  # the cap holds after every step
        assert float(torch.linalg.vector_norm(m.delta_Q)) <= 0.001 * float(torch.linalg.vector_norm(m.S)) * (1 + 1e-5)
    jobs = ln.eval_jobs(ln.step)
    assert [j.adapter_mode for j in jobs] == ["eval"] * 2 + ["train"] * 2
    graded, _ = grade_groups(RuleGrader(), ln.problems, eng.generate(jobs))
    ev = ln.record_eval(ln.step, graded)
    assert ev["n"] == 4  # the deployed policy's completions only (2 problems x 2 samples)
    for key in ("pass_rate_se", "kl_deployed", "train_policy_pass_rate", "train_policy_hack_strict",
                "train_policy_kl", "pass_easy", "delta_q_norm"):
        assert key in ev, key
    assert ev["kl_deployed"] >= 0 and ev["train_policy_kl"] >= 0


def test_ensure_toy_world_rebuilds_a_dir_that_holds_the_other_world(tmp_path, monkeypatch, capsys):
    from shared.toy import build as toy_build

    root = tmp_path / "toy"
    for rel in toy_build.REQUIRED:
        (root / rel).parent.mkdir(parents=True, exist_ok=True)
        (root / rel).write_text("x")
    (root / toy_build.BUILD_FILE).write_text(json.dumps({"toy": {"dir": str(root), "seed": 0}}))  # a v1 build
    calls = []
    monkeypatch.setattr(toy_build, "build_toy", lambda cfg, make_grader=None: calls.append(cfg.world))
    toy_build.ensure_toy_world(resolve_config("toy", [f"toy.dir={root}", "toy.world=v1"]))
    assert calls == []  # the world it holds: used as is
    toy_build.ensure_toy_world(resolve_config("toy", [f"toy.dir={root}"]))
    assert calls == ["v2"] and "holds toy world v1" in capsys.readouterr().err
