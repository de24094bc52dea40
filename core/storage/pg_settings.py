"""Settings (versioned, audited) in PostgreSQL: one store for every replica.

The write is the SQLite store's (core/settings.py ``_write_values``: the values, one audit
event per change, the version bumped in ``meta``), run under a transaction-scoped advisory
lock so that two replicas changing settings at once get two versions, not one twice. Every
replica re-reads when the version changes (checked at most every ``ttl`` s).
"""

from __future__ import annotations

import json

from ..settings import BY_NAME, SETTINGS, SettingsStore, Snapshot, _write_values

_SETTINGS_LOCK = 0x67797374    # pg_advisory_xact_lock key ("gyst")


class PgSettingsStore(SettingsStore):
    """SettingsStore over a PgDatabase."""

    def _read(self, snap: Snapshot | None, query_one) -> Snapshot:
        row = query_one("SELECT value FROM meta WHERE key = 'settings_version'")
        version = int(row["value"]) if row else 0
        if snap is not None and snap.version == version:
            return snap
        row = query_one("SELECT json_object_agg(name, value)::text AS v FROM settings")
        values = Snapshot({s.name: s.default for s in SETTINGS})
        for name, value in json.loads(row["v"] if row and row["v"] else "{}").items():
            if name in BY_NAME:
                values[name] = json.loads(value)
        values.version = version
        return values

    @staticmethod
    def _write(conn, parsed: dict, actor: str | None) -> int:
        conn.execute("SELECT pg_advisory_xact_lock(?)", (_SETTINGS_LOCK,))
        return _write_values(conn, parsed, actor)
