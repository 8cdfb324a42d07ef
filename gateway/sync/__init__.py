"""The sync adapter: the HTTP endpoint Dovecot (oauth2 passdb) and nginx (mail auth_http)
ask at every IMAP or POP3 login. Beside smtp/; what a login means is in gateway/logins.py.
"""
