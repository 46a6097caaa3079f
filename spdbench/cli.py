"""The `spdbench` command: list | run | leaderboard | submit | verify.

Every user error (SpdbenchError) is printed as one line on stderr with exit code 2; a run with
failed cells exits 1 after finishing the others; success is 0.
"""
from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path
from typing import Any, Optional, Sequence

from .errors import InputError, SpdbenchError

EXIT_OK, EXIT_FAILED_CELLS, EXIT_USER_ERROR = 0, 1, 2


def _parse_value(text: str) -> Any:
    try:
        return json.loads(text)
    except ValueError:
        return text


def _params(pairs: Sequence[str]) -> dict[str, Any]:
    out = {}
    for pair in pairs:
        if "=" not in pair:
            raise InputError(f"--param expects KEY=VALUE, got {pair!r}")
        k, v = pair.split("=", 1)
        out[k.strip()] = _parse_value(v)
    return out


def cmd_list(args) -> int:
    from .attacks import attack_class, list_attacks
    from .suites import SUITES

    rows = []
    for name in list_attacks():
        cls = attack_class(name)
        rows.append(dict(name=name, universal=cls.universal, presets=sorted(cls.presets),
                         doc=(cls.__doc__ or "").strip().splitlines()[0] if cls.__doc__ else ""))
    if args.json:
        print(json.dumps({"attacks": rows, "suites": {k: v.description for k, v in SUITES.items()}}, indent=1))
        return EXIT_OK
    print("attacks:")
    for r in rows:
        kind = "universal" if r["universal"] else "per-image"
        presets = f" presets: {', '.join(r['presets'])}" if r["presets"] else ""
        print(f"  {r['name']:<22} {kind:<10} {r['doc']}{presets}")
    print("suites:")
    for name, suite in SUITES.items():
        print(f"  {name:<22} {suite.description}")
    return EXIT_OK


def cmd_run(args) -> int:
    from .harness import run
    from .leaderboard import ranking, ranking_markdown

    params = _params(args.param or [])
    if args.preset:
        params["preset"] = args.preset
    eps = args.eps.split(",") if args.eps else None
    prompts = args.prompts.split(",") if args.prompts else None
    purifiers = args.purifiers.split(",") if args.purifiers else None
    common = dict(norm=args.norm, prompts=prompts, target=args.target, data=args.data, manifest=args.manifest,
                  device=args.device, dtype=args.dtype, resume=args.resume, purifiers=purifiers,
                  compile_backend=args.compile_backend)
    attacks = args.attack.split(",")
    if args.backend != "serial" or len(attacks) > 1:
        from .backends import run_grid
        from .results import Status
        from .suites import get_suite

        out = Path(args.out) if args.out else Path("spdbench-runs") / f"{args.suite}-grid"
        suite = get_suite(args.suite)
        records = run_grid(attacks, suite, eps or list(suite.eps), out, backend=args.backend,
                           attack_params=params, ray_address=args.ray_address, **common)
        print(ranking_markdown(ranking(records)))
        failed = [r for r in records if r.status == Status.error]
        for rec in failed:
            print(f"FAILED {rec.cell_id}: {rec.error}", file=sys.stderr)
        return EXIT_FAILED_CELLS if failed else EXIT_OK
    out = Path(args.out) if args.out else Path("spdbench-runs") / f"{args.suite}-{args.attack}"
    result = run(args.attack, suite=args.suite, eps=eps, out=out, attack_params=params, progress=not args.quiet,
                 **common)
    print(ranking_markdown(ranking(result.records)))
    print(f"\n{len(result.computed)} cell(s) computed, {len(result.reused)} reused; records in {result.out}/records")
    print(f"clean edits: {result.clean_cache_hits} from the cache, {result.clean_cache_misses} computed; "
          f"{result.edits_run} img2img edits run")
    for rec in result.failed:
        print(f"FAILED {rec.cell_id}: {rec.error}", file=sys.stderr)
    return EXIT_FAILED_CELLS if result.failed else EXIT_OK


def cmd_leaderboard(args) -> int:
    from .leaderboard import build, ranking, ranking_markdown
    from .results import load_records

    dirs = [Path(d) for d in (args.records or ["spdbench-runs"])]
    folders = []
    for d in dirs:
        if not d.exists():
            raise InputError(f"records folder {d} does not exist")
        folders += sorted({p.parent.parent for p in d.rglob("records/*.json")})
    if not folders:
        raise InputError(f"no records found under {', '.join(map(str, dirs))}")
    records = load_records(folders)
    out = Path(args.out) if args.out else dirs[0] / "leaderboard"
    formats = args.format.split(",")
    written = build(records, out, formats)
    print(ranking_markdown(ranking(records)))
    for fmt, path in written.items():
        print(f"wrote {fmt}: {path}")
    return EXIT_OK


