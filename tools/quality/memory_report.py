#!/usr/bin/env python3
"""What compression stores, measured on a running kvtrim-server: prints Markdown tables.

  footprint  one 4096-token prompt (real text) per configuration: bytes an uncompressed cache of
             the same tokens takes, the rows, pages and metadata stored, and the pool's own page
             count read from GetServerStats while the request is resident (they must agree:
             pool_bytes_used == kv_bytes_stored - metadata for a lone request).
  capacity   at the server's fixed pool size, how many concurrent 4096-token requests it admits
             (requests with long generations are submitted together; the most running at once is
             read from GetServerStats; then they are cancelled).

    python tools/quality/memory_report.py --server HOST:PORT --document FILE \
        [--capacity-server HOST:PORT --requests 40] [--stubs DIR | --source-dir .]

Both servers must be otherwise idle. The capacity server's pool is whatever it was started with
(--kv-pool-mib); it is read from GetServerStats and printed.
"""

import argparse
import os
import sys
import tempfile
import threading
import time

import grpc

pb = pb_grpc = None

# (name, KvCompression fields)
FOOTPRINT_CONFIGS = [
    ("none", dict(policy="none")),
    ("snapkv 25%", dict(policy="snapkv", budget_ratio=0.25)),
    ("pyramidkv 25%", dict(policy="pyramidkv", budget_ratio=0.25)),
    ("pyramidkv 12%", dict(policy="pyramidkv", budget_ratio=0.12)),
    ("pyramidkv 12% + ThinK 0.5", dict(policy="pyramidkv", budget_ratio=0.12, think=0.5)),
    ("snapkv 12% + ThinK 0.5 + corm", dict(policy="snapkv", budget_ratio=0.12, think=0.5,
                                           eviction="corm")),
]
CAPACITY_CONFIGS = [
    ("none", dict(policy="none")),
    ("pyramidkv 25%", dict(policy="pyramidkv", budget_ratio=0.25)),
    ("pyramidkv 12%", dict(policy="pyramidkv", budget_ratio=0.12)),
    ("pyramidkv 12% + ThinK 0.5", dict(policy="pyramidkv", budget_ratio=0.12, think=0.5)),
]
PROMPT_TOKENS = 4096
MIB = 1024 * 1024


def load_stubs(stubs, source_dir):
    global pb, pb_grpc
    if stubs is None:
        import subprocess
        stubs = tempfile.mkdtemp(prefix="kvtrim-stubs-")
        proto_dir = os.path.join(source_dir, "proto")
        protos = [os.path.join(proto_dir, "kvtrim", "v1", n)
                  for n in sorted(os.listdir(os.path.join(proto_dir, "kvtrim", "v1")))
                  if n.endswith(".proto")]
        subprocess.run([sys.executable, "-m", "grpc_tools.protoc", f"-I{proto_dir}",
                        f"--python_out={stubs}", f"--grpc_python_out={stubs}", *protos],
                       check=True)
    sys.path.insert(0, stubs)
    from kvtrim.v1 import inference_pb2, inference_pb2_grpc
    pb, pb_grpc = inference_pb2, inference_pb2_grpc


def compression(fields):
    c = pb.KvCompression(policy=fields["policy"])
    if "budget_ratio" in fields:
        c.budget_ratio = fields["budget_ratio"]
    if "think" in fields:
        setattr(c.think, "lambda", fields["think"])
    if "eviction" in fields:
        c.eviction.policy = fields["eviction"]
    return c


def request(ids, fields, max_tokens):
    return pb.GenerateRequest(
        tokens=pb.TokenIds(ids=ids), compression=compression(fields),
        sampling=pb.SamplingParams(temperature=0.0),
        stopping=pb.StoppingCriteria(max_tokens=max_tokens, ignore_eos=True))


