"""The HTTP server as its clients use it: a real server on 127.0.0.1, the official `openai` client and raw HTTP."""

from __future__ import annotations

import contextlib
import json
import os
import queue
import signal
import socket
import subprocess
import sys
import threading
import time
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import httpx
import openai
import pytest
import uvicorn

from app.config import Config
from app.engine.controller import DRAFT_P_MIN
from app.engine.events import Finished
from app.engine.sampling import SamplerSettings
from app.engine.speculative import CANCELLED, GenerationConfig, SpeculativeEngine
from app.host import DONE, EngineHost, Job, QueueFull
from app.server import api, listening_socket
from app.server.api import create_app

ROOT = Path(__file__).resolve().parents[1]
CHAT = [{"role": "user", "content": "the cat sat on the mat"}]


def events_of(job: Job, timeout: float | None = None) -> list:
    """Everything a finished job produced."""
    out = []
    while (item := job.events.get(timeout=timeout)) is not DONE:
        out.append(item)
    return out


def config_for(tiny, **settings) -> Config:
    config = Config(main=str(tiny.main), draft=str(tiny.draft), dirs=[str(tiny.main.parent)])
    for name, value in {"threads": 2, "ctx_size": 512, "temperature": 0.0, "max_tokens": 32, **settings}.items():
        config.settings.set(name, value)
    return config


@contextlib.contextmanager
def running_server(tiny, api_key: str | None = None, max_queue: int = 16, start_host: bool = True, any_path: bool = False,
                   parallel: int = 1, **settings):  # fmt: skip
    host = EngineHost(config_for(tiny, **settings), max_queue=max_queue, parallel=parallel)
    submitted: list[Job] = []
    submit = host.submit

    def recording_submit(job: Job) -> Job:
        submitted.append(job)
        return submit(job)

    host.submit = recording_submit  # type: ignore[method-assign]
    app = create_app(host, api_key=api_key, dirs=[str(tiny.main.parent)], any_path=any_path)
    server = uvicorn.Server(uvicorn.Config(app, loop="asyncio", http="h11", lifespan="off", log_level="warning"))
    sock = listening_socket("127.0.0.1", 0)  # as `tandem --serve` binds it
    thread = threading.Thread(target=server.run, kwargs={"sockets": [sock]}, daemon=True)
    thread.start()
    deadline = time.monotonic() + 30
    while not server.started:
        assert time.monotonic() < deadline and thread.is_alive(), "the server did not start"
        time.sleep(0.02)
    port = server.servers[0].sockets[0].getsockname()[1]
    if start_host:
        host.start()
    base = f"http://127.0.0.1:{port}"
    if start_host:
        wait_ready(base)
    try:
        yield base, host, submitted
    finally:
        server.should_exit = True
        thread.join(timeout=10)
        if start_host:
            host.stop()


def wait_ready(base: str) -> None:
    deadline = time.monotonic() + 60
    while httpx.get(f"{base}/health").status_code != 200:
        assert time.monotonic() < deadline, "models never became ready"
        time.sleep(0.05)


def client(base: str, key: str = "none") -> openai.OpenAI:
    return openai.OpenAI(base_url=f"{base}/v1", api_key=key, max_retries=0, timeout=60)


def cli_reply(tiny, prompt: str, max_tokens: int = 32) -> dict:
    args = ["--model", str(tiny.main), "--draft", str(tiny.draft), "-t", "2", "-c", "512", "--temp", "0", "-n", str(max_tokens)]
    result = subprocess.run([sys.executable, "-m", "app", *args, "--prompt", prompt, "--json"],
                            cwd=ROOT, capture_output=True, text=True, timeout=120)  # fmt: skip
    assert result.returncode == 0, result.stderr
    return json.loads(result.stdout)


def test_chat_completion_equals_the_headless_cli_and_streams_the_same_text(tiny) -> None:
    with running_server(tiny) as (base, _host, _):
        api = client(base)
        reply = api.chat.completions.create(model="main", messages=CHAT, temperature=0, max_tokens=32)
        assert reply.choices[0].message.content == cli_reply(tiny, CHAT[0]["content"])["text"]
        assert reply.usage.completion_tokens == 32 and reply.choices[0].finish_reason == "length"
        chunks = list(api.chat.completions.create(model="main", messages=CHAT, temperature=0, max_tokens=32, stream=True,
                                                  stream_options={"include_usage": True}))  # fmt: skip
        assert "".join(c.choices[0].delta.content or "" for c in chunks if c.choices) == reply.choices[0].message.content
        assert chunks[-1].usage.completion_tokens == 32
        text = api.completions.create(model="main", prompt="the cat sat", temperature=0, max_tokens=8)
        assert text.choices[0].text and text.usage.completion_tokens == 8
        listed = [m.id for m in api.models.list().data]
        assert {"main", "draft", "twin", "foreign"} <= set(listed)


