#!/usr/bin/env python3
"""PyTorch on the same GPU: the comparison points for kvtrim's CUDA kernels.

Prints markdown tables:
  1. device-to-device copy bandwidth (bytes read + written per second),
  2. bf16 matmul 8192^3 (both operand layouts),
  3. decode attention (one query per sequence) over a contiguous KV cache through
     scaled_dot_product_attention, each backend (cuDNN, flash, memory-efficient, math):
     batch 32 x 8192 cached tokens, Llama-3-8B heads (32 query / 8 kv, dim 128) and SmolLM2-135M
     heads (9 / 3, dim 64). GQA runs natively (enable_gqa=True) where the backend takes it, else
     with K/V expanded to the query heads beforehand (outside the timing; the kernel then reads
     group-times more bytes). GB/s counts the cache as stored: K and V once.

Every input is random (torch.randn), every time is the median of --repeats runs timed with CUDA
events after warm-up. Prints tables, never fails on time; a backend that cannot run a shape says
why in its row.

  python3 tools/gpu/torch_baselines.py            # on the GPU machine
  python3 tools/gpu/torch_baselines.py --small    # a quick check of the script itself (CPU ok)
"""

import argparse
import re
import statistics
import time
import warnings

import torch
import torch.nn.functional as F

# PyTorch appends where in its sources a warning was raised; the reason is the rest.
TRIGGERED_AT = re.compile(r"\(Triggered internally at [^)]*\)")


def timer(device, fn, warmup, repeats):
    """Median milliseconds of fn() over `repeats` runs."""
    for _ in range(warmup):
        fn()
    times = []
    if device.type == "cuda":
        torch.cuda.synchronize()
        for _ in range(repeats):
            start = torch.cuda.Event(enable_timing=True)
            end = torch.cuda.Event(enable_timing=True)
            start.record()
            fn()
            end.record()
            end.synchronize()
            times.append(start.elapsed_time(end))
    else:
        for _ in range(repeats):
            t0 = time.perf_counter()
            fn()
            times.append((time.perf_counter() - t0) * 1e3)
    return statistics.median(times), min(times), max(times)


