"""Team mode's settings: every TEAM_* variable, its secrets, and what a client needs to reach the stack.

Every setting is read from the environment first, then from the env file (~/.config/mnistgen/team.env;
TEAM_ENV_FILE names another). The first `up` writes the file, 0600, with random secrets when it does not exist.
Nothing secret is ever written inside the repo's tracked files, on a process's command line, or to stdout.
docs/security.md is the threat model.

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
| TEAM_PG_BIN | the newest /usr/lib/postgresql/*/bin | PostgreSQL's programs |
| TEAM_*_PASSWORD, TEAM_*_SECRET, TEAM_FLASK_SECRET, TEAM_SWIFT_FERNET_KEY | generated | secrets (SECRET_KEYS) |
"""

from __future__ import annotations

import os
import secrets
import shlex
from dataclasses import dataclass
from pathlib import Path

from dotenv import dotenv_values

from ..utils import atomic_write_text

DEFAULT_ENV_FILE = Path.home() / ".config" / "mnistgen" / "team.env"  # outside any repository: never committed by mistake


def _pg_bin() -> Path:
    """TEAM_PG_BIN, else the newest PostgreSQL of Debian's or Ubuntu's packages (/usr/lib/postgresql/<version>/bin)."""
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
    """Write `path` 0600 from its first byte (no moment world-readable), atomically, owned by `owner` (as root)."""
    atomic_write_text(path, text, private=True, owner=owner)


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
        return Path(self["TEAM_STATE_DIR"]).absolute()  # the servers run in /, not in the caller's folder

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
        return f"postgresql://mlflow:{self['TEAM_PG_PASSWORD']}@/{database}?host={self.pg_socket}&port={self.port('PG')}"

    @property
    def pg_data(self) -> Path:
        return self.state / "pg" / "data"

    @property
    def pg_socket(self) -> Path:
        """PostgreSQL's unix socket folder, 0700: only the service user reaches it."""
        return self.state / "pg" / "socket"

    @property
    def tls_dir(self) -> Path:
        return self.state / "tls"

    @property
    def optuna_storage(self) -> str | None:
        """The sweeps' Optuna storage (`mnistgen sweep`): its own role and database, over TCP (TLS off loopback).
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


def exports(s: Settings, user: str = "ci") -> str:
    """The client's variables as `export K=V` lines for `eval "$(mnistgen team env)"`, each value quoted for the shell;
    the writing accounts also get the sweeps' Optuna storage (MNISTGEN_OPTUNA_STORAGE)."""
    env = {
        **s.client_env(user),
        **({"MNISTGEN_OPTUNA_STORAGE": s.optuna_storage} if user != "reader" and s.optuna_storage else {}),
    }
    return "\n".join(f"export {k}={shlex.quote(v)}" for k, v in env.items())  # quoted: a URL's ? and & are shell words


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
