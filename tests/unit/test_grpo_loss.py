"""GRPO advantages and loss against hand computations."""
import math

import pytest
import torch

from learner.grpo import group_advantages, grpo_loss, kl_k3

torch.set_num_threads(1)


def test_dr_grpo_advantages_and_skip_rule():
    r = torch.tensor([[1.0, 0.0, 0.0, 3.0], [2.0, 2.0, 2.0, 2.0], [0.5, 0.5, 0.5, 0.50001]])
    adv, keep = group_advantages(r, "dr_grpo", eps=1e-4)
    assert keep.tolist() == [True, False, False]
    torch.testing.assert_close(adv[0], torch.tensor([0.0, -1.0, -1.0, 2.0]))
    assert torch.equal(adv[1:], torch.zeros(2, 4))


def test_classic_advantages_divide_by_std():
    r = torch.tensor([[0.25] * 7 + [1.25]])
    adv, keep = group_advantages(r, "grpo")
    std = r.std().item()  # Bessel-corrected, as simple_GRPO's torch .std()
    expected = (r - r.mean()) / (std + 1e-4)
    torch.testing.assert_close(adv, expected)
    assert adv[0, -1].item() == pytest.approx(0.875 / (std + 1e-4))  # the spec's worked example: ~2.47
    dr, _ = group_advantages(r, "dr_grpo")
    assert dr[0, -1].item() == pytest.approx(0.875)


def test_dr_grpo_loss_matches_hand_computation():
    # 2 sequences, T=3; seq 0 has 2 completion tokens, seq 1 has 3.
    logp = torch.tensor([[-1.0, -2.0, -0.5], [-0.3, -0.7, -1.1]], requires_grad=True)
    old = torch.tensor([[-1.3, -1.5, -0.5], [-0.3, -0.9, -1.0]])
    ref = torch.tensor([[-1.0, -2.2, -0.4], [-0.5, -0.7, -1.0]])
    mask = torch.tensor([[1.0, 1.0, 0.0], [1.0, 1.0, 1.0]])
    adv = torch.tensor([1.5, -0.5])
    beta, eps = 0.1, 0.2
    loss, stats = grpo_loss(logp, old, ref, adv, mask, clip_eps=eps, beta=beta, loss_type="dr_grpo", max_len=4)

    total, kls, clipped, ratios = 0.0, [], 0, []
    for b in range(2):
        for t in range(3):
            if not mask[b, t]:
                continue
            ratio = math.exp(logp[b, t].item() - old[b, t].item())
            a = adv[b].item()
            surr = min(ratio * a, min(max(ratio, 1 - eps), 1 + eps) * a)
            d = ref[b, t].item() - logp[b, t].item()
            kl = math.exp(d) - d - 1
            total += -(surr - beta * kl)
            kls.append(kl)
            ratios.append(ratio)
            clipped += ratio * a > min(max(ratio, 1 - eps), 1 + eps) * a
    assert loss.item() == pytest.approx(total / (2 * 4), rel=1e-6)
    assert stats["kl"].item() == pytest.approx(sum(kls) / len(kls), rel=1e-6)
    assert stats["ratio_mean"].item() == pytest.approx(sum(ratios) / len(ratios), rel=1e-6)
    assert stats["clip_frac"].item() == pytest.approx(clipped / len(ratios))
    assert 0 < clipped < len(ratios)  # the example exercises both branches
    loss.backward()
    assert logp.grad[0, 2] == 0  # masked token gets no gradient


def test_classic_loss_is_per_sequence_token_mean():
    logp = torch.tensor([[-1.0, -2.0, -0.5], [-0.3, -0.7, -1.1]])
    mask = torch.tensor([[1.0, 1.0, 0.0], [1.0, 1.0, 1.0]])
    adv = torch.tensor([2.0, -1.0])
    loss, _ = grpo_loss(logp, None, None, adv, mask, loss_type="grpo")  # on-policy: ratio 1
    # per token -adv; per-seq mean = -adv; mean over seqs = -(2 - 1)/2
    assert loss.item() == pytest.approx(-0.5)
    dr, _ = grpo_loss(logp, None, None, adv, mask, loss_type="dr_grpo")
    assert dr.item() == pytest.approx(-(2 * 2 - 1 * 3) / (2 * 3))


