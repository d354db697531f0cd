"""The team stack: PostgreSQL, OpenStack Swift with s3api, `mlflow server` with basic-auth.

Every setting is a TEAM_* variable, read from the environment first, then from the env file
(team/.env, git-ignored; TEAM_ENV_FILE names another). The first `up` writes the file with
random passwords when it does not exist. Nothing secret is ever written inside the repo's
tracked files or on a process's command line.

| setting | default | what |
| --- | --- | --- |
| TEAM_HOST | 127.0.0.1 | the address every server listens on (a real host: its own address) |
| TEAM_PG_PORT | 55432 | PostgreSQL |
| TEAM_S3_PORT | 58080 | Swift proxy (S3 API); account/container/object servers use the next three ports |
| TEAM_MLFLOW_PORT | 55000 | mlflow server |
| TEAM_STATE_DIR | /var/tmp/mnistgen-team | data, configs, logs, pids |
| TEAM_BUCKET | mnistgen | the bucket: MLflow artifacts under mlflow/, the DVC remote under dvc/ |
| TEAM_OS_USER | mnistgen-team | the unprivileged user PostgreSQL runs as when `up` runs as root (it refuses root) |
| TEAM_MLFLOW_WORKERS | 2 | uvicorn workers of mlflow server |
| TEAM_PG_PASSWORD, TEAM_S3_SECRET, TEAM_ADMIN_PASSWORD, TEAM_CI_PASSWORD, TEAM_READER_PASSWORD, TEAM_FLASK_SECRET | generated | secrets |
| TEAM_OPTUNA_PASSWORD | generated | PostgreSQL role `optuna`, owner of database `optuna` alone: the shared sweeps' studies |
| TEAM_TRAINER_PASSWORD | generated | MLflow account `trainer`: logs runs (a full pipeline for a pull request); may not register or move aliases |
"""

from __future__ import annotations

import json
import os
import pwd
import secrets
import shutil
import signal
import socket
import subprocess
import sys
import time
import urllib.error
import urllib.request
from dataclasses import dataclass
from pathlib import Path

from dotenv import dotenv_values

ROOT = Path(__file__).resolve().parents[3]  # the repository (an editable install): the drills run its stage scripts
DEFAULT_ENV_FILE = Path.home() / ".config" / "mnistgen" / "team.env"  # outside any repository: never committed by mistake


def _pg_bin() -> Path:
    """TEAM_PG_BIN, else the newest Debian/Ubuntu PostgreSQL (15 on this machine's Debian, 16 on GitHub's Ubuntu)."""
    if os.environ.get("TEAM_PG_BIN"):
        return Path(os.environ["TEAM_PG_BIN"])
    found = sorted(
        Path("/usr/lib/postgresql").glob("*/bin/initdb"), key=lambda p: int(p.parts[-3]) if p.parts[-3].isdigit() else 0
    )
    return found[-1].parent if found else Path("/usr/lib/postgresql/15/bin")


PG_BIN = _pg_bin()
SECRET_KEYS = (
    "TEAM_PG_PASSWORD",
    "TEAM_S3_SECRET",
    "TEAM_ADMIN_PASSWORD",
    "TEAM_CI_PASSWORD",
    "TEAM_READER_PASSWORD",
    "TEAM_FLASK_SECRET",
    "TEAM_OPTUNA_PASSWORD",
    "TEAM_TRAINER_PASSWORD",
)


def new_secret() -> str:
    """A random secret that never starts with '-': command lines such as `dvc remote modify --local team
    secret_access_key VALUE` would read one that does as an option (1 token in 64 did, failing CI)."""
    return "k" + secrets.token_urlsafe(18)


