"""The package's import structure (docs/architecture.md, "Layers"): every module imports in a
fresh interpreter, the package-internal import graph (module-level AND function-level imports,
read from the AST) has no cycle, the layers import only downwards, and only the integrations
import transformers / unsloth. Long modules say why at their top."""

import ast
import pathlib
import subprocess
import sys

import pytest

ROOT = pathlib.Path(__file__).resolve().parents[1]
PKG = ROOT / "spectral_kv"


def _modules() -> dict[str, pathlib.Path]:
    mods = {}
    for path in sorted(PKG.rglob("*.py")):
        parts = path.relative_to(ROOT).with_suffix("").parts
        mods[".".join(parts[:-1] if parts[-1] == "__init__" else parts)] = path
    return mods


MODULES = _modules()


def _imports(name: str, path: pathlib.Path) -> set[str]:
    """Every module this one imports (absolute names, nearest module of the package, or the
    top-level name of an outside package), wherever the import statement sits."""
    is_pkg = path.name == "__init__.py"
    out = set()
    for node in ast.walk(ast.parse(path.read_text())):
        if isinstance(node, ast.Import):
            out.update(a.name for a in node.names)
        elif isinstance(node, ast.ImportFrom):
            if node.level:
                base = name.split(".") if is_pkg else name.split(".")[:-1]
                base = base[: len(base) - (node.level - 1)]
                target = ".".join(base + ([node.module] if node.module else []))
            else:
                target = node.module or ""
            out.add(target)
            out.update(f"{target}.{a.name}" for a in node.names if f"{target}.{a.name}" in MODULES)
    return out


def _graph() -> dict[str, set[str]]:
    edges = {}
    for name, path in MODULES.items():
        deps = set()
        for target in _imports(name, path):
            while target and target not in MODULES:
                target = target.rpartition(".")[0]
            if not target or target == name:
                continue
            deps.add(target)
            # Importing a.b.c runs the package a.b first (not the root: it imports everything).
            parent = target.rpartition(".")[0]
            while parent.count("."):
                if parent != name and not name.startswith(parent + "."):
                    deps.add(parent)
                parent = parent.rpartition(".")[0]
        edges[name] = deps
    return edges


def _cycles(edges: dict[str, set[str]]) -> list[list[str]]:
    state, stack, found = {}, [], []

    def visit(u):
        state[u] = 1
        stack.append(u)
        for v in sorted(edges[u]):
            if state.get(v) == 1:
                found.append(stack[stack.index(v):] + [v])
            elif v not in state:
                visit(v)
        stack.pop()
        state[u] = 2

    for m in sorted(edges):
        if m not in state:
            visit(m)
    return found


def test_every_module_imports_in_a_fresh_interpreter():
    code = "import importlib, sys\nfor m in sys.argv[1:]:\n    importlib.import_module(m)\n"
    names = [m for m in MODULES if not m.endswith("__main__")]
    run = subprocess.run([sys.executable, "-c", code, *names], cwd=ROOT, capture_output=True, text=True, timeout=300)
    assert run.returncode == 0, run.stderr[-3000:]


def test_internal_import_graph_is_acyclic():
    cycles = _cycles(_graph())
    assert not cycles, "\n".join(" -> ".join(c) for c in cycles)


def test_the_cycle_check_can_fail():
    assert _cycles({"a": {"b"}, "b": {"c"}, "c": {"a"}}) == [["a", "b", "c", "a"]]


# What each layer may import from the package (docs/architecture.md). A module matches the
# longest prefix listed; its package-internal imports must all match one of its allowed prefixes.
BASE = ("spectral_kv.registry", "spectral_kv._version")
LAYERS = {
    "spectral_kv.registry": (),
    "spectral_kv._version": (),
    "spectral_kv.presets": (),
    "spectral_kv.layer_overrides": (),
    "spectral_kv.quant": (),
    "spectral_kv.codes": (),
    "spectral_kv.config": ("spectral_kv.registry", "spectral_kv.presets", "spectral_kv.layer_overrides"),
    "spectral_kv.kernels": ("spectral_kv.kernels", "spectral_kv.codes", "spectral_kv.quant"),
    "spectral_kv.compressors": ("spectral_kv.compressors", "spectral_kv.config", "spectral_kv.quant", "spectral_kv.codes",
                                "spectral_kv.kernels", *BASE),
    "spectral_kv.view": (),
    "spectral_kv.dense_access": (),
    "spectral_kv.checks": ("spectral_kv.config",),
    "spectral_kv.blocks": ("spectral_kv.compressors", "spectral_kv.config"),
    "spectral_kv.static": ("spectral_kv.blocks", "spectral_kv.config"),
    "spectral_kv.attention": ("spectral_kv.attention", "spectral_kv.compressors", "spectral_kv.kernels", "spectral_kv.view",
                              "spectral_kv.codes",
                              "spectral_kv.config", *BASE),
    "spectral_kv.tiers": ("spectral_kv.blocks", "spectral_kv.checks", "spectral_kv.compressors", "spectral_kv.config",
                          "spectral_kv.dense_access", "spectral_kv.static", "spectral_kv.view", *BASE),
    "spectral_kv.integrations.transformers": ("spectral_kv.integrations.transformers", "spectral_kv.tiers",
                                              "spectral_kv.attention", "spectral_kv.config", "spectral_kv.graphs",
                                              "spectral_kv.codes", *BASE),
    "spectral_kv.integrations.unsloth": ("spectral_kv.integrations.transformers", "spectral_kv.config", "spectral_kv.presets"),
    # a user-level tool over the eval harness: the cache (for its exact layers), memory (for bytes)
    "spectral_kv.calibrate": ("spectral_kv.eval", "spectral_kv.integrations", "spectral_kv.memory", "spectral_kv.config",
                              "spectral_kv.layer_overrides", "spectral_kv.metrics"),
}
# The math core: never imports transformers or unsloth (only the integrations do).
CORE = ("spectral_kv.registry", "spectral_kv.config", "spectral_kv.quant", "spectral_kv.codes", "spectral_kv.kernels",
        "spectral_kv.compressors", "spectral_kv.attention", "spectral_kv.view", "spectral_kv.checks",
        "spectral_kv.blocks", "spectral_kv.static", "spectral_kv.tiers", "spectral_kv.graphs", "spectral_kv.dense_access")


def _layer(name: str) -> str | None:
    keys = [k for k in LAYERS if name == k or name.startswith(k + ".")]
    return max(keys, key=len) if keys else None


@pytest.mark.parametrize("name", sorted(m for m in MODULES if _layer(m)))
def test_layers_import_only_downwards(name):
    allowed = LAYERS[_layer(name)]
    internal = {t for t in _graph()[name] if t.startswith("spectral_kv")}
    bad = sorted(t for t in internal if not any(t == a or t.startswith(a + ".") for a in allowed))
    assert not bad, f"{name} imports {bad}; its layer allows {allowed}"


@pytest.mark.parametrize("name", sorted(m for m in MODULES if m.startswith(CORE)))
def test_math_core_never_imports_the_frameworks(name):
    outside = {t.split(".")[0] for t in _imports(name, MODULES[name])}
    assert not outside & {"transformers", "unsloth"}, name


def test_long_modules_say_why():
    # A module over ~350 lines states its reason in its docstring ("longer than").
    for name, path in MODULES.items():
        text = path.read_text()
        if text.count("\n") > 360 and not name.startswith("spectral_kv.eval.methods"):  # being split (eval owner)
            doc = ast.get_docstring(ast.parse(text)) or ""
            assert "longer than" in doc, f"{name}: {text.count(chr(10))} lines and no reason at its top"
