#!/usr/bin/env python3
"""Makes tests/data/compress/goldens.json: what the reference implementations of the KV
compression policies select, for tests/memory/compress/compress_golden_test.cc.

Usage: python3 tools/reference/make_compress_goldens.py [--out tests/data/compress/goldens.json]
Needs torch. Deterministic.

The inputs are not stored: Q and K come from a 64-bit LCG that the C++ test repeats, each value
an exact float32 in [-1, 1) (24 random bits), so only case parameters and results are written.

What is reproduced here with the references' own torch operations (float32, as they run):
  snapkv    FasterDecoding/SnapKV snapkv_utils.py, SnapKVCluster.update_kv: the window's softmaxed
            attention (finfo.min causal mask inside the window) summed over the window, avg_pool1d
            or max_pool1d (padding kernel // 2), topk(budget - window) on the prefix, plus the
            window. For GQA the pooled scores of a group's query heads are averaged (kvpress
            snapkv_press.py); with group 1 that is the reference unchanged. Cases whose k-th and
            (k+1)-th scores are within 1e-4 (relative) are skipped: torch.topk leaves ties open.
  pyramidkv Zefan-Cai/KVCache-Factory pyramidkv_utils.py, PyramidKVCluster.update_kv: the tokens
            each layer keeps (window included) for a grid of prompt lengths, layers, budgets,
            windows and betas, branches and integer floor divisions as the reference has them.
  think     SalesforceAIResearch/ThinK kv_pruning_utils.py, key_pruner_query_driven: channel
            score mean_t q^2 (last 32 queries) * mean_j k^2, int(head_dim * ratio) lowest pruned;
            the query term averaged over a GQA group (kvpress think_press.py). Optionally over the
            keys a SnapKV selection kept. Near-ties skipped as above.
"""

import argparse
import json
import math
import os

import torch
import torch.nn.functional as F

MASK64 = (1 << 64) - 1


class Lcg:
    """Knuth's MMIX LCG; value = top 24 bits of the state mapped to [-1, 1), exact in float32."""

    def __init__(self, seed: int):
        self.state = seed & MASK64

    def next_value(self) -> float:
        self.state = (self.state * 6364136223846793005 + 1442695040888963407) & MASK64
        bits = self.state >> 40
        return (bits - (1 << 23)) / float(1 << 23)

    def tensor(self, *shape) -> torch.Tensor:
        count = math.prod(shape)
        return torch.tensor([self.next_value() for _ in range(count)], dtype=torch.float32).reshape(shape)


def make_qk(seed, n, n_heads, n_kv_heads, head_dim):
    """Q (1, n_heads, n, d) and K (1, n_kv_heads, n, d); drawn as (n, heads, d) row-major."""
    rng = Lcg(seed)
    q = rng.tensor(n, n_heads, head_dim)
    k = rng.tensor(n, n_kv_heads, head_dim)
    return q.permute(1, 0, 2).unsqueeze(0), k.permute(1, 0, 2).unsqueeze(0)


def repeat_kv(x, n_rep):
    batch, heads, length, dim = x.shape
    return x[:, :, None, :, :].expand(batch, heads, n_rep, length, dim).reshape(
        batch, heads * n_rep, length, dim)


