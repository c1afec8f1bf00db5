"""The prefill worker process: waiting queue, token-budget batches, first tokens."""
