# Included into llama-cpp-python's build (CMAKE_PROJECT_llama_cpp_INCLUDE, set by the Makefile) so that the wheel
# carries every backend llama.cpp builds as a loadable module (GGML_BACKEND_DL): the CPU variants of
# GGML_CPU_ALL_VARIANTS (libggml-cpu-haswell.so, -skylakex, -sapphirerapids...) and any GPU/RPC backend.
# llama-cpp-python 0.3.36 installs a fixed list of targets (ggml-cpu, ggml-cuda, ...), which misses the variants.
# The targets exist only once llama.cpp's directories are processed, hence the deferred call.
cmake_language(DEFER DIRECTORY "${CMAKE_SOURCE_DIR}" CALL _tandem_install_backends)

function(_tandem_install_backends)
    get_property(targets DIRECTORY "${CMAKE_SOURCE_DIR}/vendor/llama.cpp/ggml/src" PROPERTY BUILDSYSTEM_TARGETS)
    foreach(target IN LISTS targets)
        get_target_property(type ${target} TYPE)
        if(target MATCHES "^ggml-cpu-" AND type MATCHES "^(MODULE|SHARED)_LIBRARY$")  # not the -feats objects
            message(STATUS "tandem: installing the loadable backend ${target}")
            llama_cpp_python_install_target(${target})
        endif()
    endforeach()
endfunction()
