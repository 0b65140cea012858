"""docs/QUALITY.md and docs/quality.png from tools/quality/evaluate.py's JSONL results.

Every number in the page is computed here from the rows; the commands that made the rows are
taken from the results' _meta lines.
"""

import argparse
import collections
import fnmatch
import json
import os
import shlex
import sys
import time

REPO = os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

TASKS = [
    ("passkey", "Passkey retrieval", "accuracy: generated text contains the key"),
    ("doc", "Paragraph recall", "the generated tokens equal to the document's continuation up to "
     "the first mismatch, over the {continuation} scored tokens (position-wise equality in its own "
     "column)"),
    ("agreement", "Greedy agreement", "token ids equal position-wise to the uncompressed run"),
]
FAMILY_ORDER = ["none", "snapkv", "pyramidkv", "streamingllm", "corm", "corm+pyramidkv",
                "pyramidkv+rethin", "pyramidkv+window", "pyramidkv+rethin+window",
                "pyramidkv+corm", "pyramidkv+rethin+corm", "prefix-only"]
PREFIX_ONLY = "prefix-only"  # evaluate.py's memorisation floor for the doc task, not a compression
FAMILY_COLORS = {"snapkv": "tab:blue", "pyramidkv": "tab:orange", "streamingllm": "tab:green",
                 "corm": "tab:red", "corm+pyramidkv": "tab:purple",
                 "pyramidkv+rethin": "tab:brown", "pyramidkv+window": "tab:pink",
                 "pyramidkv+rethin+window": "tab:olive", "pyramidkv+corm": "tab:cyan",
                 "pyramidkv+rethin+corm": "black"}


def load(specs):
    """Rows and _meta lines of the results files. A spec is PATH or PATH::PATTERNS: from that
    file only the configurations matching one of the comma-separated shell patterns (e.g. the
    decode-time eviction rows of a CPU run next to a GPU run's selection rows)."""
    rows, metas = [], []
    seen = {}
    for spec in specs:
        path, _, patterns = spec.partition("::")
        wanted = [p for p in patterns.split(",") if p]
        with open(path, encoding="utf-8") as f:
            for line in f:
                line = line.strip()
                if not line:
                    continue
                try:
                    row = json.loads(line)
                except json.JSONDecodeError:
                    continue
                if row.get("task") == "_meta":
                    metas.append(row)
                elif not wanted or any(fnmatch.fnmatchcase(row["config"], p) for p in wanted):
                    seen[(row["task"], row["case"], row["config"])] = row  # the last one wins
    rows = list(seen.values())
    return rows, metas


def mean(values):
    values = [v for v in values if v is not None]
    return sum(values) / len(values) if values else None


def stderr(values):
    """Standard error of the mean (sample standard deviation / sqrt(n)); None below 2 values."""
    if len(values) < 2:
        return None
    m = sum(values) / len(values)
    variance = sum((v - m) ** 2 for v in values) / (len(values) - 1)
    return (variance / len(values)) ** 0.5


def config_sort_key(summary):
    family = summary["family"]
    return (FAMILY_ORDER.index(family) if family in FAMILY_ORDER else len(FAMILY_ORDER),
            -(summary["budget_ratio"] or 2), summary["think"], summary["config"])


def summarise(rows):
    """{task: [per-config summary]} with means over that config's cases."""
    by = collections.defaultdict(list)
    for row in rows:
        by[(row["task"], row["config"])].append(row)
    out = collections.defaultdict(list)
    for (task, config), group in by.items():
        first = group[0]
        out[task].append(dict(
            config=config, family=first["family"], budget_ratio=first["budget_ratio"],
            think=first["think"], n=len(group),
            cases={r["case"] for r in group},
            score=mean(r["score"] for r in group),
            stderr=stderr([r["score"] for r in group]),
            positionwise=mean(r.get("positionwise_match") for r in group),
            common_prefix=mean(r.get("common_prefix") for r in group),
            saved=mean(r["saved_ratio"] for r in group),
            stored=mean(r["stored_fraction"] for r in group),
            prompt_tokens=mean(r["prompt_tokens"] for r in group),
            seconds=mean(r["seconds"] for r in group)))
    for task in out:
        out[task].sort(key=config_sort_key)
    return out