def test_lm_studio_api_names_a_draft_model_and_returns_stats(tiny) -> None:
    with running_server(tiny, draft_max=4, adaptive=False) as (base, host, _):
        body = {"model": "main", "messages": CHAT, "temperature": 0, "max_tokens": 32, "draft_model": "twin"}
        answer = httpx.post(f"{base}/api/v0/chat/completions", json=body, timeout=60).json()
        stats = answer["stats"]
        assert stats["draft_model"].startswith("tiny-twin") and stats["accepted_draft_tokens_count"] > 0
        assert {"total_draft_tokens_count", "rejected_draft_tokens_count", "ignored_draft_tokens_count"} <= set(stats)
        assert host.spec.draft.endswith("twin.gguf")
        plain = httpx.post(f"{base}/api/v0/chat/completions", json={**body, "draft_model": "none"}, timeout=60).json()
        assert plain["stats"]["total_draft_tokens_count"] == 0
        assert plain["choices"][0]["message"] == answer["choices"][0]["message"]  # greedy: the draft changes speed only
        models = httpx.get(f"{base}/api/v0/models").json()["data"]
        assert next(m for m in models if m["id"] == "main")["state"] == "loaded"
        bad = httpx.post(f"{base}/api/v0/chat/completions", json={**body, "draft_model": "foreign"}, timeout=60)
        assert bad.status_code == 400 and "token 259 differs" in bad.json()["error"]["message"]
        missing = httpx.post(f"{base}/v1/chat/completions", json={**body, "model": "nope"}, timeout=60)
        assert missing.status_code == 404 and missing.json()["error"]["param"] == "model"


def test_an_api_key_is_required_when_set(tiny) -> None:
    with running_server(tiny, api_key="s3cret") as (base, _host, _):
        with pytest.raises(openai.AuthenticationError):
            client(base, "wrong").chat.completions.create(model="main", messages=CHAT, max_tokens=4)
        assert httpx.get(f"{base}/v1/models").status_code == 401
        reply = client(base, "s3cret").chat.completions.create(model="main", messages=CHAT, max_tokens=4)
        assert reply.usage.completion_tokens == 4


def test_a_full_queue_answers_503_with_retry_after(tiny) -> None:
    """The host is not started: queued jobs stay queued, so the queue's bound is hit deterministically."""
    with running_server(tiny, max_queue=2, start_host=False) as (base, host, _):
        host.submit(Job(GenerationConfig(max_tokens=4)))
        host.submit(Job(GenerationConfig(max_tokens=4)))
        with pytest.raises(QueueFull):
            host.submit(Job(GenerationConfig(max_tokens=4)))
        busy = httpx.post(f"{base}/v1/chat/completions", json={"messages": CHAT}, timeout=30)
        assert busy.status_code == 503 and busy.headers["retry-after"] and busy.json()["error"]["type"] == "server_busy"
        assert httpx.get(f"{base}/health").json()["status"] == "loading"


def test_a_client_that_disconnects_stops_its_generation(tiny) -> None:
    with running_server(tiny, ctx_size=1024) as (base, _host, submitted):
        body = {"messages": CHAT, "max_tokens": 900, "stream": True, "temperature": 0.8}
        with httpx.stream("POST", f"{base}/v1/chat/completions", json=body, timeout=60) as response:
            for line in response.iter_lines():
                if line.startswith("data:") and "content" in line:
                    break  # one chunk read, then the connection closes
        job = submitted[-1]
        events = events_of(job, timeout=30)
        finished = next(e for e in events if isinstance(e, Finished))
        assert finished.stats.stop_reason == CANCELLED and finished.stats.predicted_tokens_count < 900
        after = client(base).chat.completions.create(model="main", messages=CHAT, max_tokens=4)  # the server goes on
        assert after.usage.completion_tokens == 4


def test_sixteen_concurrent_clients_get_their_sequential_answers(tiny) -> None:
    prompts = [f"the {w} sat on the {v}" for w in ("cat", "dog", "mat", "list") for v in ("mat", "dog", "x", "sort")]
    with running_server(tiny, max_tokens=64) as (base, _host, _):
        api = client(base)

        def ask(prompt: str) -> str:
            reply = api.chat.completions.create(model="main", messages=[{"role": "user", "content": prompt}], temperature=0, max_tokens=64)
            return reply.choices[0].message.content

        sequential = [ask(p) for p in prompts]
        with ThreadPoolExecutor(16) as pool:
            concurrent = list(pool.map(ask, prompts))
        assert concurrent == sequential


