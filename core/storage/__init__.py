"""Storage backends beside the default SQLite file (core/db.py), chosen by configuration.

SQLite (core/db.py and the stores built on it) is the default and needs nothing configured.
``GYROSCOPE_DATABASE_URL`` moves history, events, settings, the batch ledger and budgets to
PostgreSQL (postgres.py, pg_history.py, pg_settings.py, pg_ledger.py, pg_budgets.py). ``GYROSCOPE_REDIS_URL`` adds Redis for the state replicas
must share at once: breaker state and half-open probe slots (redis_breaker.py), the
response cache (redis_cache.py), pacing buckets (redis_pacing.py) and announcements of
settings changes (redis_settings.py). redis_link.py holds the connection and says whether
Redis is up; when it is not, every part falls back to its local (SQLite) twin and rejoins
when Redis answers again. doctor.py checks every configured backend (``python -m core doctor``).
"""
