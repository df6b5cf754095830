"""Who may call the reward API. It runs arbitrary code in its sandboxes, so it binds loopback by
default, and a bearer token (RANKGUARD_REWARD_TOKEN or a token file) is required whenever it binds
anything else. Tokens are compared in constant time; /healthz, /docs and the schema stay open.
"""
from __future__ import annotations

import hmac
import ipaddress
import os
from pathlib import Path

TOKEN_ENV = "RANKGUARD_REWARD_TOKEN"
LOOPBACK = "127.0.0.1"
OPEN_PATHS = ("/healthz", "/docs", "/openapi.json", "/static/")


class AccessError(ValueError):
    """The server would be reachable from the network without a token; says how to fix it."""


def is_loopback(host: str) -> bool:
    if host == "localhost":
        return True
    try:
        return ipaddress.ip_address(host.strip("[]")).is_loopback
    except ValueError:
        return False  # a hostname: it may resolve to anything


def load_token(token_file: str | Path | None = None) -> str | None:
    """The token from `token_file` (first line) or $RANKGUARD_REWARD_TOKEN; None when neither is set."""
    if token_file is not None:
        path = Path(token_file)
        if not path.is_file():
            raise AccessError(f"token file {path} not found")
        token = path.read_text().strip().splitlines()[0].strip() if path.read_text().strip() else ""
        if not token:
            raise AccessError(f"token file {path} is empty")
        return token
    token = os.environ.get(TOKEN_ENV, "").strip()
    return token or None


def check_exposure(host: str, token: str | None) -> None:
    """Refuse to serve beyond loopback without a token."""
    if token is None and not is_loopback(host):
        raise AccessError(f"the reward API runs submitted code: binding {host} (beyond loopback) needs a bearer "
                          f"token; set {TOKEN_ENV} (e.g. `export {TOKEN_ENV}=$(openssl rand -hex 32)`) or pass "
                          f"--token-file, or bind {LOOPBACK}")
    if token is not None and len(token) < 16:
        raise AccessError(f"the bearer token is {len(token)} characters; use at least 16 (e.g. openssl rand -hex 32)")


def token_matches(header: str | None, token: str) -> bool:
    """`Authorization: Bearer <token>`, compared in constant time."""
    scheme, _, given = (header or "").partition(" ")
    return scheme.lower() == "bearer" and hmac.compare_digest(given.strip().encode(), token.encode())


class BearerAuth:
    """ASGI middleware: every path outside OPEN_PATHS needs the token, checked before the body is read."""

    def __init__(self, app, token: str, on_reject) -> None:
        self.app, self.token, self.on_reject = app, token, on_reject

    async def __call__(self, scope, receive, send) -> None:
        if scope["type"] != "http" or scope["path"].startswith(OPEN_PATHS):
            return await self.app(scope, receive, send)
        header = dict(scope.get("headers") or []).get(b"authorization")
        if header is None:
            return await self.on_reject(scope, send, "missing bearer token: send `Authorization: Bearer <token>` "
                                                     f"(the server's {TOKEN_ENV})")
        if not token_matches(header.decode("latin-1"), self.token):
            return await self.on_reject(scope, send, "wrong bearer token")
        return await self.app(scope, receive, send)
