"""The crvae console script."""

import subprocess
import sys

import pytest

from crvae_ext import cli


def test_info_self_check_passes(capsys):
    assert cli.main(["info"]) == 0
    out = capsys.readouterr().out
    assert "self-check PASS" in out
    assert "backend torch" in out


def test_unknown_command_is_an_error(capsys):
    with pytest.raises(SystemExit) as err:
        cli.main(["fly"])
    assert err.value.code == 2
    assert "invalid choice: 'fly'" in capsys.readouterr().err


def test_module_entry_point_runs():
    done = subprocess.run(
        [sys.executable, "-m", "crvae_ext.cli", "--version"], capture_output=True, text=True
    )
    assert done.returncode == 0 and "crvae_ext" in done.stdout
