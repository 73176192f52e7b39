#!/usr/bin/env bash
# The one-file executable on its own: copied into an empty directory and run with a bare
# environment (no venv, no project on PYTHONPATH, a temporary HOME), as a user would run it.
#   packaging/smoke_test.sh [dist/tandem]
set -euo pipefail
BINARY="$(realpath "${1:-dist/tandem}")"
WORK="$(mktemp -d)"
trap 'tmux kill-session -t tandem-smoke 2>/dev/null || true; rm -rf "$WORK"' EXIT
mkdir -p "$WORK/home" "$WORK/run"
cp "$BINARY" "$WORK/run/tandem"
cd "$WORK/run"
bare() { env -i HOME="$WORK/home" PATH=/usr/bin:/bin TERM=xterm-256color LANG=C.UTF-8 "$@"; }
fail() { echo "smoke test FAILED: $*" >&2; exit 1; }

echo "== size: $(du -m tandem | cut -f1) MiB"
bare ./tandem --version | grep -q "^tandem " || fail "--version"

echo "== --prompt --json on the demo pair (fetched into the empty HOME)"
bare ./tandem --prompt "Write a quicksort algorithm in Python. Write code only." --temp 0 -n 48 -t 2 --json > reply.json 2> stderr.txt \
    || { cat stderr.txt; fail "--prompt exited non-zero"; }
python3 - reply.json <<'PY' || fail "the JSON reply is not what it should be"
import json, sys
reply = json.load(open(sys.argv[1]))
stats = reply["stats"]
assert reply["text"].strip() and reply["tokens"], reply
assert reply["draft_path"] and stats["draft_model"], stats
assert stats["total_draft_tokens_count"] == stats["accepted_draft_tokens_count"] + stats["rejected_draft_tokens_count"] + stats["ignored_draft_tokens_count"]
print(f"   {stats['predicted_tokens_count']} tokens at {stats['tokens_per_second']:.1f} tok/s, draft {stats['draft_model']}, "
      f"{stats['accepted_draft_tokens_count']}/{stats['total_draft_tokens_count']} drafted tokens accepted")
PY

echo "== a bad input: one line, exit 1, no traceback"
set +e
bare ./tandem --model missing.gguf --prompt hi > out.txt 2> err.txt
code=$?
set -e
[ "$code" = 1 ] || fail "a missing model exited $code"
grep -q "model file not found" err.txt || fail "no clear message: $(cat err.txt)"
! grep -q Traceback err.txt || fail "a traceback"

echo "== --serve: one request through the OpenAI-compatible API"
# exec: $! is the program itself, not a subshell around it (killing a subshell would leave the server running)
(exec env -i HOME="$WORK/home" PATH=/usr/bin:/bin TERM=xterm-256color LANG=C.UTF-8 ./tandem --serve --port 5099 -t 2) > serve.out 2> serve.err &
server=$!
for _ in $(seq 120); do curl -sf http://127.0.0.1:5099/health > /dev/null && break; sleep 0.5; done
curl -sf http://127.0.0.1:5099/api/v0/chat/completions -H 'Content-Type: application/json' \
    -d '{"messages": [{"role": "user", "content": "Say hello"}], "max_tokens": 8, "temperature": 0}' > served.json \
    || { cat serve.err; kill -TERM "$server"; fail "the server did not answer"; }
kill -TERM "$server"; wait "$server" || true  # (a background job ignores SIGINT, and the bootloader passes that on)
python3 - served.json <<'PY' || fail "the served reply is not what it should be"
import json, sys
reply = json.load(open(sys.argv[1]))
assert reply["choices"][0]["message"]["content"].strip() and "accepted_draft_tokens_count" in reply["stats"], reply
print(f"   served: {reply['usage']['completion_tokens']} tokens, draft {reply['stats']['draft_model']}")
PY
! grep -q Traceback serve.err || fail "a traceback while serving: $(cat serve.err)"

