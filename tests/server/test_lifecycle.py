"""A request's and the server's lifecycle: a deadline shorter than the generation, a full queue,
draining on SIGTERM (new requests refused, requests in flight complete, exit code 0), the
drain timeout cancelling what is left, and a step past --step-timeout ending the server."""

import threading
import time
import unittest

import grpc

import harness
from harness import Server, chat, generate


def long_request(max_tokens=256, text="Once upon a time"):
    pb = harness.pb
    return pb.GenerateRequest(
        text=text, stopping=pb.StoppingCriteria(max_tokens=max_tokens, ignore_eos=True))


def wait_for_first_messages(stub, requests, count_needed, results, errors):
    """Starts one thread per request (results[i] = its StreamResult) and returns them with an
    event set once `count_needed` streams have received a message."""
    arrived = threading.Semaphore(0)
    started = set()
    lock = threading.Lock()

    def on_message(i, index, message):
        with lock:
            if i in started:
                return
            started.add(i)
        arrived.release()

    def run(i):
        try:
            results[i] = generate(stub, requests[i],
                                  on_message=lambda index, m: on_message(i, index, m))
        except Exception as e:  # noqa: BLE001 - reported by the test
            errors.append(e)
        finally:
            with lock:
                first = i not in started
                started.add(i)
            if first:
                arrived.release()  # ended without a message: the waiter must not hang

    threads = [threading.Thread(target=run, args=(i,)) for i in range(len(requests))]
    for thread in threads:
        thread.start()
    for _ in range(count_needed):
        if not arrived.acquire(timeout=harness.STREAM_TIMEOUT):
            raise AssertionError("streams did not start")
    return threads


class Deadline(unittest.TestCase):

    def test_deadline_exceeded_frees_pages(self):
        server = Server("deadline")
        try:
            pb = harness.pb
            result = generate(server.stub, long_request(1024), timeout=1.5)
            self.assertEqual(result.code, grpc.StatusCode.DEADLINE_EXCEEDED, result.details)
            self.assertFalse(any(m.finish_reason for m in result.messages))
            stats = server.wait_idle(self)
            self.assertEqual(stats.pool_pages_used, 0)
            self.assertEqual(stats.requests_finished_total, 1)
            metrics = server.metrics()
            ended = (metrics.value("kvtrim_requests_finished_total", 0, reason="deadline") +
                     metrics.value("kvtrim_requests_finished_total", 0, reason="cancelled"))
            self.assertEqual(ended, 1)
            # A deadline the generation fits in changes nothing.
            result = generate(server.stub, pb.GenerateRequest(
                text="Hello", stopping=pb.StoppingCriteria(max_tokens=2, ignore_eos=True)),
                timeout=120)
            self.assertTrue(result.ok, result.details)
            self.assertEqual(len(result.ids), 2)
        finally:
            server.stop()


class QueueFull(unittest.TestCase):

    def test_resource_exhausted(self):
        server = Server("queue", "--max-running", "1", "--max-queued", "1")
        try:
            requests = [long_request(24, text=f"Story number {i}:") for i in range(6)]
            results = harness.run_concurrently(lambda r: generate(server.stub, r), requests)
            refused = [r for r in results if r.code == grpc.StatusCode.RESOURCE_EXHAUSTED]
            served = [r for r in results if r.ok]
            self.assertEqual(len(refused) + len(served), len(results),
                             [(r.code, r.details) for r in results])
            # One runs and one waits; whatever arrives meanwhile is refused. The first two are
            # always taken, and 24 tokens take long enough for the other four to arrive.
            self.assertGreaterEqual(len(served), 1)
            self.assertGreaterEqual(len(refused), 1)
            for r in refused:
                self.assertIn("queue", r.details)
                self.assertEqual(r.messages, [])
            for r in served:
                self.assertEqual(r.final.finish_reason, harness.pb.FINISH_REASON_LENGTH)
                self.assertEqual(len(r.ids), 24)
            server.wait_idle(self)
            metrics = server.metrics()
            self.assertEqual(
                metrics.value("kvtrim_requests_rejected_total", 0, code="RESOURCE_EXHAUSTED"),
                len(refused))
        finally:
            server.stop()


