"""v_hack variants (issue #15) on a tiny wrapped Qwen3 with toy pairs: subspace basis vs the literal
pseudocode, axis ratio and the *global* noise floor, refresh at the current delta_S, saving with the
step for an exact resume, decomposition of the solution construction, and a cropped adapter rank."""
import copy

import pytest
import torch
from transformers import Qwen3Config, Qwen3ForCausalLM

from learner import vhack as V
from learner.pairs import build_pair_set, decompose_pairs, make_pairs, split_pairs
from learner.projection import Projector, project_grads_reference
from shared.adapter import adapter_modules, wrap_model
from shared.config import VhackConfig
from shared.toy.tasks import make_splits
from shared.toy.tokenizer import train_tokenizer

torch.set_num_threads(1)


def _model(vocab: int, seed: int = 0):
    torch.manual_seed(seed)
    return Qwen3ForCausalLM(Qwen3Config(
        vocab_size=vocab, hidden_size=64, intermediate_size=128, num_hidden_layers=2, num_attention_heads=4,
        num_key_value_heads=2, head_dim=32, tie_word_embeddings=False, max_position_embeddings=512,
        rope_theta=10000.0, bos_token_id=None, eos_token_id=1, pad_token_id=0)).eval()


@pytest.fixture(scope="module")
def world():
    train, _ = make_splits(seed=0, n_train=120, n_eval=8, hard_fraction=0.5)
    pairs = make_pairs(train, n_train=16, n_heldout=8, seed=0)
    corpus = [m.content for p in pairs for m in p.messages] + [p.hack for p in pairs] + [p.clean for p in pairs]
    tok = train_tokenizer(corpus, vocab_size=400)
    base = _model(len(tok))
    model = copy.deepcopy(base)
    names = wrap_model(model, progress=False)
    return dict(base=base, model=model, tok=tok, pairs=pairs, names=names)


SVD3 = VhackConfig(basis="svd", k=3)


@pytest.fixture(scope="module")
def svd3(world):
    return V.extract_directions(world["model"], world["tok"], world["pairs"], SVD3, progress=False)


def test_default_is_the_spec_meandiff(world):
    d = V.extract_directions(world["model"], world["tok"], world["pairs"], progress=False)
    assert d.k() == {n: 1 for n in world["names"]} and d.meta["basis"] == "meandiff"
    legacy = V.extract_vhack(world["model"], world["tok"], world["pairs"], progress=False)
    _, sizes, diff = V.mean_grad_diff(world["model"], world["tok"], split_pairs(world["pairs"], "train"), False)
    for (name, v), dd in zip(legacy.items(), torch.split(diff, sizes)):
        assert torch.equal(d.top()[name], v)
        torch.testing.assert_close(v, dd / dd.norm(), rtol=1e-5, atol=1e-6)
        assert d.sv[name].item() == pytest.approx(dd.norm().item(), rel=1e-5)
    ref = V.extract_directions_reference(world["model"], world["tok"], world["pairs"])
    for name in world["names"]:
        torch.testing.assert_close(d.basis[name], ref.basis[name], rtol=1e-4, atol=1e-5)


def test_svd_basis_matches_the_literal_pseudocode(world, svd3):
    ref = V.extract_directions_reference(world["model"], world["tok"], world["pairs"], SVD3)
    n_train = len(split_pairs(world["pairs"], "train"))
    pg = V.pair_grads(world["model"], world["tok"], split_pairs(world["pairs"], "train"), False, keep_rows=True)
    for name, D in zip(pg.names, pg.module_rows()):
        B = svd3.basis[name]
        assert B.shape == (3, adapter_modules(world["model"])[name].rank)
        torch.testing.assert_close(B, ref.basis[name], rtol=1e-4, atol=1e-5)
        torch.testing.assert_close(svd3.sv[name], ref.sv[name], rtol=1e-4, atol=1e-6)
        torch.testing.assert_close(B @ B.T, torch.eye(3), atol=1e-5, rtol=0)  # orthonormal rows
        assert torch.all(svd3.sv[name][:-1] >= svd3.sv[name][1:])
        votes = ((D @ B.T) > 0).sum(0)
        assert torch.all(votes * 2 >= n_train), (name, votes)  # every axis points hack-ward by majority
        # rank-1 limit: the top axis is close to the mean-difference direction when the mean dominates
    assert all(m.delta_S.grad is None for m in adapter_modules(world["model"]).values())


