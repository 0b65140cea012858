"""Quality of kvtrim's KV compression, measured against running kvtrim-server processes.

Three tasks, each prompt 2k-7k tokens, every request greedy:

  passkey    a random 5-digit key at a random depth in repeated filler text, then "What is the
             pass key? The pass key is"; correct when the generated text contains the key.
  doc        paragraph recall on a real document (--document): a long span of it, then the first
             --doc-prefix tokens of a paragraph that appeared earlier in the span; scores how many
             of the next --doc-continuation greedy tokens equal the document's own continuation
             (headline: the prefix until the first mismatch; also plain position-wise).
  agreement  the same doc requests, generating --agreement-tokens tokens: the fraction of token ids
             equal position-wise to the uncompressed run's, and the common prefix length.

One JSON object per line goes to --out; a rerun skips the (task, case, config) rows already there,
so a run cut by --time-budget (or killed) resumes where it stopped. A case id names its index and
length ("passkey-007-L3072"); a different --seed, --passkey-format or --document makes different
prompts under the same ids, so give such a run its own --out. Only grpcio and protobuf are
needed: the stubs come from proto/ through grpc_tools (as tests/server/harness.py does) or, where
grpcio-tools is not installed, from --stubs DIR (made by `python -m grpc_tools.protoc -Iproto
--python_out=DIR --grpc_python_out=DIR proto/kvtrim/v1/*.proto`).
"""

import argparse
import collections
import fnmatch
import json
import os
import platform
import queue
import random
import shlex
import subprocess
import sys
import tempfile
import threading
import time

import grpc

pb = None  # kvtrim.v1.inference_pb2
pb_grpc = None  # kvtrim.v1.inference_pb2_grpc

REPO = os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

# --- Configurations: the one list --------------------------------------------------------------

THINK_LAMBDA = 0.5
BUDGETS = (0.50, 0.25, 0.12, 0.05)


def build_configs():
    """[{name, family, budget_ratio, think, fields}]: fields are the KvCompression message as a
    dict (think.lambda spelled as a key, since `lambda` is a Python keyword)."""
    configs = [dict(name="none", family="none", budget_ratio=None, think=False,
                    fields={"policy": "none"})]
    for family in ("snapkv", "pyramidkv", "streamingllm"):
        for ratio in BUDGETS:
            for think in (False, True):
                fields = {"policy": family, "budget_ratio": ratio}
                name = f"{family}-{ratio:.2f}"
                if think:
                    fields["think.lambda"] = THINK_LAMBDA
                    name += f"-think{THINK_LAMBDA}"
                configs.append(dict(name=name, family=family, budget_ratio=ratio, think=think,
                                    fields=fields))
    configs.append(dict(name="corm", family="corm", budget_ratio=None, think=False,
                        fields={"policy": "none", "eviction.policy": "corm"}))
    configs.append(dict(name="corm+pyramidkv-0.25", family="corm+pyramidkv", budget_ratio=0.25,
                        think=False, fields={"policy": "pyramidkv", "budget_ratio": 0.25,
                                             "eviction.policy": "corm"}))
    # The decode-time stages on pyramidkv + ThinK: re-thinning, the window policy (4 sinks, 512
    # recent), CORM, and re-thinning with each; at 12%, as docs/PERFORMANCE.md times them end to
    # end, and at 25%.
    window = {"eviction.policy": "window", "eviction.window.sinks": 4,
              "eviction.window.recent": 512}
    stages = [("rethin", {"think.rethin": True}), ("window", window),
              ("rethin+window", {"think.rethin": True, **window}),
              ("corm", {"eviction.policy": "corm"}),
              ("rethin+corm", {"think.rethin": True, "eviction.policy": "corm"})]
    for ratio in (0.25, 0.12):
        base = {"policy": "pyramidkv", "budget_ratio": ratio, "think.lambda": THINK_LAMBDA}
        for stage, fields in stages:
            configs.append(dict(
                name=f"pyramidkv-{ratio:.2f}-think{THINK_LAMBDA}-{stage.replace('+', '-')}",
                family=f"pyramidkv+{stage}", budget_ratio=ratio, think=True,
                fields={**base, **fields}))
    return configs


# Not a compression setting: the doc task's memorisation floor, the paragraph prefix alone with no
# document before it (a license text may be known to the model from its training data).
PREFIX_ONLY = dict(name="prefix-only", family="prefix-only", budget_ratio=None, think=False,
                   fields={"policy": "none"})


