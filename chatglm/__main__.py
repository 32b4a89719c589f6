"""Command line: ``python -m chatglm "你好"`` streams an answer without Docker or Cog."""
from __future__ import annotations

import argparse
import os
import sys

from .serving.inputs import InputError, build_request
from .weights.checkpoint import CheckpointError
from .serving.pipeline import GenerationStats, Pipeline


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(prog="python -m chatglm", description="Chat with a ChatGLM2/3 model directory.")
    ap.add_argument("prompt", nargs="?", default="", help="user message or raw prompt")
    ap.add_argument("--weights", default=os.environ.get("CHATGLM_WEIGHTS") or "weights",
                    help="model directory (default: $CHATGLM_WEIGHTS or weights/)")
    ap.add_argument("--messages", default="", help="JSON list of {role, content}; replaces prompt")
    ap.add_argument("--system-prompt", default="")
    ap.add_argument("--tools", default="", help="JSON list of tool definitions (ChatGLM3)")
    ap.add_argument("--max-tokens", type=int, default=2048)
    ap.add_argument("--temperature", type=float, default=0.8)
    ap.add_argument("--top-p", type=float, default=0.8)
    ap.add_argument("--top-k", type=int, default=50)
    ap.add_argument("--repetition-penalty", type=float, default=1.0)
    ap.add_argument("--stop-sequences", default="")
    ap.add_argument("--seed", type=int, default=None)
    ap.add_argument("--device", default="auto", help="auto, cpu or cuda")
    ap.add_argument("--family", default=None, help="override detection: chatglm2, chatglm3, chatglm3-32k")
    args = ap.parse_args(argv)

    try:
        pipe = Pipeline.from_pretrained(args.weights, device=args.device, quantize=4, family=args.family)
    except (CheckpointError, FileNotFoundError, ValueError) as exc:
        # A model directory the user got wrong: its message names the file and the key.
        print(f"error: {exc}", file=sys.stderr)
        return 2
    try:
        request = build_request(pipe, args.prompt, args.system_prompt, args.messages, args.tools, args.stop_sequences)
        stats = GenerationStats()
        for chunk in pipe.stream(request.messages, max_new_tokens=args.max_tokens, temperature=args.temperature,
                                 top_p=args.top_p, top_k=args.top_k, repetition_penalty=args.repetition_penalty,
                                 seed=args.seed, stop_sequences=request.stop_sequences, stats=stats):
            sys.stdout.write(chunk)
            sys.stdout.flush()
    except (InputError, ValueError) as exc:
        print(f"error: {exc}", file=sys.stderr)
        return 2
    sys.stdout.write("\n")
    print(f"[seed {stats.seed}, {stats.input_tokens} prompt tokens, {stats.output_tokens} new tokens, "
          f"{stats.tokens_per_second:.1f} tokens/s, stop: {stats.stop_reason}]", file=sys.stderr)
    return 0


if __name__ == "__main__":
    sys.exit(main())
