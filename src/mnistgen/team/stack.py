"""The team stack: PostgreSQL, OpenStack Swift with s3api, `mlflow server` with basic-auth.

Every setting is a TEAM_* variable, read from the environment first, then from the env file
(~/.config/mnistgen/team.env; TEAM_ENV_FILE names another). The first `up` writes the file, 0600,
with random secrets when it does not exist. Nothing secret is ever written inside the repo's
tracked files, on a process's command line, or to stdout. docs/security.md is the threat model.

| setting | default | what |
| --- | --- | --- |
| TEAM_HOST | 127.0.0.1 | where PostgreSQL, the S3 proxy and mlflow server listen; any other address turns TLS on |
| TEAM_PG_PORT | 55432 | PostgreSQL |
| TEAM_S3_PORT | 58080 | Swift proxy (S3 API); the account/container/object servers use the next three ports, on 127.0.0.1 |
| TEAM_MLFLOW_PORT | 55000 | mlflow server |
| TEAM_STATE_DIR | /var/tmp/mnistgen-team | data, configs, logs, pids: 0700, owned by the service user |
| TEAM_BUCKET | mnistgen | MLflow's artifacts; the DVC remote is the bucket `<TEAM_BUCKET>-dvc` |
| TEAM_OS_USER | mnistgen-team | the unprivileged system user every service runs as when `up` runs as root |
| TEAM_MLFLOW_WORKERS | 2 | uvicorn workers of mlflow server |
| TEAM_*_PASSWORD, TEAM_*_SECRET, TEAM_FLASK_SECRET, TEAM_SWIFT_FERNET_KEY | generated | secrets (SECRET_KEYS) |
"""

from __future__ import annotations

