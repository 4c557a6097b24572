"""The code's structure, checked: the floors hold (docs/design.md §Code map) and ``mfli serve`` never
loads torch.

Floors: ``tools/import_graph.py`` reads every import from the source (module level, inside functions,
under ``TYPE_CHECKING``) and reports upward imports, undeclared lateral ones, access to a package's
private module and cycles; the repository must have none, and the checker must catch each kind.

torch: the server is the process with the tightest memory and start-up budget, and it runs the
published query encoder in numpy precisely so that it does not need torch (docs/design.md §Serving).
Importing torch costs ~1.3 s and ~250 MB of RSS, and nothing stops a stray import from creeping into
the serving path, so the real entry point runs in a fresh interpreter and ``sys.modules`` is checked.
"""

from __future__ import annotations

import importlib.util
import json
import os
import subprocess
import sys
from pathlib import Path
from types import ModuleType

ROOT = Path(__file__).resolve().parents[1]


def _import_graph() -> ModuleType:
    """``tools/import_graph.py`` (a script, not part of the installed package) as a module."""
    if "import_graph" not in sys.modules:
        spec = importlib.util.spec_from_file_location("import_graph", ROOT / "tools" / "import_graph.py")
        assert spec is not None and spec.loader is not None
        module = importlib.util.module_from_spec(spec)
        sys.modules["import_graph"] = module  # dataclasses resolve annotations through sys.modules
        spec.loader.exec_module(module)
    return sys.modules["import_graph"]


def test_the_source_keeps_its_floors_without_cycles() -> None:
    ig = _import_graph()
    graph = ig.build(ROOT)
    # the graph is really read from the tree: every floor populated, known edges present
    floors = {ig.floor_of(m)[0] for m in graph.modules}
    assert floors == {0, 1, 2} and len(graph.modules) > 80
    assert "mfli.storage.index.reader" in graph.imports["mfli.server.lmdb_state"]
    assert "mfli.consumers.stream" in graph.imports["mfli.learner.process"]
    assert "mfli.learner.learner" in graph.imports["mfli.evaluation.prequential"]
    assert ig.violations(graph) == []


def test_the_floor_check_catches_upward_lateral_private_and_cyclic_imports(tmp_path: Path) -> None:
    """A miniature tree with one of each mistake, hidden where they hide in practice (inside a
    function, under TYPE_CHECKING, as a relative import)."""
    files = {
        "pyproject.toml": '[tool.setuptools]\npackage-dir = { "mfli" = "mfli", "mfli.learner" = "learner", '
                          '"mfli.server" = "server" }\n',
        "mfli/config.py": "def load():\n    from mfli.learner import model\n    return model\n",
        "mfli/storage/__init__.py": "",
        "mfli/storage/index/__init__.py": "",
        "mfli/storage/index/layout.py": "",
        "mfli/storage/index/reader.py": "from mfli.storage.index import layout\n",
        "learner/__init__.py": "",
        "learner/model.py": "from typing import TYPE_CHECKING\n"
                            "if TYPE_CHECKING:\n    from mfli.learner.step import Step\n",
        "learner/step.py": "from . import model\nclass Step: ...\n",
        "server/__init__.py": "",
        "server/app.py": "import mfli.learner.model\nfrom mfli.storage.index import layout\n",
    }
    for name, text in files.items():
        (tmp_path / name).parent.mkdir(parents=True, exist_ok=True)
        (tmp_path / name).write_text(text)
    ig = _import_graph()
    found = ig.violations(ig.build(tmp_path))
    kinds = sorted(v.split(":")[0] for v in found)
    assert kinds == ["cycle", "lateral", "private", "upward"], found
    assert any(v.startswith("upward: mfli.config (line 2) imports mfli.learner.model") for v in found)
    assert "cycle: mfli.learner.model <-> mfli.learner.step" in found
    assert any(v.startswith("lateral: mfli.server.app") for v in found)
    assert any(v.startswith("private: mfli.server.app") and "mfli.storage.index.layout" in v for v in found)
    # the index's own reader may use its layout: not reported
    assert not any("mfli.storage.index.reader" in v for v in found)

