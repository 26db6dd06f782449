"""Login policy: login mapping, hashes, caches, and where an account lives (routing decision)."""
