"""The `captchaops` command: thin typer wrappers over the stage functions.

Each submodule adds its commands to the one `app` in `base`; what they print is shaped in
`captchaops.console`.
"""

from __future__ import annotations

import os

# The import order is the order `captchaops --help` lists the commands in.
# isort: off
from captchaops.cli.base import app, parse_length
from captchaops.cli import stack, training, scaleout, registry, bring_your_model, users
# isort: on

__all__ = [
    "app",
    "bring_your_model",
    "main",
    "parse_length",
    "registry",
    "scaleout",
    "stack",
    "training",
    "users",
]


def main() -> None:
    """Console-script entry point: user errors become one line, never a traceback."""
    os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "2")  # TensorFlow's C++ start-up chatter
    # MLflow prints run links with the tracking URI (credentials included) to stdout.
    os.environ.setdefault("MLFLOW_SUPPRESS_PRINTING_URL_TO_STDOUT", "true")
    app()


if __name__ == "__main__":
    main()
