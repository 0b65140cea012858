// kvtrim-server: loads a model, starts the engine thread and serves kvtrim.v1.Inference,
// grpc.health.v1.Health and server reflection on --listen, Prometheus metrics on --metrics-port.
//
// SIGTERM / SIGINT drain: health turns NOT_SERVING, new requests get UNAVAILABLE, requests in
// flight run to completion for up to --drain-timeout and are then cancelled; exit code 0. A device
// that fails for good (a GPU's sticky CUDA error) drains the same way, then exits 1; one that
// does not respond (a step past --step-timeout) ends every stream with UNAVAILABLE and exits 1
// without draining.
#include <omp.h>
#include <unistd.h>

#include <atomic>
#include <csignal>
#include <cstdlib>
#include <cstring>
#include <fstream>
#include <iterator>
#include <memory>
#include <optional>
#include <string>
#include <thread>
#include <vector>

#include "absl/flags/flag.h"
#include "absl/strings/str_cat.h"
#include "absl/time/time.h"
#include "engine/backend_choice.h"
#include "engine/model.h"
#include "engine/model_source.h"
#include "engine/scheduler.h"
#include "engine/tokenizer/chat_template.h"
#include "engine/tokenizer/tokenizer.h"
#include "grpcpp/ext/proto_server_reflection_plugin.h"
#include "grpcpp/health_check_service_interface.h"
#include "grpcpp/security/server_credentials.h"
#include "grpcpp/server.h"
#include "grpcpp/server_builder.h"
#include "memory/compress/compression.h"
#include "server/flag_spelling.h"
#include "server/inference_service.h"
#include "server/metrics.h"
#include "spdlog/spdlog.h"

ABSL_FLAG(std::string, model, "", "model: a GGUF file or a Hugging Face model directory");
ABSL_FLAG(std::string, load_format, "auto",
          "how --model is read: auto (a file is GGUF, a directory Hugging Face), gguf, hf; or "
          "dummy: no --model, random weights in the shape --arch names (for benchmarks)");
ABSL_FLAG(std::string, arch, "",
          "with --load-format dummy: llama3-8b, llama3.1-8b, mistral-7b or smollm2-135m");
ABSL_FLAG(std::string, listen, "0.0.0.0:50051", "gRPC address (HOST:PORT; port 0 picks one)");
ABSL_FLAG(int, metrics_port, 9400, "port of the Prometheus /metrics endpoint; 0 = off");
ABSL_FLAG(int64_t, kv_pool_mib, 0,
          "KV cache pool size, MiB; 0 = on cuda, what --gpu-memory-utilization leaves after the "
          "weights and step buffers; on cpu, 1024");
ABSL_FLAG(double, gpu_memory_utilization, 0.9,
          "with --kv-pool-mib 0 on cuda: the share of the GPU's memory this server may hold "
          "(weights, step buffers and the KV pool; memory other processes hold counts against "
          "it), in (0, 1]");
ABSL_FLAG(int, page_kib, 0,
          "KV page size, KiB; 0 = 16 full-width rows of the model, at least 16 KiB, a power of two "
          "(larger pages shorten the page lists a GPU step walks; smaller ones waste less in the "
          "partly filled last page of each compressed segment)");
ABSL_FLAG(int, step_tokens, 0,
          "most tokens (decode + prefill chunks) in one engine step; 0 = the device's default "
          "(512 on cpu, 8192 on cuda)");
ABSL_FLAG(int, max_running, 64, "most requests prefilling or decoding at once");
ABSL_FLAG(int, max_queued, 256, "most requests waiting; beyond it RESOURCE_EXHAUSTED");
ABSL_FLAG(int, max_prompt_tokens, 0, "longest prompt accepted; 0 = the model's context length");
ABSL_FLAG(int, max_new_tokens, 4096, "largest max_tokens a request may ask for");
ABSL_FLAG(int, default_max_tokens, 256, "max_tokens of a request that leaves it unset");
ABSL_FLAG(int, max_message_mib, 16, "largest request message, MiB");
ABSL_FLAG(std::string, api_key_file, "",
          "file holding the API key clients must send as \"authorization: Bearer <key>\"; "
          "the KVTRIM_API_KEY environment variable is used when unset; no key = no auth");
ABSL_FLAG(std::string, tls_cert, "", "PEM certificate chain; with --tls-key serves TLS");
ABSL_FLAG(std::string, tls_key, "", "PEM private key");
ABSL_FLAG(absl::Duration, drain_timeout, absl::Seconds(30),
          "on SIGTERM, how long requests in flight may run before they are cancelled");