import datetime
import functools
import ipaddress
import json
import os
import pwd
import secrets
import shutil
import signal
import socket
import ssl
import subprocess
import sys
import tempfile
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
# One credential per role and per service (docs/security.md): MLflow accounts, PostgreSQL roles, S3 keys.
SECRET_KEYS = (
    "TEAM_PG_PASSWORD",  # PostgreSQL role mlflow (owns databases mlflow and mlflow_auth)
    "TEAM_S3_SECRET",  # S3 key mnistgen:admin (.admin: creates the buckets and sets their ACLs; no service uses it)
    "TEAM_ADMIN_PASSWORD",
    "TEAM_CI_PASSWORD",
    "TEAM_READER_PASSWORD",
    "TEAM_FLASK_SECRET",
    "TEAM_OPTUNA_PASSWORD",  # PostgreSQL role optuna (owns database optuna)
    "TEAM_TRAINER_PASSWORD",
    "TEAM_PG_SUPERUSER_PASSWORD",  # PostgreSQL role postgres: only `team up` uses it, through a 0600 passfile
    "TEAM_S3_MLFLOW_SECRET",  # S3 key mnistgen:mlflow: the mlflow server's, MLflow's artifact bucket only
    "TEAM_S3_CI_SECRET",  # S3 keys of the DVC remote: ci and trainer write it, reader reads it
    "TEAM_S3_TRAINER_SECRET",
    "TEAM_S3_READER_SECRET",
    "TEAM_SWIFT_FERNET_KEY",  # tempauth's token key (no memcache)
)
# Secrets added after stacks were in use: `up` generates them, but loading does not require them, so `down`, `env`
# and `status` keep working on an env file written before them (the next `up` adds them and what they guard).
LATER_SECRET_KEYS = SECRET_KEYS[6:]
USERS = ("ci", "trainer", "reader")  # MLflow accounts besides admin (docs/team.md says what each may do)
REGISTRY_WRITERS = ("admin", "ci")  # the only accounts that may create registered models or move aliases
RUN_WRITERS = ("admin", "ci", "trainer")  # the only ones that may create experiments and the like (server_auth.py)
# Each account's grants through a role of the default workspace (reader has the server's default_permission, READ):
# ci registers versions and moves aliases of any model (EDIT: no delete, no permission changes); trainer logs runs.
ROLES = {
    "ci": ("ci-writer", "runs, versions and aliases", {"experiment": "EDIT", "registered_model": "EDIT"}),
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
S3_ACCOUNT = "mnistgen"  # tempauth: an S3 access key is "account:user"
S3_KEYS = {  # S3 user -> the setting holding its secret
    "admin": "TEAM_S3_SECRET",
    "mlflow": "TEAM_S3_MLFLOW_SECRET",
    "ci": "TEAM_S3_CI_SECRET",
    "trainer": "TEAM_S3_TRAINER_SECRET",
    "reader": "TEAM_S3_READER_SECRET",
}
SWIFT_SERVERS = ("account", "container", "object", "proxy")
SERVICES = ("postgres", *(f"swift-{name}" for name in SWIFT_SERVERS), "mlflow")
LOOPBACK = ("127.0.0.1", "localhost", "::1")  # only these count as loopback: 127.0.0.2 gets TLS like a real address


class StackError(RuntimeError):
    pass


def new_secret(key: str = "") -> str:
    """A random secret that never starts with '-' (a command line would read it as an option)."""
    if key == "TEAM_SWIFT_FERNET_KEY":
        from cryptography.fernet import Fernet

        return Fernet.generate_key().decode()
    return "k" + secrets.token_urlsafe(18)


def write_private(path: Path, text: str, owner: str | None = None) -> None:
    """Write `path` 0600 from its first byte (no moment world-readable), atomically, optionally owned by `owner`."""
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(dir=path.parent, prefix=f".{path.name}.")  # mkstemp creates 0600
    try:
        with os.fdopen(fd, "w") as out:
            out.write(text)
        if owner and as_root():
            shutil.chown(tmp, owner)
        os.replace(tmp, path)
    except BaseException:
        Path(tmp).unlink(missing_ok=True)
        raise


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
        if from_file and env_file.stat().st_mode & 0o077:
            raise StackError(f"{env_file} holds secrets but others may read it: chmod 600 {env_file}")
        if create and not all(k in from_file or k in os.environ for k in SECRET_KEYS):
            missing = {k: new_secret(k) for k in SECRET_KEYS if k not in from_file and k not in os.environ}
            old = (
                env_file.read_text() if env_file.exists() else "# team-mode secrets, made by `mnistgen team up` (never commit)\n"
            )
            write_private(env_file, old + "".join(f"{k}={v}\n" for k, v in missing.items()))
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

    @property
    def tls(self) -> bool:
        """Off loopback, every server speaks TLS with the stack's own CA."""
        return self.host not in LOOPBACK

    def port(self, name: str) -> int:
        return int(self[f"TEAM_{name}_PORT"])

    @property
    def state(self) -> Path:
        return Path(self["TEAM_STATE_DIR"])

    @property
    def scheme(self) -> str:
        return "https" if self.tls else "http"

    @property
    def tracking_uri(self) -> str:
        return f"{self.scheme}://{self.host}:{self.port('MLFLOW')}"

    @property
    def s3_endpoint(self) -> str:
        return f"{self.scheme}://{self.host}:{self.port('S3')}"

    @property
    def ca_file(self) -> Path:
        """The stack's CA certificate, public: clients trust the servers through it (TLS only)."""
        return Path(f"{self.env_file}.ca.pem")

    @property
    def dvc_bucket(self) -> str:
        return f"{self['TEAM_BUCKET']}-dvc"

    def s3_access_key(self, user: str) -> str:
        return f"{S3_ACCOUNT}:{user}"

    def s3_secret(self, user: str) -> str:
        if not self.values.get(S3_KEYS[user]):
            raise StackError(f"no S3 key for {user} in {self.env_file}: run `mnistgen team up` once to add it")
        return self[S3_KEYS[user]]

    def pg_socket_uri(self, database: str) -> str:
        """The mlflow server's own store: through PostgreSQL's unix socket, which only the service user can reach."""
        return f"postgresql://mlflow:{self['TEAM_PG_PASSWORD']}@/{database}?host={pg_dirs(self)[1]}&port={self.port('PG')}"

    @property
    def optuna_storage(self) -> str | None:
        """The sweeps' Optuna storage (python -m mnistgen.sweep): its own role and database, over TCP (TLS off loopback).
        None for a stack made before sweeps existed, until its next `up`."""
        if not self.values.get("TEAM_OPTUNA_PASSWORD"):
            return None
        tls = f"?sslmode=verify-full&sslrootcert={self.ca_file}" if self.tls else ""
        return f"postgresql+psycopg://optuna:{self['TEAM_OPTUNA_PASSWORD']}@{self.host}:{self.port('PG')}/optuna{tls}"

    def client_env(self, user: str = "ci") -> dict[str, str]:
        """What a teammate (or CI) sets: the server's address, one MLflow account, and the CA off loopback."""
        if not self.values.get(f"TEAM_{user.upper()}_PASSWORD"):
            raise StackError(f"no password for account {user} in {self.env_file}: run `mnistgen team up` once to add it")
        return {
            "MLFLOW_TRACKING_URI": self.tracking_uri,
            "MLFLOW_TRACKING_USERNAME": user,
            "MLFLOW_TRACKING_PASSWORD": self[f"TEAM_{user.upper()}_PASSWORD"],
            # artifacts stream through the server (its permission checks, one TLS trust), not by presigned S3 URLs
            "MLFLOW_ENABLE_PROXY_MULTIPART_DOWNLOAD": "false",
            **self.ca_env(),
        }

    def ca_env(self) -> dict[str, str]:
        return {"MLFLOW_TRACKING_SERVER_CERT_PATH": str(self.ca_file), "AWS_CA_BUNDLE": str(self.ca_file)} if self.tls else {}

    def s3_env(self, user: str) -> dict[str, str]:
        """Object-store credentials of one S3 user (the mlflow server's, or a DVC user's)."""
        return {
            "AWS_ACCESS_KEY_ID": self.s3_access_key(user),
            "AWS_SECRET_ACCESS_KEY": self.s3_secret(user),
            "AWS_DEFAULT_REGION": "us-east-1",
            **self.ca_env(),
        }


# ---------------------------------------------------------------- processes


def as_root() -> bool:
    return os.geteuid() == 0


def os_user(s: Settings) -> str:
    """The user the servers run as: the caller, or (as root) an unprivileged system account made once."""
    if not as_root():
        return pwd.getpwuid(os.getuid()).pw_name
    name = s["TEAM_OS_USER"]
    try:
        if pwd.getpwnam(name).pw_uid == 0:
            raise StackError(f"TEAM_OS_USER {name} is root: name an unprivileged user")
    except KeyError:
        subprocess.run(["useradd", "--system", "--no-create-home", "--shell", "/usr/sbin/nologin", name], check=True)
    return name


def chown_tree(path: Path, user: str) -> None:
    if as_root():
        subprocess.run(["chown", "-R", f"{user}:", str(path)], check=True)


def prepare_state(s: Settings, user: str) -> None:
    """The state folder: created 0700 and owned by the service user. An existing one must belong to that user (or,
    from a stack made before, to root); a symlink or another user's folder is refused: someone could have planted it."""
    state = s.state
    if not state.exists():
        state.parent.mkdir(parents=True, exist_ok=True)
        state.mkdir(mode=0o700)
    info = state.lstat()
    owners = {pwd.getpwnam(user).pw_uid, os.getuid()}
    if state.is_symlink() or not state.is_dir() or info.st_uid not in owners:
        raise StackError(f"TEAM_STATE_DIR {state} is a symlink or belongs to another user: refusing to use it")
    chown_tree(state, user)
    os.chmod(state, 0o700)
    (state / "logs").mkdir(exist_ok=True)


def service_python(s: Settings, user: str) -> str:
    return _service_python(str(s.state), user)


@functools.cache  # one probe per process: importing mlflow as the service user takes seconds
def _service_python(state: str, user: str) -> str:
    """The interpreter the servers run on. As root, the service user may not read this venv's interpreter (pyenv keeps
    it under /root): then a venv of the system's Python of the same version, in the state folder, that imports this
    venv's packages (a .pth file). Fails closed, naming the path, when the service user can run neither."""
    if not as_root():
        return sys.executable

    def runs(python: str) -> str:
        """'' when `user` can import the servers with `python`, else why not."""
        probe = run_as(
            user, [python, "-c", "import swift, mlflow, psycopg, mnistgen.team.server_auth"], capture_output=True, text=True
        )
        return "" if probe.returncode == 0 else (probe.stderr.strip().splitlines() or [f"exit {probe.returncode}"])[-1]

    why = runs(sys.executable)
    if not why:
        return sys.executable
    version = f"python{sys.version_info.major}.{sys.version_info.minor}"
    own = Path(state) / "venv" / "bin" / "python"
    system = next((p for p in (f"/usr/bin/{version}", f"/usr/local/bin/{version}") if Path(p).exists()), None)
    if not own.exists() and system:
        made = subprocess.run([system, "-m", "venv", "--without-pip", str(own.parents[1])], capture_output=True, text=True)
        if made.returncode == 0:
            site_packages = next(p for p in sys.path if p.startswith(sys.prefix) and p.endswith("site-packages"))
            pth = own.parents[1] / "lib" / version / "site-packages" / "mnistgen-team.pth"
            pth.write_text(f"import site; site.addsitedir({site_packages!r})\n")
            chown_tree(own.parents[1], user)
    if own.exists():
        why = runs(str(own))
        if not why:
            return str(own)
    raise StackError(
        f"the service user {user} cannot run the team servers from {sys.prefix} ({why}): make the venv and the checkout "
        f"readable to it (o+rx on their folders), or install {version} where it can run it"
    )


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


def start_time(pid: int) -> int | None:
    """The process's start time in clock ticks since boot: a pid and its start time name one process for good."""
    try:
        return int(Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()[19])
    except (OSError, IndexError, ValueError):
        return None


def read_pids(s: Settings) -> dict[str, int]:
    """The processes this stack started and that still run: a recycled pid (another program now) is not ours."""
    try:
        recorded = json.loads(pids_file(s).read_text())
    except (OSError, json.JSONDecodeError):
        return {}
    ours = {}
    for name, entry in recorded.items():
        pid, started = entry if isinstance(entry, list) else (entry, None)  # a bare pid: written before start times
        if alive(pid) and (started is None or start_time(pid) == started):
            ours[name] = pid
    return ours


def write_pid(s: Settings, name: str, pid: int | None) -> None:
    try:
        recorded = json.loads(pids_file(s).read_text())
    except (OSError, json.JSONDecodeError):
        recorded = {}
    if pid is None:
        recorded.pop(name, None)
    else:
        recorded[name] = [pid, start_time(pid)]
    pids_file(s).write_text(json.dumps(recorded, indent=1))


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


def wait_for(check, what: str, timeout: float, log: Path | None = None, proc: subprocess.Popen | None = None) -> None:
    """Poll `check` until it holds; give up at the deadline, or at once when the server's process `proc` exited."""
    deadline = time.time() + timeout
    last = None
    while time.time() < deadline and (proc is None or proc.poll() is None):
        try:
            if check():
                return
        except Exception as err:  # noqa: BLE001 - keep trying until the deadline
            last = err
        time.sleep(0.3)
    tail = log.read_text(errors="replace")[-2000:] if log and log.exists() else ""
    why = (
        f"exited with {proc.returncode}"
        if proc is not None and proc.poll() is not None
        else f"did not come up in {timeout:.0f} s"
    )
    raise StackError(f"{what} {why} ({last}){chr(10) + tail if tail else ''}")


def port_open(host: str, port: int) -> bool:
    with socket.socket(socket.AF_INET6 if ":" in host else socket.AF_INET) as sock:
        sock.settimeout(1)
        return sock.connect_ex((host, port)) == 0


def venv_bin(name: str) -> str:
    found = Path(sys.executable).with_name(name)
    return str(found) if found.exists() else (shutil.which(name) or name)


def https_get(s: Settings, url: str, timeout: float = 2) -> int:
    context = ssl.create_default_context(cafile=str(s.ca_file)) if url.startswith("https") else None
    with urllib.request.urlopen(url, timeout=timeout, context=context) as response:  # noqa: S310 - our own servers
        return response.status


# ---------------------------------------------------------------- TLS (off loopback)


def tls_dir(s: Settings) -> Path:
    return s.state / "tls"


def ensure_certificates(s: Settings, user: str) -> None:
    """A CA of this stack and a server certificate for TEAM_HOST, made once with the cryptography package. The CA's
    key stays in the state folder; its certificate is copied beside the env file for clients (ca_file)."""
    from cryptography import x509
    from cryptography.hazmat.primitives import hashes, serialization
    from cryptography.hazmat.primitives.asymmetric import ec
    from cryptography.x509.oid import NameOID

    folder = tls_dir(s)
    if not (folder / "server.pem").exists():
        folder.mkdir(mode=0o700, exist_ok=True)
        now = datetime.datetime.now(datetime.UTC)
        ca_key, server_key = ec.generate_private_key(ec.SECP256R1()), ec.generate_private_key(ec.SECP256R1())
        ca_name = x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, f"mnistgen team CA ({s.host})")])
        ca = (
            x509.CertificateBuilder()
            .subject_name(ca_name)
            .issuer_name(ca_name)
            .public_key(ca_key.public_key())
            .serial_number(x509.random_serial_number())
            .not_valid_before(now)
            .not_valid_after(now + datetime.timedelta(days=3650))
            .add_extension(x509.BasicConstraints(ca=True, path_length=0), critical=True)
            .add_extension(x509.KeyUsage(False, False, False, False, False, True, True, False, False), critical=True)
            .sign(ca_key, hashes.SHA256())
        )
        names: list[x509.GeneralName] = [x509.DNSName("localhost")]
        try:
            names.append(x509.IPAddress(ipaddress.ip_address(s.host)))
        except ValueError:
            names.append(x509.DNSName(s.host))
        server = (
            x509.CertificateBuilder()
            .subject_name(x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, s.host)]))
            .issuer_name(ca_name)
            .public_key(server_key.public_key())
            .serial_number(x509.random_serial_number())
            .not_valid_before(now)
            .not_valid_after(now + datetime.timedelta(days=825))
            .add_extension(x509.SubjectAlternativeName(names), critical=False)
            .add_extension(x509.ExtendedKeyUsage([x509.oid.ExtendedKeyUsageOID.SERVER_AUTH]), critical=False)
            .sign(ca_key, hashes.SHA256())
        )
        pem = serialization.Encoding.PEM

        def key_pem(key) -> str:
            return key.private_bytes(pem, serialization.PrivateFormat.PKCS8, serialization.NoEncryption()).decode()

        write_private(folder / "ca.key", key_pem(ca_key), user)
        write_private(folder / "server.key", key_pem(server_key), user)
        write_private(folder / "ca.pem", ca.public_bytes(pem).decode(), user)
        write_private(folder / "server.pem", server.public_bytes(pem).decode(), user)
        chown_tree(folder, user)
    s.ca_file.parent.mkdir(parents=True, exist_ok=True)
    shutil.copyfile(folder / "ca.pem", s.ca_file)
    os.chmod(s.ca_file, 0o644)  # a certificate is public


