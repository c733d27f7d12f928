"""The package's shape: no import cycles, and no module reaching into another's private names.

Imports inside functions count too: a lazy import still ties the two modules together, it only hides it.
"""
import ast
from pathlib import Path

import pytest

import slimconv

ROOT = Path(slimconv.__file__).parent


def _modules() -> dict[str, Path]:
    out = {}
    for path in sorted(ROOT.rglob("*.py")):
        parts = path.relative_to(ROOT.parent).with_suffix("").parts
        out[".".join(parts[:-1] if parts[-1] == "__init__" else parts)] = path
    return out


MODULES = _modules()


def _resolve(module: str, node: ast.ImportFrom) -> str:
    """The absolute name of what ``from ... import`` reads from, inside ``module``."""
    if not node.level:
        return node.module or ""
    pkg = module if MODULES[module].name == "__init__.py" else module.rpartition(".")[0]
    for _ in range(node.level - 1):
        pkg = pkg.rpartition(".")[0]
    return f"{pkg}.{node.module}" if node.module else pkg


def _imports(module: str):
    """Every import of a slimconv module in ``module``: (line, imported module, names taken from it, local
    name bound to the module or None). ``from pkg import mod`` is an import of ``pkg.mod``."""
    tree = ast.parse(MODULES[module].read_text(), str(MODULES[module]))
    for node in ast.walk(tree):
        if isinstance(node, ast.Import):
            for a in node.names:
                if a.name in MODULES:
                    yield node.lineno, a.name, [], a.asname
        elif isinstance(node, ast.ImportFrom):
            base = _resolve(module, node)
            if base not in MODULES:
                continue
            names = []
            for a in node.names:
                if f"{base}.{a.name}" in MODULES:
                    yield node.lineno, f"{base}.{a.name}", [], a.asname or a.name
                else:
                    names.append(a.name)
            if names:
                yield node.lineno, base, names, None


def _private(name: str) -> bool:
    return name.startswith("_") and not name.startswith("__")


def _cycles(graph: dict[str, set[str]]) -> list[list[str]]:
    """Strongly connected components of more than one module, or of one that imports itself (Tarjan)."""
    index, low, stack, on_stack, found = {}, {}, [], set(), []

    def visit(v):
        index[v] = low[v] = len(index)
        stack.append(v)
        on_stack.add(v)
        for w in sorted(graph[v]):
            if w not in index:
                visit(w)
                low[v] = min(low[v], low[w])
            elif w in on_stack:
                low[v] = min(low[v], index[w])
        if low[v] == index[v]:
            component = []
            while True:
                w = stack.pop()
                on_stack.discard(w)
                component.append(w)
                if w == v:
                    break
            if len(component) > 1 or v in graph[v]:
                found.append(sorted(component))

    for v in sorted(graph):
        if v not in index:
            visit(v)
    return found


def test_the_walker_sees_the_package():
    assert {"slimconv.cli", "slimconv.plan", "slimconv.modeling.modeling_slim"} <= set(MODULES)
    assert ("slimconv.plan" in {target for _, target, _, _ in _imports("slimconv.convert")})


def test_no_import_cycles():
    graph = {m: set() for m in MODULES}
    for m in MODULES:
        for _, target, _, _ in _imports(m):
            # Importing a submodule runs its package's __init__ first, but that is not an edge back.
            if not m.startswith(target + "."):
                graph[m].add(target)
    cycles = _cycles(graph)
    assert not cycles, "import cycles among: " + "; ".join(", ".join(c) for c in cycles)


def test_no_private_names_across_modules():
    reach_ins = []
    for m in MODULES:
        aliases = {}
        for line, target, names, alias in _imports(m):
            reach_ins += [f"{MODULES[m].name}:{line} imports {target}.{n}" for n in names if _private(n) and target != m]
            if _private(target.rpartition(".")[2]):
                reach_ins.append(f"{MODULES[m].name}:{line} imports the private module {target}")
            if alias:
                aliases[alias] = target
        for node in ast.walk(ast.parse(MODULES[m].read_text())):
            if (isinstance(node, ast.Attribute) and isinstance(node.value, ast.Name) and node.value.id in aliases
                    and _private(node.attr)):
                reach_ins.append(f"{MODULES[m].name}:{node.lineno} uses {aliases[node.value.id]}.{node.attr}")
    assert not reach_ins, "private names used across modules:\n" + "\n".join(reach_ins)


@pytest.mark.parametrize("fmt,recipe", [("slim", dict(remove={"attention": [1]}, parallel={"groups": [[3, 4]]})),
                                        ("nemotron-nas", dict(remove={"mlp": [2]})),
                                        ("stock", dict(remove={"blocks": [0]}))])
def test_one_convert_resolves_the_family_once(tmp_path, monkeypatch, capsys, fmt, recipe):
    """`slimconv convert` resolves the source config against its family (arch.get_arch) once, and the plan, the
    format's config, the layout, the costs and the source's weight check all read that one Arch (the design's
    "resolve it once"). A stock output's own config (fewer layers) is resolved apart, on purpose: the written
    folder is checked against what its config says, independently of the plan that wrote it."""
    import yaml

    from helpers import make_tiny
    from slimconv import arch
    from slimconv.cli import main

    built = []

    class Counted(arch.Arch):
        def __init__(self, **fields):
            super().__init__(**fields)
            built.append((self.model_type, len(self.windows)))

    src = make_tiny(tmp_path / "src", "llama-tied", intermediate_size=256)  # nemotron-nas' width grid
    r = tmp_path / "r.yaml"
    r.write_text(yaml.safe_dump({"model": str(src), **recipe, "output": {"dir": str(tmp_path / "out"), "format": fmt}}))
    monkeypatch.setattr(arch, "Arch", Counted)
    assert main(["convert", str(r)]) == 0, capsys.readouterr().err
    assert [b for b in built if b[1] == 6] == [("llama", 6)]
