"""Never slower on hybrid and recurrent main models (issue #27): plain vs the default mode vs lookup on tiny
random-weight LFM2 (hybrid: llama.cpp's rollback snapshots) and Mamba-2 (recurrent, no snapshots in llama.cpp:
checkpoint and replay) files, and Qwen3.5 (hybrid, with an MTP block: `--arch qwen35 --modes plain,mtp,mtp-k3,lookup`)
files, through bench/bench.py.

No real model of these families can be fetched here, so the pairs are made the way the tests make theirs
(tests/tiny_models.py), but wide enough that a decode costs milliseconds: the main model's layers are damped so
its next token depends mostly on the current one, and the draft is its first two layers (cheap, and it agrees
often). This measures what the controller does with the snapshot and checkpoint costs; it says nothing of the
acceptance or the speed on a real Qwen3.5 or Nemotron-H.

    python bench/recurrent_bench.py [--arch lfm2,mamba2] [--runs 3] [--max-tokens 128] [--dir DIR]
"""

from __future__ import annotations

import argparse
import subprocess
import sys
import tempfile
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

from tests import tiny_models  # noqa: E402

EOS = 1  # <s>: none of the damped models emits it (token 3 ended the Qwen3.5 one after 6 tokens), so replies run to --max-tokens


def make_pair(arch: str, root: Path) -> tuple[Path, Path]:
    if arch == "qwen35":  # with its MTP block, agreeing with the damped trunk most of the time
        weights = tiny_models.qwen35_weights(n_embd=512, n_layer=8, n_ff=1536, damp=0.1, mtp_noise=0.003)
        trunk = {k: v for k, v in weights.items() if not k.startswith("blk.8.")}
        main = tiny_models.qwen35_model(root / "qwen35-bench-main.gguf", weights, name="qwen35-bench-main", eos_id=EOS)
        draft = tiny_models.qwen35_model(root / "qwen35-bench-draft.gguf", tiny_models.first_layers(trunk, 2),
                                         name="qwen35-bench-draft", eos_id=EOS)  # fmt: skip
        return main, draft
    if arch == "lfm2":
        weights = tiny_models.damped(tiny_models.lfm2_weights(n_embd=512, n_ff=1536, layers="cacacaca"), 0.3)
        write = tiny_models.lfm2_model
    else:
        weights = tiny_models.damped(tiny_models.mamba2_weights(n_embd=512, n_layer=8), 0.3)
        write = tiny_models.mamba2_model
    main = write(root / f"{arch}-bench-main.gguf", weights, name=f"{arch}-bench-main", eos_id=EOS)
    draft = write(root / f"{arch}-bench-draft.gguf", tiny_models.first_layers(weights, 2), name=f"{arch}-bench-draft", eos_id=EOS)
    return main, draft


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--arch", default="lfm2,mamba2")
    parser.add_argument("--runs", type=int, default=3)
    parser.add_argument("--max-tokens", type=int, default=128)
    parser.add_argument("--modes", default="plain,adaptive,lookup,k4")
    parser.add_argument("--dir", type=Path, help="where the files go (default: a temporary folder)")
    parser.add_argument("--busy", type=int, default=0, help="busy-loop processes holding cores meanwhile (bench.py --busy)")
    args = parser.parse_args()
    with tempfile.TemporaryDirectory() as scratch:
        root = args.dir or Path(scratch)
        root.mkdir(parents=True, exist_ok=True)
        for arch in args.arch.split(","):
            main_path, draft_path = make_pair(arch, root)
            print(f"## {arch}", flush=True)
            subprocess.run([sys.executable, str(ROOT / "bench" / "bench.py"), "--model", str(main_path), "--draft", str(draft_path),
                            "--modes", args.modes, "--runs", str(args.runs), "--max-tokens", str(args.max_tokens),
                            "--no-anchor", "--no-short", "--busy", str(args.busy)], check=True)  # fmt: skip
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
