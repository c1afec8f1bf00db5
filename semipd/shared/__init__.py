"""semipd: the project's common library (model, kernels, KV pool, sampling, protocol, client SDK)."""
