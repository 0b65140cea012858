#!/usr/bin/env python3
"""What compression stores, measured on a running kvtrim-server: prints Markdown tables.

  footprint  one 4096-token prompt (real text) per configuration: bytes an uncompressed cache of
             the same tokens takes, the rows, pages and metadata stored, and the pool's own page
             count read from GetServerStats while the request is resident (they must agree:
             pool_bytes_used == kv_bytes_stored - metadata for a lone request).
  capacity   at the server's fixed pool size, how many concurrent --prompt-tokens requests it
             admits (requests are submitted together; the most running at once is read from
             GetServerStats). By default they generate up to the context and are cancelled once
             the count settles; with --complete they generate --complete tokens each and are
             served to completion, and the table says how many finished.

    python tools/quality/memory_report.py --server HOST:PORT --document FILE \
        [--capacity-server HOST:PORT --requests 40] [--stubs DIR | --source-dir .]
    # a dummy model (kvtrim-server --load-format dummy --arch llama3.1-8b): random prompt ids
    python tools/quality/memory_report.py --capacity-only --capacity-server HOST:PORT \
        --random-prompts --prompt-tokens 8192 --requests 400 --complete 16

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


def random_prompts(stub, count):
    """`count` prompts of PROMPT_TOKENS random ids of the served model's vocabulary (a dummy
    model's text means nothing)."""
    import random
    vocab = stub.GetModelInfo(pb.GetModelInfoRequest()).vocab_size
    rng = random.Random(1234)
    return [[rng.randrange(vocab) for _ in range(PROMPT_TOKENS)] for _ in range(count)]


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


def context_problem(info, max_tokens, complete):
    """None when PROMPT_TOKENS prompts leave room for `max_tokens` in the served model's context,
    else the error: a request ends at max_context tokens, prompt included, so a prompt of the
    whole context finishes at once with finish reason length and nothing generated."""
    if max_tokens >= 1 and PROMPT_TOKENS + max_tokens <= info.max_context:
        return None
    asked = (f"--prompt-tokens {PROMPT_TOKENS} + --complete {complete}" if complete
             else f"--prompt-tokens {PROMPT_TOKENS} + 9 (1 new token and 8 spare, the least"
                  f" without --complete)")
    hint = (" (kvtrim-server --load-format dummy --arch llama3.1-8b is llama3-8b's shape with"
            " Llama 3.1's context of 131072)" if info.name == "dummy llama3-8b" else "")
    return (f"capacity: {asked} exceed the context of the served model {info.name!r}, "
            f"{info.max_context} tokens (GetModelInfo max_context): a request ends at the context,"
            f" prompt included, so they would finish short (length), one of the whole context at"
            f" once with nothing generated, and a longer one is refused. Shorten --prompt-tokens"
            f" or serve a model with a longer context{hint}.")


def unserved(name, calls, most, served, finals, errors, max_tokens, context):
    """The error when configuration `name` served no request as asked, or none was seen running:
    the requests' finish reasons and tokens generated, and the first RPC error."""
    reasons = {}
    for final in finals:
        key = (pb.FinishReason.Name(final.finish_reason), final.usage.completion_tokens)
        reasons[key] = reasons.get(key, 0) + 1
    finishes = ", ".join(f"{count} {reason} after {tokens} tokens"
                         for (reason, tokens), count in sorted(reasons.items())) or "none"
    message = (f"capacity: {name}: {len(served)} of {calls} requests served as asked"
               f" ({max_tokens} new tokens each), at most {most} running at once; finishes:"
               f" {finishes}")
    if errors:
        message += f"; first RPC error: {errors[0].code().name}: {errors[0].details()}"
    if ("FINISH_REASON_LENGTH", 0) in reasons:
        message += (f". A request ends at the model's context of {context} tokens, prompt"
                    f" included: with {PROMPT_TOKENS}-token prompts, length after 0 tokens means"
                    f" the prompt left no room")
    return message + "."


