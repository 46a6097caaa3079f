"""Issue 36, a new user's first hour: one leaderboard row per configuration, progress on every long
wait, the run placed among the board, and the smaller frictions of the tour."""
from __future__ import annotations

import queue
import re
import shutil
import subprocess
import sys
import threading
import time
from pathlib import Path
from typing import Optional

import pandas as pd
import pytest

import spdbench
from entry_helpers import suite_registered  # noqa: F401 (fixture)
from spdbench.errors import InputError
from spdbench.report.board import build_from_dirs


@pytest.fixture(scope="module")
def two_configs(tmp_path_factory, suite_registered):  # noqa: F811
    """spd-encoder at the suite's steps and at `--param steps=2`, each in its own folder."""
    root = tmp_path_factory.mktemp("configs")
    default = spdbench.run("spd-encoder", suite="test-fast", eps="16/255", out=root / "default")
    fewer = spdbench.run("spd-encoder", suite="test-fast", eps="16/255", out=root / "steps2",
                         attack_params={"steps": 2})
    assert default.ok and fewer.ok
    return root / "default", root / "steps2"


def test_two_configurations_of_one_attack_are_two_rows_each_naming_its_parameters(two_configs, tmp_path):
    written, skipped = build_from_dirs(list(two_configs), tmp_path / "board")
    assert not skipped
    board = pd.read_csv(written["csv"])
    assert sorted(board["method"]) == ["spd-encoder", "spd-encoder (steps=2)"]
    assert len(board) == 2, "one row per configuration and budget"
    page = written["md"].read_text()
    assert "spd-encoder \\(steps=2\\)" in page  # Markdown-escaped, on the page
    html = written["html"].read_text()
    assert "spd-encoder (steps=2)" in html


def test_a_run_folder_refuses_another_configuration_with_one_line_naming_out(two_configs):
    default, _ = two_configs
    before = sorted(p.name for p in default.rglob("*"))
    with pytest.raises(InputError) as err:
        spdbench.run("spd-encoder", suite="test-fast", eps="16/255", out=default, attack_params={"steps": 2})
    msg = str(err.value)
    assert "\n" not in msg and f"--out {default}" in msg
    assert '"steps": 2' in msg and '"steps": 3' in msg, "both configurations named"
    assert sorted(p.name for p in default.rglob("*")) == before, "nothing in the folder changed"


def test_the_same_configuration_resumes_in_its_folder(two_configs):
    default, _ = two_configs
    res = spdbench.run("spd-encoder", suite="test-fast", eps="16/255", out=default)
    assert res.ok and res.reused and not res.computed


# --- progress: every long command names its stage within seconds ------------------------------------
STAGE_LINE = re.compile(r"^spdbench (run|verify|submit|protect|challenge) \[[^\]]+\]: (loading|fitting|protecting|purifying|"
                        r"editing|scoring|verifying|writing)\b")


def _first_stage_line(args: list[str], timeout_s: float = 5.0) -> tuple[Optional[str], list[str], float]:
    """Start `spdbench ARGS` with stderr piped (not a terminal); the first stage line on stderr and
    the seconds it took from the start, or None if none came within `timeout_s`. The command is
    stopped either way (only its first lines are read)."""
    lines: "queue.Queue[str]" = queue.Queue()
    t0 = time.monotonic()
    proc = subprocess.Popen([sys.executable, "-m", "spdbench.cli", *args], stderr=subprocess.PIPE,
                            stdout=subprocess.DEVNULL, text=True)
    reader = threading.Thread(target=lambda: [lines.put(line) for line in proc.stderr], daemon=True)
    reader.start()
    seen: list[str] = []
    try:
        while time.monotonic() - t0 < timeout_s:
            try:
                line = lines.get(timeout=max(0.01, timeout_s - (time.monotonic() - t0)))
            except queue.Empty:
                break
            seen.append(line.rstrip("\n"))
            if STAGE_LINE.match(line):
                return line.rstrip("\n"), seen, time.monotonic() - t0
        return None, seen, time.monotonic() - t0
    finally:
        proc.kill()
        proc.wait()


