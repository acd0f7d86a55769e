"""A search across processes (torch.distributed, gloo on CPU): two ranks give one process's result
with the same total samples and seeds, only rank 0 writes, and a run resumes across world sizes."""

import json
import os
import socket
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from tiny_models import save_tiny, tiny_corpus, tiny_model

from pruner.adapters import adapter_for
from pruner.calibration import collect_input_stats, input_means
from pruner.pg.checkpoint import CHECKPOINT, load_checkpoint
from pruner.pg.config import PGConfig
from pruner.pg.run import PGRun
from pruner.space import PruningSpace

HERE = Path(__file__).resolve().parent
STEPS = 6


def make_search(run_dir, steps: int = STEPS) -> PGRun:
    """The same search in every process: K=3 masks on B=2 sequences (6 pairs, so two ranks split a
    mask's batch), bias compensation, 3 validation windows (split 2 + 1)."""
    model = tiny_model("llama")
    adapter = adapter_for(model)
    space = PruningSpace.from_model(model, adapter, "kv_group")
    g = torch.Generator().manual_seed(0)
    blocks = torch.randint(0, 97, (16, 12), generator=g)
    valid = torch.randint(0, 97, (3, 12), generator=g)
    holdout = torch.randint(0, 97, (3, 12), generator=g)
    fill = input_means(collect_input_stats(model, adapter, blocks[:4]))
    config = PGConfig(steps=steps, samples=3, sampling="independent", batch_size=2, seqlen=12, init="random",
                      eval_every=2, eval_windows=3,
                      snapshot_every=2, checkpoint_every=2, bias_compensation=True)
    return PGRun(model, adapter, space, 0.5, config, seed=0, blocks=blocks, valid=valid,
                 run_dir=Path(run_dir) if run_dir else None, fill=fill, holdout=holdout)


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def launch(world: int, root: Path, jobs: list) -> list[dict]:
    """`world` ranks of tests/distributed_worker.py with torchrun's environment; their reports."""
    port = free_port()
    procs = []
    for rank in range(world):
        env = dict(os.environ, RANK=str(rank), WORLD_SIZE=str(world), LOCAL_RANK=str(rank), LOCAL_WORLD_SIZE=str(world),
                   MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port), OMP_NUM_THREADS="1")
        procs.append(subprocess.Popen([sys.executable, str(HERE / "distributed_worker.py"), str(root), json.dumps(jobs)],
                                      env=env, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True))
    reports = []
    for proc in procs:
        out, err = proc.communicate(timeout=300)
        assert proc.returncode == 0, err[-3000:]
        reports.append(json.loads(out.strip().splitlines()[-1]))
    return reports


def assert_same_search(ckpt, whole: PGRun) -> None:
    torch.testing.assert_close(ckpt.s_h, whole.s_h, rtol=1e-6, atol=1e-9)
    torch.testing.assert_close(ckpt.s_c, whole.s_c, rtol=1e-6, atol=1e-9)
    assert ckpt.step == whole.step == STEPS
    got, want = ckpt.history["steps"], whole.history.read()["steps"]
    assert [r["step"] for r in got] == [r["step"] for r in want]
    torch.testing.assert_close(torch.tensor([r["losses"] for r in got]), torch.tensor([r["losses"] for r in want]),
                               rtol=1e-6, atol=1e-7)
    want_ppl = {e["step"]: e["ppl"] for e in whole.history.read()["evals"]}
    assert ckpt.history["evals"] and all(e["ppl"] == pytest.approx(want_ppl[e["step"]], rel=1e-6)
                                         for e in ckpt.history["evals"])  # (steps run by hand skip evaluations)


