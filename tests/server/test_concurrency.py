"""64 concurrent streams of mixed prompts, lengths and stop rules: each greedy output equals the
same prompt run alone (continuous batching must not change a sequence's tokens), finish reasons
and usage are right; then half of 64 streams cancelled at random points: the rest still finish
right and the KV pool returns to empty."""

import random
import threading
import time
import unittest

import grpc

import harness
from harness import Server, chat, check_stream, expected, generate, reference

MAX_TOKENS = (8, 12, 16, 24, 32)
VARIANTS = ("plain", "stop_string", "stop_id", "held", "held_at_end")
# Stop strings the outputs (almost surely) never contain, whose starts they often do: text ending
# in " the" or "." is held back until the next token, and must still reach the client when the
# request ends there.
UNMATCHED_STOPS = (" the xyzzy", ".\n\nxyzzy", "Xyzzy!")
PASSAGE = (
    "The lighthouse stood at the end of a long stone pier, and every evening the keeper climbed "
    "its hundred and twelve steps to light the lamp. Ships that passed in the night saw the beam "
    "sweep across the water, once every ten seconds, and knew that the rocks were near. In winter "
    "the storms came from the north, and waves broke over the pier so that the keeper had to wait "
    "for a lull before he could cross. He kept a log of every ship he saw, its name if he could "
    "read it, the hour and the weather. After forty years the log filled")


def prompts(stub):
    """(input field, value, ignore_eos) of the distinct prompts, short to ~130 tokens."""
    pb = harness.pb
    counting = list(stub.Tokenize(pb.TokenizeRequest(text="1, 2, 3, 4, 5,"), timeout=30).ids)
    return [
        ("chat", chat("user", "What is the capital of France?"), False),
        ("chat", chat("user", "Write a short poem about the sea."), False),
        ("chat", chat(("system", "You are a helpful assistant who answers briefly."),
                      ("user", "Name three primary colors.")), False),
        ("chat", chat("user", "Summarize this story in one sentence: " + PASSAGE), False),
        ("text", "The quick brown fox", True),
        ("text", "Once upon a time, in a small village by the mountains, there lived", True),
        ("tokens", pb.TokenIds(ids=counting), True),
        ("text", PASSAGE, True),
    ]