# ---------------------------------------------------------------- PostgreSQL


def pg_dirs(s: Settings) -> tuple[Path, Path]:
    return s.state / "pg" / "data", s.state / "pg" / "socket"


def pg_hba(s: Settings) -> str:
    """Every connection gives a password (scram-sha-256), the unix socket's too; off loopback only over TLS."""
    if not s.tls:
        return "local all all scram-sha-256\nhost all all 127.0.0.1/32 scram-sha-256\n"
    return "local all all scram-sha-256\nhostssl all all 0.0.0.0/0 scram-sha-256\nhostssl all all ::/0 scram-sha-256\n"


def pg_conf(s: Settings) -> str:
    _, sock = pg_dirs(s)
    text = (
        f"listen_addresses = '{s.host}'\nport = {s.port('PG')}\nunix_socket_directories = '{sock}'\n"
        "unix_socket_permissions = 0700\nmax_connections = 100\nshared_buffers = 64MB\npassword_encryption = scram-sha-256\n"
    )
    if s.tls:
        text += f"ssl = on\nssl_cert_file = '{tls_dir(s) / 'server.pem'}'\nssl_key_file = '{tls_dir(s) / 'server.key'}'\n"
    return text


def pg_running(s: Settings, user: str) -> bool:
    data, _ = pg_dirs(s)
    return (data / "PG_VERSION").exists() and run_as(
        user, [str(PG_BIN / "pg_ctl"), "-D", str(data), "status"], capture_output=True
    ).returncode == 0


