"""Every verb has a --help that explains each of its options."""

from __future__ import annotations

import re

import pytest

from galray.cli import build_parser


def _verbs():
    parser = build_parser()
    sub = next(a for a in parser._actions if a.__class__.__name__ == "_SubParsersAction")
    return sub.choices


def test_top_level_help_lists_verbs(capsys):
    with pytest.raises(SystemExit) as info:
        build_parser().parse_args(["--help"])
    assert info.value.code == 0
    out = capsys.readouterr().out
    for verb in _verbs():
        assert verb in out


@pytest.mark.parametrize("verb", sorted(_verbs()))
def test_every_option_is_explained(verb, capsys):
    parser = _verbs()[verb]
    assert parser.description and len(parser.description) > 40
    for action in parser._actions:
        if action.dest == "help":
            continue
        assert action.help and len(action.help) > 10, f"{verb} {action.option_strings or action.dest} lacks help"
    with pytest.raises(SystemExit):
        parser.parse_args(["--help"])
    assert re.search(r"usage: galray " + verb, capsys.readouterr().out)