def test_orientation_majority_vote_not_mean():
    """One huge outlier pair must not flip an axis the other pairs agree on."""
    v = torch.tensor([[1.0, 0.0]])
    D = torch.tensor([[1.0, 0.1], [0.5, 0.0], [0.2, 0.3], [-50.0, 0.0]])
    assert V.orient_hackward(D, v).tolist() == [[1.0, 0.0]]
    assert V.orient_hackward(D, -v).tolist() == [[1.0, 0.0]]
    tie = torch.tensor([[1.0, 0.0], [-3.0, 0.0]])
    assert V.orient_hackward(tie, v).tolist() == [[-1.0, 0.0]]  # tied vote: the summed projection decides


def test_axis_ratio_and_global_floor_match_reference(world, svd3):
    cfg = VhackConfig(basis="svd", k=3, min_axis_ratio=0.3, noise_floor_global=0.4)
    d = V.extract_directions(world["model"], world["tok"], world["pairs"], cfg, progress=False)
    ref = V.extract_directions_reference(world["model"], world["tok"], world["pairs"], cfg)
    assert d.k() == ref.k()
    for name in world["names"]:
        torch.testing.assert_close(d.basis[name], ref.basis[name], rtol=1e-4, atol=1e-5)
    # the floor is one threshold over every module's singular values pooled, not a per-module cut
    pooled = torch.cat([s for s in svd3.sv.values()])
    ratio_kept = {n: s[s / s[0] >= 0.3] for n, s in svd3.sv.items()}
    thresh = torch.quantile(torch.cat(list(ratio_kept.values())), 0.4)
    assert float(d.meta["noise_floor_threshold"]) == pytest.approx(float(thresh), rel=1e-5)
    for n in world["names"]:
        assert d.k()[n] == int((ratio_kept[n] >= thresh).sum())
        assert all(s / d.sv[n][0] >= 0.3 for s in d.sv[n]) if d.k()[n] else True
    ks = set(d.k().values())
    assert len(ks) > 1, f"a global floor should keep different numbers of axes per module, got {ks}"
    assert d.n_axes() < svd3.n_axes() and pooled.numel() == svd3.n_axes()


def test_k_is_capped_by_pairs_and_rank(world):
    few = split_pairs(world["pairs"], "train")[:2]
    d = V.extract_directions(world["model"], world["tok"], few, VhackConfig(basis="svd", k=8), progress=False)
    assert max(d.k().values()) <= 2


def test_refresh_reextracts_at_current_delta_s_without_touching_grads(world):
    model, tok, pairs = copy.deepcopy(world["model"]), world["tok"], world["pairs"]
    old = V.extract_directions(model, tok, pairs, progress=False)
    same, cos0 = V.refresh_directions(old, model, tok, pairs, step=5)
    assert same.step == 5 and same.meta["refreshed_from_step"] == "0"
    assert set(cos0) == set(world["names"]) and min(cos0.values()) > 1 - 1e-5
    mods = adapter_modules(model)
    torch.manual_seed(1)
    sentinel = {}
    for n, m in mods.items():
        with torch.no_grad():
            m.delta_S.copy_(0.3 * m.S * torch.randn_like(m.S))
        m.delta_S.grad = torch.full_like(m.delta_S, 7.0)
        sentinel[n] = m.delta_S.grad.clone()
    new, cos = V.refresh_directions(old, model, tok, pairs, step=10)
    assert all(torch.equal(m.delta_S.grad, sentinel[n]) for n, m in mods.items())  # the learner's grads survive
    assert min(cos.values()) < 0.999 and max(cos.values()) <= 1 + 1e-6
    expect = V.direction_cos(new.top(), old.top())
    assert cos == expect
    fresh = V.extract_directions(model, tok, pairs, progress=False)
    for n in world["names"]:
        torch.testing.assert_close(new.basis[n], fresh.basis[n], rtol=0, atol=0)  # deterministic re-extraction