def test_parallel_requests_share_batches_and_each_gets_its_answer_alone(tiny) -> None:
    """--parallel 4: four requests with different options run in shared decodes (widest_batch), and each
    gets what it gets alone (temperature 0; batch-invariant kernels, and a random model whose best tokens lie far
    enough apart that attention's rounding among other sequences' cells does not move them)."""
    prompts = ["the cat sat on the mat", "def sort ( x ) : return", "hello world , hello", "the dog ran to the cat"]
    # (modes "none" and "lookup" are left out: they name another pair, without the draft model, which the host
    # loads once the others have ended; see the README)
    options = [{}, {"speculative": {"draft_max": 0}}, {"speculative": {"draft_max": 3, "draft_min": 1}},
               {"speculative": {"mode": "model", "draft_max": 3}}]  # fmt: skip

    def ask(base: str, i: int) -> dict:
        body = {"messages": [{"role": "user", "content": prompts[i]}], "temperature": 0, "max_tokens": 48, **options[i]}
        response = httpx.post(f"{base}/api/v0/chat/completions", json=body, timeout=120)
        assert response.status_code == 200, response.text
        return response.json()

    def shared(stats: dict) -> bool:  # a decode wider than this reply's own widest verify batch
        return stats["widest_batch"] > 1 + max(int(k) for k in stats["draft_length_histogram"])

    with running_server(tiny, parallel=4, max_tokens=48) as (base, _host, _):
        alone = [ask(base, i) for i in range(4)]
    # the worker starts once all four wait: they are admitted together, whatever the HTTP timing
    with running_server(tiny, parallel=4, max_tokens=48, start_host=False) as (base, host, submitted):
        with ThreadPoolExecutor(4) as pool:
            futures = [pool.submit(ask, base, i) for i in range(4)]
            deadline = time.monotonic() + 30
            while len(submitted) < 4:
                assert time.monotonic() < deadline
                time.sleep(0.01)
            host.start()
            together = [future.result(timeout=120) for future in futures]
        host.stop()
    assert [r["choices"][0]["message"]["content"] for r in together] == [r["choices"][0]["message"]["content"] for r in alone]
    # the plain request (draft_max 0) verifies one token a round: any wider decode carried the others too
    assert shared(together[1]["stats"]) and not any(shared(r["stats"]) for r in alone)
    # one pool of KV cells for all sequences (the default) moves attention's rounding: not promised exact (--exact is)
    assert not any(r["stats"]["exact"] for r in together)
    assert together[1]["stats"]["total_draft_tokens_count"] == 0  # draft_max 0: this request drafted nothing
    assert host.parallel == 4 and not host.active


def test_a_disconnect_mid_batch_ends_that_request_only(tiny) -> None:
    with running_server(tiny, parallel=3, ctx_size=1024) as (base, _host, submitted):
        reference = client(base).chat.completions.create(model="main", messages=CHAT, temperature=0, max_tokens=40)
        with ThreadPoolExecutor(2) as pool:
            others = [pool.submit(client(base).chat.completions.create, model="main", messages=CHAT, temperature=0,
                                  max_tokens=40) for _ in range(2)]  # fmt: skip
            body = {"messages": CHAT, "max_tokens": 900, "stream": True, "temperature": 0.8}
            with httpx.stream("POST", f"{base}/v1/chat/completions", json=body, timeout=60) as response:
                for line in response.iter_lines():
                    if line.startswith("data:") and "content" in line:
                        break  # one chunk read, then the connection closes
            answers = [future.result(timeout=120) for future in others]
        streamed = next(job for job in submitted if job.config.max_tokens == 900)
        finished = next(e for e in events_of(streamed, timeout=30) if isinstance(e, Finished))
        assert finished.stats.stop_reason == CANCELLED and finished.stats.predicted_tokens_count < 900
        assert [a.choices[0].message.content for a in answers] == [reference.choices[0].message.content] * 2


