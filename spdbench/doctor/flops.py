"""`python -m spdbench.doctor.flops NAME SIZE`: the FLOP-table entry of one model (scoring/work.py).

Why a command: the table the board weights model work with is committed, so a retrained or new
offline model needs its entry written once; this prints it, ready to paste into
`spdbench/scoring/pass_flops.json` (tests/test_work.py recounts the committed ones).
"""
from __future__ import annotations

import json
import sys
from typing import Optional

from spdbench.scoring.work import pass_flops
from spdbench.targets import load_target


def main(argv: Optional[list] = None) -> int:
    args = list(sys.argv[1:] if argv is None else argv)
    if len(args) != 2 or not args[1].isdigit():
        print("usage: python -m spdbench.doctor.flops TARGET SIZE   (e.g. tiny 128)", file=sys.stderr)
        return 2
    name, size = args[0], int(args[1])
    target = load_target(name)
    print(json.dumps({f"{target.fingerprint}@{size}": {"target": name, "flops": pass_flops(target, size)}}, indent=2))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