def psql(s: Settings, user: str, sql: str, database: str = "postgres") -> str:
    """Run `sql` as the superuser over the unix socket; its password comes from a 0600 passfile, the SQL on stdin."""
    _, sock = pg_dirs(s)
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
    data, sock = pg_dirs(s)
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
    data, _ = pg_dirs(s)
    if "postgres" in read_pids(s):  # ours: the pid pg_ctl wrote is the one we recorded
        run_as(os_user(s), [str(PG_BIN / "pg_ctl"), "-D", str(data), "-m", "fast", "-w", "-t", "60", "stop"], capture_output=True)
    write_pid(s, "postgres", None)


# ---------------------------------------------------------------- Swift (S3 API)


def swift_conf(s: Settings, user: str) -> dict[str, str]:
    """The servers' configs, rewritten at every `up` (swift.conf, whose hash prefix names every object, only once).
    The back ends listen on 127.0.0.1 whatever TEAM_HOST is; only the proxy, which authenticates, listens there."""
    etc, node = s.state / "swift" / "etc", s.state / "swift" / "node"
    base = s.port("S3")
    common = f"[DEFAULT]\nbind_ip = 127.0.0.1\nuser = {user}\nswift_dir = {etc}\ndevices = {node}\nmount_check = false\nworkers = 1\nlog_level = WARNING\n"
    rest = (
        "\n[filter:healthcheck]\nuse = egg:swift#healthcheck\n\n[filter:recon]\nuse = egg:swift#recon\nrecon_cache_path = "
        + str(s.state / "swift" / "run")
    )
    tls = f"cert_file = {tls_dir(s) / 'server.pem'}\nkey_file = {tls_dir(s) / 'server.key'}\n" if s.tls else ""
    users = "".join(f"user_{S3_ACCOUNT}_{name} = {s.s3_secret(name)}{' .admin' if name == 'admin' else ''}\n" for name in S3_KEYS)
    confs = {
        f"{name}-server.conf": f"{common}bind_port = {base + i}\n\n[pipeline:main]\npipeline = healthcheck recon {name}-server\n\n"
        f"[app:{name}-server]\nuse = egg:swift#{name}\n{rest}\n"
        for i, name in enumerate(("account", "container", "object"), start=1)
    }
    confs["proxy-server.conf"] = (
        f"[DEFAULT]\nbind_ip = {s.host}\nbind_port = {base}\nuser = {user}\nswift_dir = {etc}\nworkers = 1\nlog_level = WARNING\n{tls}\n"
        "[pipeline:main]\npipeline = catch_errors gatekeeper healthcheck proxy-logging listing_formats s3api tempauth "
        "copy slo dlo proxy-logging proxy-server\n\n"
        "[app:proxy-server]\nuse = egg:swift#proxy\naccount_autocreate = true\nallow_account_management = false\n\n"
        f"[filter:tempauth]\nuse = egg:swift#tempauth\n{users}"
        f"fernet_key_1 = {s['TEAM_SWIFT_FERNET_KEY']}\nactive_fernet_key_id = 1\ntoken_life = 600\n\n"
        "[filter:s3api]\nuse = egg:swift#s3api\nlocation = us-east-1\ns3_acl = false\n\n"
        "[filter:catch_errors]\nuse = egg:swift#catch_errors\n\n[filter:gatekeeper]\nuse = egg:swift#gatekeeper\n\n"
        "[filter:healthcheck]\nuse = egg:swift#healthcheck\n\n[filter:proxy-logging]\nuse = egg:swift#proxy_logging\n\n"
        "[filter:listing_formats]\nuse = egg:swift#listing_formats\n\n[filter:copy]\nuse = egg:swift#copy\n\n"
        "[filter:slo]\nuse = egg:swift#slo\n\n[filter:dlo]\nuse = egg:swift#dlo\n"
    )
    return confs


