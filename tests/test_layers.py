"""The project's imports point one way: down the layers below, never sideways between the
packages of one layer, and never in a cycle. Function-level imports count as much as
module-level ones: hiding an import in a function does not change who depends on whom."""

import ast
import pathlib

PACKAGE = pathlib.Path(__file__).resolve().parent.parent / "semipd"

# Lowest first. A module belongs to the longest prefix that names it.
LAYERS = [
    ["semipd.shared"],                                   # protocol, engine library, client SDK
    ["semipd.services.worker"],                          # a worker process's link and memory
    ["semipd.services.prefill", "semipd.services.decode", "semipd.services.unified"],
    ["semipd.services.controller", "semipd.services.scm", "semipd.services.gateway"],
    ["semipd.cli"],                                      # the command line and the bench
    ["semipd"],                                          # the public SDK names
]


def unit_of(module: str) -> tuple[int, str]:
    """(layer, package) of a module: the longest prefix in LAYERS that names it."""
    best = None
    for rank, units in enumerate(LAYERS):
        for unit in units:
            if (module == unit or module.startswith(unit + ".")) and (best is None or len(unit) > len(best[1])):
                best = (rank, unit)
    assert best is not None, module
    return best


def project_modules() -> dict[str, pathlib.Path]:
    modules = {}
    for path in PACKAGE.rglob("*.py"):
        parts = path.relative_to(PACKAGE.parent).with_suffix("").parts
        modules[".".join(parts[:-1] if parts[-1] == "__init__" else parts)] = path
    return modules


def import_graph() -> dict[str, set[str]]:
    """module -> the project modules it imports, anywhere in its body."""
    modules = project_modules()
    graph = {}
    for name, path in modules.items():
        package = name if path.name == "__init__.py" else name.rpartition(".")[0]
        targets = set()
        for node in ast.walk(ast.parse(path.read_text(), str(path))):
            if isinstance(node, ast.Import):
                candidates = [alias.name for alias in node.names]
            elif isinstance(node, ast.ImportFrom):
                base = node.module or ""
                if node.level:
                    base = ".".join(package.split(".")[:len(package.split(".")) - node.level + 1] + ([base] if base else []))
                candidates = [f"{base}.{alias.name}" for alias in node.names] + [base]
            else:
                continue
            for candidate in candidates:
                if candidate in modules:  # `from pkg import module` names the module, else the package
                    targets.add(candidate)
                    if isinstance(node, ast.ImportFrom):
                        break
        targets.discard(name)
        graph[name] = targets
    return graph


def violations(graph: dict[str, set[str]]) -> list[str]:
    """Every upward or sideways import, and every cycle."""
    found = []
    for importer, targets in graph.items():
        for target in targets:
            (rank_a, unit_a), (rank_b, unit_b) = unit_of(importer), unit_of(target)
            if rank_b > rank_a or (rank_b == rank_a and unit_a != unit_b):
                found.append(f"{importer} imports {target}: {'up' if rank_b > rank_a else 'sideways'}")
    found += [f"cycle: {' -> '.join(cycle)}" for cycle in cycles(graph)]
    return found


def cycles(graph: dict[str, set[str]]) -> list[list[str]]:
    """One cycle (as a path) per strongly connected component larger than one module."""
    index, low, stack, on_stack, out = {}, {}, [], set(), []

    def visit(node: str) -> None:  # Tarjan's algorithm
        index[node] = low[node] = len(index)
        stack.append(node)
        on_stack.add(node)
        for nxt in sorted(graph.get(node, ())):
            if nxt not in index:
                visit(nxt)
                low[node] = min(low[node], low[nxt])
            elif nxt in on_stack:
                low[node] = min(low[node], index[nxt])
        if low[node] == index[node]:
            component = []
            while True:
                member = stack.pop()
                on_stack.discard(member)
                component.append(member)
                if member == node:
                    break
            if len(component) > 1:
                out.append(sorted(component))

    for node in sorted(graph):
        if node not in index:
            visit(node)
    return out


def test_imports_point_down_the_layers_without_cycles():
    graph = import_graph()
    assert len(graph) > 50 and sum(map(len, graph.values())) > 100  # the walk found the project
    assert violations(graph) == []


def test_an_upward_import_or_a_cycle_is_caught():
    graph = import_graph()
    upward = {k: set(v) for k, v in graph.items()}
    upward["semipd.shared.engine"].add("semipd.services.controller.mps")
    assert violations(upward) == ["semipd.shared.engine imports semipd.services.controller.mps: up"]
    sideways = {k: set(v) for k, v in graph.items()}
    sideways["semipd.services.scm.service"].add("semipd.services.controller.server")
    assert violations(sideways) == ["semipd.services.scm.service imports semipd.services.controller.server: sideways"]
    cyclic = {k: set(v) for k, v in graph.items()}
    assert cyclic["semipd.shared.sampling_params"] == {"semipd.shared.errors"}
    cyclic["semipd.shared.errors"].add("semipd.shared.sampling_params")
    assert violations(cyclic) == ["cycle: semipd.shared.errors -> semipd.shared.sampling_params"]


def test_function_level_imports_are_in_the_graph():
    # cli/serve.py imports the controller's serve() inside cmd_serve, so as not to load torch early
    assert "semipd.services.controller.serve" in import_graph()["semipd.cli.serve"]


def test_the_bench_is_a_client_of_the_services():
    # It drives a server through the SDK or over HTTP, so it measures what any client sees.
    graph = import_graph()
    assert [(m, t) for m, targets in graph.items() if m.startswith("semipd.cli.bench")
            for t in targets if t.startswith("semipd.services")] == []
