"""captchaops.stack."""
