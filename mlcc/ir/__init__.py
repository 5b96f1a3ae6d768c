"""mlcc.ir."""
