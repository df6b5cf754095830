"""The tiny random Qwen3 (and an HF folder holding it) that the learner/adapter/engine tests share."""
import torch

TINY_QWEN3 = dict(vocab_size=256, hidden_size=64, intermediate_size=128, num_hidden_layers=2,
                  num_attention_heads=4, num_key_value_heads=2, head_dim=32, tie_word_embeddings=False,
                  max_position_embeddings=256, rope_theta=10000.0, bos_token_id=None, eos_token_id=1,
                  pad_token_id=0)


def make_tiny_qwen3(seed: int = 0, dtype: torch.dtype = torch.float32):
    """Random-init tiny Qwen3ForCausalLM (fp32, eval mode); same weights for the same seed."""
    from transformers import Qwen3Config, Qwen3ForCausalLM

    torch.manual_seed(seed)
    model = Qwen3ForCausalLM(Qwen3Config(**TINY_QWEN3)).to(dtype).eval()
    return model


def save_tiny_qwen3_dir(path, seed: int = 0):
    """Save a tiny Qwen3 + a character-level fast tokenizer (vocab < 256) as an HF folder."""
    import string

    from tokenizers import Regex, Tokenizer, models, pre_tokenizers
    from transformers import PreTrainedTokenizerFast

    specials = ["<pad>", "<eos>", "<unk>"]
    chars = [c for c in string.printable if c not in "\x0b\x0c"]
    vocab = {t: i for i, t in enumerate(specials + chars)}
    tok = Tokenizer(models.WordLevel(vocab=vocab, unk_token="<unk>"))
    tok.pre_tokenizer = pre_tokenizers.Split(Regex("."), behavior="isolated")
    fast = PreTrainedTokenizerFast(tokenizer_object=tok, pad_token="<pad>", eos_token="<eos>", unk_token="<unk>")
    model = make_tiny_qwen3(seed)
    model.save_pretrained(path)
    fast.save_pretrained(path)
    return path
