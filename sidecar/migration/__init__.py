"""Moving one account: job runner, copier, held-mail release, Sieve copy."""
