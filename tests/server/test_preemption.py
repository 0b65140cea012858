"""A KV pool too small for the load: decode runs out of pages, the youngest requests are preempted
and recomputed, and every request still completes with the tokens it gets alone. A prompt larger
than the whole pool is RESOURCE_EXHAUSTED; one alone that outgrows the pool ends as length."""

import unittest

import grpc

import harness
from harness import Server, chat, check_stream, expected, generate, reference

# 8 MiB in 4 KiB pages: 2048 pages. A 768-byte row (3 kv-heads x 64 x fp32) leaves 5 tokens a
# page, and a sequence holds 60 page lists (30 layers, keys and values): 60 pages per 5 tokens,
# so the pool holds about 170 tokens in all. Six requests of 13- to 37-token prompts growing by 32
# need about 340: all prompts are admitted at first, and decode runs out.
POOL_FLAGS = ("--kv-pool-mib", "8", "--page-kib", "4")
MAX_TOKENS = 32


class Preemption(unittest.TestCase):

    @classmethod
    def setUpClass(cls):
        cls.server = Server("preemption", *POOL_FLAGS)

    @classmethod
    def tearDownClass(cls):
        cls.server.stop()

    def test_preempted_requests_complete_with_alone_outputs(self):
        pb = harness.pb
        stub = self.server.stub
        bases = [
            pb.GenerateRequest(chat=chat("user", "What is the capital of France?")),
            pb.GenerateRequest(chat=chat("user", "Write a short poem about the sea.")),
            pb.GenerateRequest(text="Once upon a time, in a small village by the mountains,"),
            pb.GenerateRequest(text="The quick brown fox jumps over the lazy dog. Then the"),
            pb.GenerateRequest(chat=chat("user", "Name three primary colors.")),
            pb.GenerateRequest(text="Here is a list of fruits: apple, banana, cherry,"),
        ]
        for base in bases:
            base.stopping.ignore_eos = True  # every request grows to its full length
        refs = [reference(stub, base, MAX_TOKENS) for base in bases]
        prompt_lens = [harness.prompt_tokens(stub, base) for base in bases]
        self.assertEqual(self.server.stats().preemptions_total, 0, "alone, nothing is preempted")
        requests = []
        for i, base in enumerate(bases):
            request = pb.GenerateRequest()
            request.CopyFrom(base)
            request.request_id = f"tight-{i}"
            request.stopping.max_tokens = MAX_TOKENS
            requests.append(request)
        results = harness.run_concurrently(lambda r: generate(stub, r), requests)
        for request, result, ref, prompt_len in zip(requests, results, refs, prompt_lens):
            check_stream(self, result, request, expected(ref, MAX_TOKENS), prompt_len)
        preempted = sum(r.final.preemptions for r in results)
        self.assertGreater(preempted, 0, "the pool was meant to run out")
        stats = self.server.wait_idle(self)
        self.assertEqual(stats.preemptions_total, preempted)
        metrics = self.server.metrics()
        self.assertEqual(metrics.value("kvtrim_preemptions_total"), preempted)
        self.assertEqual(metrics.value("kvtrim_kv_pool_pages_used"), 0)

    def test_prompt_larger_than_the_pool(self):
        pb = harness.pb
        result = generate(self.server.stub, pb.GenerateRequest(
            tokens=pb.TokenIds(ids=[100] * 400), stopping=pb.StoppingCriteria(max_tokens=4)))
        self.assertEqual(result.code, grpc.StatusCode.RESOURCE_EXHAUSTED, result.details)
        self.assertTrue(result.details.startswith("prompt:"), result.details)

    def test_alone_outgrowing_the_pool_ends_as_length(self):
        pb = harness.pb
        # 160 tokens fit (plus one generated); 160 + 64 do not.
        result = generate(self.server.stub, pb.GenerateRequest(
            tokens=pb.TokenIds(ids=[100 + i % 50 for i in range(160)]),
            stopping=pb.StoppingCriteria(max_tokens=64, ignore_eos=True)))
        self.assertTrue(result.ok, result.details)
        self.assertEqual(result.final.finish_reason, pb.FINISH_REASON_LENGTH)
        self.assertGreater(len(result.ids), 0)
        self.assertLess(len(result.ids), 64)
        self.assertEqual(result.final.usage.completion_tokens, len(result.ids))
        self.server.wait_idle(self)


if __name__ == "__main__":
    harness.main()
