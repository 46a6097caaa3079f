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
                 "--out", str(tmp_path / "r"), "--quiet", "--purifiers", "jpeg75"])
    out = capsys.readouterr().out
    assert code == 0
    assert "11 computed, 11 reused within this run, 0 from earlier runs' cache" in out, out[-400:]
