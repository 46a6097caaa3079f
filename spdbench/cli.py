"""The `spdbench` command: list | run | leaderboard | submit | verify | doctor.

Every user error (SpdbenchError) is printed as one line on stderr with exit code 2; a run with
failed cells exits 1 after finishing the others; success is 0.
"""
from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path
from typing import Any, Optional, Sequence

from spdbench.errors import InputError, SpdbenchError, UnknownNameError

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


def _summary(doc: str) -> str:
    """A docstring's first sentence, whole: the first paragraph's lines joined, cut after the first
    '. ' (a description that wraps onto a second line is not cut mid-sentence)."""
    para = " ".join(line.strip() for line in doc.strip().split("\n\n")[0].splitlines())
    end = para.find(". ")
    return para if end < 0 else para[:end + 1]


def cmd_list(args) -> int:
    from spdbench.attacks import attack_class, list_attacks
    from spdbench.attacks.base import attack_source
    from spdbench.suites import SUITES

    rows = []
    for name in list_attacks():
        cls = attack_class(name)
        doc = (cls.__doc__ or "").strip()
        source = attack_source(cls)
        rows.append(dict(name=name, universal=cls.universal, presets=sorted(cls.presets),
                         doc=_summary(doc) if doc else "(no description: give the class a docstring)",
                         plugin=None if source["distribution"] == "spdbench" else
                         f"{source['distribution']} {source['version']}"))
    from spdbench.purifiers import describe

    purifiers = describe()
    if args.json:
        print(json.dumps({"attacks": rows, "suites": {k: v.description for k, v in SUITES.items()},
                          "purifiers": purifiers}, indent=1))
        return EXIT_OK
    print("attacks:")
    for r in rows:
        kind = "universal" if r["universal"] else "per-image"
        presets = f" presets: {', '.join(r['presets'])}" if r["presets"] else ""
        plugin = f" [plugin: {r['plugin']}]" if r["plugin"] else ""
        print(f"  {r['name']:<22} {kind:<10} {r['doc']}{presets}{plugin}")
    print("suites:")
    for name, suite in SUITES.items():
        print(f"  {name:<22} {suite.description}")
    print("purifiers:")
    for d in purifiers:
        print(f"  {d['name']:<22} {d['description']}")
    return EXIT_OK


def _eps_arg(text: Optional[str]) -> Optional[list[str]]:
    """--eps as a list; an empty value or item is an error, never 'the suite's grid'."""
    if text is None:
        return None
    items = [t.strip() for t in text.split(",")]
    if not all(items):
        raise InputError(f"--eps {text!r} holds an empty budget; expected comma-separated budgets such as "
                         "4/255,16/255 (leave --eps out for the suite's grid)")
    return items


def cmd_run(args) -> int:
    from spdbench.harness.pipeline import run
    from spdbench.report.board import ranking
    from spdbench.report.page import summary_markdown
    from spdbench.store.runfolder import RunLock, prepare_out
    from spdbench.suites import get_suite
    from spdbench.targets import parse_device

    params = _params(args.param or [])
    if args.preset:
        params["preset"] = args.preset
    eps = _eps_arg(args.eps)
    parse_device(args.device)  # before any folder is created or model built
    get_suite(args.suite)
    prompts = args.prompts.split(",") if args.prompts else None
    purifiers = None if not args.purifiers else [] if args.purifiers == "none" else args.purifiers.split(",")
    common = dict(norm=args.norm, prompts=prompts, target=args.target, data=args.data, manifest=args.manifest,
                  device=args.device, dtype=args.dtype, resume=args.resume, purifiers=purifiers,
                  compile_backend=args.compile_backend, isolation=args.isolation,
                  attack_timeout_s=args.attack_timeout, masks=args.masks, cache_dir=args.cache_dir,
                  protections_from=args.protections_from)
    attacks = args.attack.split(",")
    if args.backend != "serial" or len(attacks) > 1:
        from spdbench.harness.grid import run_grid
        from spdbench.store.records import Status

        out = prepare_out(Path(args.out) if args.out else Path("spdbench-runs") / f"{args.suite}-grid")
        suite = get_suite(args.suite)
        with RunLock(out):
            records = run_grid(attacks, suite, eps or list(suite.eps), out, backend=args.backend,
                               attack_params=params, ray_address=args.ray_address, **common)
        print(summary_markdown(ranking(records)))
        failed = [r for r in records if r.status == Status.error]
        for rec in failed:
            print(f"FAILED {rec.cell_id}: {rec.error}", file=sys.stderr)
        return EXIT_FAILED_CELLS if failed else EXIT_OK
    out = prepare_out(Path(args.out) if args.out else Path("spdbench-runs") / f"{args.suite}-{args.attack}")
    with RunLock(out):
        result = run(args.attack, suite=args.suite, eps=eps, out=out, attack_params=params,
                     progress=not args.quiet, **common)
    print(summary_markdown(ranking(result.records)))
    print(f"\n{len(result.computed)} cell(s) computed, {len(result.reused)} reused; records in {result.out}/records")
    earlier = result.clean_cache_hits - result.clean_cache_hits_own
    print(f"clean edits: {result.clean_cache_misses} computed, {result.clean_cache_hits_own} reused within this run, "
          f"{earlier} from earlier runs' cache; "
          f"{result.edits_run} {get_suite(args.suite).task} edits run (cache: {result.clean_cache_dir})")
    for rec in result.failed:
        print(f"FAILED {rec.cell_id}: {rec.error}", file=sys.stderr)
    return EXIT_FAILED_CELLS if result.failed else EXIT_OK


