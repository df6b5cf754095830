"""v_hack extraction (spec B) on a tiny wrapped Qwen3 with toy pairs; artifact; held-out gate."""
import pytest
import torch
from transformers import Qwen3Config, Qwen3ForCausalLM

from analysis.vhack_plots import plot_validation
from learner import vhack as V
from learner.pairs import make_pairs, pair_set_hash, split_pairs
from shared.adapter import adapter_modules, wrap_model
from shared.toy.tasks import make_splits
from shared.toy.tokenizer import train_tokenizer

torch.set_num_threads(1)


@pytest.fixture(scope="module")
def world():
    """Toy pairs, a BPE trained on their text, a random tiny Qwen3 wrapped with AntiPaSTO, v_hack."""
    train, _ = make_splits(seed=0, n_train=120, n_eval=8, hard_fraction=0.5)
    pairs = make_pairs(train, n_train=24, n_heldout=8, seed=0)  # sizes are tested in test_pairs_gen
    corpus = [m.content for p in pairs for m in p.messages] + [p.hack for p in pairs] + [p.clean for p in pairs]
    tok = train_tokenizer(corpus, vocab_size=400)
    torch.manual_seed(0)
    model = Qwen3ForCausalLM(Qwen3Config(
        vocab_size=len(tok), hidden_size=64, intermediate_size=128, num_hidden_layers=2, num_attention_heads=4,
        num_key_value_heads=2, head_dim=32, tie_word_embeddings=False, max_position_embeddings=512,
        rope_theta=10000.0, bos_token_id=None, eos_token_id=1, pad_token_id=0)).eval()
    names = wrap_model(model, progress=False)
    vh = V.extract_vhack(model, tok, pairs, progress=False)
    return dict(model=model, tok=tok, pairs=pairs, names=names, vh=vh)


def test_one_unit_direction_per_module(world):
    vh, mods = world["vh"], adapter_modules(world["model"])
    assert list(vh) == world["names"] == list(mods)
    for name, m in mods.items():
        assert vh[name].shape == (m.rank,)
        assert vh[name].norm().item() == pytest.approx(1.0, abs=1e-5)
    assert all(m.delta_S.grad is None for m in mods.values())  # extraction leaves no stale grads


def test_matches_spec_pseudocode_for_one_module(world):
    """unit(mean_hack - mean_clean) computed by hand for the first module on 2 pairs."""
    model, tok = world["model"], world["tok"]
    pairs = split_pairs(world["pairs"], "train", ["A"])[:2]
    name = world["names"][0]
    p = adapter_modules(model)[name].delta_S
    diff = torch.zeros_like(p)
    for pair in pairs:
        for sign, text in ((1, pair.hack), (-1, pair.clean)):
            ids, mask = V.encode_pair_side(tok, pair, text)
            logits = model(ids).logits[:, :-1]
            nll = torch.nn.functional.cross_entropy(logits[0], ids[0, 1:], reduction="none")
            loss = (nll * mask[0]).sum() / mask.sum()
            (g,) = torch.autograd.grad(loss, p)
            diff += sign * g / len(pairs)
    got = V.extract_vhack(model, tok, pairs, modes=("A",), progress=False)[name]
    torch.testing.assert_close(got, diff / diff.norm(), rtol=1e-4, atol=1e-5)


def test_heldout_gate_passes_and_flipped_direction_fails_loudly(world, tmp_path):
    model, tok, vh = world["model"], world["tok"], world["vh"]
    held = split_pairs(world["pairs"], "heldout")
    report = V.validate_vhack(model, tok, vh, held, progress=False)
    assert report.passed and report.frac_positive > 0.5 and report.mean > 0.2
    assert len(report.cos) == len(world["names"]) and report.n_pairs == 8
    png = plot_validation(report, tmp_path / "hist.png")
    assert png.read_bytes()[:4] == b"\x89PNG"
    flipped = {k: -v for k, v in vh.items()}
    with pytest.raises(V.VHackGateError, match=r"only 0\.0% of \d+ modules .*median -"):
        V.validate_vhack(model, tok, flipped, held, progress=False)


def test_weak_detector_uses_only_its_modes(world):
    model, tok = world["model"], world["tok"]
    weak = V.extract_vhack(model, tok, world["pairs"], modes=("A", "B"), progress=False)
    assert any(not torch.allclose(weak[n], world["vh"][n]) for n in world["names"])
    with pytest.raises(V.VHackError, match="no train pairs with modes C"):
        V.extract_vhack(model, tok, split_pairs(world["pairs"], "train", ["A"]), modes=("C",), progress=False)


def test_artifact_round_trip_and_model_check(world, tmp_path):
    vh, pairs = world["vh"], world["pairs"]
    meta = V.vhack_meta("toy-model", "torch.float32", ["A", "B", "C", "D"], pairs)
    assert meta["n_pairs"] == "24" and meta["modes"] == "A,B,C,D" and meta["dtype"] == "float32"
    path = V.save_vhack(tmp_path / "v.safetensors", vh, meta)
    loaded, meta2 = V.load_vhack(path, expect_model="toy-model")
    assert meta2 == meta and meta2["pair_set_hash"] == pair_set_hash(pairs)
    for k in vh:
        assert torch.equal(loaded[k], vh[k])
    with pytest.raises(V.VHackError, match="extracted for model 'toy-model', not 'Qwen/Qwen3-4B'"):
        V.load_vhack(path, expect_model="Qwen/Qwen3-4B")
    with pytest.raises(V.VHackError, match="not found"):
        V.load_vhack(tmp_path / "missing.safetensors")
