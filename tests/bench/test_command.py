import pytest

from flatmin.bench.command import MODES, PRESETS
from flatmin.cli import main


def test_no_benchmark_named_lists_the_choices(capsys):
    assert main(["bench"]) == 2
    err = capsys.readouterr().err
    assert "--preset demo" in err
    for name in (*PRESETS, *MODES):
        assert name in err


def test_two_different_benchmarks_are_refused(capsys):
    assert main(["bench", "speed", "--preset", "demo"]) == 2
    assert "name one benchmark" in capsys.readouterr().err


def test_positional_and_flag_forms_reach_the_same_preset(tmp_path, capsys):
    # The demo's own argument check answers, so both forms dispatched to it.
    for form in (["demo"], ["--preset", "demo"]):
        assert main(["bench", *form, "--seeds", "0", "--out", str(tmp_path)]) == 2
        assert "--seeds, --epochs and --threads must be >= 1" in capsys.readouterr().err


def test_help_lists_every_benchmark(capsys):
    with pytest.raises(SystemExit):
        main(["bench", "--help"])
    text = " ".join(capsys.readouterr().out.split())
    assert "demo: SGD, SAM, SAF and MESA on MNIST-1D with 40 % label noise" in text
    for name in MODES:
        assert f"{name}:" in text