def cmd_leaderboard(args) -> int:
    from spdbench.report.board import build, load_checked_by_folder, ranking
    from spdbench.report.page import summary_markdown

    dirs = [Path(d) for d in (args.records or ["spdbench-runs"])]
    folders = []
    for d in dirs:
        if not d.is_dir():
            raise InputError(f"--records {str(d)!r} is not an existing folder (expected a folder of run folders)")
        folders += sorted({p.parent.parent for p in d.rglob("records/*.json")
                           if not any(part.startswith(".") for part in p.relative_to(d).parts)})
    if not folders:
        raise InputError(f"--records: no records found under {', '.join(map(str, dirs))}")
    by_folder, skipped = load_checked_by_folder(folders)
    records = [r for recs in by_folder.values() for r in recs]
    for name, reason in skipped:
        print(f"LEFT OUT {name}: {reason}", file=sys.stderr)
    out = Path(args.out) if args.out else dirs[0] / "leaderboard"
    written = build(records, out, args.format.split(","), skipped=skipped, by_folder=by_folder)
    print(summary_markdown(ranking(records)))
    for fmt, path in written.items():
        print(f"wrote {fmt}: {path}")
    return EXIT_OK


def cmd_compare(args) -> int:
    from spdbench.scoring import compare
    from spdbench.report.board import load_checked

    sides = []
    for label, folder in (("A", args.a), ("B", args.b)):
        if not Path(folder).is_dir():
            raise InputError(f"{label} {folder!r} is not an existing folder (expected a run folder or an entry)")
        records, skipped = load_checked([folder])
        if skipped:
            raise InputError(f"{label} {folder!r} cannot be compared: {skipped[0][1]}")
        sides.append(records)
    rows = compare.paired(sides[0], sides[1], metric=args.metric, split=args.split, seed=args.seed,
                          region=args.region)
    print(compare.markdown(Path(args.a).name, Path(args.b).name, rows))
    return EXIT_OK


def cmd_show(args) -> int:
    from spdbench.report.run_page import write_report

    path = write_report(args.folder, args.out)
    print(f"wrote {path}")
    return EXIT_OK


def _print_report(report) -> None:
    for line in report.checks:
        print(f"  ok  {line}")
    for p in report.problems:
        print(f"REJECTED: {p}", file=sys.stderr)
    print(f"seed {report.seed} (repeat this verification with --seed {report.seed})")


def cmd_verify(args) -> int:
    from spdbench.verify.submit import verify

    report = verify(args.folder, sample=args.sample, tolerance=args.tolerance, rerun=not args.no_rerun,
                    attack_rerun=not args.no_attack_rerun, seed=args.seed, device=args.device, data=args.data,
                    manifest=args.manifest)
    _print_report(report)
    if report.ok:
        what = "re-measured" if report.remeasured else "checked (NOT re-measured: --no-rerun)"
        print(f"verified: {len(report.records)} record(s) {what}; {report.compared} per-image values compared")
    return EXIT_OK if report.ok else EXIT_FAILED_CELLS


