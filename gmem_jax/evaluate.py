"""`python -m gmem_jax.evaluate SUBCOMMAND ...`

  hotpotqa PRED.json GOLD.json   the official HotpotQA metrics of a prediction file (prints JSON)
"""
from __future__ import annotations

import sys
from typing import Sequence

SUBCOMMANDS = ("hotpotqa",)


def main(argv: Sequence[str] | None = None) -> int:
    argv = list(sys.argv[1:] if argv is None else argv)
    if not argv or argv[0] not in SUBCOMMANDS:
        print(f"usage: python -m gmem_jax.evaluate {{{','.join(SUBCOMMANDS)}}} ...\n{__doc__.strip()}", file=sys.stderr)
        return 2
    from gmem_jax.tasks.hotpot_metrics import main as hotpotqa_main

    return hotpotqa_main(argv[1:])


if __name__ == "__main__":
    sys.exit(main())