def test_save_load_with_step_and_store_latest(world, svd3, tmp_path):
    meta = {"model_id": "toy"}
    # a module with no axis left (noise floor) and mixed k round-trip in the 2-D layout
    d = V.Directions({**svd3.basis, world["names"][0]: torch.zeros(0, svd3.basis[world["names"][0]].shape[1])},
                     {**svd3.sv, world["names"][0]: torch.zeros(0)}, step=30, meta=dict(svd3.meta))
    back = V.load_directions(V.save_directions(tmp_path / "d.safetensors", d, meta), expect_model="toy")
    assert back.step == 30 and back.k() == d.k() and back.meta["basis"] == "svd"
    for n in d.basis:
        assert torch.equal(back.basis[n], d.basis[n])
        assert torch.equal(back.sv[n], d.sv[n].float())  # exact: a resume sees the same floor inputs
    # meandiff keeps the spec's 1-D per-module layout, readable by the plain v_hack loader
    md = V.extract_directions(world["model"], world["tok"], world["pairs"], progress=False)
    path = V.save_directions(tmp_path / "m.safetensors", md, meta)
    plain, _ = V.load_vhack(path)
    assert all(plain[n].dim() == 1 and torch.equal(plain[n], md.top()[n]) for n in world["names"])
    store = V.DirectionsStore(tmp_path / "run")
    assert store.latest() is None
    for step in (0, 10, 20):
        store.save(V.Directions(md.basis, md.sv, step, md.meta), meta)
    assert store.steps() == [0, 10, 20]
    assert store.latest(at_most=15).step == 10 and store.latest().step == 20 and store.latest(at_most=9).step == 0
    with pytest.raises(V.VHackError, match="extracted for model 'toy'"):
        store.latest(expect_model="other")


def test_global_floor_refuses_files_without_singular_values(world, tmp_path):
    vh = V.extract_vhack(world["model"], world["tok"], world["pairs"], progress=False)
    path = V.save_vhack(tmp_path / "old.safetensors", vh, {"model_id": "toy"})
    old = V.load_directions(path)
    assert old.k() == {n: 1 for n in vh} and torch.isnan(next(iter(old.sv.values()))).all()
    with pytest.raises(V.VHackError, match="no singular values"):
        V.global_floor(old.basis, old.sv, 0.5)


def test_decomposition_parts_add_up_and_report(world):
    model, tok = world["model"], world["tok"]
    train = split_pairs(world["pairs"], "train")
    parts = decompose_pairs(train)
    full = V.pair_grads(model, tok, train, False).mean_diff
    corr = V.pair_grads(model, tok, parts["correctness"], False).mean_diff
    mech = V.pair_grads(model, tok, parts["mechanism"], False).mean_diff
    torch.testing.assert_close(full, corr + mech, rtol=1e-4, atol=1e-6)  # (h - c) = (h - body) + (body - c)
    report, dirs = V.decompose_vhack(model, tok, world["pairs"], progress=False)
    assert report.names == world["names"] and report.n_pairs == len(train)
    for n, a, b in zip(report.names, report.cos_correctness, report.cos_mechanism):
        assert a == pytest.approx(V.direction_cos(dirs["full"], dirs["correctness"])[n])
        assert b == pytest.approx(V.direction_cos(dirs["full"], dirs["mechanism"])[n])
    assert report.correctness_dominates == (report.median_correctness > report.median_mechanism)
    assert (report.warning() is not None) == (report.correctness_dominates and report.aligned_with_either)
    assert "median cos(v, v_correctness)" in report.summary()


