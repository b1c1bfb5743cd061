"""The import rule of docs/architecture.md: every module of disco_megatron imports only from lower
layers (or from its own package), and no chain of imports comes back to where it started.

Each module is parsed with ``ast``; every ``import`` counts, also inside functions and
``if TYPE_CHECKING:`` blocks (a deferred import is still a dependency). The layers are read from
the table in docs/architecture.md, so the picture and the rule cannot drift apart.
"""
from __future__ import annotations

import ast
import re
from pathlib import Path
from typing import Optional

REPO = Path(__file__).resolve().parents[1]
ROOT = "disco_megatron"
# Imports the layer numbers alone would decide otherwise (docs/architecture.md says why).
ALLOWED = {("disco_megatron.config", "disco_megatron.scion_options")}
FORBIDDEN = {("disco_megatron.optim", "disco_megatron.config")}


def documented_layers(text: str) -> dict[str, int]:
    """``{unit: layer}`` from the rows ``| L<n> | `unit`, `unit` | ... |`` of the architecture table."""
    layers = {}
    for number, units in re.findall(r"^\| L(\d+) \| ([^|]+) \|", text, flags=re.MULTILINE):
        for unit in re.findall(r"`([\w./]+)`", units):
            layers[f"{ROOT}." + unit.removesuffix("/").removesuffix(".py").replace("/", ".")] = int(number)
    return layers


def module_name(path: Path) -> str:
    parts = path.relative_to(REPO).with_suffix("").parts
    return ".".join(parts[:-1] if parts[-1] == "__init__" else parts)


def imported_modules(source: str, module: str, is_package: bool, known: set[str]) -> list[tuple[str, int]]:
    """(disco_megatron module, line) of every import in ``source``; ``from P import x`` names the
    submodule ``P.x`` when that is a module, else ``P``."""
    found = []
    package = module if is_package else module.rpartition(".")[0]
    for node in ast.walk(ast.parse(source)):
        if isinstance(node, ast.Import):
            found += [(alias.name, node.lineno) for alias in node.names]
        elif isinstance(node, ast.ImportFrom):
            base = node.module or ""
            if node.level:
                anchor = package.rsplit(".", node.level - 1)[0] if node.level > 1 else package
                base = f"{anchor}.{base}" if base else anchor
            for alias in node.names:
                found.append((f"{base}.{alias.name}" if f"{base}.{alias.name}" in known else base, node.lineno))
    return [(name, line) for name, line in found if name == ROOT or name.startswith(ROOT + ".")]


def unit_of(module: str, layers: dict[str, int]) -> Optional[str]:
    """The documented unit (package or top-level module) ``module`` belongs to."""
    for unit in sorted(layers, key=len, reverse=True):
        if module == unit or module.startswith(unit + "."):
            return unit
    return None


def rule_violations(imports: dict[str, list[tuple[str, int]]], layers: dict[str, int]) -> list[str]:
    """One line per import that points up, sideways to another unit of its layer, or is forbidden."""
    found = []
    for module, targets in sorted(imports.items()):
        source = unit_of(module, layers)
        for target, line in targets:
            dest = unit_of(target, layers)
            if dest is None or source is None or dest == source:
                continue
            pair = (source, dest)
            if pair in FORBIDDEN or (pair not in ALLOWED and layers[dest] >= layers[source]):
                found.append(f"{module} (line {line}) imports {target}: {source} is L{layers[source]}, "
                             f"{dest} is L{layers[dest]}")
    return found


def cycles(imports: dict[str, list[tuple[str, int]]]) -> list[list[str]]:
    """Every import cycle among modules, as the path that closes it (depth-first search)."""
    graph = {m: sorted({t for t, _ in targets if t in imports}) for m, targets in imports.items()}
    found, state, path = [], {}, []

    def visit(module: str) -> None:
        state[module] = "open"
        path.append(module)
        for target in graph[module]:
            if state.get(target) == "open":
                found.append(path[path.index(target):] + [target])
            elif target not in state:
                visit(target)
        path.pop()
        state[module] = "done"

    for module in sorted(graph):
        if module not in state:
            visit(module)
    return found


def package_imports() -> dict[str, list[tuple[str, int]]]:
    files = {module_name(p): p for p in sorted((REPO / ROOT).rglob("*.py"))}
    return {module: imported_modules(path.read_text(), module, path.name == "__init__.py", set(files))
            for module, path in files.items()}


LAYERS = documented_layers((REPO / "docs" / "architecture.md").read_text())


def test_every_module_has_a_documented_layer():
    orphans = sorted(m for m in package_imports() if m != ROOT and unit_of(m, LAYERS) is None)
    assert not orphans, f"modules outside every layer of docs/architecture.md: {orphans}"


def test_imports_point_down_only():
    violations = rule_violations(package_imports(), LAYERS)
    assert not violations, "imports against docs/architecture.md:\n" + "\n".join(violations)


def test_no_import_cycles():
    found = cycles(package_imports())
    assert not found, "import cycles:\n" + "\n".join(" -> ".join(c) for c in found)


def test_the_checks_catch_what_they_are_for():
    """The checker on made-up modules: an upward, a sideways and a forbidden import, and a cycle."""
    layers = {"disco_megatron.config": 0, "disco_megatron.runtime": 1, "disco_megatron.optim": 3,
              "disco_megatron.data": 3}
    source = ("import disco_megatron.runtime.parallel\n"
              "def f():\n    from disco_megatron.data import tokenizer\n"
              "    from disco_megatron.config import RunConfig\n")
    known = {"disco_megatron.runtime.parallel", "disco_megatron.data", "disco_megatron.data.tokenizer",
             "disco_megatron.config"}
    imports = {"disco_megatron.optim.x": imported_modules(source, "disco_megatron.optim.x", False, known),
               "disco_megatron.runtime.parallel": [("disco_megatron.optim.x", 9)]}
    assert imports["disco_megatron.optim.x"] == [("disco_megatron.runtime.parallel", 1),
                                                 ("disco_megatron.data.tokenizer", 3), ("disco_megatron.config", 4)]
    found = rule_violations(imports, layers)
    assert [line.split(" imports ")[1].split(":")[0] for line in found] == [
        "disco_megatron.data.tokenizer", "disco_megatron.config", "disco_megatron.optim.x"]
    assert cycles(imports) == [["disco_megatron.optim.x", "disco_megatron.runtime.parallel",
                                "disco_megatron.optim.x"]]
