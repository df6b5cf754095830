"""AntiPaSTO adapter: round trip, gradients, get/set, disabled/quarantine modes, merging, rank < full."""
import copy

import pytest
import torch
import torch.nn.functional as F

from shared.adapter import (AdapterError, AntiPaSTOLinear, adapter_disabled, adapter_modules, delta_s_layout,
                            delta_s_parameters, get_delta, merged_inference, merged_state_dict, merged_weight,
                            quarantine, set_delta, set_quarantine_active, wrap_model)

TARGETS = ["q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj"]


@pytest.fixture(scope="module")
def ids():
    g = torch.Generator().manual_seed(123)
    return torch.randint(0, 256, (2, 24), generator=g)


@pytest.fixture()
def wrapped(tiny_qwen3):
    model = copy.deepcopy(tiny_qwen3)
    names = wrap_model(model, progress=False)
    return model, names


def _logits(model, ids):
    with torch.no_grad():
        return model(ids).logits.float()


def _randomize(model, scale=0.05, seed=0):
    g = torch.Generator().manual_seed(seed)
    flat = torch.randn(get_delta(model, flat=True).numel(), generator=g) * scale
    set_delta(model, flat)
    return flat


def test_wrap_names_and_fp32_round_trip(tiny_qwen3, wrapped, ids):
    model, names = wrapped
    assert len(names) == 2 * 7
    assert names[:3] == ["model.layers.0.self_attn.q_proj", "model.layers.0.self_attn.k_proj",
                         "model.layers.0.self_attn.v_proj"]
    assert list(adapter_modules(model)) == names
    layout_names, sizes = delta_s_layout(model)
    assert layout_names == names
    # q: 64 -> 128 (r=64), k/v: 64 -> 64, o: 128 -> 64, gate/up: 64 -> 128, down: 128 -> 64
    assert sizes[:7] == [64] * 7 and sum(sizes) == 14 * 64
    diff = (_logits(model, ids) - _logits(tiny_qwen3, ids)).abs().max().item()
    assert diff < 1e-3, diff
    assert diff < 1e-4  # in practice ~1e-6


def test_bf16_tolerance(tiny_qwen3, ids):
    """bf16: wrapped is within 2e-2 of unwrapped bf16 (logits ~0.7) and no more than 2.5x as far
    from the fp32 reference as the unwrapped bf16 model itself."""
    ref = _logits(tiny_qwen3, ids)
    model = copy.deepcopy(tiny_qwen3).to(torch.bfloat16)
    unwrapped = _logits(model, ids)
    wrap_model(model, progress=False)
    m = next(iter(adapter_modules(model).values()))
    assert m.U.dtype == torch.bfloat16 and m.Vh.dtype == torch.bfloat16
    assert m.S.dtype == torch.float32 and m.delta_S.dtype == torch.float32
    out = _logits(model, ids)
    assert (out - unwrapped).abs().max().item() < 2e-2
    assert (out - ref).abs().max().item() <= 2.5 * (unwrapped - ref).abs().max().item()


def test_bf16_small_delta_still_moves_output(tiny_qwen3, ids):
    """The scale is applied in fp32: a delta far below bf16 resolution of S still changes the logits."""
    model = copy.deepcopy(tiny_qwen3).to(torch.bfloat16)
    wrap_model(model, progress=False)
    before = _logits(model, ids)
    set_delta(model, torch.full_like(get_delta(model, flat=True), 1e-3))
    assert not torch.equal(_logits(model, ids), before)


def test_only_delta_s_gets_gradients(wrapped, ids):
    model, _ = wrapped
    trainable = [n for n, p in model.named_parameters() if p.requires_grad]
    assert trainable and all(n.endswith(".delta_S") for n in trainable)
    assert len(trainable) == 14
    model(ids, labels=ids).loss.backward()
    for n, p in model.named_parameters():
        if n.endswith(".delta_S"):
            assert p.grad is not None and p.grad.abs().sum() > 0, n
        else:
            assert not p.requires_grad and p.grad is None, n
    assert len(delta_s_parameters(model)) == 14
    assert get_delta(model, kind="s_grad", flat=True).shape == (14 * 64,)


