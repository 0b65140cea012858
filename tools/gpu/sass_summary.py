#!/usr/bin/env python3
"""Sums an Nsight Compute SASS export by opcode and by execution count.

    ncu --import REPORT.ncu-rep --page source --csv --print-source sass > sass.csv
    python3 tools/gpu/sass_summary.py sass.csv

An instruction's execution count says how often it ran (once per warp, once per loop trip), so
the per-count buckets split a kernel's instructions into its fixed and per-iteration parts; the
opcode table and the lines with the most stall samples say what those parts are made of. The
last table cuts the kernel at its block barriers (BAR.SYNC) and at EXIT, in address order: each
part's stall samples, instructions and main stall reasons. A part whose samples are mostly
"barrier" holds warps waiting for the slowest one of the part before it.
"""
import csv, sys, collections
rows = list(csv.reader(open(sys.argv[1], errors="replace")))
hi = next(i for i, r in enumerate(rows) if any("Address" in c for c in r))
head = rows[hi]
def col(*names):
    for n in names:
        for i, h in enumerate(head):
            if h.strip() == n: return i
    for n in names:
        for i, h in enumerate(head):
            if n.lower() in h.lower(): return i
    return None
c_src = col("Source"); c_ex = col("Instructions Executed", "Warp Instructions Executed")
c_st = col("Warp Stall Sampling (All Samples)", "Stall Sampling (All")
c_why = [i for i, h in enumerate(head) if h.startswith("stall_") and "Not Issued" not in h]
data = []
for r in rows[hi + 1:]:
    if len(r) <= max(c_src, c_ex): continue
    try: ex = float(r[c_ex].replace(",", "") or 0)
    except ValueError: continue
    st = 0.0
    if c_st is not None:
        try: st = float(r[c_st].replace(",", "") or 0)
        except ValueError: pass
    why = {}
    for i in c_why:
        try: why[head[i][len("stall_"):]] = float(r[i].replace(",", "") or 0)
        except (ValueError, IndexError): pass
    data.append((r[c_src].strip(), ex, st, why))
tot = sum(d[1] for d in data); tst = sum(d[2] for d in data)
print(f"instructions {tot:.0f}, stall samples {tst:.0f}, sass lines {len(data)}")
hist = collections.Counter(); hst = collections.Counter()
for s, ex, st, _ in data:
    hist[ex] += ex; hst[ex] += st
print("executed-count buckets (count per instruction: share of instructions, share of stalls):")
for ex, v in sorted(hist.items(), key=lambda kv: -kv[1])[:25]:
    print(f"  {ex:10.0f}  {100*v/tot:5.1f}%  {100*hst[ex]/max(tst,1):5.1f}%")
op = collections.Counter(); opst = collections.Counter()
for s, ex, st, _ in data:
    o = s.split()[0] if s else "?"
    if o.startswith("@"): o = s.split()[1]
    o = o.split(".")[0]
    op[o] += ex; opst[o] += st
print("by opcode:")
for o, v in op.most_common(30):
    print(f"  {o:12s} {100*v/tot:5.1f}%  stalls {100*opst[o]/max(tst,1):5.1f}%")
print("top stall lines:")
for s, ex, st, _ in sorted(data, key=lambda d: -d[2])[:40]:
    print(f"  {st:7.0f} {ex:9.0f}  {s[:90]}")
print("parts between block barriers (sass lines, stall samples, instructions, main reasons):")
part = {"first": 0, "st": 0.0, "ex": 0.0, "why": collections.Counter()}
for n, (s, ex, st, why) in enumerate(data):
    part["st"] += st; part["ex"] += ex; part["why"].update(why)
    if "BAR.SYNC" in s or "EXIT" in s.split() or n == len(data) - 1:
        if part["st"] > 0:
            top = ", ".join(f"{k} {v:.0f}" for k, v in part["why"].most_common(4) if v > 0)
            print(f"  {part['first']:6d}-{n:6d} {part['st']:7.0f} ({100*part['st']/max(tst,1):4.1f}%)"
                  f" {part['ex']:11.0f} ({100*part['ex']/max(tot,1):4.1f}%)  {top}")
        part = {"first": n + 1, "st": 0.0, "ex": 0.0, "why": collections.Counter()}