ABSL_FLAG(absl::Duration, step_timeout, absl::ZeroDuration(),
          "longest an engine step may run: past it the device is taken as hung (a kernel that "
          "does not return), every stream ends with UNAVAILABLE and the server exits 1 without "
          "draining, to be restarted; 0 = 60s on cuda "
          "and no limit on the CPU engine (whose steps on a large model may take minutes); "
          "inf = no limit");
ABSL_FLAG(std::string, log_level, "info", "trace, debug, info, warn, error");
ABSL_FLAG(std::string, device, "auto",
          "engine backend: cuda, cpu, or auto (cuda when this binary has CUDA and a GPU is "
          "visible)");
ABSL_FLAG(
    std::string, dtype, "auto",
    "on cuda, the 16-bit type of the weights and of the activations the GEMMs read and write: "
    "auto (the model's own: float16 where its config.json or GGUF says so, else bfloat16), "
    "bfloat16 or float16; the CPU engine computes in fp32 either way");
ABSL_FLAG(bool, cuda_graphs, true,
          "on cuda: replay decode steps whose launches repeat (the same running requests) from a "
          "captured CUDA graph; false queues every step's kernels");
ABSL_FLAG(bool, overlap_steps, true,
          "plan and queue each step while the device runs the one before, feeding it the "
          "tokens the device chose (the CUDA backend, for steps whose rows need only their token "
          "back); false runs the steps in turn");
ABSL_FLAG(std::string, kv_compression, "none",
          "KV compression of requests that do not set their own: a spec such as "
          "\"policy=snapkv,budget_ratio=0.25\" or \"policy=pyramidkv,budget_ratio=0.12,"
          "think.lambda=0.5,eviction=corm\" (keys: policy, budget_ratio, budget_tokens, window, "
          "kernel_size, pooling, beta, sinks, think.*, eviction, corm.*, window.*); \"none\" = "
          "off. A prompt too short for it is stored uncompressed");
ABSL_FLAG(bool, decode_eviction, true,
          "take requests that evict while decoding (compression eviction=corm|window); false "
          "refuses them (FAILED_PRECONDITION) and, on cuda, gives the pool sized to the device "
          "the room it keeps for their rows' eviction state (12 bytes per kv-head and row)");
ABSL_FLAG(int, threads, 0,
          "CPU engine threads; 0 = one per core (fewer when other work shares the cores)");

