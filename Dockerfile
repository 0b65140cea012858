# kvtrim-server on Debian 12, CPU engine. Build: docker build -t kvtrim .
# Run:   docker run -p 50051:50051 -p 9400:9400 -v ~/.cache/kvtrim:/models kvtrim \
#          --model /models/SmolLM2-135M-Instruct.Q4_1.gguf
FROM debian:12 AS build
WORKDIR /src
COPY tools/setup/install_deps.sh tools/setup/install_deps.sh
RUN tools/setup/install_deps.sh && rm -rf /var/lib/apt/lists/*
COPY . .
RUN cmake -S . -B build -DCMAKE_BUILD_TYPE=Release \
 && cmake --build build -j"$(nproc)" --target kvtrim-server kvtrim

FROM debian:12-slim
RUN apt-get update -qq \
 && apt-get install -y -qq --no-install-recommends \
      libgrpc++1.51 libprotobuf32 libopenblas0-openmp libgomp1 libspdlog1.10 \
      libprometheus-cpp-core1.0 libprometheus-cpp-pull1.0 libpcre2-8-0 \
      libabsl20220623 ca-certificates \
 && rm -rf /var/lib/apt/lists/* \
 && useradd --system --uid 10001 kvtrim
COPY --from=build /src/build/server/kvtrim-server /src/build/tools/kvtrim /usr/local/bin/
USER kvtrim
EXPOSE 50051 9400
ENTRYPOINT ["/usr/local/bin/kvtrim-server", "--listen=0.0.0.0:50051", "--metrics-port=9400"]
