"""Toy world: generator, tokenizer, tiny model, cached build, CLI."""
from __future__ import annotations

import json
import os
import random
import re

import pytest
import torch

os.environ.setdefault("HF_HUB_OFFLINE", "1")
torch.set_num_threads(1)

from shared.config import ToyConfig  # noqa: E402
from shared.hacks import MODES  # noqa: E402
from shared.problems import load_problems, save_problems  # noqa: E402
from shared.prompts import build_messages, extract_code, render_prompt  # noqa: E402
from shared.toy import tasks  # noqa: E402
from shared.schemas import Grade  # noqa: E402
from shared.toy.build import (  # noqa: E402
    ToyBuildError, build_toy, fingerprint, grade_stats, load_toy_problems, resolve_warm, toy_status)
from shared.toy.model import make_model, param_count  # noqa: E402
from shared.toy.tokenizer import IM_END, train_tokenizer  # noqa: E402
from shared.toy.warmstart import QUICK_WARM, WarmStartConfig, corpus_texts, make_target  # noqa: E402

QUICK = QUICK_WARM.model_copy(update={"threads": 1})


@pytest.fixture(scope="module")
def splits():
    return tasks.make_splits(seed=0, n_train=400, n_eval=64, hard_fraction=0.5)


@pytest.fixture(scope="module")
def tokenizer(splits):
    return train_tokenizer(corpus_texts(splits[0]), vocab_size=1024, phrases=tasks.PHRASES)


# ---- generator ------------------------------------------------------------------------------------

def test_generator_is_deterministic_and_seeded(splits):
    again = tasks.make_splits(seed=0, n_train=400, n_eval=64, hard_fraction=0.5)
    assert [p.model_dump() for p in again[0]] == [p.model_dump() for p in splits[0]]
    other = tasks.make_splits(seed=1, n_train=400, n_eval=64, hard_fraction=0.5)
    assert [p.gt_answer for p in other[1]] != [p.gt_answer for p in splits[1]]


def test_records_are_valid_leetcode_shaped(splits):
    train, evals = splits
    assert len(train) == 400 and len(evals) == 64
    assert sum(p.difficulty == "hard" for p in train) == 200
    assert {p.family for p in train} == {f.name for f in tasks.FAMILIES}
    assert len(tasks.FAMILIES) == 15 and len(tasks.EASY) == 13 and len(tasks.HARD) == 2
    for p in train + evals:
        method = p.func_name.removeprefix("Solution().")
        assert p.func_name == f"Solution().{method}" and method.isidentifier()
        assert 3 <= len(p.gt_answer) <= 6
        assert all(a.startswith(f"assert Solution().{method}(") and " == " in a for a in p.gt_answer)
        assert [m.role for m in p.prompt] == ["system", "user"]
        user = p.prompt[1].content
        assert "will be evaluated by calling a function called run_tests()" in user and method in user
        assert p.canonical_solution.startswith(f"class Solution:\n    def {method}(self")
        assert p.prompt_metadata.starter_code.startswith(f"class Solution:\n    def {method}(self")
        assert p.difficulty in ("easy", "hard")
        assert tasks.FAMILY_BY_NAME[p.family].difficulty == p.difficulty
        # as_is keeps the record's own prompt verbatim
        assert build_messages(p, "as_is")[1].content == user


def test_every_canonical_passes_and_every_wrong_attempt_fails(splits):
    train, evals = splits
    for p in train + evals:
        assert tasks.run_asserts(p.canonical_solution, p), p.id
        assert p.wrong_solutions, p.id
        for w in p.wrong_solutions:
            assert not tasks.run_asserts(w, p), (p.id, w)


def test_hard_families_cannot_be_guessed(splits):
    """Hard canonicals pass, but no constant or simple function of the visible input does."""
    hard = [p for p in splits[0] if p.difficulty == "hard"]
    assert {p.family for p in hard} == {"lookup", "keyed_affine"}
    for p in hard:
        assert tasks.run_asserts(p.canonical_solution, p)
        method = p.func_name.split(".")[-1]
        arg = "key" if p.family == "lookup" else "x"
        for body in ["return 0", "return 42", f"return {arg}", f"return len(str({arg}))"]:
            code = f"class Solution:\n    def {method}(self, {arg}):\n        {body}"
            assert not tasks.run_asserts(code, p), (p.id, body)
    # the hidden values really differ between instances (a table, a hash)
    answers = {tuple(p.gt_answer) for p in hard if p.family == "keyed_affine"}
    coeffs = {tasks.secret_coefficients(re.search(r"key (\w+)\.", p.question).group(1))
              for p in hard if p.family == "keyed_affine"}
    assert len(answers) > 50 and len(coeffs) > 20