def pct(value, digits=1):
    return "—" if value is None else f"{100 * value:.{digits}f}"


def table(task, summaries, baseline):
    lines = []
    extra = {"doc": ["position-wise match %"], "agreement": ["common prefix (tokens)"]}
    header = ["config", "cases", "score %", "± s.e.", "Δ vs none (points)", "mean saved ratio %",
              "mean stored fraction %"] + extra.get(task, []) + ["mean s/request"]
    lines.append("| " + " | ".join(header) + " |")
    lines.append("|" + "---|" * len(header))
    for s in summaries:
        delta = "—" if baseline is None or s["score"] is None or s["config"] == "none" \
            else f"{100 * (s['score'] - baseline):+.1f}"
        cells = [f"`{s['config']}`", str(s["n"]), pct(s["score"]), pct(s["stderr"]), delta,
                 pct(s["saved"]),
                 pct(s["stored"])]
        if task == "doc":
            cells.append(pct(s["positionwise"]))
        if task == "agreement":
            cells.append("—" if s["common_prefix"] is None else f"{s['common_prefix']:.1f}")
        cells.append("—" if s["seconds"] is None else f"{s['seconds']:.1f}")
        lines.append("| " + " | ".join(cells) + " |")
    return lines


def losses(summaries, baseline, drop_points):
    """Markdown lines: the configs more than drop_points below the uncompressed score, and per
    method the most memory saved before its first such drop (budgets from largest to smallest)."""
    if baseline is None:
        return ["No uncompressed (`none`) rows: losses cannot be computed."]
    compressed = [s for s in summaries if s["family"] not in ("none", "prefix-only")
                  and s["score"] is not None]

    def lost(s):
        return 100 * (baseline - s["score"]) > drop_points

    lines = []
    dropped = [s for s in compressed if lost(s)]
    if dropped:
        lines.append(f"More than {drop_points:g} points below uncompressed ({pct(baseline)}%): " +
                     ", ".join(f"`{s['config']}` ({pct(s['score'])}%)" for s in dropped) + ".")
    else:
        lines.append(f"No configuration is more than {drop_points:g} points below uncompressed "
                     f"({pct(baseline)}%).")
    lines.append("")
    lines.append("| method | ThinK | holds up to (saved %) | first loss (score %, Δ points) |")
    lines.append("|---|---|---|---|")
    families = collections.defaultdict(list)
    for s in compressed:
        families[(s["family"], s["think"])].append(s)
    for (family, think), group in sorted(families.items(),
                                         key=lambda kv: config_sort_key(kv[1][0])):
        group.sort(key=lambda s: s["saved"] or 0)
        held, first_loss = None, None
        for s in group:
            if lost(s):
                first_loss = s
                break
            held = s
        held_text = "—" if held is None else f"`{held['config']}` ({pct(held['saved'], 0)})"
        loss_text = "none" if first_loss is None else (
            f"`{first_loss['config']}` ({pct(first_loss['score'])}, "
            f"{100 * (first_loss['score'] - baseline):+.1f})")
        lines.append(f"| {family} | {'λ 0.5' if think else 'no'} | {held_text} | {loss_text} |")
    return lines


