"""Command line: `tandem --prompt ...` runs headless (never imports Textual); plain `tandem` opens the chat app.

KoboldCpp and llama.cpp spellings are accepted as aliases so their users' muscle memory works.
"""

from __future__ import annotations

import argparse
import json
import os
import sys
from collections.abc import Sequence
from pathlib import Path

from app import __version__

EXIT_USAGE, EXIT_ERROR, EXIT_INTERRUPTED = 2, 1, 130


class _Parser(argparse.ArgumentParser):
    """argparse, but a usage error is one line (not the whole usage block) and exit code 2."""

    def error(self, message: str) -> None:  # type: ignore[override]
        sys.stderr.write(f"tandem: error: {message} (see tandem --help)\n")
        raise SystemExit(EXIT_USAGE)


def _non_negative_int(text: str) -> int:
    value = int(text)
    if value < 0:
        raise argparse.ArgumentTypeError(f"must be 0 or more, got {value}")
    return value


def _positive_int(text: str) -> int:
    value = int(text)
    if value < 1:
        raise argparse.ArgumentTypeError(f"must be 1 or more, got {value}")
    return value


def _layers(text: str) -> int:
    value = -1 if text.lower() in ("all", "-1") else int(text)
    if value < -1:
        raise argparse.ArgumentTypeError(f"must be -1 (all), 0 (none) or a layer count, got {value}")
    return value


def _non_negative_float(text: str) -> float:
    value = float(text)
    if not value >= 0.0:  # also rejects nan
        raise argparse.ArgumentTypeError(f"must be 0 or more, got {text}")
    return value


def _probability(text: str) -> float:
    value = float(text)
    if not 0.0 <= value <= 1.0:
        raise argparse.ArgumentTypeError(f"must be between 0 and 1, got {text}")
    return value


def build_parser() -> argparse.ArgumentParser:
    p = _Parser(
        prog="tandem",
        description="Chat with local GGUF models, sped up by speculative decoding. "
        "Without --prompt it opens the terminal chat app; with no --model it uses the demo pair.",
    )
    p.add_argument("--version", action="version", version=f"tandem {__version__}")

    model = p.add_argument_group("model")
    model.add_argument("--model", "-m", metavar="PATH", help="main model (GGUF); default: the demo pair")
    model.add_argument("--ctx-size", "--contextsize", "-c", type=_positive_int, default=4096, metavar="N",
                       help="context size in tokens (default 4096, capped at the model's training context)")

    draft = p.add_argument_group("draft (speculative decoding)")
    draft.add_argument("--draft", "--draftmodel", "-md", metavar="PATH|lookup",
                       help="draft model (GGUF) sharing the main model's vocabulary, or 'lookup' for prompt-lookup drafting "
                       "(the default when no draft model is given)")
    draft.add_argument("--no-draft", action="store_true", help="plain decoding, no speculation (the baseline)")
    draft.add_argument("--no-adaptive", action="store_true", help="always draft --draft-max tokens instead of adapting per round")
    draft.add_argument("--draft-max", "--draftamount", "--draft-n", type=_non_negative_int, default=8, metavar="K",
                       help="most tokens drafted per round (default 8)")
    draft.add_argument("--draft-min", type=_non_negative_int, default=0, metavar="K",
                       help="drafts shorter than this are not sent for verification (default 0)")
    draft.add_argument("--draft-p-min", type=_probability, default=0.0, metavar="P",
                       help="stop drafting when the draft's top probability falls below P (default 0)")

    hw = p.add_argument_group("hardware")
    hw.add_argument("--threads", "-t", type=_positive_int, default=os.cpu_count() or 1, metavar="N",
                    help="CPU threads (default: all cores)")
    hw.add_argument("--gpu-layers", "--gpulayers", "-ngl", type=_layers, default=-1, metavar="N",
                    help="main-model layers on the GPU: -1 or 'all' (default), 0 for none; ignored without a GPU backend")
    hw.add_argument("--draft-gpu-layers", "--draftgpulayers", "-ngld", type=_layers, default=-1, metavar="N",
                    help="draft model fully on the GPU (-1, default) or fully on the CPU (0)")

    sampling = p.add_argument_group("sampling")
    sampling.add_argument("--temp", "--temperature", type=_non_negative_float, default=0.8, metavar="T",
                          help="temperature; 0 is greedy (default 0.8)")
    sampling.add_argument("--top-k", type=_non_negative_int, default=40, metavar="K", help="0 disables (default 40)")
    sampling.add_argument("--top-p", type=_probability, default=0.95, metavar="P", help="default 0.95")
    sampling.add_argument("--min-p", type=_probability, default=0.05, metavar="P", help="default 0.05")
    sampling.add_argument("--repeat-penalty", type=_non_negative_float, default=1.0, metavar="X", help="1 disables (default)")
    sampling.add_argument("--seed", "-s", type=int, default=None, metavar="S", help="random seed for reproducible sampling")
    sampling.add_argument("--max-tokens", "-n", "--n-predict", type=_positive_int, default=512, metavar="N",
                          help="most tokens to generate (default 512)")
    sampling.add_argument("--stop", action="append", default=[], metavar="TEXT", help="stop string (repeatable)")

    headless = p.add_argument_group("headless")
    headless.add_argument("--prompt", "-p", metavar="TEXT", help="generate one reply and exit; '-' reads stdin")
    headless.add_argument("--system", metavar="TEXT", help="system message")
    headless.add_argument("--raw", action="store_true", help="send the prompt as-is, without the chat template")
    headless.add_argument("--json", action="store_true", help="print one JSON object (text, tokens, stats) instead of streaming")
    return p


