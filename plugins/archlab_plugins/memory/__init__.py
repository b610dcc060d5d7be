"""Memory slot plugins: ``engram`` (hashed n-gram conditional memory)."""
