"""Command line: `tandem --prompt ...` runs headless (never imports Textual); plain `tandem` opens the chat app.

KoboldCpp and llama.cpp spellings are accepted as aliases so their users' muscle memory works.
"""

from __future__ import annotations

import argparse
import contextlib
import json
import math
import os
import sys
from collections.abc import Callable, Sequence
from pathlib import Path

from app import __version__
from app.engine.controller import DRAFT_P_MIN
from app.engine.rpc import DEFAULT_PORT as DEFAULT_RPC_PORT
from app.engine.sources import SOURCES

EXIT_USAGE, EXIT_ERROR, EXIT_INTERRUPTED, EXIT_BROKEN_PIPE = 2, 1, 130, 141


class _Parser(argparse.ArgumentParser):
    """argparse, but a usage error is one line (not the whole usage block) and exit code 2."""

    def error(self, message: str) -> None:  # type: ignore[override]
        sys.stderr.write(f"tandem: error: {message} (see tandem --help)\n")
        raise SystemExit(EXIT_USAGE)


class _Version(argparse.Action):
    """tandem's version, llama.cpp's, and which of its builds runs here (the CPU variant, any GPU)."""

    def __call__(self, parser, namespace, values, option_string=None) -> None:
        import llama_cpp

        from app.engine.backend import init_backend
        from app.engine.backends import backends
        from app.engine.errors import TandemError

        sys.stdout.write(f"tandem {__version__}\n")
        try:
            init_backend()
            sys.stdout.write(f"llama.cpp {llama_cpp.__version__}: {backends().describe()}\n")
        except TandemError as exc:
            sys.stderr.write(f"tandem: error: {exc}\n")
            raise SystemExit(EXIT_ERROR) from None
        raise SystemExit(0)


def _integer(text: str) -> int:
    try:
        return int(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"expected a whole number, got {text!r}") from None


def _number(text: str) -> float:
    try:
        value = float(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"expected a number, got {text!r}") from None
    if not math.isfinite(value):
        raise argparse.ArgumentTypeError(f"expected a finite number, got {text!r}")
    return value


def _non_negative_int(text: str) -> int:
    value = _integer(text)
    if value < 0:
        raise argparse.ArgumentTypeError(f"must be 0 or more, got {value}")
    return value


def _positive_int(text: str) -> int:
    value = _integer(text)
    if value < 1:
        raise argparse.ArgumentTypeError(f"must be 1 or more, got {value}")
    return value


def _parallel(text: str) -> int:
    from app.config import Settings

    value = _integer(text)
    low, high = Settings.LIMITS["parallel"]
    if not low <= value <= high:
        raise argparse.ArgumentTypeError(f"must be between {low} and {high}, got {value}")
    return value


def _layers(text: str) -> int:
    value = -1 if text.lower() in ("all", "-1") else _integer(text)
    if value < -1:
        raise argparse.ArgumentTypeError(f"must be -1 (all), 0 (none) or a layer count, got {value}")
    return value


def _non_negative_float(text: str) -> float:
    value = _number(text)
    if value < 0.0:
        raise argparse.ArgumentTypeError(f"must be 0 or more, got {text}")
    return value


def _positive_float(text: str) -> float:
    value = _number(text)
    if value <= 0.0:
        raise argparse.ArgumentTypeError(f"must be more than 0, got {text}")
    return value


def _probability(text: str) -> float:
    value = _number(text)
    if not 0.0 <= value <= 1.0:
        raise argparse.ArgumentTypeError(f"must be between 0 and 1, got {text}")
    return value


