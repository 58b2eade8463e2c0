"""The HTTP face of elastic-sgd: FastAPI app, routes per resource, dashboard page."""
