"""The repository's layering: no top-level module imports one that imports it back (directly or
through others), counting imports inside functions too, so a circle cannot hide in one; model.py
imports only torch and the standard library. Read from the source with `ast`, never by importing."""

import ast
import os
import sys

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
MODULES = sorted(name[:-3] for name in os.listdir(ROOT) if name.endswith(".py"))


def imported_names(module):
    """Every module name imported anywhere in ROOT/<module>.py (top of file, functions, classes)."""
    with open(os.path.join(ROOT, module + ".py")) as f:
        tree = ast.parse(f.read())
    names = set()
    for node in ast.walk(tree):
        if isinstance(node, ast.Import):
            names.update(alias.name.split(".")[0] for alias in node.names)
        elif isinstance(node, ast.ImportFrom) and node.level == 0:
            names.add(node.module.split(".")[0])
    return names


def import_graph():
    return {m: sorted(imported_names(m) & set(MODULES)) for m in MODULES}


def find_cycle(graph):
    """A list of modules forming a cycle (first == last), or None. Depth-first search."""
    state, stack = {}, []  # state: 1 = on the current path, 2 = finished

    def visit(node):
        state[node], stack[len(stack):] = 1, [node]
        for nxt in graph[node]:
            if state.get(nxt) == 1:
                return stack[stack.index(nxt):] + [nxt]
            if nxt not in state:
                cycle = visit(nxt)
                if cycle:
                    return cycle
        state[node] = 2
        stack.pop()
        return None

    for node in graph:
        if node not in state:
            cycle = visit(node)
            if cycle:
                return cycle
    return None


def test_cycle_finder_finds_a_planted_cycle():
    assert find_cycle({"a": ["b"], "b": ["c"], "c": ["a"], "d": []}) == ["a", "b", "c", "a"]
    assert find_cycle({"a": ["b"], "b": [], "c": ["a", "b"]}) is None
    assert find_cycle({"a": ["a"]}) == ["a", "a"]


def test_no_import_cycle_between_top_level_modules():
    graph = import_graph()
    assert {"model", "tasks", "toy", "train"} <= set(graph)  # the test reads the real repository
    cycle = find_cycle(graph)
    assert cycle is None, "import cycle: " + " -> ".join(cycle)


def test_model_imports_only_torch_and_the_standard_library():
    outside = {name for name in imported_names("model") if name not in sys.stdlib_module_names}
    assert outside == {"torch"}
