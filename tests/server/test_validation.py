"""Bad requests: each gets INVALID_ARGUMENT with a message that starts with the offending field,
never reaches the engine, and the server keeps serving."""

import math
import unittest

import grpc

import harness
from harness import Server, chat, generate

MAX_PROMPT_TOKENS = 256
MAX_NEW_TOKENS = 1024
VOCAB = 49152


def with_invalid_utf8(request, placeholder=b"@@"):
    """The request's wire bytes with `placeholder` (in one string field) replaced by bytes that are
    not UTF-8, the same length: protobuf's Python API refuses to build such a message."""
    data = request.SerializeToString()
    assert data.count(placeholder) == 1, data
    return data.replace(placeholder, b"\xff\xfe")


def generate_cases():
    """(name, request message or wire bytes, field the message must name)."""
    pb = harness.pb
    G, S, St, O = pb.GenerateRequest, pb.SamplingParams, pb.StoppingCriteria, pb.OutputOptions

    def req(**fields):
        """A valid request (a short text prompt, 4 tokens) with `fields` replaced."""
        r = G(text="Hello", stopping=St(max_tokens=4))
        for name, value in fields.items():
            if isinstance(value, (str, int, float)):
                setattr(r, name, value)
            else:
                getattr(r, name).CopyFrom(value)
        return r

    no_input = G(stopping=St(max_tokens=4))
    empty_text = req(text="")
    empty_tokens = req(tokens=pb.TokenIds())
    empty_chat = req(chat=pb.Chat())
    assert empty_text.WhichOneof("input") == "text"
    assert empty_tokens.WhichOneof("input") == "tokens"
    assert empty_chat.WhichOneof("input") == "chat"
    return [
        ("no input", no_input, "input"),
        ("empty text", empty_text, "text"),
        ("empty token ids", empty_tokens, "tokens.ids"),
        ("text prompt over --max-prompt-tokens", req(text="word " * (2 * MAX_PROMPT_TOKENS)),
         "input"),
        ("token prompt over --max-prompt-tokens",
         req(tokens=pb.TokenIds(ids=[100] * (MAX_PROMPT_TOKENS + 1))), "input"),
        ("chat prompt over --max-prompt-tokens", req(chat=chat("user", "word " * 600)), "input"),
        ("token id out of the vocabulary", req(tokens=pb.TokenIds(ids=[1, VOCAB])),
         "tokens.ids[1]"),
        ("negative token id", req(tokens=pb.TokenIds(ids=[-5, 100])), "tokens.ids[0]"),
        ("top_p 1.5", req(sampling=S(top_p=1.5)), "sampling.top_p"),
        ("top_p 0", req(sampling=S(top_p=0.0)), "sampling.top_p"),
        ("top_p NaN", req(sampling=S(top_p=math.nan)), "sampling.top_p"),
        ("negative temperature", req(sampling=S(temperature=-0.5)), "sampling.temperature"),
        ("NaN temperature", req(sampling=S(temperature=math.nan)), "sampling.temperature"),
        ("infinite temperature", req(sampling=S(temperature=math.inf)), "sampling.temperature"),
        ("negative top_k", req(sampling=S(top_k=-1)), "sampling.top_k"),
        ("min_p 2", req(sampling=S(min_p=2.0)), "sampling.min_p"),
        ("negative min_p", req(sampling=S(min_p=-0.5)), "sampling.min_p"),
        ("repetition_penalty 0", req(sampling=S(repetition_penalty=0.0)),
         "sampling.repetition_penalty"),
        ("negative repetition_penalty", req(sampling=S(repetition_penalty=-1.0)),
         "sampling.repetition_penalty"),
        ("infinite repetition_penalty", req(sampling=S(repetition_penalty=math.inf)),
         "sampling.repetition_penalty"),
        ("negative max_tokens", req(stopping=St(max_tokens=-1)), "stopping.max_tokens"),
        ("huge max_tokens", req(stopping=St(max_tokens=2**31 - 1)), "stopping.max_tokens"),
        ("max_tokens over --max-new-tokens", req(stopping=St(max_tokens=MAX_NEW_TOKENS + 1)),
         "stopping.max_tokens"),
        ("10 MB stop string", req(stopping=St(max_tokens=4, stop=["x" * 10_000_000])),
         "stopping.stop[0]"),
        ("257-byte stop string", req(stopping=St(max_tokens=4, stop=["y" * 257])),
         "stopping.stop[0]"),
        ("empty stop string", req(stopping=St(max_tokens=4, stop=["end", ""])),
         "stopping.stop[1]"),
        ("17 stop strings", req(stopping=St(max_tokens=4, stop=[f"s{i}" for i in range(17)])),
         "stopping.stop"),
        ("stop token id out of the vocabulary",
         req(stopping=St(max_tokens=4, stop_token_ids=[VOCAB])), "stopping.stop_token_ids[0]"),
        ("negative stop token id", req(stopping=St(max_tokens=4, stop_token_ids=[2, -1])),
         "stopping.stop_token_ids[1]"),
        ("65 stop token ids", req(stopping=St(max_tokens=4, stop_token_ids=list(range(65)))),
         "stopping.stop_token_ids"),
        ("top_logprobs 21", req(output=O(top_logprobs=21)), "output.top_logprobs"),
        ("negative top_logprobs", req(output=O(top_logprobs=-1)), "output.top_logprobs"),
        ("text and token ids both off", req(output=O(text=False, token_ids=False)), "output"),
        ("unknown chat role", req(chat=chat("robot", "hi")), "chat.messages[0].role"),
        ("unknown role in the second turn", req(chat=chat(("user", "hi"), ("tool", "x"))),
         "chat.messages[1].role"),
        ("empty chat", empty_chat, "chat.messages"),
        ("257 chat messages", req(chat=chat(*[("user", "hi")] * 257)), "chat.messages"),
        ("257-byte request_id", req(request_id="r" * 257), "request_id"),
        ("invalid UTF-8 in text", with_invalid_utf8(req(text="Hello @@ world")), "text"),
        ("invalid UTF-8 in chat content", with_invalid_utf8(req(chat=chat("user", "hi @@"))),
         "chat.messages[0].content"),
        ("invalid UTF-8 in the second chat turn",
         with_invalid_utf8(req(chat=chat(("user", "hi"), ("assistant", "ok @@")))),
         "chat.messages[1].content"),
        ("invalid UTF-8 in a stop string",
         with_invalid_utf8(req(stopping=St(max_tokens=4, stop=["fine", "x@@"]))),
         "stopping.stop[1]"),
        ("invalid UTF-8 in request_id", with_invalid_utf8(req(request_id="id-@@")), "request_id"),
        ("unknown compression policy", req(compression=pb.KvCompression(policy="h2o")),
         "compression.policy"),
    ]