namespace kvtrim::server {
namespace {

absl::StatusOr<std::string> ReadSecretFile(const std::string& path) {
  std::ifstream in(path, std::ios::binary);
  if (!in) return absl::NotFoundError(absl::StrCat(path, ": cannot open"));
  std::string text((std::istreambuf_iterator<char>(in)), std::istreambuf_iterator<char>());
  while (!text.empty() && (text.back() == '\n' || text.back() == '\r')) text.pop_back();
  return text;
}

absl::StatusOr<std::shared_ptr<grpc::ServerCredentials>> Credentials() {
  const std::string cert = absl::GetFlag(FLAGS_tls_cert), key = absl::GetFlag(FLAGS_tls_key);
  if (cert.empty() && key.empty()) return grpc::InsecureServerCredentials();
  if (cert.empty() || key.empty()) {
    return absl::InvalidArgumentError("--tls-cert and --tls-key go together");
  }
  absl::StatusOr<std::string> cert_pem = ReadSecretFile(cert), key_pem = ReadSecretFile(key);
  if (!cert_pem.ok()) return cert_pem.status();
  if (!key_pem.ok()) return key_pem.status();
  grpc::SslServerCredentialsOptions options;
  options.pem_key_cert_pairs.push_back({*key_pem, *cert_pem});
  return grpc::SslServerCredentials(options);
}

absl::StatusOr<std::string> ApiKey() {
  const std::string file = absl::GetFlag(FLAGS_api_key_file);
  if (!file.empty()) return ReadSecretFile(file);
  const char* env = std::getenv("KVTRIM_API_KEY");
  return std::string(env ? env : "");
}

// Blocks until SIGTERM or SIGINT (blocked in every thread by main), then drains.
void DrainOnSignal(grpc::Server* server, InferenceService* service, engine::Scheduler* scheduler,
                   sigset_t signals) {
  int signal = 0;
  sigwait(&signals, &signal);
  const absl::Duration timeout = absl::GetFlag(FLAGS_drain_timeout);
  spdlog::info("{}: draining (health NOT_SERVING, new requests UNAVAILABLE, up to {})",
               strsignal(signal), absl::FormatDuration(timeout));
  server->GetHealthCheckService()->SetServingStatus(false);
  service->StartDraining();
  const absl::Time give_up = absl::Now() + timeout;
  while (service->streams_in_flight() > 0 && absl::Now() < give_up) {
    absl::SleepFor(absl::Milliseconds(20));
  }
  if (const int64_t left = service->streams_in_flight(); left > 0) {
    spdlog::warn("drain timeout: cancelling {} requests", left);
  }
  scheduler->Stop();  // unfinished requests finish as cancelled
  server->Shutdown(std::chrono::system_clock::now() + std::chrono::seconds(5));
}

int Run() {
  spdlog::set_level(spdlog::level::from_str(absl::GetFlag(FLAGS_log_level)));
  if (const int threads = absl::GetFlag(FLAGS_threads); threads > 0) omp_set_num_threads(threads);
  const engine::ModelSource source{.load_format = absl::GetFlag(FLAGS_load_format),
                                   .path = absl::GetFlag(FLAGS_model),
                                   .arch = absl::GetFlag(FLAGS_arch)};
  if (absl::Status s = engine::ValidateModelSource(source); !s.ok()) {
    spdlog::error("{}", std::string(s.message()));
    return 2;
  }
  const std::string model_name = engine::DescribeModelSource(source);
  if (absl::GetFlag(FLAGS_page_kib) < 0) {
    spdlog::error("--page-kib must be 0 (the model's default) or a size in KiB, got {}",
                  absl::GetFlag(FLAGS_page_kib));
    return 2;
  }
  if (absl::GetFlag(FLAGS_step_tokens) < 0) {
    spdlog::error("--step-tokens must be 0 (the device's default) or a count, got {}",
                  absl::GetFlag(FLAGS_step_tokens));
    return 2;
  }
  if (absl::GetFlag(FLAGS_kv_pool_mib) < 0) {
    spdlog::error("--kv-pool-mib must be 0 (sized to the device) or a size in MiB, got {}",
                  absl::GetFlag(FLAGS_kv_pool_mib));
    return 2;
  }
  if (const double u = absl::GetFlag(FLAGS_gpu_memory_utilization); !(u > 0.0 && u <= 1.0)) {
    spdlog::error("--gpu-memory-utilization must be in (0, 1], got {}", u);
    return 2;
  }
  absl::StatusOr<memory::compress::CompressionConfig> default_compression =
      memory::compress::ParseCompressionSpec(absl::GetFlag(FLAGS_kv_compression));
  if (!default_compression.ok()) {
    spdlog::error("--kv-compression: {}", std::string(default_compression.status().message()));
    return 2;
  }
  absl::StatusOr<engine::Model> model = engine::LoadModel(source);
  if (!model.ok()) {
    spdlog::error("{}", std::string(model.status().message()));
    return 1;
  }
  absl::StatusOr<engine::Tokenizer> tokenizer = engine::Tokenizer::Create(model->tokenizer);
  if (!tokenizer.ok()) {
    spdlog::error("{}: {}", model_name, std::string(tokenizer.status().message()));
    return 1;
  }
  absl::StatusOr<engine::ChatTemplate> chat_template =
      engine::ChatTemplate::FromSpec(model->tokenizer);
  if (!chat_template.ok()) {
    spdlog::warn("chat requests disabled: {}", std::string(chat_template.status().message()));
  }
  absl::StatusOr<std::string> api_key = ApiKey();
  absl::StatusOr<std::shared_ptr<grpc::ServerCredentials>> credentials = Credentials();
  for (const absl::Status& s : {api_key.status(), credentials.status()}) {
    if (!s.ok()) {
      spdlog::error("{}", std::string(s.message()));
      return 2;
    }
  }

  engine::SchedulerOptions scheduler_options{
      .pool_bytes = static_cast<size_t>(absl::GetFlag(FLAGS_kv_pool_mib)) << 20,
      .page_bytes = static_cast<size_t>(absl::GetFlag(FLAGS_page_kib)) << 10,
      .max_running = absl::GetFlag(FLAGS_max_running),
      .max_queued = absl::GetFlag(FLAGS_max_queued),
      .overlap = absl::GetFlag(FLAGS_overlap_steps),
      .decode_eviction = absl::GetFlag(FLAGS_decode_eviction)};
  absl::StatusOr<engine::BackendChoice> backend =
      engine::ChooseBackend(absl::GetFlag(FLAGS_device), "kvtrim-server",
                            {.cuda_graphs = absl::GetFlag(FLAGS_cuda_graphs),
                             .decode_eviction = absl::GetFlag(FLAGS_decode_eviction),
                             .dtype = absl::GetFlag(FLAGS_dtype),
                             .step_tokens = absl::GetFlag(FLAGS_step_tokens),
                             .max_running = absl::GetFlag(FLAGS_max_running)});
  if (!backend.ok()) {
    spdlog::error("{}", std::string(backend.status().message()));
    return 2;
  }
  absl::Duration step_timeout = absl::GetFlag(FLAGS_step_timeout);
  if (step_timeout < absl::ZeroDuration()) {
    spdlog::error("--step-timeout must not be negative (0 = the backend's default, inf = none)");
    return 2;
  }
  if (step_timeout == absl::ZeroDuration()) {
    step_timeout = backend->name == "cuda" ? absl::Seconds(60) : absl::InfiniteDuration();
  }
  scheduler_options.kv_element_bytes = backend->kv_element_bytes;
  scheduler_options.kv_storage = backend->kv_storage;
  scheduler_options.step_tokens = backend->step_tokens;
  absl::StatusOr<engine::KvPoolSize> pool = engine::ResolveKvPool(
      *backend, *model, scheduler_options.pool_bytes, scheduler_options.page_bytes,
      absl::GetFlag(FLAGS_gpu_memory_utilization));
  if (!pool.ok()) {
    spdlog::error("KV pool: {}", std::string(pool.status().message()));
    return 2;
  }
  if (!pool->account.empty()) spdlog::info("KV pool sized to the device: {}", pool->account);
  scheduler_options.pool_bytes = pool->bytes;
  absl::StatusOr<std::unique_ptr<engine::Scheduler>> scheduler =
      engine::Scheduler::Create(&*model, &*tokenizer, scheduler_options, backend->make_backend);
  if (!scheduler.ok()) {
    spdlog::error("{}", std::string(scheduler.status().message()));
    return 2;
  }

  if (default_compression->enabled()) {
    if (absl::Status s = (*scheduler)->CompressionSupport(*default_compression); !s.ok()) {
      spdlog::error("--kv-compression {}: {}", default_compression->Spec(),
                    std::string(s.message()));
      return 2;
    }
  }

  ServiceOptions service_options;
  RequestLimits& limits = service_options.limits;
  limits.max_prompt_tokens = absl::GetFlag(FLAGS_max_prompt_tokens) > 0
                                 ? absl::GetFlag(FLAGS_max_prompt_tokens)
                                 : model->config.max_context;
  limits.max_new_tokens = absl::GetFlag(FLAGS_max_new_tokens);
  limits.default_max_tokens = absl::GetFlag(FLAGS_default_max_tokens);
  service_options.api_key = *api_key;
  service_options.backend = backend->name;
  service_options.default_compression = *default_compression;

  std::unique_ptr<Metrics> metrics;
  if (const int port = absl::GetFlag(FLAGS_metrics_port); port > 0) {
    absl::StatusOr<std::unique_ptr<Metrics>> created =
        Metrics::Create(absl::StrCat("0.0.0.0:", port), scheduler->get());
    if (!created.ok()) {
      spdlog::error("{}", std::string(created.status().message()));
      return 1;
    }
    metrics = *std::move(created);
  }
  ModelContext context{&*model, &*tokenizer, chat_template.ok() ? &*chat_template : nullptr};
  InferenceService service(context, scheduler->get(), metrics.get(), service_options);

  grpc::EnableDefaultHealthCheckService(true);
  grpc::reflection::InitProtoReflectionServerBuilderPlugin();
  grpc::ServerBuilder builder;
  int port = 0;
  const std::string listen = absl::GetFlag(FLAGS_listen);
  builder.AddListeningPort(listen, *credentials, &port);
  builder.RegisterService(&service);
  builder.SetMaxReceiveMessageSize(absl::GetFlag(FLAGS_max_message_mib) << 20);
  std::unique_ptr<grpc::Server> server = builder.BuildAndStart();
  if (server == nullptr || port == 0) {
    spdlog::error("cannot listen on {}", listen);
    return 1;
  }
  (*scheduler)->Start();
  const engine::ModelConfig& c = model->config;
  // The flag parsed already in ChooseBackend.
  const std::optional<engine::HalfFloat> dtype = *engine::ParseDtype(absl::GetFlag(FLAGS_dtype));
  const char* weights = backend->name == "cpu"                                ? "fp32"
                        : dtype.value_or(c.dtype) == engine::HalfFloat::kFp16 ? "fp16"
                                                                              : "bf16";
  spdlog::info(
      "model {} ({}, {} layers, {} heads / {} kv heads x {}, vocab {}, context {}) from {}", c.name,
      c.architecture, c.n_layers, c.n_heads, c.n_kv_heads, c.head_dim, c.vocab_size, c.max_context,
      model_name);
  spdlog::info(
      "config: {} backend ({} weights), KV pool {} MiB in {} KiB pages, step {} tokens, max "
      "running {}, "
      "max queued {}, max prompt {} tokens, max new tokens {} (default {}), max message {} MiB, "
      "auth {}, TLS {}, drain timeout {}, step timeout {}, metrics {}, {} engine threads, KV "
      "compression {}, decode-time eviction {}",
      backend->name, weights, scheduler_options.pool_bytes >> 20,
      (*scheduler)->stats().page_bytes >> 10, scheduler_options.step_tokens,
      scheduler_options.max_running, scheduler_options.max_queued, limits.max_prompt_tokens,
      limits.max_new_tokens, limits.default_max_tokens, absl::GetFlag(FLAGS_max_message_mib),
      api_key->empty() ? "off" : "on", absl::GetFlag(FLAGS_tls_cert).empty() ? "off" : "on",
      absl::FormatDuration(absl::GetFlag(FLAGS_drain_timeout)), absl::FormatDuration(step_timeout),
      metrics ? absl::StrCat(":", absl::GetFlag(FLAGS_metrics_port), "/metrics") : "off",
      omp_get_max_threads(), default_compression->Spec(),
      scheduler_options.decode_eviction ? "on" : "off");
  const std::string host = listen.substr(0, listen.rfind(':'));
  spdlog::info("kvtrim-server listening on {}:{}", host, port);

  sigset_t signals;
  sigemptyset(&signals);
  sigaddset(&signals, SIGTERM);
  sigaddset(&signals, SIGINT);
  std::thread drainer(DrainOnSignal, server.get(), &service, scheduler->get(), signals);
  // Once the device has failed for good (Scheduler::health: every request then ends with the
  // error), the server stops as on SIGTERM and exits 1, so that its supervisor (Kubernetes,
  // systemd, Docker's restart policy) starts a fresh process. A step that runs past
  // --step-timeout has a device that does not respond: nothing can be drained then (the engine
  // thread is stuck in the step), so the server ends every stream with UNAVAILABLE itself, gives
  // gRPC a moment to send those, and exits 1 without joining the engine thread.
  std::atomic<bool> serving{true}, device_failed{false};
  std::thread watcher([&] {
    while (serving.load()) {
      if (const absl::Duration busy = absl::FromChrono((*scheduler)->busy_for());
          busy > step_timeout) {
        const std::string why =
            absl::StrCat("the device does not respond: the engine has waited ",
                         absl::FormatDuration(absl::Trunc(busy, absl::Milliseconds(1))),
                         " for it (--step-timeout ", absl::FormatDuration(step_timeout), ")");
        spdlog::error("{}; ending every stream and exiting so that the server is restarted", why);
        server->GetHealthCheckService()->SetServingStatus(false);
        service.StartDraining();
        const int ended = service.EndStreams(grpc::Status(
            grpc::StatusCode::UNAVAILABLE, absl::StrCat(why, "; this server is restarting")));
        const absl::Time give_up = absl::Now() + absl::Seconds(2);
        while (service.streams_in_flight() > 0 && absl::Now() < give_up) {
          absl::SleepFor(absl::Milliseconds(10));
        }
        absl::SleepFor(absl::Milliseconds(200));  // the streams' last writes, on gRPC's threads
        spdlog::error("ended {} streams; exiting", ended);
        spdlog::default_logger()->flush();
        std::_Exit(1);
      }
      if (const absl::Status health = (*scheduler)->health(); !health.ok()) {
        spdlog::error("the device failed: {}; stopping so that the server is restarted",
                      std::string(health.message()));
        device_failed = true;
        kill(getpid(), SIGTERM);  // the drainer's sigwait
        return;
      }
      absl::SleepFor(absl::Milliseconds(100));
    }
  });
  server->Wait();
  serving = false;
  watcher.join();
  drainer.join();
  spdlog::info("stopped");
  return device_failed ? 1 : 0;
}

}  // namespace
}  // namespace kvtrim::server

int main(int argc, char** argv) {
  // Blocked here, before any thread starts, so every thread inherits the mask and only the
  // drain thread's sigwait sees SIGTERM / SIGINT.
  sigset_t signals;
  sigemptyset(&signals);
  sigaddset(&signals, SIGTERM);
  sigaddset(&signals, SIGINT);
  pthread_sigmask(SIG_BLOCK, &signals, nullptr);
  // --help lists this binary's own flags (those defined in this file), with their defaults.
  kvtrim::ParseFlags(argc, argv, "server/main.cc",
                     "kvtrim-server (--model PATH | --load-format dummy --arch NAME) "
                     "[--listen HOST:PORT] [flags]");
  return kvtrim::server::Run();
}
