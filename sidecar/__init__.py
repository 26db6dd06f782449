"""autoport: move a mail service onto Postfix + Dovecot one login at a time."""

__version__ = "0.1.0"