# Secrets added after stacks were in use: `up` generates them, but loading does not require them, so `down`, `env`
# and `status` keep working on an env file written before them (the next `up` adds them and what they guard).
LATER_SECRET_KEYS = ("TEAM_OPTUNA_PASSWORD", "TEAM_TRAINER_PASSWORD")
USERS = ("ci", "trainer", "reader")  # MLflow accounts besides admin (docs/team.md says what each may do)
# Each account's grants through a role of the default workspace (reader has the server's default_permission, READ):
# ci registers versions and moves aliases of any model; trainer logs runs in any experiment and reads the registry.
ROLES = {
    "ci": ("ci-writer", "runs, versions and aliases", {"experiment": "MANAGE", "registered_model": "MANAGE"}),
    "trainer": ("trainer-runs", "runs only: the registry stays read-only", {"experiment": "EDIT"}),
}
DEFAULTS = {
    "TEAM_HOST": "127.0.0.1",
    "TEAM_PG_PORT": "55432",
    "TEAM_S3_PORT": "58080",
    "TEAM_MLFLOW_PORT": "55000",
    "TEAM_STATE_DIR": "/var/tmp/mnistgen-team",
    "TEAM_BUCKET": "mnistgen",
    "TEAM_OS_USER": "mnistgen-team",
    "TEAM_MLFLOW_WORKERS": "2",
}
S3_ACCOUNT, S3_USER = "mnistgen", "admin"  # tempauth: the S3 access key is "account:user"
SWIFT_SERVERS = ("account", "container", "object", "proxy")


class StackError(RuntimeError):
    pass


def read_env_file(path: Path) -> dict[str, str]:
    """KEY=value lines (python-dotenv's format); {} when the file does not exist."""
    return {k: v for k, v in dotenv_values(path).items() if v is not None} if path.exists() else {}


@dataclass
class Settings:
    values: dict[str, str]
    env_file: Path

    @classmethod
    def load(cls, env_file: Path | None = None, create: bool = False, overrides: dict[str, str] | None = None) -> Settings:
        env_file = Path(env_file or os.environ.get("TEAM_ENV_FILE") or DEFAULT_ENV_FILE)
        from_file = read_env_file(env_file)
        if create and not all(k in from_file or k in os.environ for k in SECRET_KEYS):
            missing = {k: new_secret() for k in SECRET_KEYS if k not in from_file and k not in os.environ}
            env_file.parent.mkdir(parents=True, exist_ok=True)
            with open(env_file, "a") as out:
                os.chmod(env_file, 0o600)
                if not from_file:
                    out.write("# team-mode secrets, generated by `mnistgen team up` (git-ignored: never commit)\n")
                out.writelines(f"{k}={v}\n" for k, v in missing.items())
            from_file.update(missing)
        values = {**DEFAULTS, **from_file, **{k: v for k, v in os.environ.items() if k.startswith("TEAM_")}, **(overrides or {})}
        unset = [k for k in SECRET_KEYS if not values.get(k) and k not in LATER_SECRET_KEYS]
        if unset:
            raise StackError(
                f"missing settings {', '.join(unset)}: run `mnistgen team up` once, or set them (env file {env_file})"
            )
        return cls(values, env_file)

    def __getitem__(self, key: str) -> str:
        return self.values[key]

    @property
    def host(self) -> str:
        return self["TEAM_HOST"]

    def port(self, name: str) -> int:
        return int(self[f"TEAM_{name}_PORT"])

    @property
    def state(self) -> Path:
        return Path(self["TEAM_STATE_DIR"])

    @property
    def tracking_uri(self) -> str:
        return f"http://{self.host}:{self.port('MLFLOW')}"

    @property
    def s3_endpoint(self) -> str:
        return f"http://{self.host}:{self.port('S3')}"

    @property
    def s3_access_key(self) -> str:
        return f"{S3_ACCOUNT}:{S3_USER}"

    def pg_uri(self, database: str) -> str:
        return f"postgresql://mlflow:{self['TEAM_PG_PASSWORD']}@{self.host}:{self.port('PG')}/{database}"

    @property
    def optuna_storage(self) -> str | None:
        """The sweeps' Optuna storage (python -m mnistgen.sweep): its own role and database, not MLflow's.
        None for a stack made before sweeps existed, until its next `up`."""
        if not self.values.get("TEAM_OPTUNA_PASSWORD"):
            return None
        return f"postgresql+psycopg://optuna:{self['TEAM_OPTUNA_PASSWORD']}@{self.host}:{self.port('PG')}/optuna"

    def client_env(self, user: str = "ci") -> dict[str, str]:
        """What a teammate (or CI) sets: the server's address and one MLflow account."""
        if not self.values.get(f"TEAM_{user.upper()}_PASSWORD"):
            raise StackError(f"no password for account {user} in {self.env_file}: run `mnistgen team up` once to add it")
        return {
            "MLFLOW_TRACKING_URI": self.tracking_uri,
            "MLFLOW_TRACKING_USERNAME": user,
            "MLFLOW_TRACKING_PASSWORD": self[f"TEAM_{user.upper()}_PASSWORD"],
        }

    def s3_env(self) -> dict[str, str]:
        """Object-store credentials: for the mlflow server and DVC only (MLflow clients need none)."""
        return {
            "AWS_ACCESS_KEY_ID": self.s3_access_key,
            "AWS_SECRET_ACCESS_KEY": self["TEAM_S3_SECRET"],
            "AWS_DEFAULT_REGION": "us-east-1",
            "MLFLOW_S3_ENDPOINT_URL": self.s3_endpoint,
        }