def cmd_submit(args) -> int:
    from spdbench.report.board import build_from_dirs
    from spdbench.verify.submit import submit

    report, dest = submit(args.folder, leaderboard_dir=args.leaderboard, name=args.name, replace=args.replace,
                          sample=args.sample, tolerance=args.tolerance, seed=args.seed, device=args.device,
                          data=args.data, manifest=args.manifest)
    _print_report(report)
    if dest is None:
        print("refused: nothing in the leaderboard changed", file=sys.stderr)
        return EXIT_FAILED_CELLS
    entries = sorted(p for p in (Path(args.leaderboard) / "entries").iterdir() if p.is_dir())
    _, skipped = build_from_dirs(entries, args.leaderboard)
    for name, reason in skipped:
        print(f"LEFT OUT {name}: {reason}", file=sys.stderr)
    print(f"accepted: {dest}; leaderboard rebuilt in {args.leaderboard}")
    return EXIT_OK


def cmd_doctor(args) -> int:
    from spdbench.doctor.env import command

    return command(bench=args.bench, quick=args.quick, device=args.device, dtypes=args.dtypes, attacks=args.attacks,
                   out=args.out, steps=args.steps, compile_backend=args.compile_backend, time_limit=args.time_limit,
                   cost=args.cost, build_all=args.build_all, json_out=args.json)


def _positive(text: str) -> int:
    """A whole number >= 1 (--sample, --steps)."""
    try:
        value = int(text)
    except ValueError:
        value = 0
    if value < 1:
        raise argparse.ArgumentTypeError(f"expected a whole number >= 1, got {text!r}")
    return value


def _tolerance(text: str) -> float:
    """--tolerance: a number in (0, 1) (nan, inf and 0 would make every value pass or none)."""
    try:
        value = float(text)
    except ValueError:
        value = float("nan")
    if not 0 < value < 1:
        raise argparse.ArgumentTypeError(f"expected a number in (0, 1), got {text!r}")
    return value


def _formats(text: str) -> str:
    """--format: a non-empty comma list of md, csv, html (a format nobody writes is an error, not exit 0)."""
    known = ("md", "csv", "html")
    items = [t.strip() for t in text.split(",")]
    bad = [t for t in items if t not in known]
    if bad or not items:
        raise argparse.ArgumentTypeError(f"unknown format(s) {', '.join(map(repr, bad))} in {text!r}; expected a "
                                         f"comma-separated list of {', '.join(known)}")
    return ",".join(items)


