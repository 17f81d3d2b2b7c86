"""One way to build a ``WorkspaceClient``: a real workspace or the local one, only host and token differ.

The SDK retries a refused connection for five minutes by default; a short
``retry_timeout_seconds`` makes an unreachable host fail fast with a message that names it.
Tokens come from the caller, ``DATABRICKS_TOKEN`` or a Databricks secret scope, and are never
logged or written anywhere.
"""

from __future__ import annotations

import contextlib
import ipaddress
import logging
import os
import socket
from collections.abc import Iterator
from typing import TYPE_CHECKING
from urllib.parse import urlparse

from lakevision.bundle.task_context import find_bundle_root
from lakevision.errors import LakevisionError

if TYPE_CHECKING:
    from lakevision.runtime import Runtime

log = logging.getLogger(__name__)

DEFAULT_RETRY_TIMEOUT_S = 10
# how the local workspace says it has no host metadata (lakevision.local.workspace.app answers it)
LOCAL_NO_HOST_METADATA = "a local workspace has no host metadata"


class WorkspaceUnreachableError(LakevisionError, ConnectionError):
    """The workspace host does not answer."""


class WorkspaceAuthError(LakevisionError, PermissionError):
    """No token, or the workspace refused it."""


def secret_token(scope: str, key: str) -> str:
    """A token from a Databricks secret scope (only where ``dbutils`` exists: a notebook or job)."""
    try:
        from databricks.sdk.runtime import dbutils
    except ImportError as exc:
        raise WorkspaceAuthError(f"secret {scope}/{key}: dbutils is not available here ({exc})") from None
    return dbutils.secrets.get(scope=scope, key=key)


def resolve_token(token: str | None = None, scope: str | None = None, key: str | None = None) -> str | None:
    """The explicit token, else ``DATABRICKS_TOKEN``, else the secret ``scope/key``; None lets the
    SDK use the runtime's own credentials (a notebook or job on Databricks)."""
    if token:
        return token
    if os.environ.get("DATABRICKS_TOKEN"):
        return os.environ["DATABRICKS_TOKEN"]
    if scope and key:
        return secret_token(scope, key)
    return None


def _refuse_plain_http(host: str) -> None:
    """A token goes over TLS, or stays on this machine: plain http is for the local workspace only."""
    url = urlparse(host if "://" in host else f"https://{host}")
    if url.scheme == "https":
        return
    if url.scheme != "http":
        raise WorkspaceAuthError(f"workspace {host}: use an https:// URL")
    try:
        loopback = ipaddress.ip_address(url.hostname or "").is_loopback
    except ValueError:
        loopback = url.hostname == "localhost"
    if not loopback:
        raise WorkspaceAuthError(f"workspace {host}: refusing to send a token over plain http to a host other than "
                                 "this machine; use https://")


def _check_reachable(host: str, timeout_s: float) -> None:
    """Fail in ``timeout_s`` instead of the SDK's 5 minutes of retries on a dead host."""
    url = urlparse(host if "://" in host else f"https://{host}")
    port = url.port or (443 if url.scheme == "https" else 80)
    try:
        with socket.create_connection((url.hostname, port), timeout=timeout_s):
            return
    except OSError as exc:
        raise WorkspaceUnreachableError(
            f"workspace {url.scheme}://{url.hostname}:{port} is unreachable: {exc}"
        ) from None


class _LocalHostMetadata(logging.Filter):
    """The SDK warns on every client that its host-metadata probe failed; the local workspace has
    none by design (it answers 404, as a workspace without the endpoint does), so for it that
    warning is debug detail, not news. A real workspace's failure still warns."""

    def filter(self, record: logging.LogRecord) -> bool:
        if record.levelno >= logging.WARNING and LOCAL_NO_HOST_METADATA in record.getMessage():
            log.debug("%s", record.getMessage())  # a handler's own level would still print it at any level
            return False
        return True


_SDK_LOG = logging.getLogger("databricks.sdk")
if not any(isinstance(f, _LocalHostMetadata) for f in _SDK_LOG.filters):
    _SDK_LOG.addFilter(_LocalHostMetadata())


def workspace_client(host: str | None = None, token: str | None = None,
                     retry_timeout_seconds: int = DEFAULT_RETRY_TIMEOUT_S):
    """A ``WorkspaceClient`` for ``host`` (None: the SDK's default auth, e.g. inside Databricks)."""
    from databricks.sdk import WorkspaceClient
    from databricks.sdk.config import Config

    if host:
        _refuse_plain_http(host)
        _check_reachable(host, min(retry_timeout_seconds, 10))
    kwargs = {"host": host, "token": token, "retry_timeout_seconds": retry_timeout_seconds}
    if token:
        kwargs["auth_type"] = "pat"
    try:
        cfg = Config(**{k: v for k, v in kwargs.items() if v is not None})
    except ValueError as exc:
        # the SDK's message lists the auth methods it tried; the token itself is never in it
        raise WorkspaceAuthError(f"cannot authenticate to {host or 'the default workspace'}: {exc}") from None
    return WorkspaceClient(config=cfg)


@contextlib.contextmanager
def workspace_connection(rt: Runtime, host: str | None = None,
                         bundle_dir: str | os.PathLike | None = None) -> Iterator[tuple[str | None, str | None]]:
    """``(host, token)`` of the workspace a job talks to. Locally, with no ``host``, a local
    workspace process serves for the block: the root's registry and endpoint records, and the jobs
    of the bundle in ``bundle_dir`` (default: the one around the working directory, if any). On
    Databricks the host and token come from the config, the environment or a secret scope."""
    ws = rt.config.deployment.workspace
    if rt.kind == "local" and host is None:
        with rt.local_workspace(bundle_dir if bundle_dir is not None else find_bundle_root()) as (url, token):
            yield url, token
        return
    yield host or ws.host, resolve_token(None, ws.secret_scope, ws.secret_key)
