"""Worker-extension pieces that need no vLLM: which checkpoint tensors an update carries."""
import torch
from safetensors.torch import save_file

from rollout.vllm_worker_ext import DeltaSWorkerExtension, checkpoint_index, natural_key, target_module_names

QWEN_PACKED = {"qkv_proj": ["q_proj", "k_proj", "v_proj"], "gate_up_proj": ["gate_proj", "up_proj"]}


class FakeModel:
    packed_modules_mapping = QWEN_PACKED


def _checkpoint(tmp_path, layers=11, qkv_bias=True):
    t = {"model.embed_tokens.weight": torch.zeros(10, 4), "lm_head.weight": torch.zeros(10, 4)}
    for i in range(layers):
        p = f"model.layers.{i}"
        for m in ("q_proj", "k_proj", "v_proj", "o_proj"):
            t[f"{p}.self_attn.{m}.weight"] = torch.full((4, 4), float(i))
            if qkv_bias and m != "o_proj":
                t[f"{p}.self_attn.{m}.bias"] = torch.full((4,), float(i))
        for m in ("gate_proj", "up_proj", "down_proj"):
            t[f"{p}.mlp.{m}.weight"] = torch.ones(4, 4)
        t[f"{p}.input_layernorm.weight"] = torch.ones(4)
    half = dict(list(t.items())[: len(t) // 2])  # two shards, like a sharded HF checkpoint
    save_file(half, str(tmp_path / "model-00001-of-00002.safetensors"))
    save_file({k: v for k, v in t.items() if k not in half}, str(tmp_path / "model-00002-of-00002.safetensors"))
    return checkpoint_index(tmp_path)


def test_targets_follow_wrap_rule_in_model_order(tmp_path):
    index = _checkpoint(tmp_path)
    names = target_module_names(index, ["q_proj", "down_proj"])
    assert names[:4] == ["model.layers.0.mlp.down_proj", "model.layers.0.self_attn.q_proj",
                         "model.layers.1.mlp.down_proj", "model.layers.1.self_attn.q_proj"]
    assert names[-1] == "model.layers.10.self_attn.q_proj" and len(names) == 22  # 10 after 9, not after 1
    assert sorted(["a.10.x", "a.9.x", "a.1.x"], key=natural_key) == ["a.1.x", "a.9.x", "a.10.x"]
    assert target_module_names(index, ["layernorm"]) == []  # only '<module>.weight' of named modules


def test_fused_layers_get_all_their_parts(tmp_path):
    """Only q_proj targeted: k/v weights and all three biases ride along unchanged, so vLLM's fused
    qkv_proj is complete and gets processed; gate/up untouched -> nothing extra."""
    index = _checkpoint(tmp_path, layers=2)
    names = target_module_names(index, ["q_proj"])
    static = DeltaSWorkerExtension._static_tensors(FakeModel(), index, names, torch.float32, torch.device("cpu"))
    assert list(static) == [
        "model.layers.0.self_attn.k_proj.bias", "model.layers.0.self_attn.k_proj.weight",
        "model.layers.0.self_attn.q_proj.bias", "model.layers.0.self_attn.v_proj.bias",
        "model.layers.0.self_attn.v_proj.weight",
        "model.layers.1.self_attn.k_proj.bias", "model.layers.1.self_attn.k_proj.weight",
        "model.layers.1.self_attn.q_proj.bias", "model.layers.1.self_attn.v_proj.bias",
        "model.layers.1.self_attn.v_proj.weight"]
    assert float(static["model.layers.1.self_attn.k_proj.weight"][0, 0]) == 1.0
    # all seven targets, no biases: nothing extra to send
    (tmp_path / "nb").mkdir()
    index = _checkpoint(tmp_path / "nb", layers=2, qkv_bias=False)
    all7 = target_module_names(index, ["q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj"])
    assert len(all7) == 14
    assert not DeltaSWorkerExtension._static_tensors(FakeModel(), index, all7, torch.float32, torch.device("cpu"))
