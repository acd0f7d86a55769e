"""Tiny random-weight models of every supported architecture, built from configs in the test."""

import torch
from transformers import AutoModelForCausalLM, Gemma3TextConfig, LlamaConfig, MistralConfig, Qwen2Config

COMMON = dict(vocab_size=97, hidden_size=48, intermediate_size=40, num_hidden_layers=3,
              num_attention_heads=6, num_key_value_heads=2, max_position_embeddings=128)


def tiny_config(arch: str):
    if arch == "llama":
        return LlamaConfig(**COMMON, tie_word_embeddings=True)
    if arch == "llama_bias":
        return LlamaConfig(**COMMON, attention_bias=True, mlp_bias=True)
    if arch == "mistral":
        return MistralConfig(**COMMON, sliding_window=16)
    if arch == "qwen2":
        return Qwen2Config(**COMMON)
    if arch == "gemma3":
        return Gemma3TextConfig(**COMMON, head_dim=12, query_pre_attn_scalar=12, sliding_window=16)
    raise ValueError(arch)


ARCHS = ("llama", "llama_bias", "mistral", "qwen2", "gemma3")


def tiny_model(arch: str, seed: int = 0):
    torch.manual_seed(seed)
    model = AutoModelForCausalLM.from_config(tiny_config(arch), dtype=torch.float32).eval()
    # Random init leaves norms at exactly 1 and biases at 0: perturb them so tests see real weights.
    with torch.no_grad():
        for name, p in model.named_parameters():
            if "norm" in name or name.endswith("bias"):
                p.add_(0.1 * torch.randn_like(p))
    return model


def tiny_tokenizer():
    """A character-level tokenizer whose 97 ids fit the tiny models' vocabulary: printable ASCII
    (ids 0-94), `<unk>` for anything else and `</s>`. Built offline from the `tokenizers` library."""
    from tokenizers import Tokenizer, models
    from transformers import PreTrainedTokenizerFast

    vocab = {chr(c): c - 32 for c in range(32, 127)} | {"<unk>": 95, "</s>": 96}
    backend = Tokenizer(models.BPE(vocab=vocab, merges=[], unk_token="<unk>"))
    return PreTrainedTokenizerFast(tokenizer_object=backend, unk_token="<unk>", eos_token="</s>",
                                   model_max_length=COMMON["max_position_embeddings"])


def save_tiny(folder, arch: str = "llama", seed: int = 0):
    """A tiny random-weight model with its tokenizer saved as a checkpoint folder (safetensors)."""
    model = tiny_model(arch, seed)
    model.save_pretrained(folder, safe_serialization=True)
    tiny_tokenizer().save_pretrained(folder)
    return folder
