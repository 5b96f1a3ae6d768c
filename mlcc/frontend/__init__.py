"""mlcc.frontend."""
