"""KV compression through the API: a request's compression message is checked field by field
(INVALID_ARGUMENT naming the field), a request without one gets the server's --kv-compression
default, "none" turns it off, and the final response, GetServerStats and /metrics report what
was stored and saved consistently."""

import math
import os
import subprocess
import unittest

import grpc

import harness
from harness import Server, generate

DEFAULT_SPEC = "policy=snapkv,budget_ratio=0.25"
RATIO = 0.25
# Small pages, so that page rounding does not hide what selection saves on a short prompt.
PAGE_KIB = 16
# A prompt of a few hundred tokens: long enough for the default's 32-token window and for the
# kept quarter to fill fewer pages than the whole.
LONG_TEXT = " ".join(
    f"Note {i}: the {colour} box on shelf {i % 7} holds {i * 3} marbles and a {thing}."
    for i, (colour, thing) in enumerate(
        zip(["red", "green", "blue", "yellow", "white", "black"] * 2,
            ["key", "coin", "map", "shell", "ring", "stamp"] * 2)))
MAX_TOKENS = 8


def think(**fields):
    """A KvCompression.Think; `lambda` is a Python keyword, so it is passed as lambda_."""
    if "lambda_" in fields:
        fields["lambda"] = fields.pop("lambda_")
    return harness.pb.KvCompression.Think(**fields)


def validation_cases():
    """(name, compression message, field the error must name) for errors found before the
    request is queued."""
    pb = harness.pb
    C, E = pb.KvCompression, pb.KvCompression.Eviction
    return [
        ("unknown policy", C(policy="h2o"), "compression.policy"),
        ("budget_ratio 1.5", C(policy="snapkv", budget_ratio=1.5), "compression.budget_ratio"),
        ("budget_ratio 0", C(policy="pyramidkv", budget_ratio=0.0), "compression.budget_ratio"),
        ("budget_ratio NaN", C(policy="snapkv", budget_ratio=math.nan),
         "compression.budget_ratio"),
        ("both budgets", C(policy="snapkv", budget_ratio=0.5, budget_tokens=128),
         "compression.budget_ratio"),
        ("no budget", C(policy="streamingllm"), "compression.budget_ratio"),
        ("negative budget_tokens", C(policy="streamingllm", budget_tokens=-3),
         "compression.budget_tokens"),
        ("budget without a policy", C(budget_ratio=0.5), "compression.budget_ratio"),
        ("beta with snapkv", C(policy="snapkv", budget_ratio=0.5, beta=10), "compression.beta"),
        ("sinks with pyramidkv", C(policy="pyramidkv", budget_ratio=0.5, sinks=4),
         "compression.sinks"),
        ("window with streamingllm", C(policy="streamingllm", budget_ratio=0.5, window=8),
         "compression.window"),
        ("unknown pooling", C(policy="snapkv", budget_ratio=0.5, pooling="minpool"),
         "compression.pooling"),
        ("even kernel_size", C(policy="snapkv", budget_ratio=0.5, kernel_size=4),
         "compression.kernel_size"),
        ("negative beta", C(policy="pyramidkv", budget_ratio=0.5, beta=-1), "compression.beta"),
        ("think lambda and keep_ratio", C(think=think(lambda_=0.5, keep_ratio=0.5)),
         "compression.think.lambda"),
        ("think lambda 1", C(think=think(lambda_=1.0)), "compression.think.lambda"),
        ("think keep_ratio 1.5", C(think=think(keep_ratio=1.5)), "compression.think.keep_ratio"),
        ("think recent without pruning", C(think=think(recent=8)), "compression.think.recent"),
        ("unknown eviction policy", C(eviction=E(policy="lru")), "compression.eviction.policy"),
        ("corm fields with eviction window",
         C(eviction=E(policy="window", corm=E.Corm(alpha=2.0))), "compression.eviction.corm"),
        ("window fields without eviction", C(eviction=E(window=E.Window(recent=64))),
         "compression.eviction.window"),
        ("corm alpha 0", C(eviction=E(policy="corm", corm=E.Corm(alpha=0.0))),
         "compression.eviction.corm.alpha"),
        ("corm max_tokens below recent",
         C(eviction=E(policy="corm", corm=E.Corm(recent=32, max_tokens=8))),
         "compression.eviction.corm.max_tokens"),
    ]


