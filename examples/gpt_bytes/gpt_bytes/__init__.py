"""gpt_bytes: an elastic-sgd task package, a GPT-style byte-level language model trained on
the Python standard library's own source files (present wherever Python is).

A job uses it as ``task: {entrypoint: "gpt_bytes.task:build", params: {...}}``; see
:mod:`gpt_bytes.task` for the params, :mod:`gpt_bytes.model` for the network and
:mod:`gpt_bytes.data` for the corpus, its fixed split by file and its memory use.
"""
