"""The attack suite (docs/security.md): every attack of the threat model tried against live team stacks, on
loopback only. `team_stack` is the session's stack on 127.0.0.1; `remote_stack` is one on 127.0.0.2, an address
in the loopback range that team mode treats as a network address (TLS on), brought up through the CLI while every
process's command line is watched. Each test fails if its attack succeeds, and checks the legitimate action beside
it, so that a test cannot pass merely because everything is refused.
"""

import json
import os
import pwd
import shutil
import socket
import ssl
import subprocess
import sys
import tempfile
import threading
import time
import urllib.error
import urllib.request
from pathlib import Path

import boto3
import pytest
from botocore import UNSIGNED
from botocore.config import Config
from botocore.exceptions import ClientError
from conftest import free_port_block, team_missing, use_team_account
from mlflow import MlflowClient
from mlflow.exceptions import MlflowException

from mnistgen.team import mlflow_server, processes
from mnistgen.team import settings as team

pytestmark = [pytest.mark.team, pytest.mark.slow]
MNISTGEN = str(Path(sys.executable).with_name("mnistgen"))
REMOTE_HOST = "127.0.0.2"


def secrets_of(settings: team.Settings) -> list[str]:
    return [settings[k] for k in team.SECRET_KEYS if settings.values.get(k)]


class CommandLines:
    """Every process's command line, sampled every 20 ms while a block runs (what `ps` shows any local user)."""

    def __init__(self):
        self.seen: set[str] = set()
        self._stop = threading.Event()

    def _sample(self):
        while not self._stop.is_set():
            for proc in Path("/proc").iterdir():
                if proc.name.isdigit():
                    try:
                        self.seen.add((proc / "cmdline").read_bytes().replace(b"\0", b" ").decode(errors="replace"))
                    except OSError:
                        continue
            time.sleep(0.02)

    def __enter__(self):
        self._thread = threading.Thread(target=self._sample, daemon=True)
        self._thread.start()
        return self

    def __exit__(self, *exc):
        self._stop.set()
        self._thread.join()


def team_cli(settings_env: dict, *args: str, cwd: Path | None = None) -> subprocess.CompletedProcess:
    return subprocess.run([MNISTGEN, "team", *args], env=settings_env, cwd=cwd, capture_output=True, text=True, timeout=600)


@pytest.fixture(scope="module")
def remote_stack():
    """A stack on 127.0.0.2 (TLS), started by `mnistgen team up` under a command-line sampler. Yields (settings, the
    env its CLI runs with, the command lines seen, the CLI's output)."""
    reason = team_missing()
    if reason:
        pytest.skip(reason)
    state = Path(tempfile.mkdtemp(prefix="mnistgen-team-test-", dir="/var/tmp"))
    home = Path(tempfile.mkdtemp(prefix="mnistgen-team-env-"))
    base = free_port_block(6)
    env = {k: v for k, v in os.environ.items() if not k.startswith(("TEAM_", "MLFLOW_TRACKING_", "AWS_"))}
    env.update(
        {
            "TEAM_HOST": REMOTE_HOST,
            "TEAM_STATE_DIR": str(state),
            "TEAM_ENV_FILE": str(home / "team.env"),
            "TEAM_PG_PORT": str(base),
            "TEAM_MLFLOW_PORT": str(base + 1),
            "TEAM_S3_PORT": str(base + 2),
        }
    )
    try:
        with CommandLines() as seen:
            started = team_cli(env, "up")
        assert started.returncode == 0, started.stderr[-3000:]
        overrides = {k: v for k, v in env.items() if k.startswith("TEAM_")}
        settings = team.Settings.load(env_file=home / "team.env", overrides=overrides)
        yield settings, env, seen.seen, started.stdout + started.stderr
    finally:
        team_cli(env, "down")
        shutil.rmtree(state, ignore_errors=True)
        shutil.rmtree(home, ignore_errors=True)


