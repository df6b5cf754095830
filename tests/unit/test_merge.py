"""rollout.merge.DeltaMerger == the adapter's effective weight (what the learner's forward uses)."""
import copy

import pytest
import torch

from rollout.merge import DeltaMerger, MergeError, as_flat_delta, factors_from_weight, factors_from_wrapped
from shared.adapter import adapter_modules, delta_s_layout, merged_weight, set_delta, wrap_model


def _wrapped(tiny_qwen3, rank=None):
    model = copy.deepcopy(tiny_qwen3)
    wrap_model(model, rank=rank, progress=False)
    return model


def _effective_weight(module) -> torch.Tensor:
    """W as the adapter's forward applies it: forward(I) = I W^T (+ b)."""
    eye = torch.eye(module.in_features)
    y = module(eye)
    if module.bias is not None:
        y = y - module.bias
    return y.T


@pytest.mark.parametrize("rank", [None, 16])
def test_merge_matches_adapter_forward(tiny_qwen3, rank):
    model = _wrapped(tiny_qwen3, rank)
    names, sizes = delta_s_layout(model)
    g = torch.Generator().manual_seed(1)
    delta = 0.05 * torch.randn(sum(sizes), generator=g)
    set_delta(model, delta)
    merger = DeltaMerger(factors_from_wrapped(model), device="cpu")
    out = dict(merger.merged(delta, names, sizes))
    assert list(out) == [n + ".weight" for n in names]  # model order, HF checkpoint names
    mods = adapter_modules(model)
    worst = 0.0
    with torch.no_grad():
        for n, m in mods.items():
            W = out[n + ".weight"]
            assert W.shape == (m.out_features, m.in_features) and W.dtype == torch.float32
            worst = max(worst, (W - _effective_weight(m)).abs().max().item())
            assert torch.allclose(W, merged_weight(m), atol=1e-6, rtol=0)
    assert worst < 1e-5, worst
    # a nonzero delta really moves the weights away from the original Linear
    orig = dict(tiny_qwen3.named_parameters())
    moved = max((out[n + ".weight"] - orig[n + ".weight"]).abs().max().item() for n in names)
    assert moved > 1e-3


def test_merge_groups_equal_shapes_and_windows(tiny_qwen3):
    model = _wrapped(tiny_qwen3)
    names, sizes = delta_s_layout(model)
    facs = factors_from_wrapped(model)
    one = DeltaMerger(facs)
    # 2 layers x 7 modules in 3 shapes: [128,64] q/gate/up, [64,64] k/v, [64,128] o/down -> 3 bmm groups
    assert len(one.windows) == 1 and [len(g.idx) for g in one.windows[0]] == [6, 4, 4]
    tiny = DeltaMerger(facs, window_bytes=1)  # one module per window: same numbers, other batching
    assert len(tiny.windows) == len(names)
    bmm = DeltaMerger(facs, batched=True)  # the GPU path (one bmm per group), run on CPU here
    assert not one.batched and bmm.batched
    delta = torch.randn(sum(sizes)) * 0.1
    a, b = one.merged_dict(delta), tiny.merged_dict(as_flat_delta(delta.numpy().astype("<f4").tobytes()))
    c = bmm.merged_dict(delta)
    assert all(torch.allclose(a[k], b[k], atol=1e-6) and torch.allclose(a[k], c[k], atol=1e-5) for k in a)


def test_merge_bf16_out_and_truncated_factors():
    torch.manual_seed(0)
    W = torch.randn(24, 40)
    svd = torch.linalg.svd(W, full_matrices=False)
    f = factors_from_weight(W, svd, rank=8)
    merger = DeltaMerger({"m": f}, out_dtype=torch.bfloat16)
    (name, W0), = merger.merged(torch.zeros(8), ["m"], [8])
    assert name == "m.weight" and W0.dtype == torch.bfloat16
    assert torch.allclose(W0.float(), W, atol=0.05)  # rank-8 part + residual = W (bf16 rounding)
    U, S, Vh = svd
    for batched in (False, True):
        (_, W1), = DeltaMerger({"m": f}, batched=batched).merged(torch.ones(8))
        assert torch.allclose(W1, W + U[:, :8] @ Vh[:8], atol=1e-4)


def test_merge_layout_errors(tiny_qwen3):
    model = _wrapped(tiny_qwen3)
    names, sizes = delta_s_layout(model)
    merger = DeltaMerger(factors_from_wrapped(model))
    with pytest.raises(MergeError, match="unknown module 'nope'"):
        list(merger.merged(torch.zeros(sum(sizes)), names[:-1] + ["nope"], sizes))
    with pytest.raises(MergeError, match="rank there is"):
        list(merger.merged(torch.zeros(sum(sizes)), names, [sizes[0] - 1] + sizes[1:]))
    with pytest.raises(MergeError, match=f"need {sum(sizes)}"):
        list(merger.merged(torch.zeros(3)))
    with pytest.raises(MergeError, match="NaN"):
        list(merger.merged(torch.full((sum(sizes),), float("nan"))))
    with pytest.raises(MergeError, match="missing module"):
        list(merger.merged(torch.zeros(sum(sizes) - sizes[0]), names[1:], sizes[1:]))
    with pytest.raises(MergeError, match="empty"):
        DeltaMerger({})


def test_merge_accepts_learner_order(tiny_qwen3):
    """The engine orders modules by checkpoint key; the learner's update comes in model order."""
    model = _wrapped(tiny_qwen3)
    names, sizes = delta_s_layout(model)
    facs = factors_from_wrapped(model)
    rev = DeltaMerger(dict(reversed(list(facs.items()))))
    delta = torch.randn(sum(sizes)) * 0.1
    a = DeltaMerger(facs).merged_dict(delta, names, sizes)
    b = rev.merged_dict(delta, names, sizes)
    assert list(b) == [n + ".weight" for n in reversed(names)]
    assert all(torch.allclose(a[k], b[k], atol=1e-6) for k in a)
