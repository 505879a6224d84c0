"""hessc.runtime."""
