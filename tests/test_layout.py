"""The package's shape: the engine core never imports a measuring tool, and no module imports, directly or through
others, a module that imports it back (imports inside functions count: they only move the cycle to run time)."""

import ast
from pathlib import Path

import inaflash

PACKAGE = Path(inaflash.__file__).parent
# measuring tools live in one subpackage: the core (store -> reader -> cache -> FFN -> model -> generate -> API ->
# server) must not need them
TOOLS = {"tools"}
TOP = {"cli", "__main__"}  # the command line sits above both


def module_name(path: Path) -> str:
    return ".".join(path.relative_to(PACKAGE).with_suffix("").parts).removesuffix(".__init__") or "__init__"


def is_module(name: str) -> bool:
    path = PACKAGE / name.replace(".", "/")
    return bool(name) and (path.with_suffix(".py").exists() or (path / "__init__.py").exists())


def imports(path: Path) -> set[str]:
    """inaflash modules `path` imports anywhere in its body (top level or inside functions). `from P import x` is an
    import of the module P.x when there is one, else of P."""
    name = module_name(path)
    parts = name.split(".")
    package = parts if path.name == "__init__.py" and name != "__init__" else parts[:-1]
    out = set()
    for node in ast.walk(ast.parse(path.read_text())):
        if isinstance(node, ast.ImportFrom):
            if node.level:
                base = package[: len(package) - node.level + 1]
                target = ".".join([*base, *(node.module.split(".") if node.module else [])])
            elif node.module and (node.module == "inaflash" or node.module.startswith("inaflash.")):
                target = node.module.removeprefix("inaflash").lstrip(".")
            else:
                continue
            for a in node.names:
                sub = f"{target}.{a.name}" if target else a.name
                out.add(sub if is_module(sub) else (target or "__init__"))
        elif isinstance(node, ast.Import):
            out |= {a.name.removeprefix("inaflash").lstrip(".") for a in node.names if a.name.startswith("inaflash.")}
    out.discard(name)
    return {m for m in out if m == "__init__" or is_module(m)}


def graph() -> dict[str, set[str]]:
    return {module_name(p): imports(p) for p in PACKAGE.rglob("*.py")}


def test_the_core_never_imports_a_tool():
    g = graph()
    core = {m for m in g if m.split(".")[0] not in TOOLS | TOP}
    bad = sorted(f"{m} -> {t}" for m in core for t in g[m] if t.split(".")[0] in TOOLS | TOP)
    assert not bad, bad


def find_cycles(g: dict[str, set[str]]) -> list[str]:
    cycles, state = [], {}

    def visit(m, stack):
        state[m] = "open"
        for t in sorted(g.get(m, ())):
            if state.get(t) == "open":
                cycles.append(" -> ".join(stack[stack.index(t):] + [t]))
            elif t not in state:
                visit(t, stack + [t])
        state[m] = "done"

    for m in sorted(g):
        if m not in state:
            visit(m, [m])
    return cycles


def test_no_import_cycles():
    assert find_cycles({"a": {"b"}, "b": {"c"}, "c": {"a"}, "d": {"a"}}) == ["a -> b -> c -> a"]  # the checker
    g = graph()
    # the package's __init__ re-exports the API: importing it from a submodule is not a dependency of substance
    g = {m: {t for t in deps if t != "__init__"} for m, deps in g.items()}
    assert not find_cycles(g), find_cycles(g)


def test_the_walk_sees_imports_inside_functions():
    g = graph()
    assert "paths" in g["engine"]  # a top-level import
    assert "store.sources" in g["loader"]  # imported inside resolve_store
    assert "native" in g["store.checksum"]  # `from .. import native`: the module, not the package
