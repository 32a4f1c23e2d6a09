"""Deployment: export formats, inference optimisations, runtimes with parity checks."""
