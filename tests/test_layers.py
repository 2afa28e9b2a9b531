"""The layer order of docs/design.md ("Layers"), checked over every `import` in src/orcinus.

Every import counts, those inside functions and under `if TYPE_CHECKING` too: a lazy import is
still a dependency, it only moves the failure to run time. The rules:

1. no import cycles between modules;
2. a module imports only modules of its own layer or of layers below it;
3. nothing imports `orcinus.bench` except the benchmarks themselves and `orcinus.cli` (the command
   shell over everything, which dispatches `orcinus bench`);
4. the engine talks to the executor through its interface only (`executor.executor`,
   `executor.factory`, `executor.messages`), never to a worker's insides.
"""
from __future__ import annotations

import ast
import pathlib
from collections import defaultdict

SRC = pathlib.Path(__file__).resolve().parents[1] / "src"

# Bottom to top. A layer is a list of module-name prefixes; a module belongs to the layer of its
# longest matching prefix. Keep in step with the table at the top of docs/design.md.
LAYERS: list[list[str]] = [
    ["orcinus.errors"],
    # grammars, bitmasks, tool-call formats: plain logic under the sampling settings that name them
    ["orcinus.structured", "orcinus.tools"],
    ["orcinus.sampling_params", "orcinus.request", "orcinus.cpu_features", "orcinus.thread_policy"],
    ["orcinus.core"],
    ["orcinus.config", "orcinus.generation_config"],
    ["orcinus.distributed.parallel_state", "orcinus.distributed.network"],
    ["orcinus.attention"],
    ["orcinus.layers"],
    ["orcinus.models", "orcinus.tokenizer"],
    ["orcinus.executor"],
    ["orcinus.engine"],
    ["orcinus"],  # the package itself: the public API (LLM, SamplingParams, ...)
    ["orcinus.server"],
    ["orcinus.bench", "orcinus.sim"],  # the simulator is a benchmark: it drives the engine from outside
    ["orcinus.cli", "orcinus.__main__", "orcinus.distributed.launch"],
]
BENCH_IMPORTERS = ("orcinus.bench", "orcinus.sim", "orcinus.cli")
ENGINE_SEES_OF_EXECUTOR = {"orcinus.executor", "orcinus.executor.executor", "orcinus.executor.factory",
                           "orcinus.executor.messages"}
# Known exceptions, each with its reason; the goal (reached) is none.
ALLOWED_CYCLES: list[set[str]] = []


def module_files() -> dict[str, tuple[pathlib.Path, bool]]:
    mods = {}
    for path in (SRC / "orcinus").rglob("*.py"):
        parts = list(path.relative_to(SRC).with_suffix("").parts)
        is_package = parts[-1] == "__init__"
        if is_package:
            parts = parts[:-1]
        mods[".".join(parts)] = (path, is_package)
    return mods


def import_graph() -> dict[str, set[str]]:
    """module -> the orcinus modules it imports (a `from pkg import name` counts `pkg.name` when
    that is a module, else `pkg`)."""
    mods = module_files()
    graph: dict[str, set[str]] = defaultdict(set)
    for name, (path, is_package) in mods.items():
        here = name.split(".") if is_package else name.split(".")[:-1]
        for node in ast.walk(ast.parse(path.read_text(), str(path))):
            targets: list[str] = []
            if isinstance(node, ast.Import):
                targets = [alias.name for alias in node.names]
            elif isinstance(node, ast.ImportFrom):
                base = node.module or ""
                if node.level:
                    stem = here[: len(here) - node.level + 1]
                    base = ".".join(stem + ([node.module] if node.module else []))
                for alias in node.names:
                    full = f"{base}.{alias.name}"
                    targets.append(full if full in mods else base)
            for target in targets:
                if target.startswith("orcinus"):
                    # `import orcinus.a.b` depends on orcinus.a.b (its parents are packages).
                    while target not in mods and "." in target:
                        target = target.rsplit(".", 1)[0]
                    if target != name:
                        graph[name].add(target)
    for name in mods:
        graph.setdefault(name, set())
    return graph


def layer_of(module: str) -> int:
    best, best_len = None, -1
    for i, prefixes in enumerate(LAYERS):
        for p in prefixes:
            if (module == p or module.startswith(p + ".")) and len(p) > best_len:
                best, best_len = i, len(p)
    assert best is not None, f"{module} is in no layer: add it to LAYERS and to docs/design.md"
    return best


def strongly_connected(graph: dict[str, set[str]]) -> list[set[str]]:
    index: dict[str, int] = {}
    low: dict[str, int] = {}
    stack: list[str] = []
    on_stack: set[str] = set()
    out: list[set[str]] = []
    counter = 0

    def visit(v: str) -> None:  # Tarjan; the graph is small enough for recursion
        nonlocal counter
        index[v] = low[v] = counter
        counter += 1
        stack.append(v)
        on_stack.add(v)
        for w in sorted(graph[v]):
            if w not in index:
                visit(w)
                low[v] = min(low[v], low[w])
            elif w in on_stack:
                low[v] = min(low[v], index[w])
        if low[v] == index[v]:
            comp = set()
            while True:
                w = stack.pop()
                on_stack.discard(w)
                comp.add(w)
                if w == v:
                    break
            if len(comp) > 1:
                out.append(comp)

    for v in sorted(graph):
        if v not in index:
            visit(v)
    return out


def test_the_graph_sees_function_local_imports():
    # A module known to import lazily inside a function: the checker must see it.
    graph = import_graph()
    assert "orcinus.server.app" in graph["orcinus.cli"]


def test_no_import_cycles():
    cycles = [c for c in strongly_connected(import_graph()) if not any(c <= allowed for allowed in ALLOWED_CYCLES)]
    assert not cycles, f"import cycles: {[sorted(c) for c in cycles]}"


def test_no_upward_imports():
    graph = import_graph()
    upward = sorted(f"{src} -> {dst}" for src, dsts in graph.items() for dst in dsts
                    if layer_of(dst) > layer_of(src))
    assert not upward, "imports that reach up the layer order (docs/design.md, \"Layers\"):\n" + "\n".join(upward)


def test_product_code_never_imports_the_benchmarks():
    graph = import_graph()
    bad = sorted(f"{src} -> {dst}" for src, dsts in graph.items() for dst in dsts
                 if dst.startswith("orcinus.bench") and not src.startswith(BENCH_IMPORTERS))
    assert not bad, "\n".join(bad)


def test_the_engine_sees_only_the_executor_interface():
    graph = import_graph()
    bad = sorted(f"{src} -> {dst}" for src, dsts in graph.items() if src.startswith("orcinus.engine")
                 for dst in dsts if layer_of(dst) == layer_of("orcinus.executor") and dst not in ENGINE_SEES_OF_EXECUTOR)
    assert not bad, "\n".join(bad)


def test_the_checker_catches_a_cycle_and_an_upward_import():
    graph = {"a": {"b"}, "b": {"a"}, "c": set()}
    assert strongly_connected(graph) == [{"a", "b"}]
    assert layer_of("orcinus.config") < layer_of("orcinus.engine.llm_engine")
