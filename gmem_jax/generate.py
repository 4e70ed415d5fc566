"""Command line generation with a frozen backbone.

    python -m gmem_jax.generate --model PATH_OR_HUB_ID_OR_GGUF --prompt "..." --max-new-tokens 32 \
        [--temperature 0.8 --top-p 0.95 --seed 0 --dtype bfloat16] [--json]

Prints the continuation (or, with --json, one JSON object: token_ids, text, ...). Problems the user can fix are
reported as one line on stderr with exit status 2.
"""
from __future__ import annotations

import argparse
import json
import sys
from typing import Optional, Sequence

from gmem_jax.errors import GmemError


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog="python -m gmem_jax.generate", description=__doc__.split("\n\n")[0])
    p.add_argument("--model", required=True, help="Hugging Face folder, hub id (org/name) or llama.cpp .gguf file")
    p.add_argument("--prompt", required=True, help="text to continue (no chat template is applied)")
    p.add_argument("--max-new-tokens", type=int, default=32)
    p.add_argument("--temperature", type=float, default=0.0, help="0 = greedy")
    p.add_argument("--top-p", type=float, default=1.0, help="nucleus sampling mass (with --temperature > 0)")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--dtype", default="float32", choices=["float32", "bfloat16"],
                   help="compute and weight dtype")
    p.add_argument("--json", action="store_true", help="print one JSON object instead of plain text")
    return p


def load_model(args: argparse.Namespace):
    """(cfg, params, tokenizer) for --model."""
    from gmem_jax.backbones.loading import load_backbone
    from gmem_jax.backbones.tokenizer import load_tokenizer

    cfg, params = load_backbone(args.model, dtype=args.dtype)
    return cfg, params, load_tokenizer(args.model)


def run(args: argparse.Namespace) -> dict:
    """Load, encode, generate, decode. Returns the JSON-able result."""
    import jax
    import numpy as np

    from gmem_jax.backbones.tokenizer import encode_left_padded
    from gmem_jax.generation import generate

    cfg, params, tokenizer = load_model(args)
    tokens, mask = encode_left_padded(tokenizer, [args.prompt])
    result = generate(params, cfg, tokens, mask, max_new_tokens=args.max_new_tokens,
                      rng=jax.random.key(args.seed), temperature=args.temperature, top_p=args.top_p)
    new = np.asarray(result.tokens[0, : int(result.lengths[0])]).tolist()
    return {
        "model": str(args.model),
        "prompt": args.prompt,
        "prompt_token_ids": tokens[0].tolist(),
        "token_ids": new,
        "text": tokenizer.decode(new, skip_special_tokens=True),
        "stopped": bool(result.stopped[0]),  # ended with an EOS id (else: hit --max-new-tokens)
    }


def main(argv: Optional[Sequence[str]] = None) -> int:
    args = build_parser().parse_args(argv)
    try:
        out = run(args)
    except GmemError as e:
        print(f"error: {e}", file=sys.stderr)
        return 2
    print(json.dumps(out) if args.json else out["text"])
    return 0


if __name__ == "__main__":
    sys.exit(main())
