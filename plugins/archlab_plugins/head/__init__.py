"""Head slot plugins: ``medusa`` (the LM head plus draft heads for speculative decoding)."""