def plot(summaries, path):
    import matplotlib
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, axes = plt.subplots(1, len(TASKS), figsize=(6 * len(TASKS), 4.8), squeeze=False)
    for ax, (task, title, _) in zip(axes[0], TASKS):
        data = summaries.get(task, [])
        groups = collections.defaultdict(list)
        for s in data:
            if s["score"] is None or s["saved"] is None:
                continue
            groups[(s["family"], s["think"])].append(s)
        for (family, think), group in sorted(groups.items(), key=lambda kv: config_sort_key(
                kv[1][0])):
            group.sort(key=lambda s: s["saved"])
            xs = [100 * s["saved"] for s in group]
            ys = [100 * s["score"] for s in group]
            if family == "none":
                ax.axhline(ys[0], color="black", linewidth=0.8, linestyle=":")
                ax.plot(xs, ys, marker="*", markersize=14, color="black", linestyle="none",
                        label="none (uncompressed)")
                continue
            if family == "prefix-only":
                ax.axhline(ys[0], color="gray", linewidth=0.8, linestyle="--",
                           label="prefix only (no document)")
                continue
            color = FAMILY_COLORS.get(family, "tab:gray")
            label = family + (" + ThinK" if think else "")
            ax.plot(xs, ys, color=color, marker="s" if think else "o",
                    markerfacecolor="none" if think else color,
                    linestyle="--" if think else "-", label=label)
        ax.set_title(title)
        ax.set_xlabel("KV memory saved (%, mean 1 - stored/uncompressed)")
        ax.set_ylabel("score (%)")
        ax.set_ylim(-5, 105)
        ax.grid(alpha=0.3)
    handles = {}
    for ax in axes[0]:
        for handle, label in zip(*ax.get_legend_handles_labels()):
            handles.setdefault(label, handle)
    fig.legend(list(handles.values()), list(handles.keys()), loc="lower center",
               ncol=min(6, max(1, len(handles))), fontsize=8, frameon=False)
    fig.tight_layout(rect=(0, 0.12, 1, 1))
    fig.savefig(path, dpi=110)
    plt.close(fig)


def preamble(rows, metas, args):
    """Title, model, machine, prompts and the commands that made the page."""
    meta = metas[-1] if metas else {}
    commands = []
    for m in metas:
        if m.get("command") and m["command"] not in commands:
            commands.append(m["command"])
    machine = args.machine or (
        f"servers on the {meta.get('backend', '?')} backend at "
        f"{', '.join(meta.get('servers', []))}; client host {meta.get('client_host', '?')} "
        f"({meta.get('client_cpu', '?')}, {meta.get('client_cores', '?')} cores)")
    report_command = "python " + shlex.join(
        [os.path.relpath(os.path.abspath(sys.argv[0]), REPO)] + sys.argv[1:])
    prompt_tokens = [r["prompt_tokens"] for r in rows if r["config"] != PREFIX_ONLY]
    targets = ", ".join(str(x) for x in sorted({r["length_target"] for r in rows}))
    out = ["# kvtrim — quality under KV compression", ""]
    out.append(f"Generated by `tools/quality/report.py` on "
               f"{time.strftime('%Y-%m-%d', time.gmtime())} from {len(rows)} result rows; do "
               "not edit by hand, rerun the commands below.")
    out.append("")
    out.append(f"- **Model:** {meta.get('model', '?')} ({meta.get('architecture', '?')}, "
               f"{meta.get('n_layers', '?')} layers, {meta.get('n_kv_heads', '?')} kv-heads × "
               f"{meta.get('head_dim', '?')}), the GGUF served by `kvtrim-server --model`.")
    out.append(f"- **Machine:** {machine}.")
    out.append(f"- **Prompts:** {min(prompt_tokens)}–{max(prompt_tokens)} tokens (target lengths "
               f"{targets}); greedy decoding; passkey prompt format "
               f"`{meta.get('passkey_format', '?')}`.")
    out.extend(f"- {note}" for note in args.note)
    out += ["", "Produced with:", "", "```sh", *commands, report_command, "```", ""]
    out.append("Scores are means over cases, in percent. *Saved ratio* is `kv_memory.saved_ratio` "
               "(1 − bytes_stored / bytes_uncompressed, the pages and metadata the request "
               "really held at its end); *stored fraction* is bytes_stored / bytes_uncompressed. "
               "Both include the generated tokens, which prompt token selection does not "
               "compress. *s/request* is the client's wall time per request (with queueing when "
               "several are in flight on one server).")
    out.append("")
    return out