def snapkv_pooled(q, k, window, kernel, pooling, group):
    """(n_kv_heads, n - window) pooled scores as SnapKVCluster computes them, group-averaged."""
    head_dim = q.shape[-1]
    keys = repeat_kv(k, group)
    attn = torch.matmul(q[..., -window:, :], keys.transpose(2, 3)) / math.sqrt(head_dim)
    mask = torch.full((window, window), torch.finfo(attn.dtype).min)
    cond = torch.arange(window)
    mask.masked_fill_(cond < (cond + 1).view(window, 1), 0)
    attn[:, :, -window:, -window:] += mask[None, None, :, :]
    attn = torch.softmax(attn, dim=-1, dtype=torch.float32)
    summed = attn[:, :, -window:, :-window].sum(dim=-2)
    pool = F.avg_pool1d if pooling == "avg" else F.max_pool1d
    pooled = pool(summed, kernel_size=kernel, padding=kernel // 2, stride=1)
    n_kv = k.shape[1]
    return pooled.view(n_kv, group, -1).mean(1)


def top_margin_ok(scores, count):
    """True when the count-th and (count+1)-th largest of every row are clearly apart."""
    if count <= 0 or count >= scores.shape[-1]:
        return True
    ordered = scores.sort(dim=-1, descending=True).values
    above, below = ordered[:, count - 1], ordered[:, count]
    return bool(((above - below) > 1e-4 * above.abs().clamp_min(1e-6)).all())


def snapkv_case(seed, n, n_heads, n_kv_heads, head_dim, window, budget, kernel, pooling):
    group = n_heads // n_kv_heads
    q, k = make_qk(seed, n, n_heads, n_kv_heads, head_dim)
    if n < budget:
        kept = [list(range(n)) for _ in range(n_kv_heads)]
    else:
        pooled = snapkv_pooled(q, k, window, kernel, pooling, group)
        if not top_margin_ok(pooled, budget - window):
            return None
        indices = pooled.topk(budget - window, dim=-1).indices.sort(dim=-1).values
        kept = [indices[h].tolist() + list(range(n - window, n)) for h in range(n_kv_heads)]
    return {"seed": seed, "n": n, "n_heads": n_heads, "n_kv_heads": n_kv_heads,
            "head_dim": head_dim, "window": window, "budget": budget, "kernel": kernel,
            "pooling": pooling, "kept": kept}


def pyramid_budgets(n, layers, budget, window, beta):
    """PyramidKVCluster.update_kv's kept length per layer (window included)."""
    out = []
    for layer in range(layers):
        min_num = (budget - window) // beta
        max_num = (budget - window) * 2 - min_num
        if max_num >= n - window:
            max_num = n - window
            min_num = (budget - window) * 2 - max_num
        steps = (max_num - min_num) // (layers - 1)
        layer_budget = max_num - layer * steps
        if n < budget:
            out.append(n)
        elif n < (budget - window) * 2:
            out.append(budget)
        else:
            out.append(layer_budget + window)
    return out


def think_case(seed, n, n_heads, n_kv_heads, head_dim, ratio, snap):
    """Kept channels per kv-head; `snap` = (window, budget, kernel) selects tokens first."""
    group = n_heads // n_kv_heads
    q, k = make_qk(seed, n, n_heads, n_kv_heads, head_dim)
    kept_tokens = [list(range(n)) for _ in range(n_kv_heads)]
    if snap is not None:
        window, budget, kernel = snap
        pooled = snapkv_pooled(q, k, window, kernel, "avg", group)
        if not top_margin_ok(pooled, budget - window):
            return None
        indices = pooled.topk(budget - window, dim=-1).indices.sort(dim=-1).values
        kept_tokens = [indices[h].tolist() + list(range(n - window, n)) for h in range(n_kv_heads)]
    pruned = int(head_dim * ratio)
    queries_norm = torch.pow(q[..., -32:, :], 2).mean(dim=2)  # (1, n_heads, d)
    queries_norm = queries_norm.view(n_kv_heads, group, head_dim).mean(1)
    kept = []
    for h in range(n_kv_heads):
        keys = k[0, h, kept_tokens[h], :]
        keys_norm = torch.pow(keys, 2).mean(dim=0)
        score = queries_norm[h] * keys_norm
        if not top_margin_ok(score.unsqueeze(0), head_dim - pruned):
            return None
        low = torch.topk(score, pruned, largest=False).indices.tolist()
        kept.append(sorted(set(range(head_dim)) - set(low)))
    case = {"seed": seed, "n": n, "n_heads": n_heads, "n_kv_heads": n_kv_heads,
            "head_dim": head_dim, "ratio": ratio, "kept_tokens": kept_tokens, "kept": kept}
    if snap is not None:
        case.update({"window": snap[0], "budget": snap[1], "kernel": snap[2]})
    return case


def collect(make, specs):
    """Each spec gives a case; a near-tie draw retries with the next seed."""
    cases = []
    for seed, spec in enumerate(specs, start=1000):
        for attempt in range(20):
            case = make(seed * 100 + attempt, *spec)
            if case is not None:
                cases.append(case)
                break
        else:
            raise RuntimeError(f"no tie-free draw for {spec}")
    return cases


def main():
    parser = argparse.ArgumentParser()
    parser.add_argument("--out", default="tests/data/compress/goldens.json")
    args = parser.parse_args()

    # (n, n_heads, n_kv_heads, head_dim, window, budget, kernel, pooling)
    snapkv_specs = [
        (40, 2, 2, 8, 8, 20, 5, "avg"), (40, 2, 2, 8, 8, 20, 5, "max"),
        (33, 1, 1, 16, 4, 12, 3, "avg"), (64, 4, 1, 8, 16, 40, 7, "avg"),
        (64, 4, 1, 8, 16, 40, 7, "max"), (48, 6, 2, 8, 8, 24, 5, "avg"),
        (48, 6, 2, 8, 8, 24, 5, "max"), (30, 8, 2, 4, 6, 10, 1, "avg"),
        (50, 9, 3, 8, 10, 30, 5, "avg"), (25, 3, 1, 8, 5, 30, 5, "avg"),
        (20, 2, 1, 8, 20, 30, 5, "avg"), (57, 4, 4, 8, 12, 13, 3, "avg"),
    ]
    # (n, n_heads, n_kv_heads, head_dim, ratio, snap)
    think_specs = [
        (40, 2, 2, 16, 0.5, None), (40, 4, 1, 16, 0.4, None), (24, 9, 3, 8, 0.5, None),
        (64, 6, 2, 32, 0.3, None), (20, 3, 3, 10, 0.7, None),
        (48, 4, 2, 16, 0.5, (8, 24, 5)), (60, 9, 3, 16, 0.4, (12, 30, 5)),
    ]
    pyramid = []
    for layers in (2, 3, 30, 32):
        for budget, window in ((32, 8), (64, 16), (128, 32), (320, 64), (2048, 32)):
            # The fallback boundaries (B - 1, B, 2 (B - w) - 1, 2 (B - w)) and a spread.
            edges = (budget - 1, budget, 2 * (budget - window) - 1, 2 * (budget - window))
            for n in sorted(set((10, 40, 100, 150, 300, 520, 700, 1000, 4096) + edges)):
                for beta in (1, 5, 20):
                    if budget > window and n >= window:
                        pyramid.append({"n": n, "layers": layers, "budget": budget,
                                        "window": window, "beta": beta,
                                        "kept": pyramid_budgets(n, layers, budget, window, beta)})

    goldens = {
        "snapkv": collect(snapkv_case, snapkv_specs),
        "think": collect(think_case, think_specs),
        "pyramidkv": pyramid,
    }
    os.makedirs(os.path.dirname(args.out), exist_ok=True)
    with open(args.out, "w") as f:
        json.dump(goldens, f, separators=(",", ":"))
        f.write("\n")
    print(f"wrote {args.out}: {len(goldens['snapkv'])} snapkv, {len(goldens['think'])} think, "
          f"{len(pyramid)} pyramidkv cases")


if __name__ == "__main__":
    main()