def test_a_hundred_streaming_clients_with_a_short_queue_each_get_200_or_503(tiny) -> None:
    with running_server(tiny, parallel=4, max_queue=8) as (base, host, _):

        def stream(i: int) -> int:
            body = {"messages": [{"role": "user", "content": f"the cat {i}"}], "max_tokens": 8, "stream": True}
            with httpx.stream("POST", f"{base}/v1/chat/completions", json=body, timeout=120) as response:
                lines = list(response.iter_lines())
            if response.status_code == 200:
                assert lines[-2:] == ["data: [DONE]", ""] or lines[-1] == "data: [DONE]", lines[-3:]
            return response.status_code

        with ThreadPoolExecutor(100) as pool:
            statuses = list(pool.map(stream, range(100), timeout=300))
        assert set(statuses) <= {200, 503} and statuses.count(200) >= 12  # 4 running and 8 queued at least
        deadline = time.monotonic() + 30
        while host.active or host.queued:
            assert time.monotonic() < deadline
            time.sleep(0.05)


@pytest.mark.parametrize(
    ("method", "path", "body", "status", "needle"),
    [
        ("POST", "/v1/chat/completions", b"{not json", 400, "not valid JSON"),
        ("POST", "/v1/chat/completions", b"[1, 2]", 400, "JSON object"),
        ("POST", "/v1/chat/completions", b'{"messages": "hi"}', 400, "'messages'"),
        ("POST", "/v1/chat/completions", b'{"messages": [{"role": "robot", "content": "x"}]}', 400, "role"),
        ("POST", "/v1/chat/completions", b'{"messages": [{"role": "user", "content": 5}]}', 400, "content"),
        ("POST", "/v1/chat/completions", b'{"messages": [{"role": "user", "content": "x"}], "temperature": "hot"}', 400, "temperature"),
        ("POST", "/v1/chat/completions", b'{"messages": [{"role": "user", "content": "x"}], "top_p": 2}', 400, "top_p"),
        ("POST", "/v1/chat/completions", b'{"messages": [{"role": "user", "content": "x"}], "max_tokens": 0}', 400, "max_tokens"),
        ("POST", "/v1/chat/completions", b'{"messages": [{"role": "user", "content": "x"}], "seed": 1.5}', 400, "seed"),
        ("POST", "/v1/chat/completions", b'{"messages": [{"role": "user", "content": "x"}], "stop": 3}', 400, "stop"),
        ("POST", "/v1/chat/completions", b'{"messages": [{"role": "user", "content": "x"}], "stream": "yes"}', 400, "stream"),
        ("POST", "/v1/chat/completions", b'{"messages": [{"role": "user", "content": "x"}], "draft_model": 7}', 400, "draft_model"),
        ("POST", "/v1/completions", b'{"prompt": ""}', 400, "prompt"),
        ("POST", "/v1/completions", json.dumps({"prompt": "the cat " * 400}).encode(), 400, "context holds"),
        ("POST", "/v1/chat/completions", b'{"messages": []}' + b" " * (5 << 20), 413, "larger than"),
        ("GET", "/v1/chat/completions", b"", 405, "not allowed"),
        ("POST", "/v1/nothing", b"{}", 404, "no route"),
    ],
)
def test_bad_requests_get_4xx_json_and_the_server_keeps_serving(tiny, method, path, body, status, needle) -> None:
    with running_server(tiny) as (base, _host, _):
        response = httpx.request(method, f"{base}{path}", content=body, timeout=60)
        assert response.status_code == status, response.text
        assert needle in response.json()["error"]["message"]
        assert client(base).chat.completions.create(model="main", messages=CHAT, max_tokens=2).usage.completion_tokens == 2


def test_a_reader_that_stops_reading_loses_its_job_and_the_next_one_runs(tiny) -> None:
    host = EngineHost(config_for(tiny, ctx_size=1024))
    host.start()
    try:
        config = GenerationConfig(max_tokens=900, sampler=SamplerSettings(temperature=0.8))
        unread = host.submit(Job(config, prompt="the cat", reader_timeout=0.5))
        following = host.submit(Job(GenerationConfig(max_tokens=4), prompt="the cat"))
        assert events_of(following, 60)[-1].stats.predicted_tokens_count == 4
        assert unread.stalled
        finished = next(e for e in events_of(unread, 1) if isinstance(e, Finished))
        assert finished.stats.stop_reason == CANCELLED and finished.stats.predicted_tokens_count < 900
    finally:
        host.stop()


