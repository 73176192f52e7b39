"""The main model on other machines: llama.cpp's RPC backend (ggml-rpc), its workers and their faults.

A worker (`tandem --rpc-worker`) is ggml's own RPC server over this machine's GPUs, or its CPU where it has
none. A client (`--rpc HOST:PORT,...`, llama.cpp's flag) attaches each worker's devices and gives them to the
main model alone (llama.cpp places its layers on them, in proportion to their memory or to --tensor-split);
the draft model and prompt lookup stay on this machine, where a drafted token costs no network.

Faults. llama.cpp aborts the process when a worker stops answering (GGML_ABORT in ggml-rpc's per-worker
dispatcher thread). Tandem sets ggml's abort hook once a worker is attached: an RPC abort is caught on that
thread, which then never returns (returning would let abort() end the process). Whoever registered a handler
(the host of the chat app or the server) fails the replies in progress with a WorkerLost naming the worker, so
the conversation and the app survive; the pair is gone (its decode never returns, its memory cannot be freed
safely), and a worker lost in this process cannot be attached again (llama.cpp keeps its dead connection):
restart Tandem to reconnect. With no handler (headless, --benchmark) the process prints one line and exits 1.
"""

from __future__ import annotations

import contextlib
import ctypes
import os
import socket
import struct
import sys
import threading
import time
from collections.abc import Callable
from dataclasses import dataclass

from app.engine.errors import TandemError

# RPC_PROTO_{MAJOR,MINOR,PATCH}_VERSION of the ggml-rpc.h in the llama.cpp that llama-cpp-python (pyproject's pin)
# builds; tests/test_rpc.py checks it against the banner of the worker this build runs
PROTOCOL = (7, 0, 0)
DEFAULT_PORT = 50052  # llama.cpp's rpc-server default (this module imports llama.cpp only when it is used)
_HELLO = 14  # RPC_CMD_HELLO: the first command of every connection, the same in every protocol version
_CONN_CAPS = 24  # RPC_CONN_CAPS_SIZE: the transport capabilities the hello carries (protocol 4 and later)
CONNECT_TIMEOUT = 3.0  # seconds a worker may take to accept and answer the hello


class WorkerUnavailable(TandemError):
    """A worker that cannot be attached (down, not an RPC worker, another protocol version, lost before)."""


class WorkerLost(TandemError):
    """A worker that stopped answering while the main model ran on it."""

    def __init__(self, message: str, endpoints: tuple[str, ...]):
        super().__init__(message)
        self.endpoints = endpoints


@dataclass(frozen=True)
class Worker:
    endpoint: str
    device: int  # a ggml_backend_dev_t of it, which llama.cpp places layers on (the worker prints what it is)


def parse_endpoints(text: str) -> tuple[str, ...]:
    """'HOST:PORT[,HOST:PORT...]' (llama.cpp's --rpc): the one rule for a worker list, wherever it is typed."""
    endpoints = []
    for item in (part.strip() for part in text.split(",")):
        if not item:
            continue
        host, sep, port = item.rpartition(":")
        if not sep or not host or not port.isdigit() or not 0 < int(port) < 65536:
            raise WorkerUnavailable(f"'{item}' is not a worker address: --rpc takes HOST:PORT[,HOST:PORT...]")
        if item in endpoints:
            raise WorkerUnavailable(f"worker {item} is listed twice in --rpc")
        endpoints.append(item)
    return tuple(endpoints)


def parse_split(text: str) -> tuple[float, ...]:
    """'3,1' (llama.cpp's --tensor-split): each device's share of the main model's layers, in device order
    (the workers in --rpc order, then this machine's GPUs)."""
    try:
        shares = tuple(float(part) for part in text.split(",") if part.strip())
    except ValueError:
        shares = (-1.0,)
    if any(not share >= 0 for share in shares) or (shares and not sum(shares) > 0):
        raise TandemError(f"'{text}' is not a tensor split: --tensor-split takes shares such as 3,1")
    return shares


def is_loopback(host: str) -> bool:
    """An address only this machine reaches (the RPC worker's and the HTTP server's safe default)."""
    import ipaddress

    try:
        return host == "localhost" or ipaddress.ip_address(host).is_loopback
    except ValueError:  # a host name: it resolves to who knows what
        return False


def _split(endpoint: str) -> tuple[str, int]:
    host, _, port = endpoint.rpartition(":")
    return host.strip("[]"), int(port)