def cmd_verify(args) -> int:
    from .submission import verify

    report = verify(args.folder, sample=args.sample, tolerance=args.tolerance, rerun=not args.no_rerun,
                    device=args.device)
    for p in report.problems:
        print(f"REJECTED: {p}", file=sys.stderr)
    if report.ok:
        print(f"verified {len(report.records)} record(s); re-ran {len(report.rerun)}: {', '.join(report.rerun)}")
    return EXIT_OK if report.ok else EXIT_FAILED_CELLS


def cmd_submit(args) -> int:
    from .leaderboard import build_from_dirs
    from .submission import submit

    report, dest = submit(args.folder, leaderboard_dir=args.leaderboard, name=args.name, sample=args.sample,
                          tolerance=args.tolerance, device=args.device)
    for p in report.problems:
        print(f"REJECTED: {p}", file=sys.stderr)
    if dest is None:
        return EXIT_FAILED_CELLS
    entries = sorted(p for p in (Path(args.leaderboard) / "entries").iterdir() if p.is_dir())
    build_from_dirs(entries, args.leaderboard)
    print(f"accepted: {dest}; leaderboard rebuilt in {args.leaderboard}")
    return EXIT_OK


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog="spdbench", description=__doc__.splitlines()[0])
    sub = p.add_subparsers(dest="command", required=True)
    s = sub.add_parser("list", help="registered attacks and suites")
    s.add_argument("--json", action="store_true")
    s.set_defaults(fn=cmd_list)

    s = sub.add_parser("run", help="run an attack through a suite")
    s.add_argument("--suite", default="smoke")
    s.add_argument("--attack", required=True, help="attack name, or several separated by commas (a grid)")
    s.add_argument("--preset", help="a named parameter preset of the attack (e.g. madry)")
    s.add_argument("--param", action="append", metavar="KEY=VALUE", help="attack parameter (JSON value)")
    s.add_argument("--eps", help="comma-separated budgets, e.g. 4/255,16/255 (default: the suite's)")
    s.add_argument("--norm", choices=["linf", "l2"])
    s.add_argument("--prompts", help="comma-separated prompt keys P1..P4 (default: the suite's)")
    s.add_argument("--out", help="run folder (default spdbench-runs/SUITE-ATTACK)")
    s.add_argument("--target", help="override the suite's target: tiny, tiny-random, hub id or folder")
    s.add_argument("--data", help="image folder (or the root a --manifest refers to)")
    s.add_argument("--manifest", help="spdbench-manifest/1 JSON listing the protocol images")
    s.add_argument("--resume", action=argparse.BooleanOptionalAction, default=True,
                   help="reuse finished cells in --out (default on)")
    s.add_argument("--device", default=None)
    s.add_argument("--dtype", default=None, choices=["float32", "float16", "bfloat16"])
    s.add_argument("--purifiers", help="also score protection after purifiers, e.g. jpeg75,resize0.5,blur1,diffpure0.2")
    s.add_argument("--backend", default="serial", choices=["serial", "ray"],
                   help="ray: one task per (attack, eps) with one GPU each; --out must be shared by all nodes")
    s.add_argument("--ray-address", help="address of a running Ray cluster (default: start a local one)")
    s.add_argument("--compile", dest="compile_backend", nargs="?", const="inductor", default=None,
                   help="torch.compile the VAE and UNet (backend, default inductor); compile time is recorded apart")
    s.add_argument("--quiet", action="store_true")
    s.set_defaults(fn=cmd_run)

    s = sub.add_parser("leaderboard", help="aggregate records into Markdown / CSV / HTML")
    s.add_argument("--records", action="append", help="folder(s) holding run folders (default spdbench-runs)")
    s.add_argument("--out", help="output folder (default RECORDS/leaderboard)")
    s.add_argument("--format", default="md,csv,html")
    s.set_defaults(fn=cmd_leaderboard)

    for name, fn, helptext in (("verify", cmd_verify, "re-check a run folder as an untrusted submission"),
                               ("submit", cmd_submit, "verify a run folder and add it to the leaderboard")):
        s = sub.add_parser(name, help=helptext)
        s.add_argument("folder")
        s.add_argument("--sample", type=int, default=1, help="cells to re-run")
        s.add_argument("--tolerance", type=float, default=2e-3)
        s.add_argument("--device", default=None)
        if name == "verify":
            s.add_argument("--no-rerun", action="store_true")
        else:
            s.add_argument("--leaderboard", default="leaderboard")
            s.add_argument("--name")
        s.set_defaults(fn=fn)
    return p


def main(argv: Optional[Sequence[str]] = None) -> int:
    args = build_parser().parse_args(argv)
    try:
        return args.fn(args)
    except SpdbenchError as exc:
        print(f"spdbench {args.command}: error: {exc}", file=sys.stderr)
        return EXIT_USER_ERROR
    except KeyboardInterrupt:
        print("interrupted; finished cells are saved, rerun the same command to resume", file=sys.stderr)
        return 130


if __name__ == "__main__":
    sys.exit(main())
