# llama-cpp-python loads libllama and the ggml backends (CPU, and CUDA/Metal/Vulkan when it was built
# with them) with ctypes from llama_cpp/lib: PyInstaller cannot see those imports, so collect every
# shared library there, whatever backends this build has.
from PyInstaller.utils.hooks import collect_data_files, collect_dynamic_libs

binaries = collect_dynamic_libs("llama_cpp", destdir="llama_cpp/lib")
datas = [d for d in collect_data_files("llama_cpp") if not d[0].endswith((".py", ".pyc"))]

# A CUDA build's libggml-cuda needs NVIDIA's runtime (libcudart, libcublas, libcublasLt), which a user's
# machine has only with a CUDA toolkit: carry the copies from NVIDIA's wheels (packaging/cuda_libs.py put
# them in the venv), where app/engine/backends.py looks for them.
if any("ggml-cuda" in source for source, _ in binaries):
    from app.engine.backends import CUDA_RUNTIME, cuda_runtime_dirs

    binaries += [
        (str(path), f"nvidia/{directory.parent.name}/lib")
        for directory in cuda_runtime_dirs()
        for path in directory.iterdir()
        if path.name.startswith(CUDA_RUNTIME) and ".so." in path.name
    ]
