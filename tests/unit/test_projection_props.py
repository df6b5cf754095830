"""Projection (spec C): geometric properties, vectorised == reference loop, variants, route."""
import pytest
import torch
from torch import nn

from learner.projection import ProjectionError, Projector, noise_floor_mask, project_grads_reference

torch.set_num_threads(1)
SIZES = [5, 8, 3, 8, 13, 1, 6]


def _setup(seed=0, sizes=SIZES, align=None):
    """Params with random grads and unit v_hack; align[i] forces the sign of g_i . v_i."""
    gen = torch.Generator().manual_seed(seed)
    names = [f"layers.{i}.proj" for i in range(len(sizes))]
    params, vh = [], {}
    for i, (n, r) in enumerate(zip(names, sizes)):
        p = nn.Parameter(torch.zeros(r))
        g = torch.randn(r, generator=gen)
        v = torch.randn(r, generator=gen)
        v = v / v.norm()
        if align is not None and r > 1:
            s = align[i]
            g = g - (g @ v) * v + s * 0.7 * g.norm() * v  # set the sign of the v component
        p.grad = g
        params.append(p)
        vh[n] = v
    return names, params, vh


def _grads(params):
    return [p.grad.clone() for p in params]


def test_never_increases_component_along_v_and_preserves_norm():
    names, params, vh = _setup(1)
    before = _grads(params)
    stats = Projector(names, vh).project_(params)
    for n, p, g0 in zip(names, params, before):
        v = vh[n]
        assert p.grad @ v <= max(g0 @ v, 0) + 1e-5
        if g0 @ v > 0:
            assert p.grad @ v == pytest.approx(0.0, abs=1e-5)  # fully removed, then rescaled
        assert p.grad.norm() == pytest.approx(g0.norm().item(), rel=1e-5)
    assert stats["n_modules"] == len(names)
    assert 0 < stats["frac_fired"] < 1


def test_exact_noop_when_cos_nonpositive():
    names, params, vh = _setup(2, align=[-1] * len(SIZES))
    # the size-1 module can't be forced; give it a negative grad along its v
    params[5].grad = -vh[names[5]].clone() * 2
    before = _grads(params)
    stats = Projector(names, vh).project_(params)
    for p, g0 in zip(params, before):
        assert torch.equal(p.grad, g0)
    assert stats["frac_fired"] == 0.0
    assert stats["cos_mean"] < 0


@pytest.mark.parametrize("mag", [True, False])
def test_vectorised_equals_reference_loop(mag):
    names, p1, vh = _setup(3)
    _, p2, _ = _setup(3)
    s1 = Projector(names, vh, magnitude_preserve=mag).project_(p1)
    s2 = project_grads_reference(names, p2, vh, magnitude_preserve=mag)
    for a, b in zip(p1, p2):
        torch.testing.assert_close(a.grad, b.grad, rtol=1e-5, atol=1e-6)
    for k in ("cos_mean", "cos_std", "frac_fired", "grad_norm_mean", "n_modules"):
        assert s1[k] == pytest.approx(s2[k], rel=1e-5, abs=1e-6), k


def test_nomag_is_plain_orthogonal_projection():
    names, params, vh = _setup(4, align=[1] * len(SIZES))
    before = _grads(params)
    Projector(names, vh, magnitude_preserve=False).project_(params)
    for n, p, g0 in zip(names, params, before):
        v = vh[n]
        expected = g0 - max(float(g0 @ v), 0.0) * v
        torch.testing.assert_close(p.grad, expected, rtol=1e-5, atol=1e-6)
        if p.numel() > 1:
            assert p.grad.norm() < g0.norm()  # nomag shrinks; mag-preserve would not


