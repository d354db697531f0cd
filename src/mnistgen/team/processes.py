"""The team stack's processes: the unprivileged user they run as, how they start and stop, and which are ours.

As root, `up` makes an unprivileged system user (TEAM_OS_USER) and starts every server as that user directly
(subprocess with user=, group= and no supplementary groups): no root process stays around a server. Each server
starts in its own session, so stopping it stops its workers too. A pid and its start time (psutil) name one
process for good: a recycled pid is never taken for ours.
"""

from __future__ import annotations

import functools
import json
import os
import pwd
import shutil
import signal
import socket
import ssl
import subprocess
import sys
import time
import urllib.request
from pathlib import Path

import psutil

from .settings import Settings, StackError


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
        subprocess.run(["useradd", "--system", "--no-create-home", "--shell", "/usr/sbin/nologin", name], check=True)  # noqa: S607
    return name


def chown_tree(path: Path, user: str) -> None:
    if as_root():
        for folder, dirs, files in os.walk(path):
            for name in (folder, *(os.path.join(folder, f) for f in dirs + files)):
                os.chown(name, pwd.getpwnam(user).pw_uid, pwd.getpwnam(user).pw_gid, follow_symlinks=False)


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


def as_user(user: str) -> dict:
    """subprocess's arguments that run a child as `user` (as root): its uid, its group, no supplementary groups, and
    `/` as its working directory (the caller's may be closed to it, and a server's worker processes enter it again)."""
    if not as_root() or user == "root":
        return {}
    entry = pwd.getpwnam(user)
    return {"user": entry.pw_uid, "group": entry.pw_gid, "extra_groups": [], "cwd": "/"}


def run_as(user: str, cmd: list[str], **kwargs) -> subprocess.CompletedProcess:
    return subprocess.run(cmd, **as_user(user), **kwargs)  # noqa: S603 - our own servers' programs


def popen_as(user: str, cmd: list[str], log: Path, env: dict[str, str] | None = None) -> subprocess.Popen:
    """A server started as `user` in its own session, its output appended to `log`."""
    with open(log, "ab") as out:
        return subprocess.Popen(  # noqa: S603
            cmd, stdout=out, stderr=subprocess.STDOUT, stdin=subprocess.DEVNULL, env=env, start_new_session=True, **as_user(user)
        )


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
        try:
            probe = run_as(
                user, [python, "-c", "import swift, mlflow, psycopg, mnistgen.team.server_auth"], capture_output=True, text=True
            )
        except OSError as err:  # the user may not even execute it (a pyenv interpreter under /root)
            return f"{type(err).__name__}: {err}"
        return "" if probe.returncode == 0 else (probe.stderr.strip().splitlines() or [f"exit {probe.returncode}"])[-1]

    why = runs(sys.executable)
    if not why:
        return sys.executable
    version = f"python{sys.version_info.major}.{sys.version_info.minor}"
    own = Path(state) / "venv" / "bin" / "python"
    system = next((p for p in (f"/usr/bin/{version}", f"/usr/local/bin/{version}") if Path(p).exists()), None)
    if not own.exists() and system:
        made = subprocess.run([system, "-m", "venv", "--without-pip", str(own.parents[1])], capture_output=True, text=True)  # noqa: S603
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


def pids_file(s: Settings) -> Path:
    return s.state / "pids.json"


def start_time(pid: int) -> float | None:
    """When the process started (psutil): a pid and its start time name one process for good."""
    try:
        return psutil.Process(pid).create_time()
    except psutil.Error:
        return None


def alive(pid: int) -> bool:
    try:
        return psutil.Process(pid).status() != psutil.STATUS_ZOMBIE
    except psutil.Error:
        return False


def read_pids(s: Settings) -> dict[str, int]:
    """The processes this stack started and that still run: a recycled pid (another program now) is not ours."""
    try:
        recorded = json.loads(pids_file(s).read_text())
    except (OSError, json.JSONDecodeError):
        return {}
    ours = {}
    for name, entry in recorded.items():
        pid, started = entry if isinstance(entry, list) else (entry, None)
        if alive(pid) and started is not None and start_time(pid) == started:
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


def group(pgid: int) -> list[psutil.Process]:
    """The live processes of process group `pgid` (a server and its workers)."""
    members = []
    for proc in psutil.process_iter():
        try:
            if os.getpgid(proc.pid) == pgid and proc.status() != psutil.STATUS_ZOMBIE:
                members.append(proc)
        except (ProcessLookupError, psutil.Error):
            continue
    return members


def stop_group(pid: int, timeout: float = 20) -> None:
    """SIGTERM the process group `pid` leads (each server is started in its own session), then SIGKILL what is left."""
    for sig in (signal.SIGTERM, signal.SIGKILL):
        try:
            os.killpg(pid, sig)
        except ProcessLookupError:
            return
        _, left = psutil.wait_procs(group(pid), timeout=timeout)
        if not left:
            return


def rss_mb(pids: list[int]) -> float:
    """Resident memory of these processes and all their descendants, in MB."""
    total = 0
    for pid in pids:
        try:
            root = psutil.Process(pid)
            procs = [root, *root.children(recursive=True)]
        except psutil.Error:
            continue
        for proc in procs:
            try:
                total += proc.memory_info().rss
            except psutil.Error:
                continue
    return total / 2**20


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
