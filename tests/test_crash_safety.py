"""A save killed at any step leaves the old or the new result whole, and the search resumable."""

import shutil
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from test_pg import make_run
from tiny_models import tiny_model

from pruner.adapters import adapter_for
from pruner.fileio import publish_dir, recover
from pruner.models import RUN_SUBDIR, load_pruned, prepare_output_dir, save_pruned
from pruner.slicing import sliced_copy
from pruner.space import PruningSpace

HERE = Path(__file__).parent

# A child process that saves `new` over `out` and is killed (os._exit: no cleanup runs) at the
# k-th directory rename of the publish, or while the old version is being removed (k = 4).
CHILD = """
import os, shutil, sys
sys.path.insert(0, {tests!r}); sys.path.insert(0, {root!r})
import torch
from pruner import fileio
from pruner.models import save_pruned
from test_crash_safety import models
k, calls = {k}, [0]
real_rename, real_rmtree = os.rename, shutil.rmtree
def rename(src, dst):
    calls[0] += 1
    if calls[0] == k:
        os._exit(9)
    real_rename(src, dst)
def rmtree(path, *args, **kwargs):
    if k == 4 and str(path).endswith(".pruner-old") and os.path.exists(path):
        os._exit(9)
    real_rmtree(path, *args, **kwargs)
fileio.os.rename, fileio.shutil.rmtree = rename, rmtree
save_pruned(models()[1], None, {out!r}, overwrite=True)
os._exit(0)
"""


def models():
    """Two different pruned versions of one tiny model: the old result and the new one."""
    model = tiny_model("llama")
    adapter = adapter_for(model)
    space = PruningSpace.from_model(model, adapter, "kv_group")
    from test_space_masking_slicing import random_mask

    return sliced_copy(model, adapter, space, random_mask(space, 4)), sliced_copy(model, adapter, space, random_mask(space, 5))


def logits(model):
    with torch.no_grad():
        return model(torch.arange(12).view(1, -1)).logits


@pytest.fixture(scope="module")
def original(tmp_path_factory):
    """`out/` with the old pruned model and a search's checkpoints in `out/run`."""
    out = tmp_path_factory.mktemp("original") / "out"
    run = make_run(steps=2, run_dir=out / RUN_SUBDIR)
    run.run()
    save_pruned(models()[0], None, out)
    return out


@pytest.mark.parametrize("k", [1, 2, 3, 4])
def test_a_save_killed_at_each_step_leaves_a_whole_result(k, original, tmp_path):
    out = tmp_path / "out"
    shutil.copytree(original, out)
    code = CHILD.format(tests=str(HERE), root=str(HERE.parent), k=k, out=str(out))
    proc = subprocess.run([sys.executable, "-c", code], timeout=300)
    assert proc.returncode == 9
    prepare_output_dir(out, overwrite=True)  # what the next command does first: recover
    old, new = models()
    got = logits(load_pruned(out, torch.float32))
    expected = logits(new) if k >= 3 else logits(old)  # the third rename publishes the new version
    torch.testing.assert_close(got, expected, rtol=0, atol=0)
    resumed = make_run(steps=2, run_dir=out / RUN_SUBDIR)
    assert resumed.load_checkpoint() and resumed.step == 2
    assert sorted(p.name for p in tmp_path.iterdir()) == ["out"]  # no hidden leftovers


def test_a_failed_build_leaves_the_old_version_and_no_temporaries(tmp_path):
    target = tmp_path / "thing"
    publish_dir(target, lambda folder: (folder / "a.txt").write_text("old"))

    def broken(folder):
        (folder / "a.txt").write_text("half")
        raise OSError("disk full")

    with pytest.raises(OSError):
        publish_dir(target, broken)
    assert (target / "a.txt").read_text() == "old"
    assert sorted(p.name for p in tmp_path.iterdir()) == ["thing"]


def test_recover_removes_only_our_leftovers(tmp_path):
    (tmp_path / ".out.pruner-partial-1234").mkdir()
    (tmp_path / ".out.pruner-old").mkdir()
    (tmp_path / ".other-hidden").mkdir()
    (tmp_path / "out").mkdir()
    recover(tmp_path / "out")
    assert sorted(p.name for p in tmp_path.iterdir()) == [".other-hidden", "out"]
