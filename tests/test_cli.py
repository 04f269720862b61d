"""One command line: `dreamer-fast SUBCOMMAND`, each subcommand with --help, the older entry
points unchanged (run.py's own tests drive it through the same code)."""

from __future__ import annotations

import json
import os
import shutil
import subprocess
import sys

import pytest

from dreamer_fast import cli

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def test_subcommands_and_their_help(capsys):
    with pytest.raises(SystemExit) as e:
        cli.main(["--help"])
    out = capsys.readouterr().out
    assert e.value.code == 0 and out.startswith("usage: dreamer-fast {train,eval,export,plot,"
                                                "replay} [flags]")
    for name in cli.SUBCOMMANDS:
        assert f"\n  {name:<8} " in out
    usages = {"train": "usage: dreamer-fast train [-h] [OPTIONS]",
              "eval": "usage: dreamer-fast eval [-h] [OPTIONS]",
              "export": "usage: python -m dreamer_fast.export [-h] [OPTIONS]",
              "plot": "usage: python -m dreamer_fast.plot",
              "replay": "usage: dreamer-fast replay REPLAY_FOLDER"}
    for name, usage in usages.items():
        try:
            cli.main([name, "--help"])
        except SystemExit as e:
            assert e.code in (0, None), (name, e.code)
        assert capsys.readouterr().out.startswith(usage), name
    with pytest.raises(SystemExit) as e:
        cli.main(["trian"])
    assert str(e.value.code) == ("error: unknown subcommand 'trian'; choose one of train, eval, "
                                 "export, plot, replay (dreamer-fast --help)")


def test_the_installed_script_and_the_old_entry_points():
    script = shutil.which("dreamer-fast")
    if script is None:
        pytest.skip("the package is not installed here (pip install -e .)")
    out = subprocess.run([script, "eval", "--logdir", "/nonexistent"], capture_output=True,
                         text=True, cwd=ROOT)
    assert out.returncode == 1 and out.stderr.strip().startswith(
        "error: no checkpoint at '/nonexistent'"), out.stderr
    for module in ("dreamer_fast.export", "dreamer_fast.plot", "dreamer_fast.data.store"):
        proc = subprocess.run([sys.executable, "-m", module, "--help"], capture_output=True,
                              text=True, cwd=ROOT)
        assert proc.returncode == 0 and proc.stdout.startswith("usage:"), module



def test_a_gymnasium_run_starts_without_envpool_or_inductor():
    """What a CartPole run imports before its first step: not EnvPool's registry (it loads
    every EnvPool family, JAX among them: about 1.5 s) and, without CUDA, not inductor (a
    Triton op registered for torch.compile: about 1 s); the suite runs hundreds of these."""
    code = ("import json, sys, torch; from dreamer_fast.envs import suite_of; "
            "import dreamer_fast.kernels; assert suite_of('CartPole-v1') == 'gymnasium'; "
            "print(json.dumps([torch.cuda.is_available(), sorted(m for m in "
            "('envpool', 'jax', 'torch._inductor') if m in sys.modules)]))")
    env = {k: v for k, v in os.environ.items() if k != "TRITON_INTERPRET"}
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, env=env,
                         timeout=120)
    assert out.returncode == 0, out.stderr[-2000:]
    cuda, loaded = json.loads(out.stdout.strip().splitlines()[-1])
    assert not set(loaded) & {"envpool", "jax"}, loaded
    assert cuda or "torch._inductor" not in loaded, loaded
