"""Projection onto a subspace (issue #15): per-axis one-sided and two-sided gates, the vectorised hook
against the literal per-module/per-axis reference loop, rank-1 unchanged, modules without axes."""
import pytest
import torch
from torch import nn

from learner.projection import ProjectionError, Projector, project_grads_reference

torch.set_num_threads(1)
SIZES = [5, 8, 3, 8, 13, 1, 6, 16]
KS = [3, 2, 1, 0, 4, 1, 6, 5]  # mixed axes per module, one module with none (dropped by a noise floor)
STAT_KEYS = ("cos_mean", "cos_std", "frac_fired", "grad_norm_mean", "n_modules", "removed_frac_mean")


def _basis(gen, r, k):
    q, _ = torch.linalg.qr(torch.randn(r, max(k, 1), generator=gen))
    return q.T[:k].contiguous()  # [k, r], orthonormal rows


def _setup(seed=0, sizes=SIZES, ks=KS, quarantine=False):
    gen = torch.Generator().manual_seed(seed)
    names = [f"layers.{i}.proj" for i in range(len(sizes))]
    params, bases, qs = [], {}, []
    for n, r, k in zip(names, sizes, ks):
        B = _basis(gen, r, min(k, r))
        p = nn.Parameter(torch.zeros(r))
        g = torch.randn(r, generator=gen)
        if B.shape[0]:
            g = g + 0.8 * (torch.randn(B.shape[0], generator=gen) @ B) * g.norm()  # sizeable in-span parts, mixed signs
        p.grad = g
        params.append(p)
        bases[n] = B
        qs.append(nn.Parameter(torch.zeros(r)))
    return names, params, bases, (qs if quarantine else None)


def _assert_same(p1, p2, s1, s2):
    for a, b in zip(p1, p2):
        torch.testing.assert_close(a.grad, b.grad, rtol=1e-5, atol=1e-6)
    for k in STAT_KEYS:
        assert s1[k] == pytest.approx(s2[k], rel=1e-5, abs=1e-6), k


@pytest.mark.parametrize("gate", ["onesided", "twosided"])
@pytest.mark.parametrize("mag", [True, False])
@pytest.mark.parametrize("route", [False, True])
def test_vectorised_equals_reference_loop(gate, mag, route):
    names, p1, bases, q1 = _setup(3, quarantine=route)
    _, p2, _, q2 = _setup(3, quarantine=route)
    keep = {names[1]: False}
    s1 = Projector(names, bases, magnitude_preserve=mag, keep_mask=keep, route=route, gate=gate).project_(p1, q1)
    s2 = project_grads_reference(names, p2, bases, magnitude_preserve=mag, keep_mask=keep, quarantine=q2, gate=gate)
    _assert_same(p1, p2, s1, s2)
    if route:
        for a, b in zip(q1, q2):
            torch.testing.assert_close(a.grad, b.grad, rtol=1e-5, atol=1e-6)


def test_rank1_basis_is_the_spec_projection():
    """A [1, r] basis and the plain [r] direction give the same grads and stats (the spec's arms)."""
    names, p1, bases, _ = _setup(4, ks=[1] * len(SIZES))
    _, p2, _, _ = _setup(4, ks=[1] * len(SIZES))
    s1 = Projector(names, bases).project_(p1)
    s2 = Projector(names, {n: b[0] for n, b in bases.items()}).project_(p2)
    for a, b in zip(p1, p2):
        assert torch.equal(a.grad, b.grad)
    assert s1 == s2
    cos = [float(p.grad @ bases[n][0]) for n, p in zip(names, _setup(4, ks=[1] * len(SIZES))[1])]
    norms = [float(p.grad.norm()) for p in _setup(4, ks=[1] * len(SIZES))[1]]
    assert s1["removed_frac_mean"] == pytest.approx(sum(max(0.0, c / g) for c, g in zip(cos, norms)) / len(names))


def test_onesided_removes_positive_axes_only_and_keeps_the_rest():
    names, params, bases, _ = _setup(5)
    before = [p.grad.clone() for p in params]
    Projector(names, bases, magnitude_preserve=False).project_(params)
    for n, p, g0 in zip(names, params, before):
        B = bases[n]
        c0, c1 = B @ g0, B @ p.grad
        torch.testing.assert_close(c1, torch.where(c0 > 0, torch.zeros_like(c0), c0), atol=1e-5, rtol=0)
        resid0, resid1 = g0 - B.T @ c0, p.grad - B.T @ c1  # the part outside span(V) is untouched
        torch.testing.assert_close(resid0, resid1, atol=1e-5, rtol=0)
    assert any((bases[n] @ g0 < 0).any() for n, g0 in zip(names, before))  # the test exercises negative axes


def test_twosided_empties_the_span_and_mag_preserves_norm():
    names, params, bases, _ = _setup(6)
    before = [p.grad.clone() for p in params]
    stats = Projector(names, bases, gate="twosided").project_(params)
    for n, p, g0 in zip(names, params, before):
        B = bases[n]
        if B.shape[0] and B.shape[0] < B.shape[1]:
            torch.testing.assert_close(B @ p.grad, torch.zeros(B.shape[0]), atol=1e-5, rtol=0)
            assert p.grad.norm() == pytest.approx(g0.norm().item(), rel=1e-5)
        if B.shape[0] == 0:
            assert torch.equal(p.grad, g0)  # no axes: untouched, never fired
    expect_fired = sum(1 for n in names if bases[n].shape[0]) / len(names)
    assert stats["frac_fired"] == pytest.approx(expect_fired)


def test_full_span_goes_to_zero_without_nan():
    """k = r two-sided removes everything: the residue stays (near) zero instead of being blown up."""
    names, params, bases, _ = _setup(7, sizes=[4, 6], ks=[4, 6])
    Projector(names, bases, gate="twosided").project_(params)
    for p in params:
        assert torch.isfinite(p.grad).all() and p.grad.norm() < 1e-4


def test_bad_gate_and_shape_errors():
    names, params, bases, _ = _setup(8)
    with pytest.raises(ProjectionError, match="unknown gate 'reverse'; valid: onesided, twosided"):
        Projector(names, bases, gate="reverse")
    with pytest.raises(ProjectionError, match=r"must be \[r\] or \[k, r\]"):
        Projector(names, {**bases, names[0]: torch.zeros(1, 2, 5)})


def test_bench_times_the_subspace_hook():
    import importlib.util
    from pathlib import Path

    spec = importlib.util.spec_from_file_location("bench_projection", Path(__file__).resolve().parents[2] / "bench"
                                                  / "projection.py")
    bench = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(bench)

    shape = dict(hidden_size=32, intermediate_size=64, num_hidden_layers=1, num_attention_heads=2,
                 num_key_value_heads=1, head_dim=16, vocab_size=64)
    res = bench.bench_hook(shape, torch.device("cpu"), reps=2, k=3, gate="twosided")
    assert res["k"] == 3 and res["modules"] == 7 and res["frac_fired"] == 1.0
    assert res["vectorised_ms"] > 0 and res["loop_ms"] > 0
