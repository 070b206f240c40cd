"""The tree is the architecture: who may import whom, where ONNX Runtime sessions are made, no import cycles.

Read from the source with `ast` (imports inside functions count too; `if TYPE_CHECKING:` blocks do not).
"""

from __future__ import annotations

import ast
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
PACKAGES = (
    "imgtxt",
    "image_encoder_service",
    "text_encoder_service",
    "store",
    "indexer",
    "search",
    "search_service",
    "evaluation",
    "demo",
    "trainer",
)


def _modules() -> dict[str, Path]:
    out = {}
    for package in PACKAGES:
        for path in sorted((ROOT / package).rglob("*.py")):
            if "v1" in path.relative_to(ROOT).parts:  # generated stubs
                continue
            parts = list(path.relative_to(ROOT).with_suffix("").parts)
            if parts[-1] == "__init__":
                parts.pop()
            out[".".join(parts)] = path
    return out


MODULES = _modules()


def _is_type_checking(node: ast.If) -> bool:
    return isinstance(node.test, ast.Name) and node.test.id == "TYPE_CHECKING"


def _imports(path: Path) -> set[str]:
    """Our modules that `path` imports (resolved to the longest known module name)."""
    found: set[str] = set()

    def visit(node: ast.AST) -> None:
        if isinstance(node, ast.If) and _is_type_checking(node):
            return
        names: list[str] = []
        if isinstance(node, ast.Import):
            names = [a.name for a in node.names]
        elif isinstance(node, ast.ImportFrom) and node.module and node.level == 0:
            names = [f"{node.module}.{a.name}" for a in node.names] + [node.module]
        for name in names:
            parts = name.split(".")
            for n in range(len(parts), 0, -1):
                candidate = ".".join(parts[:n])
                if candidate in MODULES:
                    found.add(candidate)
                    break
        for child in ast.iter_child_nodes(node):
            visit(child)

    visit(ast.parse(path.read_text()))
    return found


GRAPH = {name: _imports(path) - {name} for name, path in MODULES.items()}


def test_imgtxt_imports_nothing_else_of_ours() -> None:
    outside = {m: sorted(d for d in deps if not d.startswith("imgtxt")) for m, deps in GRAPH.items()}
    assert {m: d for m, d in outside.items() if m.startswith("imgtxt") and d} == {}


def test_only_the_trainer_and_evaluation_reach_the_trainer() -> None:
    """Serving, indexing and search never import the trainer (evaluation does, for `--checkpoint` only)."""
    users = {m for m, deps in GRAPH.items() if any(d.startswith("trainer") for d in deps)}
    assert {m.split(".")[0] for m in users} <= {"trainer", "evaluation"}


def test_services_are_thin_mirror_images() -> None:
    image = sorted(p.name for p in (ROOT / "image_encoder_service").glob("*.py"))
    text = sorted(p.name for p in (ROOT / "text_encoder_service").glob("*.py"))
    assert image == text == ["__init__.py", "__main__.py", "server.py", "servicer.py"]


def test_only_the_encoder_layer_opens_onnx_runtime_sessions() -> None:
    """Serving, indexing, search, evaluation and benchmarks get their sessions from `imgtxt.encoders.session`.

    The trainer's export parity check and feature cache are the only other sessions (torch-side tools).
    """
    makers = set()
    for path in [*MODULES.values(), *(ROOT / "benchmarks").glob("*.py")]:
        for node in ast.walk(ast.parse(path.read_text())):
            func = node.func if isinstance(node, ast.Call) else None
            if (
                isinstance(func, ast.Attribute | ast.Name)
                and getattr(func, "attr", getattr(func, "id", "")) == "InferenceSession"
            ):
                makers.add(str(path.relative_to(ROOT)))
    assert {m for m in makers if not m.startswith("trainer/")} == {"imgtxt/encoders/session.py"}


def test_no_import_cycles() -> None:
    state: dict[str, int] = {}  # 1 = on the current path, 2 = done
    cycles: list[list[str]] = []

    def walk(node: str, path: list[str]) -> None:
        state[node] = 1
        for dep in sorted(GRAPH[node]):
            if state.get(dep) == 1:
                cycles.append([*path[path.index(dep) :], dep])
            elif dep not in state:
                walk(dep, [*path, dep])
        state[node] = 2

    for module in sorted(GRAPH):
        if module not in state:
            walk(module, [module])
    assert cycles == []


# Which packages each package may import (besides itself and `imgtxt`, which everyone may). `store/` is the
# vector-store layer every consumer of a collection imports; no consumer imports another's internals.
DEPENDS = {
    "imgtxt": set(),
    "store": set(),
    "image_encoder_service": set(),
    "text_encoder_service": set(),
    "indexer": {"store"},
    "search": {"store"},
    "search_service": {"store", "search"},
    "evaluation": {"store", "indexer", "trainer"},
    "demo": {"store", "indexer", "search", "search_service", "evaluation"},
    "trainer": set(),
}
# The one module of another package that may be imported (its public surface), with the importers allowed.
PUBLIC = {
    # The indexer's public job entry point (`indexer/__init__.py`): `eval --via-index` and the demo run a job.
    "indexer": ({"indexer"}, {"evaluation.via_index", "demo.cli"}),
    # Search goes through SearchBackend / Searcher only (the path that holds the bundle check).
    "search": ({"search.backend", "search.searcher"}, None),
    "search_service": ({"search_service.server"}, {"demo.cli"}),
    "evaluation": ({"evaluation.via_index"}, {"demo.cli"}),
    # `eval --checkpoint` encodes with the training towers.
    "trainer": (
        {"trainer.checkpoint", "trainer.data", "trainer.encode"},
        {"evaluation.offline"},
    ),
}


def test_packages_import_only_the_layers_below_them() -> None:
    wrong = {
        m: sorted(d for d in deps if d.split(".")[0] not in {m.split(".")[0], "imgtxt", *DEPENDS[m.split(".")[0]]})
        for m, deps in GRAPH.items()
    }
    assert {m: d for m, d in wrong.items() if d} == {}


def test_other_packages_are_reached_only_through_their_public_modules() -> None:
    wrong = []
    for m, deps in GRAPH.items():
        for d in deps:
            package = d.split(".")[0]
            if package == m.split(".")[0] or package not in PUBLIC:
                continue
            modules, importers = PUBLIC[package]
            if d not in modules or (importers is not None and m not in importers):
                wrong.append(f"{m} -> {d}")
    assert sorted(wrong) == []


def test_the_store_layer_owns_ids_and_stores() -> None:
    """The stores, point ids and store flags live in `store/` only (no second copy left behind in `indexer/`)."""
    assert not (ROOT / "indexer" / "stores").exists()
    assert not (ROOT / "indexer" / "ids.py").exists() and not (ROOT / "indexer" / "options.py").exists()
    assert {"store.base", "store.edge", "store.client", "store.factory", "store.ids", "store.options"} <= set(MODULES)


def test_benchmarks_reach_the_indexer_only_through_its_public_entry_point() -> None:
    wrong = sorted(
        f"{path.name} -> {dep}"
        for path in (ROOT / "benchmarks").glob("*.py")
        for dep in _imports(path)
        if dep.startswith("indexer.")
    )
    assert wrong == []
