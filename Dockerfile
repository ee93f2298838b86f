# syntax=docker/dockerfile:1
# The trainer on NVIDIA GPUs. Base: the official PyTorch runtime image, torch 2.10.0 built for CUDA 12.8 with
# cuDNN 9 (Python in /opt/conda). The host needs an NVIDIA driver for CUDA 12.8 (R570 or newer) and the NVIDIA
# Container Toolkit. On top: this project's own pure-Python dependencies and its code; nothing else.
#
#   docker build -t gumbel-vae .
#   mkdir -p data outputs
#   docker run --rm --gpus all --ipc=host --user "$(id -u):$(id -g)" \
#       -v "$PWD/data:/app/data" -v "$PWD/outputs:/app/outputs" gumbel-vae hard=true temperature=1.0
#
# docs/docker.md has TensorBoard from the same image, read-only data, stop and resume, and the compile cache.
# BASE_IMAGE is for a stand-in with the same layout (scripts/docker-smoke.sh builds one where Docker Hub is out of reach).
ARG BASE_IMAGE=pytorch/pytorch:2.10.0-cuda12.8-cudnn9-runtime
FROM ${BASE_IMAGE}

LABEL org.opencontainers.image.title="gumbel-vae" \
      org.opencontainers.image.description="Categorical VAE with Gumbel-softmax latents on MNIST (Hydra trainer)"

# torch.compile's caches (compile is on by default on CUDA): the compiled kernels go to the outputs mount, so that
# the next container on the same host starts without compiling again; Triton's other files go to /tmp. Both are
# writable by any --user, whose uid may have no home directory and no name in the image.
ENV PYTHONDONTWRITEBYTECODE=1 \
    PYTHONUNBUFFERED=1 \
    PIP_DISABLE_PIP_VERSION_CHECK=1 \
    PIP_ROOT_USER_ACTION=ignore \
    TRITON_HOME=/tmp \
    TORCHINDUCTOR_CACHE_DIR=/app/outputs/.cache/inductor \
    TRITON_CACHE_DIR=/app/outputs/.cache/triton

# Triton, which torch.compile uses on CUDA (compile is on by default there), builds small C helpers when a run starts:
# it needs a C compiler, which the CUDA runtime images lacked until late 2025 (pytorch/pytorch#116696). g++ too, for
# compile=true on the CPU (Inductor writes C++ kernels there; without it the run falls back to eager with a warning).
# Unpinned: any gcc of the base image's release will do.
# hadolint ignore=DL3008
RUN apt-get update \
    && apt-get install -y --no-install-recommends gcc g++ libc6-dev \
    && rm -rf /var/lib/apt/lists/*

# The pins of requirements.txt without torch and torchvision (the image's CUDA builds; none of these packages pulls
# them in again), numpy (the image's own, which its torch was built against) and the test tools.
# tests/project/test_ship.py checks that these pins match requirements.txt and that they resolve.
RUN pip install --no-cache-dir \
        hydra-core==1.3.8 \
        omegaconf==2.3.1 \
        tensorboard==2.21.0 \
        tqdm==4.70.1 \
        hydra-joblib-launcher==1.2.0 \
        hydra-submitit-launcher==1.2.0 \
        hydra-optuna-sweeper==1.3.0 \
        optuna==2.10.1 \
    && python -c "import torch, torchvision; \
ok = torch.version.cuda and tuple(map(int, torch.__version__.split('.')[:2])) >= (2, 4); \
assert ok, f'need a CUDA build of torch >= 2.4, found {torch.__version__}'; \
print('torch', torch.__version__, '| CUDA', torch.version.cuda, '| torchvision', torchvision.__version__)"

# A non-root user, named by number in USER (so that e.g. Kubernetes' runAsNonRoot can check it). uid 1000, the first
# user of most Linux machines, can write that user's bind-mounted data/ and outputs/ as they are; anyone else runs
# with --user "$(id -u):$(id -g)". /app/data and /app/outputs are writable by every uid (sticky, like /tmp), so that
# --user also works without bind mounts.
ARG APP_UID=1000
RUN useradd --create-home --non-unique --uid "${APP_UID}" --user-group --shell /bin/bash vae \
    && mkdir -p /app/data /app/outputs \
    && chown vae:vae /app/data /app/outputs \
    && chmod 1777 /app/data /app/outputs

# The code last: an edit rebuilds only these layers. data.root and the run directories are <repo>/data and
# <repo>/outputs, and <repo> is the directory holding vae/, so they are /app/data and /app/outputs here.
WORKDIR /app
COPY train.py ./
COPY configs/ configs/
COPY vae/ vae/

USER ${APP_UID}
EXPOSE 6006
ENTRYPOINT ["python", "train.py"]