ENTRY = Path(__file__).resolve().parents[1] / "leaderboard" / "entries" / "smoke-uniform-noise"


@pytest.fixture(scope="module")
def startup_s() -> float:
    """Seconds this machine takes right now to start Python and import the CLI (torch included): no
    command can print before that, and on a shared machine it alone can pass 5 s (measured 3-4 s on
    an idle 2-core machine, 7 s at load average 11); the 5 s are counted from there."""
    t0 = time.monotonic()
    subprocess.run([sys.executable, "-c", "import spdbench.cli"], check=True)
    return time.monotonic() - t0


def _photo_file(folder: Path, name: str = "mine.png", size: int = 64) -> Path:
    """One bundled photo written where a user keeps theirs."""
    import numpy as np
    from PIL import Image

    from spdbench.data.photos import load_photos

    folder.mkdir(parents=True, exist_ok=True)
    array = (load_photos(n=1, size=size)[0].permute(1, 2, 0).numpy() * 255).round().astype(np.uint8)
    Image.fromarray(array).save(folder / name)
    return folder / name


@pytest.mark.parametrize("command", ["run", "verify", "submit", "protect", "challenge"])
def test_every_long_command_shows_its_stage_within_5_seconds(command, tmp_path, startup_s):
    if command == "challenge":
        args = ["challenge", str(ENTRY), "--purifier", "jpeg75", "--out", str(tmp_path / "jpeg75-mine")]
    elif command == "protect":
        args = ["protect", str(_photo_file(tmp_path)), "--attack", "pca-minus", "--target", "tiny-random",
                "-o", str(tmp_path / "out.png")]
    elif command == "run":
        args = ["run", "--attack", "uniform-noise", "--suite", "smoke", "--eps", "8/255", "--out", str(tmp_path / "r")]
    elif command == "verify":
        args = ["verify", str(ENTRY)]
    else:
        entry = tmp_path / "mine"
        shutil.copytree(ENTRY, entry)
        args = ["submit", str(entry), "--leaderboard", str(tmp_path / "board")]
    line, seen, took = _first_stage_line(args, timeout_s=startup_s + 5.0)
    assert line is not None, (f"no stage line within 5 s of `spdbench {command}` starting (after {startup_s:.1f} s "
                              f"of Python and imports); stderr: {seen}")
    if command in ("verify", "submit"):  # the seed that repeats the check comes first, not after minutes
        assert any(re.search(r"seed \d+ \(repeat this verification with --seed \d+\)", s) for s in seen), seen


# --- the run placed among the board -----------------------------------------------------------------
BOARD = Path(__file__).resolve().parents[1] / "leaderboard"


def test_a_run_is_placed_among_the_boards_verified_entries_with_the_baselines():
    """A run's records (here: a copy of the pca-minus entry's, as a user re-running it would get)
    ranked among the board's smoke entries: its own row marked unverified, none and uniform-noise beside."""
    from spdbench.report.place import place
    from spdbench.store.records import load_records

    text = place(load_records(BOARD / "entries" / "smoke-pca-minus"), BOARD)
    parts = text.split("## ")[1:]
    assert [p.split(":")[0] for p in parts] == ["smoke · linf eps 8/255", "smoke · linf eps 16/255"]
    for part in parts:
        assert re.search(r"this run ranks \d+ of \d+ \(the board's \d+ verified entries and this run", part)
        methods = [line.split("|")[2].strip() for line in part.splitlines() if line.startswith("| ") and "rank" not in line]
        assert "pca-minus (unverified)" in methods and "pca-minus" in methods, methods
        assert "none" in methods and "uniform-noise" in methods, methods


def test_a_run_on_another_suite_is_not_placed_and_says_why(two_configs):
    from spdbench.report.place import place
    from spdbench.store.records import load_records

    text = place(load_records(two_configs[0]), BOARD)
    assert text.startswith("not placed on the board:") and "test-fast" in text and "\n" not in text


