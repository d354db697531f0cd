"""Team mode's parts without a running stack: the authorization rule, the servers' configs, the certificates, and the
process bookkeeping. The slow tier runs the whole stack (tests/test_team.py, tests/test_security.py)."""

import configparser
import ipaddress
import os
import pwd
import sys

import pytest
from cryptography import x509

from mnistgen.team import mlflow_server, postgres, processes, server_auth, stack, swift, tls
from mnistgen.team import settings as team

ME = pwd.getpwuid(os.getuid()).pw_name  # the caller: no service user is made here (the slow tier's stacks make one)


@pytest.fixture
def settings(tmp_path):
    def make(host: str = "127.0.0.1") -> team.Settings:
        overrides = {"TEAM_HOST": host, "TEAM_STATE_DIR": str(tmp_path / f"state-{host}")}
        return team.Settings.load(env_file=tmp_path / f"team-{host}.env", create=True, overrides=overrides)

    return make


@pytest.mark.parametrize(
    "user, method, path, refused",
    [
        ("reader", "POST", "/api/2.0/mlflow/registered-models/create", True),
        ("trainer", "POST", "/api/2.0/mlflow/registered-models/create", True),
        ("ci", "POST", "/api/2.0/mlflow/registered-models/create", False),
        ("trainer", "POST", "/ajax-api/2.0/mlflow/registered-models/alias", True),
        ("admin", "DELETE", "/api/2.0/mlflow/registered-models/alias", False),
        ("reader", "POST", "/api/2.0/mlflow/experiments/create", True),
        ("trainer", "POST", "/api/2.0/mlflow/experiments/create", False),
        ("someone-new", "POST", "/api/2.0/mlflow/runs/create", True),  # an account the tables do not name: a reader's rules
        ("reader", "GET", "/api/2.0/mlflow/registered-models/get", False),
    ],
)
def test_only_the_registry_writers_create_models_or_move_aliases(user, method, path, refused):
    assert server_auth.refused(user, method, path) == refused


def test_swift_back_ends_listen_on_loopback_and_only_the_proxy_holds_the_keys(settings):
    for host in ("127.0.0.1", "127.0.0.2"):
        s = settings(host)
        confs = swift.swift_conf(s, "mnistgen-team")
        for name in ("account", "container", "object"):
            parsed = configparser.RawConfigParser()
            parsed.read_string(swift.ini(confs[f"{name}-server.conf"]))
            assert parsed["DEFAULT"]["bind_ip"] == "127.0.0.1"
            assert not any(s.s3_secret(user) in swift.ini(confs[f"{name}-server.conf"]) for user in team.S3_KEYS)
        proxy = configparser.RawConfigParser()
        proxy.optionxform = str  # type: ignore[assignment,method-assign]
        proxy.read_string(swift.ini(confs["proxy-server.conf"]))
        assert proxy["DEFAULT"]["bind_ip"] == host and ("cert_file" in proxy["DEFAULT"]) == s.tls
        assert proxy["filter:tempauth"]["user_mnistgen_admin"] == s.s3_secret("admin") + " .admin"
        assert proxy["filter:tempauth"]["user_mnistgen_reader"] == s.s3_secret("reader")  # no .admin for a reader
        assert "s3api tempauth" in proxy["pipeline:main"]["pipeline"]


def test_postgres_asks_a_password_everywhere_and_off_loopback_takes_tls_only(settings):
    local, remote = settings("127.0.0.1"), settings("127.0.0.2")
    assert "trust" not in postgres.pg_hba(local) and "host all all 127.0.0.1/32 scram-sha-256" in postgres.pg_hba(local)
    off = postgres.pg_hba(remote)
    assert "trust" not in off and all(line.split()[0] in ("local", "hostssl") for line in off.strip().splitlines())
    assert "listen_addresses = '127.0.0.2'" in postgres.pg_conf(remote) and "ssl = on" in postgres.pg_conf(remote)
    assert "ssl = on" not in postgres.pg_conf(local) and "unix_socket_permissions = 0700" in postgres.pg_conf(local)


