"""The package's floors: every import points down (or stays inside its own folder), and no module reaches into
another module's private names. Walks the source with `ast`, so imports inside functions count too."""

from __future__ import annotations

import ast
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
PACKAGES = ("sail_jax", "converters", "pallas_kernels")

# floor -> {group: module prefixes}. A module may import modules of a LOWER floor and modules of its own group;
# two groups on one floor (data | converters, training | inference) do not import each other. Floor 0 holds the
# small leaf modules every floor uses; pallas_kernels imports nothing of the project at all.
FLOORS: dict[int, dict[str, tuple[str, ...]]] = {
    0: {"base": ("sail_jax.config", "sail_jax.sharding", "sail_jax.jsonl", "sail_jax.files", "sail_jax.host_malloc",
                 "sail_jax.resources")},
    1: {"pallas_kernels": ("pallas_kernels",)},
    2: {"layers": ("sail_jax.layers",)},
    3: {"models": ("sail_jax.models", "sail_jax.params")},
    4: {"data": ("sail_jax.data",), "converters": ("converters",)},
    5: {"training": ("sail_jax.training",), "inference": ("sail_jax.inference",)},
    6: {"rl": ("sail_jax.rl",), "curation": ("sail_jax.curation",)},
    7: {"evaluation": ("sail_jax.evaluation",)},
    8: {"cli": ("sail_jax.cli", "sail_jax.demo", "sail_jax.__main__", "sail_jax")},
}


def _modules() -> dict[str, Path]:
    out = {}
    for pkg in PACKAGES:
        for path in sorted((ROOT / pkg).rglob("*.py")):
            parts = path.relative_to(ROOT).with_suffix("").parts
            name = ".".join(parts[:-1] if parts[-1] == "__init__" else parts)
            out[name] = path
    return out


MODULES = _modules()


def _floor(module: str) -> tuple[str, int]:
    """(group, floor) of the longest prefix that holds `module`."""
    best = None
    for floor, groups in FLOORS.items():
        for group, prefixes in groups.items():
            for prefix in prefixes:
                if (module == prefix or module.startswith(prefix + ".")) and (
                        best is None or len(prefix) > len(best[0])):
                    best = (prefix, group, floor)
    if best is None:
        raise AssertionError(f"{module}: on no floor; add it to FLOORS in {Path(__file__).name}")
    return best[1], best[2]


def _project_module(name: str) -> str | None:
    """The project module `name` refers to (itself or the package holding it), or None for outside code."""
    while name:
        if name in MODULES:
            return name
        name = name.rpartition(".")[0]
    return None


def _imports(module: str, path: Path) -> list[tuple[int, str, list[str]]]:
    """(line, imported module, names taken from it) for each import of project code."""
    tree = ast.parse(path.read_text(), filename=str(path))
    package = module if path.name == "__init__.py" else module.rpartition(".")[0]
    found = []
    for node in ast.walk(tree):
        if isinstance(node, ast.Import):
            for alias in node.names:
                target = _project_module(alias.name)
                if target:
                    found.append((node.lineno, target, []))
        elif isinstance(node, ast.ImportFrom):
            base = node.module or ""
            if node.level:
                anchor = package.split(".")[: len(package.split(".")) - node.level + 1]
                base = ".".join(anchor + ([base] if base else []))
            for alias in node.names:
                sub = _project_module(f"{base}.{alias.name}")
                if sub and sub == f"{base}.{alias.name}":  # `from pkg import submodule`
                    found.append((node.lineno, sub, []))
                else:
                    target = _project_module(base)
                    if target:
                        found.append((node.lineno, target, [alias.name]))
    return found


def _rel(path: Path) -> str:
    return str(path.relative_to(ROOT)) if path.is_relative_to(ROOT) else str(path)


def _is_private(name: str) -> bool:
    return name.startswith("_") and not (name.startswith("__") and name.endswith("__"))


def test_every_import_points_down_a_floor():
    bad = []
    for module, path in MODULES.items():
        group, floor = _floor(module)
        for line, target, _ in _imports(module, path):
            t_group, t_floor = _floor(target)
            if group == "pallas_kernels" and t_group != "pallas_kernels":
                bad.append(f"{_rel(path)}:{line}: pallas_kernels imports {target} (kernels are a leaf)")
            elif t_group != group and t_floor >= floor:
                bad.append(f"{_rel(path)}:{line}: {module} (floor {floor}) imports {target} "
                           f"(floor {t_floor})")
    assert not bad, "imports that point up or sideways:\n" + "\n".join(bad)


def test_no_module_uses_another_modules_private_names():
    bad = []
    for module, path in MODULES.items():
        for line, target, names in _imports(module, path):
            for name in names:
                if _is_private(name) and target != module:
                    bad.append(f"{_rel(path)}:{line}: imports {target}.{name}")
        # `mod._name` through an imported module alias.
        tree = ast.parse(path.read_text())
        aliases = {}
        for node in ast.walk(tree):
            if isinstance(node, ast.Import):
                for a in node.names:
                    if _project_module(a.name) == a.name:
                        aliases[a.asname or a.name] = a.name
            elif isinstance(node, ast.ImportFrom) and node.module and not node.level:
                for a in node.names:
                    full = f"{node.module}.{a.name}"
                    if full in MODULES:
                        aliases[a.asname or a.name] = full
        for node in ast.walk(tree):
            if (isinstance(node, ast.Attribute) and _is_private(node.attr) and isinstance(node.value, ast.Name)
                    and node.value.id in aliases and aliases[node.value.id] != module):
                bad.append(f"{_rel(path)}:{node.lineno}: uses {aliases[node.value.id]}.{node.attr}")
    assert not bad, "cross-module use of private names:\n" + "\n".join(bad)


@pytest.mark.parametrize("source, expect", [
    ("from sail_jax.cli import plot\n", "imports sail_jax.cli"),
    ("import sail_jax.sharding\n", "pallas_kernels imports"),
])
def test_the_check_catches_an_upward_import(tmp_path, monkeypatch, source, expect):
    """The walker itself: a planted upward import in a layer / a kernel is reported."""
    where = "sail_jax.layers.planted" if "cli" in source else "pallas_kernels.planted"
    planted = tmp_path / "planted.py"
    planted.write_text(source)
    monkeypatch.setitem(MODULES, where, planted)
    with pytest.raises(AssertionError, match=expect):
        test_every_import_points_down_a_floor()
