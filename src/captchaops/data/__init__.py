"""captchaops.data."""