def hello(endpoint: str, timeout: float = CONNECT_TIMEOUT) -> tuple[int, int, int]:
    """The worker's protocol version, asked as llama.cpp asks it (RPC_CMD_HELLO), before llama.cpp connects:
    llama.cpp aborts the process on a worker that is down or speaks another version; this says which one."""
    try:
        with socket.create_connection(_split(endpoint), timeout=timeout) as sock:
            sock.sendall(struct.pack("<BQ", _HELLO, _CONN_CAPS) + bytes(_CONN_CAPS))
            header = _receive(sock, 8)
            (size,) = struct.unpack("<Q", header) if len(header) == 8 else (None,)
            reply = _receive(sock, size) if size == 4 + _CONN_CAPS else b""
    except TimeoutError:
        raise WorkerUnavailable(f"RPC worker {endpoint} did not answer within {timeout:g} s (another client may be"
                                " using it: a worker serves one at a time)") from None  # fmt: skip
    except OSError as exc:
        reason = exc.strerror or str(exc)
        raise WorkerUnavailable(f"cannot reach RPC worker {endpoint}: {reason} (start one there with"
                                f" `tandem --rpc-worker --host HOST --port {_split(endpoint)[1]}`)") from None  # fmt: skip
    if len(reply) != 4 + _CONN_CAPS:
        raise WorkerUnavailable(f"{endpoint} is not an RPC worker of this llama.cpp version (it closed the handshake);"
                                f" Tandem speaks RPC protocol {_version(PROTOCOL)}: run the same Tandem there")  # fmt: skip
    return reply[0], reply[1], reply[2]


def _receive(sock: socket.socket, n: int) -> bytes:
    data = b""
    while len(data) < n:
        chunk = sock.recv(n - len(data))
        if not chunk:
            break
        data += chunk
    return data


def _version(version: tuple[int, int, int]) -> str:
    return ".".join(map(str, version))


def check_worker(endpoint: str) -> None:
    """Refuse a worker llama.cpp would abort on: down, not a worker, another protocol (llama.cpp's own rule:
    the same major version, a minor one no newer than ours)."""
    version = hello(endpoint)
    if version[0] != PROTOCOL[0] or version[1] > PROTOCOL[1]:
        raise WorkerUnavailable(f"RPC worker {endpoint} speaks protocol {_version(version)}, this Tandem"
                                f" {_version(PROTOCOL)}: run the same Tandem (or llama.cpp) version on both")  # fmt: skip


_attached: dict[str, tuple[Worker, ...]] = {}
_lost: dict[str, str] = {}  # endpoint -> what happened to it
_attach_lock = threading.Lock()


def attach(endpoints: tuple[str, ...]) -> tuple[Worker, ...]:
    """Each worker's devices, checked and attached (once per process; later calls reuse them)."""
    from app.engine.backend import init_backend

    init_backend()  # the RPC backend is one of the libraries it loads
    out: list[Worker] = []
    with _attach_lock:
        for endpoint in endpoints:
            if endpoint in _lost:
                raise WorkerUnavailable(f"RPC worker {endpoint} was lost earlier in this session ({_lost[endpoint]});"
                                        " llama.cpp keeps its dead connection: restart Tandem to use it again")  # fmt: skip
            if endpoint not in _attached:
                check_worker(endpoint)
                _attached[endpoint] = _add_server(endpoint)
            out += _attached[endpoint]
    return tuple(out)


def _add_server(endpoint: str) -> tuple[Worker, ...]:
    from app.engine import backends

    lib = backends.ggml()
    add_server = ctypes.CFUNCTYPE(ctypes.c_void_p, ctypes.c_char_p)(_rpc_function("ggml_backend_rpc_add_server"))
    install_trap()  # from the first connection on: llama.cpp aborts on any failure of it
    reg = add_server(endpoint.encode())
    if not reg:
        raise WorkerUnavailable(f"RPC worker {endpoint} serves no device")
    return tuple(Worker(endpoint, lib.ggml_backend_reg_dev_get(reg, i)) for i in range(lib.ggml_backend_reg_dev_count(reg)))


def _rpc_function(name: str) -> int:
    from app.engine import backends

    lib = backends.ggml()
    reg = lib.ggml_backend_reg_by_name(b"RPC")
    address = lib.ggml_backend_reg_get_proc_address(reg, name.encode()) if reg else None
    if not address:
        raise WorkerUnavailable("this Tandem's llama.cpp was built without its RPC backend (GGML_RPC=ON: `make setup`)")
    return address


def describe(workers: tuple[Worker, ...]) -> str:
    """Where the main model runs, for stats and the status bar: 'RPC 127.0.0.1:50052, 127.0.0.1:50053'."""
    return "RPC " + ", ".join(dict.fromkeys(w.endpoint for w in workers))


# ---- faults: llama.cpp's abort on a lost worker, caught ---------------------------------------------------
LostHandler = Callable[[WorkerLost], bool]  # True: contained (the replies failed cleanly, the app goes on)
_handlers: list[LostHandler] = []
_trap: object = None  # the ctypes callback, kept alive while ggml holds it
_trap_pid = 0


def add_lost_handler(handler: LostHandler) -> None:
    _handlers.append(handler)


def remove_lost_handler(handler: LostHandler) -> None:
    with contextlib.suppress(ValueError):
        _handlers.remove(handler)


