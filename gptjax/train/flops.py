"""Training FLOPs per token and the peak FLOP/s a device can reach, for the MFU that
train.py logs and the benchmark reports."""

from __future__ import annotations

import time

import jax
import jax.numpy as jnp


def flops_per_token(cfg) -> float:
    """Training FLOPs per token: 6 N + 6 L T D.

    N counts the matmul parameters (the blocks' weight matrices and the tied
    output projection V x D; not the position table or biases): each is used
    in one multiply-add forward and two backward, 6 FLOPs per token. Causal
    attention's score and value matmuls add 2 * 2 * T * D per layer forward
    for a full T x T, half of it under the causal mask, times 3 for
    forward + backward: 6 L T D. (The PaLM/nanoGPT convention counts the full
    square, 12 L T D; `flops_per_token(cfg) + 6 L T D` gives that.)
    """
    D, F, L, V, T = cfg.n_embd, cfg.mlp_width, cfg.n_layer, cfg.vocab_size, cfg.n_ctx
    matmul_params = L * (4 * D * D + 2 * D * F) + V * D
    return 6.0 * matmul_params + 6.0 * L * T * D


DATASHEET_PEAK_FLOPS = {  # dense bf16 peak per device, from the vendors' data sheets
    "H100": 989e12, "H200": 989e12, "A100": 312e12, "A10G": 125e12, "L4": 121e12,
    "V100": 125e12, "TPU v4": 275e12, "TPU v5 lite": 197e12, "TPU v5e": 197e12,
    "TPU v5p": 459e12, "TPU v6": 918e12,
}


def datasheet_peak_flops(device=None) -> float | None:
    """The data sheet's dense bf16 FLOP/s for a known accelerator, else None."""
    device = device or jax.local_devices()[0]
    kind = getattr(device, "device_kind", "")
    for name, peak in DATASHEET_PEAK_FLOPS.items():
        if name.lower() in kind.lower():
            return peak
    return None


def device_peak_flops(device=None, dtype: str = "float32") -> float:
    """Peak FLOP/s of one device: the data-sheet figure, or on CPU a measured matmul rate
    in the compute dtype (a CPU with bfloat16 instructions multiplies bfloat16 faster
    than float32, so the dtype matters)."""
    return datasheet_peak_flops(device) or measured_matmul_flops(dtype)


_MEASURED: dict[str, float] = {}  # dtype -> FLOP/s, measured once per process
MATMUL_PEAK_N = 1024


def measured_matmul_flops(dtype: str = "float32", rounds: int = 5, repeats: int = 4) -> float:
    """The best rate of a jitted MATMUL_PEAK_N^3 matmul in `dtype` over `rounds` rounds,
    accumulating in float32 as the model's products do (cached per dtype): the CPU's
    practical peak, shared by train.py's logged MFU and the benchmark."""
    if dtype not in _MEASURED:
        n = MATMUL_PEAK_N
        a = jnp.ones((n, n), dtype)
        f = jax.jit(lambda x: jnp.dot(x, x, preferred_element_type=jnp.float32))
        f(a).block_until_ready()
        best = float("inf")
        for _ in range(rounds):
            start = time.perf_counter()
            for _ in range(repeats):
                out = f(a)
            out.block_until_ready()
            best = min(best, (time.perf_counter() - start) / repeats)
        _MEASURED[dtype] = 2 * n**3 / best
    return _MEASURED[dtype]
