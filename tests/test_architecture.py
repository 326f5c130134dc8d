"""The rules of docs/architecture.md, read from the source: one-way stage imports, no family names in stages."""

from __future__ import annotations

import ast
import io
import re
import sys
import tokenize
from pathlib import Path

import pytest

from vitedge.families import available_families, get_family

PACKAGE = Path(__file__).resolve().parents[1] / "vitedge"

# The one-way order: a module may import modules of its own layer or of earlier ones, never later ones.
LAYERS = [
    ("base", {"errors", "version", "artifact", "report", "runtime", "devices", "data",
              "shape_inference", "tokens", "trt_runtime", "reading", "schema", "resources", "interrupts"}),
    # Model parts and the rewrite registry the families fill (rewrite.to_static runs after load).
    ("model parts", {"backbone", "backbones", "rewrite"}),
    ("load", {"families", "load", "calibrate", "recipe"}),
    ("export", {"export"}),
    ("check/validate", {"check", "validate", "artifact_export"}),
    # ONNX Runtime graph passes, re-validated with validate's check (model.ort.onnx)
    ("optimize", {"optimize"}),
    ("quantize", {"quantize"}),
    ("build/profile", {"build", "profile", "staircase"}),
    ("tune/bundle", {"tune", "bundle"}),
    ("orchestration", {"pipeline"}),
    ("cli", {"cli", "setting_options", "__init__", "__main__"}),
]
LAYER = {module: index for index, (_, modules) in enumerate(LAYERS) for module in modules}


def _unit(path: Path) -> str:
    """The top-level unit a file belongs to: ``vitedge/families/evit.py`` → ``families``."""
    parts = path.relative_to(PACKAGE).with_suffix("").parts
    return parts[0]


def _imported_units(path: Path) -> set[str]:
    """vitedge units a file imports (relative or absolute, at the top or inside functions)."""
    tree = ast.parse(path.read_text())
    package_parts = path.relative_to(PACKAGE).parent.parts
    units = set()
    for node in _runtime_nodes(tree):
        if isinstance(node, ast.Import):
            for alias in node.names:
                if alias.name == "vitedge":
                    units.add("__init__")
                elif alias.name.startswith("vitedge."):
                    units.add(alias.name.split(".")[1])
        elif isinstance(node, ast.ImportFrom):
            if node.level == 0:
                if node.module == "vitedge":
                    units.update(a.name if (PACKAGE / f"{a.name}.py").exists() else "__init__" for a in node.names)
                elif node.module and node.module.startswith("vitedge."):
                    units.add(node.module.split(".")[1])
                continue
            base = list(package_parts[: len(package_parts) - (node.level - 1)])
            target = base + (node.module.split(".") if node.module else [])
            if target:
                units.add(target[0])
            else:  # ``from . import x`` at the package root: x is a module or a name of __init__
                units.update(a.name if (PACKAGE / a.name).with_suffix(".py").exists() or (PACKAGE / a.name).is_dir()
                             else "__init__" for a in node.names)
    return units


def _runtime_nodes(tree: ast.AST):
    """Every node except those under ``if TYPE_CHECKING:`` (annotations only, never imported at run time)."""
    for node in ast.iter_child_nodes(tree):
        if isinstance(node, ast.If) and isinstance(node.test, ast.Name) and node.test.id == "TYPE_CHECKING":
            yield from (n for child in node.orelse for n in [child, *_runtime_nodes(child)])
            continue
        yield node
        yield from _runtime_nodes(node)


def _import_graph() -> dict[str, set[str]]:
    graph: dict[str, set[str]] = {}
    for path in sorted(PACKAGE.rglob("*.py")):
        unit = _unit(path)
        graph.setdefault(unit, set()).update(_imported_units(path) - {unit})
    return graph


def test_every_module_has_a_layer():
    unplaced = sorted(set(_import_graph()) - set(LAYER))
    assert not unplaced, f"give {unplaced} a layer in LAYERS (and a row in docs/architecture.md)"


def test_imports_run_one_way():
    backwards = [
        f"{unit} ({LAYERS[LAYER[unit]][0]}) imports {other} ({LAYERS[LAYER[other]][0]})"
        for unit, imported in _import_graph().items() for other in sorted(imported)
        if unit in LAYER and other in LAYER and LAYER[other] > LAYER[unit]
    ]
    assert not backwards, backwards


