"""The decode worker process: continuous batching over handed-off sequences."""