def prompts(stub, document, count):
    """`count` different PROMPT_TOKENS-token windows of the document's token ids."""
    ids = list(stub.Tokenize(pb.TokenizeRequest(text=document)).ids)
    if len(ids) < PROMPT_TOKENS:
        sys.exit(f"the document has {len(ids)} tokens, fewer than {PROMPT_TOKENS}")
    step = max(1, (len(ids) - PROMPT_TOKENS) // max(1, count))
    return [ids[(i * step) % (len(ids) - PROMPT_TOKENS + 1):][:PROMPT_TOKENS]
            for i in range(count)]


def footprint(stub, ids):
    print(f"### Footprint of one {PROMPT_TOKENS}-token prompt (16 tokens generated)\n")
    print("| configuration | tokens kept per layer (min..max) | key channels | uncompressed MiB |"
          " rows MiB | pages MiB | metadata KiB | stored MiB | stored / uncompressed |"
          " pool bytes used = stored - metadata |")
    print("|---|---|---|---|---|---|---|---|---|---|")
    for name, fields in FOOTPRINT_CONFIGS:
        resident = []

        def on_message(message):
            if message.tokens and not resident:
                resident.append(stub.GetServerStats(pb.GetServerStatsRequest()))

        final = None
        for message in stub.Generate(request(ids, fields, 16), timeout=3600):
            on_message(message)
            final = message
        kv = final.kv_memory
        stats = resident[0]
        # While resident the request's metadata may grow (corm state per generated token), so the
        # check is exact only for configurations without decode state.
        agree = stats.pool_bytes_used == stats.kv_bytes_stored - kv.bytes_metadata
        kept = list(kv.tokens_kept_per_layer)
        print(f"| {name} | {min(kept)}..{max(kept)} | {kv.key_channels} |"
              f" {kv.bytes_uncompressed / MIB:.2f} | {kv.bytes_rows / MIB:.2f} |"
              f" {kv.bytes_pages / MIB:.2f} | {kv.bytes_metadata / 1024:.1f} |"
              f" {kv.bytes_stored / MIB:.2f} | {kv.bytes_stored / kv.bytes_uncompressed:.2%} |"
              f" {stats.pool_bytes_used} vs {stats.kv_bytes_stored - kv.bytes_metadata}"
              f" ({'agree' if agree else 'DIFFER'}) |", flush=True)
    print()


def capacity(stub, prompt_ids, settle_seconds):
    stats = stub.GetServerStats(pb.GetServerStatsRequest())
    print(f"### Concurrent {PROMPT_TOKENS}-token requests admitted in a"
          f" {stats.pool_bytes_total / MIB:.0f} MiB pool\n")
    print("| configuration | requests submitted | most running at once | vs uncompressed |"
          " pool used at that moment (MiB) |")
    print("|---|---|---|---|---|")
    baseline = None
    for name, fields in CAPACITY_CONFIGS:
        calls = [stub.Generate(request(ids, fields, 8192 - PROMPT_TOKENS - 8), timeout=3600)
                 for ids in prompt_ids]
        drained = []

        def drain(call):
            try:
                for _ in call:
                    pass
            except grpc.RpcError:
                pass

        for call in calls:
            t = threading.Thread(target=drain, args=(call,), daemon=True)
            t.start()
            drained.append(t)
        most, used_at_most, last_change = 0, 0, time.time()
        while True:
            s = stub.GetServerStats(pb.GetServerStatsRequest())
            if s.requests_running > most:
                most, used_at_most, last_change = s.requests_running, s.pool_bytes_used, time.time()
            if most == len(calls) or (s.requests_waiting > 0 and
                                      time.time() - last_change > settle_seconds):
                break
            time.sleep(0.2)
        for call in calls:
            call.cancel()
        for t in drained:
            t.join()
        while stub.GetServerStats(pb.GetServerStatsRequest()).requests_running > 0:
            time.sleep(0.2)
        baseline = baseline or most
        note = " (all submitted: raise --requests)" if most == len(calls) else ""
        print(f"| {name} | {len(calls)} | {most}{note} | {most / baseline:.1f}x |"
              f" {used_at_most / MIB:.0f} |", flush=True)
    print()


def main():
    parser = argparse.ArgumentParser(description=__doc__,
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--server", required=True)
    parser.add_argument("--capacity-server")
    parser.add_argument("--requests", type=int, default=40)
    parser.add_argument("--settle", type=float, default=30.0,
                        help="seconds without a new admission, with requests waiting, that end"
                             " the capacity count")
    parser.add_argument("--document", required=True)
    parser.add_argument("--stubs")
    parser.add_argument("--source-dir", default=os.path.join(os.path.dirname(__file__), "..", ".."))
    args = parser.parse_args()
    load_stubs(args.stubs, args.source_dir)
    with open(args.document, encoding="utf-8") as f:
        document = f.read()
    stub = pb_grpc.InferenceStub(grpc.insecure_channel(args.server))
    footprint(stub, prompts(stub, document, 1)[0])
    if args.capacity_server:
        cap = pb_grpc.InferenceStub(grpc.insecure_channel(args.capacity_server))
        capacity(cap, prompts(cap, document, args.requests), args.settle)


if __name__ == "__main__":
    main()
