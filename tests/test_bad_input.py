"""Every bad input is a clear one-line error: exit status 2, exactly one `error: ...` line on
stderr (no traceback, no progress bar, no library warning), nothing on stdout, and nothing left
behind (no --out folder, no hidden `.pruner-*` temporaries, a folder that was there unchanged to
the byte). Files a user did not write (pickles, damaged checkpoints) run nothing.

The table is run in-process through the product's entry point `pruner.cli.main(argv)`; a few rows
also run as a real `python -m pruner` process. Models are tiny random-weight checkpoints saved to
temporary folders (tests/tiny_models.py); a few rows marked `needs_embedded` use the embedded model.
"""

from __future__ import annotations

import json
import os
import pickle
import shutil
import stat
import subprocess
import sys
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path

import pytest
import torch

from pruner.cli import main
from pruner.paths import embedded_model_dir

REPO = Path(__file__).resolve().parent.parent
HAS_EMBEDDED = (embedded_model_dir() / "config.json").is_file()
needs_embedded = pytest.mark.skipif(not HAS_EMBEDDED, reason="embedded model not prepared (make test prepares it)")
UNREACHABLE_HUB = "https://192.0.2.1"  # TEST-NET-1 (RFC 5737): never routed, a connect can only time out or fail


class Exploit:
    """Unpickling this creates the file at `path`: proof that code from the pickle ran."""

    def __init__(self, path: str):
        self.path = path

    def __reduce__(self):
        return (open, (self.path, "w"))


# ---- shared, read-only fixtures -----------------------------------------------------------------

@pytest.fixture(scope="module")
def shared(tmp_path_factory) -> Path:
    """A tiny model, a tiny pruned model and a text long enough for a few windows."""
    from tiny_models import save_tiny

    from pruner.config import PruneConfig
    from pruner.models import load_model, save_pruned
    from pruner.prune import prune

    torch.set_num_threads(1)
    root = tmp_path_factory.mktemp("shared")
    save_tiny(root / "tiny")
    loaded = load_model(str(root / "tiny"), device="cpu")
    pruned, _, report = prune(loaded, PruneConfig(method="magnitude", ratio=0.3))
    save_pruned(pruned, loaded.tokenizer, root / "pruned", report)
    words = "the quick brown fox jumps over the lazy dog while seven wise owls watch from the old oak tree".split()
    (root / "text.txt").write_text(" ".join(words[i % len(words)] for i in range(3000)) + "\n")
    return root


# ---- what a case may prepare in its own folder -------------------------------------------------

def model_copy(shared: Path, tmp: Path, name: str = "model") -> Path:
    return Path(shutil.copytree(shared / "tiny", tmp / name))