def compression_message(fields):
    message = pb.KvCompression()
    for key, value in fields.items():
        target = message
        *path, leaf = key.split(".")
        for part in path:
            target = getattr(target, part)
        setattr(target, leaf, value)
    return message


def select_configs(spec):
    """--configs: comma-separated names or shell patterns ("snapkv-*", "*think*")."""
    configs = build_configs()
    if not spec:
        return configs
    patterns = [p.strip() for p in spec.split(",") if p.strip()]
    chosen = [c for c in configs if any(fnmatch.fnmatchcase(c["name"], p) for p in patterns)]
    unknown = [p for p in patterns if not any(fnmatch.fnmatchcase(c["name"], p) for c in configs)]
    if unknown:
        names = ", ".join(c["name"] for c in configs)
        sys.exit(f"--configs: no configuration matches {unknown}; known: {names}")
    return chosen


# --- Stubs ------------------------------------------------------------------------------------


def load_stubs(stubs_dir):
    global pb, pb_grpc
    if not stubs_dir:
        stubs_dir = tempfile.mkdtemp(prefix="kvtrim-quality-stubs-")
        proto_dir = os.path.join(REPO, "proto")
        protos = sorted(
            os.path.join(proto_dir, "kvtrim", "v1", name)
            for name in os.listdir(os.path.join(proto_dir, "kvtrim", "v1"))
            if name.endswith(".proto"))
        subprocess.run([sys.executable, "-m", "grpc_tools.protoc", f"-I{proto_dir}",
                        f"--python_out={stubs_dir}", f"--grpc_python_out={stubs_dir}", *protos],
                       check=True)
    sys.path.insert(0, os.path.abspath(stubs_dir))
    from kvtrim.v1 import inference_pb2, inference_pb2_grpc  # noqa: E402
    pb, pb_grpc = inference_pb2, inference_pb2_grpc


# --- Prompts ----------------------------------------------------------------------------------

FILLER = ("The grass is green. The sky is blue. The sun is yellow. Here we go. "
          "There and back again. ")
PASSKEY_INTRO = ("There is an important info hidden inside a lot of irrelevant text. Find it and "
                 "memorize it. I will quiz you about the important information there.\n\n")
PASSKEY_QUESTION = "What is the pass key? The pass key is"


class Tokenizer:
    """The server's tokenizer (Tokenize RPC), memoised."""

    def __init__(self, stub):
        self.stub = stub
        self.cache = {}

    def text(self, text):
        if text not in self.cache:
            self.cache[text] = list(self.stub.Tokenize(pb.TokenizeRequest(text=text),
                                                       timeout=120).ids)
        return self.cache[text]

    def chat(self, user, answer_prefix):
        """A ChatML user turn and the assistant turn opened by answer_prefix."""
        request = pb.TokenizeRequest()
        request.chat.messages.add(role="user", content=user)
        request.chat.add_generation_prompt = True
        ids = list(self.stub.Tokenize(request, timeout=120).ids)
        return ids + (self.text(answer_prefix) if answer_prefix else [])


def passkey_prompt(tokenizer, fmt, key, depth, filler_units):
    before = int(round(filler_units * depth))
    needle = f"The pass key is {key}. Remember it. {key} is the pass key. "
    haystack = FILLER * before + needle + FILLER * (filler_units - before)
    if fmt == "raw":
        return tokenizer.text(PASSKEY_INTRO + haystack + "\n\n" + PASSKEY_QUESTION)
    # chat: the question in the user turn, the answer opened with "The pass key is".
    return tokenizer.chat(PASSKEY_INTRO + haystack + "\n\nWhat is the pass key?",
                          "The pass key is")


def passkey_cases(tokenizer, count, lengths, fmt, seed):
    """Reproducible: case i's key, depth and length come from its own seeded generator."""
    unit = len(tokenizer.text(FILLER * 10)) / 10.0
    cases = []
    for i in range(count):
        rng = random.Random(f"{seed}-passkey-{i}")
        key = rng.randint(10000, 99999)
        depth = rng.random()
        target = lengths[i % len(lengths)]
        units = max(1, int(target / unit))
        for _ in range(3):  # a few corrections land within one filler unit of the target
            ids = passkey_prompt(tokenizer, fmt, key, depth, units)
            step = int(round((target - len(ids)) / unit))
            if step == 0:
                break
            units = max(1, units + step)
        ids = passkey_prompt(tokenizer, fmt, key, depth, units)
        cases.append(dict(task="passkey", case=f"passkey-{i:03d}-L{target}", index=i,
                          length_target=target,
                          prompt_ids=ids, max_tokens=8, ignore_eos=False, key=str(key),
                          depth=round(depth, 4), format=fmt))
    return cases


