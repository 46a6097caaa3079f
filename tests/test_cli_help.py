"""The CLI explains itself: every option of every command has help text, and `list` shows purifiers."""
from __future__ import annotations

import argparse

import pytest

from spdbench.cli import build_parser


def _subparsers(parser: argparse.ArgumentParser) -> dict[str, argparse.ArgumentParser]:
    action = next(a for a in parser._actions if isinstance(a, argparse._SubParsersAction))
    return dict(action.choices)


@pytest.mark.parametrize("command", sorted(_subparsers(build_parser())))
def test_every_option_has_help(command):
    sub = _subparsers(build_parser())[command]
    missing = [a.option_strings[0] if a.option_strings else a.dest for a in sub._actions
               if not isinstance(a, argparse._HelpAction) and not (a.help and a.help.strip())]
    assert not missing, f"spdbench {command}: options without help text: {missing}"


def test_leaderboard_help_lists_the_formats(capsys):
    with pytest.raises(SystemExit):
        build_parser().parse_args(["leaderboard", "--help"])
    out = capsys.readouterr().out
    assert all(f in out for f in ("md", "csv", "html"))


def test_list_shows_the_purifiers(capsys):
    from spdbench.cli import main

    assert main(["list"]) == 0
    out = capsys.readouterr().out
    assert "purifiers:" in out and "gridpure" in out and "impress-ssim" in out


def test_list_descriptions_are_whole_sentences(capsys):
    from spdbench.cli import main

    main(["list"])
    out = capsys.readouterr().out
    line = next(ln for ln in out.splitlines() if ln.strip().startswith("uniform-noise"))
    assert line.rstrip().endswith("(as the harness would clamp it)."), line


def test_unknown_attack_on_the_cli_points_to_the_entry_point_route(capsys, tmp_path):
    from spdbench.cli import main

    code = main(["run", "--attack", "my-decorated-attack", "--out", str(tmp_path / "r")])
    err = capsys.readouterr().err
    assert code == 2 and "unknown attack 'my-decorated-attack'" in err and "entry point" in err
    assert err.count("\n") == 1, "one line"


def test_interrupt_message_starts_on_its_own_line(monkeypatch, capsys):
    from spdbench import cli

    def interrupted(args):
        raise KeyboardInterrupt

    monkeypatch.setattr(cli, "cmd_list", interrupted)
    assert cli.main(["list"]) == 130
    err = capsys.readouterr().err
    assert err.startswith("\ninterrupted;")


def test_a_new_folder_reports_no_clean_edits_from_earlier_runs(tmp_path, capsys):
    """The second eps of a run reuses the first eps's clean edits: said as such, not as 'from the cache'."""
    from spdbench.cli import main

    code = main(["run", "--suite", "smoke", "--attack", "uniform-noise", "--target", "tiny-random", "--prompts", "P3",
                 "--out", str(tmp_path / "r"), "--quiet", "--purifiers", "jpeg75", "--isolation", "none"])
    out = capsys.readouterr().out
    assert code == 0
    assert "11 computed, 11 reused within this run, 0 from earlier runs' cache" in out, out[-400:]


def _run_uniform(out, *extra):
    from spdbench.cli import main

    return main(["run", "--suite", "smoke", "--attack", "uniform-noise", "--target", "tiny-random", "--prompts", "P3",
                 "--eps", "8/255", "--out", str(out), "--quiet", "--purifiers", "jpeg75",
                 "--isolation", "none", *extra])  # what is tested is the clean-edit cache, not the worker


def test_clean_edits_are_shared_across_run_folders(tmp_path, capsys, monkeypatch):
    """A second run folder reuses the first folder's clean edits from the user-level cache."""
    from spdbench.harness.editing import CACHE_ENV

    monkeypatch.setenv(CACHE_ENV, str(tmp_path / "shared"))
    assert _run_uniform(tmp_path / "a") == 0
    first = capsys.readouterr().out
    assert "11 computed, 0 reused within this run, 0 from earlier runs' cache" in first, first[-400:]
    assert _run_uniform(tmp_path / "b") == 0
    second = capsys.readouterr().out
    assert "0 computed, 0 reused within this run, 11 from earlier runs' cache" in second, second[-400:]
    assert f"cache: {tmp_path / 'shared' / 'clean-edits'}" in second
    assert not (tmp_path / "a" / "cache").exists() and not (tmp_path / "b" / "cache").exists()
    assert len(list((tmp_path / "shared" / "clean-edits").glob("*/*.safetensors"))) == 11


def test_cache_dir_option_overrides_the_shared_cache(tmp_path, capsys):
    assert _run_uniform(tmp_path / "a", "--cache-dir", str(tmp_path / "mine")) == 0
    assert len(list((tmp_path / "mine").glob("*.safetensors"))) == 11
    assert not (tmp_path / "user-cache").exists(), "nothing written to the user-level cache"
    assert "cache: " + str(tmp_path / "mine") in capsys.readouterr().out
    from spdbench.store.records import load_records

    assert all("jpeg75" in r.purified for r in load_records(tmp_path / "a")), "--purifiers jpeg75 is scored"


def test_progress_defaults_to_on_at_a_terminal_only(monkeypatch):
    import io

    from spdbench.harness import pipeline as harness

    class Tty(io.StringIO):
        def isatty(self):
            return True

    monkeypatch.setattr(harness.sys, "stderr", Tty())
    assert harness.interactive() is True
    monkeypatch.setattr(harness.sys, "stderr", io.StringIO())
    assert harness.interactive() is False


def test_purifiers_none_scores_no_purifier(tmp_path, capsys):
    """--purifiers none: a run that scores the unpurified edit only (a study that needs no purifier)."""
    from spdbench.store.records import load_records

    out2 = tmp_path / "r2"  # (a run with --purifiers jpeg75 scores it: test_cache_dir_option_...)
    from spdbench.cli import main

    assert main(["run", "--suite", "smoke", "--attack", "uniform-noise", "--target", "tiny-random", "--prompts", "P3",
                 "--eps", "8/255", "--out", str(out2), "--quiet", "--purifiers", "none", "--isolation", "none"]) == 0
    recs = load_records(out2)
    assert recs and all(r.purified == {} and r.suite_config["purifiers"] == [] for r in recs)
