"""cnn_digits: an elastic-sgd task package, a small CNN with BatchNorm and dropout on
scikit-learn's 8x8 handwritten digits, read as 1x8x8 images.

A job uses it as ``task: {entrypoint: "cnn_digits.task:build", params: {...}}``; see
:mod:`cnn_digits.task`.
"""
