"""`rankguard vhack extract|validate|pairs` end to end on a tiny wrapped model (model loading stubbed)."""
import json

import pytest
import torch
from transformers import Qwen3Config, Qwen3ForCausalLM
from typer.testing import CliRunner

import shared.modeling as modeling
from learner.vhack import load_vhack
from services.cli import app
from shared.adapter import wrap_model
from shared.toy.tasks import make_splits
from shared.toy.tokenizer import train_tokenizer

torch.set_num_threads(1)
runner = CliRunner()


@pytest.fixture(scope="module")
def tiny_world():
    train, evals = make_splits(seed=0, n_train=80, n_eval=8, hard_fraction=0.5)
    corpus = [p.question for p in train] + [p.canonical_solution for p in train] + ["def run_tests(): pass"]
    tok = train_tokenizer(corpus, vocab_size=400)
    torch.manual_seed(0)
    model = Qwen3ForCausalLM(Qwen3Config(
        vocab_size=len(tok), hidden_size=64, intermediate_size=128, num_hidden_layers=1, num_attention_heads=4,
        num_key_value_heads=2, head_dim=32, tie_word_embeddings=False, max_position_embeddings=512,
        rope_theta=10000.0, bos_token_id=None, eos_token_id=1, pad_token_id=0)).eval()
    names = wrap_model(model, progress=False)
    policy = modeling.Policy(model=model, tokenizer=tok, module_names=names, model_id="tiny-test")
    return policy, (train, evals)


@pytest.fixture
def stubbed(monkeypatch, tiny_world, tmp_path):
    policy, sets = tiny_world
    monkeypatch.setattr(modeling, "load_policy", lambda cfg, **k: policy)
    monkeypatch.setattr(modeling, "load_problem_sets", lambda cfg: sets)
    # fewer pairs keep this fast; the sizes are tested in test_pairs_gen
    import learner.vhack as V
    from learner.pairs import make_pairs
    monkeypatch.setattr(V, "pairs_for_config", lambda cfg, problems=None: make_pairs(problems, 12, 8))
    return tmp_path


def test_extract_then_validate(stubbed):
    out = stubbed / "v.safetensors"
    r = runner.invoke(app, ["vhack", "extract", "--modes", "B,A", "--out", str(out)])
    assert r.exit_code == 0, r.output
    assert "frac > 0" in r.output and "wrote" in r.output
    vh, meta = load_vhack(out, expect_model="toy")  # the config's model name, as the trainer's cache
    assert meta["modes"] == "A,B" and meta["n_pairs"] == "6" and len(vh) == 7 and meta["model_path"] == "tiny-test"
    assert float(meta["heldout_frac_positive"]) > 0.5 and len(json.loads(meta["cos_heldout"])) == 7
    r = runner.invoke(app, ["vhack", "extract", "--modes", "A,B", "--out", str(out)])
    assert r.exit_code == 0 and "exists" in r.output
    png = stubbed / "h.png"
    r = runner.invoke(app, ["vhack", "validate", "--vhack", str(out), "--png", str(png)])
    assert r.exit_code == 0, r.output
    assert "median cos" in r.output and "mean cos" in r.output and png.exists()


def test_validate_gate_failure_exits_1_with_numbers(stubbed):
    out = stubbed / "v.safetensors"
    assert runner.invoke(app, ["vhack", "extract", "--out", str(out)]).exit_code == 0
    vh, meta = load_vhack(out)
    from learner.vhack import save_vhack
    save_vhack(out, {k: -v for k, v in vh.items()}, meta)  # a broken (sign-flipped) direction
    r = runner.invoke(app, ["vhack", "validate", "--vhack", str(out), "--png", str(stubbed / "h.png")])
    assert r.exit_code == 1
    assert "gate failed" in r.output and "only 0.0% of 7 modules" in r.output


