"""The `spdbench` command line: one subcommand per job (`spdbench --help` lists them all).

Every user error (SpdbenchError) is printed as one line on stderr with exit code 2; a run with
failed cells exits 1 after finishing the others; success is 0.
"""
from __future__ import annotations

import argparse
import importlib.metadata
import json
import secrets
import sys
from pathlib import Path
from typing import Any, Optional, Sequence

from spdbench.attacks.base import ATTACKS, AttackLocation, attack_source, locate_attack
from spdbench.errors import InputError, SpdbenchError, UnknownNameError
from spdbench.harness import sandbox
from spdbench.harness.isolation import plugin_description
from spdbench.harness.progress import Stages
from spdbench.purifiers import describe
from spdbench.purifiers.base import PURIFIERS
from spdbench.scoring.metrics import METRICS, get_metric
from spdbench.suites import SUITES
from spdbench.targets import TARGETS

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


def _attack_rows() -> tuple[list[dict], list[str]]:
    """Every attack as `list` shows it, with no plugin code run in this process: a built-in (or a
    class this process registered) from its class; a plugin from its entry-point metadata and what a
    worker (sandboxed where this machine can) describes. A plugin its worker cannot describe is
    listed under the plugins that failed to load."""
    rows, broken = [], []
    isolation = "sandbox" if sandbox.supported() is None else "process"
    for name in sorted(ATTACKS.known_names()):
        where = locate_attack(name)
        if where.origin != "plugin":
            rows.append(_class_row(name, where.cls))
            continue
        try:
            info = plugin_description(where, None, {}, isolation=isolation)
        except SpdbenchError as exc:
            broken.append(f"attack plugin {name!r} ({where.source.get('distribution')}): {exc}")
            continue
        rows.append(dict(name=name, kind=info["kind"], universal=info["kind"] == "universal",
                         presets=sorted(info["presets"]), doc=_plugin_summary(where, info["summary"]),
                         plugin=f"{where.source.get('distribution')} {where.source.get('version')}"))
    return rows, broken


def _class_row(name: str, cls) -> dict:
    doc = (cls.__doc__ or "").strip()
    source = attack_source(cls)
    return dict(name=name, kind=cls.kind.value, universal=cls.universal, presets=sorted(cls.presets),
                doc=_summary(doc) if doc else "(no description: give the class a docstring)",
                plugin=None if source["distribution"] == "spdbench" else f"{source['distribution']} {source['version']}")


def _plugin_summary(where: AttackLocation, doc: str) -> str:
    """A plugin's description: its class's docstring as its worker sent it (first sentence,
    printable characters only: it is the plugin's text), else its distribution's summary."""
    if not doc.strip():
        try:
            doc = importlib.metadata.metadata(where.source.get("distribution", "")).get("Summary") or ""
        except importlib.metadata.PackageNotFoundError:
            doc = ""
    doc = "".join(ch if ch.isprintable() or ch == "\n" else " " for ch in doc)
    return _summary(doc) if doc.strip() else "(no description: give the class a docstring)"


def _list_suites(as_json: bool) -> int:
    """`list --suites`: each suite's protocol card and submission spec (report/site/protocol.py)."""
    from spdbench.report.site import protocol  # deferred: a command loads only its own stack

    if as_json:
        print(json.dumps({name: dict(description=suite.description, card=dict(protocol.protocol_card(suite)),
                                     submission_spec=protocol.submission_spec(suite))
                          for name, suite in SUITES.items()}, indent=1, ensure_ascii=False))
        return EXIT_OK
    print("\n\n".join(protocol.card_text(suite) for suite in SUITES.values()))
    return EXIT_OK


def cmd_list(args) -> int:
    if getattr(args, "suites", False):
        return _list_suites(args.json)
    rows, broken_attacks = _attack_rows()
    purifiers = describe()
    metric_rows, targets, broken = _registry_rows()
    broken = broken_attacks + broken
    if args.json:
        print(json.dumps({"attacks": rows, "suites": {k: v.description for k, v in SUITES.items()},
                          "purifiers": purifiers, "metrics": metric_rows, "targets": targets,
                          "broken_plugins": broken}, indent=1))
        return EXIT_OK
    print("attacks:")
    for r in rows:
        kind = r["kind"]
        presets = f" presets: {', '.join(r['presets'])}" if r["presets"] else ""
        plugin = f" [plugin: {r['plugin']}]" if r["plugin"] else ""
        print(f"  {r['name']:<22} {kind:<10} {r['doc']}{presets}{plugin}")
    print("suites:")
    for name, suite in SUITES.items():
        print(f"  {name:<22} {suite.description}")
    print("purifiers:")
    for d in purifiers:
        print(f"  {d['name']:<22} {d['description']}")
    print("metrics:")
    for m in metric_rows:
        print(f"  {m['name']:<22} {m['label']}, {'higher' if m['higher_is_better'] else 'lower'} = more similar, "
              f"range [{m['range'][0]:g}, {m['range'][1]:g}]")
    print(f"targets: {', '.join(targets)}; or a model folder, or a hub id")
    if broken:
        print("plugins that failed to load:")
        for message in broken:
            print(f"  {message}")
    return EXIT_OK


