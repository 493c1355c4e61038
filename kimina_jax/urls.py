"""Server addresses (the Lean server, vLLM servers): one check and one spelling for every HTTP client."""
from __future__ import annotations

from kimina_jax.errors import KiminaError


def server_url(url: str, field: str) -> str:
    """`url` without a trailing slash, so that paths can be appended; KiminaError naming `field` unless it is
    http(s)://host[:port][/prefix]."""
    if not isinstance(url, str) or not url.startswith(("http://", "https://")):
        raise KiminaError(f"{field}: expected http(s)://host[:port], got {url!r}")
    return url.rstrip("/")