# ---------------------------------------------------------------- processes


def as_root() -> bool:
    return os.geteuid() == 0


def os_user(s: Settings) -> str:
    """The user the servers run as: the caller, or (as root) an unprivileged account made once."""
    if not as_root():
        return pwd.getpwuid(os.getuid()).pw_name
    name = s["TEAM_OS_USER"]
    try:
        pwd.getpwnam(name)
    except KeyError:
        subprocess.run(["useradd", "--system", "--create-home", "--shell", "/usr/sbin/nologin", name], check=True)
    return name


def chown_tree(path: Path, user: str) -> None:
    if as_root():
        subprocess.run(["chown", "-R", f"{user}:", str(path)], check=True)


def run_as(user: str, cmd: list[str], **kwargs) -> subprocess.CompletedProcess:
    if as_root() and user != "root":
        cmd = ["runuser", "-u", user, "--", *cmd]
    return subprocess.run(cmd, **kwargs)


def popen_as(user: str, cmd: list[str], log: Path, env: dict[str, str] | None = None) -> subprocess.Popen:
    if as_root() and user != "root":
        cmd = ["runuser", "-u", user, "--", *cmd]
    with open(log, "ab") as out:
        return subprocess.Popen(
            cmd, stdout=out, stderr=subprocess.STDOUT, stdin=subprocess.DEVNULL, env=env, start_new_session=True
        )


def pids_file(s: Settings) -> Path:
    return s.state / "pids.json"


def read_pids(s: Settings) -> dict[str, int]:
    try:
        return json.loads(pids_file(s).read_text())
    except (OSError, json.JSONDecodeError):
        return {}


def write_pid(s: Settings, name: str, pid: int | None) -> None:
    pids = read_pids(s)
    if pid is None:
        pids.pop(name, None)
    else:
        pids[name] = pid
    pids_file(s).write_text(json.dumps(pids, indent=1))


def alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:
        return True
    try:  # a zombie is not alive
        return Path(f"/proc/{pid}/stat").read_text().split(")")[-1].split()[0] != "Z"
    except OSError:
        return False


def stop_group(pid: int, timeout: float = 20) -> None:
    """SIGTERM the process group `pid` leads (each server is started in its own session), then SIGKILL."""
    for sig in (signal.SIGTERM, signal.SIGKILL):
        try:
            os.killpg(pid, sig)
        except ProcessLookupError:
            return
        deadline = time.time() + timeout
        while time.time() < deadline:
            if not group_alive(pid):
                return
            time.sleep(0.2)


def group_alive(pgid: int) -> bool:
    for proc in Path("/proc").iterdir():
        if proc.name.isdigit():
            try:
                fields = (proc / "stat").read_text().rsplit(")", 1)[1].split()
            except OSError:
                continue
            if int(fields[2]) == pgid and fields[0] != "Z":
                return True
    return False


def wait_for(check, what: str, timeout: float, log: Path | None = None) -> None:
    deadline = time.time() + timeout
    last = None
    while time.time() < deadline:
        try:
            if check():
                return
        except Exception as err:  # noqa: BLE001 - keep trying until the deadline
            last = err
        time.sleep(0.3)
    tail = log.read_text(errors="replace")[-2000:] if log and log.exists() else ""
    raise StackError(f"{what} did not come up in {timeout:.0f} s ({last}){chr(10) + tail if tail else ''}")


def port_open(host: str, port: int) -> bool:
    with socket.socket() as sock:
        sock.settimeout(1)
        return sock.connect_ex((host, port)) == 0


def venv_bin(name: str) -> str:
    found = Path(sys.executable).with_name(name)
    return str(found) if found.exists() else (shutil.which(name) or name)


# ---------------------------------------------------------------- PostgreSQL


def pg_dirs(s: Settings) -> tuple[Path, Path]:
    return s.state / "pg" / "data", s.state / "pg" / "socket"


