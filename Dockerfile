# dreamer_fast on a CUDA machine: docker build -t dreamer_fast . && docker run --gpus all dreamer_fast
# The default command is the README's main job; pass another after the image name, e.g.
#   docker run --gpus all -v $PWD/logdir:/app/logdir dreamer_fast python run.py --env WalkerWalk-v1
FROM nvidia/cuda:12.8.1-cudnn-runtime-ubuntu22.04

# EGL for headless MuJoCo rendering (dm_control pixels); graphics capability makes the NVIDIA
# container toolkit mount the driver's EGL vendor library.
ENV DEBIAN_FRONTEND=noninteractive \
    MUJOCO_GL=egl PYOPENGL_PLATFORM=egl \
    NVIDIA_DRIVER_CAPABILITIES=compute,utility,graphics \
    PIP_NO_CACHE_DIR=1 PYTHONUNBUFFERED=1

# Python 3.11 (EnvPool's wheels stop at 3.11) from the deadsnakes PPA, in a venv.
RUN apt-get update && apt-get install -y --no-install-recommends \
        software-properties-common ca-certificates \
    && add-apt-repository -y ppa:deadsnakes/ppa && apt-get update \
    && apt-get install -y --no-install-recommends \
        python3.11 python3.11-venv libegl1 libgl1 libglvnd0 libgles2 libglib2.0-0 \
    && rm -rf /var/lib/apt/lists/*
RUN python3.11 -m venv /opt/venv
ENV PATH=/opt/venv/bin:$PATH

WORKDIR /app
# Dependencies first (a cached layer while only the code changes): torch's default Linux
# wheel is the CUDA build.
COPY pyproject.toml README.md ./
RUN pip install --upgrade pip && pip install "torch>=2.6,<3"
COPY . .
RUN pip install ".[crafter,wandb]"

CMD ["python", "run.py", "--env", "Pong-v5", "--num-envs", "64"]