def _count(text: str) -> int:
    """A whole number >= 0 (argparse names the option in its one-line error)."""
    try:
        value = int(text)
    except ValueError:
        value = -1
    if value < 0:
        raise argparse.ArgumentTypeError(f"expected a whole number >= 0, got {text!r}")
    return value


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog="spdbench", description=__doc__.splitlines()[0])
    sub = p.add_subparsers(dest="command", required=True)
    s = sub.add_parser("list", help="registered attacks, suites and purifiers")
    s.add_argument("--json", action="store_true", help="print the registry as JSON instead of a table")
    s.set_defaults(fn=cmd_list)

    s = sub.add_parser("run", help="run an attack through a suite")
    s.add_argument("--suite", default="smoke",
                   help="the rule book: target, photos, budgets, prompts, edit settings (default smoke; "
                        "`spdbench list` shows them)")
    s.add_argument("--attack", required=True, help="attack name, or several separated by commas (a grid)")
    s.add_argument("--preset", help="a named parameter preset of the attack (e.g. madry)")
    s.add_argument("--param", action="append", metavar="KEY=VALUE", help="attack parameter (JSON value)")
    s.add_argument("--eps", help="comma-separated budgets, e.g. 4/255,16/255 (default: the suite's)")
    s.add_argument("--norm", choices=["linf", "l2"], help="budget norm (default: the suite's, or the preset's)")
    s.add_argument("--prompts", help="comma-separated prompt keys P1..P4 (default: the suite's)")
    s.add_argument("--out", help="run folder (default spdbench-runs/SUITE-ATTACK)")
    s.add_argument("--target", help="override the suite's target: tiny, tiny-random, hub id or folder")
    s.add_argument("--data", help="image folder (or the root a --manifest refers to)")
    s.add_argument("--manifest", help="spdbench-manifest/1 JSON listing the protocol images")
    s.add_argument("--masks", metavar="DIR", help="inpainting suites: your masks, one NAME.png per photo "
                   "(white = repaint, black = keep), instead of the suite's mask set")
    s.add_argument("--resume", action=argparse.BooleanOptionalAction, default=True,
                   help="reuse finished cells in --out (default on)")
    s.add_argument("--device", default=None, help="cpu, cuda, cuda:N or mps (default cpu)")
    s.add_argument("--dtype", default=None, choices=["float32", "float16", "bfloat16"],
                   help="model dtype (default float32); images and budgets stay float32")
    s.add_argument("--purifiers", help="score protection after these purifiers instead of the suite's, e.g. "
                   "jpeg75,resize0.5,blur1,diffpure0.2 (`spdbench list` shows all), or none")
    s.add_argument("--backend", default="serial", choices=["serial", "ray"],
                   help="ray: one task per (attack, eps) with one GPU each; --out must be shared by all nodes")
    s.add_argument("--ray-address", help="address of a running Ray cluster (default: start a local one)")
    s.add_argument("--compile", dest="compile_backend", nargs="?", const="inductor", default=None,
                   help="torch.compile the VAE and UNet (backend, default inductor); compile time is recorded apart")
    s.add_argument("--isolation", default="process", choices=["process", "none"],
                   help="process (default): the attack runs in its own worker process and sees only what it may; "
                        "none: in this process, for debugging only (recorded; verify and submit refuse it)")
    s.add_argument("--attack-timeout", type=float, default=None, metavar="SECONDS",
                   help="wall-clock limit per cell group's attack (default: the suite's attack_timeout_s)")
    s.add_argument("--protections-from", metavar="RUN", default=None,
                   help="reuse the protections an earlier run folder made with the same attack, settings, model, "
                        "seeds and photos instead of re-running the attack (e.g. smoke-transfer after smoke)")
    s.add_argument("--cache-dir", metavar="DIR", default=None,
                   help="clean-edit cache folder (default: one per model under $SPDBENCH_CACHE_DIR, else "
                        "~/.cache/spdbench, shared by every run folder)")
    s.add_argument("--quiet", action="store_true", help="no progress bar and no summary table")
    s.set_defaults(fn=cmd_run)

    s = sub.add_parser("leaderboard", help="aggregate records into Markdown / CSV / HTML")
    s.add_argument("--records", action="append", help="folder(s) holding run folders (default spdbench-runs)")
    s.add_argument("--out", help="output folder (default RECORDS/leaderboard)")
    s.add_argument("--format", default="md,csv,html", type=_formats,
                   help="comma-separated formats among md (README.md), csv (leaderboard.csv, table1.csv) and "
                        "html (index.html); default md,csv,html")
    s.set_defaults(fn=cmd_leaderboard)

    s = sub.add_parser("show", help="one run as a self-contained HTML page: example images, loss curves, "
                                    "per-image numbers")
    s.add_argument("folder", help="a run folder (spdbench run --out) or a leaderboard entry")
    s.add_argument("--out", help="the page's path (default FOLDER/report.html)")
    s.set_defaults(fn=cmd_show)

    s = sub.add_parser("compare", help="two methods on the same photos: paired bootstrap of their difference")
    s.add_argument("a", help="run folder or leaderboard entry of method a")
    s.add_argument("b", help="run folder or leaderboard entry of method b (same suite)")
    s.add_argument("--metric", default="ssim", choices=["ssim", "psnr", "vifp", "fsim"],
                   help="protection metric (default ssim)")
    s.add_argument("--split", default="test", choices=["train", "test"], help="split compared (default test)")
    s.add_argument("--region", default="whole", choices=["whole", "repainted"],
                   help="where the metric is measured: the whole edit (default) or, on an inpainting suite, "
                        "only the repainted region")
    s.add_argument("--seed", type=_count, default=0, help="bootstrap seed (default 0)")
    s.set_defaults(fn=cmd_compare)

    for name, fn, helptext in (("verify", cmd_verify, "re-check a run folder as an untrusted submission"),
                               ("submit", cmd_submit, "verify a run folder and add it to the leaderboard")):
        s = sub.add_parser(name, help=helptext)
        s.add_argument("folder", help="a run folder (spdbench run --out) or an entry folder")
        s.add_argument("--sample", type=_positive, default=2,
                       help="images re-edited from every cell (default 2; a random draw, see --seed)")
        s.add_argument("--tolerance", type=_tolerance, default=2e-3,
                       help="largest |claimed - re-measured| per image (x100 for PSNR in dB; default 2e-3)")
        s.add_argument("--seed", type=_count, default=None,
                       help="seed of the random draw (default: unpredictable; the report prints it)")
        s.add_argument("--device", default=None, help="default: the device type the entry was measured on")
        s.add_argument("--data", help="image folder of the suite (suites whose photos are not bundled)")
        s.add_argument("--manifest", help="spdbench-manifest/1 JSON listing the suite's images (with --data)")
        if name == "verify":
            s.add_argument("--no-rerun", action="store_true",
                           help="check files, claims and perturbations only; re-measure nothing (reported)")
            s.add_argument("--no-attack-rerun", action="store_true",
                           help="re-measure the sample but do not re-run the attack (reported)")
        else:
            s.add_argument("--leaderboard", default="leaderboard",
                           help="the leaderboard folder entries are added to (default leaderboard)")
            s.add_argument("--name", help="entry name (default: the folder's name)")
            s.add_argument("--replace", action="store_true",
                           help="replace an existing entry of that name (kept until the new one is in place)")
        s.set_defaults(fn=fn)

    s = sub.add_parser("doctor", help="check this machine; --bench: every attack x dtype on the SD1.5 architecture")
    s.add_argument("--json", action="store_true", help="the environment checks as JSON")
    s.add_argument("--build-all", action="store_true", help="also build the SD1.5 architecture (slow on CPU)")
    s.add_argument("--bench", action="store_true", help="benchmark and check every attack (exit 1 on any failure)")
    s.add_argument("--quick", action="store_true", help="with --bench: tiny-random at 64 px on CPU (CI, minutes)")
    s.add_argument("--device", default=None, help="with --bench: default cuda (full) or cpu (--quick)")
    s.add_argument("--dtypes", default=None, help="with --bench: comma list (default float32,float16,bfloat16)")
    s.add_argument("--attacks", default=None, help="with --bench: comma list (default every registered attack)")
    s.add_argument("--steps", type=_positive, default=None, help="with --bench: timed iterations per attack")
    s.add_argument("--compile-backend", default=None,
                   help="with --bench: torch.compile backend for the encoder attack (default inductor; quick: eager)")
    s.add_argument("--time-limit", type=float, default=None, metavar="SECONDS",
                   help="with --bench: stop starting new cells after this long (what is left is reported, exit 1)")
    s.add_argument("--out", help="with --bench: report folder (default spdbench-doctor/bench-MODE-DEVICE-TIME)")
    s.add_argument("--cost", metavar="BENCH_JSON", help="print the sd15-spd protocol's hours per attack from a bench JSON")
    s.set_defaults(fn=cmd_doctor)
    return p


def main(argv: Optional[Sequence[str]] = None) -> int:
    args = build_parser().parse_args(argv)
    try:
        return args.fn(args)
    except SpdbenchError as exc:
        hint = ""
        if isinstance(exc, UnknownNameError) and str(exc).startswith("unknown attack"):
            hint = (" (an attack registered with @spdbench.register exists only in the Python process that "
                    "imported it; for the CLI, install it as a package with an entry point in the "
                    "'spdbench.attacks' group: docs/writing-an-attack.md)")
        print(f"spdbench {args.command}: error: {exc}{hint}", file=sys.stderr)
        return EXIT_USER_ERROR
    except KeyboardInterrupt:  # on a line of its own, not glued onto a progress bar's
        print("\ninterrupted; finished cells are saved, rerun the same command to resume", file=sys.stderr)
        return 130


if __name__ == "__main__":
    sys.exit(main())