def test_local_rows_never_sit_under_the_verified_sentence(two_configs, tmp_path):
    from spdbench.report.board import VERIFIED_TEXT

    local, _ = build_from_dirs([two_configs[0]], tmp_path / "local")
    page = local["md"].read_text()
    assert VERIFIED_TEXT not in page and "NOT verified" in page
    mixed, skipped = build_from_dirs([BOARD / "entries" / "smoke-none", two_configs[0]], tmp_path / "mixed")
    assert not skipped
    board = pd.read_csv(mixed["csv"])
    assert "spd-encoder (unverified)" in set(board["method"]) and "none" in set(board["method"])
    assert board.loc[board["method"] == "spd-encoder (unverified)", "flags"].str.contains("unverified").all()
    page = mixed["md"].read_text()
    assert VERIFIED_TEXT not in page and "Rows marked (unverified) are local run folders" in page


# --- the board says what its suites are -------------------------------------------------------------
def test_the_board_and_readme_say_what_the_offline_suites_are(tmp_path):
    from spdbench.data.photos import BUNDLED_NAMES, split_indices
    from spdbench.suites import get_suite

    smoke = get_suite("smoke")
    n = smoke.n_images or len(BUNDLED_NAMES)
    train, test = split_indices(n, smoke.split_seed)
    written, _ = build_from_dirs([BOARD / "entries" / "smoke-none"], tmp_path / "b", formats=["md", "html"])
    page, html = written["md"].read_text(), written["html"].read_text()
    for text in (page, html):
        assert "not Stable Diffusion" in text and f"at {smoke.image_size} px" in text
        assert f"{n} bundled photos split {len(train)} train / {len(test)} test" in text
        assert f"mean over {len(test)} test photos" in text
    readme = (BOARD.parent / "README.md").read_text()
    assert "**not Stable Diffusion**" in readme and f"photos at\n{smoke.image_size} px" in readme
    assert f"{n} bundled photos split {len(train)} train / {len(test)} test" in readme
    assert f"mean over {len(test)} test photos\nand {len(smoke.prompts)} prompts, with {smoke.edit.steps}-step edits" in readme


# --- the smaller frictions ----------------------------------------------------------------------------
def test_a_difference_that_is_not_significant_says_so(tmp_path):
    written, _ = build_from_dirs([BOARD / "entries" / "smoke-pca-minus", BOARD / "entries" / "smoke-photoguard-encoder",
                                  BOARD / "entries" / "smoke-none"], tmp_path / "b", formats=["csv", "md"])
    verdicts = set(pd.read_csv(written["csv"])["vs_next"].dropna())
    assert "not significant" in verdicts and verdicts <= {"yes", "not significant"}, verdicts
    assert "not shown" not in written["md"].read_text()


def test_a_decimal_eps_is_printed_on_the_k_over_255_scale_too(tmp_path):
    from spdbench.report.text import eps_text

    assert eps_text("0.03", 0.03) == "0.03 (= 7.65/255)" and eps_text("8/255", 8 / 255) == "8/255"
    written, _ = build_from_dirs([BOARD / "entries" / "smoke-photoguard-encoder-madry"], tmp_path / "b", formats=["md"])
    assert "linf eps 0.03 (= 7.65/255)" in written["md"].read_text()


def test_the_html_page_renders_its_markdown(tmp_path):
    written, _ = build_from_dirs([BOARD / "entries" / "smoke-none"], tmp_path / "b", formats=["html"])
    html = written["html"].read_text()
    assert "<code>spdbench verify</code>" in html and "<strong>smoke</strong>" in html
    assert "`spdbench verify`" not in html and "**smoke**" not in html and "\\(" not in html


def test_the_python_api_accepts_purifiers_none_as_the_cli_does(tmp_path, suite_registered):  # noqa: F811
    res = spdbench.run("uniform-noise", suite="test-fast", eps="16/255", out=tmp_path / "r", purifiers=["none"])
    assert res.ok and all(not r.purified for r in res.records)
    assert all(r.suite_config["purifiers"] == [] for r in res.records)