class ConcurrentStreams(unittest.TestCase):

    @classmethod
    def setUpClass(cls):
        cls.server = Server("concurrency")
        stub = cls.server.stub
        pb = harness.pb
        cls.prompts = prompts(stub)
        cls.bases, cls.refs, cls.prompt_lens = [], [], []
        for field, value, ignore_eos in cls.prompts:
            base = pb.GenerateRequest(**{field: value})
            base.stopping.ignore_eos = ignore_eos
            cls.bases.append(base)
            cls.refs.append(reference(stub, base, max_tokens=max(MAX_TOKENS)))
            cls.prompt_lens.append(harness.prompt_tokens(stub, base))

    @classmethod
    def tearDownClass(cls):
        cls.server.stop()

    def build(self, count, seed):
        """`count` requests cycling over the prompts, with random lengths and stop rules; returns
        (request, prompt index, what it must return)."""
        pb = harness.pb
        rng = random.Random(seed)
        built = []
        for i in range(count):
            p = i % len(self.prompts)
            ref = self.refs[p]
            request = pb.GenerateRequest()
            request.CopyFrom(self.bases[p])
            request.request_id = f"s{seed}-{i}"
            max_tokens = rng.choice(MAX_TOKENS)
            request.stopping.max_tokens = max_tokens
            variant = VARIANTS[(i // len(self.prompts)) % len(VARIANTS)]
            stops, stop_ids = [], []
            full_text = "".join(ref.texts)
            if variant == "stop_string" and len(full_text) >= 8:
                # Four characters from the middle of the output: they may span a token boundary.
                start = rng.randrange(len(full_text) // 4, len(full_text) - 4)
                stops = [full_text[start:start + 4]]
            elif variant == "stop_id" and ref.ids:
                stop_ids = [ref.ids[rng.randrange(min(6, len(ref.ids)))]]
            elif variant == "held":
                stops = list(UNMATCHED_STOPS)
            elif variant == "held_at_end":
                # A stop string that starts with the last characters the request generates and
                # goes on with what it never does: the end is held back until the request ends.
                ending = "".join(ref.texts[:max_tokens])[-3:]
                if ending:
                    stops = [ending + "\u2603qz"]
            request.stopping.stop.extend(stops)
            request.stopping.stop_token_ids.extend(stop_ids)
            built.append((request, p, expected(ref, max_tokens, stops, stop_ids)))
        return built

    def watch_load(self, stop_event, peak):
        """Records the most requests the server held at once, so that the test knows it tested
        concurrency."""
        while not stop_event.is_set():
            stats = self.server.stats()
            peak[0] = max(peak[0], stats.requests_running + stats.requests_waiting)
            time.sleep(0.02)

    def finished_by_reason(self):
        metrics = self.server.metrics()
        return {reason: metrics.value("kvtrim_requests_finished_total", 0, reason=reason)
                for reason in ("eos", "stop", "length", "cancelled", "deadline", "error")}

    def test_1_mixed_streams_equal_alone(self):
        built = self.build(64, seed=2)
        before = self.finished_by_reason()
        finished_before = self.server.stats().requests_finished_total
        stop_event, peak = threading.Event(), [0]
        watcher = threading.Thread(target=self.watch_load, args=(stop_event, peak))
        watcher.start()
        try:
            results = harness.run_concurrently(lambda b: generate(self.server.stub, b[0]), built)
        finally:
            stop_event.set()
            watcher.join()
        for (request, p, want), result in zip(built, results):
            check_stream(self, result, request, want, self.prompt_lens[p])
        self.assertGreater(peak[0], 1, "the streams never overlapped")
        reasons = {}
        for _, _, want in built:
            name = harness.pb.FinishReason.Name(want.finish).removeprefix("FINISH_REASON_").lower()
            reasons[name] = reasons.get(name, 0) + 1
        self.assertIn("stop", reasons)
        self.assertIn("length", reasons)
        self.server.wait_idle(self)
        after = self.finished_by_reason()
        self.assertEqual({r: after[r] - before[r] for r in after if after[r] != before[r]},
                         reasons)
        self.assertEqual(self.server.stats().requests_finished_total - finished_before, 64)

    def test_2_cancel_half(self):
        built = self.build(64, seed=3)
        rng = random.Random(33)
        cancel_after = [None] * len(built)
        for i in rng.sample(range(len(built)), len(built) // 2):
            cancel_after[i] = rng.randint(0, 6)
        finished_before = self.server.stats().requests_finished_total
        cancelled_before = self.finished_by_reason()["cancelled"]
        results = harness.run_concurrently(
            lambda i: generate(self.server.stub, built[i][0], cancel_after=cancel_after[i]),
            range(len(built)))
        for (request, p, want), result, cancel in zip(built, results, cancel_after):
            if cancel is not None and result.code == grpc.StatusCode.CANCELLED:
                # What arrived before the cancel was right, and no final message came.
                self.assertFalse(any(m.finish_reason for m in result.messages))
                self.assertEqual(result.ids, want.ids[:len(result.ids)], request.request_id)
                continue
            # Not cancelled, or finished before the cancel took effect: complete and right.
            check_stream(self, result, request, want, self.prompt_lens[p])
        # Every page comes back and nothing is left running or queued.
        stats = self.server.wait_idle(self)
        self.assertGreater(stats.pool_pages_total, 0)
        metrics = self.server.metrics()
        for family in ("kvtrim_kv_pool_pages_used", "kvtrim_kv_pool_bytes_used",
                       "kvtrim_requests_running", "kvtrim_requests_waiting"):
            self.assertEqual(metrics.value(family), 0, family)
        # Every stream that reached the engine finished there exactly once: all but (perhaps)
        # some of those cancelled before their first message.
        finished = self.server.stats().requests_finished_total - finished_before
        seen = sum(1 for r in results if r.messages)
        self.assertGreaterEqual(finished, seen)
        self.assertLessEqual(finished, len(built))
        self.assertGreater(self.finished_by_reason()["cancelled"] - cancelled_before, 0)
        # And it still serves.
        request, p, want = built[0]
        check_stream(self, generate(self.server.stub, request), request, want, self.prompt_lens[p])


if __name__ == "__main__":
    harness.main()