def build_parser() -> argparse.ArgumentParser:
    p = _Parser(
        prog="tandem",
        description="Chat with local GGUF models, sped up by speculative decoding. "
        "Without --prompt it opens the terminal chat app; with no --model it uses the demo pair.",
    )
    p.add_argument("--version", action=_Version, nargs=0, help="show the version and the llama.cpp backends this machine gets, and exit")

    launcher = p.add_argument_group("launcher")
    launcher.add_argument("--config", metavar="FILE",
                          help="load a launch configuration (TOML: models, draft, sampling, hardware); flags typed here override it")
    launcher.add_argument("--save-config", metavar="FILE", help="write the configuration these flags describe to FILE and exit")
    launcher.add_argument("--models-dir", action="append", default=[], metavar="DIR",
                          help="another folder the model pickers search (repeatable)")
    launcher.add_argument("--benchmark", action="store_true",
                          help="measure plain vs speculative decoding on the chosen pair and print a table")

    model = p.add_argument_group("model")
    model.add_argument("--model", "-m", metavar="PATH", help="main model (GGUF); default: the demo pair")
    model.add_argument("--ctx-size", "--contextsize", "-c", type=_positive_int, default=4096, metavar="N",
                       help="context size in tokens (default 4096, capped at the model's training context)")

    draft = p.add_argument_group("draft (speculative decoding)")
    draft.add_argument("--draft", "--draftmodel", "-md", metavar="PATH|mtp|lookup",
                       help="draft model (GGUF) sharing the main model's vocabulary, 'mtp' for the main model's own "
                       "multi-token-prediction head (the default when it has one), or 'lookup' for prompt-lookup drafting "
                       "(the default otherwise)")
    draft.add_argument("--no-draft", action="store_true", help="plain decoding, no speculation (the baseline)")
    draft.add_argument("--exact", action="store_true",
                       help="batch-invariant kernels for the main model: output token-identical to plain decoding, "
                       "also for a request served beside others (--serve --parallel) "
                       "(default: the fastest kernels, identical up to floating-point near-ties, which a wider batch "
                       "beside other requests can move; stats.exact says which held)")
    draft.add_argument("--no-adaptive", action="store_true",
                       help="always draft --draft-max tokens (up to an unsure one: --draft-p-min) instead of adapting per round")
    draft.add_argument("--draft-max", "--draftamount", "--draft-n", type=_non_negative_int, default=16, metavar="K",
                       help="most tokens drafted per round (default 16, as llama.cpp; the adaptive controller picks fewer where they pay)")
    draft.add_argument("--draft-min", type=_non_negative_int, default=0, metavar="K",
                       help="drafts shorter than this are not sent for verification (default 0)")
    draft.add_argument("--draft-p-min", type=_probability, default=DRAFT_P_MIN, metavar="P",
                       help=f"stop drafting when the draft's top probability falls below P (default {DRAFT_P_MIN}; 0: never); "
                       "adaptive mode lifts the stop while such tokens prove right often enough to pay")

    hw = p.add_argument_group("hardware")
    hw.add_argument("--threads", "-t", type=_positive_int, default=os.cpu_count() or 1, metavar="N",
                    help="CPU threads, at most: fewer while other processes keep cores busy (default: all cores)")
    hw.add_argument("--gpu-layers", "--gpulayers", "-ngl", type=_layers, default=-1, metavar="N",
                    help="main-model layers on the GPU: -1 or 'all' (default), 0 for none; ignored without a GPU backend")
    hw.add_argument("--draft-gpu-layers", "--draftgpulayers", "-ngld", type=_layers, default=-1, metavar="N",
                    help="draft model fully on the GPU (-1, default) or fully on the CPU (0)")
    hw.add_argument("--rpc", type=_setting("rpc"), metavar="HOST:PORT[,...]",
                    help="put the main model's layers on llama.cpp RPC workers (`tandem --rpc-worker` there); the draft stays here")
    hw.add_argument("--tensor-split", "-ts", type=_setting("tensor_split"), metavar="A,B,...",
                    help="the workers' (then this machine's GPUs') shares of the main model's layers; default: by free memory")

    worker = p.add_argument_group("RPC worker (serve this machine to another Tandem or llama.cpp)")
    worker.add_argument("--rpc-worker", action="store_true",
                        help=f"serve this machine's GPUs (or CPU) to `--rpc` clients; binds --host (127.0.0.1) and"
                             f" --port (default {DEFAULT_RPC_PORT}); no authentication: keep it on a trusted network")

    sampling = p.add_argument_group("sampling")
    sampling.add_argument("--temp", "--temperature", type=_non_negative_float, default=0.8, metavar="T",
                          help="temperature; 0 is greedy (default 0.8)")
    sampling.add_argument("--top-k", type=_non_negative_int, default=40, metavar="K", help="0 disables (default 40)")
    sampling.add_argument("--top-p", type=_probability, default=0.95, metavar="P", help="default 0.95")
    sampling.add_argument("--min-p", type=_probability, default=0.05, metavar="P", help="default 0.05")
    sampling.add_argument("--repeat-penalty", type=_positive_float, default=1.0, metavar="X", help="1 disables (default)")
    sampling.add_argument("--seed", "-s", type=_integer, default=None, metavar="S", help="random seed for reproducible sampling")
    sampling.add_argument("--max-tokens", "-n", "--n-predict", type=_positive_int, default=512, metavar="N",
                          help="most tokens to generate (default 512)")
    sampling.add_argument("--stop", action="append", default=[], metavar="TEXT", help="stop string (repeatable)")

    headless = p.add_argument_group("headless")
    headless.add_argument("--prompt", "-p", metavar="TEXT", help="generate one reply and exit; '-' reads stdin")
    headless.add_argument("--system", metavar="TEXT", help="system message")
    headless.add_argument("--raw", action="store_true", help="send the prompt as-is, without the chat template")
    headless.add_argument("--json", action="store_true", help="print one JSON object (text, tokens, stats) instead of streaming")

    server = p.add_argument_group("server (OpenAI-compatible and LM Studio-style HTTP API)")
    server.add_argument("--serve", action="store_true", help="serve the loaded pair over HTTP instead of chatting")
    server.add_argument("--host", default="127.0.0.1", metavar="ADDR", help="address to listen on (default 127.0.0.1: this machine only)")
    server.add_argument("--port", type=_port, default=None, metavar="N",
                        help=f"port (default 5001, as KoboldCpp; {DEFAULT_RPC_PORT} with --rpc-worker)")
    server.add_argument("--max-queue", type=_positive_int, default=16, metavar="N",
                        help="requests that may wait for the engine; more are answered 503 (default 16)")
    server.add_argument("--parallel", "-np", type=_parallel, default=None, metavar="N",
                        help="replies generated together, one main-model batch per round (default 4 with --serve, as "
                             "llama-server's -np; 1 in the chat app, whose F9 server then shares it)")  # fmt: skip
    server.add_argument("--api-key", metavar="KEY", help="require 'Authorization: Bearer KEY' on every API request")
    server.add_argument("--any-model-path", action="store_true",
                        help="let requests load any GGUF file on this machine by its path (default: only the model folders' files)")
    return p


