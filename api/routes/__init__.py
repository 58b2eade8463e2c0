"""One router per resource: jobs, drills, health, metrics, dashboard."""
