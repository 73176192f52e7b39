# PyInstaller runtime hook: point llama-cpp-python at the shared libraries unpacked with the app
# (it also looks in llama_cpp/lib beside its own module; the variable makes that explicit).
import os
import sys

_lib = os.path.join(getattr(sys, "_MEIPASS", ""), "llama_cpp", "lib")
if os.path.isdir(_lib):
    os.environ.setdefault("LLAMA_CPP_LIB_PATH", _lib)
