"""captchaops.serving."""