def test_two_ranks_equal_one_process_write_only_on_rank_0_and_resume_across_world_sizes(tmp_path):
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    try:
        whole = make_search(None)
        whole.run()
        half = make_search(tmp_path / "from1")  # one process runs 3 steps, two ranks finish it
        for _ in range(3):
            half.history.append("steps", half.do_step())
        half.checkpoint()
        reports = launch(2, tmp_path, [["run", str(tmp_path / "two"), STEPS, 0],
                                       ["run", str(tmp_path / "from1"), STEPS, 0],
                                       ["partial", str(tmp_path / "from2"), STEPS, 3]])
        resumed = make_search(tmp_path / "from2")  # two ranks ran 3 steps, one process finishes it
        assert resumed.load_checkpoint() and resumed.step == 3
        resumed.run()
    finally:
        torch.set_num_threads(threads)
    for name in ("two", "from1", "from2"):
        assert_same_search(load_checkpoint(tmp_path / name), whole)
    two = load_checkpoint(tmp_path / "two").history["evals"]
    assert [e["step"] for e in two] == [e["step"] for e in whole.history.read()["evals"]] == [2, 4, 6]
    assert [(r["rank"], r["world"]) for r in reports] == [(0, 2), (1, 2)]
    assert any(w.endswith(CHECKPOINT) for w in reports[0]["writes"]), reports  # the audit sees rank 0 checkpoint
    assert reports[1]["writes"] == []  # and nothing from rank 1


AUDIT = '''
import os, sys
_f = open(os.environ["AUDIT_LOG"] + "." + os.environ.get("RANK", "launcher"), "w", buffering=1)
def _audit(event, args):
    if event == "open" and isinstance(args[0], str) and isinstance(args[1], str) and set(args[1]) & set("wax+"):
        _f.write(args[0] + "\\n")
    elif event == "os.rename":
        _f.write(args[0] + "\\n" + args[1] + "\\n")
    elif event in ("os.mkdir", "os.remove", "os.rmdir"):
        _f.write(str(args[0]) + "\\n")
sys.addaudithook(_audit)
'''


def test_torchrun_prune_equals_one_process_and_only_rank_0_writes(tmp_path, capsys):
    """`torchrun --nproc_per_node 2 -m pruner prune --method pg` against `python -m pruner prune`."""
    from pruner.cli import main

    model = save_tiny(tmp_path / "tiny")
    text = tiny_corpus(tmp_path / "text.txt")
    args = ["prune", "--model", str(model), "--method", "pg", "--ratio", "0.5", "--data", str(text), "--steps", "4",
            "--samples", "3", "--sampling", "independent", "--batch-size", "2", "--seqlen", "16", "--eval-every", "2",
            "--eval-windows", "3", "--calib-windows", "4", "--json"]
    site = tmp_path / "site"
    site.mkdir()
    (site / "sitecustomize.py").write_text(AUDIT)
    env = dict(os.environ, PYTHONPATH=os.pathsep.join([str(site), str(HERE.parent)]), AUDIT_LOG=str(tmp_path / "audit"),
               OMP_NUM_THREADS="1", HF_HUB_OFFLINE="1")
    proc = subprocess.run([sys.executable, "-m", "torch.distributed.run", "--nproc_per_node", "2", "--master_port",
                           str(free_port()), "-m", "pruner", *args, "--out", str(tmp_path / "two")],
                          cwd=HERE.parent, env=env, capture_output=True, text=True, timeout=300)
    assert proc.returncode == 0, proc.stderr[-3000:]
    two = json.loads(proc.stdout.strip().splitlines()[-1])  # rank 0 alone prints
    assert two["world_size"] == 2 and len(proc.stdout.strip().splitlines()) == 1

    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    try:
        assert main([*args, "--out", str(tmp_path / "one")]) == 0
    finally:
        torch.set_num_threads(threads)
    one = json.loads(capsys.readouterr().out)
    assert two["pg"]["final_loss_mean"] == pytest.approx(one["pg"]["final_loss_mean"], rel=1e-6)
    assert [r["mlp_channels"] for r in two["per_layer"]] == [r["mlp_channels"] for r in one["per_layer"]]
    a, b = load_checkpoint(tmp_path / "two" / "run"), load_checkpoint(tmp_path / "one" / "run")
    torch.testing.assert_close(a.s_c, b.s_c, rtol=1e-6, atol=1e-9)
    assert (tmp_path / "two" / "model.safetensors").is_file()

    written = {rank: [line for line in (tmp_path / f"audit.{rank}").read_text().splitlines()
                      if line.startswith(str(tmp_path)) and "audit" not in line] for rank in (0, 1)}
    assert any(line.endswith(CHECKPOINT) for line in written[0]) and any("status.json" in line for line in written[0])
    assert written[1] == []