class Compression(unittest.TestCase):

    @classmethod
    def setUpClass(cls):
        cls.server = Server("compression", "--kv-compression", DEFAULT_SPEC, "--page-kib",
                            str(PAGE_KIB))
        cls.stub = cls.server.stub
        cls.info = cls.stub.GetModelInfo(harness.pb.GetModelInfoRequest(), timeout=30)

    @classmethod
    def tearDownClass(cls):
        cls.server.stop()

    def request(self, text=LONG_TEXT, compression=None, max_tokens=MAX_TOKENS):
        pb = harness.pb
        r = pb.GenerateRequest(text=text, stopping=pb.StoppingCriteria(max_tokens=max_tokens,
                                                                      ignore_eos=True))
        if compression is not None:
            r.compression.CopyFrom(compression)
        return r

    def run_ok(self, request):
        result = generate(self.stub, request)
        self.assertTrue(result.ok, f"{result.code} {result.details}")
        return result

    def assert_invalid(self, name, result, field):
        self.assertEqual(result.code, grpc.StatusCode.INVALID_ARGUMENT,
                         f"{name}: {result.details}")
        self.assertTrue(result.details.startswith(field + ":"),
                        f"{name}: the message should name {field!r}: {result.details!r}")

    def check_kv_memory(self, result, prompt_len):
        """What holds for every finished request, compressed or not."""
        kv = result.final.kv_memory
        generated = result.final.usage.completion_tokens
        self.assertGreater(kv.bytes_uncompressed, 0)
        self.assertEqual(kv.bytes_stored, kv.bytes_pages + kv.bytes_metadata)
        self.assertLessEqual(kv.bytes_rows, kv.bytes_pages)
        self.assertAlmostEqual(kv.saved_ratio, 1 - kv.bytes_stored / kv.bytes_uncompressed,
                               places=9)
        self.assertEqual(len(kv.tokens_kept_per_layer), self.info.n_layers)
        for layer, kept in enumerate(kv.tokens_kept_per_layer):
            self.assertGreaterEqual(kept, 1, f"layer {layer}")
            self.assertLessEqual(kept, prompt_len + generated, f"layer {layer}")
        return kv

    # --- Errors -----------------------------------------------------------------------------

    def test_invalid_fields_are_named(self):
        for name, compression, field in validation_cases():
            with self.subTest(name):
                self.assert_invalid(name, generate(self.stub, self.request("Hello", compression)),
                                    field)

    def test_window_longer_than_the_prompt(self):
        pb = harness.pb
        result = generate(self.stub, self.request(
            "Hello there", pb.KvCompression(policy="snapkv", budget_ratio=0.5, window=64)))
        self.assertEqual(result.code, grpc.StatusCode.INVALID_ARGUMENT, result.details)
        self.assertTrue(result.details.startswith("compression."), result.details)
        self.assertIn("window", result.details.split(":")[0])
        self.assertIn("longer than the prompt", result.details)

    # --- The server default and "none" ------------------------------------------------------

    def test_default_compresses_and_none_does_not(self):
        pb = harness.pb
        prompt_len = harness.prompt_tokens(self.stub, self.request())
        self.assertGreater(prompt_len, 200)
        default = self.run_ok(self.request())
        off = self.run_ok(self.request(compression=pb.KvCompression(policy="none")))
        empty = self.run_ok(self.request(compression=pb.KvCompression()))

        kv = self.check_kv_memory(default, prompt_len)
        self.assertTrue(kv.compression.startswith(DEFAULT_SPEC + ","), kv.compression)
        self.assertLess(kv.bytes_stored, kv.bytes_uncompressed)
        self.assertGreater(kv.saved_ratio, 0)
        self.assertEqual(kv.key_channels, self.info.head_dim)
        # SnapKV keeps a quarter of the prompt per layer; generated tokens come on top.
        for kept in kv.tokens_kept_per_layer:
            self.assertLessEqual(kept, int(prompt_len * RATIO) + MAX_TOKENS)

        for result in (off, empty):
            kv_off = self.check_kv_memory(result, prompt_len)
            self.assertEqual(kv_off.compression, "none")
            self.assertGreaterEqual(kv_off.bytes_stored, kv_off.bytes_uncompressed)
            self.assertLessEqual(kv_off.saved_ratio, 0)
            self.assertEqual(kv_off.bytes_metadata, 0)
            self.assertEqual(kv_off.key_channels, self.info.head_dim)
            for kept in kv_off.tokens_kept_per_layer:
                self.assertGreaterEqual(kept, prompt_len)
            self.assertGreater(kv_off.bytes_stored, kv.bytes_stored)

    def test_prompt_shorter_than_the_default_window_is_stored_uncompressed(self):
        short = self.request("Hello there")
        kv = self.check_kv_memory(self.run_ok(short), harness.prompt_tokens(self.stub, short))
        self.assertEqual(kv.compression, "none")

    def test_all_stages(self):
        pb = harness.pb
        E = pb.KvCompression.Eviction
        compression = pb.KvCompression(policy="pyramidkv", budget_ratio=0.2,
                                       think=think(lambda_=0.5),
                                       eviction=E(policy="corm", corm=E.Corm(alpha=1.0)))
        prompt_len = harness.prompt_tokens(self.stub, self.request())
        kv = self.check_kv_memory(self.run_ok(self.request(compression=compression)), prompt_len)
        for part in ("policy=pyramidkv", "budget_ratio=0.2", "think.lambda=0.5",
                     "eviction=corm"):
            self.assertIn(part, kv.compression.split(","))
        self.assertEqual(kv.key_channels, self.info.head_dim - int(self.info.head_dim * 0.5))
        self.assertGreater(kv.bytes_metadata, 0)  # channel sets and CORM state
        self.assertLess(kv.bytes_stored, kv.bytes_uncompressed)

    # --- Observability ----------------------------------------------------------------------

    def check_metrics_after(self, request):
        """Runs `request` alone; /metrics grows by exactly what its final response reports."""
        self.server.wait_idle(self)
        before = self.server.metrics()
        result = self.run_ok(request)
        self.server.wait_idle(self)
        after = self.server.metrics()
        kv = result.final.kv_memory

        for name, kind in (("kvtrim_kv_saved_ratio", "histogram"),
                           ("kvtrim_request_kv_bytes_stored_total", "counter"),
                           ("kvtrim_request_kv_bytes_saved_total", "counter"),
                           ("kvtrim_kv_pool_bytes_used", "gauge"),
                           ("kvtrim_kv_bytes_uncompressed", "gauge"),
                           ("kvtrim_kv_bytes_stored", "gauge")):
            self.assertEqual(after.types.get(name), kind, name)
        delta = lambda name, **labels: after.value(name, **labels) - before.value(name, **labels)
        self.assertEqual(delta("kvtrim_kv_saved_ratio_count"), 1)
        self.assertAlmostEqual(delta("kvtrim_kv_saved_ratio_sum"), kv.saved_ratio, places=6)
        self.assertEqual(delta("kvtrim_kv_saved_ratio_bucket", le="+Inf"), 1)
        # The ratio lands in every bucket at or above it, negative ones in the lowest (le 0).
        for labels, _ in after.samples["kvtrim_kv_saved_ratio_bucket"]:
            bound = float(labels["le"])
            self.assertEqual(delta("kvtrim_kv_saved_ratio_bucket", **labels),
                             1 if kv.saved_ratio <= bound else 0, labels)
        self.assertEqual(delta("kvtrim_request_kv_bytes_stored_total"), kv.bytes_stored)
        self.assertEqual(delta("kvtrim_request_kv_bytes_saved_total"),
                         max(0, kv.bytes_uncompressed - kv.bytes_stored))
        return kv

    def test_metrics_of_an_uncompressed_request(self):
        kv = self.check_metrics_after(self.request(
            "Hello there", harness.pb.KvCompression(policy="none")))
        self.assertLessEqual(kv.saved_ratio, 0)

    def test_metrics_of_a_compressed_request(self):
        kv = self.check_metrics_after(self.request())
        self.assertGreater(kv.saved_ratio, 0)

    def test_server_stats(self):
        stats = self.server.wait_idle(self)
        self.assertTrue(stats.default_compression.startswith(DEFAULT_SPEC + ","),
                        stats.default_compression)
        self.assertEqual(stats.pool_bytes_total, stats.pool_pages_total * stats.pool_page_bytes)
        self.assertEqual(stats.pool_bytes_used, 0)
        self.assertEqual(stats.kv_saved_ratio, 0)

        # While a compressed request is resident: resident bytes, and their ratio, consistent.
        resident = []

        def look(index, message):
            if resident or index < 2:
                return
            s = self.server.stats()
            if s.requests_running == 1 and s.kv_bytes_uncompressed > 0:
                resident.append(s)

        result = generate(self.stub, self.request(max_tokens=48), on_message=look)
        self.assertTrue(result.ok, result.details)
        self.assertTrue(resident, "no stats snapshot while the request ran")
        s = resident[0]
        self.assertEqual(s.pool_bytes_used, s.pool_pages_used * s.pool_page_bytes)
        self.assertLess(s.kv_bytes_stored, s.kv_bytes_uncompressed)
        self.assertAlmostEqual(s.kv_saved_ratio, 1 - s.kv_bytes_stored / s.kv_bytes_uncompressed,
                               places=9)

        kv = result.final.kv_memory
        after = self.server.wait_idle(self)
        self.assertEqual(after.kv_bytes_stored_total - stats.kv_bytes_stored_total,
                         kv.bytes_stored)
        self.assertEqual(after.kv_bytes_saved_total - stats.kv_bytes_saved_total,
                         max(0, kv.bytes_uncompressed - kv.bytes_stored))

    # --- The CLI ----------------------------------------------------------------------------

    def cli(self, *flags):
        return subprocess.run([harness.PATHS.cli, "generate", *flags], capture_output=True,
                              timeout=harness.STREAM_TIMEOUT, text=True,
                              env=dict(os.environ, OMP_NUM_THREADS="1"))

    def test_cli_client_sends_its_spec(self):
        done = self.cli("--server", f"127.0.0.1:{self.server.port}", "--prompt", LONG_TEXT,
                        "--max-tokens", "4", "--compression",
                        "policy=streamingllm,budget_tokens=64,sinks=4")
        self.assertEqual(done.returncode, 0, done.stderr)
        self.assertIn("KV saved", done.stderr)
        self.assertIn("compression policy=streamingllm,budget_tokens=64,sinks=4", done.stderr)

    def test_cli_in_process(self):
        done = self.cli("--model", harness.PATHS.model, "--prompt", LONG_TEXT, "--max-tokens", "4",
                        "--compression", DEFAULT_SPEC)
        self.assertEqual(done.returncode, 0, done.stderr)
        self.assertIn("KV saved", done.stderr)
        self.assertIn("compression " + DEFAULT_SPEC, done.stderr)

    def test_cli_uncompressed_reports_pages_not_savings(self):
        done = self.cli("--model", harness.PATHS.model, "--prompt", "Hi", "--max-tokens", "2")
        self.assertEqual(done.returncode, 0, done.stderr)
        self.assertIn("stored in whole pages for", done.stderr)
        self.assertIn("compression none", done.stderr)
        self.assertNotIn("KV saved", done.stderr)

    def test_cli_refuses_a_bad_spec(self):
        done = self.cli("--model", harness.PATHS.model, "--prompt", "Hi", "--compression",
                        "policy=h2o")
        self.assertEqual(done.returncode, 1, done.stderr)
        self.assertIn("--compression: policy: unknown policy 'h2o'", done.stderr)