def test_a_finished_reply_is_not_held_for_its_reader_and_queueing_is_not_a_stall(tiny) -> None:
    host = EngineHost(config_for(tiny))
    try:
        plain = GenerationConfig(max_tokens=16, draft_max=0, sampler=SamplerSettings(temperature=0.0))
        ahead = host.submit(Job(plain, prompt="the cat"))
        waiting = host.submit(Job(plain, prompt="the dog", reader_timeout=0.3))  # 16 rounds + Finished, read by nobody
        time.sleep(0.5)  # queued longer than its reader timeout: not the reader's stall
        host.start()
        events_of(ahead, 60)
        done = time.monotonic()
        while host.running is not None or host.queued:
            time.sleep(0.01)
        assert time.monotonic() - done < 0.3 and not waiting.stalled  # ended at once, complete
        finished = [e for e in events_of(waiting, 5) if isinstance(e, Finished)]
        assert finished and finished[0].stats.predicted_tokens_count == 16
        job = Job(plain, reader_timeout=1.0)
        job.last_read = 0.0
        with pytest.raises(queue.Empty):
            job.take()  # a reader that finds nothing to read is keeping up
        assert job.last_read > 0.0
    finally:
        host.stop()


def test_a_stream_whose_client_reads_nothing_does_not_hold_the_queue(tiny, monkeypatch) -> None:
    """A real client that sends its request and then never reads (a small receive window, as a stuck reader
    has): its stream ends after the timeout and the request queued behind it is answered."""
    monkeypatch.setattr(api, "STREAM_READER_TIMEOUT", 1.0)
    with running_server(tiny, ctx_size=1024) as (base, _host, submitted):
        port = int(base.rsplit(":", 1)[1])
        body = json.dumps({"messages": CHAT, "max_tokens": 1000, "stream": True, "temperature": 0,
                           "draft_model": "none"}).encode()  # fmt: skip
        stuck = socket.socket()
        stuck.setsockopt(socket.SOL_SOCKET, socket.SO_RCVBUF, 4096)
        stuck.connect(("127.0.0.1", port))
        stuck.sendall(b"POST /api/v0/chat/completions HTTP/1.1\r\nHost: x\r\nContent-Type: application/json\r\n"
                      b"Content-Length: %d\r\n\r\n%s" % (len(body), body))  # fmt: skip
        try:
            deadline = time.monotonic() + 30
            while not submitted:
                assert time.monotonic() < deadline
                time.sleep(0.01)
            after = client(base).chat.completions.create(model="main", messages=CHAT, max_tokens=4)
            assert after.usage.completion_tokens == 4 and submitted[0].stalled
        finally:
            stuck.close()


def test_metrics_count_requests_tokens_and_drafts_in_prometheus_format(tiny) -> None:
    from prometheus_client.parser import text_string_to_metric_families

    def scrape(base: str, key: str | None = None) -> dict[str, float]:
        response = httpx.get(f"{base}/metrics", headers={"Authorization": f"Bearer {key}"} if key else {}, timeout=30)
        assert response.status_code == 200 and response.headers["content-type"].startswith("text/plain")
        return {f"{sample.name}{sample.labels or ''}": sample.value
                for family in text_string_to_metric_families(response.text) for sample in family.samples}  # fmt: skip

    with running_server(tiny, api_key="k", draft_max=4, adaptive=False) as (base, _host, _):
        assert httpx.get(f"{base}/metrics", timeout=30).status_code == 401  # the same key rule as every route
        before = scrape(base, "k")
        assert before["tandem:requests_total"] == 0 and before["tandem:model_ready"] == 1
        body = {"messages": CHAT, "temperature": 0, "max_tokens": 16, "draft_model": "twin"}
        stats = httpx.post(f"{base}/api/v0/chat/completions", json=body, headers={"Authorization": "Bearer k"}, timeout=60).json()["stats"]
        after = scrape(base, "k")
        assert after["tandem:requests_total"] == 1 and after["tandem:tokens_predicted_total"] == 16
        assert after["tandem:draft_tokens_total"] == stats["accepted_draft_tokens_count"] + stats["rejected_draft_tokens_count"]
        assert after["tandem:draft_tokens_accepted_total"] == stats["accepted_draft_tokens_count"] > 0  # the twin agrees
        assert after["tandem:drafts_total"] >= 1 and after["tandem:requests_deferred"] == 0
        assert after["tandem:draft_accepted_at_position_total{'position': '1'}"] <= after["tandem:drafts_total"]
        accepted_by_position = sum(v for k, v in after.items() if k.startswith("tandem:draft_accepted_at_position_total"))
        assert accepted_by_position == after["tandem:draft_tokens_accepted_total"]
        # the worker's time and llama.cpp's part of it, both counted, the part under the whole
        worker, inside = after["tandem:worker_seconds_total"], after["tandem:llama_decode_seconds_total"]
        assert 0 < inside < worker <= stats["generation_time"] + 1.0