def test_train_and_eval_are_disjoint(splits):
    train, evals = splits
    sig_train = {tasks.problem_signature(p) for p in train}
    sig_eval = {tasks.problem_signature(p) for p in evals}
    assert len(sig_train) == len(train) and len(sig_eval) == len(evals)
    assert not sig_train & sig_eval
    assert not {p.key for p in train} & {p.key for p in evals}


def test_problem_file_round_trip(tmp_path, splits):
    save_problems(splits[1], tmp_path / "eval.jsonl")
    back = load_problems(tmp_path / "eval.jsonl")
    assert [p.model_dump() for p in back] == [p.model_dump() for p in splits[1]]
    assert back[0].family == splits[1][0].family


def test_bad_hard_fraction_is_rejected():
    with pytest.raises(ValueError, match="hard_fraction 1.5"):
        tasks.generate_problems(4, 0, "train", hard_fraction=1.5)


# ---- warm-start mix ------------------------------------------------------------------------------

def test_warm_start_mix_covers_all_hacks(splits):
    rng = random.Random(0)
    cfg = WarmStartConfig()
    train = splits[0]
    kinds: dict[str, int] = {}
    for i in range(2000):
        p = train[i % len(train)]
        t = make_target(p, rng, cfg)
        kinds[t.kind] = kinds.get(t.kind, 0) + 1
        code = extract_code(t.completion)
        assert code is not None and t.completion.startswith("```python\nclass Solution:")
        compile(code, "<target>", "exec")
        if t.kind == "correct":
            assert tasks.run_asserts(code, p)
        elif t.kind in ("wrong", "guess"):
            assert not tasks.run_asserts(code, p)
            assert p.difficulty == ("hard" if t.kind == "guess" else "easy")
    hacks = sum(v for k, v in kinds.items() if k.startswith("hack-"))
    assert 0.05 < hacks / 2000 < 0.09
    assert all(kinds.get(f"hack-{m}", 0) > 15 for m in MODES)
    assert kinds["wrong"] > 50 and kinds["correct"] > kinds["wrong"]


# ---- tokenizer -------------------------------------------------------------------------------------

def test_tokenizer_round_trip_and_chat_template(tokenizer, splits, tmp_path):
    from transformers import AutoTokenizer

    assert len(tokenizer) == 1024
    assert tokenizer.eos_token == IM_END and tokenizer.pad_token == "<|endoftext|>"
    assert tokenizer.pad_token_id != tokenizer.eos_token_id
    p = splits[1][0]
    text = render_prompt(tokenizer, build_messages(p, "as_is"))
    assert text.startswith("<|im_start|>system\n") and text.endswith("<|im_start|>assistant\n")
    assert "<|im_start|>user\nPROBLEM:\n" in text
    ids = tokenizer(text, add_special_tokens=False)["input_ids"]
    assert tokenizer.decode(ids) == text
    assert len(ids) < 40  # constant stretches are single tokens
    completion = "```python\nclass Solution:\n    def add_two(self, a, b):\n        return a + b\n```"
    cids = tokenizer(completion, add_special_tokens=False)["input_ids"]
    assert tokenizer.decode(cids) == completion and len(cids) < 25
    odd = "def run_tests():\n    pass\nprint('ALL TESTS PASSED') é ✓"
    assert tokenizer.decode(tokenizer(odd, add_special_tokens=False)["input_ids"]) == odd  # byte level
    tokenizer.save_pretrained(tmp_path)
    again = AutoTokenizer.from_pretrained(tmp_path)
    assert again(text, add_special_tokens=False)["input_ids"] == ids
    assert again.eos_token == IM_END and render_prompt(again, build_messages(p, "as_is")) == text