def _registry_rows() -> tuple[list[dict], list[str], list[str]]:
    """The metrics (name, label, direction, range), the target names, and every plugin that failed to
    load (of any kind), as `list` prints them -- all read from the registries."""
    metric_rows = [dict(name=n, label=i.label, higher_is_better=i.higher_is_better, range=list(i.range),
                        convention=i.convention) for n, i in METRICS.items()]
    targets = sorted(TARGETS.names())
    broken = [msg for reg in (ATTACKS, PURIFIERS, METRICS, SUITES, TARGETS) for msg in reg.failures.values()]
    return metric_rows, targets, broken


def _metric_arg(text: str) -> str:
    """A registered metric's name (read from the registry, so a plugin metric is accepted too)."""
    try:
        return get_metric(text).name
    except UnknownNameError as exc:
        raise argparse.ArgumentTypeError(str(exc)) from None


def _eps_arg(text: Optional[str]) -> Optional[list[str]]:
    """--eps as a list; an empty value or item is an error, never 'the suite's grid'."""
    if text is None:
        return None
    items = [t.strip() for t in text.split(",")]
    if not all(items):
        raise InputError(f"--eps {text!r} holds an empty budget; expected comma-separated budgets such as "
                         "4/255,16/255 (leave --eps out for the suite's grid)")
    return items


def _list_arg(option: str, text: Optional[str], example: str) -> Optional[list[str]]:
    """A comma-separated option as a list; an empty value or item is an error naming the option,
    never silently 'the suite's default'."""
    if text is None:
        return None
    items = [t.strip() for t in text.split(",")]
    if not all(items):
        raise InputError(f"{option} {text!r} holds an empty name; expected comma-separated names such as "
                         f"{example} (leave {option} out for the default)")
    return items


def _path_arg(option: str, text: Optional[str], default: Path) -> Path:
    """A folder option: the default when left out; an empty value is an error, not the default."""
    if text is None:
        return default
    if not text.strip():
        raise InputError(f"{option} {text!r} is empty; expected a folder path (leave {option} out for {default})")
    return Path(text)


def _run_kwargs(args) -> dict[str, Any]:
    """`spdbench run`'s options as the keyword arguments of `spdbench.run` (checked by build_request)."""
    params = _params(args.param or [])
    if args.preset:
        params["preset"] = args.preset
    purifiers = _list_arg("--purifiers", args.purifiers, "jpeg75,blur1 (or none)")
    return dict(suite=args.suite, eps=_eps_arg(args.eps), norm=args.norm, attack_params=params,
                prompts=_list_arg("--prompts", args.prompts, "P3,P4"), target=args.target, data=args.data,
                manifest=args.manifest, device=args.device, dtype=args.dtype, resume=args.resume,
                purifiers=[] if purifiers == ["none"] else purifiers, compile_backend=args.compile_backend,
                isolation=args.isolation, attack_timeout_s=args.attack_timeout, masks=args.masks,
                cache_dir=args.cache_dir, protections_from=args.protections_from, match=args.match,
                purifier_draws=args.purifier_draws)


def _slow_dtype_warning(device: Optional[str], dtype: Optional[str]) -> Optional[str]:
    """One line when a half dtype is asked for on the CPU, where it has no native kernels: `doctor`
    measured float16 ~167x slower than float32 there, a run that looks hung."""
    on_cpu = device is None or str(device).strip().lower().startswith("cpu")
    if dtype in ("float16", "bfloat16") and on_cpu:
        return (f"warning: --dtype {dtype} on the CPU runs far slower than float32 (about 167x for float16, "
                f"measured by `spdbench doctor --bench`); use --dtype float32 on a CPU, {dtype} on a GPU")
    return None


def _warn_slow_dtype(args) -> None:
    warning = _slow_dtype_warning(getattr(args, "device", None), getattr(args, "dtype", None))
    if warning:
        print(warning, file=sys.stderr)


def cmd_run(args) -> int:
    from spdbench.harness.request import build_request  # deferred: a command loads only its own stack

    attacks = _list_arg("--attack", args.attack, "photoguard-encoder,pca-minus")
    _warn_slow_dtype(args)
    kwargs = _run_kwargs(args)
    if args.backend != "serial" or len(attacks) > 1:
        return _run_grid(args, attacks, kwargs)
    out = _path_arg("--out", args.out, Path("spdbench-runs") / f"{args.suite}-{args.attack}")
    board = _board_arg(args.board)
    request = build_request(attacks[0], out=out, progress=not args.quiet, **kwargs)
    # checked: now say so before the pipeline's own imports (seconds), not after them
    Stages("run", enabled=not args.quiet).stage("loading", f"the harness for {args.attack} on suite {args.suite}")
    from spdbench.harness.pipeline import execute  # deferred: a command loads only its own stack

    result = execute(request)
    _print_table(result.records)
    if not args.quiet:
        _print_placement(result.records, board)
    print(f"\n{len(result.computed)} cell(s) computed, {len(result.reused)} reused; records in {result.out}/records")
    earlier = result.clean_cache_hits - result.clean_cache_hits_own
    print(f"clean edits: {result.clean_cache_misses} computed, {result.clean_cache_hits_own} reused within this run, "
          f"{earlier} from earlier runs' cache; "
          f"{result.edits_run} {request.suite.task} edits run (cache: {result.clean_cache_dir})")
    return _exit_code(result.records)