def test_a_request_chooses_its_speculation_and_gets_it_echoed(tiny) -> None:
    with running_server(tiny, draft_max=4, draft_min=1, adaptive=False) as (base, _host, _):
        def ask(speculative: dict, **more) -> httpx.Response:
            body = {"messages": CHAT, "temperature": 0, "max_tokens": 12, "speculative": speculative, **more}
            return httpx.post(f"{base}/api/v0/chat/completions", json=body, timeout=60)

        plain = ask({"mode": "none"}).json()["stats"]
        assert plain["draft_model"] is None and plain["total_draft_tokens_count"] == 0
        assert plain["speculative"] == {"mode": "none", "draft_max": 4, "draft_min": 1, "draft_p_min": DRAFT_P_MIN, "used": "none"}
        model = ask({"mode": "model", "draft_max": 2}).json()["stats"]
        assert model["draft_model"].startswith("tiny-draft") and set(model["draft_length_histogram"]) <= {"0", "1", "2"}
        assert model["speculative"]["draft_max"] == 2 and model["speculative"]["used"].startswith("tiny-draft")
        lookup = ask({"mode": "lookup"}).json()["stats"]
        assert lookup["draft_model"] == "prompt lookup"
        twin = ask({"mode": "model"}, draft_model="twin").json()["stats"]  # LM Studio's field names the model
        assert twin["draft_model"].startswith("tiny-twin") and twin["accepted_draft_tokens_count"] > 0
        assert plain and ask({}).status_code == 200
        assert ask({"draft_max": 0}).json()["stats"]["speculative"]["draft_min"] == 0  # below the server's minimum

        for speculative, more, param in [
            ({"mode": "fast"}, {}, "speculative.mode"), ({"draft_max": 65}, {}, "speculative.draft_max"),
            ({"draft_max": 2, "draft_min": 3}, {}, "speculative.draft_min"), ({"draft_p_min": "x"}, {}, "speculative.draft_p_min"),
            ({"k": 3}, {}, "speculative.k"), ({"mode": "none"}, {"draft_model": "twin"}, "speculative.mode"),
        ]:  # fmt: skip
            refused = ask(speculative, **more)
            assert refused.status_code == 400 and refused.json()["error"]["param"] == param, (speculative, refused.text)
        assert httpx.post(f"{base}/v1/chat/completions", json={"messages": CHAT, "speculative": 3}, timeout=30).status_code == 400


def test_host_runs_jobs_in_order_and_reuses_the_main_model_for_a_new_draft(tiny) -> None:
    host = EngineHost(config_for(tiny))
    host.start()
    try:
        greedy = GenerationConfig(max_tokens=8, sampler=SamplerSettings(temperature=0.0))
        first = host.submit(Job(greedy, prompt="the cat"))
        a = events_of(first, 60)
        main = host.engine.main
        second = host.submit(Job(greedy, prompt="the cat", draft="lookup"))
        b = events_of(second, 60)
        assert a[-1].tokens == b[-1].tokens and b[-1].stats.draft_model == "prompt lookup"
        assert host.engine.main is main and host.served == 2  # only the draft changed: the weights stayed
    finally:
        host.stop()


def test_tandem_serve_from_the_command_line(tiny) -> None:
    with socket.socket() as probe:  # a free port, told to the server
        probe.bind(("127.0.0.1", 0))
        port = probe.getsockname()[1]
    args = ["--serve", "--port", str(port), "--model", str(tiny.main), "-t", "2", "-c", "512"]
    process = subprocess.Popen([sys.executable, "-m", "app", *args], cwd=ROOT, stderr=subprocess.PIPE, text=True,
                               env={**os.environ, "PYTHONUNBUFFERED": "1"})  # fmt: skip
    try:
        first = process.stderr.readline()
        assert "serving on http://127.0.0.1:" in first, first
        base = first.split("serving on ")[1].split()[0]
        wait_ready(base)
        reply = client(base).chat.completions.create(model="main", messages=CHAT, max_tokens=4)
        assert reply.usage.completion_tokens == 4
    finally:
        process.send_signal(signal.SIGINT)
        rest = process.communicate(timeout=30)[1]
    assert process.returncode == 130 and "Traceback" not in rest  # Ctrl+C: a clean stop, "interrupted"