def test_no_import_cycles():
    graph = _import_graph()
    state: dict[str, str] = {}

    def visit(unit: str, trail: list[str]) -> None:
        state[unit] = "open"
        for other in sorted(graph.get(unit, ())):
            if state.get(other) == "open":
                raise AssertionError("import cycle: " + " -> ".join([*trail[trail.index(other):], other]))
            if other not in state:
                visit(other, [*trail, other])
        state[unit] = "done"

    for unit in sorted(graph):
        if unit not in state:
            visit(unit, [unit])


def test_pipeline_is_imported_only_by_the_cli_and_the_package():
    importers = sorted(unit for unit, imported in _import_graph().items() if "pipeline" in imported)
    assert set(importers) <= {"__init__", "cli"}, importers


def test_the_import_reader_sees_a_backward_import(tmp_path, monkeypatch):
    """The rule can fail: a stage that imports the pipeline back is reported."""
    fake = tmp_path / "vitedge"
    (fake / "families").mkdir(parents=True)
    (fake / "validate.py").write_text("def f():\n    from .pipeline import export\n")
    (fake / "pipeline.py").write_text("from .validate import f\n")
    (fake / "families" / "evit.py").write_text("from ..load import x\nfrom . import helpers\n")
    monkeypatch.setattr(sys.modules[__name__], "PACKAGE", fake)
    graph = _import_graph()
    assert graph["validate"] == {"pipeline"} and graph["families"] == {"load"}
    with pytest.raises(AssertionError, match="validate.*pipeline"):
        test_imports_run_one_way()
    with pytest.raises(AssertionError, match="import cycle"):
        test_no_import_cycles()


# Words that are both a family's setting name and a stage concept; each one's stage meaning is not the knob's.
ALLOWED_WORDS = {
    # vitedge.json "input.resolution": the size range of a dynamic-resolution graph (SuperViT's setting of the
    # same name is one variant's input size, read only by its family).
    "resolution": "dynamic-resolution range",
    # vitedge.json "token_budgets": every plan's token counts per block (A-ViT's setting of the same name is one
    # plan's input); the calibration file kind "vitedge-token-budgets" predates the generic calibration.
    "token_budgets": "the plan's section of vitedge.json",
    # The evaluation-transform presets "deit"/"deit-384" (vitedge/data/transform.py, export --transform) name
    # DeiT's published eval recipe (crop 0.875, bicubic), which every DeiT-trained checkpoint uses whatever its
    # family; the dense family of the same name is never chosen through them.
    "deit": "DeiT's evaluation-transform preset",
}


def _word_pattern(word: str) -> re.Pattern:
    """``word`` (or its flag spelling, ``keep-rate``) as a whole word: not inside ``dynamic-resolution`` or ``fmnist-evit``."""
    forms = sorted({word, word.replace("_", "-")}, key=len, reverse=True)
    return re.compile(r"(?<!\w)(?<!\w-)(?:" + "|".join(map(re.escape, forms)) + r")(?!\w)(?!-\w)")


def _named_words() -> dict[str, str]:
    words = {name: "family" for name in available_families()}
    for name in available_families():
        words.update({s.name: f"setting of {name}" for s in get_family(name).settings if s.name not in words})
    return {word: kind for word, kind in words.items() if word not in ALLOWED_WORDS}


def _stage_files() -> list[Path]:
    return [p for p in sorted(PACKAGE.rglob("*.py")) if "families" not in p.relative_to(PACKAGE).parts]


def _mentions(files: list[Path], words: dict[str, str]) -> list[str]:
    found = []
    for path in files:
        for number, line in enumerate(path.read_text().splitlines(), 1):
            for word, kind in words.items():
                if _word_pattern(word).search(line):
                    found.append(f"{path.name}:{number}: {kind} '{word}': {line.strip()[:90]}")
    return found


def test_no_stage_or_cli_code_names_a_family_or_a_setting():
    """Stages reach families through the registry and the settings schema only (docs/architecture.md)."""
    found = _mentions(_stage_files(), _named_words())
    assert not found, "\n".join(found)


def test_the_name_check_sees_a_family_and_a_flag(tmp_path):
    """The check can fail: a family name in a message and a knob's flag spelling are both found."""
    stage = tmp_path / "stage.py"
    stage.write_text('raise Error("only family \'avit\' has budgets")\nflag = "--keep-rate"\n'
                     'fine = ("dynamic-resolution", "fmnist-evit.safetensors", "keep_rates_list")\n')
    found = _mentions([stage], {"avit": "family", "keep_rate": "setting", "resolution": "setting", "evit": "family"})
    assert [line.split(": ")[1] for line in found] == ["family 'avit'", "setting 'keep_rate'"]
