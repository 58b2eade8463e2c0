"""The contract every layer shares: the job spec, the error base class, the job state
vocabulary, and the typed records and events a run produces.

It imports nothing else of this project's, so every other package may import it:
``cli -> api -> service -> actors -> core`` (enforced by import-linter, see pyproject.toml).
"""