def copy_table(device, args):
    nbytes = args.copy_mib << 20
    src = torch.randn(nbytes // 4, device=device, dtype=torch.float32)
    dst = torch.empty_like(src)
    med, lo, hi = timer(device, lambda: dst.copy_(src), args.warmup, args.repeats)
    print(f"\n## Device-to-device copy, {args.copy_mib} MiB (GB/s = (read + written) / time)\n")
    print("| method            | median ms | min ms | max ms |   GB/s |")
    print("|-------------------|----------:|-------:|-------:|-------:|")
    gbs = 2 * nbytes / med / 1e6
    print(f"| torch copy_       | {med:9.3f} | {lo:6.3f} | {hi:6.3f} | {gbs:6.0f} |")
    del src, dst
    return gbs


def matmul_table(device, args):
    n = args.gemm_size
    a = torch.randn(n, n, device=device, dtype=torch.bfloat16)
    b = torch.randn(n, n, device=device, dtype=torch.bfloat16)
    flops = 2.0 * n * n * n
    print(f"\n## bf16 matmul {n}^3 (random data)\n")
    print("| operation   | median ms | min ms | max ms | TFLOP/s |")
    print("|-------------|----------:|-------:|-------:|--------:|")
    for name, fn in (("a @ b", lambda: a @ b), ("a @ b.T", lambda: a @ b.T)):
        med, lo, hi = timer(device, fn, args.warmup, args.repeats)
        print(f"| {name:11s} | {med:9.3f} | {lo:6.3f} | {hi:6.3f} | {flops / med / 1e9:7.1f} |")
    del a, b


def backends():
    from torch.nn.attention import SDPBackend

    named = [
        ("cudnn", "CUDNN_ATTENTION"),
        ("flash", "FLASH_ATTENTION"),
        ("efficient", "EFFICIENT_ATTENTION"),
        ("math", "MATH"),
    ]
    return [(name, getattr(SDPBackend, attr)) for name, attr in named if hasattr(SDPBackend, attr)]


def sdpa_rows(device, args, label, batch, tokens, q_heads, kv_heads, head_dim, copy_gbs):
    from torch.nn.attention import sdpa_kernel

    dtype = torch.bfloat16
    q = torch.randn(batch, q_heads, 1, head_dim, device=device, dtype=dtype)
    k = torch.randn(batch, kv_heads, tokens, head_dim, device=device, dtype=dtype)
    v = torch.randn(batch, kv_heads, tokens, head_dim, device=device, dtype=dtype)
    cache_bytes = 2 * k.numel() * k.element_size()
    group = q_heads // kv_heads
    expanded = None
    reference = None
    for name, backend in backends():
        for gqa in ("native", "expanded"):
            if gqa == "expanded":
                if expanded is None:
                    expanded = (k.repeat_interleave(group, dim=1), v.repeat_interleave(group, dim=1))
                kk, vv, kwargs = expanded[0], expanded[1], {}
            else:
                kk, vv, kwargs = k, v, {"enable_gqa": True}

            def run():
                with sdpa_kernel([backend]):
                    return F.scaled_dot_product_attention(q, kk, vv, **kwargs)

            try:
                with warnings.catch_warnings(record=True) as caught:
                    warnings.simplefilter("always")
                    out = run()
                    med, lo, hi = timer(device, run, args.warmup, args.repeats)
            except (RuntimeError, TypeError, ValueError) as error:
                # The backend's own reason comes as a warning; the error itself is generic.
                messages = [TRIGGERED_AT.sub("", str(w.message)) for w in caught]
                specific = [" ".join(m.split()) for m in messages if "No viable backend" not in m]
                specific = [m for m in specific if m]
                reason = "; ".join(specific) or " ".join(str(error).split()) or type(error).__name__
                reason = reason[:200]
                print(f"| {label:9s} | {name:9s} | {gqa:8s} | {'—':>9s} | {'—':>6s} | {'—':>6s} | "
                      f"{'—':>10s} | {'—':>7s} | {reason} |")
                continue
            if reference is None:
                reference = out.float()
            err = ((out.float() - reference).norm() / reference.norm()).item()
            gbs = cache_bytes / med / 1e6
            share = f"{100 * gbs / copy_gbs:6.0f}%" if copy_gbs else "      "
            print(f"| {label:9s} | {name:9s} | {gqa:8s} | {med:9.3f} | {lo:6.3f} | {hi:6.3f} | "
                  f"{gbs:10.0f} | {share:>7s} | rel diff vs first row {err:.1e} |")
            if gqa == "native":
                break  # the native run is the one to beat; expanded only when native fails
    del q, k, v, expanded


def sdpa_table(device, args, copy_gbs):
    batch, tokens = args.batch, args.tokens
    print(f"\n## SDPA decode: batch {batch}, {tokens} cached tokens, 1 query per sequence, bf16, "
          "contiguous (B, H, S, D) cache\n")
    print("GB/s = K and V bytes as stored / time" +
          (f"; 'of copy' against torch copy_ at {copy_gbs:.0f} GB/s" if copy_gbs else "") + ".\n")
    print("| shape     | backend   | gqa      | median ms | min ms | max ms | cache GB/s | of copy | note |")
    print("|-----------|-----------|----------|----------:|-------:|-------:|-----------:|--------:|------|")
    for label, q_heads, kv_heads, head_dim in (("llama3-8b", 32, 8, 128), ("smollm2", 9, 3, 64)):
        sdpa_rows(device, args, label, batch, tokens, q_heads, kv_heads, head_dim, copy_gbs)


def main():
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--repeats", type=int, default=20)
    parser.add_argument("--warmup", type=int, default=3)
    parser.add_argument("--copy-mib", type=int, default=2048)
    parser.add_argument("--gemm-size", type=int, default=8192)
    parser.add_argument("--batch", type=int, default=32)
    parser.add_argument("--tokens", type=int, default=8192)
    parser.add_argument("--small", action="store_true", help="tiny sizes: check the script runs")
    args = parser.parse_args()
    if args.small:
        args.copy_mib, args.gemm_size, args.batch, args.tokens, args.repeats = 8, 256, 2, 64, 3

    device = torch.device("cuda" if torch.cuda.is_available() else "cpu")
    torch.manual_seed(0)
    if device.type == "cuda":
        p = torch.cuda.get_device_properties(device)
        print(f"device: {p.name}, {p.multi_processor_count} SMs, {p.total_memory / 2**30:.1f} GiB, "
              f"torch {torch.__version__}, CUDA {torch.version.cuda}, "
              f"cuDNN {torch.backends.cudnn.version()}")
    else:
        print(f"device: CPU (no CUDA device), torch {torch.__version__}: a check of the script only")
    copy_gbs = copy_table(device, args)
    matmul_table(device, args)
    sdpa_table(device, args, copy_gbs)


if __name__ == "__main__":
    main()
