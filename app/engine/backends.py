"""Which llama.cpp backends this process runs on: the CPU build that fits this CPU, and any GPU or RPC backend.

Tandem's llama.cpp is built once for every x86-64 CPU (Makefile: GGML_BACKEND_DL, GGML_CPU_ALL_VARIANTS): the
CPU backend is a set of libraries, one per instruction-set level (libggml-cpu-x64.so for any x86-64 CPU,
-sse42, -haswell for AVX2, -skylakex/-icelake/-zen4 for AVX-512 kinds, -sapphirerapids with AMX, ...). None is
linked in; before the first model loads, llama.cpp's own loader (ggml_backend_load_all_from_path) scores each
against the CPU it runs on and loads the best, and loads a GPU (CUDA...) or RPC backend where the build has one.
A library built for another CPU is never executed, so no CPU dies of an illegal instruction.

A build with the CPU backend linked in (an older wheel, another project's) has backends registered already;
it is used as it is and reported as such.
"""

from __future__ import annotations

import ctypes
import ctypes.util
import functools
import importlib.util
import os
import sys
from dataclasses import dataclass
from pathlib import Path

import llama_cpp

from app.engine.errors import TandemError

BUILT_IN = "built-in"  # the CPU backend linked into libggml: not a loadable variant
_CPU, _GPU, _IGPU = 0, 1, 2  # ggml_backend_dev_type


@dataclass(frozen=True)
class Backends:
    cpu_variant: str  # the CPU library loaded ("sapphirerapids", "haswell", "x64"...) or BUILT_IN
    cpu_name: str  # the CPU as the backend describes it
    features: tuple[str, ...]  # instruction sets the loaded CPU backend uses (AVX2, AVX512, AMX_INT8...)
    accelerators: tuple[str, ...]  # GPU and RPC devices ("CUDA0: NVIDIA H200"), empty on a CPU-only machine

    @property
    def amx(self) -> bool:
        return "AMX_INT8" in self.features

    def describe(self) -> str:
        text = f"CPU backend {self.cpu_variant} on {self.cpu_name}"
        if self.accelerators:
            text += "; " + ", ".join(self.accelerators)
        return text


def library_dir() -> Path:
    """Where llama-cpp-python keeps libllama and the ggml libraries (the frozen app sets LLAMA_CPP_LIB_PATH)."""
    return Path(os.environ.get("LLAMA_CPP_LIB_PATH") or Path(llama_cpp.__file__).parent / "lib")


ABORT_CALLBACK = ctypes.CFUNCTYPE(None, ctypes.c_char_p)  # ggml_abort_callback_t: (message)


class _Feature(ctypes.Structure):
    _fields_ = [("name", ctypes.c_char_p), ("value", ctypes.c_char_p)]


class InitParams(ctypes.Structure):  # struct ggml_init_params
    _fields_ = [("mem_size", ctypes.c_size_t), ("mem_buffer", ctypes.c_void_p), ("no_alloc", ctypes.c_bool)]


class _DlInfo(ctypes.Structure):
    _fields_ = [
        ("dli_fname", ctypes.c_char_p), ("dli_fbase", ctypes.c_void_p), ("dli_sname", ctypes.c_char_p), ("dli_saddr", ctypes.c_void_p),
    ]  # fmt: skip