def psql(settings: team.Settings, conninfo: str, password: str | None = None, user: str | None = None):
    """psql -w (never prompts) with `conninfo`, optionally with a password and as another OS user."""
    env = {"PATH": os.environ["PATH"], **({"PGPASSWORD": password} if password else {})}
    cmd = [str(team.PG_BIN / "psql"), "-w", "-tA", "-c", "select current_user", conninfo]
    if user:
        cmd = ["runuser", "-u", user, "--", *cmd]
    return subprocess.run(cmd, env=env, capture_output=True, text=True, timeout=60)


def tcp(settings: team.Settings, user: str, database: str, sslmode: str = "prefer") -> str:
    ca = f" sslrootcert={settings.ca_file}" if settings.tls else ""
    return f"host={settings.host} port={settings.port('PG')} user={user} dbname={database} sslmode={sslmode}{ca}"


# ---------------------------------------------------------------- PostgreSQL


def test_postgres_asks_every_client_for_a_password(team_stack):
    socket_dir = team_stack.pg_socket
    for user in ("postgres", "mlflow", "optuna"):
        refused = psql(team_stack, tcp(team_stack, user, "postgres"))
        assert refused.returncode != 0 and "no password supplied" in refused.stderr, refused.stderr
    on_socket = psql(team_stack, f"host={socket_dir} port={team_stack.port('PG')} user=postgres dbname=postgres")
    assert on_socket.returncode != 0 and "no password supplied" in on_socket.stderr  # root, on the socket: no trust
    wrong = psql(team_stack, tcp(team_stack, "mlflow", "mlflow"), password="not-the-password")
    assert wrong.returncode != 0 and "password authentication failed" in wrong.stderr
    right = psql(team_stack, tcp(team_stack, "mlflow", "mlflow"), password=team_stack["TEAM_PG_PASSWORD"])
    assert right.returncode == 0 and right.stdout.strip() == "mlflow", right.stderr


@pytest.mark.skipif(os.geteuid() != 0, reason="needs root to act as another local user")
def test_another_local_user_cannot_reach_the_socket_nor_log_in_over_tcp(team_stack):
    other = "nobody"
    socket_dir = team_stack.pg_socket
    on_socket = psql(team_stack, f"host={socket_dir} port={team_stack.port('PG')} user=postgres", user=other)
    assert on_socket.returncode != 0 and "Permission denied" in on_socket.stderr, on_socket.stderr
    over_tcp = psql(team_stack, tcp(team_stack, "postgres", "postgres"), user=other)
    assert over_tcp.returncode != 0 and "no password supplied" in over_tcp.stderr
    assert pwd.getpwnam(other).pw_uid != 0


def test_database_roles_are_no_superusers_and_reach_only_their_own_databases(team_stack):
    query = "select rolsuper, rolcreatedb, rolcreaterole from pg_roles where rolname = current_user"
    for role, key, own, foreign in (
        ("mlflow", "TEAM_PG_PASSWORD", "mlflow", "optuna"),
        ("optuna", "TEAM_OPTUNA_PASSWORD", "optuna", "mlflow"),
    ):
        env = {"PATH": os.environ["PATH"], "PGPASSWORD": team_stack[key]}
        flags = subprocess.run(
            [str(team.PG_BIN / "psql"), "-w", "-tA", "-c", query, tcp(team_stack, role, own)],
            env=env,
            capture_output=True,
            text=True,
        )
        assert flags.returncode == 0 and flags.stdout.strip() == "f|f|f", flags.stderr
        denied = psql(team_stack, tcp(team_stack, role, foreign), password=team_stack[key])
        assert denied.returncode != 0 and "permission denied for database" in denied.stderr


def test_off_loopback_postgres_takes_tls_only_and_listens_only_on_team_host(remote_stack):
    settings = remote_stack[0]
    password = settings["TEAM_OPTUNA_PASSWORD"]
    plain = psql(settings, tcp(settings, "optuna", "optuna", sslmode="disable"), password=password)
    assert plain.returncode != 0 and "no encryption" in plain.stderr, plain.stderr
    verified = psql(settings, tcp(settings, "optuna", "optuna", sslmode="verify-full"), password=password)
    assert verified.returncode == 0, verified.stderr
    with socket.socket() as sock:  # not on 127.0.0.1: PostgreSQL listens on TEAM_HOST alone
        assert sock.connect_ex(("127.0.0.1", settings.port("PG"))) != 0


