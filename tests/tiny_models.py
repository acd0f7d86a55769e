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


WORDS = [f"w{i}" for i in range(90)]


def word_tokenizer(bos: bool = False):
    """A real fast tokenizer over 90 words (ids 3..92; 0 unk, 1 bos, 2 eos) that fits the tiny models'
    vocabulary; with `bos`, `tokenizer(text).input_ids` starts with BOS like Llama-2's or Gemma's."""
    from tokenizers import Tokenizer, models, pre_tokenizers, processors
    from transformers import PreTrainedTokenizerFast

    vocab = {"<unk>": 0, "<s>": 1, "</s>": 2, **{w: i + 3 for i, w in enumerate(WORDS)}}
    core = Tokenizer(models.WordLevel(vocab, unk_token="<unk>"))
    core.pre_tokenizer = pre_tokenizers.WhitespaceSplit()
    if bos:
        core.post_processor = processors.TemplateProcessing(single="<s> $A", special_tokens=[("<s>", 1)])
    return PreTrainedTokenizerFast(tokenizer_object=core, unk_token="<unk>", bos_token="<s>", eos_token="</s>")


def tiny_corpus(path, words: int = 6000, seed: int = 0):
    """A text file of random words in paragraphs of 60, for calibration and evaluation on tiny models."""
    g = torch.Generator().manual_seed(seed)
    ids = torch.randint(0, len(WORDS), (words,), generator=g).tolist()
    paragraphs = [" ".join(WORDS[i] for i in ids[start:start + 60]) for start in range(0, words, 60)]
    path.write_text("\n\n".join(paragraphs))
    return path


def tiny_loaded(arch: str = "llama", bos: bool = False, seed: int = 0):
    """A LoadedModel of a tiny random model with `word_tokenizer`, as `load_model` would return it."""
    from pruner.adapters import adapter_for
    from pruner.models import LoadedModel

    model = tiny_model(arch, seed)
    return LoadedModel(model, word_tokenizer(bos), adapter_for(model), f"tiny-{arch}", torch.device("cpu"),
                       torch.float32)
