"""Linear-slot plugins: ternary (BitNet b1.58) projections and their 2-bit packing."""