def parse_args(argv: Sequence[str] | None) -> argparse.Namespace:
    parser = build_parser()
    args = parser.parse_args(argv)
    if args.draft and args.no_draft:
        parser.error("--draft and --no-draft contradict each other")
    if args.draft_min > args.draft_max:
        parser.error(f"--draft-min ({args.draft_min}) is larger than --draft-max ({args.draft_max})")
    return args


def main(argv: Sequence[str] | None = None) -> int:
    args = parse_args(argv)
    from app.engine.errors import TandemError

    try:
        return run_headless(args) if args.prompt is not None else run_chat(args)
    except TandemError as exc:
        sys.stderr.write(f"tandem: error: {exc}\n")
        return EXIT_ERROR
    except KeyboardInterrupt:
        sys.stderr.write("tandem: interrupted\n")
        return EXIT_INTERRUPTED


def read_prompt(args: argparse.Namespace) -> str:
    from app.engine.errors import TandemError

    text = sys.stdin.read() if args.prompt == "-" else args.prompt
    if not text.strip():
        raise TandemError("the prompt is empty")
    return text


def resolve_model_paths(args: argparse.Namespace) -> tuple[Path, Path | None]:
    """(main, draft model): the demo pair unless --model is given; no draft model for --draft lookup."""
    from app.engine.demo import ensure_demo_pair

    lookup_only = args.draft == "lookup"
    if args.model:
        main = Path(args.model)
        draft = Path(args.draft) if args.draft and not lookup_only else None
    else:
        demo_main, demo_draft = ensure_demo_pair()
        main = demo_main
        draft = None if lookup_only else Path(args.draft) if args.draft else demo_draft
    return main, (None if args.no_draft else draft)


def build_engine(args: argparse.Namespace):  # -> SpeculativeEngine (imported lazily: fast --help)
    from app.engine.backend import Model
    from app.engine.gguf_info import read_gguf_info
    from app.engine.speculative import SpeculativeEngine

    main_path, draft_path = resolve_model_paths(args)
    read_gguf_info(main_path)  # both files checked before either is loaded: fail fast, fail clearly
    if draft_path is not None:
        read_gguf_info(draft_path)
    main = Model(main_path, n_gpu_layers=args.gpu_layers)
    draft = Model(draft_path, n_gpu_layers=-1 if args.draft_gpu_layers != 0 else 0) if draft_path else None
    # prompt lookup rides along with any draft model (the controller picks per round) and stands in when there is none
    return SpeculativeEngine(main, draft, n_ctx=args.ctx_size, n_threads=args.threads, lookup=not args.no_draft)


def generation_config(args: argparse.Namespace):
    from app.engine.sampling import SamplerSettings
    from app.engine.speculative import GenerationConfig

    sampler = SamplerSettings(
        temperature=args.temp,
        top_k=args.top_k,
        top_p=args.top_p,
        min_p=args.min_p,
        repeat_penalty=args.repeat_penalty,
        seed=args.seed,
    )
    return GenerationConfig(
        max_tokens=args.max_tokens,
        draft_max=args.draft_max,
        draft_min=args.draft_min,
        draft_p_min=args.draft_p_min,
        stop=tuple(args.stop),
        sampler=sampler,
        adaptive=not args.no_adaptive,
    )


def run_headless(args: argparse.Namespace) -> int:
    from app.engine.chat import ChatSession, tokenize_prompt
    from app.engine.events import Finished

    prompt_text = read_prompt(args)
    engine = build_engine(args)
    config = generation_config(args)
    if args.raw:
        events = engine.generate(tokenize_prompt(engine.main, prompt_text), config)
    else:
        events = ChatSession(engine, system=args.system).send(prompt_text, config)
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


def stream_reply(events, out) -> object:  # -> Finished
    from app.engine.events import Finished

    for event in events:
        if isinstance(event, Finished):
            out.write(event.tail + "\n")
            out.flush()
            return event
        if event.text:
            out.write(event.text)
            out.flush()
    raise AssertionError("the engine always ends with a Finished event")


def run_chat(args: argparse.Namespace) -> int:
    """A line-by-line chat in the terminal (the Textual app replaces this as the default view)."""
    from app.engine.chat import ChatSession
    from app.engine.errors import TandemError

    if not sys.stdin.isatty():
        raise TandemError("no --prompt given and standard input is not a terminal; use --prompt TEXT or --prompt -")
    engine = build_engine(args)
    config = generation_config(args)
    session = ChatSession(engine, system=args.system)
    draft = engine.draft_name or "none"
    print(f"tandem {__version__}: main {engine.main.name}, draft {draft}. /new starts over, /quit or Ctrl-D leaves.")
    while True:
        try:
            line = input("> ").strip()
        except EOFError:
            print()
            return 0
        if line in ("/quit", "/exit"):
            return 0
        if line == "/new":
            session = ChatSession(engine, system=args.system)
            continue
        if not line:
            continue
        try:
            finished = stream_reply(session.send(line, config), sys.stdout)
            sys.stderr.write(finished.stats.summary() + "\n")
        except KeyboardInterrupt:
            print("\n[cancelled]")
        except TandemError as exc:
            sys.stderr.write(f"tandem: {exc}\n")