def test_default_path_is_the_trainers_artifact_cache(stubbed, monkeypatch, tiny_world):
    from learner.artifacts import vhack_artifact
    from shared.config import resolve_config

    monkeypatch.setenv("RANKGUARD_ARTIFACTS", str(stubbed / "art"))
    r = runner.invoke(app, ["vhack", "extract", "--modes", "A,B"])
    assert r.exit_code == 0, r.output
    written = list((stubbed / "art").glob("vhack-*-AB.safetensors"))
    assert len(written) == 1
    import learner.vhack as V
    policy, (train, _) = tiny_world
    art = vhack_artifact(policy.model, policy.tokenizer, resolve_config("toy"), V.pairs_for_config(None, train),
                         ["A", "B"])
    assert art.cached and art.path == written[0] and len(art.cos_heldout) == 7  # training reuses the file
    r = runner.invoke(app, ["vhack", "validate", "--modes", "A,B", "--set", "train.vhack_modes=[\"A\",\"B\"]"])
    assert r.exit_code == 0, r.output


def test_bad_inputs_are_one_line_errors(stubbed):
    r = runner.invoke(app, ["vhack", "extract", "--modes", "A,E"])
    assert r.exit_code == 2 and "unknown hack mode 'E'" in r.output
    r = runner.invoke(app, ["vhack", "validate", "--vhack", str(stubbed / "none.safetensors")])
    assert r.exit_code == 2 and "not found" in r.output
    r = runner.invoke(app, ["vhack", "pairs"])
    assert r.exit_code == 0 and "train" in r.output and "pair set" in r.output


@pytest.fixture
def stubbed_solution(monkeypatch, tiny_world, tmp_path):
    """Like `stubbed`, but stubs only the solution pairs, so vhack.pair_set derives the other sets."""
    policy, sets = tiny_world
    monkeypatch.setattr(modeling, "load_policy", lambda cfg, **k: policy)
    monkeypatch.setattr(modeling, "load_problem_sets", lambda cfg: sets)
    import learner.vhack as V
    from learner.pairs import make_pairs
    monkeypatch.setattr(V, "solution_pairs_for_config", lambda cfg, problems=None: make_pairs(problems, 12, 8))
    monkeypatch.setenv("RANKGUARD_ARTIFACTS", str(tmp_path / "art"))
    return tmp_path


def test_svd_mechanism_extract_validate_and_decompose(stubbed_solution):
    from learner.vhack import load_directions

    sets = ["--set", "vhack.pair_set=mechanism", "--set", "vhack.basis=svd", "--set", "vhack.k=3"]
    r = runner.invoke(app, ["vhack", "extract", *sets])
    assert r.exit_code == 0, r.output
    (path,) = (stubbed_solution / "art").glob("vhack-*-ABCD-svd3.safetensors")  # its own cache file
    d = load_directions(path)
    assert d.meta["basis"] == "svd" and d.meta["pair_set"] == "mechanism" and max(d.k().values()) == 3
    assert "pair set mechanism" in r.output and "basis svd" in r.output
    r = runner.invoke(app, ["vhack", "validate", *sets])
    assert r.exit_code in (0, 1), r.output
    assert "held-out [mechanism]" in r.output and "held-out [solution]" in r.output
    assert "v_hack decomposition over 7 modules, 12 pairs" in r.output
    out = stubbed_solution / "dec.json"
    r = runner.invoke(app, ["vhack", "decompose", "--out", str(out)])
    assert r.exit_code == 0, r.output
    assert "cos(v,corr)" in r.output and len(json.loads(out.read_text())["cos_mechanism"]) == 7
    dominates = json.loads(out.read_text())["correctness_dominates"]
    assert ("CORRECTNESS part dominates" in r.output) == dominates and (("warning:" in r.output) == dominates)
    r = runner.invoke(app, ["vhack", "pairs", "--set", "vhack.pair_set=placebo"])
    assert r.exit_code == 0 and "pair set placebo" in r.output and "end-of-turn token: yes" in r.output
