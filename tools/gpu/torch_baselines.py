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
  4. causal prefill attention through scaled_dot_product_attention (is_causal=True, native GQA),
     each backend: --prefill-batch x --tokens new tokens from an empty cache, the same two head
     shapes; TFLOP/s counts the causal half of Q Kᵀ and P V, as cuda_prefill_attention_bench does.
  5. Hugging Face transformers end to end (eager, bf16, attn_implementation="sdpa", StaticCache) on
     a Llama-3-8B shape with random weights, batch 8 x 8192-token prompts: prefill tokens/s (one
     forward over the whole batch into the cache, only the last position's logits computed) and
     decode ms per step (one token per sequence, continuing from the prompt), against the decode
     roofline: (weights read per step + KV bytes of the context) / the copy rate of table 1. The
     weights read are all but the input embedding (a gather), as tests/bench/serve_bench.cc counts
     them. Skipped, with a row saying why, where transformers is not installed.

Every input is random (torch.randn), every time is the median of --repeats runs timed with CUDA
events after warm-up (a transformers prefill: the median of 3 after one warm-up). Prints tables,
never fails on time; a backend that cannot run a shape says why in its row.

  python3 tools/gpu/torch_baselines.py            # on the GPU machine
  python3 tools/gpu/torch_baselines.py --small    # a quick check of the script itself (CPU ok)
"""

import argparse
import inspect
import re
import statistics
import time
import warnings

import torch
import torch.nn.functional as F

# PyTorch appends where in its sources a warning was raised; the reason is the rest.
TRIGGERED_AT = re.compile(r"\(Triggered internally at [^)]*\)")

# Timed prefills per transformers row: one is seconds at the full shape.
PREFILL_REPEATS = 3

# Llama-3-8B (meta-llama/Meta-Llama-3-8B config.json) and, for --small, the same structure shrunk.
LLAMA3_8B = dict(hidden_size=4096, intermediate_size=14336, num_hidden_layers=32,
                 num_attention_heads=32, num_key_value_heads=8, vocab_size=128256)
LLAMA_TINY = dict(hidden_size=64, intermediate_size=128, num_hidden_layers=2, num_attention_heads=4,
                  num_key_value_heads=2, vocab_size=256)


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


def sdpa_prefill_table(device, args):
    from torch.nn.attention import sdpa_kernel

    batch, tokens = args.prefill_batch, args.tokens
    print(f"\n## SDPA causal prefill: batch {batch} x {tokens} new tokens, bf16, (B, H, S, D), "
          "enable_gqa=True\n")
    print("| shape     | backend   | median ms | min ms | TFLOP/s | query tokens/s | note |")
    print("|-----------|-----------|----------:|-------:|--------:|---------------:|------|")
    dtype = torch.bfloat16
    for label, q_heads, kv_heads, head_dim in (("llama3-8b", 32, 8, 128), ("smollm2", 9, 3, 64)):
        q = torch.randn(batch, q_heads, tokens, head_dim, device=device, dtype=dtype)
        k = torch.randn(batch, kv_heads, tokens, head_dim, device=device, dtype=dtype)
        v = torch.randn(batch, kv_heads, tokens, head_dim, device=device, dtype=dtype)
        flops = 4.0 * q_heads * head_dim * batch * tokens * (tokens + 1) / 2
        for name, backend in backends():
            if name == "math":
                continue  # materializes the batch x heads x tokens^2 scores: tens of GB here

            def run():
                with sdpa_kernel([backend]):
                    return F.scaled_dot_product_attention(q, k, v, is_causal=True, enable_gqa=True)

            try:
                with warnings.catch_warnings():
                    warnings.simplefilter("ignore")
                    med, lo, _ = timer(device, run, args.warmup, max(3, args.repeats // 4))
            except (RuntimeError, TypeError, ValueError) as error:
                reason = " ".join(str(error).split())[:200] or type(error).__name__
                print(f"| {label:9s} | {name:9s} | {'—':>9s} | {'—':>6s} | {'—':>7s} | "
                      f"{'—':>14s} | {reason} |")
                continue
            print(f"| {label:9s} | {name:9s} | {med:9.3f} | {lo:6.3f} | "
                  f"{flops / med / 1e9:7.1f} | {batch * tokens / med * 1e3:14.0f} | |")
        del q, k, v


def llama_model(config, device):
    """LlamaForCausalLM with random weights, built on `device` in bf16: the default dtype is bf16
    while the modules are made (as from_config does), so no fp32 copy of 8B weights ever exists.
    The weights are transformers' default init (normal, std 0.02; norms 1)."""
    from transformers import LlamaForCausalLM

    previous = torch.get_default_dtype()
    torch.set_default_dtype(torch.bfloat16)
    try:
        with device:
            model = LlamaForCausalLM(config)
    finally:
        torch.set_default_dtype(previous)
    return model.eval()


def static_cache(config, batch, max_cache_len, device):
    """A StaticCache in any transformers since 4.42. Up to 4.55 its constructor takes the batch
    (`max_batch_size`, or `batch_size` in 4.44-4.47), the device and the dtype (fp32 unless given)
    and allocates at once; from 4.56 it takes `max_cache_len` only (the rest lands in **kwargs,
    unused) and allocates on the first update, from the keys' shape, dtype and device."""
    from transformers import StaticCache

    accepted = inspect.signature(StaticCache.__init__).parameters
    kwargs = {"config": config, "max_cache_len": max_cache_len}
    batch_keyword = next((k for k in ("batch_size", "max_batch_size") if k in accepted), None)
    if batch_keyword:
        kwargs[batch_keyword] = batch
    if "device" in accepted:
        kwargs["device"] = device
    if "dtype" in accepted:
        kwargs["dtype"] = torch.bfloat16
    return StaticCache(**kwargs)


def forward_keywords(model):
    """The version-dependent keywords of the model's forward: the one that limits the logits to the
    last positions (`num_logits_to_keep` in 4.45-4.49, `logits_to_keep` since; None before) and
    whether it takes `cache_position` (dropped in 5.x, where the cache counts its own tokens)."""
    accepted = inspect.signature(model.forward).parameters
    logits = next((k for k in ("logits_to_keep", "num_logits_to_keep") if k in accepted), None)
    return logits, "cache_position" in accepted


def transformers_timings(model, config, device, args, max_cache_len):
    """Median prefill ms and decode ms per step, and a note on how they were run."""
    batch, prompt = args.transformers_batch, args.transformers_prompt
    cache = static_cache(config, batch, max_cache_len, device)
    logits_keyword, takes_cache_position = forward_keywords(model)
    # Without it, the prefill's logits alone would be batch x prompt x vocab (16.8 GB bf16).
    keep_last = {logits_keyword: 1} if logits_keyword else {}
    positions = torch.arange(max_cache_len, device=device)
    prompt_ids = torch.randint(config.vocab_size, (batch, prompt), device=device)
    next_ids = torch.randint(config.vocab_size, (batch, 1), device=device)

    def forward(ids, start):
        where = {}
        if takes_cache_position:
            where["cache_position"] = positions[start:start + ids.shape[1]]
        return model(input_ids=ids, past_key_values=cache, use_cache=True, **keep_last, **where)

    def prefill():
        cache.reset()  # zeroes the cache (8.6 GB at the full shape): ~0.1% of the prefill
        return forward(prompt_ids, 0)

    # The warm-up, which also checks that the random weights give finite logits.
    finite = bool(torch.isfinite(prefill().logits).all())
    prefill_ms = timer(device, prefill, 0, PREFILL_REPEATS)[0]
    # The cache now holds the prompt; each step, warm-ups included, appends one token per sequence.
    decode_positions = iter(range(prompt, max_cache_len))

    def decode_step():
        return forward(next_ids, next(decode_positions))

    decode_ms = timer(device, decode_step, args.warmup, args.transformers_steps)[0]
    notes = [f"attention {getattr(model.config, '_attn_implementation', '?')}",
             f"{logits_keyword}=1" if logits_keyword else "all logits (no logits_to_keep)",
             "logits finite" if finite else "NaN/inf in the logits"]
    return prefill_ms, decode_ms, "; ".join(notes)


def transformers_measure(device, args):
    """(prefill ms, decode ms per step, weight and KV bytes read per decode step, note)."""
    from transformers import LlamaConfig

    batch, prompt = args.transformers_batch, args.transformers_prompt
    steps = args.transformers_steps
    # Room for the prompt and every decode step, warm-ups included.
    max_cache_len = prompt + args.warmup + steps
    config = LlamaConfig(**(LLAMA_TINY if args.small else LLAMA3_8B),
                         max_position_embeddings=max(8192, max_cache_len), rms_norm_eps=1e-5,
                         rope_theta=500000.0, tie_word_embeddings=False, attn_implementation="sdpa")
    model = llama_model(config, device)
    with torch.inference_mode():
        prefill_ms, decode_ms, note = transformers_timings(model, config, device, args,
                                                           max_cache_len)

    embedding = model.get_input_embeddings().weight
    weight_bytes = sum(p.numel() * p.element_size() for p in model.parameters()
                       if p is not embedding or config.tie_word_embeddings)
    head_dim = getattr(config, "head_dim", None) or config.hidden_size // config.num_attention_heads
    # K and V of every layer, in bf16 like the weights.
    token_kv_bytes = (2 * config.num_hidden_layers * config.num_key_value_heads * head_dim
                      * embedding.element_size())
    # The context at the middle of the timed steps. The static cache's attention reads all
    # max_cache_len slots under a mask: (warmup + steps) / prompt more, 0.2% at the full shape.
    kv_bytes = batch * (prompt + args.warmup + steps / 2) * token_kv_bytes
    return prefill_ms, decode_ms, weight_bytes, kv_bytes, note


def transformers_table(device, args, copy_gbs):
    batch, prompt = args.transformers_batch, args.transformers_prompt
    shape = "tiny Llama (--small)" if args.small else "Llama-3-8B shape"
    print(f"\n## Hugging Face transformers: {shape}, random weights, bf16, SDPA, static cache\n")
    row, reason = None, None
    try:
        import transformers
    except ImportError as error:
        transformers, reason = None, f"transformers not installed ({error})"
    version = transformers.__version__ if transformers is not None else "not installed"
    print(f"transformers {version}, torch {torch.__version__}. Prefill: median of "
          f"{PREFILL_REPEATS} after a warm-up; decode: median of {args.transformers_steps} steps "
          f"after {args.warmup} warm-ups. Roofline: (weights read + KV bytes) per step / torch "
          "copy_ of table 1.\n")
    print("| batch | prompt tokens | prefill ms | prefill tokens/s | decode ms/step | roofline ms "
          "| decode / roofline | note |")
    print("|------:|--------------:|-----------:|-----------------:|---------------:|------------:"
          "|------------------:|------|")
    if transformers is not None:
        try:
            row = transformers_measure(device, args)
        except (ImportError, AttributeError, RuntimeError, TypeError, ValueError) as error:
            reason = " ".join(f"{type(error).__name__}: {error}".split())[:200]
    if row is None:
        dash = "—"
        print(f"| {batch:5d} | {prompt:13d} | {dash:>10s} | {dash:>16s} | {dash:>14s} | "
              f"{dash:>11s} | {dash:>17s} | {reason} |")
        return
    prefill_ms, decode_ms, weight_bytes, kv_bytes, note = row
    tokens_per_s = batch * prompt / prefill_ms * 1e3
    if copy_gbs:
        roofline_ms = (weight_bytes + kv_bytes) / copy_gbs / 1e6
        roofline, ratio = f"{roofline_ms:11.2f}", f"{decode_ms / roofline_ms:17.1f}"
    else:
        roofline, ratio = f"{'—':>11s}", f"{'—':>17s}"
    print(f"| {batch:5d} | {prompt:13d} | {prefill_ms:10.1f} | {tokens_per_s:16.0f} | "
          f"{decode_ms:14.2f} | {roofline} | {ratio} | {note} |")
    print(f"\nRead per decode step: weights {weight_bytes / 1e9:.2f} GB, KV {kv_bytes / 1e9:.2f} GB"
          + (f", at {copy_gbs:.0f} GB/s." if copy_gbs else "."))


def main():
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--repeats", type=int, default=20)
    parser.add_argument("--warmup", type=int, default=3)
    parser.add_argument("--copy-mib", type=int, default=2048)
    parser.add_argument("--gemm-size", type=int, default=8192)
    parser.add_argument("--batch", type=int, default=32)
    parser.add_argument("--tokens", type=int, default=8192)
    parser.add_argument("--prefill-batch", type=int, default=8, help="sequences per SDPA prefill")
    parser.add_argument("--transformers-batch", type=int, default=8)
    parser.add_argument("--transformers-prompt", type=int, default=8192, help="tokens per sequence")
    parser.add_argument("--transformers-steps", type=int, default=16, help="timed decode steps")
    parser.add_argument("--skip-transformers", action="store_true")
    parser.add_argument("--small", action="store_true", help="tiny sizes: check the script runs")
    args = parser.parse_args()
    for flag in ("prefill_batch", "transformers_batch", "transformers_prompt", "transformers_steps"):
        if getattr(args, flag) < 1:
            parser.error(f"--{flag.replace('_', '-')} must be at least 1")
    if args.small:
        args.copy_mib, args.gemm_size, args.batch, args.tokens, args.repeats = 8, 256, 2, 64, 3
        args.prefill_batch = 2
        args.transformers_batch, args.transformers_prompt, args.transformers_steps = 2, 32, 4

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
    sdpa_prefill_table(device, args)
    if not args.skip_transformers:
        transformers_table(device, args, copy_gbs)


if __name__ == "__main__":
    main()
