# llama-cpp-python loads libllama and the ggml backends (CPU, and CUDA/Metal/Vulkan when it was built
# with them) with ctypes from llama_cpp/lib: PyInstaller cannot see those imports, so collect every
# shared library there, whatever backends this build has.
from PyInstaller.utils.hooks import collect_data_files, collect_dynamic_libs

binaries = collect_dynamic_libs("llama_cpp", destdir="llama_cpp/lib")
datas = [d for d in collect_data_files("llama_cpp") if not d[0].endswith((".py", ".pyc"))]
