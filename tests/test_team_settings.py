"""Team mode's settings, without a stack: the variables `mnistgen team env` prints must survive a real shell."""

import subprocess
import sys

import pytest

from mnistgen.team import settings as team


@pytest.mark.parametrize("host", ["127.0.0.1", "127.0.0.2"], ids=["loopback", "tls"])
def test_team_env_sets_every_variable_when_evaluated_in_a_real_shell(tmp_path, host):
    """Off loopback (TLS on), the Optuna URL holds `?sslmode=verify-full&sslrootcert=...`: unquoted, `eval` would run part
    of it in the background and leave MNISTGEN_OPTUNA_STORAGE unset. Every value must come out of `eval` unchanged."""
    settings = team.Settings.load(env_file=tmp_path / "team.env", create=True, overrides={"TEAM_HOST": host})
    assert settings.tls == (host != "127.0.0.1")
    expected = {**settings.client_env("ci"), "MNISTGEN_OPTUNA_STORAGE": settings.optuna_storage}
    assert ("&" in expected["MNISTGEN_OPTUNA_STORAGE"]) == settings.tls
    printer = (
        "from pathlib import Path\nfrom mnistgen.team import settings as team\n"
        f"s = team.Settings.load(env_file=Path({str(tmp_path / 'team.env')!r}), overrides={{'TEAM_HOST': {host!r}}})\n"
        "print(team.exports(s, 'ci'))"
    )
    script = f'eval "$({sys.executable} -c "$PRINTER")"\n' + "".join(f'printf "%s\\0" "${k}"\n' for k in expected)
    shell = subprocess.run(
        ["bash", "-c", script], env={"PRINTER": printer, "PATH": "/usr/bin:/bin"}, capture_output=True, text=True, timeout=60
    )
    assert shell.returncode == 0, shell.stderr
    got = dict(zip(expected, shell.stdout.split("\0")))
    assert got == expected
    assert shell.stderr == ""  # no job control noise, no "command not found" from a split URL


def test_unquoted_exports_would_lose_the_optuna_storage(tmp_path):
    """The check above is not blind: the same line without quotes leaves the variable unset in a real shell."""
    settings = team.Settings.load(env_file=tmp_path / "team.env", create=True, overrides={"TEAM_HOST": "127.0.0.2"})
    line = f"export MNISTGEN_OPTUNA_STORAGE={settings.optuna_storage}"
    shell = subprocess.run(
        ["bash", "-c", f'eval "{line}"; wait; printf "%s" "$MNISTGEN_OPTUNA_STORAGE"'], capture_output=True, text=True, timeout=60
    )
    assert shell.stdout != settings.optuna_storage
