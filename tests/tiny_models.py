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


def tiny_checkpoint(folder, arch: str = "llama"):
    """A tiny random model saved as a local checkpoint with the embedded model's tokenizer (its
    vocabulary size), so `load_model` and the CLI take it; pytest.skip when that is not prepared."""
    import pytest
    from transformers import AutoTokenizer

    from pruner.paths import embedded_model_dir

    if not (embedded_model_dir() / "tokenizer.json").is_file():
        pytest.skip("embedded model not prepared (its tokenizer is borrowed)")
    tokenizer = AutoTokenizer.from_pretrained(embedded_model_dir())
    config = tiny_config(arch)
    config.vocab_size = len(tokenizer)
    torch.manual_seed(0)
    model = AutoModelForCausalLM.from_config(config, dtype=torch.float32).eval()
    with torch.no_grad():
        for name, p in model.named_parameters():
            if "norm" in name or name.endswith("bias"):
                p.add_(0.1 * torch.randn_like(p))
    model.save_pretrained(folder)
    tokenizer.save_pretrained(folder)
    return folder


def small_text(path):
    """A few kilobytes of plain English sentences, as a local corpus file."""
    words = zip(["jury", "court", "mayor"] * 60, ["report", "vote", "budget"] * 60, ["good", "late", "high", "small"] * 45)
    path.write_text(" ".join(f"The {w} said that the {v} of the county was {u}." for w, v, u in words))
    return path
