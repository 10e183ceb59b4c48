"""The import layers of docs/architecture.md (section Layers), checked on every import of every module.

The rules are read from the doc's table (one row per layer: which modules, and what they may import besides their
own layer), so the doc and the check cannot drift apart. Imports are parsed, not executed: ``import``, ``from ...
import`` (relative ones resolved), at module level, inside functions or under ``TYPE_CHECKING``, and
``importlib.import_module``/``__import__`` of a constant name. Planted violations show that the check fails.
"""

from __future__ import annotations

import ast
import re
import shutil
from dataclasses import dataclass
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
DOC = ROOT / "docs" / "architecture.md"
TREES = ("convert", "verify", "fixtures", "publish")  # the packages the layers cover (tests/ and bench/ are free)
LAYERS = ("cli", "publish", "fixtures", "verify", "convert")


@dataclass(frozen=True)
class Rules:
    layers: dict[str, set[str]]  # layer -> the layers it may import whole
    names: dict[str, set[str]]  # layer -> dotted module or module.name it may import besides those


def read_rules(doc: str) -> Rules:
    """The table under ``## Layers``: ``| layer | modules | may import |``. The third column lists layer names
    (a whole layer), backticked dotted names (one module, or one name of a module), or ``nothing``."""
    section = doc.split("\n## Layers\n", 1)[1].split("\n## ", 1)[0]
    layers: dict[str, set[str]] = {}
    names: dict[str, set[str]] = {}
    for line in section.splitlines():
        cells = [c.strip() for c in line.strip().strip("|").split("|")]
        if len(cells) != 3 or cells[0] not in LAYERS:
            continue
        layer, _, may = cells
        names[layer] = set(re.findall(r"`([A-Za-z_][\w.]*)`", may))
        words = {w.strip() for w in re.sub(r"`[^`]*`", "", may).split(",")} - {"", "nothing"}
        unknown = words - set(LAYERS)
        assert not unknown, f"docs/architecture.md, Layers, row {layer}: not a layer: {sorted(unknown)}"
        layers[layer] = words
    assert sorted(layers) == sorted(LAYERS), f"docs/architecture.md, Layers: rows {sorted(layers)}, want {LAYERS}"
    return Rules(layers, names)


def module_name(path: Path, root: Path) -> str:
    """The module a file of the tree is imported as (``verify/fixtures/__init__.py`` -> ``verify.fixtures``)."""
    parts = list(path.relative_to(root).with_suffix("").parts)
    if parts[-1] == "__init__":
        parts.pop()
    return ".".join(parts)


def layer_of(module: str) -> str | None:
    """The layer of a module of the project; None for the standard library and third-party packages. ``tests`` and
    ``bench`` are layers of their own that no package may import."""
    top = module.split(".")[0]
    if module in ("convert.cli", "convert.__main__") or module.startswith(("convert.cli.", "convert.__main__.")):
        return "cli"
    if top == "fixtures" or module.startswith("verify.fixtures."):
        return "fixtures"  # the fixtures/ folder's code, under either name (verify.fixtures itself is verify's)
    if top in ("convert", "verify", "publish", "tests", "bench"):
        return top
    return None


def _resolve(module: str, is_package: bool, level: int, target: str | None) -> str:
    base = module.split(".") if is_package else module.split(".")[:-1]
    base = base[: len(base) - (level - 1)] if level > 1 else base
    return ".".join([*base, *([target] if target else [])])


def imports(source: str, module: str, is_package: bool) -> list[tuple[int, str, str | None]]:
    """Every import in ``source``: ``(line, module, name or None)``; ``from m import n`` gives ``(m, n)``."""
    found: list[tuple[int, str, str | None]] = []
    for node in ast.walk(ast.parse(source)):
        if isinstance(node, ast.Import):
            found += [(node.lineno, a.name, None) for a in node.names]
        elif isinstance(node, ast.ImportFrom):
            target = _resolve(module, is_package, node.level, node.module) if node.level else node.module or ""
            found += [(node.lineno, target, a.name) for a in node.names]
        elif isinstance(node, ast.Call) and node.args and isinstance(node.args[0], ast.Constant):
            func = node.func
            called = func.attr if isinstance(func, ast.Attribute) else func.id if isinstance(func, ast.Name) else ""
            if called in ("import_module", "__import__") and isinstance(node.args[0].value, str):
                found.append((node.lineno, node.args[0].value, None))
    return found


def violations(root: Path, rules: Rules) -> list[str]:
    """``file:line: layer -> what`` for every import that breaks the rules, in the trees under ``root``."""
    out: list[tuple[str, int, str]] = []
    for tree in TREES:
        for path in sorted((root / tree).rglob("*.py")):
            module = module_name(path, root)
            source_layer = layer_of(module)
            assert source_layer in LAYERS, f"{path}: in no layer"
            for line, target, name in imports(path.read_text(), module, path.name == "__init__.py"):
                full = f"{target}.{name}" if name and name != "*" else target
                target_layer = layer_of(full)  # by the full name: ``from convert import cli`` imports convert.cli
                if target_layer is None or target_layer == source_layer:
                    continue
                if target_layer in rules.layers[source_layer]:
                    continue
                allowed = rules.names[source_layer]
                if target in allowed or full in allowed:
                    continue
                out.append((path.relative_to(root).as_posix(), line, f"{source_layer} -> {full} ({target_layer})"))
    return [f"{where}:{line}: {what}" for where, line, what in sorted(out)]


