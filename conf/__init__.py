"""Hydra configs of archlab (a package so Hydra finds them as resources from any directory)."""
