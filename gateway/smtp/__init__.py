"""The SMTP adapter: the only package that imports aiosmtpd."""
