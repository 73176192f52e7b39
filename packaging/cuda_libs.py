"""Prepare a venv for a CUDA build of llama.cpp; print the CMake arguments that build needs.

Run by `make setup` when CMAKE_ARGS asks for GGML_CUDA. Two gaps are filled from PyPI:
- The CUDA runtime libraries a user's machine lacks (libcudart, libcublas): NVIDIA's own wheels go into the
  venv, app/engine/backends.py loads them before llama.cpp's backends, and the one-file binary carries them.
- A toolkit with `nvcc` but no cuBLAS headers or libraries (as on Tandem's development machines): CMake is
  pointed at the wheel's copies. A toolkit without the driver stub (lib64/stubs/libcuda.so) builds without
  llama.cpp's virtual-memory pool (GGML_CUDA_NO_VMM), the one part that links the driver directly.
"""

from __future__ import annotations

import importlib
import os
import re
import shutil
import subprocess
import sys
from pathlib import Path


def toolkit() -> tuple[Path, tuple[int, int]]:
    """The CUDA toolkit's root and its version, from the nvcc CMake would use."""
    nvcc = shutil.which("nvcc") or str(Path(os.environ.get("CUDA_HOME", "/usr/local/cuda")) / "bin" / "nvcc")
    if not Path(nvcc).exists():
        sys.exit("cuda_libs: no nvcc on PATH or in $CUDA_HOME/bin: install the CUDA toolkit first")
    text = subprocess.run([nvcc, "--version"], capture_output=True, text=True, check=True).stdout
    found = re.search(r"release (\d+)\.(\d+)", text)
    if found is None:
        sys.exit(f"cuda_libs: cannot read a version from `{nvcc} --version`")
    root = Path(os.environ.get("CUDA_HOME") or "/usr/local/cuda")
    if not (root / "include" / "cuda_runtime.h").exists():
        root = Path(nvcc).resolve().parent.parent
    return root, (int(found[1]), int(found[2]))


def wheel_names(version: tuple[int, int]) -> list[str]:
    """NVIDIA's runtime wheels for this toolkit: named by major version up to 12, plainly from 13 on."""
    major, minor = version
    suffix = f"-cu{major}" if major <= 12 else ""
    return [f"nvidia-cuda-runtime{suffix}=={major}.{minor}.*", f"nvidia-cublas{suffix}=={major}.{minor}.*"]


def wheel_files(pattern: str) -> list[Path]:
    """Files under the installed `nvidia` namespace package (cu13 wheels: nvidia/cu13/lib; cu12: nvidia/*/lib)."""
    importlib.invalidate_caches()
    roots = [Path(p) for p in importlib.import_module("nvidia").__path__]
    return sorted(path for root in roots for path in root.glob(pattern))


def cublas_args(venv: Path) -> list[str]:
    """CMake cache entries pointing FindCUDAToolkit at the wheel's cuBLAS (it wants unversioned .so names)."""
    headers = wheel_files("*/include/cublas_v2.h")
    if not headers:
        sys.exit("cuda_libs: the nvidia-cublas wheel installed no cublas_v2.h")
    links = venv / "cuda-link"
    links.mkdir(exist_ok=True)
    args = [f"-DCMAKE_CUDA_FLAGS=-isystem={headers[0].parent}"]
    for name in ("cublas", "cublasLt"):
        versioned = wheel_files(f"*/lib/lib{name}.so.*")
        if not versioned:
            sys.exit(f"cuda_libs: the nvidia-cublas wheel installed no lib{name}.so")
        link = links / f"lib{name}.so"
        link.unlink(missing_ok=True)
        link.symlink_to(versioned[0])
        args.append(f"-DCUDA_{name}_LIBRARY={link}")
    return args


def main() -> None:
    venv = Path(sys.prefix)
    root, version = toolkit()
    subprocess.run([sys.executable, "-m", "pip", "install", "--quiet", *wheel_names(version)], check=True)
    args = [] if (root / "include" / "cublas_v2.h").exists() else cublas_args(venv)
    if not list(root.glob("lib*/stubs/libcuda.so")) and not list(root.glob("targets/*/lib/stubs/libcuda.so")):
        print(f"cuda_libs: {root} has no driver stub (stubs/libcuda.so): building with GGML_CUDA_NO_VMM",
              file=sys.stderr)
        args.append("-DGGML_CUDA_NO_VMM=ON")
    print(" ".join(args))


if __name__ == "__main__":
    main()