def test_the_stacks_ca_signs_a_certificate_for_its_host_and_keeps_its_keys_private(settings):
    s = settings("127.0.0.2")
    s.state.mkdir(parents=True)
    tls.ensure_certificates(s, ME)
    server = x509.load_pem_x509_certificate((s.tls_dir / "server.pem").read_bytes())
    names = server.extensions.get_extension_for_class(x509.SubjectAlternativeName).value
    assert ipaddress.ip_address("127.0.0.2") in names.get_values_for_type(x509.IPAddress)
    ca = x509.load_pem_x509_certificate(s.ca_file.read_bytes())
    assert server.issuer == ca.subject
    for key in ("ca.key", "server.key"):
        assert (s.tls_dir / key).stat().st_mode & 0o777 == 0o600
    assert s.ca_file.stat().st_mode & 0o777 == 0o644  # a certificate is public
    before = (s.tls_dir / "server.pem").read_bytes()
    tls.ensure_certificates(s, ME)  # made once: a second `up` keeps them
    assert (s.tls_dir / "server.pem").read_bytes() == before


def test_the_mlflow_servers_secrets_travel_in_its_environment_and_a_private_file(settings):
    s = settings("127.0.0.1")
    s.state.mkdir(parents=True)
    env = mlflow_server.mlflow_env(s, ME)
    ini = s.state / "mlflow" / "basic_auth.ini"
    assert ini.stat().st_mode & 0o777 == 0o600 and s["TEAM_ADMIN_PASSWORD"] in ini.read_text()
    assert env["MLFLOW_BACKEND_STORE_URI"] == s.pg_socket_uri("mlflow") and env["MLFLOW_BASIC_AUTH_FAIL_CLOSED"] == "true"
    assert env["AWS_ACCESS_KEY_ID"] == "mnistgen:mlflow" and not any(k.startswith("TEAM_") for k in env)


def test_processes_are_ours_by_pid_and_start_time_and_stop_with_their_group(settings, tmp_path):
    s = settings("127.0.0.1")
    s.state.mkdir(parents=True)
    # The sleeper writes which signal ended it: its exit status cannot say, as psutil, waiting in stop_group, may reap
    # it before Popen.wait does (which then reads 0). It says "ready" once its handler is in place.
    marker = tmp_path / "signal"
    sleeper = (
        "import pathlib, signal, sys, time; m = pathlib.Path(sys.argv[1]); "
        "signal.signal(signal.SIGTERM, lambda *_: (m.write_text('SIGTERM'), sys.exit(0))); m.write_text('ready'); time.sleep(60)"
    )
    child = processes.popen_as(ME, [sys.executable, "-c", sleeper, str(marker)], tmp_path / "child.log")
    try:
        processes.wait_for(lambda: marker.exists() and marker.read_text() == "ready", "the sleeper", 30, proc=child)
        processes.write_pid(s, "sleeper", child.pid)
        assert processes.read_pids(s) == {"sleeper": child.pid} and processes.alive(child.pid)
        assert processes.rss_mb([child.pid]) > 1
        recorded = processes.pids_file(s).read_text().replace(str(processes.start_time(child.pid)), "1.0")
        processes.pids_file(s).write_text(recorded)  # another start time: a recycled pid, not ours
        assert processes.read_pids(s) == {}
    finally:
        processes.stop_group(child.pid, timeout=10)
    child.wait(timeout=10)
    assert marker.read_text() == "SIGTERM" and not processes.alive(child.pid)


def test_a_stack_that_never_ran_is_all_down_and_down_says_so(settings, capsys):
    s = settings("127.0.0.1")
    assert stack.status(s) == dict.fromkeys(team.SERVICES, False)
    stack.down(s)
    assert "no stack here" in capsys.readouterr().out
