"""Settings (versioned, audited) in PostgreSQL: one store for every replica.

Reads and writes are the SQLite store's; only the SQL that gathers all values differs. The
write (core/settings.py ``_write_values``: the values, one audit event per change, the
version bumped in ``meta``) runs under a transaction-scoped advisory lock so that two
replicas changing settings at once get two versions, not one twice. Every
replica re-reads when the version changes (checked at most every ``ttl`` s).

While the server cannot be reached, a change is refused and changes nothing: the settings in
force (the last snapshot read) stay, in this replica and every other. A change kept here alone
would split the replicas, and one spooled for later would apply long after whoever made it
saw it answered. The message says to try again once the database is back.
"""

from __future__ import annotations

from typing import Any

from ..errors import StorageError
from ..settings import SettingsStore, _write_values
from .postgres import DatabaseUnreachable

_SETTINGS_LOCK = 0x67797374    # pg_advisory_xact_lock key ("gyst")


class PgSettingsStore(SettingsStore):
    """SettingsStore over a PgDatabase."""

    _ALL_VALUES_SQL = "SELECT json_object_agg(name, value)::text AS v FROM settings"

    def set_many(self, values: dict[str, Any], actor: str | None = None) -> int:
        """SettingsStore's, refused with what to do while PostgreSQL cannot be reached."""
        try:
            return super().set_many(values, actor)
        except DatabaseUnreachable as exc:
            raise StorageError(
                f"Settings cannot be changed right now: the PostgreSQL database {self.db.path} that "
                "holds them for every replica cannot be reached. Nothing was changed; the settings "
                "in force stay. Try again once it is back (/api/health and `python -m core doctor` "
                "say when).", detail=exc.detail) from exc

    @staticmethod
    def _write(conn, parsed: dict, actor: str | None) -> int:
        conn.execute("SELECT pg_advisory_xact_lock(?)", (_SETTINGS_LOCK,))
        return _write_values(conn, parsed, actor)
