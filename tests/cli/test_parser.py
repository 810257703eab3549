"""The command line's parser: what ``flatmin [COMMAND] --help`` prints."""

from __future__ import annotations

import pytest

from flatmin.cli import main, plain_text


@pytest.mark.parametrize("argv", [[], ["train"], ["measure"], ["plot"], ["bench"]])
def test_help_shows_plain_text_not_rst_markup(argv, capsys):
    with pytest.raises(SystemExit) as exit_:
        main([*argv, "--help"])
    assert exit_.value.code == 0
    shown = capsys.readouterr().out
    assert shown.startswith("usage: flatmin")
    for markup in ("``", ":func:", ":class:", ":meth:"):
        assert markup not in shown


def test_plain_text_drops_literal_quotes_and_roles():
    line = "``flatmin plot RUN…``: see :func:`~flatmin.measure.sam_sharpness` and :class:`X`"
    assert plain_text(line) == "flatmin plot RUN…: see flatmin.measure.sam_sharpness and X"