def test_delta_s_grad_matches_analytic_formula(wrapped, ids):
    model, names = wrapped
    _randomize(model)
    name = "model.layers.1.mlp.down_proj"
    mod = model.get_submodule(name)
    seen = {}

    def hook(_m, inputs, output):
        seen["x"] = inputs[0].detach()
        output.register_hook(lambda g: seen.__setitem__("gy", g.detach()))

    h = mod.register_forward_hook(hook)
    model(ids, labels=ids).loss.backward()
    h.remove()
    x, gy = seen["x"].reshape(-1, mod.in_features), seen["gy"].reshape(-1, mod.out_features)
    expected = ((x @ mod.Vh.T) * (gy @ mod.U)).sum(0)  # sum_t (x Vh^T) ⊙ (dL/dy U)
    torch.testing.assert_close(mod.delta_S.grad, expected, rtol=1e-4, atol=1e-7)


def test_input_grad_matches_plain_autograd(tiny_qwen3):
    """The custom autograd path gives the same dL/dx and dL/ddelta_S as the spec formula under autograd."""
    lin = torch.nn.Linear(48, 80)
    mod = AntiPaSTOLinear.from_linear(lin)
    with torch.no_grad():
        mod.delta_S.normal_(0, 0.1)
    x1 = torch.randn(3, 5, 48, requires_grad=True)
    x2 = x1.detach().clone().requires_grad_(True)
    d2 = mod.delta_S.detach().clone().requires_grad_(True)
    y1 = mod(x1)
    y2 = ((x2 @ mod.Vh.T) * (mod.S + d2)) @ mod.U.T + mod.bias
    torch.testing.assert_close(y1, y2, rtol=1e-5, atol=1e-5)
    w = torch.randn_like(y1)
    (y1 * w).sum().backward()
    (y2 * w).sum().backward()
    torch.testing.assert_close(x1.grad, x2.grad, rtol=1e-5, atol=1e-5)
    torch.testing.assert_close(mod.delta_S.grad, d2.grad, rtol=1e-5, atol=1e-5)


def test_flat_and_dict_round_trips(wrapped):
    model, names = wrapped
    flat = _randomize(model, seed=3)
    torch.testing.assert_close(get_delta(model, flat=True), flat)
    d = get_delta(model)
    assert list(d) == names and d[names[0]].dtype == torch.float32
    other = copy.deepcopy(model)
    set_delta(other, torch.zeros_like(flat))
    assert get_delta(other, flat=True).abs().sum() == 0
    set_delta(other, d)
    torch.testing.assert_close(get_delta(other, flat=True), flat)
    # quarantine vector has the same layout
    set_delta(other, flat * 2, kind="q")
    torch.testing.assert_close(get_delta(other, kind="q", flat=True), flat * 2)
    set_delta(model, get_delta(other, kind="q"), kind="q")
    torch.testing.assert_close(get_delta(model, kind="q", flat=True), flat * 2)


def test_set_errors_are_clear(wrapped):
    model, names = wrapped
    with pytest.raises(AdapterError, match=r"delta_S for 'model.layers.0.self_attn.q_proj' has shape \(3,\), "
                                           r"expected \(64,\)"):
        set_delta(model, {names[0]: torch.zeros(3)}, strict=False)
    with pytest.raises(AdapterError, match="unknown adapter module 'nope'"):
        set_delta(model, {"nope": torch.zeros(64)})
    with pytest.raises(AdapterError, match="missing"):
        set_delta(model, {names[0]: torch.zeros(64)})
    with pytest.raises(AdapterError, match="flat delta_S has 5 values, the model's layout needs 896"):
        set_delta(model, torch.zeros(5))
    with pytest.raises(AdapterError, match="no AntiPaSTO modules"):
        get_delta(torch.nn.Linear(3, 3), flat=True)


def test_delta_kinds_share_one_layout(wrapped, ids):
    """get_delta/set_delta: dict and flat views agree for every kind; grads are copies, zeros before backward."""
    model, names = wrapped
    assert get_delta(model, kind="s_grad", flat=True).abs().sum() == 0  # no backward yet: zeros, not None
    model(ids, labels=ids).loss.backward()
    grads = get_delta(model, kind="s_grad")
    flat = get_delta(model, kind="s_grad", flat=True)
    assert list(grads) == names and flat.abs().sum() > 0
    torch.testing.assert_close(torch.cat(list(grads.values())), flat)
    grads[names[0]].zero_()  # a copy: the live grad is untouched
    assert adapter_modules(model)[names[0]].delta_S.grad.abs().sum() > 0
    set_delta(model, [0.5] * flat.numel(), kind="q")  # anything torch.as_tensor takes, as a flat vector
    assert get_delta(model, kind="q")[names[-1]].tolist() == [0.5] * 64
    with pytest.raises(AdapterError, match=r"unknown delta kind 's_grad'; valid kinds: s, q"):
        set_delta(model, flat, kind="s_grad")
    with pytest.raises(AdapterError, match=r"unknown delta kind 'S'; valid kinds: s, q, s_grad"):
        get_delta(model, kind="S")


