"""Server addresses (the Lean server, vLLM servers): one check and one spelling for every HTTP client.

Credentials in an address (`http://user:KEY@host`) are used to connect and never shown: clients keep the address
without them (`server_address`), and whatever is logged or stored goes through `redact_url`.
"""
from __future__ import annotations

import re
from urllib.parse import unquote, urlsplit

import httpx

from kimina_jax.errors import KiminaError

_USERINFO = re.compile(r"(?<=://)[^/@\s]*@")


def server_url(url: str, field: str) -> str:
    """`url` without a trailing slash, so that paths can be appended; KiminaError naming `field` unless it is
    http(s)://host[:port][/prefix]."""
    if not isinstance(url, str) or not url.startswith(("http://", "https://")):
        raise KiminaError(f"{field}: expected http(s)://host[:port], got {redact_url(url)!r}")
    return url.rstrip("/")


def server_address(url: str, field: str) -> tuple[str, httpx.BasicAuth | None]:
    """(`server_url` without its credentials, HTTP basic auth with them or None), for an httpx client."""
    url = server_url(url, field)
    parts = urlsplit(url)
    if "@" not in parts.netloc:
        return url, None
    auth = httpx.BasicAuth(unquote(parts.username or ""), unquote(parts.password or ""))
    return redact_url(url, ""), auth


def redact_url(text, mask: str = "***@"):
    """`text` with the user information of every URL in it replaced by `mask` (non-strings come back as they are)."""
    return _USERINFO.sub(mask, text) if isinstance(text, str) else text
