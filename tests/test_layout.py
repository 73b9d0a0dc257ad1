"""The package's structure, read from its source: no import cycle among fused_resnet's
modules, and no module takes a private name (a leading underscore) from another."""
import ast
from pathlib import Path

PACKAGE = Path(__file__).resolve().parents[1] / "fused_resnet"


def _modules() -> dict:
    """{dotted module name: path} of every .py file of the package."""
    found = {}
    for path in sorted(PACKAGE.rglob("*.py")):
        parts = list(path.relative_to(PACKAGE.parent).with_suffix("").parts)
        if parts[-1] == "__init__":
            parts.pop()
        found[".".join(parts)] = path
    return found


MODULES = _modules()


def _is_package(name: str) -> bool:
    return MODULES[name].name == "__init__.py"


def _absolute(module: str, level: int, target: str) -> str:
    """The absolute name of `from <level dots><target> import ...` inside `module`."""
    if level == 0:
        return target
    base = module.split(".")
    if not _is_package(module):
        base = base[:-1]
    base = base[:len(base) - (level - 1)]
    return ".".join(base + ([target] if target else []))


def _imports(module: str):
    """(imported module, names taken from it, line) for every import of `module`."""
    tree = ast.parse(MODULES[module].read_text(), str(MODULES[module]))
    for node in ast.walk(tree):
        if isinstance(node, ast.Import):
            for alias in node.names:
                yield alias.name, [], node.lineno
        elif isinstance(node, ast.ImportFrom):
            source = _absolute(module, node.level, node.module or "")
            names = []
            for alias in node.names:
                sub = f"{source}.{alias.name}"
                if sub in MODULES:          # `from pkg import submodule`
                    yield sub, [], node.lineno
                else:
                    names.append(alias.name)
            if names:
                yield source, names, node.lineno


def _graph() -> dict:
    """module -> the package's modules it imports (executing a submodule runs its
    packages' __init__ first: those count too, except the importer's own ancestors)."""
    graph = {}
    for module in MODULES:
        own = {".".join(module.split(".")[:i]) for i in range(1, module.count(".") + 2)}
        deps = set()
        for target, _, _ in _imports(module):
            parts = target.split(".")
            for i in range(1, len(parts) + 1):
                name = ".".join(parts[:i])
                if name in MODULES and name not in own:
                    deps.add(name)
        graph[module] = deps
    return graph


def test_no_import_cycle():
    graph = _graph()
    state, stack, cycles = {}, [], []

    def visit(m):
        state[m] = "open"
        stack.append(m)
        for d in sorted(graph[m]):
            if state.get(d) == "open":
                cycles.append(stack[stack.index(d):] + [d])
            elif d not in state:
                visit(d)
        stack.pop()
        state[m] = "done"

    for m in sorted(graph):
        if m not in state:
            visit(m)
    assert not cycles, "import cycles: " + "; ".join(" -> ".join(c) for c in cycles)


def _private(name: str) -> bool:
    return name.startswith("_") and not (name.startswith("__") and name.endswith("__"))


def test_no_private_name_crosses_modules():
    bad = []
    for module in MODULES:
        tree = ast.parse(MODULES[module].read_text())
        aliases = {}     # local name -> package module it is bound to
        for target, names, line in _imports(module):
            for name in names:
                if target in MODULES and target != module and _private(name):
                    bad.append(f"{module}:{line} takes {name} from {target}")
        for node in ast.walk(tree):
            if isinstance(node, ast.ImportFrom):
                source = _absolute(module, node.level, node.module or "")
                for alias in node.names:
                    if f"{source}.{alias.name}" in MODULES:
                        aliases[alias.asname or alias.name] = f"{source}.{alias.name}"
            elif isinstance(node, ast.Import):
                for alias in node.names:
                    if alias.name in MODULES and alias.asname:
                        aliases[alias.asname] = alias.name
        for node in ast.walk(tree):
            if (isinstance(node, ast.Attribute) and isinstance(node.value, ast.Name)
                    and node.value.id in aliases and _private(node.attr)
                    and aliases[node.value.id] != module):
                bad.append(f"{module}:{node.lineno} uses {aliases[node.value.id]}.{node.attr}")
    assert not bad, "private names used across modules:\n" + "\n".join(bad)


def test_the_checks_see_imports():
    """The two tests above read real edges (a test that cannot fail is a defect)."""
    graph = _graph()
    assert "fused_resnet.backends.registry" in graph["fused_resnet.ops.conv_bn_relu"]
    assert "fused_resnet.backends" in graph["fused_resnet.ops.conv_bn_relu"]
    assert "fused_resnet.ops" in graph["fused_resnet"]


def test_no_function_local_imports_of_the_package():
    """Imports of the package's own modules sit at the top of a module: a function-local
    one hides a dependency (and usually an import cycle)."""
    bad = []
    for module, path in MODULES.items():
        tree = ast.parse(path.read_text())
        for func in ast.walk(tree):
            if not isinstance(func, (ast.FunctionDef, ast.AsyncFunctionDef)):
                continue
            for node in ast.walk(func):
                if isinstance(node, ast.ImportFrom) and (
                        node.level > 0 or (node.module or "").startswith("fused_resnet")):
                    bad.append(f"{module}:{node.lineno}")
                elif isinstance(node, ast.Import) and any(
                        a.name.startswith("fused_resnet") for a in node.names):
                    bad.append(f"{module}:{node.lineno}")
    assert not bad, "function-local imports of fused_resnet modules: " + ", ".join(bad)