def tokenize_cases():
    pb = harness.pb
    return [
        ("no input", pb.TokenizeRequest(), "input"),
        ("empty text", pb.TokenizeRequest(text=""), "text"),
        ("empty chat", pb.TokenizeRequest(chat=pb.Chat()), "chat.messages"),
        ("unknown chat role", pb.TokenizeRequest(chat=chat("robot", "hi")),
         "chat.messages[0].role"),
        ("invalid UTF-8 in text", with_invalid_utf8(pb.TokenizeRequest(text="a@@b")), "text"),
        ("invalid UTF-8 in chat content",
         with_invalid_utf8(pb.TokenizeRequest(chat=chat("user", "a@@b"))),
         "chat.messages[0].content"),
    ]


class BadRequests(unittest.TestCase):

    @classmethod
    def setUpClass(cls):
        cls.server = Server("validation", "--max-prompt-tokens", str(MAX_PROMPT_TOKENS),
                            "--max-new-tokens", str(MAX_NEW_TOKENS))
        channel = cls.server.channel
        # Wire-level calls for requests the Python protobuf API cannot build.
        cls.raw_generate = channel.unary_stream(
            "/kvtrim.v1.Inference/Generate", request_serializer=lambda data: data,
            response_deserializer=harness.pb.GenerateResponse.FromString)
        cls.raw_tokenize = channel.unary_unary(
            "/kvtrim.v1.Inference/Tokenize", request_serializer=lambda data: data,
            response_deserializer=harness.pb.TokenizeResponse.FromString)

    @classmethod
    def tearDownClass(cls):
        cls.server.stop()

    def assert_invalid(self, name, code, details, field):
        self.assertEqual(code, grpc.StatusCode.INVALID_ARGUMENT, f"{name}: {details}")
        self.assertTrue(details.startswith(field + ":"),
                        f"{name}: the message should name {field!r}: {details!r}")

    def check_still_serving(self):
        pb = harness.pb
        result = generate(self.server.stub, pb.GenerateRequest(
            text="Hello", stopping=pb.StoppingCriteria(max_tokens=3, ignore_eos=True)))
        self.assertTrue(result.ok, result.details)
        self.assertEqual(len(result.ids), 3)

    def test_generate(self):
        cases = generate_cases()
        self.assertGreaterEqual(len(cases), 25)
        before = self.server.stats().requests_finished_total
        metrics_before = self.server.metrics()
        for name, request, field in cases:
            with self.subTest(name):
                if isinstance(request, bytes):
                    call = self.raw_generate(request, timeout=60)
                else:
                    call = self.server.stub.Generate(request, timeout=60)
                with self.assertRaises(grpc.RpcError) as raised:
                    messages = list(call)
                    self.fail(f"{name}: accepted, {len(messages)} messages")
                error = raised.exception
                self.assert_invalid(name, error.code(), error.details() or "", field)
        # None of them reached the engine; each was counted as a rejection.
        self.check_still_serving()
        self.assertEqual(self.server.stats().requests_finished_total, before + 1)
        rejected = lambda m: m.value("kvtrim_requests_rejected_total", 0, code="INVALID_ARGUMENT")
        self.assertEqual(rejected(self.server.metrics()) - rejected(metrics_before), len(cases))

    def test_tokenize(self):
        for name, request, field in tokenize_cases():
            with self.subTest(name):
                with self.assertRaises(grpc.RpcError) as raised:
                    if isinstance(request, bytes):
                        self.raw_tokenize(request, timeout=60)
                    else:
                        self.server.stub.Tokenize(request, timeout=60)
                error = raised.exception
                self.assert_invalid(name, error.code(), error.details() or "", field)
        self.check_still_serving()


if __name__ == "__main__":
    harness.main()
