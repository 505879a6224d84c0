"""hessc.ir."""
