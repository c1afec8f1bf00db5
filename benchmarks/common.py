"""What every GPU benchmark needs: the machine's measured ceilings, CUDA-event timing and the
host's time to issue work."""

import time

import torch


def cuda_time_ms(fn, warmup: int = 3, repeat: int = 10) -> float:
    """Median milliseconds of fn() between CUDA events, after warm-up."""
    for _ in range(warmup):
        fn()
    times = []
    for _ in range(repeat):
        start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
        start.record()
        fn()
        end.record()
        end.synchronize()
        times.append(start.elapsed_time(end))
    return sorted(times)[len(times) // 2]


def host_time_ms(fn, repeat: int = 5) -> float:
    """Median milliseconds the host spends in fn() issuing its work, the GPU idle when it starts:
    a GPU time no longer than this means the host, not the GPU, sets the pace."""
    times = []
    for _ in range(repeat):
        torch.cuda.synchronize()
        start = time.perf_counter()
        fn()
        times.append((time.perf_counter() - start) * 1e3)
    torch.cuda.synchronize()
    return sorted(times)[len(times) // 2]


def measure_ceilings() -> dict:
    """bf16 matmul rate (8192^3 on random data) and device-to-device copy bandwidth."""
    n = 8192
    a = torch.randn(n, n, device="cuda", dtype=torch.bfloat16)
    b = torch.randn(n, n, device="cuda", dtype=torch.bfloat16)
    mm_ms = cuda_time_ms(lambda: a @ b, warmup=5, repeat=20)
    src = torch.randn(1 << 30, device="cuda", dtype=torch.bfloat16)  # 2 GiB
    dst = torch.empty_like(src)
    copy_ms = cuda_time_ms(lambda: dst.copy_(src), warmup=3, repeat=10)
    del a, b, src, dst
    torch.cuda.empty_cache()
    return {"matmul_tflops": 2 * n ** 3 / mm_ms / 1e9,
            "copy_tbps": 2 * (1 << 30) * 2 / copy_ms / 1e9,
            "device": torch.cuda.get_device_name(), "sms": torch.cuda.get_device_properties(0).multi_processor_count}