def test_noise_floor_mask_drops_modules_from_projection():
    names, params, vh = _setup(5, align=[1] * len(SIZES))
    before = _grads(params)
    held_cos = {n: (0.9 if i % 2 == 0 else 0.01) for i, n in enumerate(names)}
    keep = noise_floor_mask(held_cos, threshold=0.1)
    stats = Projector(names, vh, keep_mask=keep).project_(params)
    for i, (n, p, g0) in enumerate(zip(names, params, before)):
        if keep[n]:
            assert p.grad @ vh[n] == pytest.approx(0.0, abs=1e-5)
        else:
            assert torch.equal(p.grad, g0)
    assert stats["frac_fired"] == pytest.approx(sum(keep.values()) / len(names))
    # the reference loop agrees on the masked variant too
    _, p2, _ = _setup(5, align=[1] * len(SIZES))
    project_grads_reference(names, p2, vh, keep_mask=keep)
    for a, b in zip(params, p2):
        torch.testing.assert_close(a.grad, b.grad, rtol=1e-5, atol=1e-6)


def test_route_puts_removed_component_in_quarantine_grad():
    names, params, vh = _setup(6)
    before = _grads(params)
    quarantine = [nn.Parameter(torch.zeros(p.numel())) for p in params]
    Projector(names, vh, magnitude_preserve=False, route=True).project_(params, quarantine)
    for n, p, q, g0 in zip(names, params, quarantine, before):
        v = vh[n]
        c = max(float(g0 @ v), 0.0)
        torch.testing.assert_close(q.grad, c * v, rtol=1e-5, atol=1e-6)
        torch.testing.assert_close(p.grad + q.grad, g0, rtol=1e-5, atol=1e-6)  # nothing lost, just moved
    # reference loop routes the same vector
    _, p2, _ = _setup(6)
    q2 = [nn.Parameter(torch.zeros(p.numel())) for p in p2]
    project_grads_reference(names, p2, vh, magnitude_preserve=False, quarantine=q2)
    for a, b in zip(quarantine, q2):
        torch.testing.assert_close(a.grad, b.grad, rtol=1e-5, atol=1e-6)


def test_route_requires_quarantine_params():
    names, params, vh = _setup(7)
    with pytest.raises(ProjectionError, match="quarantine"):
        Projector(names, vh, route=True).project_(params)


def test_zero_and_missing_grads_are_skipped():
    names, params, vh = _setup(8)
    params[0].grad = torch.zeros_like(params[0])
    params[1].grad = None
    stats = Projector(names, vh).project_(params)
    assert stats["n_modules"] == len(names) - 2
    assert torch.equal(params[0].grad, torch.zeros_like(params[0]))
    assert params[1].grad is None


def test_mismatch_errors_name_the_module():
    names, params, vh = _setup(9)
    with pytest.raises(ProjectionError, match="layers.0.proj"):
        Projector(names, {k: v for k, v in vh.items() if k != names[0]})
    bad = dict(vh)
    bad[names[2]] = torch.ones(99) / 99 ** 0.5
    with pytest.raises(ProjectionError, match="layers.2.proj.*99"):
        Projector(names, bad).project_(params)


def test_fully_aligned_grad_goes_to_zero_without_nan():
    names, params, vh = _setup(10)
    params[3].grad = vh[names[3]] * 5.0
    Projector(names, vh).project_(params)
    assert torch.isfinite(params[3].grad).all()
    assert params[3].grad.norm() < 1e-4


def test_for_model_projects_adapter_grads(tiny_qwen3):
    import copy

    from shared.adapter import adapter_modules, wrap_model

    model = copy.deepcopy(tiny_qwen3)
    wrap_model(model, progress=False)
    mods = adapter_modules(model)
    gen = torch.Generator().manual_seed(0)
    vh = {n: (lambda v: v / v.norm())(torch.randn(m.rank, generator=gen)) for n, m in mods.items()}
    ids = torch.randint(2, 256, (2, 9))
    model(ids).logits.float().pow(2).mean().backward()
    before = {n: m.delta_S.grad.clone() for n, m in mods.items()}
    proj = Projector.for_model(model, vh, route=True)
    stats = proj.project_model_(model)
    assert stats["n_modules"] == len(mods) == 14
    for n, m in mods.items():
        c = max(float(before[n] @ vh[n]), 0.0)
        torch.testing.assert_close(m.delta_Q.grad, c * vh[n], rtol=1e-4, atol=1e-7)
        assert m.delta_S.grad @ vh[n] <= 1e-5
        assert m.delta_S.grad.norm().item() == pytest.approx(before[n].norm().item(), rel=1e-4)
