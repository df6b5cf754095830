"""SVD cache: round trip, speed, and detection of corrupt / foreign / mis-shaped files."""
import copy
import logging
from pathlib import Path

import pytest
import torch
from safetensors.torch import save_file

from shared.adapter import adapter_modules, wrap_model
from shared.svd_cache import FORMAT, SVDCache, weight_fingerprint
from tests.support.tiny import make_tiny_qwen3

MID = "tiny-qwen3"


def _buffers(model):
    return {f"{n}.{b}": getattr(m, b).clone() for n, m in adapter_modules(model).items() for b in ("U", "S", "Vh")}


def _logits(model, ids):
    with torch.no_grad():
        return model(ids).logits


IDS = torch.arange(20).reshape(1, 20) % 256


def test_round_trip_reads_cache_with_identical_buffers(tiny_qwen3, tmp_path):
    c1 = SVDCache(tmp_path)
    m1 = copy.deepcopy(tiny_qwen3)
    names = wrap_model(m1, cache=c1, model_id=MID, progress=False)
    assert (c1.stats.built, c1.stats.loaded) == (14, 0)
    files = sorted(tmp_path.rglob("*.safetensors"))
    assert len(files) == 14 and files[0].parent == tmp_path / MID / "norev" / "float32"
    c2 = SVDCache(tmp_path)
    m2 = copy.deepcopy(tiny_qwen3)
    assert wrap_model(m2, cache=c2, model_id=MID, progress=False) == names
    assert (c2.stats.built, c2.stats.loaded) == (0, 14)
    b1, b2 = _buffers(m1), _buffers(m2)
    assert all(torch.equal(b1[k], b2[k]) for k in b1)
    assert (_logits(m2, IDS) - _logits(tiny_qwen3, IDS)).abs().max() < 1e-3


def test_cache_reload_faster_than_build(tmp_path):
    """On a 512x1024 weight the SVD costs tens of ms; reading it back costs ~1 ms."""
    torch.manual_seed(0)
    model = torch.nn.Sequential()
    model.add_module("up_proj", torch.nn.Linear(512, 1024, bias=False))
    model.add_module("down_proj", torch.nn.Linear(1024, 512, bias=False))
    m2 = copy.deepcopy(model)
    c1, c2 = SVDCache(tmp_path, device="cpu"), SVDCache(tmp_path, device="cpu")
    wrap_model(model, ["up_proj", "down_proj"], cache=c1, model_id="seq", progress=False)
    wrap_model(m2, ["up_proj", "down_proj"], cache=c2, model_id="seq", progress=False)
    assert c1.stats.built == 2 and c2.stats.loaded == 2
    assert c2.stats.t_load < c1.stats.t_build, (c2.stats.t_load, c1.stats.t_build)


def _one_file(root: Path, module="model.layers.0.mlp.up_proj") -> Path:
    return root / MID / "norev" / "float32" / f"{module}.safetensors"