def _setting(name: str) -> Callable[[str], str]:
    """An argparse type for a text setting: its one rule (Settings.FORMATS), its reason as the usage error."""

    def check(text: str) -> str:
        from app.config import Settings
        from app.engine.errors import TandemError

        try:
            Settings.FORMATS[name][0](text)
        except TandemError as exc:
            raise argparse.ArgumentTypeError(str(exc)) from None
        return text

    return check


def _port(text: str) -> int:
    value = _integer(text)
    if not 0 <= value <= 65535:
        raise argparse.ArgumentTypeError(f"must be between 0 and 65535, got {value}")
    return value


# CLI flag (argparse dest) -> setting name; these are what --config files hold
SETTING_FLAGS = {
    "temp": "temperature", "top_k": "top_k", "top_p": "top_p", "min_p": "min_p", "repeat_penalty": "repeat_penalty",
    "max_tokens": "max_tokens", "seed": "seed", "draft_max": "draft_max", "draft_min": "draft_min",
    "draft_p_min": "draft_p_min", "no_adaptive": "adaptive", "gpu_layers": "gpu_layers",
    "draft_gpu_layers": "draft_on_gpu", "ctx_size": "ctx_size", "threads": "threads", "system": "system", "exact": "exact",
    "rpc": "rpc", "tensor_split": "tensor_split",
}  # fmt: skip


def parse_args(argv: Sequence[str] | None) -> argparse.Namespace:
    parser = build_parser()
    args = parser.parse_args(argv)
    if args.draft and args.no_draft:
        parser.error("--draft and --no-draft contradict each other")
    if args.serve and (args.prompt is not None or args.benchmark):
        parser.error("--serve answers HTTP requests; it does not take --prompt or --benchmark")
    if args.rpc_worker and (args.serve or args.prompt is not None or args.benchmark or args.rpc):
        parser.error("--rpc-worker only serves this machine to other Tandems: it takes --host, --port and --threads")
    if args.draft_min > args.draft_max:
        parser.error(f"--draft-min ({args.draft_min}) is larger than --draft-max ({args.draft_max})")
    _check_ranges(parser, args)
    for name in ("prompt", "system", "model", "draft", "config"):
        value = getattr(args, name)
        if isinstance(value, str) and not _valid_text(value):
            parser.error(f"--{name} is not valid UTF-8 text")
    if not all(_valid_text(stop) for stop in args.stop):
        parser.error("--stop is not valid UTF-8 text")
    # which flags were typed (not defaulted): only those override a --config file or the app's settings
    shadow = build_parser()
    for action in shadow._actions:
        action.default = argparse.SUPPRESS
    args.explicit = set(vars(shadow.parse_args(argv)))
    return args


