"""One direction of dependency: the engine, config, history and the headless path never import Textual;
the app imports the engine, never the other way round."""

from __future__ import annotations

import ast
import subprocess
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
UI_PACKAGES = ("textual", "rich", "app.tui")


def imported_modules(path: Path) -> set[str]:
    names: set[str] = set()
    for node in ast.walk(ast.parse(path.read_text(), filename=str(path))):
        if isinstance(node, ast.Import):
            names.update(alias.name for alias in node.names)
        elif isinstance(node, ast.ImportFrom) and node.module:
            names.add(node.module)
    return names


def test_engine_sources_import_no_ui() -> None:
    offenders = {
        str(path.relative_to(ROOT)): sorted(m for m in imported_modules(path) if m.startswith(UI_PACKAGES))
        for path in [
            *(ROOT / "app" / "engine").rglob("*.py"),
            *(ROOT / "app" / "server").rglob("*.py"),
            *(ROOT / "app" / n for n in ("config.py", "history.py", "benchmark.py", "host.py")),
        ]
    }
    assert {k: v for k, v in offenders.items() if v} == {}


def test_headless_run_never_loads_textual(tiny) -> None:
    code = (
        "import sys, runpy\n"
        f"sys.argv = ['tandem', '--model', {str(tiny.main)!r}, '--draft', {str(tiny.draft)!r}, "
        "'--prompt', 'hi', '-n', '4', '--json', '-t', '2', '-c', '256']\n"
        "from app.cli import main\n"
        "rc = main()\n"
        "loaded = [m for m in sys.modules if m.split('.')[0] in ('textual', 'rich') or m.startswith('app.tui')]\n"
        "assert rc == 0 and not loaded, (rc, loaded)\n"
    )
    result = subprocess.run([sys.executable, "-c", code], cwd=ROOT, capture_output=True, text=True, timeout=120)
    assert result.returncode == 0, result.stderr