@pytest.fixture(scope="module")
def rules() -> Rules:
    return read_rules(DOC.read_text())


def test_every_import_follows_the_documented_layers(rules):
    found = violations(ROOT, rules)
    assert not found, "imports that break docs/architecture.md, Layers:\n" + "\n".join(found)


def test_the_documented_layers_form_no_cycle(rules):
    """Each layer may import only layers further down the table: the import graph of the packages is acyclic."""
    order = {name: i for i, name in enumerate(LAYERS)}  # the table's order, top first
    for layer, allowed in rules.layers.items():
        upward = [a for a in allowed if order[a] <= order[layer]]
        assert not upward, f"{layer} may import {upward}, which is not below it"
        named_layers = {layer_of(n) for n in rules.names[layer]}
        assert all(order[n] > order[layer] for n in named_layers if n), (layer, rules.names[layer])
    assert rules.layers["convert"] == set() and rules.names["convert"] == set()  # the converter needs nothing else


def test_the_layer_of_each_kind_of_module():
    assert layer_of("convert.cli") == layer_of("convert.__main__") == "cli"
    assert layer_of("convert") == layer_of("convert.safejson") == "convert"
    assert layer_of("verify.fixtures") == layer_of("verify.samples") == "verify"
    assert layer_of("verify.fixtures.build") == layer_of("fixtures.build") == layer_of("fixtures") == "fixtures"
    assert layer_of("publish") == "publish" and layer_of("tests.recording_hub") == "tests"
    assert layer_of("torch") is None and layer_of("huggingface_hub") is None and layer_of("converter") is None


@pytest.mark.parametrize(
    "where, code, expected",
    [
        # the crossings this layering removed, planted back
        (
            "convert/publish.py",
            (ROOT / "publish" / "__init__.py").read_text(),
            "convert -> verify.api.verify_repo (verify)",
        ),
        ("verify/planted.py", "from verify.fixtures.build import sample_prompts\n", "verify.fixtures.build.sample"),
        # conversion logic in the verifier (its independence), at function level and through a relative import
        ("verify/planted.py", "def f():\n    from convert.mapping import RULES\n", "verify -> convert.mapping.RULES"),
        ("verify/planted.py", "from convert import mapping\n", "verify -> convert.mapping (convert)"),
        ("verify/planted.py", "from convert.writer import write_json\n", "convert.writer.write_json"),
        ("verify/sub/planted.py", "from ...convert import config\n", "verify -> convert.config (convert)"),
        # upward imports, including dynamic and type-only ones
        ("convert/planted.py", "import importlib\nimportlib.import_module('publish')\n", "convert -> publish"),
        ("convert/planted.py", "if TYPE_CHECKING:\n    from verify.report import Report\n", "convert -> verify."),
        ("fixtures/planted.py", "import publish\n", "fixtures -> publish (publish)"),
        ("publish/planted.py", "from fixtures.build import demo_fixture\n", "publish -> fixtures.build.demo_fixture"),
        ("publish/planted.py", "from tests.recording_hub import RecordingHubApi\n", "(tests)"),
        ("verify/planted.py", "from convert.cli import main\n", "verify -> convert.cli.main (cli)"),
    ],
)
def test_a_planted_import_against_the_layers_fails(rules, tmp_path, where, code, expected):
    """On a copy of the tree, one planted module: the check names its file, line and the import."""
    for tree in TREES:
        shutil.copytree(
            ROOT / tree,
            tmp_path / tree,
            ignore=shutil.ignore_patterns("__pycache__", "*.json", "*.png", "*.model", "*.txt"),
        )
    assert violations(tmp_path, rules) == []
    planted = tmp_path / where
    planted.parent.mkdir(parents=True, exist_ok=True)
    planted.write_text(code)
    found = violations(tmp_path, rules)
    assert len(found) >= 1 and all(f.startswith(f"{where}:") for f in found), found
    assert any(expected in f for f in found), found


def test_the_allowed_plumbing_passes_and_nothing_more(rules, tmp_path):
    """What the table allows verify to take from convert passes; a neighbour of it does not."""
    (tmp_path / "verify").mkdir()
    (tmp_path / "verify" / "ok.py").write_text(
        "from convert import __version__\nfrom convert.safejson import clean\nimport convert.preflight\n"
        "from convert.stream import InputStream\nimport verify.fixtures\nfrom . import samples\n"
    )
    for tree in ("convert", "fixtures", "publish"):
        (tmp_path / tree).mkdir()
    assert violations(tmp_path, rules) == []
    (tmp_path / "verify" / "bad.py").write_text("from convert import MANIFEST, __version__\n")
    assert violations(tmp_path, rules) == ["verify/bad.py:1: verify -> convert.MANIFEST (convert)"]


def test_a_row_naming_no_layer_is_refused():
    doc = DOC.read_text().replace("| convert, verify |", "| convert, verifier |")
    with pytest.raises(AssertionError, match="not a layer: \\['verifier'\\]"):
        read_rules(doc)
