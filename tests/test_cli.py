"""The ``signal-drift`` console command (``python -m signal_drift``): a thin dispatcher."""

import importlib
import subprocess
import sys
from pathlib import Path

import pytest

from signal_drift.cli import COMMANDS, main

ROOT = Path(__file__).resolve().parents[1]


def _run(*args: str) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, "-m", *args], capture_output=True, text=True)


def test_help_lists_every_command():
    r = _run("signal_drift", "--help")
    assert r.returncode == 0, r.stderr
    assert all(f"  {name} " in r.stdout for name in COMMANDS)


def test_a_subcommand_help_is_the_module_help():
    via_dispatcher = _run("signal_drift", "train", "sweep", "--help")
    direct = _run("signal_drift.train", "sweep", "--help")
    assert via_dispatcher.returncode == direct.returncode == 0, via_dispatcher.stderr
    assert via_dispatcher.stdout == direct.stdout and "--multipliers" in direct.stdout


@pytest.mark.parametrize("argv", [[], ["nope"]])
def test_a_missing_or_unknown_command_exits_2(argv, capsys):
    with pytest.raises(SystemExit) as err:
        main(argv)
    assert err.value.code == 2 and "signal-drift" in capsys.readouterr().err


def test_invalid_input_is_one_line_and_exit_2():
    r = _run("signal_drift", "scaling", "--ranks", "0")
    assert r.returncode == 2 and "--ranks" in r.stderr and "Traceback" not in r.stderr


def test_every_command_is_a_module_main_and_the_console_script_points_here():
    assert all(callable(importlib.import_module(module).main) for module, _ in COMMANDS.values())
    pyproject = (ROOT / "pyproject.toml").read_text()
    assert '[project.scripts]\nsignal-drift = "signal_drift.cli:main"\n' in pyproject