def document_paragraphs(tokenizer, path, bos_id):
    """The document as paragraphs (blank-line separated), each tokenized with its "\\n\\n", and
    the BOS the tokenizer puts before text ([] for a model that adds none), taken off each."""
    with open(path, encoding="utf-8") as f:
        text = f.read()
    paragraphs = []
    for block in text.split("\n\n"):
        block = block.strip("\n")
        if block.strip():
            paragraphs.append(tokenizer.text(block + "\n\n"))
    bos = [bos_id] if paragraphs and paragraphs[0][:1] == [bos_id] else []
    return [p[len(bos):] for p in paragraphs], bos


MAX_DEPTH = 0.9


def doc_cases(paragraphs, bos, count, lengths, seed, prefix_len, continuation_len,
              agreement_tokens):
    """Case i: lengths[i % n] - prefix_len tokens of the document, the span ending at a paragraph
    end (its start may cut into a paragraph), then the first prefix_len tokens of a random
    paragraph of the span that is at least prefix_len + continuation_len tokens long and whose
    prefix occurs once in the span, so the continuation is unambiguous. The paragraph's scored part
    lies in the first MAX_DEPTH of the span: recall from far back, not of the last lines."""
    document = [t for p in paragraphs for t in p]
    starts = [0]  # starts[k]: offset of paragraph k in `document`
    for p in paragraphs:
        starts.append(starts[-1] + len(p))
    cases = []
    for i in range(count):
        rng = random.Random(f"{seed}-doc-{i}")
        target = lengths[i % len(lengths)]
        span_len = target - len(bos) - prefix_len
        if len(document) < span_len:
            sys.exit(f"--document has {len(document)} tokens: too short for a {target}-token "
                     "prompt (concatenate more text into it)")
        for _ in range(1000):
            end = rng.randrange(1, len(paragraphs) + 1)  # the span ends before paragraph `end`
            begin = starts[end] - span_len
            if begin < 0:
                continue
            need = prefix_len + continuation_len
            candidates = [k for k in range(len(paragraphs))
                          if starts[k] >= begin and len(paragraphs[k]) >= need
                          and starts[k] + need - begin <= MAX_DEPTH * span_len]
            flat = document[begin:starts[end]]
            candidates = [k for k in candidates
                          if _occurrences(flat, paragraphs[k][:prefix_len]) == 1]
            if candidates:
                break
        else:
            sys.exit(f"--document: no paragraph of {prefix_len + continuation_len}+ tokens found")
        k = rng.choice(candidates)
        prefix = paragraphs[k][:prefix_len]
        cases.append(dict(task="doc", case=f"doc-{i:03d}-L{target}", index=i,
                          length_target=target,
                          prompt_ids=bos + flat + prefix, prefix_ids=bos + prefix,
                          max_tokens=max(agreement_tokens, continuation_len), ignore_eos=True,
                          truth_ids=paragraphs[k][prefix_len:prefix_len + continuation_len],
                          depth=round((starts[k] - begin) / float(span_len), 4), paragraph=k))
    return cases


def _occurrences(haystack, needle):
    n = len(needle)
    first = needle[0]
    return sum(1 for j in range(len(haystack) - n + 1)
               if haystack[j] == first and haystack[j:j + n] == needle)


# --- Scores -----------------------------------------------------------------------------------


def common_prefix(a, b):
    n = 0
    for x, y in zip(a, b):
        if x != y:
            break
        n += 1
    return n


def positionwise(a, b, length):
    return sum(1 for x, y in zip(a[:length], b[:length]) if x == y) / float(length)


# --- Requests ---------------------------------------------------------------------------------


def run_request(stub, job, timeout):
    """One Generate stream: (generated ids, text, final message)."""
    request = pb.GenerateRequest(request_id=f"quality-{job['task']}-{job['case']}-{job['config']}")
    request.tokens.ids.extend(job["prompt_ids"])
    request.sampling.temperature = 0.0
    request.stopping.max_tokens = job["max_tokens"]
    request.stopping.ignore_eos = job["ignore_eos"]
    request.compression.CopyFrom(compression_message(job["fields"]))
    ids, text, final = [], [], None
    for message in stub.Generate(request, timeout=timeout):
        ids.extend(t.id for t in message.tokens)
        text.append(message.text)
        if message.finish_reason:
            final = message
    if final is None:
        raise RuntimeError("the stream ended without a final message")
    return ids, "".join(text), final


