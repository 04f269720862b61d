"""The container and cluster recipe: the Dockerfile's commands, two torchrun "nodes" on
localhost (c10d rendezvous, gloo) training in lockstep and resuming, and the Kubeflow
TrainJob manifest."""

import json
import os
import re
import shlex
import socket
import subprocess
import sys

import pytest
import torch

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
KUBE = os.path.join(ROOT, "deploy", "kubernetes")


def dockerfile() -> list[tuple[str, str]]:
    """(instruction, argument) pairs, continuation lines joined."""
    text = open(os.path.join(ROOT, "Dockerfile")).read().replace("\\\n", " ")
    out = []
    for line in text.splitlines():
        line = line.strip()
        if line and not line.startswith("#"):
            word, _, rest = line.partition(" ")
            out.append((word.upper(), rest.strip()))
    return out


def readme_main_job() -> list[str]:
    readme = open(os.path.join(ROOT, "README.md")).read()
    m = re.search(r"pip install -e \. && (python run\.py [^\n`]+)", readme)
    assert m, "README's main job not found"
    return shlex.split(m.group(1))


def docker_works() -> bool:
    try:
        return subprocess.run(["docker", "info"], capture_output=True, timeout=20).returncode == 0
    except (OSError, subprocess.TimeoutExpired):
        return False


def test_dockerfile_base_egl_and_default_command():
    steps = dockerfile()
    base = next(arg for op, arg in steps if op == "FROM")
    assert base.startswith("nvidia/cuda:") and "runtime" in base  # a CUDA runtime base
    env = " ".join(arg for op, arg in steps if op == "ENV")
    assert "MUJOCO_GL=egl" in env and "graphics" in env  # EGL rendering on NVIDIA
    cmd = json.loads(next(arg for op, arg in steps if op == "CMD"))
    assert cmd == readme_main_job()  # the default command is the README's main job
    from dreamer_fast.flags import parse
    from dreamer_fast.run.resolve import choose

    argv = cmd[2:]
    assert parse(argv, choice=choose(argv)).num_envs == 64


def test_dockerfile_pip_commands_resolve_in_a_clean_venv(tmp_path):
    """Without a Docker daemon: the image's pip installs, resolved (--dry-run) in a fresh venv
    with no site packages, from this checkout (with one, the image is built: below)."""
    if docker_works():
        pytest.skip("docker works here: test_docker_build builds the image itself")
    venv = tmp_path / "venv"
    subprocess.run([sys.executable, "-m", "venv", str(venv)], check=True, timeout=120)
    pip = str(venv / "bin" / "pip")
    installs = [arg for op, arg in dockerfile() if op == "RUN" and "pip install" in arg]
    requirements = []  # every `pip install X` of the image, resolved together in one call
    for run in installs:
        for part in run.split("&&"):
            words = shlex.split(part)
            if words[:2] == ["pip", "install"] and "--upgrade" not in words:
                requirements += words[2:]
    assert any(r.startswith("torch") for r in requirements) and ".[crafter,wandb]" in requirements
    out = subprocess.run([pip, "install", "--dry-run", "-q", *requirements], cwd=ROOT,
                         capture_output=True, text=True, timeout=900)
    assert out.returncode == 0, (requirements, out.stdout[-2000:], out.stderr[-2000:])


