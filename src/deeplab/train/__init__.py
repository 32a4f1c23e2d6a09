"""Training: the loop and the named steps it is composed of (optimizer, loss, resume, logging, loader, distributed)."""