def _run_grid(args, attacks: list[str], kwargs: dict[str, Any]) -> int:
    """Several attacks, or the Ray backend: one folder per attack under --out (grid.py)."""
    from spdbench.harness.grid import run_grid  # deferred: a command loads only its own stack

    out = _path_arg("--out", args.out, Path("spdbench-runs") / f"{args.suite}-grid")
    suite, eps = kwargs.pop("suite"), kwargs.pop("eps")
    records = run_grid(attacks, suite, eps, out, backend=args.backend, ray_address=args.ray_address,
                       progress=not args.quiet, **kwargs)
    _print_table(records)
    return _exit_code(records)


def _print_table(records) -> None:
    from spdbench.report.board import ranking  # deferred: a command loads only its own stack
    from spdbench.report.page import summary_markdown  # deferred: a command loads only its own stack

    print(summary_markdown(ranking(records)))


def _board_arg(board: Optional[str]) -> Optional[str]:
    """--board, checked before the run: the folder, "" (none here: a hint is printed), or None ('none')."""
    if board == "none":
        return None
    if board is None:
        return "leaderboard" if (Path("leaderboard") / "entries").is_dir() else ""
    if not Path(board).is_dir():
        raise InputError(f"--board {board!r} is not an existing folder (expected a leaderboard folder with "
                         "entries/, or 'none')")
    return board


def _print_placement(records, board: Optional[str]) -> None:
    """The run among the board's verified entries of its suite and budget (report/place.py)."""
    from spdbench.report.place import place  # deferred: a command loads only its own stack

    if board == "":
        print("\n(to see where this run stands, pass --board DIR: a clone's leaderboard/ folder)")
    elif board is not None:
        print(f"\nAmong the verified entries of {board} (this run: unverified):\n")
        print(place(records, board))


def _exit_code(records) -> int:
    """1 when a cell failed (each named on stderr), else 0."""
    from spdbench.store.records import Status  # deferred: a command loads only its own stack

    failed = [r for r in records if r.status == Status.error]
    for rec in failed:
        print(f"FAILED {rec.cell_id}: {rec.error}", file=sys.stderr)
    return EXIT_FAILED_CELLS if failed else EXIT_OK


def cmd_leaderboard(args) -> int:
    from spdbench.report.board import build, load_board, ranking  # deferred: a command loads only its own stack
    from spdbench.report.page import summary_markdown  # deferred: a command loads only its own stack
    from spdbench.report.site.build import SITE_DIR, write_site  # deferred: a command loads only its own stack

    dirs = [Path(d) for d in (args.records or ["spdbench-runs"])]
    out = _output_folder(_path_arg("--out", args.out, dirs[0] / "leaderboard"))
    folders = []
    for d in dirs:
        if not d.is_dir():
            raise InputError(f"--records {str(d)!r} is not an existing folder (expected a folder of run folders)")
        folders += sorted({p.parent.parent for p in d.rglob("records/*.json")
                           if not any(part.startswith(".") for part in p.relative_to(d).parts)})
    if not folders:
        raise InputError(f"--records: no records found under {', '.join(map(str, dirs))}")
    by_folder, skipped, verified = load_board(folders)
    records = [r for recs in by_folder.values() for r in recs]
    for name, reason in skipped:
        print(f"LEFT OUT {name}: {reason}", file=sys.stderr)
    for folder, recs in by_folder.items():
        for line in _digest_notes(Path(folder).name, recs):
            print(line, file=sys.stderr)
    written = build(records, out, args.format.split(","), skipped=skipped, by_folder=by_folder, verified=verified)
    if "html" in args.format.split(","):  # the browsable site beside the one-page HTML (report/site/)
        written["site"] = write_site(by_folder, out / SITE_DIR, skipped, verified, board_dir=out)[0]
    print(summary_markdown(ranking(records)))
    for fmt, path in written.items():
        print(f"wrote {fmt}: {path}")
    return EXIT_OK


def _output_folder(out: Path) -> Path:
    """--out of `leaderboard`: a folder to write into (new or existing), checked before any record is read."""
    for path in (out, *out.parents):
        if path.exists() and not path.is_dir():
            where = "is a file" if path == out else f"lies under {str(path)!r}, which is a file"
            raise InputError(f"--out {str(out)!r} {where}; expected a folder to write the leaderboard into "
                             "(new or existing)")
    return out


