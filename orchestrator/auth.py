"""Client keys of the OpenAI API: `Authorization: Bearer <key>`, as vLLM's --api-key.

With `api_keys` set, every route this guards answers a request without one of the keys with an
OpenAI-shaped 401 (code invalid_api_key). /health and /metrics are not guarded (probes, scrapers).
"""

from __future__ import annotations

import hmac
from collections.abc import Sequence

from fastapi import Depends, Request
from fastapi.params import Depends as DependsParam

from orchestrator.errors import APIError


def api_key_dependencies(api_keys: Sequence[str]) -> list[DependsParam]:
    """`dependencies=` for a router: none when no keys are configured (the API is open)."""
    keys = [key.encode("utf-8") for key in api_keys if key]
    if not keys:
        return []

    async def require_api_key(request: Request) -> None:
        if not bearer_matches(request.headers.get("authorization", ""), keys):
            raise APIError(401, "missing or invalid API key: send 'Authorization: Bearer <key>'",
                           "authentication_error", code="invalid_api_key")

    return [Depends(require_api_key)]


def bearer_matches(header: str, keys: list[bytes]) -> bool:
    scheme, _, given = header.partition(" ")
    if scheme.lower() != "bearer":
        return False
    # Starlette decodes header bytes as latin-1: encoding back gives the bytes sent, whatever they
    # are (a str compare_digest raises on non-ASCII: a 500). Every key is compared, so the time
    # does not tell which one came closest.
    token = given.strip().encode("latin-1")
    matched = False
    for key in keys:
        matched |= hmac.compare_digest(token, key)
    return matched and bool(token)
