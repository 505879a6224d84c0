"""hessc.passes."""