def cmd_compare(args) -> int:
    from spdbench.scoring import compare  # deferred: a command loads only its own stack
    from spdbench.verify.claims import load_checked  # deferred: a command loads only its own stack

    sides, notes = [], []
    for label, folder in (("A", args.a), ("B", args.b)):
        if not Path(folder).is_dir():
            raise InputError(f"{label} {folder!r} is not an existing folder (expected a run folder or an entry)")
        records, skipped = load_checked([folder])
        if skipped:
            raise InputError(f"{label} {folder!r} cannot be compared: {skipped[0][1]}")
        sides.append(records)
        notes += _digest_notes(f"{label} {Path(folder).name}", records)
    rows = compare.paired(sides[0], sides[1], metric=args.metric, split=args.split, seed=args.seed,
                          region=args.region)
    print(compare.markdown(Path(args.a).name, Path(args.b).name, rows))
    for line in notes:
        print(line)
    return EXIT_OK


def _digest_notes(name: str, records) -> list[str]:
    """One line per digest flag ("unsigned", "unsigned-by-this-machine") that records of a folder
    carry: numbers this machine's harness cannot vouch for are said, never silently shown."""
    from spdbench.store.digest import FLAGS  # deferred: a command loads only its own stack

    counts: dict[str, int] = {}
    for rec in records:
        for flag in set(rec.flags) & set(FLAGS.values()):
            counts[flag] = counts.get(flag, 0) + 1
    return [f"FLAGGED {name}: {n} record(s) {flag} (not signed by this machine's record key; "
            "see docs/security.md, 'Run folder digests')" for flag, n in sorted(counts.items())]


def cmd_show(args) -> int:
    from spdbench.report.run_page import write_report  # deferred: a command loads only its own stack

    path = write_report(args.folder, args.out)
    print(f"wrote {path}")
    return EXIT_OK


def _print_report(report) -> None:
    for line in report.checks:
        print(f"  ok  {line}")
    for line in getattr(report, "warnings", []):
        print(f"  WARNING  {line}")
    for p in report.problems:
        print(f"REJECTED: {p}", file=sys.stderr)
    print(f"seed {report.seed} (repeat this verification with --seed {report.seed})")


def _announce(command: str, folder: str, seed: Optional[int]) -> tuple[Stages, int]:
    """The seed that repeats the check and the first stage, printed before anything slow (not minutes
    later at the end); (the announcer to pass on, the seed)."""
    stages = Stages(command)
    seed = secrets.randbits(63) if seed is None else seed
    stages.note(f"seed {seed} (repeat this verification with --seed {seed})")
    stages.stage("verifying", f"{folder}: its files and claims, then a re-measurement")
    return stages, seed


def _check_holdout(holdout: Optional[str]) -> None:
    """--holdout checked before the seed line (not after minutes of re-measurement)."""
    if holdout is not None and not Path(holdout).is_dir():
        raise InputError(f"--holdout {holdout!r} is not a folder; expected the maintainer's folder of private photos")


def cmd_verify(args) -> int:
    if getattr(args, "more", None):
        return _verify_each(args)
    return _verify_one(args)


def _verify_each(args) -> int:
    """`verify A B C ...`: each folder as `verify A` would check it, one after the other in this
    process (no interpreter and torch start per entry); the exit status is the worst of them."""
    if args.holdout or args.fill_metrics or args.entry:
        raise InputError("--holdout, --fill-metrics and --entry take one folder; got "
                         f"{1 + len(args.more)} folders")
    worst = EXIT_OK
    for folder in [args.folder, *args.more]:
        print(f"== {folder}", flush=True)
        one = argparse.Namespace(**{**vars(args), "folder": folder, "more": []})
        try:
            code = _verify_one(one)
        except SpdbenchError as exc:  # one folder's refusal is its line, the others are still checked
            print(f"REJECTED: {exc}", file=sys.stderr)
            code = EXIT_FAILED_CELLS
        worst = max(worst, code)
    return worst


def _verify_one(args) -> int:
    from spdbench.verify.challenge import is_challenge  # deferred: a command loads only its own stack

    if is_challenge(args.folder):  # an outside evaluation (challenge.json), not an entry
        return cmd_verify_challenge(args)
    if args.entry:
        raise InputError(f"--entry: {args.folder} is not a challenge folder (no challenge.json); --entry names a "
                         "challenge's entry")
    from spdbench.verify.submit import check_options, verify  # deferred: a command loads only its own stack

    # every option checked before the seed line: a bad one is the command's only line
    check_options(args.sample, args.tolerance, args.seed, args.device, args.fill_metrics, not args.no_rerun)
    _check_holdout(args.holdout)
    stages, seed = _announce("verify", args.folder, args.seed)

    report = verify(args.folder, sample=args.sample, tolerance=args.tolerance, rerun=not args.no_rerun,
                    attack_rerun=not args.no_attack_rerun, seed=seed, device=args.device, data=args.data,
                    manifest=args.manifest, progress=stages, fill_metrics=args.fill_metrics)
    _print_report(report)
    if report.ok:
        what = "re-measured" if report.remeasured else "checked (NOT re-measured: --no-rerun)"
        warned = f"; {len(report.warnings)} WARNING(s) above" if report.warnings else ""
        print(f"verified: {len(report.records)} record(s) {what}; {report.compared} per-image values compared{warned}")
    if report.ok and args.holdout:
        if _measure_holdout(Path(args.folder), args.holdout, args.device) is None:
            return EXIT_FAILED_CELLS
    if report.ok and args.fill_metrics and report.filled is None:
        print(f"NOT WRITTEN --fill-metrics {args.fill_metrics}: nothing to fill (see the fill: lines)", file=sys.stderr)
        return EXIT_FAILED_CELLS
    return EXIT_OK if report.ok else EXIT_FAILED_CELLS


