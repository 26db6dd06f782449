"""Postfix and Dovecot: rendered configuration and every command run against them."""