def test_a_host_adopts_a_loaded_pair_and_leaves_it_open(tiny) -> None:
    """The chat app's F9: the host runs jobs on the app's engine, shows every item to an observer, refuses to
    switch the pair (that would close the owner's engine), and stop() leaves the engine usable."""
    from app.engine.loading import load_engine
    from app.host import DONE, resolve_spec

    config = config_for(tiny)
    spec = resolve_spec(config)
    engine = load_engine(spec)
    seen: list[tuple[Job, object]] = []
    host = EngineHost.adopt(config, engine, spec, on_event=lambda job, item: seen.append((job, item)))
    assert host.state == "ready" and host.engine is engine
    host.start()
    try:
        greedy = GenerationConfig(max_tokens=8, sampler=SamplerSettings(temperature=0.0))
        request = host.submit(Job(greedy, prompt="the cat"))
        own = host.submit(Job(greedy, prompt="the cat", counted=False))  # a front-end's own turn: not "served"
        other = host.submit(Job(greedy, prompt="the cat", draft=str(tiny.twin)))
        a, b, c = events_of(request, 60), events_of(own, 60), events_of(other, 60)
        assert isinstance(a[-1], Finished) and a[-1].tokens == b[-1].tokens
        assert "loaded in the Tandem app" in str(c[-1].error) and host.engine is engine
        assert host.served == 1
        assert [item for job, item in seen if job is request] == [*a, DONE]  # every item, in order, DONE last
    finally:
        host.stop()
    assert host.stopped and engine.main_ctx.ptr is not None  # still open for its owner
    with pytest.raises(QueueFull, match="stopping"):
        host.submit(Job(greedy, prompt="the cat"))
    again = list(engine.generate(engine.main.tokenize("the cat"), greedy))
    assert isinstance(again[-1], Finished)
    engine.close()


def test_stopping_a_host_cancels_queued_jobs(tiny) -> None:
    host = EngineHost(config_for(tiny))  # never started: the jobs stay queued until stop() cancels them
    job = host.submit(Job(GenerationConfig(max_tokens=4), prompt="the cat"))
    host.stop()
    assert job.cancel.is_set() and events_of(job, timeout=1) == [] and host.queued == 0


def test_a_continued_conversation_reuses_the_cached_prefix(tiny) -> None:
    with running_server(tiny) as (base, _host, _):
        first = httpx.post(f"{base}/api/v0/chat/completions", json={"messages": CHAT, "max_tokens": 16}, timeout=60).json()
        turn = [*CHAT, first["choices"][0]["message"], {"role": "user", "content": "and the dog"}]
        second = httpx.post(f"{base}/api/v0/chat/completions", json={"messages": turn, "max_tokens": 16}, timeout=60).json()
        stats = second["stats"]
        assert stats["prompt_tokens_evaluated"] < stats["prompt_tokens_count"] - first["stats"]["prompt_tokens_count"] // 2


def test_the_bearer_scheme_is_case_insensitive_and_the_key_is_not(tiny) -> None:
    with running_server(tiny, api_key="s3cret") as (base, _host, _):
        for header, status in (("bearer s3cret", 200), ("BEARER s3cret", 200), ("Bearer S3CRET", 401), ("s3cret", 401)):
            assert httpx.get(f"{base}/v1/models", headers={"Authorization": header}).status_code == status, header


@pytest.mark.parametrize("field,value", [("n", 2), ("logprobs", True), ("top_logprobs", 3), ("tools", [{"type": "function"}]),
                                         ("response_format", {"type": "json_object"}), ("presence_penalty", 0.5)])
def test_fields_the_server_does_not_implement_are_refused_by_name(tiny, field, value) -> None:
    with running_server(tiny) as (base, _host, submitted):
        body = {"messages": CHAT, "max_tokens": 4, field: value}
        answer = httpx.post(f"{base}/v1/chat/completions", json=body, timeout=60)
        assert answer.status_code == 400 and answer.json()["error"]["param"] == field, answer.text
        assert "not supported" in answer.json()["error"]["message"] and not submitted
        harmless = {"n": 1, "logprobs": False, "top_logprobs": 0, "tools": [], "response_format": {"type": "text"},
                    "presence_penalty": 0}[field]  # fmt: skip
        assert httpx.post(f"{base}/v1/chat/completions", json={**body, field: harmless}, timeout=60).status_code == 200


def test_a_request_loads_only_what_the_model_folders_hold(tiny, tmp_path) -> None:
    outside = tmp_path / "elsewhere.gguf"
    outside.write_bytes(tiny.twin.read_bytes())
    with running_server(tiny) as (base, host, submitted):
        for field in ("model", "draft_model"):
            body = {"messages": CHAT, "max_tokens": 4, field: str(outside)}
            answer = httpx.post(f"{base}/api/v0/chat/completions", json=body, timeout=60)
            assert answer.status_code == 404 and answer.json()["error"]["param"] == field
            assert "outside the model folders" in answer.json()["error"]["message"]
        assert not submitted and host.spec.main == tiny.main
        by_path = httpx.post(f"{base}/v1/chat/completions", json={"messages": CHAT, "max_tokens": 4, "model": str(tiny.main)}, timeout=60)
        assert by_path.status_code == 200  # the loaded model, and the catalog's files, may be named by path
    with running_server(tiny, any_path=True) as (base, host, _):  # the operator's opt-in: --any-model-path
        answer = httpx.post(f"{base}/v1/chat/completions", json={"messages": CHAT, "max_tokens": 4, "model": str(outside)}, timeout=60)
        assert answer.status_code == 200 and host.spec.main == outside