def _measure_holdout(folder: Path, holdout_dir: str, device: Optional[str]):
    """--holdout: a universal or amortized entry re-measured on the maintainer's private photos
    (printed, one line per budget and prompt); a per-image entry says why it needs none."""
    from spdbench.verify import holdout  # deferred: a command loads only its own stack

    kind = holdout.entry_kind(folder)
    if kind == "per-image":
        print("hold-out: not needed (a per-image attack protects each photo itself; verify re-runs it)")
        return {}
    print(f"spdbench: verifying {folder.name} on the private photos in {holdout_dir} (hold-out)", file=sys.stderr,
          flush=True)
    result = holdout.measure(folder, holdout_dir, device=device)
    for p in result.problems:
        print(f"REJECTED (hold-out): {p}", file=sys.stderr)
    if not result.ok:
        return None
    for c in result.cells:
        print(f"hold-out {c.norm} {c.eps_label} {c.prompt_key}: SSIM {c.protection_mean['ssim']:.4f} over "
              f"{len(c.image_names)} private photos ({kind}, stored {'network' if kind == 'amortized' else 'delta'})")
    return result


def cmd_submit(args) -> int:
    from spdbench.verify.submit import submit  # deferred: a command loads only its own stack

    _check_holdout(args.holdout)

    # the seed and each stage are printed by verify() as it starts: after the name checks (a refused
    # name stays one line), before anything slow
    report, dest = submit(args.folder, leaderboard_dir=args.leaderboard, name=args.name, replace=args.replace,
                          sample=args.sample, tolerance=args.tolerance, seed=args.seed, device=args.device,
                          data=args.data, manifest=args.manifest, progress=Stages("submit"))
    _print_report(report)
    if dest is None:
        print("refused: nothing in the leaderboard changed", file=sys.stderr)
        return EXIT_FAILED_CELLS
    if args.holdout:
        from spdbench.verify import holdout  # deferred: a command loads only its own stack

        result = _measure_holdout(dest, args.holdout, args.device)
        if result is None:
            return EXIT_FAILED_CELLS
        if result:
            print(f"hold-out numbers written to {holdout.write(result, args.leaderboard)}")
    entries = sorted(p for p in (Path(args.leaderboard) / "entries").iterdir() if p.is_dir())
    Stages("submit").stage("building", f"the leaderboard in {args.leaderboard} from {len(entries)} entries")
    from spdbench.report.board import build_from_dirs  # deferred: a command loads only its own stack

    _, skipped = build_from_dirs(entries, args.leaderboard)
    for name, reason in skipped:
        print(f"LEFT OUT {name}: {reason}", file=sys.stderr)
    print(f"accepted: {dest}; leaderboard rebuilt in {args.leaderboard}")
    return EXIT_OK


def cmd_doctor(args) -> int:
    from spdbench.doctor.command import command  # deferred: a command loads only its own stack

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


def cmd_protect(args) -> int:
    """Protect one photo or a folder (protect_photos.py); prints where the files went."""
    from spdbench.protect_photos import protect  # deferred: a command loads only its own stack

    _warn_slow_dtype(args)
    summary = protect(args.photos, args.attack, eps=args.eps, norm=args.norm, out=args.out, target=args.target,
                      device=args.device, dtype=args.dtype, params=_params(args.param or []),
                      from_entry=args.from_entry, size=args.size, seed=args.seed, progress=Stages("protect"))
    for photo in summary["photos"]:
        print(f"{photo['output']}: L-inf {round(photo['linf'] * 255)}/255, L2 {photo['l2']:.3f}")
    print(f"{len(summary['photos'])} photo(s) protected with {summary['attack']} ({summary['attack_kind']}) at "
          f"{summary['eps_label']} on {summary['target']['name']}; what was done: {summary['summary_file']}")
    return EXIT_OK


