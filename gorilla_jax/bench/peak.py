"""The measured peak: FLOP/s of one large matrix product on the benchmark's own device.

MFU in the benchmark tables is relative to this number, measured in the same run (and, in
``bench compare``, in every round next to the timed steps, so both see the same machine
load), not to a vendor figure: a 2-core CPU VM has no published peak.

``matmul_peak(framework, n=2048, dtype="float32")`` times an ``n x n @ n x n`` product (2 n^3
FLOPs) ``repeats`` times after one warm-up and returns the best and median rates. The best rate
is the peak: a faster run is the machine's capability, slower ones are interference.
"""
from __future__ import annotations

import time

DEFAULT_N = {"cpu": 2048, "gpu": 8192, "tpu": 8192}


def _rates(seconds: list[float], flops: float) -> dict:
    ordered = sorted(seconds)
    return {"flops_per_sec": flops / ordered[0],
            "median_flops_per_sec": flops / ordered[len(ordered) // 2], "seconds": seconds}


def jax_matmul_peak(n: int | None = None, dtype: str = "float32", repeats: int = 5) -> dict:
    import jax
    import jax.numpy as jnp

    backend = jax.default_backend()
    n = n or DEFAULT_N.get(backend, 2048)
    key_a, key_b = jax.random.split(jax.random.PRNGKey(0))
    a = jax.random.normal(key_a, (n, n), jnp.dtype(dtype))
    b = jax.random.normal(key_b, (n, n), jnp.dtype(dtype))
    f = jax.jit(lambda x, y: x @ y)
    f(a, b).block_until_ready()
    seconds = []
    for _ in range(repeats):
        t0 = time.perf_counter()
        f(a, b).block_until_ready()
        seconds.append(time.perf_counter() - t0)
    return {"framework": "jax", "device": backend, "n": n, "dtype": dtype,
            **_rates(seconds, 2.0 * n ** 3)}


def torch_matmul_peak(n: int | None = None, dtype: str = "float32", repeats: int = 5) -> dict:
    import torch

    cuda = torch.cuda.is_available()
    device = "cuda" if cuda else "cpu"
    n = n or DEFAULT_N["gpu" if cuda else "cpu"]
    gen = torch.Generator(device="cpu").manual_seed(0)
    dt = getattr(torch, dtype)
    a = torch.randn((n, n), generator=gen).to(device=device, dtype=dt)
    b = torch.randn((n, n), generator=gen).to(device=device, dtype=dt)

    def sync():
        if cuda:
            torch.cuda.synchronize()

    a @ b
    sync()
    seconds = []
    for _ in range(repeats):
        t0 = time.perf_counter()
        a @ b
        sync()
        seconds.append(time.perf_counter() - t0)
    return {"framework": "torch", "device": "gpu" if cuda else "cpu", "n": n, "dtype": dtype,
            **_rates(seconds, 2.0 * n ** 3)}


def matmul_peak(framework: str, n: int | None = None, dtype: str = "float32",
                repeats: int = 5) -> dict:
    """The peak of ``framework`` ("jax" or "torch"/"torch-compile") on its default device."""
    if framework == "jax":
        return jax_matmul_peak(n, dtype, repeats)
    return torch_matmul_peak(n, dtype, repeats)
