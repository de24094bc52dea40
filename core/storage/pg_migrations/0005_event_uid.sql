-- Events (core/history.py History.event) carry a unique id, so an event spooled to the spill
-- journal while the database was unreachable is inserted once however often the journal is
-- replayed (a crash between the replay's commit and the journal's emptying). Events written
-- otherwise (the settings' audit, the demo history) have none: NULLs never clash.
ALTER TABLE events ADD COLUMN uid text;
CREATE UNIQUE INDEX idx_events_uid ON events (uid);