class BadDefault(unittest.TestCase):

    def test_server_refuses_an_invalid_default(self):
        done = subprocess.run(
            [harness.PATHS.server, "--model", harness.PATHS.model, "--listen", "127.0.0.1:0",
             "--metrics-port", "0", "--kv-compression", "policy=snapkv,budget_ratio=1.5"],
            capture_output=True, text=True, timeout=harness.STARTUP_TIMEOUT,
            stdin=subprocess.DEVNULL)
        self.assertEqual(done.returncode, 2, done.stderr + done.stdout)
        self.assertIn("--kv-compression: snapkv.budget_ratio: 1.5 is outside (0, 1]",
                      done.stderr + done.stdout)

    def test_server_refuses_a_default_its_model_cannot_take(self):
        # A sliding-window model (the tiny Mistral) cannot be compressed: refused at startup
        # rather than failing every request that takes the default.
        mistral = os.path.join(harness.PATHS.source_dir, "tests", "data", "tiny", "mistral.gguf")
        done = subprocess.run(
            [harness.PATHS.server, "--model", mistral, "--listen", "127.0.0.1:0",
             "--metrics-port", "0", "--kv-compression", "policy=snapkv,budget_ratio=0.5"],
            capture_output=True, text=True, timeout=harness.STARTUP_TIMEOUT,
            stdin=subprocess.DEVNULL)
        self.assertEqual(done.returncode, 2, done.stderr + done.stdout)
        self.assertIn("sliding-window attention", done.stderr + done.stdout)