def base_row(job, ids, text, final, server, seconds):
    kv = final.kv_memory
    stored_fraction = kv.bytes_stored / kv.bytes_uncompressed if kv.bytes_uncompressed else None
    return dict(
        task=job["task"], case=job["case"], config=job["config"], family=job["family"],
        budget_ratio=job["budget_ratio"], think=job["think"],
        length_target=job["length_target"], prompt_tokens=final.usage.prompt_tokens,
        generated_ids=ids, generated_text=text,
        finish_reason=pb.FinishReason.Name(final.finish_reason),
        saved_ratio=kv.saved_ratio, bytes_stored=kv.bytes_stored,
        bytes_uncompressed=kv.bytes_uncompressed, stored_fraction=stored_fraction,
        tokens_kept_per_layer=list(kv.tokens_kept_per_layer), key_channels=kv.key_channels,
        compression=kv.compression, preemptions=final.preemptions,
        server=server, seconds=round(seconds, 3),
        server_seconds=round(final.timings.total_seconds, 3))


class Results:
    """The JSONL file: what is done, appends under a lock, agreement rows once the uncompressed
    run of a doc case is known."""

    def __init__(self, path):
        self.path = path
        self.lock = threading.Lock()
        self.done = set()
        self.reference = {}  # doc case -> uncompressed generated ids
        self.waiting = collections.defaultdict(list)  # doc case -> doc rows awaiting the reference
        rows = []
        if os.path.exists(path):
            with open(path, encoding="utf-8") as f:
                for line in f:
                    line = line.strip()
                    if line:
                        try:
                            row = json.loads(line)
                        except json.JSONDecodeError:
                            continue  # a line cut by a kill: its row is redone
                        if row.get("task") != "_meta":
                            rows.append(row)
        for row in rows:
            self.done.add((row["task"], row["case"], row["config"]))
            if row["task"] == "doc" and row["config"] == "none":
                self.reference[row["case"]] = row["generated_ids"]
        self.file = open(path, "a", encoding="utf-8")
        with self.lock:
            for row in rows:  # doc rows whose agreement row a kill cut off
                if row["task"] == "doc" and ("agreement", row["case"], row["config"]) \
                        not in self.done and row["config"] != PREFIX_ONLY["name"]:
                    self._agreement(row)

    def _write(self, row):
        self.file.write(json.dumps(row, sort_keys=True) + "\n")
        self.file.flush()
        self.done.add((row["task"], row["case"], row["config"]))

    def _agreement(self, doc_row):
        case = doc_row["case"]
        if case not in self.reference:
            self.waiting[case].append(doc_row)
            return
        reference = self.reference[case]
        ids = doc_row["generated_ids"]
        length = len(reference)
        row = dict(doc_row, task="agreement", score=positionwise(ids, reference, length),
                   common_prefix=common_prefix(ids, reference), reference_tokens=length)
        for key in ("prefix_match", "positionwise_match", "truth_ids"):
            row.pop(key, None)
        self._write(row)

    def add(self, row):
        with self.lock:
            if row["task"] == "doc" and row["config"] == "none":
                self.reference[row["case"]] = row["generated_ids"]
            self._write(row)
            if row["task"] == "doc" and row["config"] != PREFIX_ONLY["name"]:
                self._agreement(row)
                if row["config"] == "none":
                    for waiting in self.waiting.pop(row["case"], []):
                        self._agreement(waiting)

    def add_meta(self, meta):
        with self.lock:
            self.file.write(json.dumps(meta, sort_keys=True) + "\n")
            self.file.flush()


def score_row(job, row):
    ids = row["generated_ids"]
    if job["task"] == "passkey":
        row.update(score=1.0 if job["key"] in row["generated_text"] else 0.0, key=job["key"],
                   depth=job["depth"], format=job["format"])
    else:
        truth = job["truth_ids"]
        prefix = common_prefix(ids, truth)
        row.update(score=prefix / float(len(truth)), prefix_match=prefix / float(len(truth)),
                   positionwise_match=positionwise(ids, truth, len(truth)), truth_ids=truth,
                   common_prefix=prefix, depth=job["depth"])
    return row


# --- Main -------------------------------------------------------------------------------------


