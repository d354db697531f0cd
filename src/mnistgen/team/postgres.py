"""PostgreSQL for team mode: a private cluster in the state folder, MLflow's stores and the sweeps' Optuna studies.

Every connection gives a password (scram-sha-256), the unix socket's too (its folder is 0700); off loopback, TCP
is TLS only. Each role (mlflow, optuna) is LOGIN only, owns its own databases, and no other role may connect to
them. The superuser's password reaches psql through a 0600 passfile, the SQL through stdin: never a command line.
"""

from __future__ import annotations

import os

from .processes import chown_tree, os_user, read_pids, run_as, write_pid
from .settings import PG_BIN, Settings, StackError, write_private


def pg_hba(s: Settings) -> str:
    """Every connection gives a password (scram-sha-256), the unix socket's too; off loopback only over TLS."""
    if not s.tls:
        return "local all all scram-sha-256\nhost all all 127.0.0.1/32 scram-sha-256\n"
    return "local all all scram-sha-256\nhostssl all all 0.0.0.0/0 scram-sha-256\nhostssl all all ::/0 scram-sha-256\n"


def pg_conf(s: Settings) -> str:
    sock = s.pg_socket
    text = (
        f"listen_addresses = '{s.host}'\nport = {s.port('PG')}\nunix_socket_directories = '{sock}'\n"
        "unix_socket_permissions = 0700\nmax_connections = 100\nshared_buffers = 64MB\npassword_encryption = scram-sha-256\n"
    )
    if s.tls:
        text += f"ssl = on\nssl_cert_file = '{s.tls_dir / 'server.pem'}'\nssl_key_file = '{s.tls_dir / 'server.key'}'\n"
    return text


def pg_running(s: Settings, user: str) -> bool:
    data = s.pg_data
    return (data / "PG_VERSION").exists() and run_as(
        user, [str(PG_BIN / "pg_ctl"), "-D", str(data), "status"], capture_output=True
    ).returncode == 0


def psql(s: Settings, user: str, sql: str, database: str = "postgres") -> str:
    """Run `sql` as the superuser over the unix socket; its password comes from a 0600 passfile, the SQL on stdin."""
    sock = s.pg_socket
    passfile = s.state / "pg" / "pgpass"
    write_private(passfile, f"*:*:*:postgres:{s['TEAM_PG_SUPERUSER_PASSWORD']}\n", user)
    cmd = [
        str(PG_BIN / "psql"),
        "-h",
        str(sock),
        "-p",
        str(s.port("PG")),
        "-U",
        "postgres",
        "-d",
        database,
        "-v",
        "ON_ERROR_STOP=1",
        "-qtA",
    ]
    env = {"PATH": os.environ.get("PATH", "/usr/bin:/bin"), "PGPASSFILE": str(passfile), "PGCONNECT_TIMEOUT": "10"}
    result = run_as(user, cmd, input=sql, text=True, capture_output=True, env=env)
    if result.returncode != 0:
        raise StackError(f"PostgreSQL setup failed: {result.stderr.strip()[:500]}")
    return result.stdout.strip()


def sql_literal(text: str) -> str:
    return "'" + text.replace("'", "''") + "'"


def start_postgres(s: Settings, user: str) -> None:
    data, sock = s.pg_data, s.pg_socket
    log = s.state / "pg" / "postgres.log"  # written by the postgres user
    if not (data / "PG_VERSION").exists():
        if not (PG_BIN / "initdb").exists():
            raise StackError(f"PostgreSQL is not installed ({PG_BIN}/initdb missing): apt-get install -y postgresql")
        data.mkdir(parents=True, exist_ok=True)
        chown_tree(s.state / "pg", user)
        os.chmod(data, 0o700)
        pwfile = s.state / "pg" / "initdb.pw"
        write_private(pwfile, s["TEAM_PG_SUPERUSER_PASSWORD"] + "\n", user)
        try:
            init = [
                str(PG_BIN / "initdb"),
                "-D",
                str(data),
                "-U",
                "postgres",
                f"--pwfile={pwfile}",
                "-E",
                "UTF8",
                "--locale=C.UTF-8",
            ]
            run_as(user, [*init, "--auth-local=scram-sha-256", "--auth-host=scram-sha-256"], check=True, capture_output=True)
        finally:
            pwfile.unlink(missing_ok=True)
    sock.mkdir(parents=True, exist_ok=True)
    os.chmod(sock, 0o700)  # no other local user reaches the socket at all
    conf = data / "postgresql.conf"
    if "include_if_exists = 'mnistgen.conf'" not in conf.read_text():
        with open(conf, "a") as out:  # our settings live in one file, rewritten at every `up`
            out.write("\ninclude_if_exists = 'mnistgen.conf'\n")
    write_private(data / "mnistgen.conf", pg_conf(s), user)
    hba = data / "pg_hba.conf"
    trusted = " trust" in hba.read_text()  # a cluster made before: the password is set while trust still holds
    if not trusted:
        write_private(hba, pg_hba(s), user)
    chown_tree(s.state / "pg", user)
    if not pg_running(s, user):
        started = run_as(
            user,
            [str(PG_BIN / "pg_ctl"), "-D", str(data), "-l", str(log), "-w", "-t", "60", "start"],
            capture_output=True,
            text=True,
        )
        if started.returncode != 0:
            raise StackError(f"PostgreSQL did not start: {started.stdout.strip()[-300:]} (log {log})")
    if trusted:
        psql(s, user, f"ALTER ROLE postgres PASSWORD {sql_literal(s['TEAM_PG_SUPERUSER_PASSWORD'])}")
        write_private(hba, pg_hba(s), user)
    run_as(user, [str(PG_BIN / "pg_ctl"), "-D", str(data), "reload"], check=True, capture_output=True)
    write_pid(s, "postgres", int((data / "postmaster.pid").read_text().split()[0]))
    # MLflow's stores, and the sweeps' Optuna studies: each role LOGIN only (no superuser, no CREATEDB, no CREATEROLE),
    # owner of its own databases, which no other role may even connect to.
    for role, key, databases in (
        ("mlflow", "TEAM_PG_PASSWORD", ("mlflow", "mlflow_auth")),
        ("optuna", "TEAM_OPTUNA_PASSWORD", ("optuna",)),
    ):
        verb = "ALTER" if psql(s, user, f"select 1 from pg_roles where rolname='{role}'") == "1" else "CREATE"
        psql(s, user, f"{verb} ROLE {role} LOGIN NOSUPERUSER NOCREATEDB NOCREATEROLE PASSWORD {sql_literal(s[key])}")
        for db in databases:
            if psql(s, user, f"select 1 from pg_database where datname='{db}'") != "1":
                psql(s, user, f"CREATE DATABASE {db} OWNER {role}")
            psql(s, user, f"REVOKE CONNECT ON DATABASE {db} FROM PUBLIC")


def stop_postgres(s: Settings) -> None:
    data = s.pg_data
    if "postgres" in read_pids(s):  # ours: the pid pg_ctl wrote is the one we recorded
        run_as(os_user(s), [str(PG_BIN / "pg_ctl"), "-D", str(data), "-m", "fast", "-w", "-t", "60", "stop"], capture_output=True)
    write_pid(s, "postgres", None)
