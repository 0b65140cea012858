#!/usr/bin/env python3
"""How the time per byte of a read grows as the read shrinks, on this GPU.

For a batch of --batch decode queries over T cached tokens at Llama-3-8B's heads (32 query / 8
kv, head dim 128, bf16), for each T of --tokens, the same K/V bytes are read three ways:
  sdpa   scaled_dot_product_attention on a contiguous (B, H, T, D) cache, the fastest of the
         cuDNN and flash backends (native GQA);
  sum    torch.sum over the K and V tensors (one pass over the bytes; the lower bound of any
         kernel that reads them once);
  copy   a device-to-device copy of half the bytes (the K tensor into a spare: the same bytes
         read + written).
Each size is laid out over enough copies (at least --rotate_mib in all) that successive runs
read different copies and none finds its bytes in L2. Times are the median of --repeats runs
timed with CUDA events after --warmup. "per byte" is the row's time per byte against the same
method's at the largest T: what a launch of that size pays over a long one. Prints tables; never
fails on time.

  python3 tools/gpu/read_rate.py --tokens 8192,4096,2048,983,746
"""

import argparse
import statistics

import torch
import torch.nn.functional as F


def timed(fn, runs, warmup, repeats):
    """Median ms of fn(i) for run i, i over warmup + repeats."""
    for i in range(warmup):
        fn(i)
    torch.cuda.synchronize()
    times = []
    for i in range(repeats):
        start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
        start.record()
        fn(warmup + i)
        end.record()
        end.synchronize()
        times.append(start.elapsed_time(end))
    return statistics.median(times)


def main():
    parser = argparse.ArgumentParser(description=__doc__,
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--batch", type=int, default=32)
    parser.add_argument("--tokens", default="8192,4096,2048,983,746")
    parser.add_argument("--rotate_mib", type=int, default=1024)
    parser.add_argument("--repeats", type=int, default=20)
    parser.add_argument("--warmup", type=int, default=3)
    args = parser.parse_args()
    from torch.nn.attention import SDPBackend, sdpa_kernel

    device = torch.device("cuda")
    dtype = torch.bfloat16
    q_heads, kv_heads, head_dim, batch = 32, 8, 128, args.batch
    sizes = sorted((int(t) for t in args.tokens.split(",")), reverse=True)
    print(f"device: {torch.cuda.get_device_name()}, torch {torch.__version__}\n")
    print(f"## Reading the K/V of a batch of {batch} at Llama-3-8B's heads, by cached tokens\n")
    print("| tokens | MB | sdpa ms | sdpa GB/s | sdpa per byte | sum ms | sum GB/s | sum per byte |"
          " copy ms | copy GB/s | copy per byte |")
    print("|--:|--:|--:|--:|--:|--:|--:|--:|--:|--:|--:|")
    base = None
    for tokens in sizes:
        q = torch.randn(batch, q_heads, 1, head_dim, device=device, dtype=dtype)
        shape = (batch, kv_heads, tokens, head_dim)
        one = 2 * batch * kv_heads * tokens * head_dim * 2  # K and V bytes
        copies = max(1, -(-(args.rotate_mib << 20) // one))
        ks = [torch.randn(shape, device=device, dtype=dtype) for _ in range(copies)]
        vs = [torch.randn(shape, device=device, dtype=dtype) for _ in range(copies)]
        spare = torch.empty(shape, device=device, dtype=dtype)

        best = None
        for backend in (SDPBackend.CUDNN_ATTENTION, SDPBackend.FLASH_ATTENTION):
            def sdpa(i, backend=backend):
                with sdpa_kernel([backend]):
                    F.scaled_dot_product_attention(q, ks[i % copies], vs[i % copies],
                                                   enable_gqa=True)
            try:
                ms = timed(sdpa, copies, args.warmup, args.repeats)
            except RuntimeError:
                continue
            best = ms if best is None else min(best, ms)

        def total(i):
            torch.sum(ks[i % copies], dtype=torch.float32)
            torch.sum(vs[i % copies], dtype=torch.float32)

        def copy(i):
            spare.copy_(ks[i % copies])

        sum_ms = timed(total, copies, args.warmup, args.repeats)
        copy_ms = timed(copy, copies, args.warmup, args.repeats)
        row = (best, sum_ms, copy_ms)
        if base is None:
            base = [None if ms is None else ms / one for ms in row]  # ms per byte
        cells = [f"{tokens}", f"{one / 1e6:.1f}"]
        for ms, per_byte in zip(row, base):
            if ms is None:
                cells += ["—", "—", "—"]
                continue
            ratio = f"{ms / one / per_byte:.2f}" if per_byte else "—"
            cells += [f"{ms:.4f}", f"{one / ms / 1e6:.0f}", ratio]
        print("| " + " | ".join(cells) + " |", flush=True)
        del ks, vs, spare, q
        torch.cuda.empty_cache()


if __name__ == "__main__":
    main()