def cmd_challenge(args) -> int:
    """`spdbench challenge ENTRY --purifier NAME | --adaptive lora`: an outside evaluation of an entry's
    stored protections (a purifier, or the editor LoRA-fine-tuned on its protected train photos)."""
    from spdbench.verify.challenge import run_adaptive_challenge, run_challenge  # deferred: its own stack

    entry, what = Path(args.entry), _challenge_kind(args)
    name = args.name or f"{args.purifier or 'lora'}-{entry.name}"
    out = Path(args.out) if args.out else entry.parent.parent / "challenges" / name
    if args.name and out.name != args.name:
        raise InputError(f"--name {args.name!r}: the challenge folder --out {str(out)!r} must be named as the "
                         "challenge (or leave --name out: the folder's name is the challenge's)")
    eps = args.eps.split(",") if args.eps else None
    if what == "adaptive":
        from spdbench.harness.adaptive import LoraPatch  # deferred: the LoRA attacker's stack (peft)

        given = dict(steps=args.steps, rank=args.rank, lr=args.lr, seed=args.seed)
        settings = LoraPatch(**{k: v for k, v in given.items() if v is not None})  # the rest: LoraPatch's defaults
        ch = run_adaptive_challenge(entry, out, settings, eps=eps, device=args.device, data=args.data,
                                    manifest=args.manifest, stages=Stages("challenge"))
    else:
        prompts = args.prompts.split(",") if args.prompts else None
        ch = run_challenge(entry, args.purifier, out, eps=eps, prompts=prompts, split=args.split,
                           device=args.device, data=args.data, manifest=args.manifest, stages=Stages("challenge"))
    after = f"after {args.purifier}" if args.purifier else "with the LoRA-patched editor"
    for cell in ch.cells:
        print(f"{cell.cell_id}: SSIM {after} " + ", ".join(f"{v:.4f}" for v in cell.values["ssim"]))
    print(f"wrote challenge {ch.name!r} to {out}; check it with `spdbench verify {out}` (the board applies "
          "only verified challenges)")
    return EXIT_OK


def _challenge_kind(args) -> str:
    """"purifier" or "adaptive" from the challenge's options; exactly one of --purifier / --adaptive,
    and the options of the other kind are refused, never ignored."""
    if bool(args.purifier) == bool(args.adaptive):
        raise InputError(f"--purifier {args.purifier!r} / --adaptive {args.adaptive!r}: expected exactly one "
                         "(--purifier NAME: a registered purifier; --adaptive lora: the editor LoRA-fine-tuned)")
    lora = {"--steps": args.steps, "--rank": args.rank, "--lr": args.lr, "--seed": args.seed}
    given = [flag for flag, value in lora.items() if value is not None]
    if args.purifier and given:
        raise InputError(f"{given[0]}: a LoRA setting; it applies to --adaptive lora, not --purifier")
    if args.adaptive and (args.prompts or args.split != "test"):
        flag = "--prompts" if args.prompts else "--split"
        raise InputError(f"{flag}: an adaptive challenge covers every prompt of the test split (its patch is "
                         "trained on the train split with every prompt)")
    return "adaptive" if args.adaptive else "purifier"


def cmd_verify_challenge(args) -> int:
    """`spdbench verify CHALLENGE_FOLDER`: re-purify every photo, re-edit a sample; one line if refused."""
    from spdbench.verify.challenge import verify_challenge  # deferred: a command loads only its own stack

    for flag, given in (("--holdout", args.holdout), ("--fill-metrics", args.fill_metrics),
                        ("--no-rerun", args.no_rerun), ("--no-attack-rerun", args.no_attack_rerun)):
        if given:
            raise InputError(f"{flag}: {args.folder} is a challenge (challenge.json), not an entry; verify re-purifies "
                             "and re-edits a challenge, and takes --entry, --sample, --tolerance, --seed, --device")
    stages, seed = _announce("verify", args.folder, args.seed)
    report = verify_challenge(args.folder, entry=args.entry, sample=args.sample, tolerance=args.tolerance,
                              seed=seed, device=args.device, data=args.data, manifest=args.manifest, stages=stages)
    _print_report(report)
    if report.ok:
        print(f"verified: challenge {args.folder} reproduces; verification.json written")
    return EXIT_OK if report.ok else EXIT_FAILED_CELLS


def _add_challenge_parser(sub) -> None:
    s = sub.add_parser("challenge", help="an outside evaluation: run a stronger purifier or the LoRA-fine-tuned "
                                         "editor against an entry's stored protections; writes a challenge folder "
                                         "`verify` re-checks")
    s.add_argument("entry", help="the entry folder (leaderboard/entries/NAME)")
    s.add_argument("--purifier", default=None, help="a registered purifier (see `spdbench list`)")
    s.add_argument("--adaptive", default=None, choices=["lora"],
                   help="the model-side adaptive attacker (lora: the editor LoRA-fine-tuned on the entry's protected "
                        "train photos; its own board column, \"after editor fine-tuning\")")
    s.add_argument("--name", default=None, help="the challenge's name (default PURIFIER-ENTRY or lora-ENTRY)")
    s.add_argument("--out", default=None,
                   help="a new folder, whose name is the challenge's on the board (default: "
                        "LEADERBOARD/challenges/NAME beside the entries folder)")
    s.add_argument("--steps", type=_positive, default=None, help="--adaptive: LoRA training steps (default 60)")
    s.add_argument("--rank", type=_positive, default=None, help="--adaptive: LoRA rank (default 4)")
    s.add_argument("--lr", type=float, default=None, help="--adaptive: AdamW learning rate (default 1e-3)")
    s.add_argument("--seed", type=int, default=None, help="--adaptive: the patch's seed (default 0)")
    s.add_argument("--eps", default=None, help="budgets to challenge, comma separated (default: every budget)")
    s.add_argument("--prompts", default=None, help="prompt keys to challenge, comma separated (default: every one)")
    s.add_argument("--split", default="test", choices=["test", "train"], help="the split (default test: the ranked one)")
    s.add_argument("--device", default=None, help="default: the device type the entry was measured on")
    s.add_argument("--data", help="image folder of the suite (suites whose photos are not bundled)")
    s.add_argument("--manifest", help="spdbench-manifest/1 JSON listing the suite's images (with --data)")
    s.set_defaults(fn=cmd_challenge)