def test_validate_on_a_subspace_and_another_construction(world, svd3):
    model, tok, pairs = world["model"], world["tok"], world["pairs"]
    held = split_pairs(pairs, "heldout")
    rep = V.validate_vhack(model, tok, svd3, held, progress=False, gate=False, construction="solution")
    top = V.validate_vhack(model, tok, svd3.top(), held, progress=False, gate=False)
    assert rep.cos == top.cos  # the gate reads the top axis
    assert all(c >= abs(x) - 1e-6 for c, x in zip(rep.captured, rep.cos)) and "[solution]" in rep.summary()
    mech_held = split_pairs(build_pair_set(pairs, "mechanism"), "heldout")
    other = V.validate_vhack(model, tok, svd3, mech_held, progress=False, gate=False, construction="mechanism")
    assert other.n_pairs == len(mech_held) and other.cos != rep.cos


# ---------------------------------------------------------------- cropped adapter rank

def test_extraction_and_projection_at_a_cropped_rank(world):
    """model.rank < full (W_res added): directions live in the cropped [r] space and project there."""
    model = copy.deepcopy(world["base"])
    wrap_model(model, rank=8, progress=False)
    mods = adapter_modules(model)
    assert all(m.rank == 8 and m.W_res is not None for m in mods.values())
    tok, pairs = world["tok"], world["pairs"]
    d = V.extract_directions(model, tok, pairs, VhackConfig(basis="svd", k=3), progress=False)
    ref = V.extract_directions_reference(model, tok, pairs, VhackConfig(basis="svd", k=3))
    for n in mods:
        assert d.basis[n].shape == (3, 8)
        torch.testing.assert_close(d.basis[n], ref.basis[n], rtol=1e-4, atol=1e-5)
    assert V.validate_vhack(model, tok, d, split_pairs(pairs, "heldout"), progress=False, gate=False).n_pairs == 8
    # a GRPO-like gradient into the cropped delta_S, projected by the model's own projector
    ids, mask = V.encode_pair_side(tok, pairs[0], pairs[0].hack)
    from shared.logprobs import token_logprobs

    (-(token_logprobs(model, ids, torch.ones_like(ids)) * mask).sum()).backward()
    grads = {n: m.delta_S.grad.clone() for n, m in mods.items()}
    proj = Projector.for_model(model, d.basis)
    stats = proj.project_model_(model)
    assert stats["n_modules"] == len(mods) and stats["frac_fired"] > 0
    shadow = [torch.nn.Parameter(torch.zeros(8)) for _ in mods]
    for p, g in zip(shadow, grads.values()):
        p.grad = g.clone()
    project_grads_reference(list(mods), shadow, d.basis)
    for p, m in zip(shadow, mods.values()):
        torch.testing.assert_close(m.delta_S.grad, p.grad, rtol=1e-5, atol=1e-7)
    full = V.extract_directions(world["model"], tok, pairs, progress=False)
    with pytest.raises(Exception, match="v_hack has 64 values|has 8 values"):
        Projector.for_model(model, full.basis).project_model_(model)


def test_decomposition_warns_only_when_a_part_is_aligned():
    from learner.vhack import PART_FLOOR, DecompositionReport

    def rep(c, m):
        return DecompositionReport(names=["a", "b", "c"], cos_correctness=[c] * 3, cos_mechanism=[m] * 3,
                                   cos_parts=[-0.8] * 3, n_pairs=4, modes=["A"])

    assert rep(0.95, -0.54).warning() is not None and "CORRECTNESS" in rep(0.95, -0.54).summary()
    assert rep(-0.83, 1.0).warning() is None and "mechanism part dominates" in rep(-0.83, 1.0).summary()
    placebo = rep(0.001, -0.012)  # the toy placebo set: about neither part
    assert placebo.correctness_dominates and not placebo.aligned_with_either
    assert placebo.warning() is None and f"< {PART_FLOOR:.1f}" in placebo.summary()
