"""captchaops.webapp."""