def start_swift(s: Settings, user: str) -> None:
    python = service_python(s, user)
    etc, node, run = (s.state / "swift" / d for d in ("etc", "node", "run"))
    for d in (etc, node / "d1", run):
        d.mkdir(parents=True, exist_ok=True)
    if not (etc / "swift.conf").exists():
        suffix, prefix = secrets.token_hex(8), secrets.token_hex(8)
        write_private(
            etc / "swift.conf",
            f"[swift-hash]\nswift_hash_path_suffix = {suffix}\nswift_hash_path_prefix = {prefix}\n\n[storage-policy:0]\nname = Policy-0\ndefault = yes\n",
        )
    for name, text in swift_conf(s, user).items():
        write_private(etc / name, text)  # the proxy's holds every S3 secret
    if not (etc / "object.ring.gz").exists():
        builder = venv_bin("swift-ring-builder")
        for i, ring in enumerate(("account", "container", "object"), start=1):
            path = str(etc / f"{ring}.builder")
            subprocess.run([builder, path, "create", "8", "1", "1"], check=True, capture_output=True)
            subprocess.run(
                [builder, path, "add", f"r1z1-127.0.0.1:{s.port('S3') + i}/d1", "100"], check=True, capture_output=True
            )
            subprocess.run([builder, path, "rebalance"], capture_output=True)  # exit 1 is a warning here
    chown_tree(s.state / "swift", user)
    running = read_pids(s)
    for server in SWIFT_SERVERS:
        if f"swift-{server}" in running:
            continue
        proc = popen_as(
            user,
            [python, venv_bin(f"swift-{server}-server"), str(etc / f"{server}-server.conf")],
            s.state / "logs" / f"swift-{server}.log",
        )
        write_pid(s, f"swift-{server}", proc.pid)
    for i, server in enumerate(("proxy", "account", "container", "object")):
        port = s.port("S3") + i
        url = f"{s.s3_endpoint}/healthcheck" if server == "proxy" else f"http://127.0.0.1:{port}/healthcheck"
        wait_for(
            lambda u=url: https_get(s, u) == 200,
            f"swift {server} server on port {port}",
            60,
            s.state / "logs" / f"swift-{server}.log",
        )