@pytest.mark.parametrize("damage", ["truncate", "garbage_header", "empty"])
def test_corrupted_file_is_detected_and_rebuilt(tiny_qwen3, tmp_path, caplog, damage):
    wrap_model(copy.deepcopy(tiny_qwen3), cache=SVDCache(tmp_path), model_id=MID, progress=False)
    f = _one_file(tmp_path)
    data = f.read_bytes()
    if damage == "truncate":
        f.write_bytes(data[: len(data) // 2])
    elif damage == "garbage_header":
        f.write_bytes(b"\xff" * 8 + data[8:])
    else:
        f.write_bytes(b"")
    cache = SVDCache(tmp_path)
    model = copy.deepcopy(tiny_qwen3)
    with caplog.at_level(logging.WARNING, logger="rankguard.svd_cache"):
        wrap_model(model, cache=cache, model_id=MID, progress=False)
    assert (cache.stats.built, cache.stats.rebuilt, cache.stats.loaded) == (1, 1, 13)
    assert any("up_proj" in r.message and "unreadable" in r.message and "rebuilding" in r.message
               for r in caplog.records)
    assert (_logits(model, IDS) - _logits(tiny_qwen3, IDS)).abs().max() < 1e-3
    assert SVDCache(tmp_path)._read(f, "model.layers.0.mlp.up_proj",
                                    tiny_qwen3.get_submodule("model.layers.0.mlp.up_proj").weight)[0] is not None


def test_cache_for_another_model_is_detected(tiny_qwen3, tmp_path, caplog):
    """Same model id, different weights (e.g. a rebuilt toy model): every file is rejected and rebuilt."""
    wrap_model(copy.deepcopy(tiny_qwen3), cache=SVDCache(tmp_path), model_id=MID, progress=False)
    other = make_tiny_qwen3(seed=1)
    ref = _logits(other, IDS)
    cache = SVDCache(tmp_path)
    with caplog.at_level(logging.WARNING, logger="rankguard.svd_cache"):
        wrap_model(other, cache=cache, model_id=MID, progress=False)
    assert (cache.stats.built, cache.stats.rebuilt, cache.stats.loaded) == (14, 14, 0)
    assert sum("another model" in r.message for r in caplog.records) == 14
    assert (_logits(other, IDS) - ref).abs().max() < 1e-3
    again = SVDCache(tmp_path)
    wrap_model(make_tiny_qwen3(seed=1), cache=again, model_id=MID, progress=False)
    assert again.stats.loaded == 14 and again.stats.built == 0


def test_shape_mismatch_is_detected(tiny_qwen3, tmp_path, caplog):
    name = "model.layers.0.mlp.up_proj"
    W = tiny_qwen3.get_submodule(name).weight
    f = _one_file(tmp_path, name)
    f.parent.mkdir(parents=True)
    meta = {"format": FORMAT, "model_id": MID, "module": name, "fingerprint": weight_fingerprint(W)}
    save_file({"U": torch.zeros(128, 32), "S": torch.ones(32), "Vh": torch.zeros(32, 64)}, str(f), metadata=meta)
    cache = SVDCache(tmp_path)
    with caplog.at_level(logging.WARNING, logger="rankguard.svd_cache"):
        U, S, Vh = cache.factors(MID, None, name, W)
    assert U.shape == (128, 64) and cache.stats.rebuilt == 1
    assert any("shape mismatch" in r.message for r in caplog.records)
    torch.testing.assert_close((U * S) @ Vh, W, rtol=1e-4, atol=1e-5)


def test_cache_keys_by_revision_and_dtype(tiny_qwen3, tmp_path):
    cache = SVDCache(tmp_path)
    p = cache.path("Qwen/Qwen3-4B", "abc123", torch.bfloat16, "model.layers.0.self_attn.q_proj")
    assert p == tmp_path / "Qwen--Qwen3-4B" / "abc123" / "bfloat16" / "model.layers.0.self_attn.q_proj.safetensors"
    bf = copy.deepcopy(tiny_qwen3).to(torch.bfloat16)
    wrap_model(bf, cache=cache, model_id=MID, revision="r1", progress=False)
    m = next(iter(adapter_modules(bf).values()))
    assert m.U.dtype == torch.bfloat16
    assert len(list((tmp_path / MID / "r1" / "bfloat16").glob("*.safetensors"))) == 14


def test_fingerprint_sees_small_changes():
    W = torch.randn(300, 200)
    W2 = W.clone()
    W2[150, 100] += 1.0  # 60,000 values < the 65,536 sample: every element is covered
    assert weight_fingerprint(W) == weight_fingerprint(W.clone())
    assert weight_fingerprint(W) != weight_fingerprint(W2)
    assert weight_fingerprint(W) != weight_fingerprint(W.T.contiguous())
    assert weight_fingerprint(W) != weight_fingerprint(W.to(torch.bfloat16))
    assert weight_fingerprint(W) != weight_fingerprint(W * 1.001)