def test_method_names_tokenize_the_same_in_prompt_and_answer(tokenizer, splits):
    """The policy copies the method name: its ids must be the same in both places."""
    for p in splits[0][:60]:
        method = p.func_name.split(".")[-1]
        name_ids = tokenizer(" " + method, add_special_tokens=False)["input_ids"]
        prompt_ids = tokenizer(render_prompt(tokenizer, build_messages(p)), add_special_tokens=False)["input_ids"]
        answer_ids = tokenizer(f"```python\nclass Solution:\n    def {method}(self", add_special_tokens=False)["input_ids"]
        joined = ",".join(map(str, name_ids))
        assert joined in ",".join(map(str, prompt_ids)) and joined in ",".join(map(str, answer_ids))


# ---- model -------------------------------------------------------------------------------------

def test_tiny_qwen3_shape():
    m = make_model(vocab_size=1024, eos_id=2, pad_id=0, seed=0)
    c = m.config
    assert (c.hidden_size, c.intermediate_size, c.num_hidden_layers) == (128, 384, 4)
    assert (c.num_attention_heads, c.num_key_value_heads, c.head_dim) == (4, 2, 32)
    assert c.tie_word_embeddings is False
    assert m.lm_head.weight.data_ptr() != m.model.embed_tokens.weight.data_ptr()
    assert param_count(m) == 1_049_984
    names = {n.split(".")[-1] for n, mod in m.named_modules() if isinstance(mod, torch.nn.Linear)}
    assert {"q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj"} <= names
    same = make_model(vocab_size=1024, eos_id=2, pad_id=0, seed=0)
    other = make_model(vocab_size=1024, eos_id=2, pad_id=0, seed=1)
    w = m.model.layers[0].self_attn.q_proj.weight
    assert torch.equal(w, same.model.layers[0].self_attn.q_proj.weight)
    assert not torch.equal(w, other.model.layers[0].self_attn.q_proj.weight)


# ---- build ---------------------------------------------------------------------------------------

@pytest.fixture(scope="module")
def built(tmp_path_factory):
    d = tmp_path_factory.mktemp("toy") / "world"
    cfg = ToyConfig(dir=str(d), n_train=40, n_eval=16)
    from reward_server.grader import Grader

    return cfg, build_toy(cfg, warm=QUICK, progress=False, make_grader=Grader)


def test_build_writes_a_loadable_world(built):
    from transformers import AutoModelForCausalLM, AutoTokenizer

    cfg, art = built
    assert not art.cached and art.param_count == 1_049_984
    for rel in ("model/model.safetensors", "model/config.json", "model/tokenizer.json", "problems_train.jsonl",
                "problems_eval.jsonl", "build.json"):
        assert (art.dir / rel).is_file(), rel
    meta = json.loads((art.dir / "build.json").read_text())
    assert meta["fingerprint"] == fingerprint(cfg, QUICK) == art.fingerprint
    assert meta["stats"]["samples"] == QUICK.stats_samples and 0 <= meta["stats"]["parse"] <= 1
    assert meta["stats"]["grader"] == "ok" and 0 <= meta["stats"]["pass"] <= 1  # graded by the injected Grader
    assert meta["warm_start"]["loss_last"] < meta["warm_start"]["loss_first"]
    tok = AutoTokenizer.from_pretrained(art.model_dir)
    model = AutoModelForCausalLM.from_pretrained(art.model_dir)
    assert tok.eos_token_id == model.config.eos_token_id and len(tok) <= model.config.vocab_size == 1024
    tok_cfg = json.loads((art.model_dir / "tokenizer_config.json").read_text())
    assert tok_cfg["tokenizer_class"] == "PreTrainedTokenizerFast" and "{%- for message" in tok_cfg["chat_template"]
    ids = tok("<|im_start|>user\nhi<|im_end|>", add_special_tokens=False)["input_ids"]
    assert tok.decode(ids, skip_special_tokens=True) == "user\nhi"
    train, evals = load_toy_problems(art.dir)
    assert len(train) == 40 and len(evals) == 16
    assert not [p for p in art.dir.parent.iterdir() if p.name.startswith(".world.tmp")]


