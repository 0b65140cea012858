"""kvtrim-server basics: the same text as the kvtrim CLI, reflection, health, Tokenize,
GetModelInfo, logprobs, authentication with an API key from the environment or a file, and a
dummy model (--load-format dummy --arch) with the flag errors around it."""

import os
import subprocess
import tempfile
import unittest

import grpc

import harness
from harness import Server, chat, generate

CAPITAL = "What is the capital of France?"


class Basics(unittest.TestCase):

    @classmethod
    def setUpClass(cls):
        cls.server = Server("basic")
        cls.stub = cls.server.stub

    @classmethod
    def tearDownClass(cls):
        cls.server.stop()

    def cli(self, *flags):
        """stdout of `kvtrim generate --model M FLAGS`."""
        done = subprocess.run(
            [harness.PATHS.cli, "generate", "--model", harness.PATHS.model, *flags],
            capture_output=True, timeout=harness.STREAM_TIMEOUT,
            env=dict(os.environ, OMP_NUM_THREADS="1"))
        self.assertEqual(done.returncode, 0, done.stderr.decode())
        return done.stdout.decode("utf-8")

    def test_chat_text_equals_cli(self):
        cli_text = self.cli("--chat", CAPITAL, "--max-tokens", "16")
        result = generate(self.stub, harness.pb.GenerateRequest(
            chat=chat("user", CAPITAL), stopping=harness.pb.StoppingCriteria(max_tokens=16)))
        self.assertTrue(result.ok, result.details)
        self.assertTrue(result.text, "no text")
        self.assertEqual(result.text + "\n", cli_text)  # the CLI ends its output with a newline
        self.assertIn("Paris", result.text)

    def test_raw_text_equals_cli(self):
        prompt = "The quick brown fox"
        cli_text = self.cli("--prompt", prompt, "--max-tokens", "12", "--ignore-eos")
        result = generate(self.stub, harness.pb.GenerateRequest(
            text=prompt, stopping=harness.pb.StoppingCriteria(max_tokens=12, ignore_eos=True)))
        self.assertTrue(result.ok, result.details)
        self.assertEqual(result.final.finish_reason, harness.pb.FINISH_REASON_LENGTH)
        self.assertEqual(len(result.ids), 12)
        self.assertEqual(result.text + "\n", cli_text)
        # The same with a stop string that starts with the output's last characters but never
        # matches: the server holds that end back while it could be a match, and must still send
        # it when the request ends.
        held = generate(self.stub, harness.pb.GenerateRequest(
            text=prompt, stopping=harness.pb.StoppingCriteria(
                max_tokens=12, ignore_eos=True, stop=[result.text[-3:] + "\u2603"])))
        self.assertTrue(held.ok, held.details)
        self.assertEqual(held.final.finish_reason, harness.pb.FINISH_REASON_LENGTH)
        self.assertEqual(held.text, result.text)

    def test_reflection_lists_services(self):
        from grpc_reflection.v1alpha import reflection_pb2, reflection_pb2_grpc
        stub = reflection_pb2_grpc.ServerReflectionStub(self.server.channel)
        responses = list(stub.ServerReflectionInfo(
            iter([reflection_pb2.ServerReflectionRequest(list_services="")]), timeout=30))
        services = {s.name for r in responses for s in r.list_services_response.service}
        self.assertIn("kvtrim.v1.Inference", services)
        self.assertIn("grpc.health.v1.Health", services)
        # The descriptors come through too, so grpcurl can build requests.
        responses = list(stub.ServerReflectionInfo(iter([
            reflection_pb2.ServerReflectionRequest(file_containing_symbol="kvtrim.v1.Inference")
        ]), timeout=30))
        self.assertTrue(responses[0].file_descriptor_response.file_descriptor_proto)

    def test_health_serving(self):
        from grpc_health.v1 import health_pb2, health_pb2_grpc
        stub = health_pb2_grpc.HealthStub(self.server.channel)
        response = stub.Check(health_pb2.HealthCheckRequest(service=""), timeout=30)
        self.assertEqual(response.status, health_pb2.HealthCheckResponse.SERVING)

    def test_model_info(self):
        info = self.stub.GetModelInfo(harness.pb.GetModelInfoRequest(), timeout=30)
        self.assertEqual(info.architecture, "llama")
        self.assertEqual((info.n_layers, info.n_heads, info.n_kv_heads, info.head_dim),
                         (30, 9, 3, 64))
        self.assertEqual(info.hidden, 576)
        self.assertEqual(info.vocab_size, 49152)
        self.assertEqual(info.max_context, 8192)
        self.assertEqual(info.eos_id, 2)
        self.assertEqual(info.bos_id, 1)
        self.assertEqual(info.chat_template_family, "chatml")
        self.assertEqual(info.backend, "cpu")

    def test_tokenize(self):
        pb = harness.pb
        response = self.stub.Tokenize(pb.TokenizeRequest(text="Hello world", with_pieces=True),
                                      timeout=30)
        self.assertEqual(len(response.ids), len(response.pieces))
        self.assertEqual("".join(response.pieces), "Hello world")
        # The chat is rendered with ChatML: <|im_start|> (id 1) opens each turn, and the prompt
        # ends with the assistant opener.
        response = self.stub.Tokenize(pb.TokenizeRequest(chat=chat("user", CAPITAL),
                                                         with_pieces=True), timeout=30)
        self.assertEqual(response.ids[0], 1)
        self.assertTrue("".join(response.pieces).endswith("<|im_start|>assistant\n"))
        # Generate reports the same prompt length.
        result = generate(self.stub, pb.GenerateRequest(
            chat=chat("user", CAPITAL), stopping=pb.StoppingCriteria(max_tokens=1)))
        self.assertTrue(result.ok, result.details)
        self.assertEqual(result.final.usage.prompt_tokens, len(response.ids))
        # Token ids in, the same tokens as the text they came from.
        by_ids = generate(self.stub, pb.GenerateRequest(
            tokens=pb.TokenIds(ids=response.ids), stopping=pb.StoppingCriteria(max_tokens=1)))
        self.assertEqual(by_ids.ids, result.ids)

    def test_logprobs(self):
        pb = harness.pb
        result = generate(self.stub, pb.GenerateRequest(
            text="The quick brown fox", stopping=pb.StoppingCriteria(max_tokens=4, ignore_eos=True),
            output=pb.OutputOptions(logprobs=True, top_logprobs=3)))
        self.assertTrue(result.ok, result.details)
        self.assertEqual(len(result.tokens), 4)
        for token in result.tokens:
            self.assertLessEqual(token.logprob, 0.0)
            self.assertEqual(len(token.top_logprobs), 3)
            logprobs = [t.logprob for t in token.top_logprobs]
            self.assertEqual(logprobs, sorted(logprobs, reverse=True))
            # Greedy: the sampled token is the most likely one.
            self.assertEqual(token.top_logprobs[0].id, token.id)
            self.assertAlmostEqual(token.top_logprobs[0].logprob, token.logprob, places=4)

    def test_output_options(self):
        pb = harness.pb
        text_only = generate(self.stub, pb.GenerateRequest(
            text="The quick brown fox", stopping=pb.StoppingCriteria(max_tokens=4, ignore_eos=True),
            output=pb.OutputOptions(token_ids=False)))
        ids_only = generate(self.stub, pb.GenerateRequest(
            text="The quick brown fox", stopping=pb.StoppingCriteria(max_tokens=4, ignore_eos=True),
            output=pb.OutputOptions(text=False)))
        self.assertTrue(text_only.ok and ids_only.ok)
        self.assertEqual(text_only.ids, [])
        self.assertTrue(text_only.text)
        self.assertEqual(ids_only.text, "")
        self.assertEqual(len(ids_only.ids), 4)
        self.assertEqual(text_only.final.usage.completion_tokens, 4)


