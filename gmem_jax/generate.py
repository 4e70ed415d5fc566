"""Command line generation with a frozen backbone.

    python -m gmem_jax.generate --model PATH_OR_HUB_ID_OR_GGUF --prompt "..." --max-new-tokens 32 \
        [--temperature 0.8 --top-p 0.95 --seed 0 --dtype bfloat16] [--json] \
        [--memory-checkpoint RUN/memory_export --context "text written into memory first" --segment-len 128]

With --memory-checkpoint, the trained memory is attached: --context is split into segments of --segment-len
tokens and written into the memory, then every prompt and generated token reads it.

Prints the continuation (or, with --json, one JSON object: token_ids, text, ...). Problems the user can fix are
reported as one line on stderr with exit status 2.
"""
from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path
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
    p.add_argument("--memory-checkpoint", default=None,
                   help="a trained memory (the memory_export folder of a training run) to attach")
    p.add_argument("--context", default=None, help="text written into the memory before generating")
    p.add_argument("--segment-len", type=int, default=128, help="tokens per memory segment for --context")
    return p


def memory_for_generation(args: argparse.Namespace, cfg, params, tokenizer, prompt_tokens, prompt_mask):
    """(hooks, hook_state) that make generation of prompt_tokens/prompt_mask [1, P] read a memory holding
    --context, or (None, None)."""
    if args.memory_checkpoint is None:
        if args.context is not None:
            raise GmemError("--context needs --memory-checkpoint (a trained memory to write it into)")
        return None, None
    import jax
    import numpy as np

    from gmem_jax.training.checkpoint import load_exported_memory, trained_with_memory
    from gmem_jax.memory.model import initial_state, write_context
    from gmem_jax.training.evaluation import decode_hook_state, generation_hooks

    mem_params, mcfg = load_exported_memory(Path(args.memory_checkpoint), cfg)
    if args.context and not trained_with_memory(args.memory_checkpoint):
        raise GmemError(f"--memory-checkpoint {args.memory_checkpoint} is a no-memory twin (trained with "
                        "train.use_memory=False, nothing ever written): drop --context, or attach a memory run")
    if args.context:
        ids = tokenizer(args.context, add_special_tokens=False)["input_ids"]
        T = args.segment_len
        n = max(1, -(-len(ids) // T))
        tokens, mask = np.zeros((1, n, T), np.int32), np.zeros((1, n, T), bool)
        for k in range(n):
            chunk = ids[k * T:(k + 1) * T]
            tokens[0, k, :len(chunk)], mask[0, k, :len(chunk)] = chunk, True
        state = jax.jit(write_context, static_argnums=(4, 5))(mem_params, params, tokens, mask, cfg, mcfg)
    else:
        state = initial_state(mem_params, cfg, mcfg, 1)
    return generation_hooks(cfg, mcfg), decode_hook_state(mem_params, state, params, cfg, mcfg, prompt_tokens,
                                                          prompt_mask)


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
    hooks, hook_state = memory_for_generation(args, cfg, params, tokenizer, tokens, mask)
    result = generate(params, cfg, tokens, mask, max_new_tokens=args.max_new_tokens,
                      rng=jax.random.key(args.seed), temperature=args.temperature, top_p=args.top_p,
                      hooks=hooks, hook_state=hook_state)
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
