"""MLflow only (no Ray): the client, a sweep's run lifecycle, and finished runs read back into
typed trial records."""