class Drain(unittest.TestCase):

    def test_sigterm_during_16_streams(self):
        """SIGTERM with 16 streams in flight: health turns NOT_SERVING, new requests get
        UNAVAILABLE, all 16 complete normally with full usage, and the server exits with 0."""
        from grpc_health.v1 import health_pb2, health_pb2_grpc
        pb = harness.pb
        server = Server("drain")
        try:
            requests = []
            for i in range(16):
                if i % 2:
                    request = long_request(40 + i, text=f"Chapter {i}. The")
                else:
                    request = pb.GenerateRequest(
                        chat=chat("user", f"Tell me a fact about the number {i}."),
                        stopping=pb.StoppingCriteria(max_tokens=40 + i))
                request.request_id = f"drain-{i}"
                requests.append(request)
            prompt_lens = [harness.prompt_tokens(server.stub, r) for r in requests]
            results, errors = [None] * len(requests), []
            threads = wait_for_first_messages(server.stub, requests, len(requests), results,
                                              errors)
            server.terminate()
            # The drain shows in the stats (readable while draining) and in health.
            give_up = time.monotonic() + harness.IDLE_TIMEOUT
            while not server.stats().draining:
                self.assertLess(time.monotonic(), give_up, "never started draining")
                time.sleep(0.01)
            health = health_pb2_grpc.HealthStub(server.channel)
            self.assertEqual(health.Check(health_pb2.HealthCheckRequest(), timeout=30).status,
                             health_pb2.HealthCheckResponse.NOT_SERVING)
            refused = generate(server.stub, long_request(4))
            self.assertEqual(refused.code, grpc.StatusCode.UNAVAILABLE, refused.details)
            self.assertIn("shutting down", refused.details)
            with self.assertRaises(grpc.RpcError) as raised:
                server.stub.Tokenize(pb.TokenizeRequest(text="Hello"), timeout=30)
            self.assertEqual(raised.exception.code(), grpc.StatusCode.UNAVAILABLE)
            for thread in threads:
                thread.join()
            self.assertEqual(errors, [])
            for request, result, prompt_len in zip(requests, results, prompt_lens):
                self.assertTrue(result.ok, f"{request.request_id}: {result.code} {result.details}")
                final = result.final
                self.assertIn(final.finish_reason,
                              (pb.FINISH_REASON_LENGTH, pb.FINISH_REASON_EOS), request.request_id)
                if request.stopping.ignore_eos:
                    self.assertEqual(final.finish_reason, pb.FINISH_REASON_LENGTH)
                if final.finish_reason == pb.FINISH_REASON_LENGTH:
                    self.assertEqual(len(result.ids), request.stopping.max_tokens)
                self.assertEqual(final.usage.completion_tokens, len(result.ids))
                self.assertEqual(final.usage.prompt_tokens, prompt_len)
                self.assertGreater(final.timings.total_seconds, 0)
            server.channel.close()  # the shutdown waits (up to 5 s) for connected clients to go
            self.assertEqual(server.wait(), 0)
            self.assertIn("draining", server.log_text())
        finally:
            server.kill()

    def test_drain_timeout_cancels(self):
        """What is still running when --drain-timeout passes is cancelled; the exit code is 0."""
        server = Server("drain-timeout", "--drain-timeout", "1s")
        try:
            results, errors = [None], []
            threads = wait_for_first_messages(server.stub, [long_request(4096)], 1, results,
                                              errors)
            server.terminate()
            threads[0].join()
            self.assertEqual(errors, [])
            self.assertEqual(results[0].code, grpc.StatusCode.CANCELLED, results[0].details)
            self.assertLess(len(results[0].ids), 4096)
            server.channel.close()
            self.assertEqual(server.wait(), 0)
            self.assertIn("drain timeout: cancelling 1 requests", server.log_text())
        finally:
            server.kill()



class StepTimeout(unittest.TestCase):

    def test_a_step_past_the_limit_ends_the_server(self):
        """A step that runs past --step-timeout (here every step of the CPU engine: 1 ms) is
        taken as a device that does not respond: the server ends the stream in flight with
        UNAVAILABLE naming it, and exits 1 without draining."""
        server = Server("step-timeout", "--step-timeout", "1ms")
        try:
            self.assertIn("step timeout 1ms", server.log_text())
            results, errors = [None], []
            threads = wait_for_first_messages(server.stub, [long_request(4096)], 1, results,
                                              errors)
            self.assertEqual(server.wait(), 1)
            threads[0].join()
            self.assertEqual(errors, [])
            self.assertEqual(results[0].code, grpc.StatusCode.UNAVAILABLE, results[0].details)
            self.assertRegex(results[0].details,
                             r"^the device does not respond: the engine has waited \S+ for it "
                             r"\(--step-timeout 1ms\); this server is restarting$")
            self.assertLess(len(results[0].ids), 4096)
            self.assertIn("ended 1 streams; exiting", server.log_text())
        finally:
            server.kill()

    def test_the_cpu_engine_has_no_limit_by_default(self):
        server = Server("no-step-timeout")
        try:
            self.assertIn("step timeout inf", server.log_text())
        finally:
            server.stop()


if __name__ == "__main__":
    harness.main()
