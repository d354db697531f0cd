"""OpenStack Swift with its S3 API for team mode: the object store of MLflow's artifacts and of the DVC remote.

Four servers (account, container, object, and the proxy that speaks S3); the back ends listen on 127.0.0.1 only.
tempauth holds one S3 key per user; buckets carry container ACLs: MLflow's artifacts only for the mlflow server's
key, the DVC remote written by ci and trainer and read by reader. Configs are INI files written by configparser.
"""

from __future__ import annotations

import configparser
import io
import secrets
import ssl
import subprocess
import urllib.error
import urllib.request

from .processes import chown_tree, https_get, popen_as, read_pids, service_python, stop_group, venv_bin, wait_for, write_pid
from .settings import S3_ACCOUNT, S3_KEYS, SWIFT_SERVERS, Settings, StackError, write_private


def ini(sections: dict[str, dict[str, str]]) -> str:
    """An INI file (configparser's format, keys as written) from {section: {key: value}}."""
    parser = configparser.RawConfigParser()
    parser.optionxform = str  # type: ignore[assignment,method-assign]  # keep keys' case
    parser.read_dict(sections)
    out = io.StringIO()
    parser.write(out)
    return out.getvalue()


def swift_conf(s: Settings, user: str) -> dict[str, dict[str, dict[str, str]]]:
    """Each server's config as {file: {section: {key: value}}}, rewritten at every `up` (swift.conf, whose hash prefix
    names every object, only once). The back ends listen on 127.0.0.1 whatever TEAM_HOST is; only the proxy, which
    authenticates, listens there."""
    etc, node, run = s.state / "swift" / "etc", s.state / "swift" / "node", s.state / "swift" / "run"
    base = s.port("S3")
    common = {"bind_ip": "127.0.0.1", "user": user, "swift_dir": str(etc), "devices": str(node), "mount_check": "false"}
    common |= {"workers": "1", "log_level": "WARNING"}
    checks = {
        "filter:healthcheck": {"use": "egg:swift#healthcheck"},
        "filter:recon": {"use": "egg:swift#recon", "recon_cache_path": str(run)},
    }
    confs = {
        f"{name}-server.conf": {
            "DEFAULT": {**common, "bind_port": str(base + i)},
            "pipeline:main": {"pipeline": f"healthcheck recon {name}-server"},
            f"app:{name}-server": {"use": f"egg:swift#{name}"},
            **checks,
        }
        for i, name in enumerate(("account", "container", "object"), start=1)
    }
    proxy = {
        "bind_ip": s.host,
        "bind_port": str(base),
        "user": user,
        "swift_dir": str(etc),
        "workers": "1",
        "log_level": "WARNING",
    }
    if s.tls:
        proxy |= {"cert_file": str(s.tls_dir / "server.pem"), "key_file": str(s.tls_dir / "server.key")}
    tempauth = {"use": "egg:swift#tempauth"}
    tempauth |= {f"user_{S3_ACCOUNT}_{name}": s.s3_secret(name) + (" .admin" if name == "admin" else "") for name in S3_KEYS}
    tempauth |= {"fernet_key_1": s["TEAM_SWIFT_FERNET_KEY"], "active_fernet_key_id": "1", "token_life": "600"}
    pipeline = (
        "catch_errors gatekeeper healthcheck proxy-logging listing_formats s3api tempauth copy slo dlo proxy-logging proxy-server"
    )
    confs["proxy-server.conf"] = {
        "DEFAULT": proxy,
        "pipeline:main": {"pipeline": pipeline},
        "app:proxy-server": {"use": "egg:swift#proxy", "account_autocreate": "true", "allow_account_management": "false"},
        "filter:tempauth": tempauth,
        "filter:s3api": {"use": "egg:swift#s3api", "location": "us-east-1", "s3_acl": "false"},
        **{
            f"filter:{name}": {"use": f"egg:swift#{name.replace('-', '_')}"}
            for name in ("catch_errors", "gatekeeper", "healthcheck")
        },
        "filter:proxy-logging": {"use": "egg:swift#proxy_logging"},
        **{f"filter:{name}": {"use": f"egg:swift#{name}"} for name in ("listing_formats", "copy", "slo", "dlo")},
    }
    return confs


def start_swift(s: Settings, user: str) -> None:
    python = service_python(s, user)
    etc, node, run = (s.state / "swift" / d for d in ("etc", "node", "run"))
    for d in (etc, node / "d1", run):
        d.mkdir(parents=True, exist_ok=True)
    if not (etc / "swift.conf").exists():
        suffix, prefix = secrets.token_hex(8), secrets.token_hex(8)
        hashes = {"swift_hash_path_suffix": suffix, "swift_hash_path_prefix": prefix}
        write_private(etc / "swift.conf", ini({"swift-hash": hashes, "storage-policy:0": {"name": "Policy-0", "default": "yes"}}))
    for name, sections in swift_conf(s, user).items():
        write_private(etc / name, ini(sections))  # the proxy's holds every S3 secret
    if not (etc / "object.ring.gz").exists():
        builder = venv_bin("swift-ring-builder")
        for i, ring in enumerate(("account", "container", "object"), start=1):
            path = str(etc / f"{ring}.builder")
            subprocess.run([builder, path, "create", "8", "1", "1"], check=True, capture_output=True)  # noqa: S603
            subprocess.run(  # noqa: S603
                [builder, path, "add", f"r1z1-127.0.0.1:{s.port('S3') + i}/d1", "100"], check=True, capture_output=True
            )
            subprocess.run([builder, path, "rebalance"], capture_output=True)  # noqa: S603 - exit 1 is a warning here
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
