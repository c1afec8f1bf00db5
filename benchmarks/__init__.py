"""GPU benchmarks: scripts run on the GPU machine (benchmarks/gpu_check.sh), never timed tests."""