class Help(unittest.TestCase):

    def test_help_lists_every_flag_with_its_default(self):
        done = subprocess.run([harness.PATHS.server, "--help"], capture_output=True, timeout=30)
        text = (done.stdout + done.stderr).decode()
        flags = ["model", "listen", "metrics_port", "kv_pool_mib", "page_kib", "step_tokens",
                 "max_running", "max_queued", "max_prompt_tokens", "max_new_tokens",
                 "default_max_tokens", "max_message_mib", "api_key_file", "tls_cert", "tls_key",
                 "drain_timeout", "log_level", "threads", "device", "dtype", "load_format",
                 "arch", "gpu_memory_utilization"]
        for flag in flags:
            self.assertRegex(text, rf"--{flag} \([^)]*(\([^)]*\)[^)]*)*\);\s+default: ", flag)


class DummyModel(unittest.TestCase):
    """--load-format dummy --arch smollm2-135m: no file, random weights, byte tokens."""

    FLAGS = ("--load-format", "dummy", "--arch", "smollm2-135m")

    def test_serves_the_shape_and_equals_the_cli(self):
        pb = harness.pb
        server = Server("dummy", model_flags=self.FLAGS)
        try:
            self.assertIn("model dummy smollm2-135m (llama, 30 layers", server.log_text())
            self.assertIn("from random weights (seed 0)", server.log_text())
            # No --kv-pool-mib: 1 GiB on the CPU; on a GPU, sized to its memory.
            if "config: cpu backend" in server.log_text():
                self.assertIn("KV pool 1024 MiB", server.log_text())
                stats = server.stub.GetServerStats(pb.GetServerStatsRequest(), timeout=30)
                self.assertEqual(stats.pool_bytes_total, 1 << 30)
            else:
                self.assertIn("KV pool sized to the device: 0.90 of", server.log_text())
            info = server.stub.GetModelInfo(pb.GetModelInfoRequest(), timeout=30)
            self.assertEqual(info.name, "dummy smollm2-135m")
            self.assertEqual((info.n_layers, info.hidden, info.vocab_size), (30, 576, 49152))
            self.assertEqual(info.eos_id, -1)
            self.assertEqual(list(server.stub.Tokenize(pb.TokenizeRequest(text="hello"),
                                                       timeout=30).ids), list(b"hello"))
            result = generate(server.stub, pb.GenerateRequest(
                text="hello", stopping=pb.StoppingCriteria(max_tokens=8)))
            self.assertTrue(result.ok, result.details)
            self.assertEqual(result.final.finish_reason, pb.FINISH_REASON_LENGTH)
            self.assertEqual(len(result.ids), 8)
            self.assertEqual(result.final.usage.prompt_tokens, 5)
        finally:
            server.stop()
        # The same seed gives the same weights in the CLI, so the same greedy text.
        done = subprocess.run([harness.PATHS.cli, "generate", *self.FLAGS, "--prompt", "hello",
                               "--max-tokens", "8"],
                              capture_output=True, timeout=harness.STREAM_TIMEOUT,
                              env=dict(os.environ, OMP_NUM_THREADS="1"))
        self.assertEqual(done.returncode, 0, done.stderr.decode())
        self.assertEqual(done.stdout.decode(), result.text + "\n")

    def test_negative_step_tokens_is_refused(self):
        command = [harness.PATHS.server, *self.FLAGS, "--step-tokens", "-4"]
        done = subprocess.run(command, capture_output=True, timeout=60)
        output = (done.stdout + done.stderr).decode()
        self.assertEqual(done.returncode, 2, output)
        self.assertIn("--step-tokens must be 0 (the device's default) or a count", output)

    def test_flag_errors(self):
        cases = [
            (["--load-format", "dummy"], "--load-format dummy needs --arch"),
            (["--load-format", "dummy", "--arch", "gpt-5"], "--arch \"gpt-5\" is not one of"),
            (["--model", harness.PATHS.model, "--arch", "llama3-8b"],
             "--arch llama3-8b needs --load-format dummy"),
            (["--model", harness.PATHS.model, *self.FLAGS], "exclude each other"),
            (["--load-format", "pt", "--model", harness.PATHS.model],
             "--load-format must be auto, gguf, hf or dummy"),
            (["--model", harness.PATHS.model, "--dtype", "fp8"],
             "--dtype must be auto, bfloat16 or float16, got \"fp8\""),
            (["--model", harness.PATHS.model, "--kv-pool-mib", "-1"],
             "--kv-pool-mib must be 0 (sized to the device) or a size"),
            (["--model", harness.PATHS.model, "--gpu-memory-utilization", "0"],
             "--gpu-memory-utilization must be in (0, 1], got 0"),
            (["--model", harness.PATHS.model, "--gpu-memory-utilization", "1.5"],
             "--gpu-memory-utilization must be in (0, 1], got 1.5"),
        ]
        for flags, message in cases:
            for binary in (harness.PATHS.server, harness.PATHS.cli):
                command = [binary, *flags]
                if binary == harness.PATHS.cli:
                    command[1:1] = ["generate", "--prompt", "hi"]
                done = subprocess.run(command, capture_output=True, timeout=60)
                output = (done.stdout + done.stderr).decode()
                self.assertEqual(done.returncode, 2, f"{command}: {output}")
                self.assertIn(message, output, command)


