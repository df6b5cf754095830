"""Shared test setup: offline HF, one torch thread; fixtures every folder uses: the tiny random Qwen3
(`tiny_qwen3`, `tiny_qwen3_dir`), its AntiPaSTO-wrapped copy (`base_model`) and an artifacts folder
(`art_root`) for the learner tests. The builders live in tests/support/."""
import os

os.environ["HF_HUB_OFFLINE"] = "1"
os.environ["TOKENIZERS_PARALLELISM"] = "false"

import copy  # noqa: E402

import pytest  # noqa: E402
import torch  # noqa: E402

from tests.support.tiny import make_tiny_qwen3, save_tiny_qwen3_dir  # noqa: E402

torch.set_num_threads(1)


@pytest.fixture(scope="session")
def tiny_qwen3():
    """Session-wide tiny Qwen3 (hidden 64, inter 128, 2 layers, 4 heads/2 kv, head_dim 32, vocab 256,
    untied). Shared: deep-copy it (copy.deepcopy) before wrapping or changing it."""
    return make_tiny_qwen3()


@pytest.fixture(scope="session")
def tiny_qwen3_dir(tmp_path_factory):
    """An HF folder (config, safetensors, tokenizer) holding the tiny Qwen3; load with from_pretrained."""
    return save_tiny_qwen3_dir(tmp_path_factory.mktemp("tiny_qwen3"))


@pytest.fixture(scope="module")
def base_model(tiny_qwen3):
    """A copy of the tiny Qwen3 wrapped with the AntiPaSTO adapter (tests.support.trainer.make_learner)."""
    from shared.adapter import wrap_model

    m = copy.deepcopy(tiny_qwen3)
    wrap_model(m, progress=False)
    return m


@pytest.fixture(scope="module")
def art_root(tmp_path_factory):
    return tmp_path_factory.mktemp("artifacts")
