"""The sockets Postfix and Dovecot call (auth, SASL relay, socketmap, milter) and the web page."""
