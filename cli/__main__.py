"""``python -m cli``: the same as the ``elastic-sgd`` command."""

from cli.main import app

app()