def stop_swift(s: Settings) -> None:
    running = read_pids(s)
    for server in SWIFT_SERVERS:
        if f"swift-{server}" in running:
            stop_group(running[f"swift-{server}"])
        write_pid(s, f"swift-{server}", None)


def swift_request(s: Settings, method: str, path: str, headers: dict[str, str] | None = None) -> int:
    """A Swift API request as the S3 admin (tempauth token: fernet, no memcache)."""
    context = ssl.create_default_context(cafile=str(s.ca_file)) if s.tls else None
    auth = urllib.request.Request(
        f"{s.s3_endpoint}/auth/v1.0", headers={"X-Auth-User": s.s3_access_key("admin"), "X-Auth-Key": s.s3_secret("admin")}
    )
    with urllib.request.urlopen(auth, timeout=10, context=context) as response:  # noqa: S310 - our own proxy
        storage, token = response.headers["X-Storage-Url"], response.headers["X-Auth-Token"]
    storage = f"{s.s3_endpoint}/{storage.split('/', 3)[3]}"  # the proxy answers with its bind address; keep our scheme
    request = urllib.request.Request(f"{storage}/{path}", method=method, headers={"X-Auth-Token": token, **(headers or {})})
    with urllib.request.urlopen(request, timeout=10, context=context) as response:  # noqa: S310
        return response.status