def parse_args():
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0],
                                formatter_class=argparse.RawDescriptionHelpFormatter,
                                epilog="configurations: " +
                                ", ".join(c["name"] for c in build_configs()))
    p.add_argument("--servers", required=True, help="host:port[,host:port...] of kvtrim-servers")
    p.add_argument("--out", required=True, help="results, one JSON object a line (appended)")
    p.add_argument("--document", help="text file for the doc and agreement tasks (e.g. "
                   "/usr/share/common-licenses/GPL-3 and more licenses, concatenated)")
    p.add_argument("--passkey-cases", type=int, default=50)
    p.add_argument("--doc-cases", type=int, default=10)
    p.add_argument("--lengths", default="2048,3072,4096",
                   help="prompt lengths in tokens; case i gets the (i mod n)-th")
    p.add_argument("--configs", default="", help="names or patterns, comma-separated (all)")
    p.add_argument("--tasks", default="passkey,doc", help="passkey, doc (doc includes agreement)")
    p.add_argument("--passkey-format", choices=("raw", "chat"), default="raw",
                   help="raw text ending in 'The pass key is', or a ChatML turn (raw: see README)")
    p.add_argument("--doc-prefix", type=int, default=20,
                   help="paragraph tokens repeated at the end")
    p.add_argument("--doc-continuation", type=int, default=32, help="tokens scored against truth")
    p.add_argument("--agreement-tokens", type=int, default=64)
    p.add_argument("--seed", default="kvtrim-quality-1")
    p.add_argument("--inflight", type=int, default=2, help="requests in flight per server")
    p.add_argument("--time-budget", type=float, default=0,
                   help="seconds; no new request starts after it (0 = none)")
    p.add_argument("--request-timeout", type=float, default=3600)
    p.add_argument("--stubs", help="directory with kvtrim/v1/inference_pb2*.py (no grpc_tools)")
    p.add_argument("--dry-run", action="store_true",
                   help="build the cases, list the requests, send none")
    p.add_argument("--no-prefix-only", action="store_true",
                   help="skip the doc task's memorisation floor (prefix alone, no document)")
    return p.parse_args()


def build_cases(args, tokenizer, info, lengths, tasks, configs):
    """(cases, the configs doc cases run: those asked, plus `none` that agreement compares with and
    the prefix-only floor)."""
    cases = []
    if "passkey" in tasks and args.passkey_cases > 0:
        cases += passkey_cases(tokenizer, args.passkey_cases, lengths, args.passkey_format,
                               args.seed)
    doc_configs = list(configs)
    if "doc" in tasks and args.doc_cases > 0:
        if not args.document:
            sys.exit("the doc task needs --document FILE (or --tasks passkey)")
        paragraphs, bos = document_paragraphs(tokenizer, args.document, info.bos_id)
        cases += doc_cases(paragraphs, bos, args.doc_cases, lengths, args.seed, args.doc_prefix,
                           args.doc_continuation, args.agreement_tokens)
        if not any(c["name"] == "none" for c in doc_configs):
            doc_configs.insert(0, build_configs()[0])
        if not args.no_prefix_only:
            doc_configs.insert(1, PREFIX_ONLY)
    for case in cases:
        if len(case["prompt_ids"]) + case["max_tokens"] > info.max_context:
            sys.exit(f"{case['case']}: {len(case['prompt_ids'])} prompt tokens exceed the "
                     f"model's context ({info.max_context})")
    return cases, doc_configs


def build_jobs(cases, configs, doc_configs, done):
    """One job per (case, config) not in `done`. Case-major, the uncompressed run first: a run cut
    short still compares configs on the same cases, and agreement rows need each doc case's
    uncompressed reference."""
    jobs = []
    for case in cases:
        for config in (doc_configs if case["task"] == "doc" else configs):
            if (case["task"], case["case"], config["name"]) in done:
                continue
            job = dict(case, config=config["name"], family=config["family"],
                       budget_ratio=config["budget_ratio"], think=config["think"],
                       fields=config["fields"])
            if config is PREFIX_ONLY:
                job["prompt_ids"] = case["prefix_ids"]
            jobs.append(job)
    jobs.sort(key=lambda j: (j["index"], j["task"], j["config"] != "none"))
    return jobs


