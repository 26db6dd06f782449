"""Test harness shared by tests/unit and tests/e2e: labs, mail clients, helpers."""