def bucket_acls(s: Settings) -> dict[str, tuple[list[str], list[str]]]:
    """Bucket -> (who reads, who writes). MLflow's artifacts: the mlflow server's key alone (users go through MLflow's
    permissions); the DVC remote: ci and trainer push, reader pulls. `<bucket>+segments` holds multipart uploads."""
    dvc = (["ci", "trainer", "reader"], ["ci", "trainer"])
    acls = {s["TEAM_BUCKET"]: (["mlflow"], ["mlflow"]), s.dvc_bucket: dvc}
    return {**acls, **{f"{bucket}+segments": acl for bucket, acl in acls.items()}}


def ensure_buckets(s: Settings) -> None:
    for bucket, (readers, writers) in bucket_acls(s).items():
        acl = {
            "X-Container-Read": ",".join(s.s3_access_key(u) for u in readers),
            "X-Container-Write": ",".join(s.s3_access_key(u) for u in writers),
        }
        try:
            swift_request(s, "PUT", bucket, acl)  # creates it, or sets the ACLs of the one there
        except urllib.error.HTTPError as err:
            raise StackError(f"cannot create bucket {bucket} or set its ACLs ({err.code} {err.reason})") from err


# ---------------------------------------------------------------- mlflow server + basic-auth


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
        env["AWS_CA_BUNDLE"] = str(tls_dir(s) / "ca.pem")
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
        cmd += ["--uvicorn-opts", f"--ssl-certfile {tls_dir(s) / 'server.pem'} --ssl-keyfile {tls_dir(s) / 'server.key'}"]
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