def _check_ranges(parser: argparse.ArgumentParser, args: argparse.Namespace) -> None:
    """The settings' own limits (the chat app's form uses the same), as usage errors with the flag's name."""
    from app.config import Settings

    flags = {action.dest: action.option_strings[0] for action in parser._actions if action.option_strings}
    for dest, name in SETTING_FLAGS.items():
        value = getattr(args, dest)
        low, high = Settings.LIMITS.get(name, (None, None))
        if isinstance(value, bool) or not isinstance(value, int | float) or (dest == "seed" and value is None):
            continue
        if (low is not None and value < low) or (high is not None and value > high):
            bounds = f"at least {low}" if high is None else f"between {low} and {high}"
            parser.error(f"argument {flags[dest]}: must be {bounds}, got {value}")


def _valid_text(text: str) -> bool:
    """Python keeps undecodable bytes of argv as lone surrogates: such text cannot reach the tokenizer."""
    try:
        text.encode("utf-8")
    except UnicodeEncodeError:
        return False
    return True


def main(argv: Sequence[str] | None = None) -> int:
    for name in ("stdout", "stderr"):  # started with the stream closed (`>&-`): write nowhere, not crash
        if getattr(sys, name) is None:
            setattr(sys, name, open(os.devnull, "w"))  # noqa: SIM115 (lives as long as the process)
    argv = sys.argv[1:] if argv is None else list(argv)
    from app.engine.kernels import TRIAL_FLAG

    if argv[:1] == [TRIAL_FLAG]:  # a child trying one kernel placement (engine/kernels.py); not for users
        from app.engine.kernels import trial_main

        return trial_main(argv[1])
    args = parse_args(argv)
    from app.engine.errors import TandemError

    try:
        if args.save_config:
            return save_launch_config(args)
        if args.benchmark:
            from app.benchmark import run_benchmark

            return run_benchmark(launch_config(args), sys.stdout)
        if args.rpc_worker:
            from app.engine.rpc import serve_worker

            return serve_worker(args.host, DEFAULT_RPC_PORT if args.port is None else args.port, args.threads)
        if args.serve:
            from app.server import DEFAULT_PORT, serve

            port = DEFAULT_PORT if args.port is None else args.port
            return serve(launch_config(args), args.host, port, args.max_queue, args.api_key, any_path=args.any_model_path,
                         parallel=args.parallel)  # fmt: skip
        return run_headless(args) if args.prompt is not None else run_chat(args)
    except TandemError as exc:
        sys.stderr.write(f"tandem: error: {exc}\n")
        return EXIT_ERROR
    except KeyboardInterrupt:
        sys.stderr.write("tandem: interrupted\n")
        return EXIT_INTERRUPTED
    except BrokenPipeError:  # the reader went away (`| head -c 5`): stop quietly, as C tools do on SIGPIPE
        with contextlib.suppress(OSError):
            os.dup2(os.open(os.devnull, os.O_WRONLY), sys.stdout.fileno())  # the exit-time flush must not fail again
        return EXIT_BROKEN_PIPE


def read_prompt(args: argparse.Namespace) -> str:
    from app.engine.errors import TandemError

    if args.prompt == "-":
        raw = sys.stdin.buffer.read()
        try:
            text = raw.decode("utf-8")
        except UnicodeDecodeError as exc:
            raise TandemError(f"the prompt on standard input is not valid UTF-8 (byte {exc.start})") from None
    else:
        text = args.prompt
    if not text.strip():
        raise TandemError("the prompt is empty")
    return text


def _flag_value(args: argparse.Namespace, dest: str) -> object:
    value = getattr(args, dest)
    if dest == "no_adaptive":
        return not value
    if dest == "draft_gpu_layers":
        return value != 0
    if dest == "seed":
        return -1 if value is None else value
    return value


