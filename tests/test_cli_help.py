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