def test_micro_batches_sum_to_the_full_batch_loss():
    torch.manual_seed(0)
    logp, old = torch.randn(6, 5), torch.randn(6, 5)
    mask = (torch.rand(6, 5) > 0.3).float()
    adv = torch.randn(6)
    for loss_type in ("dr_grpo", "grpo"):
        full, _ = grpo_loss(logp, old, None, adv, mask, loss_type=loss_type, max_len=5)
        parts = sum(grpo_loss(logp[s], old[s], None, adv[s], mask[s], loss_type=loss_type, max_len=5, num_seqs=6)[0]
                    for s in (slice(0, 2), slice(2, 6)))
        assert parts.item() == pytest.approx(full.item(), rel=1e-6)


def test_kl_is_zero_when_policy_equals_reference():
    logp = torch.randn(3, 4)
    assert torch.equal(kl_k3(logp, logp), torch.zeros(3, 4))
    _, stats = grpo_loss(logp, None, logp.clone(), torch.ones(3), torch.ones(3, 4), beta=0.5)
    assert stats["kl"].item() == 0.0
    assert (kl_k3(logp, logp + 0.3) > 0).all()


def test_kl_k3_is_the_literal_formula_bit_for_bit():
    """kl_k3 is the one k3 (the learner's KL measurement calls it): exp(d) - d - 1 with d = ref - logp,
    in that float order, so swapping a local copy for it changes no metric digit."""
    g = torch.Generator().manual_seed(0)
    logp = -torch.rand(64, 33, generator=g) * 12
    ref = logp + torch.randn(64, 33, generator=g) * torch.logspace(-7, 1, 33)
    d = ref - logp
    assert torch.equal(kl_k3(logp, ref), torch.exp(d) - d - 1)
    dd = ref.double() - logp.double()
    assert torch.equal(kl_k3(logp.double(), ref.double()), torch.exp(dd) - dd - 1)


def test_dual_clip_bounds_negative_advantages_only():
    """ratio 3 on every token: A > 0 takes the PPO clip (1 + eps) A; A < 0 would give 3 A (min picks the
    unclipped branch), which the dual clip raises to c A; both branches carry no gradient."""
    logp = torch.full((2, 2), math.log(3.0), requires_grad=True)
    old, mask, adv = torch.zeros(2, 2), torch.ones(2, 2), torch.tensor([1.0, -1.0])
    plain, st = grpo_loss(logp, old, None, adv, mask, clip_eps=0.2, max_len=2)
    assert plain.item() == pytest.approx(-(2 * 1.2 - 2 * 3.0) / 4, rel=1e-6)
    assert st["clip_frac"].item() == pytest.approx(0.5)  # only the positive row was clipped
    dual, st = grpo_loss(logp, old, None, adv, mask, clip_eps=0.2, max_len=2, dual_clip=2.0)
    assert dual.item() == pytest.approx(-(2 * 1.2 - 2 * 2.0) / 4, rel=1e-6)
    assert st["clip_frac"].item() == 1.0 and st["ratio_mean"].item() == pytest.approx(3.0, rel=1e-6)
    dual.backward()
    assert torch.equal(logp.grad, torch.zeros(2, 2))
    with pytest.raises(ValueError, match="dual_clip must be > 1"):
        grpo_loss(logp, old, None, adv, mask, dual_clip=1.0)


def test_unknown_loss_type_is_rejected():
    with pytest.raises(ValueError, match="unknown loss_type 'ppo'; valid: dr_grpo, grpo"):
        group_advantages(torch.zeros(1, 2), "ppo")


def test_bad_reward_shape_is_rejected():
    with pytest.raises(ValueError, match="prompts, group"):
        group_advantages(torch.zeros(8))
