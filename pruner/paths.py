"""Where prepared assets live: the embedded model, the embedded corpus, run directories."""

import os
from pathlib import Path

REPO_ROOT = Path(__file__).resolve().parent.parent


def cache_dir() -> Path:
    """Root of prepared assets: $PRUNER_CACHE, else `<repo>/.cache` (git-ignored)."""
    return Path(os.environ.get("PRUNER_CACHE", REPO_ROOT / ".cache"))


def embedded_model_dir() -> Path:
    """The embedded SmolLM2-135M-Instruct, converted once to fp32 safetensors."""
    return cache_dir() / "models" / "smollm2-135m-instruct"


def brown_dir() -> Path:
    """The prepared Brown corpus: train.txt, validation.txt, test.txt, manifest.json."""
    return cache_dir() / "corpora" / "brown"


def downloads_dir() -> Path:
    """Package archives fetched from registries during setup (npm pack output)."""
    return cache_dir() / "downloads"


def runs_dir() -> Path:
    """Where the studio keeps its runs: $PRUNER_RUNS_DIR, else `<repo>/runs` (git-ignored)."""
    return Path(os.environ.get("PRUNER_RUNS_DIR", REPO_ROOT / "runs"))
