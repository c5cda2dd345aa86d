"""captchaops: a self-hosted MLOps pipeline for text-CAPTCHA recognition."""

__version__ = "0.1.0"