def _add_protect_parser(sub) -> None:
    s = sub.add_parser("protect", help="protect your photos: a photo or a folder, with a per-image attack "
                                       "or a universal/amortized entry; writes PNGs and a JSON")
    s.add_argument("photos", help="a photo file or a folder of photos")
    s.add_argument("--attack", default=None, help="a registered per-image attack (see `spdbench list`)")
    s.add_argument("--from-entry", default=None, dest="from_entry",
                   help="a universal or amortized entry folder: apply its stored perturbation or network")
    s.add_argument("--eps", default=None, help="budget, e.g. 8/255 (default 8/255; an entry: its only budget)")
    s.add_argument("--norm", default="linf", choices=["linf", "l2"], help="budget norm (default linf)")
    s.add_argument("--param", action="append", metavar="KEY=VALUE", help="attack parameter (repeatable)")
    s.add_argument("-o", "--out", default=None,
                   help="output .png for a photo, folder for a folder (default: beside the input, '-protected')")
    s.add_argument("--target", default=None, help="model to attack (default tiny, the smoke suite's; an entry "
                                                  "runs on its own)")
    s.add_argument("--device", default=None, help="cpu, cuda, cuda:N or mps (default cpu)")
    s.add_argument("--dtype", default=None, choices=["float32", "float16", "bfloat16"],
                   help="model dtype (default float32; half dtypes are for GPUs)")
    s.add_argument("--size", type=_positive, default=None,
                   help="centre-crop and resize to SIZE x SIZE (default: keep the size, cropped to a multiple of 8)")
    s.add_argument("--seed", type=int, default=0, help="the attack's seed (default 0)")
    s.set_defaults(fn=cmd_protect)


def cmd_adapt(args) -> int:
    """The model-side adaptive attacker on an entry: LoRA-patch the editor on its TRAIN split's protected
    photos, score its TEST photos with the patched editor (harness/adaptive.py); writes a JSON."""
    from spdbench.harness.adaptive import LoraPatch, adapt_entry, write_result  # deferred: its own stack

    settings = LoraPatch(steps=args.steps, rank=args.rank, lr=args.lr, seed=args.seed)
    result = adapt_entry(args.entry, settings, device=args.device, eps_labels=_list_arg("--eps", args.eps, "8/255"))
    out = write_result(result, args.out or Path("spdbench-runs") / "adapt" / f"{Path(args.entry).name}-lora.json")
    for b in result["budgets"]:
        d = b["paired_after_minus_before"]
        print(f"{result['attack']} eps {b['eps']}: SSIM {b['ssim_before']:.4f} -> {b['ssim_after']:.4f} "
              f"{result['column']} (after - before {d['mean']:+.4f} [{d['low']:+.4f}, {d['high']:+.4f}])")
    print(f"written to {out}")
    return EXIT_OK