def start_postgres(s: Settings) -> None:
    user = os_user(s)
    data, sock = pg_dirs(s)
    log = s.state / "pg" / "postgres.log"  # written by the postgres user
    if not (data / "PG_VERSION").exists():
        if not (PG_BIN / "initdb").exists():
            raise StackError(f"PostgreSQL is not installed ({PG_BIN}/initdb missing): apt-get install -y postgresql")
        sock.mkdir(parents=True, exist_ok=True)
        data.mkdir(parents=True, exist_ok=True)
        chown_tree(s.state / "pg", user)
        os.chmod(data, 0o700)
        run_as(
            user,
            [
                str(PG_BIN / "initdb"),
                "-D",
                str(data),
                "-U",
                "postgres",
                "--auth-local=trust",
                "--auth-host=scram-sha-256",
                "-E",
                "UTF8",
                "--locale=C.UTF-8",
            ],
            check=True,
            capture_output=True,
        )
        with open(data / "postgresql.conf", "a") as conf:
            conf.write(
                f"\nlisten_addresses = '{s.host}'\nport = {s.port('PG')}\nunix_socket_directories = '{sock}'\n"
                "max_connections = 100\nshared_buffers = 64MB\n"
            )
        mask = "128" if ":" in s.host else "32"
        (data / "pg_hba.conf").write_text(f"local all all trust\nhost all all {s.host}/{mask} scram-sha-256\n")
        if s.host not in ("127.0.0.1", "localhost"):
            with open(data / "pg_hba.conf", "a") as hba:
                hba.write("host all all 0.0.0.0/0 scram-sha-256\n")  # a real host: every client with the password
        chown_tree(data, user)
    run_as(
        user,
        [str(PG_BIN / "pg_ctl"), "-D", str(data), "-l", str(log), "-w", "-t", "60", "start"],
        check=True,
        capture_output=True,
    )
    pid = int((data / "postmaster.pid").read_text().split()[0])
    write_pid(s, "postgres", pid)
    psql = [str(PG_BIN / "psql"), "-h", str(sock), "-p", str(s.port("PG")), "-U", "postgres", "-v", "ON_ERROR_STOP=1", "-qtA"]
    # MLflow's stores, and the sweeps' Optuna studies (a stack made before sweeps existed gets that role on its next `up`)
    for role, key, databases in (
        ("mlflow", "TEAM_PG_PASSWORD", ("mlflow", "mlflow_auth")),
        ("optuna", "TEAM_OPTUNA_PASSWORD", ("optuna",)),
    ):
        if not s.values.get(key):  # `up` generates every secret; settings loaded otherwise may lack a later one
            continue
        exists = run_as(
            user, [*psql, "-c", f"select 1 from pg_roles where rolname='{role}'"], capture_output=True, text=True, check=True
        )
        if exists.stdout.strip() != "1":
            password = s[key].replace("'", "''")
            sql = f"CREATE ROLE {role} LOGIN PASSWORD '{password}'"
            run_as(user, psql, input=sql, text=True, capture_output=True, check=True)  # the password goes on stdin, not argv
            for db in databases:  # the owner's alone: no other role may even connect
                run_as(user, [*psql, "-c", f"CREATE DATABASE {db} OWNER {role}"], capture_output=True, check=True)
                run_as(user, [*psql, "-c", f"REVOKE CONNECT ON DATABASE {db} FROM PUBLIC"], capture_output=True, check=True)


def stop_postgres(s: Settings, mode: str = "fast") -> None:
    data, _ = pg_dirs(s)
    if (data / "postmaster.pid").exists():
        run_as(os_user(s), [str(PG_BIN / "pg_ctl"), "-D", str(data), "-m", mode, "-w", "-t", "60", "stop"], capture_output=True)
    write_pid(s, "postgres", None)


# ---------------------------------------------------------------- Swift (S3 API)