def capacity(stub, prompt_ids, settle_seconds, complete, configs):
    stats = stub.GetServerStats(pb.GetServerStatsRequest())
    info = stub.GetModelInfo(pb.GetModelInfoRequest())
    context = info.max_context
    # Without --complete the requests only need to outlive the count; kvtrim-server's default
    # --max-new-tokens (4096) bounds what one may ask for.
    max_tokens = complete or min(context - PROMPT_TOKENS - 8, 4096)
    problem = context_problem(info, max_tokens, complete)
    if problem:
        sys.exit(problem)
    print(f"### Concurrent {PROMPT_TOKENS}-token requests admitted in a"
          f" {stats.pool_bytes_total / MIB:.0f} MiB pool\n")
    print("| configuration | requests submitted | most running at once | vs uncompressed |"
          " pool used at that moment (MiB) | served to completion |")
    print("|---|---|---|---|---|---|")
    baseline = None
    for name, fields in configs:
        calls = [stub.Generate(request(ids, fields, max_tokens), timeout=3600)
                 for ids in prompt_ids]
        drained, finals, errors = [], [], []

        def drain(call):
            try:
                final = None
                for message in call:
                    final = message
                if final is not None:
                    finals.append(final)
            except grpc.RpcError as e:
                if e.code() != grpc.StatusCode.CANCELLED:
                    errors.append(e)

        for call in calls:
            t = threading.Thread(target=drain, args=(call,), daemon=True)
            t.start()
            drained.append(t)
        most, used_at_most, waiting_at_most, last_change = 0, 0, 0, time.time()
        while True:
            s = stub.GetServerStats(pb.GetServerStatsRequest())
            if s.requests_running > most:
                most, used_at_most, last_change = s.requests_running, s.pool_bytes_used, time.time()
                waiting_at_most = s.requests_waiting
            if not any(t.is_alive() for t in drained):
                break  # all ended: served with --complete; without it, refused or cut short
            settled = s.requests_waiting > 0 and time.time() - last_change > settle_seconds
            if not complete and (most == len(calls) or settled):
                break
            time.sleep(0.2)
        if not complete:
            for call in calls:
                call.cancel()
        for t in drained:
            t.join()
        while stub.GetServerStats(pb.GetServerStatsRequest()).requests_running > 0:
            time.sleep(0.2)
        served = [f for f in finals if f.finish_reason == pb.FINISH_REASON_LENGTH
                  and f.usage.completion_tokens >= max_tokens]
        if most == 0 or (complete and not served):
            sys.exit(unserved(name, len(calls), most, served, finals, errors, max_tokens,
                              context))
        if name == "none":
            baseline = most
        note = " (all submitted: raise --requests)" if most == len(calls) else ""
        # The count is the pool's capacity only when the pool was (nearly) full with requests
        # still waiting; otherwise requests ended faster than prompts were admitted.
        if not note and (waiting_at_most == 0 or used_at_most < 0.9 * stats.pool_bytes_total):
            note = (f" (not the pool's limit: {100 * used_at_most / stats.pool_bytes_total:.0f}%"
                    " of it in use; requests ended before it filled: raise --complete)")
        served_text = (f"{len(served)} of {len(calls)} (finish: length)" if complete
                       else "cancelled once counted")
        ratio = f"{most / baseline:.1f}x" if baseline else "—"  # without a "none" row
        print(f"| {name} | {len(calls)} | {most}{note} | {ratio} |"
              f" {used_at_most / MIB:.0f} | {served_text} |", flush=True)
    print()


def main():
    global PROMPT_TOKENS
    parser = argparse.ArgumentParser(description=__doc__,
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--server", help="the footprint server")
    parser.add_argument("--capacity-server")
    parser.add_argument("--capacity-only", action="store_true", help="no footprint table")
    parser.add_argument("--requests", type=int, default=40)
    parser.add_argument("--settle", type=float, default=30.0,
                        help="seconds without a new admission, with requests waiting, that end"
                             " the capacity count")
    parser.add_argument("--prompt-tokens", type=int, default=PROMPT_TOKENS)
    parser.add_argument("--complete", type=int, default=0,
                        help="capacity requests generate this many tokens and run to completion")
    parser.add_argument("--capacity-configs",
                        help="the capacity configurations to run, by name, separated by ';'"
                             f" (default all: {'; '.join(n for n, _ in CAPACITY_CONFIGS)})")
    parser.add_argument("--random-prompts", action="store_true",
                        help="random ids of the model's vocabulary instead of the document")
    parser.add_argument("--document")
    parser.add_argument("--stubs")
    parser.add_argument("--source-dir", default=os.path.join(os.path.dirname(__file__), "..", ".."))
    args = parser.parse_args()
    if not args.capacity_only and not args.server:
        parser.error("--server is required unless --capacity-only")
    if not args.random_prompts and not args.document:
        parser.error("--document is required unless --random-prompts")
    PROMPT_TOKENS = args.prompt_tokens
    configs = CAPACITY_CONFIGS
    if args.capacity_configs:
        known = dict(CAPACITY_CONFIGS + FOOTPRINT_CONFIGS)  # the footprint's by name too
        names = [n.strip() for n in args.capacity_configs.split(";") if n.strip()]
        unknown = [n for n in names if n not in known]
        if unknown or not names:
            parser.error(f"--capacity-configs: unknown {unknown or 'empty'}; known:"
                         f" {'; '.join(known)}")
        configs = [(n, known[n]) for n in names]
    load_stubs(args.stubs, args.source_dir)
    document = None
    if args.document:
        with open(args.document, encoding="utf-8") as f:
            document = f.read()

    def make_prompts(stub, count):
        return random_prompts(stub, count) if args.random_prompts else prompts(stub, document, count)

    if not args.capacity_only:
        stub = pb_grpc.InferenceStub(grpc.insecure_channel(args.server))
        footprint(stub, make_prompts(stub, 1)[0])
    if args.capacity_server:
        cap = pb_grpc.InferenceStub(grpc.insecure_channel(args.capacity_server))
        capacity(cap, make_prompts(cap, args.requests), args.settle, args.complete, configs)


if __name__ == "__main__":
    main()
