"""Models bigger than one device: loaded with a device map that offloads layers (accelerate),
they give the undispatched model's logits, masked and gathered losses, scores and searches, and
their pruned copy (built on the CPU a layer at a time) saves and reloads."""

import pytest
import torch
from tiny_models import save_tiny, tiny_corpus

from pruner.config import PruneConfig
from pruner.dispatch import is_dispatched
from pruner.evaluate import window_losses
from pruner.gathered import gathered
from pruner.masking import masked
from pruner.models import load_model, save_pruned
from pruner.pg.config import PGConfig
from pruner.prune import prune
from pruner.space import PruningSpace

SPLIT = {"model.embed_tokens": "cpu", "model.rotary_emb": "cpu", "model.layers.0": "cpu", "model.layers.1": "disk",
         "model.layers.2": "disk", "model.norm": "cpu", "lm_head": "cpu"}


@pytest.fixture(scope="module")
def models(tmp_path_factory):
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    root = tmp_path_factory.mktemp("dispatch")
    folder = save_tiny(root / "tiny", "llama_bias")  # biases: compensation and slicing carry them
    plain = load_model(str(folder), device="cpu")
    split = load_model(str(folder), device_map=SPLIT, offload_folder=root / "offload")
    yield root, plain, split
    torch.set_num_threads(threads)


def test_an_offloading_device_map_gives_the_same_logits_and_mask_losses(models):
    _, plain, split = models
    assert is_dispatched(split.model) and not is_dispatched(plain.model)
    offloaded = [l for l in range(3) if split.adapter.is_offloaded(split.model, l)]
    assert offloaded == [1, 2] and split.device == torch.device("cpu")
    ids = torch.randint(0, 97, (2, 16), generator=torch.Generator().manual_seed(0))
    torch.testing.assert_close(split.model(ids).logits, plain.model(ids).logits, rtol=0, atol=0)
    for granularity in ("kv_group", "query_head"):
        space = PruningSpace.from_model(split.model, split.adapter, granularity)
        assert space == PruningSpace.from_model(plain.model, plain.adapter, granularity)
        g = torch.Generator().manual_seed(1)
        n_h = sum(space.n_head_units(l) for l in range(3))
        n_c = sum(space.n_channel_units(l) for l in range(3))
        mask = space.unflatten((torch.rand(n_h, generator=g) < 0.5).float(), (torch.rand(n_c, generator=g) < 0.5).float())
        fill = ([torch.randn(space.shapes[l].n_q * space.shapes[l].head_dim) for l in range(3)],
                [torch.randn(space.shapes[l].d_ff) for l in range(3)])
        with masked(plain.model, plain.adapter, space, mask, fill):
            expect = window_losses(plain.model, ids)
        for run_on in (masked, gathered):
            with run_on(split.model, split.adapter, space, mask, fill):
                torch.testing.assert_close(window_losses(split.model, ids), expect, rtol=1e-5, atol=1e-5)
    # the offloaded weights went back to `meta`: nothing stayed resident
    assert all(p.device.type == "meta" for p in split.adapter.layers(split.model)[1].parameters())


@pytest.mark.parametrize("method", ["magnitude", "pg"])
def test_pruning_a_dispatched_model_equals_pruning_it_whole_and_the_save_reloads(models, method):
    root, plain, split = models
    text = tiny_corpus(root / "text.txt")
    pg = PGConfig(steps=3, samples=2, batch_size=2, seqlen=16, eval_every=3, eval_windows=2, bias_compensation=True)
    config = PruneConfig(method=method, ratio=0.4, data=str(text), calib_windows=4, pg=pg)
    want, _, want_report = prune(plain, config)
    got, _, got_report = prune(split, config)
    assert not is_dispatched(got) and all(p.device.type == "cpu" for p in got.parameters())
    assert got_report["per_layer"] == want_report["per_layer"] and got_report["params_after"] == want_report["params_after"]
    ids = torch.randint(0, 97, (2, 16), generator=torch.Generator().manual_seed(2))
    torch.testing.assert_close(got(ids).logits, want(ids).logits, rtol=1e-5, atol=1e-5)
    save_pruned(got, split.tokenizer, root / f"pruned-{method}", got_report)
    again = load_model(str(root / f"pruned-{method}"), device="cpu")
    torch.testing.assert_close(again.model(ids).logits, want(ids).logits, rtol=1e-5, atol=1e-5)


def test_empty_weights_touch_only_the_thread_that_asked():
    """Inside `empty_weights` this thread's new parameters are on meta and its buffers real; a
    parameter another thread assigns meanwhile stays real, and so does every one made afterwards."""
    import threading

    from pruner.dispatch import empty_weights

    inside, done = threading.Event(), threading.Event()
    made = {}

    def build():
        with empty_weights():
            made["empty"] = torch.nn.Linear(4, 3)
            made["empty"].register_buffer("table", torch.arange(3.0))
            inside.set()
            done.wait(10)

    worker = threading.Thread(target=build)
    worker.start()
    assert inside.wait(10)
    other = torch.nn.Linear(4, 3)  # this thread, while the other builds with empty weights
    other.weight = torch.nn.Parameter(torch.ones(3, 4))
    done.set()
    worker.join()
    assert made["empty"].weight.device.type == "meta" and made["empty"].table.device.type == "cpu"
    assert other.weight.device.type == "cpu" and other.bias.device.type == "cpu"
    assert torch.nn.Linear(2, 2).weight.device.type == "cpu"
