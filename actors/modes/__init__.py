"""The consistency modes: one interface (:mod:`actors.modes.base`), one module per mode,
and the registry that maps the spec's mode name to its class (:mod:`actors.modes.registry`).
"""