def test_bad_module_name_error(tiny_qwen3):
    model = copy.deepcopy(tiny_qwen3)
    with pytest.raises(AdapterError) as e:
        wrap_model(model, target_modules=["q_proj", "foo"], progress=False)
    msg = str(e.value)
    assert msg.startswith("module name 'foo' matches no nn.Linear; linear names in this model: ")
    assert "q_proj" in msg and "down_proj" in msg and "lm_head" in msg
    assert not adapter_modules(model)  # nothing half-wrapped


def test_adapter_disabled_gives_reference(tiny_qwen3, wrapped, ids):
    model, _ = wrapped
    _randomize(model, scale=0.2)
    set_delta(model, torch.ones_like(get_delta(model, flat=True)), kind="q")
    set_quarantine_active(model, True)
    moved = _logits(model, ids)
    ref = _logits(tiny_qwen3, ids)
    assert (moved - ref).abs().max() > 1e-2
    with adapter_disabled(model):
        assert (_logits(model, ids) - ref).abs().max().item() < 1e-3
    torch.testing.assert_close(_logits(model, ids), moved)  # restored


def test_quarantine_active_and_inactive(wrapped, ids):
    model, _ = wrapped
    ds = _randomize(model, scale=0.1, seed=1)
    dq = torch.randn(ds.numel(), generator=torch.Generator().manual_seed(2)) * 0.1
    set_delta(model, dq, kind="q")
    assert all(not m.delta_Q.requires_grad for m in adapter_modules(model).values())
    base = _logits(model, ids)
    summed = copy.deepcopy(model)
    set_delta(summed, ds + dq)
    set_delta(summed, torch.zeros_like(dq), kind="q")
    with quarantine(model, True):
        assert all(m.quarantine_active for m in adapter_modules(model).values())
        torch.testing.assert_close(_logits(model, ids), _logits(summed, ids), rtol=1e-5, atol=1e-5)
    assert not any(m.quarantine_active for m in adapter_modules(model).values())
    torch.testing.assert_close(_logits(model, ids), base)
    set_quarantine_active(model, True)
    assert (_logits(model, ids) - base).abs().max() > 1e-3
    with quarantine(model, False):
        torch.testing.assert_close(_logits(model, ids), base)


def test_merged_weight_reproduces_forward(tiny_qwen3, wrapped, ids):
    model, _ = wrapped
    _randomize(model, scale=0.1)
    set_delta(model, torch.full_like(get_delta(model, flat=True), 0.05), kind="q")
    mod = model.get_submodule("model.layers.0.mlp.gate_proj")
    x = torch.randn(4, mod.in_features)
    with torch.no_grad():
        torch.testing.assert_close(F.linear(x, merged_weight(mod)), mod(x), rtol=1e-4, atol=1e-5)
        with quarantine(model, True):
            torch.testing.assert_close(F.linear(x, merged_weight(mod, include_quarantine=True)), mod(x),
                                       rtol=1e-4, atol=1e-5)
    orig = tiny_qwen3.get_submodule("model.layers.0.mlp.gate_proj").weight
    torch.testing.assert_close(merged_weight(mod, delta=torch.zeros(mod.rank)), orig, rtol=1e-4, atol=1e-5)
    # whole model: merged weights in a plain copy == wrapped forward
    plain = copy.deepcopy(tiny_qwen3)
    plain.load_state_dict(merged_state_dict(model), strict=False)
    torch.testing.assert_close(_logits(plain, ids), _logits(model, ids), rtol=1e-4, atol=1e-4)
    with pytest.raises(AdapterError, match=r"delta has shape \(3,\), expected \(64,\)"):
        merged_weight(mod, delta=torch.zeros(3))