@functools.cache
def ggml() -> ctypes.CDLL:
    """libggml, already loaded by libllama: its backend registry and device API, which llama-cpp-python does
    not wrap (abetlen/llama-cpp-python#2069)."""
    lib = ctypes.CDLL(str(_libggml_path()))
    signatures = {
        "ggml_backend_load_all_from_path": ([ctypes.c_char_p], None),
        "ggml_backend_reg_count": ([], ctypes.c_size_t),
        "ggml_backend_reg_get": ([ctypes.c_size_t], ctypes.c_void_p),
        "ggml_backend_reg_name": ([ctypes.c_void_p], ctypes.c_char_p),
        "ggml_backend_reg_get_proc_address": ([ctypes.c_void_p, ctypes.c_char_p], ctypes.c_void_p),
        "ggml_backend_reg_by_name": ([ctypes.c_char_p], ctypes.c_void_p),
        "ggml_backend_reg_dev_count": ([ctypes.c_void_p], ctypes.c_size_t),
        "ggml_backend_reg_dev_get": ([ctypes.c_void_p, ctypes.c_size_t], ctypes.c_void_p),
        "ggml_set_abort_callback": ([ABORT_CALLBACK], ctypes.c_void_p),  # in libggml-base, found through libggml
        "ggml_backend_dev_count": ([], ctypes.c_size_t),
        "ggml_backend_dev_get": ([ctypes.c_size_t], ctypes.c_void_p),
        "ggml_backend_dev_type": ([ctypes.c_void_p], ctypes.c_int),
        "ggml_backend_dev_name": ([ctypes.c_void_p], ctypes.c_char_p),
        "ggml_backend_dev_description": ([ctypes.c_void_p], ctypes.c_char_p),
        "ggml_backend_dev_memory": ([ctypes.c_void_p, ctypes.POINTER(ctypes.c_size_t), ctypes.POINTER(ctypes.c_size_t)], None),
        "ggml_backend_dev_backend_reg": ([ctypes.c_void_p], ctypes.c_void_p),
        # what kernels.py asks of buffer types (the question llama.cpp's loader asks before placing a weight)
        "ggml_backend_buft_name": ([ctypes.c_void_p], ctypes.c_char_p),
        "ggml_backend_buft_alloc_buffer": ([ctypes.c_void_p, ctypes.c_size_t], ctypes.c_void_p),
        "ggml_backend_buffer_free": ([ctypes.c_void_p], None),
        "ggml_backend_dev_supports_op": ([ctypes.c_void_p, ctypes.c_void_p], ctypes.c_bool),
        "ggml_tensor_overhead": ([], ctypes.c_size_t),
        "ggml_init": ([InitParams], ctypes.c_void_p),
        "ggml_free": ([ctypes.c_void_p], None),
        "ggml_new_tensor_4d": ([ctypes.c_void_p, ctypes.c_int, *[ctypes.c_int64] * 4], ctypes.c_void_p),
        "ggml_mul_mat": ([ctypes.c_void_p] * 3, ctypes.c_void_p),
    }
    for name, (argtypes, restype) in signatures.items():
        function = getattr(lib, name)
        function.argtypes, function.restype = argtypes, restype
    return lib


def _libggml_path() -> Path:
    """The libggml file libllama itself uses. A wheel holds copies, not links, of libggml.so and libggml.so.0;
    libllama loads the one its soname names (libggml.so.0), and a second copy would be a second, empty backend
    registry: llama.cpp would see none of the backends loaded through it."""
    lib_dir = library_dir()
    if sys.platform == "win32":
        return lib_dir / "ggml.dll"
    if sys.platform == "darwin":
        return lib_dir / "libggml.dylib"
    sonames = sorted(lib_dir.glob("libggml.so.*"), key=lambda p: len(p.name))  # libggml.so.0 before libggml.so.0.25.3
    return sonames[0] if sonames else lib_dir / "libggml.so"


def _registered() -> list[str]:
    lib = ggml()
    return [lib.ggml_backend_reg_name(lib.ggml_backend_reg_get(i)).decode() for i in range(lib.ggml_backend_reg_count())]


def load() -> None:
    """Load the backends that fit this machine, once, before llama.cpp is initialised (backend.init_backend)."""
    if _registered():
        return  # a build with its backends linked in, or already loaded
    lib_dir = library_dir()
    if any(lib_dir.glob("*ggml-cuda*")):
        _preload_cuda_runtime()
    ggml().ggml_backend_load_all_from_path(str(lib_dir).encode())
    if "CPU" not in _registered():
        variants = sorted(p.name for p in lib_dir.glob("*ggml-cpu*"))
        raise TandemError(
            f"no llama.cpp CPU backend in {lib_dir} runs on this CPU ({_cpu_model()}); found: {', '.join(variants) or 'none'}."
            " Reinstall with `make setup` (it builds one for every x86-64 CPU)"
        )


CUDA_RUNTIME = ("libcudart.so", "libcublasLt.so", "libcublas.so")  # what libggml-cuda needs, in load order


def cuda_runtime_dirs() -> list[Path]:
    """NVIDIA's runtime wheels (nvidia/cu13/lib, nvidia/cublas/lib...): a CUDA build's venv has them
    (packaging/cuda_libs.py) and the one-file binary carries them under the same names."""
    roots = [Path(sys._MEIPASS) / "nvidia"] if hasattr(sys, "_MEIPASS") else []
    spec = importlib.util.find_spec("nvidia")
    roots += [Path(p) for p in (spec.submodule_search_locations or [])] if spec else []
    return sorted({d for root in roots for d in root.glob("*/lib") if d.is_dir()})


