"""Writing to disk so that a crash never leaves half a result, and reading what we wrote safely.

- `write_text_atomically` / `write_json_atomically`: a temporary sibling, then `os.replace`.
- `publish_dir`: a whole directory built beside its target, then swapped in. At every instant the
  target (or, after a kill in the middle of the swap, a hidden sibling that `recover` puts back)
  holds either the old complete result or the new complete one.
- `read_json`: a file of ours as a dict, or a clear PrunerError when it is missing or damaged.
- `inside`: resolve a name inside a folder, refusing anything that would leave it.

Hidden siblings carry the marker `.pruner-` in their names, so `recover` removes only ours.
"""

from __future__ import annotations

import json
import os
import shutil
import tempfile
import uuid
from collections.abc import Callable
from pathlib import Path

from .errors import PrunerError

PARTIAL, NEW, OLD = "partial", "new", "old"


def write_text_atomically(path: Path, text: str) -> None:
    """Write `text` to a temporary sibling, flush it to disk, then rename it over `path`."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(f".{path.name}.pruner-{uuid.uuid4().hex[:8]}.tmp")
    try:
        with open(tmp, "w", encoding="utf-8") as f:
            f.write(text)
            f.flush()
            os.fsync(f.fileno())
        os.replace(tmp, path)
    finally:
        tmp.unlink(missing_ok=True)


def write_json_atomically(path: Path, obj) -> None:
    """`write_text_atomically` of `obj` as indented JSON."""
    write_text_atomically(path, json.dumps(obj, indent=2))


def read_json(path: Path, what: str) -> dict:
    """A JSON object from `path`; PrunerError naming `what` when missing, unreadable or not an object."""
    path = Path(path)
    try:
        obj = json.loads(path.read_text(encoding="utf-8"))
    except FileNotFoundError:
        raise PrunerError(f"no {what} at {path}") from None
    except (OSError, UnicodeDecodeError, json.JSONDecodeError) as exc:
        raise PrunerError(f"the {what} at {path} is damaged ({type(exc).__name__}): delete it or choose another") from None
    if not isinstance(obj, dict):
        raise PrunerError(f"the {what} at {path} is not a JSON object: delete it or choose another")
    return obj


def inside(root: Path, name: str, what: str = "name") -> Path:
    """`root / name` for a plain name of one path component; PrunerError for anything else
    (empty, absolute, `..`, separators, control characters): nothing outside `root` is reachable."""
    if (not name or name in (".", "..") or "/" in name or "\\" in name or os.sep in name
            or any(ord(ch) < 32 for ch in name) or name.startswith(".")):
        raise PrunerError(f"invalid {what} {name!r}: a plain name inside {root} is expected")
    return Path(root) / name


def _sibling(target: Path, kind: str) -> Path:
    return target.with_name(f".{target.name}.pruner-{kind}")


def recover(target: Path) -> None:
    """Finish or undo a `publish_dir` that a kill interrupted, and remove our stale temporaries.

    Without `target`: the complete new version is moved in, else the old one is moved back.
    With `target`: leftovers (a finished new version that lost the race, the old version) go.
    """
    target = Path(target)
    parent = target.parent
    if not parent.is_dir():
        return
    for path in parent.glob(f".{target.name}.pruner-{PARTIAL}-*"):
        shutil.rmtree(path, ignore_errors=True)
    new, old = _sibling(target, NEW), _sibling(target, OLD)
    if not target.exists():
        for candidate in (new, old):
            if candidate.is_dir():
                os.rename(candidate, target)
                break
    for leftover in (new, old):
        shutil.rmtree(leftover, ignore_errors=True)


def publish_dir(target: Path, build: Callable[[Path], None], keep: tuple[str, ...] = ()) -> Path:
    """Build a directory with `build(folder)` and publish it at `target` in one swap.

    Entries named in `keep` (e.g. a run's checkpoint folder) are copied from the old `target` into
    the new one before the swap, so the old result stays whole until the new one replaces it.
    Steps: partial folder -> rename to `.pruner-new` (complete) -> old target to `.pruner-old` ->
    `.pruner-new` to target -> old removed. `recover` completes any of them after a kill.
    """
    target = Path(target)
    target.parent.mkdir(parents=True, exist_ok=True)
    recover(target)
    partial = Path(tempfile.mkdtemp(prefix=f".{target.name}.pruner-{PARTIAL}-", dir=target.parent))
    try:
        partial.chmod(0o755)
        build(partial)
        for name in keep:
            if (target / name).is_dir():
                shutil.copytree(target / name, partial / name)
        os.rename(partial, _sibling(target, NEW))
    except BaseException:
        shutil.rmtree(partial, ignore_errors=True)
        raise
    if target.exists():
        os.rename(target, _sibling(target, OLD))
    os.rename(_sibling(target, NEW), target)
    shutil.rmtree(_sibling(target, OLD), ignore_errors=True)
    return target


def check_writable(folder: Path) -> None:
    """PrunerError unless files can be created in `folder` or, where it does not exist yet, in its
    nearest existing ancestor: a real write of a probe file, removed at once, so nothing is left."""
    folder = Path(folder).absolute()
    probe_in = folder
    while not probe_in.exists():
        probe_in = probe_in.parent
    if not probe_in.is_dir():
        raise PrunerError(f"cannot create {folder}: {probe_in} is a file, not a folder")
    try:
        with tempfile.NamedTemporaryFile(dir=probe_in, prefix=".pruner-probe-"):
            pass
    except OSError as exc:
        raise PrunerError(f"cannot write to {folder} ({exc.strerror or type(exc).__name__}): choose another location") from None
