"""The code's structure, checked: ``mfli serve`` never loads torch.

The server is the process with the tightest memory and start-up budget, and it runs the published
query encoder in numpy precisely so that it does not need torch (docs/design.md, "Serving"). Importing
torch costs ~1.3 s and ~200 MB of RSS, and nothing stops a stray import from creeping into the serving
path, so this runs the real entry point in a fresh interpreter and looks at ``sys.modules``.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]

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