echo "== --rpc-worker and --rpc: the binary serves its CPU to itself over loopback"
(exec env -i HOME="$WORK/home" PATH=/usr/bin:/bin LANG=C.UTF-8 ./tandem --rpc-worker --port 50099 -t 1) > worker.out 2> worker.err &
worker=$!
for _ in $(seq 60); do grep -q "use it with" worker.out 2> /dev/null && break; sleep 0.5; done
bare ./tandem --rpc 127.0.0.1:50099 --no-draft --prompt "Say hi" --temp 0 -n 4 -t 2 --json > rpc.json 2> rpc.err \
    || { cat rpc.err worker.err; kill -TERM "$worker"; fail "--rpc exited non-zero"; }
kill -TERM "$worker"; wait "$worker" || true
grep -q 'main on RPC 127.0.0.1:50099' rpc.json || fail "the reply does not say the main model ran on the worker: $(cat rpc.json)"
echo "   answered over RPC: $(python3 -c 'import json,sys; print(repr(json.load(open(sys.argv[1]))["text"]))' rpc.json)"

if command -v tmux > /dev/null; then
    echo "== the chat app in a terminal (tmux)"
    tmux new-session -d -s tandem-smoke -x 140 -y 40 "env -i HOME=$WORK/home PATH=/usr/bin:/bin TERM=xterm-256color LANG=C.UTF-8 ./tandem -t 2; echo exit=\$? > $WORK/tui-exit; sleep 30"
    for _ in $(seq 60); do tmux capture-pane -p -t tandem-smoke | grep -qE "ctx 0/[1-9]" && break; sleep 0.5; done
    tmux send-keys -t tandem-smoke "Say hello" Enter
    for _ in $(seq 60); do tmux capture-pane -p -t tandem-smoke | grep -q "tokens · " && break; sleep 0.5; done
    tmux capture-pane -p -t tandem-smoke | grep -q "tokens · " || { tmux capture-pane -p -t tandem-smoke; fail "no reply in the TUI"; }
    tmux send-keys -t tandem-smoke C-q
    for _ in $(seq 20); do [ -f "$WORK/tui-exit" ] && break; sleep 0.5; done
    grep -q "exit=0" "$WORK/tui-exit" || fail "the TUI did not quit cleanly"
    ls "$WORK"/home/.local/share/tandem/history/*.jsonl > /dev/null || fail "no conversation saved"
else
    echo "== tmux not installed: TUI check skipped"
fi
# The one file holds llama.cpp's CPU backend for every x86-64 level and loads the one this CPU runs. Another CPU is
# emulated with qemu-user: the frozen bootloader re-executes itself (natively, out of qemu's reach), so the program
# runs from the venv it was frozen from, on the same libraries. The kernel trial's children would run natively
# too: TANDEM_CPU_EXTRA_BUFFERS=1 takes llama.cpp's default placement instead.
PY="$(dirname "$BINARY")/../.venv/bin/python"
if command -v qemu-x86_64 > /dev/null && [ -x "$PY" ]; then
    for cpu in Haswell Nehalem; do
        echo "== the program on an emulated $cpu CPU (qemu-x86_64 -cpu $cpu)"
        qemu-x86_64 -cpu "$cpu" "$PY" -m app --version 2>/dev/null | tail -1
    done
    draft_model=$(ls "$WORK"/home/.cache/tandem/models/*.Q4_1.gguf 2>/dev/null | head -1)
    [ -n "$draft_model" ] || fail "the demo draft model was not fetched"
    (cd "$(dirname "$PY")/../.." && env TANDEM_CPU_EXTRA_BUFFERS=1 HOME="$WORK/home" qemu-x86_64 -cpu Haswell "$PY" -m app \
        --model "$draft_model" --no-draft --prompt "Say hi" -n 4 -t 2 -c 256 --temp 0 > "$WORK/haswell.txt" 2> "$WORK/haswell.err") \
        || { grep -v "TCG doesn't support" "$WORK/haswell.err"; fail "no answer on an emulated Haswell CPU"; }
    [ -s "$WORK/haswell.txt" ] || fail "an empty answer on an emulated Haswell CPU"
    echo "   answered: $(head -c 60 "$WORK/haswell.txt" | tr '\n' ' ')"
else
    echo "== qemu-user or the venv missing: the emulated-CPU check skipped"
fi
echo "smoke test passed"