def test_a_server_others_can_reach_without_a_key_warns_at_start() -> None:
    from app.server import exposure_warning

    assert exposure_warning("127.0.0.1", 5001, None) is None and exposure_warning("::1", 5001, None) is None
    assert exposure_warning("localhost", 5001, None) is None
    assert exposure_warning("0.0.0.0", 5001, "KEY") is None
    warning = exposure_warning("0.0.0.0", 5001, None)
    assert warning and "anyone on the network" in warning and "--api-key" in warning
    assert exposure_warning("192.168.1.5", 5001, None)


def test_the_demo_main_model_named_by_path_keeps_its_own_draft(monkeypatch, tmp_path) -> None:
    """After a request for another model, one naming the demo's main file gets the demo pair back, not lookup."""
    from app.engine.demo import demo_paths
    from app.host import resolve_spec

    monkeypatch.setenv("TANDEM_MODELS_CACHE", str(tmp_path))
    demo_main, demo_draft = demo_paths()
    assert resolve_spec(Config(), main=str(demo_main)).draft == str(demo_draft)
    assert resolve_spec(Config(), main=str(tmp_path / "other.gguf")).draft == "lookup"


@pytest.fixture(scope="module")
def kquant_pair(tmp_path_factory: pytest.TempPathFactory):
    """A K-quant pair: the main model's default (repacked) kernels may compute a row differently in a wider batch,
    as a real K-quant model's do; the tiny F16 pair's never do."""
    from tests.conftest import TinyPair
    from tests.tiny_models import k_quant_model

    root = tmp_path_factory.mktemp("kquant-pair")
    main, draft = k_quant_model(root), k_quant_model(root, noise=0.3, name="tiny-q4km-draft")
    return TinyPair(main=main, draft=draft, twin=main, foreign=main)


@pytest.mark.parametrize("exact", [False, True], ids=["default", "exact"])
def test_eight_concurrent_requests_get_their_answers_alone_wherever_exact(kquant_pair, exact, monkeypatch) -> None:
    """Eight temperature-0 requests on four sequences, all waiting before the worker starts (so they are batched
    and queued whatever the HTTP timing): each gets the text it gets alone wherever its stats say exact, and
    with --exact always (verify decodes capped at the self-check's exact width, prompts read alone)."""
    prompts = [f"the {a} sat on the {b} and" for a in ("cat", "dog", "list", "mat") for b in ("mat", "x")]

    def ask(base: str, prompt: str) -> dict:
        body = {"messages": [{"role": "user", "content": prompt}], "temperature": 0, "max_tokens": 40}
        response = httpx.post(f"{base}/api/v0/chat/completions", json=body, timeout=300)
        assert response.status_code == 200, response.text
        return response.json()

    def text(reply: dict) -> str:
        return reply["choices"][0]["message"]["content"]

    settings = {"parallel": 4, "max_tokens": 40, "ctx_size": 1024, "exact": exact}
    with running_server(kquant_pair, **settings) as (base, _host, _):
        alone = [ask(base, p) for p in prompts]
    sequences_per_decode: list[int] = []
    decode = SpeculativeEngine.decode

    def counted(self, needs):
        sequences_per_decode.append(len(needs))
        return decode(self, needs)

    monkeypatch.setattr(SpeculativeEngine, "decode", counted)
    with running_server(kquant_pair, start_host=False, **settings) as (base, host, submitted), ThreadPoolExecutor(8) as pool:
        futures = [pool.submit(ask, base, p) for p in prompts]
        deadline = time.monotonic() + 30
        while len(submitted) < 8:
            assert time.monotonic() < deadline
            time.sleep(0.01)
        host.start()
        together = [future.result(timeout=300) for future in futures]
    if exact:
        assert all(r["stats"]["exact"] for r in alone)
    assert max(sequences_per_decode) >= 2  # replies really shared decodes
    for prompt, solo, batched in zip(prompts, alone, together, strict=True):
        if exact:
            assert batched["stats"]["exact"]
        if batched["stats"]["exact"]:
            assert text(batched) == text(solo), prompt
