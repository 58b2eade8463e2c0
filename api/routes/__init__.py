"""One router per resource: jobs, drills, health, metrics, dashboard."""

from typing import Any


def links(param: str, **operations: str) -> dict[str, Any]:
    """OpenAPI links from a created resource's ``id`` to the operations that take it as
    ``param`` (``name=operationId``): schema-driven clients and fuzzers follow them."""
    return {
        name: {"operationId": op, "parameters": {param: "$response.body#/id"}}
        for name, op in operations.items()
    }