def run_jobs(jobs, stubs, results, args, started):
    """Runs the jobs on --inflight threads per server, all taking from one queue; no job starts
    after the time budget. Returns (rows written, failed, not started)."""
    work = queue.Queue()
    for job in jobs:
        work.put(job)
    counters = collections.Counter()
    lock = threading.Lock()

    def attempt(stub, server, job):
        began = time.monotonic()
        for retry in range(3):
            try:
                ids, text, final = run_request(stub, job, args.request_timeout)
                return score_row(job, base_row(job, ids, text, final, server,
                                               time.monotonic() - began))
            except grpc.RpcError as error:
                with lock:
                    print(f"  {job['task']} {job['case']} {job['config']} on {server}: "
                          f"{error.code().name} {error.details()}", flush=True)
                if error.code() not in (grpc.StatusCode.UNAVAILABLE,
                                        grpc.StatusCode.RESOURCE_EXHAUSTED):
                    return None
                time.sleep(5 * (retry + 1))
        return None

    def worker(server):
        while not (args.time_budget and time.monotonic() - started > args.time_budget):
            try:
                job = work.get_nowait()
            except queue.Empty:
                return
            row = attempt(stubs[server], server, job)
            with lock:
                if row is None:
                    counters["failed"] += 1
                    continue
                results.add(row)
                counters["done"] += 1
                print(f"[{counters['done']}/{len(jobs)} {time.monotonic() - started:.0f}s] "
                      f"{job['task']} {job['case']} {job['config']}: {row['prompt_tokens']} "
                      f"tokens, score {row['score']:.3f}, saved {row['saved_ratio']:.3f}, "
                      f"{row['seconds']:.1f}s on {server}  {row['generated_text']!r:.60}",
                      flush=True)

    threads = [threading.Thread(target=worker, args=(server,), daemon=True)
               for server in stubs for _ in range(max(1, args.inflight))]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join()
    return counters["done"], counters["failed"], work.qsize()


def main():
    args = parse_args()
    started = time.monotonic()
    load_stubs(args.stubs)
    servers = [s.strip() for s in args.servers.split(",") if s.strip()]
    lengths = [int(x) for x in args.lengths.split(",") if x.strip()]
    tasks = {t.strip() for t in args.tasks.split(",") if t.strip()}
    configs = select_configs(args.configs)
    channels = {s: grpc.insecure_channel(s) for s in servers}
    stubs = {s: pb_grpc.InferenceStub(c) for s, c in channels.items()}
    info = stubs[servers[0]].GetModelInfo(pb.GetModelInfoRequest(), timeout=120)
    cases, doc_configs = build_cases(args, Tokenizer(stubs[servers[0]]), info, lengths, tasks,
                                     configs)
    if args.dry_run:
        for case in cases:
            print(f"{case['case']}: {len(case['prompt_ids'])} prompt tokens (target "
                  f"{case['length_target']}), depth {case['depth']}, max_tokens "
                  f"{case['max_tokens']}")
        print(f"configs: {', '.join(c['name'] for c in configs)}")
        return

    results = Results(args.out)
    jobs = build_jobs(cases, configs, doc_configs, results.done)
    print(f"model {info.name} ({info.backend}), {len(servers)} server(s), {len(cases)} cases, "
          f"{len(configs)} configs, {len(jobs)} requests to run "
          f"({len(results.done)} rows already in {args.out})", flush=True)
    results.add_meta(dict(
        task="_meta", time=time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime()),
        command="python " + shlex.join([os.path.relpath(os.path.abspath(sys.argv[0]), REPO)] +
                                       sys.argv[1:]),
        model=info.name, architecture=info.architecture, backend=info.backend,
        n_layers=info.n_layers, n_kv_heads=info.n_kv_heads, head_dim=info.head_dim,
        client_host=platform.node(), client_cpu=_cpu_name(), client_cores=os.cpu_count(),
        servers=servers, jobs=len(jobs), passkey_format=args.passkey_format,
        lengths=lengths, seed=args.seed))
    done, failed, left = run_jobs(jobs, stubs, results, args, started)
    print(f"finished: {done} rows written, {failed} failed, {left} not started"
          f"{' (time budget reached: rerun to resume)' if left else ''}; "
          f"{time.monotonic() - started:.0f}s", flush=True)
    for channel in channels.values():
        channel.close()
    sys.exit(1 if failed else 0)


def _cpu_name():
    try:
        with open("/proc/cpuinfo", encoding="utf-8") as f:
            for line in f:
                if line.startswith("model name"):
                    return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return platform.processor() or platform.machine()


if __name__ == "__main__":
    main()
