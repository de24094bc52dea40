"""Settings (versioned, audited) in PostgreSQL: one store for every replica.

Reads and writes are the SQLite store's; only the SQL that gathers all values differs. The
write (core/settings.py ``_write_values``: the values, one audit event per change, the
version bumped in ``meta``) runs under a transaction-scoped advisory lock so that two
replicas changing settings at once get two versions, not one twice. Every
replica re-reads when the version changes (checked at most every ``ttl`` s).
"""

from __future__ import annotations

from ..settings import SettingsStore, _write_values

_SETTINGS_LOCK = 0x67797374    # pg_advisory_xact_lock key ("gyst")


class PgSettingsStore(SettingsStore):
    """SettingsStore over a PgDatabase."""

    _ALL_VALUES_SQL = "SELECT json_object_agg(name, value)::text AS v FROM settings"

    @staticmethod
    def _write(conn, parsed: dict, actor: str | None) -> int:
        conn.execute("SELECT pg_advisory_xact_lock(?)", (_SETTINGS_LOCK,))
        return _write_values(conn, parsed, actor)
