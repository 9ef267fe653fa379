"""Building blocks of the forward pass: norm, rotary, attention over the paged KV cache, linear."""
