"""Pruned models save as safetensors and reload with identical logits."""

import json

import pytest
import torch
from test_space_masking_slicing import random_mask
from tiny_models import ARCHS, tiny_model
from transformers import AutoModelForCausalLM

from pruner.adapters import adapter_for
from pruner.errors import PrunerError
from pruner.models import is_pruned_dir, load_pruned, prepare_output_dir, save_pruned
from pruner.slicing import sliced_copy
from pruner.space import PruningSpace


def logits(model, seed=0):
    ids = torch.randint(0, model.config.vocab_size, (2, 16), generator=torch.Generator().manual_seed(seed))
    with torch.no_grad():
        return model(ids).logits


@pytest.mark.parametrize("arch", ARCHS)
def test_heterogeneous_round_trip_is_exact(arch, tmp_path):
    model = tiny_model(arch)
    adapter = adapter_for(model)
    space = PruningSpace.from_model(model, adapter, "kv_group")
    pruned = sliced_copy(model, adapter, space, random_mask(space, seed=2))
    save_pruned(pruned, None, tmp_path / "out", {"method": "test"})
    assert not list(tmp_path.glob(".out.*")), "no temporary directory is left behind"
    assert list((tmp_path / "out").glob("*.safetensors")) and not list((tmp_path / "out").glob("*.bin"))
    assert is_pruned_dir(tmp_path / "out")
    layout = json.loads((tmp_path / "out" / "config.json").read_text())["pruner_layout"]
    assert [e["n_q"] for e in layout] == [s.n_q for s in adapter.layer_shapes(pruned)]
    reloaded = load_pruned(tmp_path / "out", torch.float32)
    assert torch.equal(logits(reloaded), logits(pruned))
    assert json.loads((tmp_path / "out" / "report.json").read_text()) == {"method": "test"}


@pytest.mark.parametrize("arch", ["llama", "qwen2", "gemma3"])
def test_uniform_model_loads_with_plain_from_pretrained(arch, tmp_path):
    model = tiny_model(arch)
    adapter = adapter_for(model)
    space = PruningSpace.from_model(model, adapter, "kv_group")
    full = space.full_mask()
    heads = tuple(torch.tensor([False, True]) for _ in full.heads)
    channels = tuple(torch.arange(40) % 3 != 0 for _ in full.channels)
    pruned = sliced_copy(model, adapter, space, type(full)(heads, channels))
    save_pruned(pruned, None, tmp_path / "out")
    plain = AutoModelForCausalLM.from_pretrained(tmp_path / "out", dtype=torch.float32).eval()
    assert plain.config.num_key_value_heads == 1 and plain.config.intermediate_size == 26
    torch.testing.assert_close(logits(plain), logits(pruned), rtol=0, atol=0)


def test_output_dir_not_ours_is_refused_unless_overwrite(tmp_path):
    (tmp_path / "precious.txt").write_text("keep me")
    with pytest.raises(PrunerError, match="--overwrite"):
        prepare_output_dir(tmp_path, overwrite=False)
    prepare_output_dir(tmp_path, overwrite=True)
    prepare_output_dir(tmp_path / "new", overwrite=False)  # a missing directory is fine
    model = tiny_model("llama")
    with pytest.raises(PrunerError):
        save_pruned(model, None, tmp_path)
    assert (tmp_path / "precious.txt").read_text() == "keep me"


def test_resave_over_our_own_directory(tmp_path):
    model = tiny_model("llama")
    adapter = adapter_for(model)
    space = PruningSpace.from_model(model, adapter, "kv_group")
    first = sliced_copy(model, adapter, space, random_mask(space, seed=4))
    second = sliced_copy(model, adapter, space, random_mask(space, seed=5))
    save_pruned(first, None, tmp_path / "out")
    with pytest.raises(PrunerError, match="already holds a pruned model"):
        save_pruned(second, None, tmp_path / "out")
    assert torch.equal(logits(load_pruned(tmp_path / "out", torch.float32)), logits(first))
    save_pruned(second, None, tmp_path / "out", overwrite=True)
    assert torch.equal(logits(load_pruned(tmp_path / "out", torch.float32)), logits(second))
    assert sorted(p.name for p in tmp_path.iterdir()) == ["out"]