def loss_section(summaries, drop_points):
    out = ["## Where compression loses accuracy", ""]
    out.append(f"A loss is a mean score more than {drop_points:g} points below the "
               "uncompressed one; *holds up to* is the most memory a method saves before its "
               "first loss, going from the largest budget to the smallest. With few cases a "
               "difference within about two standard errors (tables below) is noise.")
    out.append("")
    for task, title, _ in TASKS:
        data = summaries.get(task)
        if not data:
            continue
        base = next((s["score"] for s in data if s["config"] == "none"), None)
        out += [f"### {title}", ""] + losses(data, base, drop_points) + [""]
    return out


def task_section(task, title, definition, data, rows):
    base = next((s["score"] for s in data if s["config"] == "none"), None)
    cases = set().union(*(s["cases"] for s in data))
    truth = next((r["truth_ids"] for r in rows if r["task"] == task and "truth_ids" in r), [])
    out = [f"## {title}", ""]
    out.append(f"Score: {definition.format(continuation=len(truth))}. {len(cases)} cases. "
               f"Uncompressed score: **{pct(base)}%**.")
    by_length = collections.defaultdict(list)
    for r in rows:
        if r["task"] == task and r["config"] == "none":
            by_length[r["length_target"]].append(r["score"])
    if len(by_length) > 1:
        out.append("Uncompressed score by target length: " + ", ".join(
            f"{length}: {pct(mean(scores))}% ({len(scores)} cases)"
            for length, scores in sorted(by_length.items())) + ".")
    floor = next((s for s in data if s["config"] == PREFIX_ONLY), None)
    if floor:
        out.append(f"The `{PREFIX_ONLY}` row sends the paragraph prefix alone "
                   f"({floor['prompt_tokens']:.0f} tokens), no document: {pct(floor['score'])}% "
                   "is what the model recalls of the text from its training data, the floor "
                   "under every configuration.")
    if task == "agreement":
        out.append("Compared with the `none` run of the same case (so `none` is 100% by "
                   "construction).")
    incomplete = [s["config"] for s in data if s["cases"] != cases]
    if incomplete:
        out.append(f"Not every case has run for: {', '.join(incomplete)} (a resumed run "
                   "completes them).")
    return out + [""] + table(task, data, base) + [""]


def main():
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("results", nargs="+",
                   help="the JSONL written by tools/quality/evaluate.py; PATH::PATTERNS takes "
                   "only the configurations matching the comma-separated shell patterns")
    p.add_argument("--markdown", default=os.path.join(REPO, "docs", "QUALITY.md"))
    p.add_argument("--plot", default=os.path.join(REPO, "docs", "quality.png"))
    p.add_argument("--drop-points", type=float, default=5.0,
                   help="a loss is a score this many points below uncompressed")
    p.add_argument("--machine", default="",
                   help="where the servers ran, in words (default: from the results)")
    p.add_argument("--note", action="append", default=[],
                   help="a sentence for the page's preamble (repeatable)")
    args = p.parse_args()

    rows, metas = load(args.results)
    if not rows:
        sys.exit(f"{args.results}: no result rows")
    summaries = summarise(rows)
    plot(summaries, args.plot)
    out = preamble(rows, metas, args) + loss_section(summaries, args.drop_points)
    for task, title, definition in TASKS:
        if summaries.get(task):
            out += task_section(task, title, definition, summaries[task], rows)
    plot_link = os.path.relpath(os.path.abspath(args.plot),
                                os.path.dirname(os.path.abspath(args.markdown)))
    out += ["## Plot", "", f"![score vs KV memory saved]({plot_link})", ""]
    out.append("Filled markers and solid lines: token selection alone; hollow squares and dashed "
               "lines: with ThinK key channel pruning (λ as in the config name). The star and "
               "dotted line are the uncompressed score; the dashed grey line, the prefix-only "
               "floor.")
    out.append("")
    with open(args.markdown, "w", encoding="utf-8") as f:
        f.write("\n".join(out))
    print(f"wrote {args.markdown} and {args.plot} from {len(rows)} rows")


if __name__ == "__main__":
    main()
