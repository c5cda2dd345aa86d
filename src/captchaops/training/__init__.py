"""Training pieces that need no MLflow: the presets and the fitting loop.

`captchaops.training.run` runs them inside an MLflow run; anything here also runs on a machine that
has only Keras and a backend (for example a GPU box with JAX).
"""


class TrainError(RuntimeError):
    """Training cannot start or finish (the message says how to fix it)."""