# The server's whole start-up in one interpreter: the CLI dispatch of `mfli serve`, the app factory
# uvicorn calls in each worker, and the ASGI lifespan start-up (kernel warm-up, stores opened, monitor
# started) and shutdown. Prints the torch, learner and evaluation modules that got loaded.
SERVE_PROBE = """
import asyncio, json, sys
from mfli.orchestration import cli
assert cli.main(["serve", "--write-openapi", sys.argv[1]]) == 0
from mfli.server.process import app_factory
app = app_factory()
async def lifespan():
    inbox = asyncio.Queue()
    for message in ({"type": "lifespan.startup"}, {"type": "lifespan.shutdown"}):
        inbox.put_nowait(message)
    sent = []
    async def send(message):
        sent.append(message["type"])
    await app({"type": "lifespan"}, inbox.get, send)
    return sent
sent = asyncio.run(lifespan())
assert sent == ["lifespan.startup.complete", "lifespan.shutdown.complete"], sent
{extra}
heavy = ("torch", "mfli.learner", "mfli.evaluation")
print(json.dumps(sorted(m for m in sys.modules if m.split(".")[0] == "torch" or m.startswith(heavy[1:]))))
"""


def _loaded_after_serve(tmp_path: Path, extra: str = "") -> list[str]:
    env = {**os.environ, "MFLI_INDEX__PATH": str(tmp_path / "index.lmdb"),
           "MFLI_LEARNER__USERS_PATH": str(tmp_path / "users.lmdb"), "MFLI_LOG_LEVEL": "WARNING"}
    out = subprocess.run([sys.executable, "-c", SERVE_PROBE.replace("{extra}", extra), str(tmp_path / "openapi.json")],
                         cwd=ROOT, env=env, capture_output=True, text=True, timeout=300)
    assert out.returncode == 0, out.stderr[-3000:]
    assert (tmp_path / "openapi.json").stat().st_size > 0
    return json.loads(out.stdout.strip().splitlines()[-1])


def test_mfli_serve_start_up_imports_no_torch(tmp_path: Path) -> None:
    loaded = _loaded_after_serve(tmp_path)
    assert loaded == [], f"`mfli serve` loaded {loaded[:10]}"


def test_the_probe_sees_torch_when_something_imports_it(tmp_path: Path) -> None:
    """The check above can fail: the same probe, with the learner imported, reports torch."""
    loaded = _loaded_after_serve(tmp_path, extra="import mfli.learner.learner")
    assert "torch" in loaded and "mfli.learner.learner" in loaded


def _deferred_imports() -> list[tuple[str, int, str, str]]:
    """(file, line, module, name) of every ``from mfli... import name`` inside a function body: those run
    only when the function does, so a name that moved away fails at run time, not at import time."""
    import ast
    import tomllib

    dirs = tomllib.loads((ROOT / "pyproject.toml").read_text())["tool"]["setuptools"]["package-dir"]
    out = []
    for folder in sorted(set(dirs.values())):
        for path in sorted((ROOT / folder).rglob("*.py")):
            tree = ast.parse(path.read_text(), filename=str(path))
            for fn in ast.walk(tree):
                if not isinstance(fn, ast.FunctionDef | ast.AsyncFunctionDef):
                    continue
                for node in ast.walk(fn):
                    if isinstance(node, ast.ImportFrom) and node.module and node.module.startswith("mfli"):
                        out += [(str(path.relative_to(ROOT)), node.lineno, node.module, a.name) for a in node.names]
    return out


def test_every_deferred_import_names_something_that_exists() -> None:
    """A merge once moved ``synthetic_catalogue`` to another module while a function-level import still
    named the old one; only running that benchmark found it. Module-level imports fail at import time
    already; this checks the deferred ones."""
    import importlib

    found = _deferred_imports()
    assert len(found) > 20, "the scan found almost no deferred imports: it is not reading the source"
    missing = []
    for path, line, module, name in found:
        try:
            mod = importlib.import_module(module)
        except ImportError as exc:
            missing.append(f"{path}:{line}: {module} ({exc})")
            continue
        if hasattr(mod, name):
            continue
        try:  # ``from package import submodule`` names a module, not an attribute
            is_module = importlib.util.find_spec(f"{module}.{name}") is not None
        except ModuleNotFoundError:  # ``module`` is not a package
            is_module = False
        if not is_module:
            missing.append(f"{path}:{line}: {module}.{name}")
    assert not missing, "deferred imports of names that do not exist:\n" + "\n".join(missing)