# ---------------------------------------------------------------- Swift / S3


def s3(settings: team.Settings, user: str | None, secret: str | None = None):
    """An S3 client with `user`'s key (None: an anonymous, unsigned client)."""
    config = Config(
        s3={"addressing_style": "path"}, retries={"max_attempts": 1}, signature_version=UNSIGNED if user is None else None
    )
    keys = (
        {}
        if user is None
        else {"aws_access_key_id": settings.s3_access_key(user), "aws_secret_access_key": secret or settings.s3_secret(user)}
    )
    verify = str(settings.ca_file) if settings.tls else None
    return boto3.client("s3", endpoint_url=settings.s3_endpoint, region_name="us-east-1", config=config, verify=verify, **keys)


def attempt(call) -> str:
    """'ok', or the S3 error code."""
    try:
        call()
        return "ok"
    except ClientError as err:
        return err.response["Error"]["Code"]


def writes(settings, user, bucket, secret=None) -> str:
    return attempt(lambda: s3(settings, user, secret).put_object(Bucket=bucket, Key=f"attack/{user}", Body=b"x"))


def lists(settings, user, bucket) -> str:
    return attempt(lambda: s3(settings, user).list_objects_v2(Bucket=bucket))


def test_s3_without_a_key_or_with_a_wrong_one_gets_nothing(team_stack):
    for bucket in (team_stack["TEAM_BUCKET"], team_stack.dvc_bucket):
        assert writes(team_stack, None, bucket) != "ok" and lists(team_stack, None, bucket) != "ok"
        assert writes(team_stack, "ci", bucket, secret="not-the-secret") == "SignatureDoesNotMatch"
    with pytest.raises(urllib.error.HTTPError) as swift_api:  # the Swift API without a token
        urllib.request.urlopen(f"{team_stack.s3_endpoint}/v1/AUTH_{team.S3_ACCOUNT}/{team_stack.dvc_bucket}", timeout=10)
    assert swift_api.value.code == 401


def multipart(settings, user, bucket) -> str:
    """A two-part upload (what DVC does for big files: the parts go to `<bucket>+segments`)."""

    def upload():
        client = s3(settings, user)
        upload_id = client.create_multipart_upload(Bucket=bucket, Key=f"attack/{user}-big")["UploadId"]
        parts = []
        for number, body in enumerate((b"a" * 5 * 2**20, b"b"), start=1):
            etag = client.upload_part(Bucket=bucket, Key=f"attack/{user}-big", UploadId=upload_id, PartNumber=number, Body=body)[
                "ETag"
            ]
            parts.append({"PartNumber": number, "ETag": etag})
        client.complete_multipart_upload(
            Bucket=bucket, Key=f"attack/{user}-big", UploadId=upload_id, MultipartUpload={"Parts": parts}
        )

    return attempt(upload)


def test_readers_key_reads_the_dvc_remote_and_writes_nowhere(team_stack):
    assert lists(team_stack, "reader", team_stack.dvc_bucket) == "ok"
    assert multipart(team_stack, "ci", team_stack.dvc_bucket) == "ok"  # a writer's big upload works
    for bucket in (team_stack["TEAM_BUCKET"], team_stack.dvc_bucket):
        assert writes(team_stack, "reader", bucket) == "AccessDenied"
        assert multipart(team_stack, "reader", bucket) == "AccessDenied"
    assert attempt(lambda: s3(team_stack, "reader").create_bucket(Bucket="mnistgen-taken")) == "AccessDenied"


def test_a_dvc_key_cannot_touch_mlflows_artifacts(team_stack):
    mlflow_bucket = team_stack["TEAM_BUCKET"]
    for user in ("ci", "trainer"):
        assert writes(team_stack, user, team_stack.dvc_bucket) == "ok"  # their own job
        assert writes(team_stack, user, mlflow_bucket) == "AccessDenied"
        assert lists(team_stack, user, mlflow_bucket) == "AccessDenied"
    assert writes(team_stack, "mlflow", mlflow_bucket) == "ok"  # the server's key, the only one
    assert writes(team_stack, "mlflow", team_stack.dvc_bucket) == "AccessDenied"