def healthy(s: Settings) -> bool:
    try:
        return https_get(s, f"{s.tracking_uri}/health") == 200 and https_get(s, f"{s.s3_endpoint}/healthcheck") == 200
    except (OSError, urllib.error.URLError):
        return False


def up(s: Settings, log=print) -> dict:
    """Start what is not running. On a stack that is fully up this changes nothing and says so."""
    user = os_user(s)
    prepare_state(s, user)
    running = read_pids(s)
    if all(name in running for name in SERVICES) and healthy(s):
        log(f"team: stack already up ({s.tracking_uri}); nothing changed")
        return json.loads((s.state / "stack.json").read_text())
    for name, service in (("PG", "postgres"), ("S3", "swift-proxy"), ("MLFLOW", "mlflow")):
        if service not in running and port_open(s.host, s.port(name)):
            raise StackError(f"port {s.port(name)} on {s.host} is taken (TEAM_{name}_PORT): stop what uses it or choose another")
    service_python(s, user)  # fails closed before anything starts
    times = {}
    started = time.perf_counter()
    try:
        steps = [
            ("postgres", start_postgres),
            ("swift", start_swift),
            ("buckets", lambda s, _: ensure_buckets(s)),
            ("mlflow", start_mlflow),
        ]
        if s.tls:
            steps.insert(0, ("certificates", ensure_certificates))
        for name, step in steps:
            t = time.perf_counter()
            step(s, user)
            times[name] = round(time.perf_counter() - t, 1)
            log(f"team: {name} up ({times[name]} s)")
        grant = ensure_users(s)
    except BaseException:
        if not running:  # we started everything: leave nothing half up. Else what ran before keeps running.
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
        "service_user": user,
        "tls": s.tls,
        "tracking_uri": s.tracking_uri,
        "s3_endpoint": s.s3_endpoint,
    }
    (s.state / "stack.json").write_text(json.dumps(record, indent=1))
    log(
        f"team: stack up in {total} s, {record['rss_mb_total']:.0f} MB resident ({', '.join(f'{k} {v:.0f}' for k, v in memory.items())}); {grant}"
    )
    return record


def down(s: Settings, log=print) -> None:
    """Stop what this stack started (pids recorded with their start times), and nothing else."""
    if not s.state.is_dir():
        log("team: no stack here")
        return
    stop_mlflow(s)
    stop_swift(s)
    stop_postgres(s)
    for pid in read_pids(s).values():
        stop_group(pid)
    pids_file(s).unlink(missing_ok=True)
    log("team: stack down")


def restart(s: Settings, log=print) -> dict:
    down(s, log)
    return up(s, log)


def status(s: Settings) -> dict[str, bool]:
    running = read_pids(s) if s.state.is_dir() else {}
    return {name: name in running for name in SERVICES}


def exports(s: Settings, user: str = "ci") -> str:
    """The client's variables; the writing accounts also get the sweeps' Optuna storage (MNISTGEN_OPTUNA_STORAGE)."""
    env = {
        **s.client_env(user),
        **({"MNISTGEN_OPTUNA_STORAGE": s.optuna_storage} if user != "reader" and s.optuna_storage else {}),
    }
    return "\n".join(f"export {k}={v}" for k, v in env.items())


def dvc_remote_config(s: Settings, user: str) -> dict[str, str]:
    """Remote 'team' of one user: the DVC bucket with that user's S3 key (admin has none: it is no DVC user)."""
    if user not in ("ci", "trainer", "reader"):
        raise StackError(f"no DVC key for {user}: the DVC remote's keys belong to ci, trainer and reader")
    config = {
        "url": f"s3://{s.dvc_bucket}",
        "endpointurl": s.s3_endpoint,
        "access_key_id": s.s3_access_key(user),
        "secret_access_key": s.s3_secret(user),
    }
    if s.tls:
        config["ssl_verify"] = str(s.ca_file)
    return config
