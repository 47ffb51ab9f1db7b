"""The package stacks one way: ops -> layers -> heads -> runtime -> training / assets -> cli. Every
import inside ``jetspec`` (module level or inside a function) is read from the source and checked."""

from __future__ import annotations

import ast
from pathlib import Path

import jetspec

PACKAGE = Path(jetspec.__file__).parent
#: Rank of each layer; a module may import only from its own layer or lower ones. training and assets
#: share a rank but are separate layers: neither imports the other.
LAYERS = {"_C": 0, "settings": 0, "ops": 0, "layers": 1, "heads": 2, "runtime": 3, "training": 4, "assets": 4,
          "__init__": 5, "speed": 6, "cli": 7}


def layer_of(module: str) -> str:
    """``jetspec.ops.tree`` -> ``ops``; ``jetspec`` (the package's own __init__) -> ``__init__``."""
    parts = module.split(".")
    return parts[1] if len(parts) > 1 else "__init__"


def module_name(path: Path) -> str:
    rel = path.relative_to(PACKAGE.parent).with_suffix("")
    parts = list(rel.parts)
    return ".".join(parts[:-1] if parts[-1] == "__init__" else parts)


def is_module(name: str) -> bool:
    path = PACKAGE.parent.joinpath(*name.split("."))
    return path.with_suffix(".py").exists() or (path / "__init__.py").exists() or name == "jetspec._C"


def imported_modules(source: str, name: str, is_package: bool) -> list[str]:
    """The ``jetspec`` modules that the source of module ``name`` imports, relative imports resolved
    (``from X import y`` counts as importing ``X.y`` when that is a module, else ``X``)."""
    package = name if is_package else name.rsplit(".", 1)[0]
    found = []
    for node in ast.walk(ast.parse(source)):
        if isinstance(node, ast.Import):
            found += [alias.name for alias in node.names if alias.name.split(".")[0] == "jetspec"]
        elif isinstance(node, ast.ImportFrom):
            if node.level:
                base = package.split(".")[: len(package.split(".")) - node.level + 1]
                target = ".".join(base + ([node.module] if node.module else []))
            else:
                target = node.module or ""
            if target.split(".")[0] == "jetspec":
                found += [f"{target}.{a.name}" if is_module(f"{target}.{a.name}") else target for a in node.names]
    return found


def breaks_layering(own: str, other: str) -> bool:
    """Whether a module of layer ``own`` may not import one of layer ``other``."""
    return LAYERS[other] > LAYERS[own] or (LAYERS[other] == LAYERS[own] and {own, other} == {"training", "assets"})


def test_no_layer_imports_a_higher_one():
    sources = sorted(PACKAGE.rglob("*.py"))
    assert len(sources) > 20
    wrong = []
    for path in sources:
        own = layer_of(module_name(path))
        for target in imported_modules(path.read_text(), module_name(path), path.name == "__init__.py"):
            other = layer_of(target)
            if other not in LAYERS:
                wrong.append(f"{path.relative_to(PACKAGE)} imports {target}: not in any layer")
            elif breaks_layering(own, other):
                wrong.append(f"{path.relative_to(PACKAGE)} ({own}) imports {target} ({other})")
    assert not wrong, "\n".join(wrong)


def test_the_checker_sees_an_upward_import():
    """A module of the ops layer importing the runtime, or the training layer importing assets, is caught
    (the test above can fail)."""
    assert imported_modules("from ..runtime import Target\n", "jetspec.ops.probe", False) == ["jetspec.runtime"]
    assert imported_modules("from . import ops\n", "jetspec", True) == ["jetspec.ops"]
    assert imported_modules("from ..assets.tiny import x\n", "jetspec.training.probe", False) == ["jetspec.assets.tiny"]
    assert breaks_layering("ops", "runtime") and breaks_layering("training", "assets")
    assert not breaks_layering("runtime", "ops") and not breaks_layering("ops", "_C")