def install_trap() -> None:
    from app.engine import backends

    global _trap, _trap_pid
    if _trap is None:
        _trap = backends.ABORT_CALLBACK(_on_abort)
        _trap_pid = os.getpid()
        backends.ggml().ggml_set_abort_callback(_trap)


def _on_abort(message: bytes | None) -> None:
    text = (message or b"").decode(errors="replace").strip()
    if os.getpid() != _trap_pid or not _is_rpc_failure(text):
        os.write(2, f"{text}\n".encode())  # any other abort ends the process as it always did (ggml's message)
        return
    lost = lost_worker(text)
    for endpoint in lost.endpoints:
        _lost[endpoint] = "it stopped answering"
    contained = False
    for handler in list(_handlers):
        with contextlib.suppress(Exception):  # a handler's fault must not turn this into a crash
            contained = bool(handler(lost)) or contained
    if not contained:
        with contextlib.suppress(Exception):
            sys.stdout.flush()
        os.write(2, f"tandem: error: {lost}\n".encode())
        os._exit(1)
    threading.Event().wait()  # this llama.cpp thread never returns: abort() would end the process


def _is_rpc_failure(text: str) -> bool:
    return "RPC" in text or any(endpoint in text for endpoint in _attached)


def lost_worker(text: str) -> WorkerLost:
    """Which worker failed: the one llama.cpp names, else those no longer accepting connections (a worker
    that is alive but busy serving this process still accepts one)."""
    named = tuple(e for e in _attached if e in text)
    gone = named
    for _ in range(10):  # a dying worker's connection may close a moment before its listening socket
        gone = gone or tuple(e for e in _attached if not _accepts(e))
        if gone:
            break
        time.sleep(0.1)
    if gone:
        which = ", ".join(gone)
        return WorkerLost(f"RPC worker {which} stopped answering while the main model ran on it; the reply stopped"
                          " there, the conversation is kept. Restart the worker, then Tandem", gone)  # fmt: skip
    return WorkerLost(f"an RPC worker ({', '.join(_attached)}) broke the connection ({text}); the reply stopped there,"
                      " the conversation is kept. Restart the workers, then Tandem", tuple(_attached))  # fmt: skip


def _accepts(endpoint: str) -> bool:
    try:
        with socket.create_connection(_split(endpoint), timeout=1.0):
            return True
    except OSError:
        return False


# ---- the worker --------------------------------------------------------------------------------------------
def serve_worker(host: str, port: int, threads: int) -> int:
    """`tandem --rpc-worker`: ggml's RPC server over this machine's GPUs (or its CPU), until interrupted."""
    from app.engine import backends
    from app.engine.backend import init_backend

    init_backend()
    start_server = ctypes.CFUNCTYPE(None, ctypes.c_char_p, ctypes.c_char_p, ctypes.c_size_t, ctypes.c_size_t,
                                    ctypes.c_void_p)(_rpc_function("ggml_backend_rpc_start_server"))  # fmt: skip
    devices = _served_devices()
    try:  # ggml's server says only "Failed to create server socket": say why first
        with socket.create_server((host, port), reuse_port=False):
            pass
    except OSError as exc:
        raise WorkerUnavailable(f"cannot listen on {host}:{port}: {exc.strerror or exc}") from None
    if not is_loopback(host):
        sys.stderr.write(f"tandem: warning: the RPC worker listens on {host}: llama.cpp's RPC has no authentication"
                         " and runs whatever a client sends; never expose it beyond a network you trust\n")  # fmt: skip
    lib = backends.ggml()
    names = [f"{(lib.ggml_backend_dev_name(d) or b'?').decode()} ({(lib.ggml_backend_dev_description(d) or b'').decode()})"
             for d in devices]  # fmt: skip
    sys.stdout.write(f"tandem: RPC worker at {host}:{port} serving {', '.join(names)} with {threads} threads;"
                     f" use it with: tandem --rpc {host}:{port}\n")  # fmt: skip
    sys.stdout.flush()
    array = (ctypes.c_void_p * len(devices))(*devices)
    endpoint = f"{host}:{port}".encode()
    server = threading.Thread(target=start_server, args=(endpoint, None, threads, len(devices), array), daemon=True)
    server.start()
    while server.is_alive():  # the server runs in C; this thread stays in Python so that Ctrl+C stops it
        server.join(0.5)
    raise WorkerUnavailable(f"the RPC worker at {host}:{port} stopped (its log above says why)")


def _served_devices() -> list[int]:
    """The GPUs where there are any (llama.cpp's rpc-server default), else the CPU."""
    from app.engine import backends

    lib = backends.ggml()
    devices = [lib.ggml_backend_dev_get(i) for i in range(lib.ggml_backend_dev_count())]
    gpus = [d for d in devices if lib.ggml_backend_dev_type(d) in (1, 2)]
    cpu = backends.cpu_device()
    return gpus or ([cpu] if cpu else [])