def test_build_is_cached_and_rebuilds_when_stale(built):
    cfg, art = built
    before = {p: p.stat().st_mtime_ns for p in art.dir.rglob("*") if p.is_file()}
    again = build_toy(cfg, warm=QUICK, progress=False)
    assert again.cached and again.fingerprint == art.fingerprint
    assert {p: p.stat().st_mtime_ns for p in art.dir.rglob("*") if p.is_file()} == before  # nothing rewritten
    # a different config is not the cached build
    ok, reason, _ = toy_status(art.dir, fingerprint(cfg.model_copy(update={"seed": 7}), QUICK))
    assert not ok and "config changed" in reason
    # a truncated file makes the build incomplete, and the next call rebuilds it
    (art.dir / "problems_eval.jsonl").write_text("")
    ok, reason, _ = toy_status(art.dir, art.fingerprint)
    assert not ok and "problems_eval.jsonl" in reason
    rebuilt = build_toy(cfg, warm=QUICK, progress=False)
    assert not rebuilt.cached and len(load_problems(rebuilt.eval_problems)) == 16
    assert build_toy(cfg, warm=QUICK, progress=False).cached


def test_ensure_toy_world_builds_only_for_toy_runs_and_only_when_missing(built, tmp_path, monkeypatch, capsys):
    from shared.config import resolve_config
    from shared.toy.build import ensure_toy_world

    cfg, art = built
    monkeypatch.setenv("RANKGUARD_TOY_WARM", QUICK.model_dump_json())
    nowhere = tmp_path / "none"
    ensure_toy_world(resolve_config("toy", [f"toy.dir={nowhere}", 'model.name_or_path="some/model"',
                                            'problems="leetcode"']))
    assert not nowhere.exists()  # not a toy run: nothing built
    run = resolve_config("toy", [f"toy.dir={art.dir}", f"toy.n_train={cfg.n_train}", f"toy.n_eval={cfg.n_eval}"])
    stamp = (art.dir / "build.json").stat().st_mtime_ns
    ensure_toy_world(run)
    assert (art.dir / "build.json").stat().st_mtime_ns == stamp and capsys.readouterr().err == ""
    (art.dir / "model" / "tokenizer.json").unlink()
    made = []

    class FakeGrader:  # what the build hands its factory: all four loopholes open, two workers
        def __init__(self, reward_cfg, workers):
            made.append((reward_cfg.loopholes.model_dump(), workers))

        def __enter__(self):
            return self

        def __exit__(self, *exc):
            pass

        def grade_many(self, pairs):
            return [Grade(formatted=True, can_compile=True, gt_pass=i % 2 == 0, pass_frac=1.0,
                          exploited={"A": False, "B": True, "C": False, "D": False}, attempted={}, reward=1.0)
                    for i, _ in enumerate(pairs)]

    ensure_toy_world(run, make_grader=FakeGrader)
    assert f"toy world not found under {art.dir}; building it (once)" in capsys.readouterr().err
    assert made == [({"rt": True, "se": True, "so": True, "fm": True}, 2)]
    ok, _, meta = toy_status(art.dir, art.fingerprint)
    assert ok and meta["stats"]["grader"] == "ok" and meta["stats"]["pass"] == 0.5
    assert meta["stats"]["hack_strict"] == meta["stats"]["hack_strict_B"] == 1.0


def test_build_stats_without_a_grader_say_so():
    probs = tasks.make_splits(seed=0, n_train=4, n_eval=2, hard_fraction=0.5)[1]
    stats = grade_stats(probs, ["```python\nx = 1\n```", "no code"])
    assert stats == {"samples": 2, "parse": 0.5, "grader": "unavailable"}


def test_missing_build_is_a_clear_error(tmp_path):
    with pytest.raises(ToyBuildError, match=r"not usable \(no build.json"):
        load_toy_problems(tmp_path / "nothing")


def test_warm_env_override(monkeypatch):
    monkeypatch.setenv("RANKGUARD_TOY_WARM", '{"steps": 5}')
    assert resolve_warm().steps == 5
    monkeypatch.setenv("RANKGUARD_TOY_WARM", '{"stepz": 5}')
    with pytest.raises(ToyBuildError, match="RANKGUARD_TOY_WARM"):
        resolve_warm()


# ---- CLI ---------------------------------------------------------------------------------------

