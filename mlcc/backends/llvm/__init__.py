"""mlcc.backends.llvm."""
