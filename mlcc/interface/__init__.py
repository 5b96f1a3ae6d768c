"""mlcc.interface."""
