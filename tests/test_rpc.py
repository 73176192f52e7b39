"""The main model on llama.cpp RPC workers (app/engine/rpc.py), on loopback only: `tandem --rpc-worker` processes
serve this machine's CPU, a client attaches them with --rpc; the faults (a worker down, another protocol, a
worker killed mid-reply) each end in one line naming the worker, never a crash or a hang."""

from __future__ import annotations

import contextlib
import json
import socket
import struct
import subprocess
import sys
import threading
import time
from collections.abc import Iterator
from pathlib import Path

import pytest

from app.config import ConfigError, Settings
from app.engine import rpc
from tests.test_cli import ROOT, assert_clean_failure, tandem, tiny_args


def free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


class WorkerProcess:
    def __init__(self, threads: int = 1):
        self.port = free_port()
        self.endpoint = f"127.0.0.1:{self.port}"
        command = [sys.executable, "-m", "app", "--rpc-worker", "--port", str(self.port), "--threads", str(threads)]
        self.process = subprocess.Popen(command, cwd=ROOT, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
        deadline = time.monotonic() + 60
        while not self._listening():
            assert self.process.poll() is None, self.process.communicate()
            assert time.monotonic() < deadline, "the worker never listened"
            time.sleep(0.2)

    def _listening(self) -> bool:
        with contextlib.suppress(OSError), socket.create_connection(("127.0.0.1", self.port), timeout=0.5):
            return True
        return False

    def stop(self) -> str:
        self.process.kill()
        out, _ = self.process.communicate(timeout=30)
        return out


@pytest.fixture
def workers() -> Iterator[list[WorkerProcess]]:
    pair = [WorkerProcess(), WorkerProcess()]
    yield pair
    for worker in pair:
        worker.stop()


def rpc_flag(workers: list[WorkerProcess]) -> str:
    return ",".join(w.endpoint for w in workers)


def test_worker_lists_follow_llamacpps_form() -> None:
    assert rpc.parse_endpoints("10.0.0.2:50052, host:1") == ("10.0.0.2:50052", "host:1")
    assert rpc.parse_endpoints("") == ()
    for bad in ("host", "host:", ":50052", "host:99999", "a:1,a:1"):
        with pytest.raises(rpc.WorkerUnavailable):
            rpc.parse_endpoints(bad)
    assert rpc.parse_split("3,1") == (3.0, 1.0)
    for bad in ("a", "-1,2", "0,0"):
        with pytest.raises(Exception, match="tensor split"):
            rpc.parse_split(bad)
    settings = Settings()
    settings.set("rpc", "127.0.0.1:50052")
    with pytest.raises(ConfigError, match="HOST:PORT"):
        settings.set("rpc", "nonsense")


def test_worker_banner_speaks_the_protocol_this_tandem_checks_for() -> None:
    worker = WorkerProcess()
    try:
        assert rpc.hello(worker.endpoint) == rpc.PROTOCOL
        rpc.check_worker(worker.endpoint)
    finally:
        out = worker.stop()
    assert f"use it with: tandem --rpc {worker.endpoint}" in out
    # ggml's own banner: the protocol version compiled into this llama.cpp
    assert f"Starting RPC server v{'.'.join(map(str, rpc.PROTOCOL))}" in out, out


def test_output_on_two_workers_matches_local_decoding(tiny, workers) -> None:
    common = ("--prompt", "the cat sat", "--temp", "0", "-n", "32", "--json")
    local = json.loads(tandem(*tiny_args(tiny, "--no-draft", *common)).stdout)
    remote_plain = tandem(*tiny_args(tiny, "--no-draft", "--rpc", rpc_flag(workers), *common))
    assert remote_plain.returncode == 0, remote_plain.stderr
    remote_spec = tandem(*tiny_args(tiny, "--draft", str(tiny.draft), "--no-adaptive", "--draft-max", "4",
                                    "--rpc", rpc_flag(workers), *common))  # fmt: skip
    assert remote_spec.returncode == 0, remote_spec.stderr
    plain, spec = json.loads(remote_plain.stdout), json.loads(remote_spec.stdout)
    assert plain["tokens"] == local["tokens"]  # the workers run the same CPU kernels, on plain memory
    assert spec["tokens"] == plain["tokens"]  # the tiny F32 model's kernels are batch-invariant: identical
    assert spec["stats"]["total_draft_tokens_count"] > 0  # the draft ran here and its tokens were verified there
    assert "main on RPC " + rpc_flag(workers).replace(",", ", ") in spec["stats"]["backend"]


def test_a_worker_down_at_start_is_named_in_one_line(tiny, workers) -> None:
    down = f"127.0.0.1:{free_port()}"
    result = tandem(*tiny_args(tiny, "--rpc", f"{workers[0].endpoint},{down}", "--prompt", "hi", "-n", "2"))
    assert_clean_failure(result, down, "cannot reach RPC worker")


@contextlib.contextmanager
def fake_worker(reply: bytes | None) -> Iterator[str]:
    """A listener that answers the hello with `reply` (None: closes the connection at once)."""
    server = socket.create_server(("127.0.0.1", 0))
    port = server.getsockname()[1]

    def serve() -> None:
        with contextlib.suppress(OSError):
            connection, _ = server.accept()
            with connection:
                connection.recv(64)
                if reply is not None:
                    connection.sendall(struct.pack("<Q", len(reply)) + reply)
                    time.sleep(0.5)

    thread = threading.Thread(target=serve, daemon=True)
    thread.start()
    try:
        yield f"127.0.0.1:{port}"
    finally:
        server.close()


def test_another_protocol_version_is_refused_before_llamacpp_aborts(tiny) -> None:
    with fake_worker(bytes([6, 0, 0, 0]) + bytes(24)) as endpoint:
        result = tandem(*tiny_args(tiny, "--rpc", endpoint, "--prompt", "hi", "-n", "2"))
    assert_clean_failure(result, endpoint, "protocol 6.0.0")
    with fake_worker(None) as endpoint:
        result = tandem(*tiny_args(tiny, "--rpc", endpoint, "--prompt", "hi", "-n", "2"))
    assert_clean_failure(result, endpoint, "not an RPC worker")


def test_a_worker_killed_mid_reply_ends_headless_with_its_name(tiny, workers) -> None:
    command = [sys.executable, "-m", "app", *tiny_args(tiny, "--no-draft", "--rpc", rpc_flag(workers), "--ctx-size", "8192"),
               "--prompt", "the cat", "-n", "8000", "--temp", "1.5", "--seed", "1"]  # fmt: skip
    with subprocess.Popen(command, cwd=ROOT, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True) as client:
        assert client.stdout is not None
        client.stdout.read(1)  # the reply has begun
        workers[1].stop()
        _, err = client.communicate(timeout=60)
    assert client.returncode == 1
    lines = [line for line in err.splitlines() if line.strip()]
    assert lines and "Traceback" not in err, err
    assert f"RPC worker {workers[1].endpoint} stopped answering" in lines[-1], err
    assert workers[0].endpoint not in lines[-1]


HOST_SCRIPT = """
import json, subprocess, sys, time
from app.config import Config
from app.engine.rpc import WorkerLost
from app.engine.speculative import GenerationConfig
from app.host import DONE, EngineHost, Job, JobFailed

config = Config(main=sys.argv[1], draft="none")
config.settings.rpc, config.settings.ctx_size, config.settings.threads = sys.argv[2], 8192, 2
host = EngineHost(config)
host.start()
job = host.submit(Job(GenerationConfig(max_tokens=8000), prompt="the cat"))
items = []
while True:
    item = job.events.get(timeout=120)
    if not items:
        subprocess.run(["kill", "-9", sys.argv[3]])
    items.append(item)
    if item is DONE:
        break
failed = [i for i in items if isinstance(i, JobFailed)]
try:
    host.submit(Job(GenerationConfig(max_tokens=4), prompt="again"))
    refused = ""
except WorkerLost as exc:
    refused = str(exc)
host.stop()
print(json.dumps({"failed": [str(f.error) for f in failed], "lost": type(failed[0].error).__name__ if failed else "",
                  "state": host.state, "refused": refused}))
"""


def test_a_worker_killed_mid_reply_fails_the_hosts_job_and_the_process_lives_on(tiny, workers) -> None:
    """The server's and the chat app's path: the job ends with the worker's name, new jobs are refused with it,
    and the process neither crashes nor hangs at exit (its stuck llama.cpp threads are abandoned)."""
    args = [str(tiny.main), rpc_flag(workers), str(workers[1].process.pid)]
    result = subprocess.run([sys.executable, "-c", HOST_SCRIPT, *args], cwd=ROOT, capture_output=True, text=True, timeout=180)
    assert result.returncode == 0, result.stderr
    outcome = json.loads(result.stdout.strip().splitlines()[-1])
    assert outcome["lost"] == "WorkerLost"
    assert f"RPC worker {workers[1].endpoint} stopped answering" in outcome["failed"][0]
    assert outcome["state"] == "failed"
    assert workers[1].endpoint in outcome["refused"]


def test_worker_warns_when_it_listens_beyond_this_machine() -> None:
    port = free_port()
    command = [sys.executable, "-m", "app", "--rpc-worker", "--host", "0.0.0.0", "--port", str(port), "--threads", "1"]
    with subprocess.Popen(command, cwd=ROOT, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True) as worker:
        assert worker.stdout is not None
        worker.stdout.readline()  # listening
        worker.kill()
        _, err = worker.communicate(timeout=30)
    assert "no authentication" in err and "0.0.0.0" in err


def test_worker_port_in_use_is_one_line() -> None:
    with socket.create_server(("127.0.0.1", 0)) as taken:
        port = taken.getsockname()[1]
        result = tandem("--rpc-worker", "--port", str(port))
    assert_clean_failure(result, f"127.0.0.1:{port}", "cannot listen")


def test_rpc_worker_takes_no_model_flags() -> None:
    result = tandem("--rpc-worker", "--prompt", "hi")
    assert result.returncode == 2 and "--rpc-worker" in result.stderr


def test_saved_config_keeps_the_workers(tmp_path: Path) -> None:
    path = tmp_path / "rpc.toml"
    assert tandem("--rpc", "127.0.0.1:50052,127.0.0.1:50053", "--tensor-split", "3,1", "--save-config", str(path)).returncode == 0
    text = path.read_text()
    assert 'rpc = "127.0.0.1:50052,127.0.0.1:50053"' in text and 'tensor_split = "3,1"' in text


@pytest.mark.real_model
def test_demo_pair_on_two_workers_answers_as_it_does_here(workers) -> None:
    """Real language over two workers: the main model's plain decoding there is plain decoding here, and the
    default mode's reply is plain decoding's wherever its self-check found the kernels exact."""
    from app.engine.demo import ensure_demo_pair

    main, draft = ensure_demo_pair()
    common = ("--model", str(main), "--threads", "2", "--prompt", "Write a quicksort in Python.", "--temp", "0", "-n", "48", "--json")
    local = tandem(*common, "--no-draft")
    remote_plain = tandem(*common, "--no-draft", "--rpc", rpc_flag(workers))
    remote_default = tandem(*common, "--draft", str(draft), "--rpc", rpc_flag(workers))
    for result in (local, remote_plain, remote_default):
        assert result.returncode == 0, result.stderr
    plain, default = json.loads(remote_plain.stdout), json.loads(remote_default.stdout)
    assert plain["tokens"] == json.loads(local.stdout)["tokens"]
    if default["stats"]["exact"]:
        assert default["tokens"] == plain["tokens"]
    assert f"main on RPC {rpc_flag(workers).replace(',', ', ')}" in default["stats"]["backend"]  # the draft: here
