"""The layering of ARCHITECTURE.md, checked on the source: no import cycle, pure math stays pure,
per-architecture names stay in the adapters, nothing unpickles."""

import ast
import re
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
PACKAGE = ROOT / "pruner"
PURE = {"pruner.pg_math", "pruner.budget", "pruner.scores", "pruner.sparsity_masks", "pruner.reconstruction",
        "pruner.probe_math", "pruner.space", "pruner.errors"}


def module_name(path: Path) -> str:
    parts = path.relative_to(ROOT).with_suffix("").parts
    return ".".join(parts[:-1] if parts[-1] == "__init__" else parts)


MODULES = {module_name(p): p for p in PACKAGE.rglob("*.py")}


def imports(name: str) -> set[str]:
    """Every module this one imports, at any depth of the file (function-level imports count)."""
    path = MODULES[name]
    package = name if path.name == "__init__.py" else name.rpartition(".")[0]
    found = set()
    for node in ast.walk(ast.parse(path.read_text())):
        if isinstance(node, ast.Import):
            found |= {a.name for a in node.names}
        elif isinstance(node, ast.ImportFrom):
            base = node.module or ""
            if node.level:
                anchor = package.split(".")
                anchor = anchor[: len(anchor) - (node.level - 1)]
                base = ".".join(anchor + ([node.module] if node.module else []))
            submodules = {f"{base}.{a.name}" for a in node.names if f"{base}.{a.name}" in MODULES}
            found |= submodules
            if len(submodules) < len(node.names):  # names from the module itself, not its submodules
                found.add(base)
    return found


def internal(name: str) -> set[str]:
    return {m for m in imports(name) if m in MODULES and m != name}


def test_there_is_no_import_cycle():
    graph = {name: internal(name) for name in MODULES}
    state: dict[str, int] = {}

    def visit(node: str, stack: list[str]) -> None:
        state[node] = 1
        for nxt in graph[node]:
            assert state.get(nxt) != 1, "import cycle: " + " -> ".join(stack[stack.index(nxt):] + [node, nxt])
            if nxt not in state:
                visit(nxt, stack + [node])
        state[node] = 2

    for name in graph:
        if name not in state:
            visit(name, [])


def test_pure_math_imports_only_torch_and_other_pure_modules():
    for name in PURE & MODULES.keys():
        for dep in internal(name):
            assert dep in PURE or dep.startswith("pruner.adapters"), f"{name} imports {dep}"
        third_party = {m.split(".")[0] for m in imports(name)} - {"pruner", "torch", "math", "itertools",
                                                                   "dataclasses", "__future__", "collections", "typing", "re"}
        assert not third_party, f"{name} imports {third_party}"


def test_the_library_never_imports_the_ui_or_the_tests():
    for name in MODULES:
        roots = {m.split(".")[0] for m in imports(name)}
        assert not roots & {"streamlit", "app_pages", "tests"}, name


def test_architecture_names_live_in_the_adapters():
    pattern = re.compile(r"\.(self_attn|o_proj|down_proj|q_proj|k_proj|v_proj|gate_proj|up_proj|num_key_value_groups)\b")
    for name, path in MODULES.items():
        if name == "pruner.adapters":
            continue
        hits = [line for line in path.read_text().splitlines() if pattern.search(line.split("#")[0])]
        assert not hits, f"{name} reaches into modules by name: {hits[:3]}"


def test_nothing_unpickles():
    for name, path in MODULES.items():
        text = path.read_text()
        assert "pickle" not in text.replace("pickled", "").replace("pickles", "") or name == "pruner.pg.checkpoint", name
        assert "torch.load" not in text, name
        assert "weights_only=False" not in text, name