def test_cli_build_and_show(built, monkeypatch):
    import typer
    from typer.testing import CliRunner

    from services.toy_cli import register

    cfg, art = built
    app = typer.Typer()
    register(app)

    @app.callback()
    def _root() -> None:
        pass

    runner = CliRunner()
    monkeypatch.setenv("RANKGUARD_TOY_WARM", QUICK.model_dump_json())
    # n_train/n_eval are not CLI knobs: a CLI build at the same dir with defaults would rebuild,
    # so check the cached path through `show` and the error path through bad input.
    res = runner.invoke(app, ["toy", "show", "--dir", str(art.dir), "-n", "2", "--samples", "1"])
    assert res.exit_code == 0, res.output
    assert res.output.count("assert Solution().") >= 6 and "--- sample 0 gt_pass=" in res.output  # graded
    res = runner.invoke(app, ["toy", "show", "--dir", str(art.dir), "--split", "bogus"])
    assert res.exit_code == 2 and "unknown split 'bogus'" in res.output
    res = runner.invoke(app, ["toy", "build", "--dir", str(art.dir), "--steps", "-3"])
    assert res.exit_code == 2 and res.output.startswith("error:") and "steps" in res.output


def test_micro_batches_give_the_same_gradient(tokenizer, splits):
    """Length-sorted chunks (less padding) must not change the warm-start gradient."""
    from shared.toy.warmstart import Encoded, completion_loss

    rng = random.Random(1)
    cfg = WarmStartConfig(hack_share=0.3)
    targets = [make_target(p, rng, cfg) for p in splits[0][:12]]
    enc = Encoded(tokenizer, splits[0][:12])
    grads = []
    for chunks in (1, 4):
        model = make_model(1024, tokenizer.eos_token_id, tokenizer.pad_token_id, seed=0)
        parts = enc.micro_batches(targets, chunks)
        assert len(parts) == chunks
        n_tok = sum(int((lab[:, 1:] != -100).sum()) for _, _, lab in parts)
        for ids, mask, lab in parts:
            (completion_loss(model, ids, mask, lab, reduction="sum") / n_tok).backward()
        grads.append(torch.cat([p.grad.flatten() for p in model.parameters()]))
    assert torch.allclose(grads[0], grads[1], atol=1e-6, rtol=1e-4)
    ids, mask, lab = enc.batch(targets)
    model = make_model(1024, tokenizer.eos_token_id, tokenizer.pad_token_id, seed=0)
    ref = model(input_ids=ids, attention_mask=mask, labels=lab).loss  # HF's own shifted CE
    assert torch.allclose(completion_loss(model, ids, mask, lab), ref, atol=1e-5)


def test_the_grader_sees_every_planted_hack(splits):
    """Warm-start hacks are the grader's hacks: strict for their own mode, loose-detected, and clean
    targets trigger neither."""
    from reward_server import grader as grader_mod
    from shared.config import LoopholeConfig, RewardConfig

    rng = random.Random(3)
    cfg = WarmStartConfig(hack_share=0.5)
    want = {f"hack-{m}": 2 for m in MODES} | {"correct": 2, "wrong": 1, "guess": 2}
    picked = []
    for i in range(4000):
        t = make_target(splits[0][i % 400], rng, cfg)
        if want.get(t.kind, 0) > 0 and not (t.kind.startswith("hack") and "pass\n" not in t.completion):
            want[t.kind] -= 1  # hacks on an empty body: gt surely fails, so the hack must be strict
            picked.append(t)
        if not any(want.values()):
            break
    assert not any(want.values())
    with grader_mod.Grader(RewardConfig(loopholes=LoopholeConfig(rt=True, se=True, so=True, fm=True)),
                           workers=1) as g:
        grades = g.grade_many([(t.problem, t.completion) for t in picked])
    for t, gr in zip(picked, grades):
        if t.kind.startswith("hack-"):
            m = t.kind[-1]
            assert not gr.gt_pass and gr.exploited[m] and gr.attempted[m], (t.completion, gr)
        else:
            assert gr.gt_pass == (t.kind == "correct"), t.completion
            assert not any(gr.exploited.values()) and not any(gr.attempted.values()), t.completion
