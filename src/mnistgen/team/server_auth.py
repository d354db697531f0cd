"""The team server's authorization function (basic_auth.ini's `authorization_function`), run inside `mlflow server`.

MLflow's basic-auth lets every authenticated user create experiments, registered models (and other resources,
which it then manages) when workspaces are off, so a reader could take `mnist-vae` before CI does. This is
basic-auth's own check, followed by two rules:
- only the accounts of settings.REGISTRY_WRITERS create registered models or set or delete aliases;
- only those of settings.RUN_WRITERS create anything else (experiments, logged models, ...): a reader creates nothing.
Any other account, one an admin adds later included, is held to the reader's rules until it is named there.
Everything else is basic-auth's permission model (default_permission READ, the roles of settings.ROLES).
"""

from __future__ import annotations

from flask import Response, request
from mlflow.server.auth import authenticate_request_basic_auth, make_forbidden_response

from .settings import REGISTRY_WRITERS, RUN_WRITERS

# REST paths (under /api/2.0/mlflow/ and /ajax-api/2.0/mlflow/) that create a registry name or move an alias
REGISTRY_WRITES = ("/registered-models/create", "/registered-models/alias")


def refused(user: str, method: str, path: str) -> bool:
    """True when `user` may not make this request, whatever basic-auth's permissions would say."""
    if user in REGISTRY_WRITERS or method not in ("POST", "PUT", "PATCH", "DELETE"):
        return False
    path = path.rstrip("/")
    return path.endswith(REGISTRY_WRITES) or (user not in RUN_WRITERS and path.endswith("/create"))


def authenticate():
    """basic-auth's Authorization (or its 401), or a 403 for what `refused` holds back."""
    authorization = authenticate_request_basic_auth()
    if isinstance(authorization, Response) or not refused(authorization.username or "", request.method, request.path):
        return authorization
    return make_forbidden_response()