def _add_adapt_parser(sub) -> None:
    s = sub.add_parser("adapt", help="the model-side adaptive attacker: LoRA-fine-tune the editor on an entry's "
                                     "protected train photos, score its test photos with the patched editor")
    s.add_argument("entry", help="a run folder or leaderboard entry with stored perturbations (img2img, inpainting or instruction suites)")
    s.add_argument("--adaptive", default="lora", choices=["lora"], help="the adaptive attacker (lora: LoRA Patching)")
    s.add_argument("--steps", type=_positive, default=60, help="LoRA training steps (default 60)")
    s.add_argument("--rank", type=_positive, default=4, help="LoRA rank (default 4)")
    s.add_argument("--lr", type=float, default=1e-3, help="AdamW learning rate (default 1e-3)")
    s.add_argument("--seed", type=int, default=0, help="the patch's seed (default 0)")
    s.add_argument("--eps", default=None, help="only these budgets, e.g. 16/255 (default: every budget)")
    s.add_argument("--device", default=None, help="cpu, cuda, cuda:N or mps (default cpu)")
    s.add_argument("-o", "--out", default=None, help="the result's JSON (default spdbench-runs/adapt/ENTRY-lora.json; "
                                                     "never inside the entry, whose files are checked)")
    s.set_defaults(fn=cmd_adapt)


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog="spdbench", description=__doc__.splitlines()[0])
    sub = p.add_subparsers(dest="command", required=True)
    _add_adapt_parser(sub)
    s = sub.add_parser("list", help="registered attacks, suites and purifiers")
    s.add_argument("--json", action="store_true", help="print the registry as JSON instead of a table")
    s.add_argument("--suites", action="store_true",
                   help="only the suites: each one's protocol card (editor, steps, strength, guidance, prompts, masks, "
                        "seeds, photos, metrics, invisibility floor) and what a complete entry must hold")
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
    s.add_argument("--out", help="run folder (default spdbench-runs/SUITE-ATTACK); one configuration of an "
                   "attack per folder: other --param/--preset values need another --out")
    s.add_argument("--board", metavar="DIR", default=None,
                   help="a leaderboard folder (with entries/) to place the run among its verified entries of the "
                        "same suite and budget, beside none and uniform-noise (default: ./leaderboard when it "
                        "exists; 'none' to skip)")
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
    s.add_argument("--purifier-draws", type=int, default=None, metavar="K",
                   help="draw each randomized purifier (one with a seed) K times per photo; the worst draw counts "
                        "toward the worst case (default: the suite's, 1)")
    s.add_argument("--backend", default="serial", choices=["serial", "ray"],
                   help="ray: one task per (attack, eps) with one GPU each; --out must be shared by all nodes")
    s.add_argument("--ray-address", help="address of a running Ray cluster (default: start a local one)")
    s.add_argument("--compile", dest="compile_backend", nargs="?", const="inductor", default=None,
                   help="torch.compile the VAE and UNet (backend, default inductor); compile time is recorded apart")
    s.add_argument("--match", default="work", choices=["work", "steps"],
                   help="work (default): an attack whose steps you did not set gets the steps the suite's work "
                        "budget buys (encoder-equivalent passes per photo, measured first on the training photos), so "
                        "methods compare at equal model work; steps: the suite's iteration budget (equal "
                        "iterations, the board's second view)")
    s.add_argument("--isolation", default="sandbox", choices=["sandbox", "process", "none"],
                   help="sandbox (default): the attack runs in its own worker process, confined by the OS "
                        "(files, network, processes, limits; recorded as 'process' with the reason where the "
                        "kernel cannot); process: that worker unconfined; none: in this process, for debugging "
                        "only (recorded; verify and submit refuse it)")
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
    s.add_argument("--records", action="append",
                   help="a folder holding run folders or entries (default spdbench-runs); repeat it to rank your "
                        "runs beside a board's entries: --records spdbench-runs --records leaderboard/entries "
                        "(your rows are then marked unverified)")
    s.add_argument("--out", help="output folder (default RECORDS/leaderboard)")
    s.add_argument("--format", default="md,csv,html", type=_formats,
                   help="comma-separated formats among md (README.md), csv (leaderboard.csv, table1.csv) and "
                        "html (index.html, and the browsable site in OUT/site/); default md,csv,html")
    s.set_defaults(fn=cmd_leaderboard)

    s = sub.add_parser("show", help="one run as a self-contained HTML page: example images, loss curves, "
                                    "per-image numbers")
    s.add_argument("folder", help="a run folder (spdbench run --out) or a leaderboard entry")
    s.add_argument("--out", help="the page's path (default FOLDER/report.html)")
    s.set_defaults(fn=cmd_show)

    s = sub.add_parser("compare", help="two methods on the same photos: paired bootstrap of their difference")
    s.add_argument("a", help="run folder or leaderboard entry of method a")
    s.add_argument("b", help="run folder or leaderboard entry of method b (same suite)")
    s.add_argument("--metric", default="ssim", type=_metric_arg,
                   help="protection metric: a registered metric name, as `spdbench list` shows (default ssim)")
    s.add_argument("--split", default="test", choices=["train", "test"], help="split compared (default test)")
    s.add_argument("--region", default="whole", choices=["whole", "repainted", "ground-truth"],
                   help="where the metric is measured: the whole edit (default); on an inpainting suite, "
                        "only the repainted region; on smoke-instruct, ground-truth (with --metric psnr): the "
                        "protected photo's edit against the instruction's exact result")
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
        s.add_argument("--holdout", metavar="DIR",
                       help="the maintainer's private photo folder: a universal or amortized entry is re-measured "
                            "on it with its stored perturbation or network (submit: written to LEADERBOARD/holdout/)")
        if name == "verify":
            s.add_argument("more", nargs="*", metavar="FOLDER",
                           help="more folders, each verified in turn in this one process (exit status: the worst)")
            s.add_argument("--entry", default=None,
                           help="a challenge folder's entry (default: LEADERBOARD/entries/ENTRY beside "
                                "LEADERBOARD/challenges/)")
            s.add_argument("--no-rerun", action="store_true",
                           help="check files, claims and perturbations only; re-measure nothing (reported)")
            s.add_argument("--no-attack-rerun", action="store_true",
                           help="re-measure the sample but do not re-run the attack (reported)")
            s.add_argument("--fill-metrics", metavar="DIR", default=None,
                           help="a new folder: once verified, a copy of the entry is written there whose fully "
                                "re-edited cells carry the registered metrics it was measured without (flagged "
                                "filled-by-reedit; the entry itself is never edited). --sample N >= the images of "
                                "a cell fills every cell")
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
    _add_protect_parser(sub)
    _add_challenge_parser(sub)
    # every command, read from the parser itself (a hand-kept list left out show and compare)
    p.description = "The `spdbench` command: " + " | ".join(sub.choices) + "."
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
