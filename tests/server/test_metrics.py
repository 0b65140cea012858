"""/metrics after a known load: every family is there with its type, and the counters and
histogram counts equal what was sent and streamed. A fresh server already has every series the
deployment's rules and dashboard read, the labelled counters at 0."""

import math
import os
import re
import unittest

import harness
from harness import Server, chat, generate

POOL_MIB = 64

COUNTERS = ("kvtrim_prompt_tokens_total", "kvtrim_generation_tokens_total",
            "kvtrim_requests_finished_total", "kvtrim_preemptions_total",
            "kvtrim_engine_forward_seconds_total", "kvtrim_engine_device_seconds_total")
GAUGES = ("kvtrim_requests_running", "kvtrim_requests_waiting", "kvtrim_kv_pool_pages_used",
          "kvtrim_kv_pool_pages_total", "kvtrim_kv_pool_bytes_used", "kvtrim_kv_pool_bytes_total")
LATENCY_HISTOGRAMS = ("kvtrim_time_to_first_token_seconds", "kvtrim_inter_token_latency_seconds",
                      "kvtrim_e2e_request_latency_seconds", "kvtrim_request_queue_time_seconds")


class MetricsAfterLoad(unittest.TestCase):

    @classmethod
    def setUpClass(cls):
        cls.server = Server("metrics", "--kv-pool-mib", str(POOL_MIB))
        cls.fresh = cls.server.metrics()  # before any request

    @classmethod
    def tearDownClass(cls):
        cls.server.stop()

    def test_a_fresh_server_has_every_reason_and_code_at_zero(self):
        """rate() and increase() need a sample before a series' first event: a counter that
        first appears at 1 hides that event (a server's first error would count as none)."""
        for reason in ("eos", "stop", "length", "cancelled", "deadline", "error"):
            self.assertIn(({"reason": reason}, 0.0),
                          self.fresh.samples.get("kvtrim_requests_finished_total", []), reason)
        for code in ("INVALID_ARGUMENT", "RESOURCE_EXHAUSTED", "FAILED_PRECONDITION",
                     "UNAVAILABLE", "UNAUTHENTICATED"):
            self.assertIn(({"code": code}, 0.0),
                          self.fresh.samples.get("kvtrim_requests_rejected_total", []), code)

    def test_the_deployment_reads_only_exported_series(self):
        """Every kvtrim_ series (or family) that deploy/prometheus's rules and deploy/grafana's
        dashboard name is in a fresh server's scrape."""
        used = set()
        for path in ("deploy/prometheus/kvtrim-rules.yml", "deploy/grafana/kvtrim-dashboard.json"):
            with open(os.path.join(harness.PATHS.source_dir, path), encoding="utf-8") as f:
                used |= set(re.findall(r"\bkvtrim_[a-z0-9_]+", f.read()))
        self.assertGreater(len(used), 10)
        self.assertEqual(sorted(used - set(self.fresh.samples) - set(self.fresh.types)), [])

    def check_histogram(self, metrics, name, count, total=None):
        self.assertEqual(metrics.types.get(name), "histogram", name)
        self.assertEqual(metrics.value(name + "_count"), count, name)
        buckets = sorted(((float(labels["le"]), value)
                          for labels, value in metrics.samples[name + "_bucket"]))
        self.assertEqual(buckets[-1], (math.inf, count), name)
        counts = [value for _, value in buckets]
        self.assertEqual(counts, sorted(counts), f"{name}: buckets are cumulative")
        if total is not None:
            self.assertAlmostEqual(metrics.value(name + "_sum"), total, delta=1e-6 * count + 1e-9,
                                   msg=name)

    def test_counters_equal_the_load(self):
        pb = harness.pb
        requests = [
            pb.GenerateRequest(text=f"Item {i}: the", stopping=pb.StoppingCriteria(
                max_tokens=max_tokens, ignore_eos=True))
            for i, max_tokens in enumerate((5, 7, 9, 11))
        ]
        requests.append(pb.GenerateRequest(chat=chat("user", "What is the capital of France?"),
                                           stopping=pb.StoppingCriteria(max_tokens=24)))
        requests.append(pb.GenerateRequest(text="Counting: one, two, three, four",
                                           stopping=pb.StoppingCriteria(max_tokens=16,
                                                                        stop=[","])))
        prompt_lens = [harness.prompt_tokens(self.server.stub, r) for r in requests]
        results = harness.run_concurrently(lambda r: generate(self.server.stub, r), requests)
        for result in results:
            self.assertTrue(result.ok, result.details)
        # The load is what the test thinks it is.
        for result in results[:4]:
            self.assertEqual(result.final.finish_reason, pb.FINISH_REASON_LENGTH)
        self.assertEqual(results[4].final.finish_reason, pb.FINISH_REASON_EOS)
        self.assertEqual(results[5].final.finish_reason, pb.FINISH_REASON_STOP)
        stats = self.server.wait_idle(self)
        metrics = self.server.metrics()

        for name in COUNTERS:
            self.assertEqual(metrics.types.get(name), "counter", name)
        for name in GAUGES:
            self.assertEqual(metrics.types.get(name), "gauge", name)
        n = len(requests)
        generated = [len(r.ids) for r in results]
        self.assertEqual([r.final.usage.prompt_tokens for r in results], prompt_lens)
        self.assertEqual(metrics.value("kvtrim_prompt_tokens_total"), sum(prompt_lens))
        self.assertEqual(metrics.value("kvtrim_generation_tokens_total"), sum(generated))
        for reason, count in (("length", 4), ("eos", 1), ("stop", 1), ("cancelled", 0)):
            self.assertEqual(metrics.value("kvtrim_requests_finished_total", reason=reason), count,
                             reason)
        self.assertEqual(metrics.value("kvtrim_preemptions_total"), 0)
        # The CPU engine ran every step's forward pass and profiles no device.
        self.assertGreater(metrics.value("kvtrim_engine_forward_seconds_total"), 0)
        self.assertEqual(metrics.value("kvtrim_engine_device_seconds_total"), 0)

        finals = [r.final for r in results]
        self.check_histogram(metrics, "kvtrim_e2e_request_latency_seconds", n,
                             sum(f.timings.total_seconds for f in finals))
        self.check_histogram(metrics, "kvtrim_request_queue_time_seconds", n,
                             sum(f.timings.queue_seconds for f in finals))
        self.check_histogram(metrics, "kvtrim_time_to_first_token_seconds", n,
                             sum(f.timings.first_token_seconds for f in finals))
        # One gap per token after a request's first.
        self.check_histogram(metrics, "kvtrim_inter_token_latency_seconds",
                             sum(g - 1 for g in generated))
        self.check_histogram(metrics, "kvtrim_request_prompt_tokens", n, sum(prompt_lens))

        # Idle: nothing running or waiting, no page held; the pool is what --kv-pool-mib says.
        for name in ("kvtrim_requests_running", "kvtrim_requests_waiting",
                     "kvtrim_kv_pool_pages_used", "kvtrim_kv_pool_bytes_used"):
            self.assertEqual(metrics.value(name), 0, name)
        self.assertEqual(metrics.value("kvtrim_kv_pool_pages_total"), stats.pool_pages_total)
        self.assertEqual(metrics.value("kvtrim_kv_pool_bytes_total"),
                         stats.pool_pages_total * stats.pool_page_bytes)
        self.assertEqual(metrics.value("kvtrim_kv_pool_bytes_total"), POOL_MIB << 20)
        self.assertEqual(stats.requests_finished_total, n)


if __name__ == "__main__":
    harness.main()