def test_a_verify_refusal_names_the_differing_params_whole(two_configs, tmp_path):
    from spdbench.verify.submit import verify

    default, fewer = two_configs
    merged = tmp_path / "merged"
    shutil.copytree(default, merged)
    for sub in ("records", "perturbations", "examples"):
        for f in (fewer / sub).glob("*"):
            shutil.copy2(f, merged / sub / f.name)
    report = verify(merged, rerun=False, progress=False)
    assert not report.ok
    problem = next(p for p in report.problems if "attack_params" in p)
    assert '{"steps": 2}' in problem and '{"steps": 3}' in problem and "..." not in problem, problem


def test_list_names_amortized_attacks_amortized(capsys):
    from spdbench.cli import main

    assert main(["list"]) == 0
    lines = {line.split()[0]: line.split()[1] for line in capsys.readouterr().out.splitlines()
             if line.startswith("  ") and len(line.split()) > 1}
    assert lines["amortized-encoder"] == "amortized" and lines["spd-encoder"] == "universal"
    assert lines["pca-minus"] == "per-image"


def test_top_level_help_names_every_command(capsys):
    from spdbench.cli import build_parser, main

    with pytest.raises(SystemExit):
        main(["--help"])
    out = capsys.readouterr().out
    commands = build_parser()._subparsers._group_actions[0].choices
    assert {"show", "compare"} <= set(commands)
    description = out.split("\n\n")[1].replace("\n", " ")
    assert all(f" {c} " in description + " " or f" {c}." in description for c in commands), description


def test_docs_cite_nothing_a_reader_cannot_follow():
    root = BOARD.parent
    pages = [root / "README.md", *sorted((root / "docs").rglob("*.md"))]
    bad = [f"{p.relative_to(root)}: {m.group(0)}" for p in pages
           for m in re.finditer(r"DESIGN(\.md)?\s*§\s*\w+|\b[Ii]ssue\s+#?\d+", p.read_text())]
    assert not bad, bad


def test_a_stage_seen_before_carries_an_estimate_and_a_terminal_bar_shows_it():
    import io

    from spdbench.harness.progress import Stages

    stream = io.StringIO()
    stages = Stages("run", stream=stream)
    stages.stage("editing", "prompt P3")
    time.sleep(1.2)
    stages.stage("scoring", "prompt P3")
    stages.stage("editing", "prompt P4")
    lines = stream.getvalue().splitlines()
    assert lines[0].endswith("editing prompt P3") and "(about" not in lines[0], "no estimate the first time"
    assert re.search(r"editing prompt P4 \(about [12] s\)$", lines[2]), lines[2]

    class Bar:
        disable = False
        postfix = ""

        def set_postfix_str(self, text):
            self.postfix = text

    bar, quiet = Bar(), io.StringIO()
    Stages("run", bar=bar, stream=quiet).stage("fitting", "spd-encoder at eps 8/255", estimate_s=125)
    assert bar.postfix == "fitting spd-encoder at eps 8/255 (about 2 min)" and not quiet.getvalue()
    silent = io.StringIO()
    Stages("verify", enabled=False, stream=silent).stage("verifying")
    assert not silent.getvalue()
    with pytest.raises(ValueError):
        stages.stage("thinking")


def test_a_stage_seen_for_the_first_time_gets_an_estimate_after_its_first_item():
    """No earlier length to go by: from the first item on, the rest at the rate so far (as tqdm does);
    a log gets a line at the first item, then at most one every `every_s`; a terminal bar every item.
    The stage's next time starts with its per-item rate x its items."""
    import io

    from spdbench.harness.progress import Stages

    stream = io.StringIO()
    stages = Stages("run", stream=stream, every_s=3600)
    stages.stage("editing", "prompt P3", items=4, unit="edit passes")
    time.sleep(1.1)
    shown = stages.advance()
    assert shown is not None and re.search(r"editing prompt P3: 1/4 edit passes done, about \d+ s left$", shown), shown
    assert stages.advance() is None, "a second line within every_s would flood a log"
    stages.advance(2)
    stages.stage("scoring", "prompt P3")
    stages.stage("editing", "prompt P4", items=8, unit="edit passes")
    lines = stream.getvalue().splitlines()
    assert "(about" not in lines[0] and lines[1].endswith(shown) and len(lines) == 4, lines
    assert re.search(r"editing prompt P4 \(about [2-5] s\)$", lines[3]), "per-item rate x 8 items: " + lines[3]

    class Bar:
        disable = False
        postfix = ""

        def set_postfix_str(self, text):
            self.postfix = text

    bar = Bar()
    on_bar = Stages("protect", bar=bar, stream=io.StringIO())
    on_bar.stage("protecting", "3 photo(s)", items=3, unit="photos")
    on_bar.advance()
    on_bar.advance()
    assert re.search(r"2/3 photos done, about \d+ s left$", bar.postfix), bar.postfix
    cached = Stages("run", stream=io.StringIO())
    cached.stage("editing", "prompt P1", items=3, unit="edit passes")
    cached.discount()  # the clean edits came from the cache: no pass, and no rate from it
    assert cached.advance() is not None and cached.current.endswith("1/2 edit passes done, about 1 s left")


