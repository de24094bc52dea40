"""Storage backends beside the default SQLite file (core/db.py): PostgreSQL (postgres.py,
pg_history.py, pg_settings.py) and Redis, chosen by configuration."""
