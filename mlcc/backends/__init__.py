"""mlcc.backends."""