def swift_conf(s: Settings, user: str) -> dict[str, str]:
    etc, node = s.state / "swift" / "etc", s.state / "swift" / "node"
    host, base = s.host, s.port("S3")
    common = f"[DEFAULT]\nbind_ip = {host}\nuser = {user}\nswift_dir = {etc}\ndevices = {node}\nmount_check = false\nworkers = 1\nlog_level = WARNING\n"
    rest = (
        "\n[filter:healthcheck]\nuse = egg:swift#healthcheck\n\n[filter:recon]\nuse = egg:swift#recon\nrecon_cache_path = "
        + str(s.state / "swift" / "run")
    )
    return {
        "swift.conf": (
            f"[swift-hash]\nswift_hash_path_suffix = {secrets.token_hex(8)}\nswift_hash_path_prefix = {secrets.token_hex(8)}\n"
            "\n[storage-policy:0]\nname = Policy-0\ndefault = yes\n"
        ),
        "account-server.conf": f"{common}bind_port = {base + 1}\n\n[pipeline:main]\npipeline = healthcheck recon account-server\n\n"
        f"[app:account-server]\nuse = egg:swift#account\n{rest}\n",
        "container-server.conf": f"{common}bind_port = {base + 2}\n\n[pipeline:main]\npipeline = healthcheck recon container-server\n\n"
        f"[app:container-server]\nuse = egg:swift#container\n{rest}\n",
        "object-server.conf": f"{common}bind_port = {base + 3}\n\n[pipeline:main]\npipeline = healthcheck recon object-server\n\n"
        f"[app:object-server]\nuse = egg:swift#object\n{rest}\n",
        "proxy-server.conf": (
            f"[DEFAULT]\nbind_ip = {host}\nbind_port = {base}\nuser = {user}\nswift_dir = {etc}\nworkers = 1\nlog_level = WARNING\n\n"
            "[pipeline:main]\npipeline = catch_errors gatekeeper healthcheck proxy-logging listing_formats s3api tempauth "
            "copy slo dlo proxy-logging proxy-server\n\n"
            "[app:proxy-server]\nuse = egg:swift#proxy\naccount_autocreate = true\nallow_account_management = true\n\n"
            f"[filter:tempauth]\nuse = egg:swift#tempauth\nuser_{S3_ACCOUNT}_{S3_USER} = {s['TEAM_S3_SECRET']} .admin\n\n"
            "[filter:s3api]\nuse = egg:swift#s3api\nlocation = us-east-1\ns3_acl = false\n\n"
            "[filter:catch_errors]\nuse = egg:swift#catch_errors\n\n[filter:gatekeeper]\nuse = egg:swift#gatekeeper\n\n"
            "[filter:healthcheck]\nuse = egg:swift#healthcheck\n\n[filter:proxy-logging]\nuse = egg:swift#proxy_logging\n\n"
            "[filter:listing_formats]\nuse = egg:swift#listing_formats\n\n[filter:copy]\nuse = egg:swift#copy\n\n"
            "[filter:slo]\nuse = egg:swift#slo\n\n[filter:dlo]\nuse = egg:swift#dlo\n"
        ),
    }


def start_swift(s: Settings) -> None:
    # Swift runs as the caller (its code lives in the caller's venv, which the unprivileged user may not read)
    user = pwd.getpwuid(os.getuid()).pw_name
    etc, node, run = (s.state / "swift" / d for d in ("etc", "node", "run"))
    if not (etc / "object.ring.gz").exists():
        for d in (etc, node / "d1", run):
            d.mkdir(parents=True, exist_ok=True)
        for name, text in swift_conf(s, user).items():
            (etc / name).write_text(text)
            os.chmod(etc / name, 0o600)  # the proxy's holds the S3 secret
        builder = venv_bin("swift-ring-builder")
        for i, ring in enumerate(("account", "container", "object"), start=1):
            path = str(etc / f"{ring}.builder")
            subprocess.run([builder, path, "create", "8", "1", "1"], check=True, capture_output=True)
            subprocess.run([builder, path, "add", f"r1z1-{s.host}:{s.port('S3') + i}/d1", "100"], check=True, capture_output=True)
            subprocess.run([builder, path, "rebalance"], capture_output=True)  # exit 1 is a warning here
    for server in SWIFT_SERVERS:
        if alive(read_pids(s).get(f"swift-{server}", -1)):
            continue
        proc = popen_as(
            user,
            [venv_bin(f"swift-{server}-server"), str(etc / f"{server}-server.conf")],
            s.state / "logs" / f"swift-{server}.log",
        )
        write_pid(s, f"swift-{server}", proc.pid)
    for i, server in enumerate(("proxy", "account", "container", "object")):
        port = s.port("S3") + i
        wait_for(
            lambda p=port: urllib.request.urlopen(f"http://{s.host}:{p}/healthcheck", timeout=2).status == 200,
            f"swift {server} server on port {port}",
            60,
            s.state / "logs" / f"swift-{server}.log",
        )


