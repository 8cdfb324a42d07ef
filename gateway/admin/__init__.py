"""The admin API (/api/v1 on the admin listener): held mail, devices, policies, impact."""