class Tls(unittest.TestCase):

    def test_tls_serves_and_refuses_plaintext(self):
        work = tempfile.mkdtemp(dir=harness.PATHS.work_dir)
        cert, key = os.path.join(work, "cert.pem"), os.path.join(work, "key.pem")
        subprocess.run(
            ["openssl", "req", "-x509", "-newkey", "rsa:2048", "-nodes", "-keyout", key, "-out",
             cert, "-days", "2", "-subj", "/CN=localhost",
             "-addext", "subjectAltName=DNS:localhost,IP:127.0.0.1"],
            check=True, capture_output=True, timeout=60)
        server = Server("tls", "--tls-cert", cert, "--tls-key", key)
        try:
            with open(cert, "rb") as f:
                credentials = grpc.ssl_channel_credentials(root_certificates=f.read())
            with grpc.secure_channel(f"localhost:{server.port}", credentials) as channel:
                stub = harness.pb_grpc.InferenceStub(channel)
                info = stub.GetModelInfo(harness.pb.GetModelInfoRequest(), timeout=30)
                self.assertEqual(info.n_layers, 30)
                request = harness.pb.GenerateRequest(text="The sky is")
                request.stopping.max_tokens = 4
                request.stopping.ignore_eos = True
                responses = list(stub.Generate(request, timeout=harness.STREAM_TIMEOUT))
                self.assertEqual(responses[-1].usage.completion_tokens, 4)
            with grpc.insecure_channel(f"127.0.0.1:{server.port}") as channel:
                with self.assertRaises(grpc.RpcError) as refused:
                    harness.pb_grpc.InferenceStub(channel).GetModelInfo(
                        harness.pb.GetModelInfoRequest(), timeout=10)
                self.assertEqual(refused.exception.code(), grpc.StatusCode.UNAVAILABLE)
        finally:
            server.stop()