def stop_swift(s: Settings) -> None:
    for server in SWIFT_SERVERS:
        pid = read_pids(s).get(f"swift-{server}")
        if pid:
            stop_group(pid)
            write_pid(s, f"swift-{server}", None)


def s3_client(s: Settings):
    import boto3
    from botocore.config import Config

    return boto3.client(
        "s3",
        endpoint_url=s.s3_endpoint,
        aws_access_key_id=s.s3_access_key,
        aws_secret_access_key=s["TEAM_S3_SECRET"],
        region_name="us-east-1",
        config=Config(s3={"addressing_style": "path"}, retries={"max_attempts": 2}),
    )


def ensure_bucket(s: Settings) -> None:
    client = s3_client(s)
    names = [b["Name"] for b in client.list_buckets().get("Buckets", [])]
    if s["TEAM_BUCKET"] not in names:
        client.create_bucket(Bucket=s["TEAM_BUCKET"])


# ---------------------------------------------------------------- mlflow server + basic-auth


def mlflow_env(s: Settings) -> dict[str, str]:
    ini = s.state / "mlflow" / "basic_auth.ini"
    ini.parent.mkdir(parents=True, exist_ok=True)
    ini.write_text(
        "[mlflow]\ndefault_permission = READ\n"
        f"database_uri = {s.pg_uri('mlflow_auth')}\n"
        f"admin_username = admin\nadmin_password = {s['TEAM_ADMIN_PASSWORD']}\n"
        "authorization_function = mlflow.server.auth:authenticate_request_basic_auth\n"
        # PBKDF2 on every request otherwise (a pyfunc log_model makes dozens); 60 s of staleness per worker
        "auth_cache_ttl_seconds = 60\n"
    )
    os.chmod(ini, 0o600)
    env = {k: v for k, v in os.environ.items() if not k.startswith(("MLFLOW_TRACKING_", "TEAM_"))}
    env.update(s.s3_env())
    env.update(
        {
            "MLFLOW_AUTH_CONFIG_PATH": str(ini),
            "MLFLOW_BACKEND_STORE_URI": s.pg_uri("mlflow"),  # in the env, not on the command line (ps shows argv)
            "MLFLOW_FLASK_SERVER_SECRET_KEY": s["TEAM_FLASK_SECRET"],
            "MLFLOW_SERVER_ENABLE_JOB_EXECUTION": "false",  # else a job runner with several workers (~2.5 GB)
            "PATH": f"{Path(sys.executable).parent}{os.pathsep}{os.environ.get('PATH', '')}",
        }
    )
    return env