def truncated_weights(shared, tmp):
    weights = model_copy(shared, tmp) / "model.safetensors"
    weights.write_bytes(weights.read_bytes()[: weights.stat().st_size // 2])


def garbage_weights(shared, tmp):
    (model_copy(shared, tmp) / "model.safetensors").write_bytes(os.urandom(4096))


def empty_weights(shared, tmp):
    (model_copy(shared, tmp) / "model.safetensors").write_bytes(b"")


def no_weights(shared, tmp):
    (model_copy(shared, tmp) / "model.safetensors").unlink()


def pickle_weights_only(shared, tmp):
    """Only a pickled `pytorch_model.bin` whose unpickling would create the marker."""
    folder = model_copy(shared, tmp)
    (folder / "model.safetensors").unlink()
    (folder / "pytorch_model.bin").write_bytes(pickle.dumps({"w": Exploit(str(tmp / "marker"))}))


def config_not_json(shared, tmp):
    (model_copy(shared, tmp) / "config.json").write_text("{ this is not json")


def config_a_list(shared, tmp):
    (model_copy(shared, tmp) / "config.json").write_text("[1, 2, 3]")


def remote_code(source: str) -> Callable:
    """A folder whose config needs code shipped with it: a model type transformers does not know
    and an `auto_map` to `evil.py`, which would create the marker if it were ever imported."""
    def setup(shared, tmp):
        folder = Path(shutil.copytree(shared / source, tmp / "model"))
        config = json.loads((folder / "config.json").read_text())
        config["model_type"] = "evil_llama"
        config["auto_map"] = {"AutoConfig": "evil.EvilConfig", "AutoModelForCausalLM": "evil.EvilModel"}
        (folder / "config.json").write_text(json.dumps(config))
        (folder / "evil.py").write_text(f"open({str(tmp / 'marker')!r}, 'w').close()\n")
    return setup


def tokenizer_garbage(shared, tmp):
    (model_copy(shared, tmp) / "tokenizer.json").write_text("not a tokenizer")


def gpt2_model(shared, tmp):
    from transformers import GPT2Config, GPT2LMHeadModel

    torch.manual_seed(0)
    GPT2LMHeadModel(GPT2Config(n_layer=1, n_embd=16, n_head=2, vocab_size=50)).save_pretrained(tmp / "model")


def pruned_copy(shared, tmp):
    shutil.copytree(shared / "pruned", tmp / "out")


def pruned_mismatch(shared, tmp):
    """A pruned folder whose weights belong to the dense model: they do not match the layout."""
    shutil.copytree(shared / "pruned", tmp / "model")
    shutil.copy(shared / "tiny" / "model.safetensors", tmp / "model" / "model.safetensors")


def a_file(name: str) -> Callable:
    def setup(shared, tmp):
        (tmp / name).write_text("I am a file\n")
    return setup


def text_file(content: bytes, name: str = "data.txt") -> Callable:
    def setup(shared, tmp):
        (tmp / name).write_bytes(content)
    return setup


def an_empty_dir(name: str) -> Callable:
    def setup(shared, tmp):
        (tmp / name).mkdir()
    return setup


def unwritable_dir(shared, tmp):
    (tmp / "locked").mkdir()
    (tmp / "locked").chmod(stat.S_IRUSR | stat.S_IXUSR)


def legacy_pickle_checkpoint(shared, tmp):
    run = tmp / "run"
    run.mkdir()
    (run / "checkpoint.pt").write_bytes(pickle.dumps({"settings": Exploit(str(tmp / "marker"))}))


def checkpoint(shared, tmp, **changes) -> Path:
    """A well-formed checkpoint of a search on the tiny model, with `changes` to its fields."""
    from pruner.config import PruneConfig
    from pruner.pg.checkpoint import Checkpoint, save_checkpoint

    config = PruneConfig(method="pg", ratio=0.3, data=str(shared / "text.txt"))
    fields = dict(step=1, s_h=torch.full((6,), 0.7, dtype=torch.float64),
                  s_c=torch.full((120,), 0.7, dtype=torch.float64), baseline=None,
                  generator=torch.Generator().manual_seed(0).get_state(), config=config.to_dict()["pg"],
                  ratio=0.3, seed=0, settings={"model": str(shared / "tiny"), **config.to_dict()})
    return save_checkpoint(tmp / "run", Checkpoint(**(fields | changes)))


def damaged_checkpoint(damage: str) -> Callable:
    def setup(shared, tmp):
        from safetensors.torch import save_file

        path = checkpoint(shared, tmp)
        if damage == "truncated":
            path.write_bytes(path.read_bytes()[: path.stat().st_size // 2])
        elif damage == "garbage":
            path.write_bytes(os.urandom(2048))
        elif damage == "empty":
            path.write_bytes(b"")
        elif damage == "no metadata":
            save_file({"s_h": torch.zeros(6, dtype=torch.float64)}, str(path))
        elif damage == "wrong metadata":
            save_file({"s_h": torch.zeros(6, dtype=torch.float64)}, str(path),
                      metadata={"pruner_checkpoint": json.dumps({"format": 1, "step": "two"})})
        elif damage == "metadata not json":
            save_file({"s_h": torch.zeros(6, dtype=torch.float64)}, str(path),
                      metadata={"pruner_checkpoint": "{not json"})
        elif damage == "probabilities out of range":
            checkpoint(shared, tmp, s_h=torch.full((6,), 3.0, dtype=torch.float64))
        elif damage == "unknown settings":
            checkpoint(shared, tmp, settings={"model": str(shared / "tiny"), "method": "pg", "rm_rf": True})
        elif damage == "bad ratio in settings":
            from pruner.config import PruneConfig

            settings = PruneConfig(method="pg").to_dict() | {"ratio": 7.0}
            checkpoint(shared, tmp, settings={"model": str(shared / "tiny"), **settings})
        elif damage == "model of settings missing":
            from pruner.config import PruneConfig

            settings = PruneConfig(method="pg", data=str(shared / "text.txt")).to_dict()
            checkpoint(shared, tmp, settings={"model": str(tmp / "gone"), **settings})
        else:
            raise ValueError(damage)
    return setup


# ---- the table ----------------------------------------------------------------------------------

@dataclass(frozen=True)
class Case:
    """argv may name {tiny} (a tiny model), {pruned} (a tiny pruned model), {text} (a long
    enough text file), all shared and read-only, and {tmp}, the case's own folder (the current
    directory while it runs), which `setup(shared, tmp)` prepares. `message`: a fragment of the
    one line on stderr that says what went wrong."""

    id: str
    argv: tuple[str, ...]
    message: str
    setup: Callable | None = None
    env: dict = field(default_factory=dict)
    embedded: bool = False
    skip: str | None = None  # why this row cannot run here


def case(id, argv: str | tuple, message, setup=None, env=None, embedded=False, skip: str | None = None) -> Case:
    """A row; `argv` a string split on spaces, or a tuple for arguments that hold spaces."""
    return Case(id, argv if isinstance(argv, tuple) else tuple(argv.split()), message, setup, env or {}, embedded,
                skip)


PRUNE = "prune --model {tiny} --data {text} --out {tmp}/out"
PG = PRUNE + " --method pg --ratio 0.3 --steps 2"
OFFLINE = {"HF_HUB_OFFLINE": "1"}

CASES = [
    # -- model folders ------------------------------------------------------------------------------
    case("truncated weights: info", "info --model {tmp}/model", "could not load", truncated_weights),
    case("truncated weights: eval", "eval --model {tmp}/model --data {text}", "could not load", truncated_weights),
    case("truncated weights: prune", "prune --model {tmp}/model --ratio 0.3 --out {tmp}/out", "could not load",
         truncated_weights),
    case("truncated weights: generate", "generate --model {tmp}/model --prompt hello", "could not load",
         truncated_weights),
    case("garbage weights: info", "info --model {tmp}/model", "could not load", garbage_weights),
    case("garbage weights: eval", "eval --model {tmp}/model --data {text}", "could not load", garbage_weights),
    case("garbage weights: prune", "prune --model {tmp}/model --ratio 0.3 --out {tmp}/out", "could not load",
         garbage_weights),
    case("garbage weights: generate", "generate --model {tmp}/model --prompt hello", "could not load",
         garbage_weights),
    case("empty weights file", "info --model {tmp}/model", "could not load", empty_weights),
    case("no weights at all", "info --model {tmp}/model", "could not load", no_weights),
    case("only pickled weights", "info --model {tmp}/model", "only pickled weights", pickle_weights_only),
    case("config.json not JSON", "info --model {tmp}/model", "could not load", config_not_json),
    case("config.json a list", "info --model {tmp}/model", "could not load", config_a_list),
    case("model needs remote code", "info --model {tmp}/model", "--trust-remote-code", remote_code("tiny")),
    case("pruned model needs remote code", "info --model {tmp}/model", "--trust-remote-code", remote_code("pruned")),
    case("tokenizer garbage", "info --model {tmp}/model", "could not load", tokenizer_garbage),
    case("unsupported architecture", "info --model {tmp}/model", "unsupported architecture", gpt2_model),
    case("pruned weights do not match layout", "info --model {tmp}/model", "do not match", pruned_mismatch),
    case("model dir without config", "info --model {tmp}/empty", "no config.json", an_empty_dir("empty")),
    case("model path missing", "info --model {tmp}/no/such/model", "no model directory"),
    case("model path is a file", "info --model {tmp}/model.txt", "no model directory", a_file("model.txt")),
    case("hub id offline", "info --model someorg/some-model", "could not load 'someorg/some-model'", env=OFFLINE),
    case("hub id unreachable", "info --model someorg/some-model", "unreachable",
         env={"HF_HUB_OFFLINE": None, "HF_ENDPOINT": UNREACHABLE_HUB}),
    case("model name not a hub id", "info --model not-a-model", "unknown model"),
    # -- device and dtype ---------------------------------------------------------------------------
    case("device tpu", "info --model {tiny} --device tpu", "unknown device 'tpu'"),
    case("device cpu:0", "eval --model {tiny} --data {text} --device cpu:0", "unknown device"),
    case("device cuda without CUDA", "info --model {tiny} --device cuda", "no CUDA device",
         skip="CUDA is available here" if torch.cuda.is_available() else None),
    case("device cuda:99", "info --model {tiny} --device cuda:99", "CUDA device"),
    case("dtype int4", "info --model {tiny} --dtype int4", "int4"),
    case("granularity bogus: info", "info --model {tiny} --granularity neuron", "unknown granularity"),
    # -- output folders -----------------------------------------------------------------------------
    case("out below a file", "prune --model {tiny} --ratio 0.3 --out {tmp}/file.txt/out", "is a file",
         a_file("file.txt")),
    case("out in /proc", "prune --model {tiny} --ratio 0.3 --out /proc/pruner-out", "cannot write"),
    case("out in a read-only folder", "prune --model {tiny} --ratio 0.3 --out {tmp}/locked/out", "cannot write",
         unwritable_dir, skip="root writes into read-only folders" if os.geteuid() == 0 else None),
    case("out is a file", "prune --model {tiny} --ratio 0.3 --out {tmp}/file.txt", "not a directory",
         a_file("file.txt")),
    case("out holds an earlier pruned model", "prune --model {tiny} --ratio 0.3 --out {tmp}/out", "--overwrite",
         pruned_copy),
    case("out holds someone else's files", "prune --model {tiny} --ratio 0.3 --out {tmp}", "--overwrite",
         a_file("notes.txt")),
    case("run-dir is a file", PG + " --run-dir {tmp}/file.txt", "is a file", a_file("file.txt")),
    case("run-dir below a file", PG + " --run-dir {tmp}/file.txt/run", "is a file", a_file("file.txt")),
    case("run-dir without pg", PRUNE + " --ratio 0.3 --run-dir {tmp}/run", "--method pg"),
    case("wanda-sp statistics for another method", PRUNE + " --ratio 0.3 --wanda-sp-stats sequential", "--method wanda-sp"),
    case("refit damping without a refit", PRUNE + " --ratio 0.3 --refit-damp 0.1", "--reconstruct ls or admm"),
    case("negative refit damping", PRUNE + " --ratio 0.3 --reconstruct ls --refit-damp -1", "damping must lie"),
    # -- pruning settings ---------------------------------------------------------------------------
    case("ratio missing", PRUNE, "--ratio is required"),
    case("ratio 0", PRUNE + " --ratio 0", "between 0 and 1"),
    case("ratio 1", PRUNE + " --ratio 1", "between 0 and 1"),
    case("ratio -0.1", PRUNE + " --ratio -0.1", "between 0 and 1"),
    case("ratio 1.5", PRUNE + " --ratio 1.5", "between 0 and 1"),
    case("ratio nan", PRUNE + " --ratio nan", "between 0 and 1"),
    case("ratio inf", PRUNE + " --ratio inf", "between 0 and 1"),
    case("ratio not a number", PRUNE + " --ratio lots", "invalid float value"),
    case("unknown method", PRUNE + " --ratio 0.3 --method oracle", "unknown method"),
    case("unknown granularity", PRUNE + " --ratio 0.3 --granularity neuron", "unknown granularity"),
    case("lr inf", PG + " --lr inf", "lr=inf"),
    case("lr nan", PG + " --lr nan", "lr=nan"),
    case("lr 0", PG + " --lr 0", "lr=0"),
    case("penalty inf", PG + " --penalty inf", "penalty=inf"),
    case("samples 1", PG + " --samples 1", "samples=1"),
    case("steps 0", PRUNE + " --method pg --ratio 0.3 --steps 0", "steps=0"),
    case("prob floor 0.6", PG + " --prob-floor 0.6", "prob_floor=0.6"),
    case("init bogus", PG + " --init bogus", "invalid choice"),
    case("calib-windows 0", PRUNE + " --ratio 0.3 --method flap --calib-windows 0", "at least one window"),
    case("seed not an integer", PRUNE + " --ratio 0.3 --seed 1.5", "invalid int value"),
    case("unknown flag", PRUNE + " --ratio 0.3 --fast", "unrecognized arguments"),
    case("out missing", "prune --model {tiny} --ratio 0.3", "--out"),
    case("no command", "", "command"),
    case("unknown command", "shrink --model {tiny}", "invalid choice"),
    # -- evaluation settings and texts --------------------------------------------------------------
    case("eval seqlen 1", "eval --model {tiny} --data {text} --seqlen 1", "--seqlen must be at least 2"),
    case("eval seqlen beyond max positions", "eval --model {tiny} --data {text} --seqlen 4096", "at most 128"),
    case("eval max-windows 0", "eval --model {tiny} --data {text} --max-windows 0", "--max-windows"),
    case("eval batch-size 0", "eval --model {tiny} --data {text} --batch-size 0", "--batch-size"),
    case("text of NUL bytes", "eval --model {tiny} --data {tmp}/data.txt", "NUL", text_file(b"\x00" * 4096)),
    case("text not UTF-8", "eval --model {tiny} --data {tmp}/data.txt", "not a UTF-8",
         text_file("caf\u00e9 ".encode("latin-1") * 500)),
    case("empty text", "eval --model {tiny} --data {tmp}/data.txt", "empty", text_file(b"")),
    case("blank text", "eval --model {tiny} --data {tmp}/data.txt", "empty", text_file(b" \n\n \t\n" * 50)),
    case("text too short", "eval --model {tiny} --data {tmp}/data.txt --seqlen 64", "too short",
         text_file(b"Only a few words here.")),
    case("corpus file missing", "eval --model {tiny} --data {tmp}/missing.txt", "no text file"),
    case("corpus is a folder", "eval --model {tiny} --data {tmp}/texts", "a folder", an_empty_dir("texts")),
    case("unknown corpus name", "eval --model {tiny} --data wikitext103", "unknown corpus"),
    case("split bogus", "eval --model {tiny} --data {text} --split bogus", "invalid choice"),
    case("calibration text of NUL bytes", PRUNE + " --ratio 0.3 --method flap --data {tmp}/data.txt", "NUL",
         text_file(b"\x00" * 4096)),
    case("calibration text too short", PG + " --data {tmp}/data.txt", "too short", text_file(b"a few words")),
    case("wikitext2 offline", "eval --model {tiny} --data wikitext2", "offline mode is set", env=OFFLINE),
    case("c4 offline", "eval --model {tiny} --data c4", "offline mode is set", env=OFFLINE),
    case("wikitext2 hub unreachable", "eval --model {tiny} --data wikitext2", "unreachable",
         env={"HF_HUB_OFFLINE": None, "HF_DATASETS_OFFLINE": None, "HF_ENDPOINT": UNREACHABLE_HUB}),
    case("c4 for pruning offline", PRUNE + " --ratio 0.3 --method flap --data c4", "offline mode is set",
         env=OFFLINE),
    # -- generation ---------------------------------------------------------------------------------
    case("empty prompt", "generate --model {tiny} --prompt=", "--prompt is empty"),
    case("blank prompt", ("generate", "--model", "{tiny}", "--prompt", "   "), "--prompt is empty"),
    case("max-new-tokens 0", "generate --model {tiny} --prompt hello --max-new-tokens 0", "at least 1"),
    case("max-new-tokens negative", "generate --model {tiny} --prompt hello --max-new-tokens -5", "at least 1"),
    case("max-new-tokens beyond the context", "generate --model {tiny} --prompt hello --max-new-tokens 100000",
         "at most 128"),
    # -- resuming a search --------------------------------------------------------------------------
    case("resume a folder without checkpoint", "prune --resume {tmp}/run --out {tmp}/out", "no checkpoint",
         an_empty_dir("run")),
    case("resume a missing folder", "prune --resume {tmp}/run --out {tmp}/out", "no run folder"),
    case("resume a file", "prune --resume {tmp}/file.txt --out {tmp}/out", "no run folder", a_file("file.txt")),
    case("resume a pickled checkpoint", "prune --resume {tmp}/run --out {tmp}/out", "pickle",
         legacy_pickle_checkpoint),
    *[case(f"resume a checkpoint: {damage}", "prune --resume {tmp}/run --out {tmp}/out", message,
           damaged_checkpoint(damage))
      for damage, message in [("truncated", "damaged"), ("garbage", "damaged"), ("empty", "damaged"),
                              ("no metadata", "damaged"), ("wrong metadata", "damaged"),
                              ("metadata not json", "damaged"), ("probabilities out of range", "outside [0, 1]"),
                              ("unknown settings", "not usable (unknown settings ['rm_rf'])"),
                              ("bad ratio in settings", "between 0 and 1"),
                              ("model of settings missing", "which cannot be used here: no model directory")]],
    # -- the embedded model -------------------------------------------------------------------------
    case("embedded: eval seqlen beyond max positions", "eval --model embedded --seqlen 9000", "at most 8192",
         embedded=True),
    case("embedded: generate beyond the context", "generate --prompt hello --max-new-tokens 9000", "at most 8192",
         embedded=True),
    case("embedded: prune into an earlier pruned model", "prune --ratio 0.3 --out {tmp}/out", "--overwrite",
         pruned_copy, embedded=True),
]

# rows that also run as a real `python -m pruner` process
SUBPROCESS = ["garbage weights: prune", "dtype int4", "resume a pickled checkpoint"]


# ---- running a case -----------------------------------------------------------------------------

def snapshot(root: Path) -> dict:
    """Every entry under root: its kind, permission bits and (for files) bytes."""
    out = {}
    for path in sorted(root.rglob("*")):
        st = path.lstat()
        out[str(path.relative_to(root))] = (stat.S_IFMT(st.st_mode), stat.S_IMODE(st.st_mode),
                                            path.read_bytes() if path.is_file() and not path.is_symlink() else None)
    return out


def fill(argv: tuple[str, ...], shared: Path, tmp: Path) -> list[str]:
    names = {"tiny": shared / "tiny", "pruned": shared / "pruned", "text": shared / "text.txt", "tmp": tmp}
    return [arg.format(**names) for arg in argv]


def prepared(c: Case, shared: Path, tmp_path: Path, monkeypatch) -> tuple[list[str], dict, dict]:
    if c.embedded and not HAS_EMBEDDED:
        pytest.skip("embedded model not prepared (make test prepares it)")
    if c.skip:
        pytest.skip(c.skip)
    tmp = tmp_path / "case"
    tmp.mkdir()
    if c.setup:
        c.setup(shared, tmp)
    monkeypatch.chdir(tmp)
    for name, value in c.env.items():
        if value is None:
            monkeypatch.delenv(name, raising=False)
        else:
            monkeypatch.setenv(name, value)
    return fill(c.argv, shared, tmp), snapshot(tmp), snapshot(shared)


def check_outcome(c: Case, code: int, out: str, err: str, tmp: Path, before: dict, shared: Path,
                  shared_before: dict) -> None:
    lines = err.splitlines()
    assert code == 2, f"exit {code}; stderr:\n{err[-3000:]}"
    assert out == "", f"stdout: {out!r}"
    assert len(lines) == 1 and lines[0].startswith("error: "), f"stderr is not one error line:\n{err[-3000:]}"
    assert c.message in lines[0], f"{c.message!r} not in {lines[0]!r}"
    assert "Traceback" not in err
    assert not (tmp / "marker").exists(), "code from a file on disk ran"
    after = snapshot(tmp)
    assert after == before, f"the case's folder changed: {sorted(set(after) ^ set(before)) or 'contents'}"
    assert snapshot(shared) == shared_before


@pytest.mark.parametrize("c", CASES, ids=[c.id for c in CASES])
def test_bad_input_is_one_clear_line_and_leaves_nothing(c, shared, tmp_path, monkeypatch, capfd):
    argv, before, shared_before = prepared(c, shared, tmp_path, monkeypatch)
    capfd.readouterr()
    code = main(argv)
    out, err = capfd.readouterr()
    check_outcome(c, code, out, err, tmp_path / "case", before, shared, shared_before)


@pytest.mark.parametrize("c", [c for c in CASES if c.id in SUBPROCESS], ids=SUBPROCESS)
def test_the_real_process_behaves_the_same(c, shared, tmp_path, monkeypatch):
    argv, before, shared_before = prepared(c, shared, tmp_path, monkeypatch)
    env = dict(os.environ, HF_HUB_OFFLINE="1", PYTHONPATH=str(REPO))
    proc = subprocess.run([sys.executable, "-m", "pruner", *argv], cwd=tmp_path / "case", env=env,
                          capture_output=True, text=True, timeout=300)
    check_outcome(c, proc.returncode, proc.stdout, proc.stderr, tmp_path / "case", before, shared, shared_before)


def test_a_successful_command_keeps_its_progress_and_warnings_and_the_libraries_their_settings(
        shared, tmp_path, monkeypatch, capfd):
    """Quiet only where it must be: our progress bar shows, a warning comes after the work, and
    transformers' own settings are as they were once main() returns."""
    import warnings

    from transformers.utils import logging as hf_logging

    from pruner import cli

    monkeypatch.chdir(tmp_path)
    verbosity, bars = hf_logging.get_verbosity(), hf_logging.is_progress_bar_enabled()

    def eval_with_a_warning(args):
        warnings.warn("a library warning", UserWarning)
        return original(args)

    original = cli.COMMANDS["eval"]
    monkeypatch.setitem(cli.COMMANDS, "eval", eval_with_a_warning)
    assert main(["eval", "--model", str(shared / "tiny"), "--data", str(shared / "text.txt"), "--seqlen", "32",
                 "--json"]) == 0
    out, err = capfd.readouterr()
    assert json.loads(out)["seqlen"] == 32
    assert "perplexity" in err and "Loading weights" not in err
    assert err.rindex("perplexity") < err.index("UserWarning: a library warning")  # after the work
    assert main(["info", "--model", str(shared / "tiny"), "--granularity", "neuron"]) == 2
    assert (hf_logging.get_verbosity(), hf_logging.is_progress_bar_enabled()) == (verbosity, bars)


def test_the_table_is_large_enough():
    assert len(CASES) >= 50 and len({c.id for c in CASES}) == len(CASES)


HUB_CHECK = """
import json, sys, threading, time
from pruner.cli import main

for corpus in ("wikitext2", "c4"):
    result = {}
    argv = ["eval", "--model", sys.argv[1], "--data", corpus]
    thread = threading.Thread(target=lambda: result.update(code=main(argv)), daemon=True)
    start = time.monotonic()
    thread.start()
    thread.join(5.0)
    print(json.dumps({"corpus": corpus, "alive": thread.is_alive(), "seconds": time.monotonic() - start, **result}))
    sys.stdout.flush()
"""


def test_hub_corpora_without_the_hub_fail_within_5_seconds(shared, tmp_path):
    """No hub (an endpoint that is never routed, and no HF_HUB_OFFLINE to say so): one quick
    reachability check, then the error, not the datasets library's half minute of retries.
    A fresh process, so that the hub libraries read this environment when they are imported;
    the 5 s count from the call of main(), after the process has imported the CLI."""
    env = {k: v for k, v in os.environ.items()
           if k not in ("HF_HUB_OFFLINE", "TRANSFORMERS_OFFLINE", "HF_DATASETS_OFFLINE")}
    env.update(HF_ENDPOINT=UNREACHABLE_HUB, PYTHONPATH=str(REPO))
    proc = subprocess.run([sys.executable, "-c", HUB_CHECK, str(shared / "tiny")], cwd=tmp_path, env=env,
                          capture_output=True, text=True, timeout=300)
    outcomes = [json.loads(line) for line in proc.stdout.splitlines()]
    for outcome in outcomes:
        assert not outcome["alive"], f"{outcome['corpus']}: still trying after {outcome['seconds']:.1f} s"
        assert outcome["code"] == 2
    lines = proc.stderr.splitlines()
    assert len(outcomes) == 2 and len(lines) == 2, proc.stderr
    for corpus, line in zip(("wikitext2", "c4"), lines):
        assert line.startswith(f"error: cannot load {corpus!r}") and "unreachable" in line and "brown" in line
    assert list(tmp_path.iterdir()) == []
