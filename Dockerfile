# The pipeprobe agent image: one binary (its eBPF objects are embedded) on a slim Debian.
#   docker build -t pipeprobe .        (from the repository root)
# The build stage runs the README's "Building from source" commands; a test
# (tests/tests/agent/deploy.rs) checks that they stay the same.

FROM debian:bookworm AS build
RUN apt-get update \
 && apt-get install -y --no-install-recommends ca-certificates curl gcc g++ libc6-dev \
 && rm -rf /var/lib/apt/lists/*
ENV PATH=/root/.cargo/bin:$PATH
# The toolchains the agent is built and tested with: bpf-linker must match the nightly's LLVM.
RUN curl --proto '=https' --tlsv1.2 -sSf https://sh.rustup.rs | sh -s -- -y --profile minimal --default-toolchain 1.95.0
RUN rustup toolchain install nightly-2026-05-20 --profile minimal \
 && ln -s nightly-2026-05-20-x86_64-unknown-linux-gnu /root/.rustup/toolchains/nightly-x86_64-unknown-linux-gnu
WORKDIR /src
COPY . .
RUN cargo xtask setup --build-only
RUN cargo build --release -p pipeprobe --bin pipeprobe

FROM debian:bookworm-slim
# libnvidia-ml comes from the NVIDIA container runtime, which registers it with this base's
# ldconfig; nothing else is needed at run time (glibc only).
COPY --from=build /src/target/release/pipeprobe /usr/local/bin/pipeprobe
ENTRYPOINT ["/usr/local/bin/pipeprobe"]
CMD ["agent", "--config=/etc/pipeprobe/pipeprobe.toml", "--listen=0.0.0.0:9477"]