def launch_config(args: argparse.Namespace):  # -> app.config.Config
    """Defaults, then the --config file, then the flags typed on the command line."""
    from app.config import Config, load_config

    if args.config and not Path(args.config).expanduser().is_file():
        from app.engine.errors import TandemError

        raise TandemError(f"config file not found: {args.config}")
    config = load_config(Path(args.config).expanduser()) if args.config else Config()
    for dest, name in SETTING_FLAGS.items():
        if dest in args.explicit:
            config.settings.set(name, _flag_value(args, dest))
    config.settings.check()  # a typed --draft-min may contradict the file's draft_max
    if args.model:
        config.main = str(Path(args.model).expanduser().absolute())
    if args.no_draft:
        config.draft = "none"
    elif args.draft:
        config.draft = args.draft if args.draft in SOURCES else str(Path(args.draft).expanduser().absolute())
    elif args.model:
        config.draft = ""  # a new main model: its own default, not the config's draft for another model
    config.dirs = [*args.models_dir, *config.dirs]
    return config


def save_launch_config(args: argparse.Namespace) -> int:
    from app.config import save_config

    path = Path(args.save_config)
    kept = save_config(launch_config(args), path)
    if kept is not None:
        sys.stderr.write(f"tandem: {path} could not be read; it was kept as {kept}\n")
    sys.stderr.write(f"tandem: saved the launch configuration to {path}; run it with: tandem --config {path}\n")
    return 0


def run_headless(args: argparse.Namespace) -> int:
    from app.engine.chat import ChatSession, tokenize_prompt
    from app.engine.events import Finished
    from app.engine.loading import load_engine
    from app.host import resolve_spec

    prompt_text = read_prompt(args)
    launch = launch_config(args)
    engine = load_engine(resolve_spec(launch), measuring=stderr_steps)
    config = launch.settings.generation_config(tuple(args.stop))
    if args.raw:
        events = engine.generate(tokenize_prompt(engine.main, prompt_text), config)
    else:
        events = said_fallbacks(ChatSession(engine, system=launch.settings.system or None).send(prompt_text, config))
    out = sys.stdout
    if args.json:
        finished = next(e for e in events if isinstance(e, Finished))
        json.dump(
            {
                "text": finished.text,
                "tokens": list(finished.tokens),
                "model_path": str(engine.main.path),
                "draft_path": str(engine.draft_model.path) if engine.draft_model else None,
                "stats": finished.stats.as_dict(),
            },
            out,
        )
        out.write("\n")
    else:
        finished = stream_reply(events, out)
    sys.stderr.write(finished.stats.summary() + "\n")
    engine.close()
    return 0


def said_fallbacks(events):
    """The events, with a chat template's fallback said on stderr (one line) rather than passed on."""
    from app.engine.events import TemplateFallback

    for event in events:
        if isinstance(event, TemplateFallback):
            sys.stderr.write(f"tandem: warning: {event.sentence()}\n")
        else:
            yield event


def stderr_steps(what: str, done: int, total: int) -> None:
    """The first run of a model on a machine measures its kernels (seconds to minutes): say so on a terminal's
    stderr, in one line that counts up (a script's stderr gets only the reply's stats line, or one error line)."""
    if sys.stderr.isatty():
        sys.stderr.write(f"\rtandem: {what}: {done}/{total}" + ("\n" if done >= total else ""))
        sys.stderr.flush()


def stream_reply(events, out) -> object:  # -> Finished
    from app.engine.events import Finished, RoundEvent

    for event in events:
        if isinstance(event, Finished):
            out.write(event.tail + "\n")
            out.flush()
            return event
        if isinstance(event, RoundEvent) and event.text:  # progress events (PromptProgress) print nothing
            out.write(event.text)
            out.flush()
    raise AssertionError("the engine always ends with a Finished event")


def run_chat(args: argparse.Namespace) -> int:
    """The Textual chat app (imported only here: the headless path never loads Textual)."""
    from app.config import default_config_path
    from app.engine.errors import TandemError

    if not (sys.stdin.isatty() and sys.stdout.isatty()):
        raise TandemError("no --prompt given and this is not a terminal; use --prompt TEXT or --prompt -")
    launch = launch_config(args)
    overrides = {name: getattr(launch.settings, name) for dest, name in SETTING_FLAGS.items() if dest in args.explicit}
    draft = launch.draft if (args.draft or args.no_draft) else None
    from app.tui.app import LaunchOptions, run_tui

    options = LaunchOptions(
        config_path=Path(args.config) if args.config else default_config_path(),
        main=launch.main if args.model else None,
        draft=draft,
        dirs=list(args.models_dir),
        settings=overrides,
        parallel=args.parallel or 1,
    )
    return run_tui(options)
