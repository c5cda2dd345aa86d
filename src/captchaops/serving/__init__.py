"""Model servers: one per registry alias, MLflow scoring protocol, hot swap without restarts."""

from captchaops.serving.app import ServeError, create_app, run

__all__ = ["ServeError", "create_app", "run"]
