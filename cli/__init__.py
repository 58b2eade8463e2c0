"""The ``elastic-sgd`` command line: the service's HTTP API, plus local runs and drills."""
