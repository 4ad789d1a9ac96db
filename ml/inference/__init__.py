"""Generation: request types, tokens and text streams, sampling, batch invariance, decode loops,
the load-time self-check, the model cache and the batching engine (one module each)."""
