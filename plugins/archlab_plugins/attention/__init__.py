"""Attention slot plugins: ``mla`` (Multi-head Latent Attention)."""