def listening(port: int) -> set[str]:
    """The local addresses on which some socket listens on `port` (/proc/net/tcp, state 0A)."""
    found = set()
    for line in Path("/proc/net/tcp").read_text().splitlines()[1:]:
        local, state = line.split()[1], line.split()[3]
        address, hex_port = local.split(":")
        if state == "0A" and int(hex_port, 16) == port:
            found.add(socket.inet_ntoa(bytes.fromhex(address)[::-1]))
    return found


def test_swift_back_ends_listen_on_127_0_0_1_only_and_the_proxy_on_team_host(remote_stack):
    settings = remote_stack[0]
    assert listening(settings.port("S3")) == {REMOTE_HOST}
    for offset in (1, 2, 3):  # account, container, object servers
        assert listening(settings.port("S3") + offset) == {"127.0.0.1"}
        with socket.socket() as sock:
            assert sock.connect_ex((REMOTE_HOST, settings.port("S3") + offset)) != 0  # nothing there to write to


# ---------------------------------------------------------------- MLflow registry


def mlflow_as(settings: team.Settings, user: str, monkeypatch) -> MlflowClient:
    use_team_account(monkeypatch, settings, user)
    monkeypatch.setenv("MLFLOW_HTTP_REQUEST_MAX_RETRIES", "0")
    return MlflowClient(tracking_uri=settings.tracking_uri, registry_uri=settings.tracking_uri)


def status_of(call) -> int:
    try:
        call()
        return 200
    except MlflowException as err:
        return err.get_http_status_code()


def test_only_admin_and_ci_create_registered_models_or_move_aliases_and_readers_create_nothing(team_stack, monkeypatch):
    from conftest import clear_registry

    clear_registry(team_stack)
    for user in ("reader", "trainer"):
        client = mlflow_as(team_stack, user, monkeypatch)
        assert status_of(lambda c=client, u=user: c.create_registered_model(f"mnist-anything-{u}")) == 403
    reader = mlflow_as(team_stack, "reader", monkeypatch)
    assert status_of(lambda: reader.create_experiment(f"reader-{time.time_ns()}")) == 403  # a reader creates nothing
    trainer = mlflow_as(team_stack, "trainer", monkeypatch)
    assert status_of(lambda: trainer.create_experiment(f"trainer-{time.time_ns()}")) == 200
    ci = mlflow_as(team_stack, "ci", monkeypatch)
    assert status_of(lambda: ci.create_registered_model("mnist-by-ci")) == 200
    experiment = ci.create_experiment(f"security-{time.time_ns()}")
    run = ci.create_run(experiment)
    version = ci.create_model_version("mnist-by-ci", f"runs:/{run.info.run_id}/model", run_id=run.info.run_id).version
    assert status_of(lambda: ci.set_registered_model_alias("mnist-by-ci", "champion", version)) == 200
    for user in ("reader", "trainer"):
        client = mlflow_as(team_stack, user, monkeypatch)
        assert status_of(lambda c=client: c.set_registered_model_alias("mnist-by-ci", "champion", version)) == 403
        assert status_of(lambda c=client: c.delete_registered_model_alias("mnist-by-ci", "champion")) == 403
        assert client.get_model_version_by_alias("mnist-by-ci", "champion").version == version  # reading stays open
    admin = mlflow_as(team_stack, "admin", monkeypatch)
    admin.create_registered_model("mnist-by-admin")
    ci = mlflow_as(team_stack, "ci", monkeypatch)
    assert status_of(lambda: ci.delete_registered_model("mnist-by-admin")) == 403  # EDIT, not MANAGE
    clear_registry(team_stack)


def test_the_rules_match_every_create_and_alias_route():
    from mnistgen.team.server_auth import refused

    for prefix in ("/api/2.0/mlflow", "/ajax-api/2.0/mlflow"):
        for user in ("reader", "trainer", "someone-new"):
            assert refused(user, "POST", f"{prefix}/registered-models/create")
            assert refused(user, "POST", f"{prefix}/registered-models/alias")
            assert refused(user, "DELETE", f"{prefix}/registered-models/alias/")
            assert not refused(user, "GET", f"{prefix}/registered-models/alias")
            assert not refused(user, "POST", f"{prefix}/runs/search")
        for user in ("reader", "someone-new"):
            assert refused(user, "POST", f"{prefix}/experiments/create")
            assert refused(user, "POST", f"{prefix}/logged-models/create")
        assert not refused("trainer", "POST", f"{prefix}/experiments/create")
        assert not refused("ci", "POST", f"{prefix}/registered-models/create")