def _preload_cuda_runtime() -> None:
    """Load the CUDA runtime from NVIDIA's wheels globally, so that libggml-cuda's own loading finds it by
    name; where it is missing, the system's copy (a CUDA toolkit's, ld.so.conf) is used, and with none the
    CUDA backend is skipped: the machine runs on its CPU."""
    directories = cuda_runtime_dirs()
    for name in CUDA_RUNTIME:
        for path in (f for d in directories for f in sorted(d.glob(name + ".*"))):
            try:
                ctypes.CDLL(str(path), mode=ctypes.RTLD_GLOBAL)
                break
            except OSError:
                continue


def _cpu_model() -> str:
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return os.uname().machine if hasattr(os, "uname") else sys.platform


def _library_of(address: int) -> str | None:
    """The file a function of a loaded library comes from (dladdr)."""
    libc = ctypes.CDLL(ctypes.util.find_library("c") or None)
    info = _DlInfo()
    if not address or not libc.dladdr(ctypes.c_void_p(address), ctypes.byref(info)) or not info.dli_fname:
        return None
    return os.fsdecode(info.dli_fname)


def _variant_name(path: str | None) -> str:
    stem = Path(path or "").name.split(".")[0]  # libggml-cpu-haswell.so -> libggml-cpu-haswell
    prefix = "libggml-cpu-" if stem.startswith("lib") else "ggml-cpu-"
    return stem[len(prefix) :] if stem.startswith(prefix) else BUILT_IN


def _features(get_features_address: int, reg: int) -> tuple[str, ...]:
    if not get_features_address:
        return ()
    get_features = ctypes.CFUNCTYPE(ctypes.POINTER(_Feature), ctypes.c_void_p)(get_features_address)
    features, out = get_features(reg), []
    for i in range(64):  # the list ends with a NULL name
        item = features[i]
        if not item.name:
            break
        if item.value == b"1":
            out.append(item.name.decode())
    return tuple(out)


@functools.cache
def backends() -> Backends:
    """What load() brought in (call after it)."""
    lib = ggml()
    cpu_reg, cpu_name, accelerators = None, _cpu_model(), []
    for i in range(lib.ggml_backend_dev_count()):
        device = lib.ggml_backend_dev_get(i)
        kind = lib.ggml_backend_dev_type(device)
        description = (lib.ggml_backend_dev_description(device) or b"").decode(errors="replace").strip()
        if kind == _CPU and cpu_reg is None:
            cpu_reg, cpu_name = lib.ggml_backend_dev_backend_reg(device), description or cpu_name
        elif kind != _CPU:
            accelerators.append(f"{(lib.ggml_backend_dev_name(device) or b'?').decode()}: {description}")
    if cpu_reg is None:
        return Backends("none", cpu_name, (), tuple(accelerators))
    get_features = lib.ggml_backend_reg_get_proc_address(cpu_reg, b"ggml_backend_get_features")
    return Backends(_variant_name(_library_of(get_features)), cpu_name, _features(get_features, cpu_reg), tuple(accelerators))


def cpu_device() -> int | None:
    lib = ggml()
    devices = (lib.ggml_backend_dev_get(i) for i in range(lib.ggml_backend_dev_count()))
    return next((d for d in devices if lib.ggml_backend_dev_type(d) == _CPU), None)


def gpu_devices() -> list[int]:
    """This machine's GPUs (RPC workers are never registered: they serve the main model alone, rpc.py)."""
    lib = ggml()
    devices = (lib.ggml_backend_dev_get(i) for i in range(lib.ggml_backend_dev_count()))
    return [d for d in devices if lib.ggml_backend_dev_type(d) in (_GPU, _IGPU)]


def has_gpu() -> bool:
    return bool(gpu_devices())


def gpu_memory() -> tuple[int, int] | None:
    """(used, total) bytes summed over GPU devices; None on a CPU-only machine or when ggml won't say."""
    lib = ggml()
    used = total = 0
    for i in range(lib.ggml_backend_dev_count()):
        device = lib.ggml_backend_dev_get(i)
        if lib.ggml_backend_dev_type(device) in (_GPU, _IGPU):
            free, size = ctypes.c_size_t(), ctypes.c_size_t()
            lib.ggml_backend_dev_memory(device, ctypes.byref(free), ctypes.byref(size))
            used, total = used + size.value - free.value, total + size.value
    return (used, total) if total else None
