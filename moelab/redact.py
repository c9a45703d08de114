"""Secrets: tokens are stripped where they enter, and every form of them is masked in what moelab prints or writes."""

from __future__ import annotations

import base64
import json
import os
import re
from urllib.parse import quote, quote_plus

SECRET_ENV_NAMES = ("HF_TOKEN", "HUGGING_FACE_HUB_TOKEN", "GITHUB_TOKEN", "RUNPOD_API_KEY")
MASK = "***"
# Shorter values would mask ordinary words; no real token is this short.
MIN_SECRET_CHARS = 8
# A credential after an auth scheme, as transport errors and debug dumps quote request headers.
AUTH_HEADER = re.compile(r"(?i)(authorization['\"]?\s*[:=]\s*['\"]?(?:(?:bearer|token|basic)\s+)?)([^\s'\",;}]+)")
BEARER = re.compile(r"\b(Bearer\s+)([^\s'\",;}]+)")

_given: set[str] = set()  # secrets that came in as flags or from a saved login, in this process


def clean_secret(value: str | None) -> str | None:
    """A token without the whitespace around it (a CRLF token file, `--token "$TOK"`); None when empty.

    The cleaned value is remembered, so that `mask` hides it even when it came from a flag rather than the env."""
    if value is None:
        return None
    value = value.replace("\r", "").replace("\n", "").strip()
    if not value:
        return None
    _given.add(value)
    return value


def secret_from_env(name: str) -> str | None:
    return clean_secret(os.environ.get(name))


def known_secrets() -> set[str]:
    """Every secret this process may hold: the secret environment variables (as set and cleaned) and given ones."""
    values = set(_given)
    for name in SECRET_ENV_NAMES:
        raw = os.environ.get(name)
        if raw:
            values.add(raw)
            values.add(raw.strip())
    return {v for v in values if len(v) >= MIN_SECRET_CHARS}


def secret_forms(value: str) -> set[str]:
    """The ways a secret shows up in text: as is, stripped, repr- or JSON-escaped, URL-encoded, base64."""
    forms = set()
    for v in {value, value.strip()}:
        forms |= {v, repr(v)[1:-1], json.dumps(v)[1:-1], quote(v, safe=""), quote_plus(v),
                  base64.b64encode(v.encode()).decode().rstrip("=")}
    return {f for f in forms if len(f) >= MIN_SECRET_CHARS}


def mask(text: str, extra_secrets: tuple[str, ...] = ()) -> str:
    """`text` with every form of every known secret (and any Authorization credential) replaced by ***."""
    forms = set().union(*(secret_forms(s) for s in known_secrets() | {s for s in extra_secrets if s}))
    for form in sorted(forms, key=len, reverse=True):
        text = text.replace(form, MASK)
    text = AUTH_HEADER.sub(lambda m: m.group(1) + MASK, text)
    return BEARER.sub(lambda m: m.group(1) + MASK, text)
