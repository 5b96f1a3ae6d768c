"""mlcc.runtime_check."""