@pytest.mark.skipif(not docker_works(), reason="no Docker daemon on this machine")
def test_docker_build():
    out = subprocess.run(["docker", "build", "-t", "dreamer_fast:test", ROOT],
                         capture_output=True, text=True, timeout=3600)
    assert out.returncode == 0, out.stderr[-3000:]
    out = subprocess.run(["docker", "run", "--rm", "dreamer_fast:test", "python", "run.py",
                          "--help"], capture_output=True, text=True, timeout=600)
    assert out.returncode == 0 and "--env" in out.stdout


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def two_nodes(logdir, steps: int) -> list[str]:
    """Two `torchrun --nnodes 2` launches (one process each) meeting at a c10d rendezvous."""
    port = free_port()
    cmd = [sys.executable, "-m", "torch.distributed.run", "--nnodes", "2", "--nproc-per-node",
           "1", "--rdzv-backend", "c10d", "--rdzv-endpoint", f"127.0.0.1:{port}", "--rdzv-id",
           "test", "run.py", "--env", "CartPole-v1", "--preset", "debug", "--train-ratio", "16",
           "--seed", "1", "--log-every", "1", "--save-every", "2", "--steps", str(steps),
           "--logdir", str(logdir)]
    env = {**os.environ, "OMP_NUM_THREADS": "1"}
    procs = [subprocess.Popen(cmd, cwd=ROOT, env=env, stdout=subprocess.PIPE,
                              stderr=subprocess.STDOUT, text=True) for _ in range(2)]
    try:
        outs = [p.communicate(timeout=300)[0] for p in procs]
    finally:
        for p in procs:
            p.kill()
    for p, out in zip(procs, outs):
        assert p.returncode == 0, out
    return outs


def test_two_nodes_on_localhost_train_in_lockstep_and_resume(tmp_path):
    logdir = tmp_path / "shared"  # the shared storage of both "nodes"
    outs = "\n".join(two_nodes(logdir, 400))
    assert "2 processes x 4 envs" in outs and "replicas identical" in outs, outs
    first = torch.load(logdir / "checkpoint.pt", weights_only=True)
    assert first["counters"]["updates"] > 0
    assert {"replay-rank0", "replay-rank1", "checkpoint.pt"} <= set(os.listdir(logdir))
    outs = "\n".join(two_nodes(logdir, 800))
    resumed = re.findall(r"\[rank (\d)\] resumed from .*: ([\d,]+) agent steps, ([\d,]+) "
                         r"updates", outs)
    assert sorted(r for r, _, _ in resumed) == ["0", "1"], outs
    assert all(int(u.replace(",", "")) == first["counters"]["updates"] for _, _, u in resumed)
    final = torch.load(logdir / "checkpoint.pt", weights_only=True)
    assert final["counters"]["steps"] >= 800 and "replicas identical" in outs
    assert final["counters"]["updates"] > first["counters"]["updates"]


def load_yaml(name):
    import yaml

    with open(os.path.join(KUBE, name)) as f:
        return yaml.safe_load(f)


def test_trainjob_manifest_has_what_the_runtime_needs():
    job, pvc = load_yaml("trainjob.yaml"), load_yaml("pvc.yaml")
    assert job["apiVersion"] == "trainer.kubeflow.org/v1alpha1" and job["kind"] == "TrainJob"
    assert re.fullmatch(r"[a-z]([-a-z0-9]*[a-z0-9])?", job["metadata"]["name"])  # RFC 1035
    spec = job["spec"]
    assert spec["runtimeRef"]["name"] == "torch-distributed"
    trainer = spec["trainer"]
    assert trainer["command"] == ["torchrun", "run.py"]
    assert isinstance(trainer["numNodes"], int) and trainer["numNodes"] >= 1
    assert int(trainer["resourcesPerNode"]["limits"]["nvidia.com/gpu"]) >= 1
    assert all(isinstance(a, str) for a in trainer["args"])  # k8s args are strings
    from dreamer_fast.flags import parse
    from dreamer_fast.run.resolve import choose

    cfg = parse(trainer["args"], choice=choose(trainer["args"]))
    (override,) = spec["templateOverrides"]
    (pod,) = override["pod"]
    assert pod["targetJobs"] == [{"name": "node"}]  # the runtime's replicated job
    volumes = {v["name"]: v for v in pod["spec"]["volumes"]}
    claim = volumes["logdir"]["persistentVolumeClaim"]["claimName"]
    assert claim == pvc["metadata"]["name"] and pvc["kind"] == "PersistentVolumeClaim"
    (container,) = pod["spec"]["containers"]
    assert container["name"] == "node"  # the runtime's container
    mounts = {m["name"]: m["mountPath"] for m in container["volumeMounts"]}
    assert cfg.logdir.startswith(mounts["logdir"] + "/")  # the run folder is on the volume
    assert "ReadWriteMany" in pvc["spec"]["accessModes"]
