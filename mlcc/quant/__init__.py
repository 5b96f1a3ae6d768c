"""mlcc.quant."""
