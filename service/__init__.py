"""The job service: specs, job lifecycle, persistence, Ray connection, CLI."""