# ---------------------------------------------------------------- secrets


def test_no_secret_on_a_command_line_in_the_output_or_in_a_file_others_can_read(remote_stack, tmp_path):
    settings, env, command_lines, output = remote_stack
    secrets = secrets_of(settings)
    assert len(secrets) == len(team.SECRET_KEYS)
    # `team dvc-remote` and `team env` too, watched the same way
    repo = tmp_path / "repo"
    repo.mkdir()
    subprocess.run(["git", "init", "-q"], cwd=repo, check=True)
    subprocess.run([str(Path(sys.executable).with_name("dvc")), "init", "-q"], cwd=repo, check=True)
    with CommandLines() as seen:
        remote = team_cli(env, "dvc-remote", "--user", "trainer", cwd=repo)
        status = team_cli(env, "status")
    assert remote.returncode == 0 and status.returncode == 0, remote.stderr
    shown = "\n".join([*command_lines, *seen.seen, output, remote.stdout, remote.stderr, status.stdout])
    leaked = [key for key in team.SECRET_KEYS if settings[key] in shown]
    assert leaked == [], f"secrets on a command line or in the CLI's output: {leaked}"
    assert os.stat(settings.env_file).st_mode & 0o777 == 0o600
    assert (repo / ".dvc" / "config.local").stat().st_mode & 0o777 == 0o600
    state = settings.state
    assert state.stat().st_mode & 0o777 == 0o700
    assert state.stat().st_uid == pwd.getpwnam(processes.os_user(settings)).pw_uid
    for path in state.rglob("*"):  # nothing in the state folder is readable by others and holds a secret
        if path.is_file() and not path.is_symlink() and path.stat().st_mode & 0o004:
            text = path.read_bytes()
            assert not [s for s in secrets if s.encode() in text], f"{path} is world-readable and holds a secret"
    for log in (state / "logs").iterdir():
        text = log.read_bytes()
        assert not [s for s in secrets if s.encode() in text], f"{log} holds a secret"
    if os.geteuid() == 0:  # and every service runs as the unprivileged user, not as root
        # no root parent either: each service's process group holds only the unprivileged user's processes
        servers = [p for pid in processes.read_pids(settings).values() for p in group(pid)]
        assert len(servers) >= len(team.SERVICES)
        assert [cmd for uid, cmd in ((os.stat(f"/proc/{pid}").st_uid, cmd) for pid, cmd in servers) if uid == 0] == []
        assert not [cmd for _, cmd in servers if cmd.startswith(("runuser", "su ", "sudo"))]


def group(pgid: int) -> list[tuple[int, str]]:
    """(pid, command line) of every process in process group `pgid`."""
    members = []
    for proc in Path("/proc").iterdir():
        try:
            if proc.name.isdigit() and int((proc / "stat").read_text().rsplit(")", 1)[1].split()[2]) == pgid:
                members.append((int(proc.name), (proc / "cmdline").read_bytes().replace(b"\0", b" ").decode()))
        except OSError:
            continue
    return members


def test_a_secrets_file_others_can_read_is_refused(tmp_path):
    env_file = tmp_path / "team.env"
    team.Settings.load(env_file=env_file, create=True)
    assert env_file.stat().st_mode & 0o777 == 0o600
    os.chmod(env_file, 0o644)
    with pytest.raises(team.StackError, match="others may read it"):
        team.Settings.load(env_file=env_file)


