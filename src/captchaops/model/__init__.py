"""captchaops.model."""
