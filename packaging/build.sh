#!/usr/bin/env bash
# Build dist/tandem with PyInstaller from the project's virtual environment (made by `make setup`).
# GPU: build llama-cpp-python against CUDA or Metal first (CMAKE_ARGS, see README); the spec collects
# whatever backend libraries that build has.
set -euo pipefail
cd "$(dirname "$0")/.."
PY="${PY:-.venv/bin/python}"
"$PY" -m pip install --quiet "pyinstaller>=6.10"  # the `package` extra in pyproject.toml
"$PY" -m PyInstaller --noconfirm --clean --log-level WARN --distpath dist --workpath build/pyinstaller launcher.spec
ls -l dist/tandem