def test_merged_inference_matches_adapter_and_keeps_training_path(wrapped, ids):
    model, _ = wrapped
    _randomize(model, scale=0.1)
    set_delta(model, torch.full_like(get_delta(model, flat=True), 0.05), kind="q")
    base = _logits(model, ids)
    with quarantine(model, True):
        routed = _logits(model, ids)
        with merged_inference(model):  # merged from the scale as set on entry (quarantine included)
            torch.testing.assert_close(_logits(model, ids), routed, rtol=1e-4, atol=1e-4)
    with merged_inference(model):
        assert all(m.merged is not None for m in adapter_modules(model).values())
        torch.testing.assert_close(_logits(model, ids), base, rtol=1e-4, atol=1e-4)
        loss = model(ids).logits.float().pow(2).mean()  # grad-enabled: adapter path, delta_S gets grads
        loss.backward()
    assert all(m.merged is None for m in adapter_modules(model).values())
    assert all(m.delta_S.grad is not None and m.delta_S.grad.abs().sum() > 0
               for m in adapter_modules(model).values())
    with adapter_disabled(model), merged_inference(model):
        off = _logits(model, ids)
    with adapter_disabled(model):
        torch.testing.assert_close(off, _logits(model, ids), rtol=1e-4, atol=1e-4)
    assert (off - base).abs().max() > 1e-3


@pytest.mark.parametrize("rank", [8, 40])
def test_rank_below_full_with_residual(tiny_qwen3, ids, rank):
    model = copy.deepcopy(tiny_qwen3)
    wrap_model(model, rank=rank, progress=False)
    mods = adapter_modules(model)
    assert all(m.rank == rank and m.W_res is not None for m in mods.values())
    assert get_delta(model, flat=True).numel() == 14 * rank
    assert (_logits(model, ids) - _logits(tiny_qwen3, ids)).abs().max().item() < 1e-3
    name = "model.layers.1.self_attn.o_proj"
    orig = tiny_qwen3.get_submodule(name).weight
    torch.testing.assert_close(merged_weight(mods[name]), orig, rtol=1e-4, atol=1e-5)
    # delta_S acts only on the kept top-`rank` directions
    _randomize(model, scale=0.1)
    mod = mods[name]
    W = merged_weight(mod)
    torch.testing.assert_close(W - orig, (mod.U * mod.delta_S) @ mod.Vh, rtol=1e-4, atol=1e-5)
    with pytest.raises(AdapterError, match="rank 999 out of range"):
        wrap_model(copy.deepcopy(tiny_qwen3), rank=999, progress=False)


def test_wrap_twice_is_idempotent(wrapped):
    model, names = wrapped
    _randomize(model)
    before = get_delta(model, flat=True)
    assert wrap_model(model, progress=False) == names
    torch.testing.assert_close(get_delta(model, flat=True), before)


def test_bias_kept_and_frozen():
    lin = torch.nn.Linear(16, 24, bias=True)
    mod = AntiPaSTOLinear.from_linear(lin)
    x = torch.randn(7, 16)
    torch.testing.assert_close(mod(x), lin(x), rtol=1e-5, atol=1e-5)
    assert mod.bias is not None
    assert [n for n, p in mod.named_parameters() if p.requires_grad] == ["delta_S"]
    assert mod.U.shape == (24, 16) and mod.S.shape == (16,) and mod.Vh.shape == (16, 16)


def test_dtype_cast_after_wrap_keeps_scale_fp32(wrapped, ids):
    model, _ = wrapped
    mod = adapter_modules(model)["model.layers.0.self_attn.q_proj"]
    p = mod.delta_S
    model.to(torch.bfloat16)
    assert mod.U.dtype == mod.Vh.dtype == torch.bfloat16
    assert mod.S.dtype == mod.delta_S.dtype == mod.delta_Q.dtype == torch.float32
    assert mod.delta_S is p  # optimizer references survive
    assert list(dict(mod.named_buffers())) == ["U", "S", "Vh"]
    assert torch.isfinite(_logits(model, ids)).all()
    model.half()
    assert mod.U.dtype == torch.float16 and mod.S.dtype == torch.float32


def test_bf16_delta_s_grad_tracks_fp32(tiny_qwen3, ids):
    """bf16 activations, fp32 scale grads: the flat delta_S gradient points where the fp32 one does."""
    grads = []
    for dtype in (torch.float32, torch.bfloat16):
        model = copy.deepcopy(tiny_qwen3).to(dtype)
        wrap_model(model, progress=False)
        model(ids, labels=ids).loss.backward()
        g = get_delta(model, kind="s_grad", flat=True)
        assert g.dtype == torch.float32
        grads.append(g)
    cos = F.cosine_similarity(grads[0], grads[1], dim=0).item()
    assert cos > 0.99, cos