class Authentication(unittest.TestCase):
    KEY = "s3cret-key-for-tests"

    def check_auth(self, server):
        pb = harness.pb
        request = pb.GenerateRequest(text="Hello", stopping=pb.StoppingCriteria(max_tokens=2))
        for metadata, what in [(None, "missing"),
                               ((("authorization", "Bearer wrong-key"),), "wrong"),
                               ((("authorization", self.KEY),), "without Bearer"),
                               ((("authorization", "Bearer " + self.KEY + "x"),), "longer")]:
            result = generate(server.stub, request, metadata=metadata)
            self.assertEqual(result.code, grpc.StatusCode.UNAUTHENTICATED, what)
            self.assertIn("authorization", result.details, what)
            with self.assertRaises(grpc.RpcError) as raised:
                server.stub.Tokenize(pb.TokenizeRequest(text="Hello"), timeout=30,
                                     metadata=metadata)
            self.assertEqual(raised.exception.code(), grpc.StatusCode.UNAUTHENTICATED, what)
        good = (("authorization", "Bearer " + self.KEY),)
        result = generate(server.stub, request, metadata=good)
        self.assertTrue(result.ok, result.details)
        self.assertEqual(len(result.ids), result.final.usage.completion_tokens)
        self.assertGreater(len(result.ids), 0)
        server.stub.Tokenize(pb.TokenizeRequest(text="Hello"), timeout=30, metadata=good)
        server.stub.GetModelInfo(pb.GetModelInfoRequest(), timeout=30, metadata=good)
        self.assertEqual(server.stats(metadata=good).requests_finished_total, 1)

    def test_key_from_environment(self):
        server = Server("auth-env", env={"KVTRIM_API_KEY": self.KEY})
        try:
            self.check_auth(server)
        finally:
            server.stop()

    def test_key_from_file(self):
        path = os.path.join(harness.PATHS.work_dir, "api-key")
        with open(path, "w") as f:
            f.write(self.KEY + "\n")
        # The file wins over the environment.
        server = Server("auth-file", "--api-key-file", path, env={"KVTRIM_API_KEY": "other"})
        try:
            self.check_auth(server)
        finally:
            server.stop()


if __name__ == "__main__":
    harness.main()