class NoDecodeEviction(unittest.TestCase):
    """--decode-eviction=false: requests that evict while decoding are refused with
    FAILED_PRECONDITION naming the flag, the others served; a default that evicts is refused at
    startup."""

    @classmethod
    def setUpClass(cls):
        cls.server = Server("no_decode_eviction", "--decode-eviction=false", "--page-kib",
                            str(PAGE_KIB))

    @classmethod
    def tearDownClass(cls):
        cls.server.stop()

    def request(self, **compression):
        pb = harness.pb
        r = pb.GenerateRequest(text=LONG_TEXT, stopping=pb.StoppingCriteria(max_tokens=4,
                                                                           ignore_eos=True))
        r.compression.CopyFrom(pb.KvCompression(**compression))
        return r

    def test_evicting_requests_are_refused(self):
        pb = harness.pb
        for policy in ("corm", "window"):
            result = generate(self.server.stub,
                              self.request(eviction=pb.KvCompression.Eviction(policy=policy)))
            self.assertEqual(result.code, grpc.StatusCode.FAILED_PRECONDITION,
                             f"{policy}: {result.details}")
            self.assertIn("--decode-eviction=false", result.details)

    def test_the_cli_names_the_code(self):
        address = f"127.0.0.1:{self.server.port}"
        done = subprocess.run(
            [harness.PATHS.cli, "generate", "--server", address, "--prompt", "Hi",
             "--max-tokens", "2", "--compression", "eviction=corm"],
            capture_output=True, text=True, timeout=harness.STREAM_TIMEOUT)
        self.assertEqual(done.returncode, 1, done.stderr)
        self.assertIn(f"kvtrim: {address}: FAILED_PRECONDITION: ", done.stderr)
        self.assertIn("--decode-eviction=false", done.stderr)

    def test_other_requests_are_served(self):
        result = generate(self.server.stub, self.request(policy="snapkv", budget_ratio=0.5))
        self.assertTrue(result.ok, f"{result.code} {result.details}")
        self.assertEqual(result.final.usage.completion_tokens, 4)

    def test_an_evicting_default_is_refused_at_startup(self):
        done = subprocess.run(
            [harness.PATHS.server, "--model", harness.PATHS.model, "--listen", "127.0.0.1:0",
             "--metrics-port", "0", "--decode-eviction=false", "--kv-compression",
             "eviction=corm"],
            capture_output=True, text=True, timeout=harness.STARTUP_TIMEOUT,
            stdin=subprocess.DEVNULL)
        self.assertEqual(done.returncode, 2, done.stderr + done.stdout)
        self.assertIn("decode-time eviction is off on this server", done.stderr + done.stdout)


if __name__ == "__main__":
    harness.main()
