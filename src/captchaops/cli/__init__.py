"""The `captchaops` command: thin typer wrappers over the stage functions.

`base.COMMANDS` names the module of each command; the root command imports that module only
when its command runs. Each module adds its commands to the one `app` in `base`; what they
print is shaped in `captchaops.console`.
"""

from __future__ import annotations

import os

from captchaops.cli.base import app, parse_length

__all__ = ["app", "main", "parse_length"]


def main() -> None:
    """Console-script entry point: user errors become one line, never a traceback."""
    os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "2")  # TensorFlow's C++ start-up chatter
    # MLflow prints run links with the tracking URI (credentials included) to stdout.
    os.environ.setdefault("MLFLOW_SUPPRESS_PRINTING_URL_TO_STDOUT", "true")
    app()


if __name__ == "__main__":
    main()
