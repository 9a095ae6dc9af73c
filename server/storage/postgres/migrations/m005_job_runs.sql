-- Periodic jobs (retention, scheduled backups) claim their period here, so that
-- they run once per cluster, not once per replica.
CREATE TABLE job_runs (
    name TEXT PRIMARY KEY,
    last_run_ms BIGINT NOT NULL
);