def test_a_planted_state_folder_is_refused(tmp_path):
    target = tmp_path / "elsewhere"
    target.mkdir()
    planted = tmp_path / "state"
    planted.symlink_to(target)
    settings = team.Settings.load(env_file=tmp_path / "team.env", create=True, overrides={"TEAM_STATE_DIR": str(planted)})
    with pytest.raises(team.StackError, match="symlink or belongs to another user"):
        processes.prepare_state(settings, processes.os_user(settings))
    if os.geteuid() == 0:  # a folder another user made at the predictable path
        foreign = tmp_path / "foreign"
        foreign.mkdir()
        shutil.chown(foreign, "nobody")
        settings.values["TEAM_STATE_DIR"] = str(foreign)
        with pytest.raises(team.StackError, match="belongs to another user"):
            processes.prepare_state(settings, processes.os_user(settings))


def test_a_role_that_cannot_be_set_up_fails_team_up(tmp_path, monkeypatch):
    class RefusingAuth:
        def get_user(self, user):
            return user

        def update_user_password(self, user, password):
            return None

        def list_roles(self, workspace):
            raise MlflowException("role support is off on this server")

    monkeypatch.setattr(mlflow_server, "auth_client", lambda s: RefusingAuth())
    settings = team.Settings.load(env_file=tmp_path / "team.env", create=True)
    with pytest.raises(team.StackError, match="cannot set up role ci-writer of ci"):
        mlflow_server.ensure_users(settings)


# ---------------------------------------------------------------- TLS


def get(url: str, cafile: str | None = None) -> int:
    context = ssl.create_default_context(cafile=cafile) if url.startswith("https") else None
    with urllib.request.urlopen(url, timeout=10, context=context) as response:
        return response.status


def test_off_loopback_every_server_speaks_tls_and_plain_http_gets_nothing(remote_stack, monkeypatch):
    settings = remote_stack[0]
    assert settings.tracking_uri.startswith("https://") and settings.s3_endpoint.startswith("https://")
    ca = str(settings.ca_file)
    for base, path in ((settings.tracking_uri, "/health"), (settings.s3_endpoint, "/healthcheck")):
        assert get(base + path, ca) == 200
        with pytest.raises(OSError):  # plain HTTP: no answer
            get(base.replace("https://", "http://") + path)
        with pytest.raises(OSError, match="CERTIFICATE_VERIFY_FAILED"):  # a client that does not trust the CA
            get(base + path, cafile=None)
    # a real client over TLS: a run with an artifact, through the server to the object store and back
    client = mlflow_as(settings, "ci", monkeypatch)
    run = client.create_run(client.create_experiment(f"tls-{time.time_ns()}"))
    note = Path(tempfile.mkdtemp()) / "note.txt"
    note.write_text("over TLS")
    client.log_artifact(run.info.run_id, str(note))
    back = client.download_artifacts(run.info.run_id, "note.txt", tempfile.mkdtemp())
    assert Path(back).read_text() == "over TLS"


# ---------------------------------------------------------------- lifecycle


def test_up_again_restart_and_down_keep_the_data_and_touch_only_this_stack(remote_stack, monkeypatch):
    settings, env, _, _ = remote_stack
    client = mlflow_as(settings, "ci", monkeypatch)
    run = client.create_run(client.create_experiment(f"lifecycle-{time.time_ns()}"))
    client.log_metric(run.info.run_id, "kept", 1.0)
    pids = processes.read_pids(settings)
    again = team_cli(env, "up")
    assert again.returncode == 0 and "already up" in again.stdout and processes.read_pids(settings) == pids
    # a stranger's process whose pid the pids file names (a recycled pid): down must not stop it
    stranger = subprocess.Popen(["sleep", "300"], start_new_session=True)
    recorded = json.loads(processes.pids_file(settings).read_text())
    recorded["stranger"] = [stranger.pid, 1]  # another start time: not the process the stack started
    processes.pids_file(settings).write_text(json.dumps(recorded))
    try:
        restarted = team_cli(env, "restart")
        assert restarted.returncode == 0, restarted.stderr[-2000:]
        assert stranger.poll() is None
        assert set(processes.read_pids(settings).values()).isdisjoint(pids.values())  # every service is new
        assert mlflow_as(settings, "ci", monkeypatch).get_run(run.info.run_id).data.metrics == {"kept": 1.0}
        assert team_cli(env, "down").returncode == 0 and stranger.poll() is None  # left down: the fixture's own end
        assert team_cli(env, "status").stdout.count("true") == 0
    finally:
        stranger.kill()
