"""The team server's authorization function (basic_auth.ini's `authorization_function`), run inside `mlflow server`.

MLflow's basic-auth lets every authenticated user create a registered model when workspaces are off, so a reader
could take `mnist-vae` before CI does. This is basic-auth's own check, followed by one rule: only the accounts of
stack.REGISTRY_WRITERS may create registered models or set or delete aliases. Everything else is basic-auth's
permission model (default_permission READ, the roles of stack.ROLES).
"""

from __future__ import annotations

from flask import Response, request
from mlflow.server.auth import authenticate_request_basic_auth, make_forbidden_response

from .stack import REGISTRY_WRITERS

# REST paths (under /api/2.0/mlflow/ and /ajax-api/2.0/mlflow/) that create a registry name or move an alias
REGISTRY_WRITES = ("/registered-models/create", "/registered-models/alias")


def registry_write(method: str, path: str) -> bool:
    return method in ("POST", "PUT", "PATCH", "DELETE") and path.rstrip("/").endswith(REGISTRY_WRITES)


def authenticate():
    """basic-auth's Authorization (or its 401), or a 403 for a registry write by anyone but REGISTRY_WRITERS."""
    authorization = authenticate_request_basic_auth()
    if isinstance(authorization, Response) or authorization.username in REGISTRY_WRITERS:
        return authorization
    if registry_write(request.method, request.path):
        return make_forbidden_response()
    return authorization
