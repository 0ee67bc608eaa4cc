"""Training side of seqserve: the recurrent encoder-decoder family, data, training loop, torch decoding."""