def test_protect_announces_loading_protecting_and_writing_with_an_estimate(tmp_path, capsys):
    from spdbench.cli import main

    folder = tmp_path / "photos"
    for i in range(2):
        _photo_file(folder, f"p{i}.png")
    rc = main(["protect", str(folder), "--attack", "pca-minus", "--param", "steps=1", "--target", "tiny-random",
               "-o", str(tmp_path / "out")])
    err = capsys.readouterr().err
    assert rc == 0, err
    stages = [m.group(2) for m in map(STAGE_LINE.match, err.splitlines()) if m]
    assert stages == ["loading", "protecting", "protecting", "writing"], err
    assert re.search(r"protecting 2 photo\(s\) with pca-minus \(per-image\) at linf:8/255: 1/2 photos done, "
                     r"about \d+ s left", err), err


# --- one row per configuration: an explicit value equal to the default is the default ---------------
def test_an_explicit_parameter_equal_to_the_default_lands_in_the_default_row(two_configs, tmp_path):
    from spdbench.harness.plan import plan
    from spdbench.store.records import load_records, method_label
    from spdbench.suites import get_suite

    default, fewer = two_configs
    steps = load_records(default)[0].attack_params["steps"]
    same = spdbench.run("spd-encoder", suite="test-fast", eps="16/255", out=tmp_path / "same",
                        attack_params={"steps": steps})
    assert same.ok and {r.param_sources["steps"] for r in same.records} == {"suite"}
    assert {method_label(r) for r in same.records} == {method_label(r) for r in load_records(default)} == {"spd-encoder"}
    written, skipped = build_from_dirs([tmp_path / "same", fewer], tmp_path / "board")
    assert not skipped and sorted(pd.read_csv(written["csv"])["method"]) == ["spd-encoder", "spd-encoder (steps=2)"]
    # the same rule for a preset's value and an attack's default (no run needed: the plan decides)
    madry = plan("photoguard-encoder", get_suite("smoke"), params={"preset": "madry", "steps": 1000})
    assert madry.sources["steps"] == "preset:madry"
    step_size = spdbench.get_attack("pca-minus").params["step_size"]
    default_step = plan("pca-minus", get_suite("smoke"), params={"step_size": step_size})
    assert default_step.sources["step_size"] == "default"
    other = plan("pca-minus", get_suite("smoke"), params={"step_size": 0.123})
    assert other.sources["step_size"] == "explicit"


# --- verify: a bad option is the only line, before the seed ------------------------------------------
@pytest.mark.parametrize("extra, named", [(["--device", "tpu9"], "tpu9"), (["--holdout", "/no/such/dir"], "--holdout"),
                                          (["--fill-metrics", "x", "--no-rerun"], "--fill-metrics")])
def test_verify_refuses_a_bad_option_in_one_line_before_its_seed_line(extra, named, capsys):
    from spdbench.cli import main

    assert main(["verify", str(ENTRY), *extra]) == 2
    captured = capsys.readouterr()
    err = captured.err.strip().splitlines()
    assert len(err) == 1 and named in err[0] and "seed" not in captured.err and not captured.out, captured
