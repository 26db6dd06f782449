"""The operator's side: the CLI, report, doctor, finalize and bulk actions."""
