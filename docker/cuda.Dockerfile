# petl's CUDA worker image: the trainer built with `--features cuda`, on NVIDIA's CUDA base,
# from the repository root:
#
#   docker build -f docker/cuda.Dockerfile -t localhost/petl-worker-cuda:0.1.0 .
#
# It runs where a GPU and the NVIDIA container toolkit are (driver >= 580 for CUDA 13.0).
# The kernels are compiled for CUDA_COMPUTE_CAP (90 = H100/H200); set it for other GPUs.
# The snapshot agent and the `petl` CLI are the CPU builds: they do no GPU work.
ARG CUDA_VERSION=13.0.2
ARG RUST_VERSION=1.95.0

FROM docker.io/nvidia/cuda:${CUDA_VERSION}-devel-ubuntu24.04 AS source
ARG RUST_VERSION
ARG CUDA_COMPUTE_CAP=90
RUN apt-get update \
 && apt-get install -y --no-install-recommends ca-certificates curl gcc libc6-dev pkg-config \
 && rm -rf /var/lib/apt/lists/*
ENV RUSTUP_HOME=/usr/local/rustup CARGO_HOME=/usr/local/cargo PATH=/usr/local/cargo/bin:$PATH
RUN curl --proto '=https' --tlsv1.2 -sSf https://sh.rustup.rs \
    | sh -s -- -y --profile minimal --default-toolchain "${RUST_VERSION}"
WORKDIR /src
COPY . .
# No GPU at build time: candle's kernels take the compute capability from the environment, and
# the link resolves libcuda against the toolkit's stub (the driver provides the real one).
ENV CUDA_COMPUTE_CAP=${CUDA_COMPUTE_CAP} CUDA_ROOT=/usr/local/cuda \
    LIBRARY_PATH=/usr/local/cuda/lib64/stubs
RUN --mount=type=cache,target=/usr/local/cargo/registry \
    --mount=type=cache,target=/src/target \
    cargo build --release --locked --bins -p petl-trainer --features petl-trainer/cuda \
 && cargo build --release --locked --bins -p petl-snapshot \
 && mkdir -p /out \
 && cp target/release/petl-trainer target/release/petl target/release/petl-snapshot-agent /out/

FROM docker.io/nvidia/cuda:${CUDA_VERSION}-runtime-ubuntu24.04 AS worker
COPY --from=source /out/petl-trainer /out/petl-snapshot-agent /out/petl /usr/local/bin/
ENV HOME=/tmp
USER 65532:65532
WORKDIR /tmp
ENTRYPOINT ["/usr/local/bin/petl-trainer"]
