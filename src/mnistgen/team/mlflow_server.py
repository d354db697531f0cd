"""`mlflow server` for team mode: PostgreSQL behind it, proxied artifacts in Swift, basic-auth with roles in front.

Its store URI and secrets travel in its environment, never on its command line; basic-auth fails closed, and
server_auth.py lets only the registry writers create registered models or move aliases. ensure_users keeps the
accounts (ci, trainer, reader) and their roles in step with the settings, and fails closed.
"""

from __future__ import annotations

import os
import signal
import sys
from pathlib import Path

from .processes import https_get, popen_as, read_pids, service_python, stop_group, venv_bin, wait_for, write_pid
from .settings import ROLES, USERS, Settings, StackError, write_private


def mlflow_env(s: Settings, user: str) -> dict[str, str]:
    ini = s.state / "mlflow" / "basic_auth.ini"
    write_private(
        ini,
        "[mlflow]\ndefault_permission = READ\n"
        f"database_uri = {s.pg_socket_uri('mlflow_auth')}\n"
        f"admin_username = admin\nadmin_password = {s['TEAM_ADMIN_PASSWORD']}\n"
        # basic-auth, then: only REGISTRY_WRITERS create registered models or move aliases (team/server_auth.py)
        "authorization_function = mnistgen.team.server_auth:authenticate\n"
        # PBKDF2 on every request otherwise (a pyfunc log_model makes dozens); 60 s of staleness per worker
        "auth_cache_ttl_seconds = 60\n",
        user,
    )
    env = {k: v for k, v in os.environ.items() if not k.startswith(("MLFLOW_", "TEAM_", "AWS_"))}
    env.update(s.s3_env("mlflow"))
    if s.tls:  # its own copy of the CA: the client's, beside the env file, may sit where the service user cannot read
        env["AWS_CA_BUNDLE"] = str(s.tls_dir / "ca.pem")
    env.update(
        {
            "HOME": str(s.state / "mlflow"),
            "MLFLOW_S3_ENDPOINT_URL": s.s3_endpoint,
            "MLFLOW_AUTH_CONFIG_PATH": str(ini),
            "MLFLOW_BACKEND_STORE_URI": s.pg_socket_uri("mlflow"),  # in the env, not on the command line (ps shows argv)
            "MLFLOW_FLASK_SERVER_SECRET_KEY": s["TEAM_FLASK_SECRET"],
            "MLFLOW_BASIC_AUTH_FAIL_CLOSED": "true",  # a route with no permission rule is refused, not let through
            "MLFLOW_SERVER_ENABLE_JOB_EXECUTION": "false",  # else a job runner with several workers (~2.5 GB)
            "PATH": f"{Path(sys.executable).parent}{os.pathsep}{os.environ.get('PATH', '')}",
        }
    )
    return env


def start_mlflow(s: Settings, user: str, timeout: float = 180) -> None:
    if "mlflow" in read_pids(s):
        return
    cmd = [
        service_python(s, user),
        venv_bin("mlflow"),
        "server",
        "--app-name",
        "basic-auth",
        "--host",
        s.host,
        "--port",
        str(s.port("MLFLOW")),
        "--workers",
        s["TEAM_MLFLOW_WORKERS"],
        "--artifacts-destination",
        f"s3://{s['TEAM_BUCKET']}/mlflow",
    ]
    if s.host not in ("127.0.0.1", "localhost", "::1"):
        cmd += ["--allowed-hosts", f"{s.host},{s.host}:{s.port('MLFLOW')},localhost,127.0.0.1"]
    if s.tls:
        cmd += ["--uvicorn-opts", f"--ssl-certfile {s.tls_dir / 'server.pem'} --ssl-keyfile {s.tls_dir / 'server.key'}"]
    log = s.state / "logs" / "mlflow.log"
    proc = popen_as(user, cmd, log, env=mlflow_env(s, user))
    write_pid(s, "mlflow", proc.pid)
    wait_for(lambda: https_get(s, f"{s.tracking_uri}/health") == 200, "mlflow server", timeout, log, proc)


def stop_mlflow(s: Settings, sig: int = signal.SIGTERM) -> None:
    pid = read_pids(s).get("mlflow")
    if pid:
        if sig == signal.SIGKILL:
            try:
                os.killpg(pid, signal.SIGKILL)
            except ProcessLookupError:
                pass
        stop_group(pid)
    write_pid(s, "mlflow", None)


def auth_client(s: Settings):
    import warnings

    with warnings.catch_warnings():
        warnings.simplefilter("ignore")  # starlette's deprecation notice from mlflow's server modules
        from mlflow.server.auth.client import AuthServiceClient

    os.environ["MLFLOW_TRACKING_USERNAME"], os.environ["MLFLOW_TRACKING_PASSWORD"] = "admin", s["TEAM_ADMIN_PASSWORD"]
    os.environ.update(s.ca_env())
    return AuthServiceClient(s.tracking_uri)


def ensure_users(s: Settings) -> str:
    """The accounts of USERS (created once; passwords kept in step with the settings) and their roles (ROLES).
    Returns what each was granted. Fails closed: an account or grant that cannot be set up raises StackError."""
    saved = {
        k: os.environ.get(k) for k in ("MLFLOW_TRACKING_USERNAME", "MLFLOW_TRACKING_PASSWORD", "MLFLOW_TRACKING_SERVER_CERT_PATH")
    }
    step = "the admin account"
    try:
        auth = auth_client(s)
        for user in USERS:
            step = f"account {user}"
            password = s[f"TEAM_{user.upper()}_PASSWORD"]
            try:
                auth.get_user(user)
            except Exception:  # noqa: BLE001 - not there yet
                auth.create_user(user, password)
            else:
                auth.update_user_password(user, password)
        grants = []
        for user, (role, description, permissions) in ROLES.items():
            step = f"role {role} of {user}"
            grants.append(grant_role(auth, user, role, description, permissions))
        return "; ".join(grants)
    except Exception as err:
        raise StackError(f"team up: cannot set up {step} on {s.tracking_uri}: {str(err).strip().splitlines()[0][:300]}") from err
    finally:
        for k, v in saved.items():
            if v is None:
                os.environ.pop(k, None)
            else:
                os.environ[k] = v


def grant_role(auth, user: str, role_name: str, description: str, permissions: dict[str, str]) -> str:
    """`user` holds role `role_name` with exactly `permissions` (resource type -> permission on every resource '*')."""
    roles = {r.name: r for r in auth.list_roles("default")}
    role = roles.get(role_name) or auth.create_role("default", role_name, description)
    have = {(p.resource_type, p.resource_pattern): p for p in auth.list_role_permissions(role.id)}
    for (rtype, pattern), grant in have.items():
        if pattern != "*" or rtype not in permissions:
            auth.remove_role_permission(grant.id)  # nothing beyond the table
        elif grant.permission != permissions[rtype]:
            auth.update_role_permission(grant.id, permissions[rtype])  # e.g. MANAGE from a stack made before, now EDIT
    for rtype, permission in permissions.items():
        if (rtype, "*") not in have:
            auth.add_role_permission(role.id, rtype, "*", permission)
    if role_name not in {r.name for r in auth.list_user_roles(user)}:
        auth.assign_role(user, role.id)
    return f"{user}: role {role_name} ({', '.join(f'{p} on {t}/*' for t, p in permissions.items())})"
