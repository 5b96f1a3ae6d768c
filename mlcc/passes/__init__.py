"""mlcc.passes."""