def start_mlflow(s: Settings, timeout: float = 180) -> None:
    if alive(read_pids(s).get("mlflow", -1)):
        return
    cmd = [
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
    log = s.state / "logs" / "mlflow.log"
    proc = popen_as("root" if as_root() else os_user(s), cmd, log, env=mlflow_env(s))
    write_pid(s, "mlflow", proc.pid)
    wait_for(lambda: urllib.request.urlopen(f"{s.tracking_uri}/health", timeout=2).status == 200, "mlflow server", timeout, log)


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
    return AuthServiceClient(s.tracking_uri)


def ensure_users(s: Settings) -> str:
    """The accounts of USERS (created once; passwords kept in step with the settings) and their roles (ROLES).
    Returns what each was granted."""
    saved = {k: os.environ.get(k) for k in ("MLFLOW_TRACKING_USERNAME", "MLFLOW_TRACKING_PASSWORD")}
    try:
        auth = auth_client(s)
        for user in USERS:
            password = s[f"TEAM_{user.upper()}_PASSWORD"]
            try:
                auth.get_user(user)
                auth.update_user_password(user, password)
            except Exception:  # noqa: BLE001 - not there yet
                auth.create_user(user, password)
        try:
            return "; ".join(grant_role(auth, user, *ROLES[user]) for user in ROLES)
        except Exception as err:  # noqa: BLE001 - a server without roles: ci creates (and so manages) what it registers
            return f"no role support ({err}); ci manages what it creates"
    finally:
        for k, v in saved.items():
            if v is None:
                os.environ.pop(k, None)
            else:
                os.environ[k] = v


def grant_role(auth, user: str, role_name: str, description: str, permissions: dict[str, str]) -> str:
    """`user` holds role `role_name` with `permissions` (resource type -> permission on every resource '*')."""
    roles = {r.name: r for r in auth.list_roles("default")}
    role = roles.get(role_name) or auth.create_role("default", role_name, description)
    have = {(p.resource_type, p.resource_pattern) for p in auth.list_role_permissions(role.id)}
    for rtype, permission in permissions.items():
        if (rtype, "*") not in have:
            auth.add_role_permission(role.id, rtype, "*", permission)
    if role_name not in {r.name for r in auth.list_user_roles(user)}:
        auth.assign_role(user, role.id)
    return f"{user}: role {role_name} ({', '.join(f'{p} on {t}/*' for t, p in permissions.items())})"


# ---------------------------------------------------------------- the whole stack


def rss_mb(pids: list[int]) -> float:
    """Resident memory of these processes and all their descendants, in MB."""
    children: dict[int, list[int]] = {}
    for proc in Path("/proc").iterdir():
        if proc.name.isdigit():
            try:
                ppid = int((proc / "stat").read_text().rsplit(")", 1)[1].split()[1])
            except (OSError, IndexError, ValueError):
                continue
            children.setdefault(ppid, []).append(int(proc.name))
    seen, stack, total = set(), list(pids), 0
    while stack:
        pid = stack.pop()
        if pid in seen:
            continue
        seen.add(pid)
        stack.extend(children.get(pid, []))
        try:
            for line in Path(f"/proc/{pid}/status").read_text().splitlines():
                if line.startswith("VmRSS:"):
                    total += int(line.split()[1])
        except OSError:
            pass
    return total / 1024


def up(s: Settings, log=print) -> dict:
    for name in ("PG", "S3", "MLFLOW"):
        if port_open(s.host, s.port(name)) and not read_pids(s):
            raise StackError(f"port {s.port(name)} on {s.host} is taken (TEAM_{name}_PORT): stop what uses it or choose another")
    (s.state / "logs").mkdir(parents=True, exist_ok=True)
    if as_root():
        os_user(s)
        os.chmod(s.state, 0o755)
    times = {}
    started = time.perf_counter()
    try:
        for name, step in (
            ("postgres", start_postgres),
            ("swift", start_swift),
            ("bucket", ensure_bucket),
            ("mlflow", start_mlflow),
        ):
            t = time.perf_counter()
            step(s)
            times[name] = round(time.perf_counter() - t, 1)
            log(f"team: {name} up ({times[name]} s)")
        grant = ensure_users(s)
    except BaseException:
        down(s, log=lambda *_: None)
        raise
    total = round(time.perf_counter() - started, 1)
    pids = read_pids(s)
    memory = {name: round(rss_mb([pid]), 1) for name, pid in pids.items()}
    record = {
        "started_at": time.strftime("%Y-%m-%dT%H:%M:%S%z"),
        "start_seconds": total,
        "step_seconds": times,
        "rss_mb": memory,
        "rss_mb_total": round(sum(memory.values()), 1),
        "grants": grant,
        "tracking_uri": s.tracking_uri,
        "s3_endpoint": s.s3_endpoint,
    }
    (s.state / "stack.json").write_text(json.dumps(record, indent=1))
    log(
        f"team: stack up in {total} s, {record['rss_mb_total']:.0f} MB resident ({', '.join(f'{k} {v:.0f}' for k, v in memory.items())}); {grant}"
    )
    return record


def down(s: Settings, log=print) -> None:
    stop_mlflow(s)
    stop_swift(s)
    stop_postgres(s)
    left = {name: pid for name, pid in read_pids(s).items() if alive(pid)}
    for pid in left.values():
        stop_group(pid)
    if pids_file(s).exists():
        pids_file(s).unlink()
    log("team: stack down")


def status(s: Settings) -> dict[str, bool]:
    return {name: alive(pid) for name, pid in read_pids(s).items()}


def exports(s: Settings, user: str = "ci") -> str:
    """The client's variables; the writing accounts also get the sweeps' Optuna storage (MNISTGEN_OPTUNA_STORAGE)."""
    env = {
        **s.client_env(user),
        **({"MNISTGEN_OPTUNA_STORAGE": s.optuna_storage} if user != "reader" and s.optuna_storage else {}),
    }
    return "\n".join(f"export {k}={v}" for k, v in env.items())


def dvc_remote_env(s: Settings) -> dict[str, str]:
    """DVC reads the remote's credentials from these (or from .dvc/config.local)."""
    return {"AWS_ACCESS_KEY_ID": s.s3_access_key, "AWS_SECRET_ACCESS_KEY": s["TEAM_S3_SECRET"]}
