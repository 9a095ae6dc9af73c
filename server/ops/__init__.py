"""Operations: readiness, metrics, telemetry, logs and background jobs."""
