"""Configuration from the environment (and `.streamlit/secrets.toml`); secrets stay here.

Secrets are held in fields excluded from ``repr`` so they never reach a log by accident;
nothing in Gyroscope writes them to the database, a page or an API answer.
"""

from __future__ import annotations

import os
import tomllib
from dataclasses import dataclass, field
from pathlib import Path
from typing import Mapping
from urllib.parse import urlparse, urlsplit, urlunsplit

from .errors import ConfigError

DEFAULT_DB = Path("data") / "gyroscope.db"
SECRET_NAMES = ("OPENAI_API_KEY", "GYROSCOPE_ADMIN_PASSWORD", "GYROSCOPE_API_TOKEN")


@dataclass(frozen=True)
class Config:
    """Where to send requests and where to keep data."""

    provider: str
    base_url: str | None
    db_path: Path
    api_key: str | None = field(default=None, repr=False)
    admin_password: str | None = field(default=None, repr=False)
    api_token: str | None = field(default=None, repr=False)
    spill_path: Path | None = None     # the spill journal (GYROSCOPE_SPILL; None: beside db_path)
    # GYROSCOPE_DATABASE_URL (postgresql://...): history, events and settings in PostgreSQL,
    # shared by replicas (core/storage/); None keeps them in the SQLite file. It may hold a
    # password: never in repr, and only redact_url() of it reaches a message.
    database_url: str | None = field(default=None, repr=False)
    # Shared state for replicas (GYROSCOPE_REDIS_URL, redis://…): may carry a password.
    redis_url: str | None = field(default=None, repr=False)
    # Put before every Redis key (GYROSCOPE_REDIS_PREFIX): deployments sharing one Redis.
    redis_prefix: str = "gyroscope:"

    @property
    def has_api_key(self) -> bool:
        return bool(self.api_key)


def _read_secrets(path: Path) -> dict:
    try:
        with path.open("rb") as fh:
            data = tomllib.load(fh)
    except FileNotFoundError:
        return {}
    except (OSError, tomllib.TOMLDecodeError) as exc:
        raise ConfigError(f"{path} could not be read ({exc.__class__.__name__}). Fix the file "
                          "or remove it.") from None
    return {k: v for k, v in data.items() if isinstance(v, str)}


def check_base_url(url: str) -> str:
    """A usable http(s) base URL, or ConfigError naming it."""
    try:
        parsed = urlparse(url)
        parsed.port  # noqa: B018 - raises ValueError for a bad port
        redact_url(url)
    except ValueError:
        parsed = None
    if parsed is None or parsed.scheme not in ("http", "https") or not parsed.hostname:
        raise ConfigError(f"OPENAI_BASE_URL={redact_url(url)!r} is not a usable http(s) URL. Set it to something "
                          "like https://api.openai.com/v1 or http://localhost:8000/v1.")
    return url.rstrip("/")


def check_redis_url(url: str | None) -> str | None:
    """A usable redis:// (rediss://, unix://) URL or None, else ConfigError naming it (redacted)."""
    if not url:
        return None
    try:
        parsed = urlparse(url)
        parsed.port  # noqa: B018 - raises ValueError for a bad port
    except ValueError:
        parsed = None
    if parsed is None or parsed.scheme not in ("redis", "rediss", "unix") or (
            parsed.scheme != "unix" and not parsed.hostname):
        raise ConfigError(f"GYROSCOPE_REDIS_URL={redact_url(url)!r} is not a usable Redis URL. Set it to "
                          "something like redis://localhost:6379/0, or unset it to keep shared "
                          "state in the SQLite file.")
    return url


def redact_url(url: str | None) -> str:
    """A URL without user, password, query or fragment (any of which could carry a secret).

    A URL without a scheme (``user:pw@host/v1``) is read as one starting at its host, so
    its password is dropped too rather than taken for a scheme and a path."""
    if not url:
        return ""
    try:
        has_host = "//" in url.split("?", 1)[0].split("#", 1)[0]
        parts = urlsplit(url if has_host else "//" + url)
        host = parts.hostname or ""
        if ":" in host:          # an IPv6 address goes back in brackets
            host = f"[{host}]"
        if parts.port:
            host = f"{host}:{parts.port}"
    except ValueError:
        return "<unparseable URL>"
    if not host:
        return "<unparseable URL>"
    out = urlunsplit((parts.scheme, host, parts.path, "", ""))
    return out if parts.scheme else out.removeprefix("//")


def read_secret(name: str, env: Mapping[str, str] | None = None,
                secrets_path: str | Path = Path(".streamlit") / "secrets.toml") -> str | None:
    """One value from the environment or `.streamlit/secrets.toml` (stripped; None if unset)."""
    env = os.environ if env is None else env
    value = env.get(name) or _read_secrets(Path(secrets_path)).get(name)
    return value.strip() if isinstance(value, str) and value.strip() else None


def load_config(env: Mapping[str, str] | None = None,
                secrets_path: str | Path = Path(".streamlit") / "secrets.toml") -> Config:
    """Config from the environment, falling back to `.streamlit/secrets.toml` for secrets."""
    env = os.environ if env is None else env
    secrets = _read_secrets(Path(secrets_path))

    def get(name: str) -> str | None:
        value = env.get(name) or secrets.get(name)
        return value.strip() if isinstance(value, str) and value.strip() else None

    api_key = get("OPENAI_API_KEY")
    base_url = get("OPENAI_BASE_URL")
    if base_url:
        base_url = check_base_url(base_url)
    provider = get("GYROSCOPE_PROVIDER") or ("openai" if api_key or base_url else "simulator")
    db_path = Path(get("GYROSCOPE_DB") or DEFAULT_DB)
    spill = get("GYROSCOPE_SPILL")
    database_url = get("GYROSCOPE_DATABASE_URL")
    if database_url and database_url.split("://", 1)[0] not in ("postgresql", "postgres"):
        raise ConfigError(f"GYROSCOPE_DATABASE_URL={redact_url(database_url)!r} is not a PostgreSQL URL. "
                          "Set it to postgresql://USER@HOST:5432/DBNAME (the password from PGPASSWORD "
                          "or ~/.pgpass), or unset it to keep everything in the SQLite file.")
    return Config(provider=provider, base_url=base_url, db_path=db_path, api_key=api_key,
                  spill_path=Path(spill) if spill else None, database_url=database_url,
                  redis_url=check_redis_url(get("GYROSCOPE_REDIS_URL")),
                  redis_prefix=get("GYROSCOPE_REDIS_PREFIX") or "gyroscope:",
                  admin_password=get("GYROSCOPE_ADMIN_PASSWORD"),
                  api_token=get("GYROSCOPE_API_TOKEN"))
