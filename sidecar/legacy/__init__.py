"""Everything that talks to the legacy server: IMAP, POP3, SMTP AUTH and ManageSieve clients."""
