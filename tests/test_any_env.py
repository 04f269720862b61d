"""Any environment a user brings: images of any size and channel count resized in the env
adapter, several image keys, categorical observations, key selection, rendered frames,
Crafter, and the strided CNN."""

import json
import os
import re
import subprocess
import sys
from dataclasses import replace

import numpy as np
import pytest
import torch
import torch.nn.functional as F
from gymnasium import spaces

import image_envs  # noqa: F401  (registers the test envs)
from dreamer_fast.agent.agent import Agent
from dreamer_fast.agent.nets import StridedConv, StridedConvT
from dreamer_fast.agent.rssm import Decoder, Encoder, Keys, mlp_input
from dreamer_fast.config import SIZES, AgentConfig, EnvConfig, OptimConfig
from dreamer_fast.checks import ConfigError
from dreamer_fast.data.synthetic import ActSpace, make_batch
from dreamer_fast.envs import make_env, preset_for
from dreamer_fast.envs.spaces import ObsConverter, resize_area
from dreamer_fast.run.stats import Achievements, crafter_score

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
GYM = EnvConfig(repeat=1, sticky=0.0, noops=0, time_limit=0)


def test_big_image_is_resized_by_area_and_reported():
    env = make_env("image_envs:BigImage-v0", 2, GYM)
    assert env.obs_space == {"image": ((3, 64, 64), np.dtype(np.uint8))}
    assert env.notes == ["image 288x512x3 -> 64x64x3"]
    env.start()
    step = env.recv()
    assert step["image"].shape == (2, 3, 64, 64) and step["image"].dtype == np.uint8
    # Area interpolation of the known pattern: each output pixel is the mean of its
    # 4.5 x 8 source window (OpenCV INTER_AREA), not a sample of it.
    frame = image_envs.Frames().frame()
    import cv2
    want = cv2.resize(frame, (64, 64), interpolation=cv2.INTER_AREA).transpose(2, 0, 1)
    np.testing.assert_array_equal(step["image"][0], want)
    assert abs(float(step["image"][0, 0, 0, 0]) - frame[:4, :8, 0].mean()) < 1.0
    env.close()


def test_resize_area_is_a_block_mean_for_integer_factors():
    x = np.random.default_rng(0).integers(0, 256, (3, 2, 128, 128), dtype=np.uint8)
    out = resize_area(x, 64)
    mean = x.reshape(3, 2, 64, 2, 64, 2).astype(np.float64).mean((3, 5))
    assert out.shape == (3, 2, 64, 64) and np.abs(out - mean).max() <= 0.5 + 1e-9


def test_gray_and_channels_first_images():
    env = make_env("image_envs:GrayImage-v0", 1, replace(GYM, image_size=32))
    assert env.obs_space == {"image": ((1, 32, 32), np.dtype(np.uint8))}
    assert env.notes == ["image 84x84x1 -> 32x32x1"]
    env.start()
    assert env.recv()["image"].shape == (1, 1, 32, 32)
    chw = ObsConverter(spaces.Box(0, 255, (3, 96, 80), np.uint8), "x", None, 64)
    assert chw.obs_space == {"image": ((3, 64, 64), np.dtype(np.uint8))}
    same = ObsConverter(spaces.Box(0, 255, (64, 64, 3), np.uint8), "x", None, 64)
    assert same.notes == []  # already the model's size: stored as it comes
    with pytest.raises(ValueError, match=r"with 5 channels; supported: 1 to 4.*obs-keys"):
        ObsConverter(spaces.Box(0, 255, (64, 64, 5), np.uint8), "x", True, 64)


def test_image_size_must_be_a_multiple_of_16():
    with pytest.raises(ConfigError, match=r"env_opts.image_size=50.*multiple of 16"):
        EnvConfig(image_size=50)


def test_mixed_dict_env_spaces_and_one_hots():
    env = make_env("image_envs:Mixed-v0", 3, GYM)
    u8 = np.dtype(np.uint8)
    assert env.obs_space == {
        "cam_a": ((3, 64, 64), u8), "cam_b": ((1, 64, 64), u8),
        "pos": ((3,), np.dtype(np.float32)), "room": ((1, 5), u8), "grid": ((2, 3), u8),
        "flags": ((4, 2), u8)}
    assert env.notes == ["cam_b 32x48x1 -> 64x64x1"]
    env.start()
    step = env.recv()
    for key in ("room", "grid", "flags"):
        assert step[key].dtype == np.uint8 and (step[key].sum(-1) == 1).all(), key
    # Discrete(5, start=1): the observation 1 is class 0.
    conv = ObsConverter(image_envs.Mixed.observation_space, "x", True, 64)
    obs = {k: np.stack([v] * 2) for k, v in image_envs.Mixed.observation_space.sample().items()}
    obs["room"] = np.array([1, 5])
    obs["grid"] = np.array([[0, 2], [1, 1]])
    obs["flags"] = np.array([[0, 1, 1, 0], [1, 1, 1, 1]], np.int8)
    out = conv(obs)
    assert out["room"].argmax(-1).tolist() == [[0], [4]]
    assert out["grid"].argmax(-1).tolist() == [[0, 2], [1, 1]]
    assert out["flags"].argmax(-1).tolist() == [[0, 1, 1, 0], [1, 1, 1, 1]]
    env.close()


def test_obs_keys_drop_entries_before_anything_is_built():
    env = make_env("image_envs:Mixed-v0", 1, replace(GYM, obs_keys="cam_a|pos"))
    assert sorted(env.obs_space) == ["cam_a", "pos"]
    with pytest.raises(ValueError, match=r"obs_keys='nothing' matches none of the observation"):
        make_env("image_envs:Mixed-v0", 1, replace(GYM, obs_keys="nothing"))
    with pytest.raises(ValueError, match=r"unsupported space .*obs-keys"):
        ObsConverter(spaces.Dict({"text": spaces.Text(5), "pos": spaces.Box(0, 1, (2,))}),
                     "x", True, 64)
    kept = ObsConverter(spaces.Dict({"text": spaces.Text(5), "pos": spaces.Box(0, 1, (2,))}),
                        "x", True, 64, keys="pos")
    assert list(kept.obs_space) == ["pos"]


MIXED = {"cam_a": ((3, 16, 16), np.uint8), "cam_b": ((1, 16, 16), np.uint8),
         "pos": ((3,), np.float32), "grid": ((2, 3), np.uint8)}


def test_encoder_concatenates_image_channels_and_one_hots_unsquashed():
    net = SIZES["debug"]
    enc = Encoder(MIXED, net.units, net.depth, net.enc_layers, _ops())
    assert enc.cnn[0].in_channels == 4  # cam_a's 3 + cam_b's 1, one CNN
    batch = make_batch(MIXED, ActSpace(True, 3), net, 2, 3)
    obs = {k: batch[k] for k in MIXED}
    assert enc(obs).shape == (2, 3, enc.out_size)
    x = mlp_input(obs, enc.keys)  # sorted keys: grid (one-hot, as is), pos (symlog)
    assert x.shape == (2, 3, 6 + 3)
    torch.testing.assert_close(x[..., :6], obs["grid"].reshape(2, 3, 6).float())
    torch.testing.assert_close(x[..., 6:], torch.sign(obs["pos"]) * torch.log1p(obs["pos"].abs()))
    # Swapping the two cameras' contents changes the tokens: both are read.
    swapped = dict(obs, cam_b=obs["cam_a"][:, :, :1].clone(), cam_a=obs["cam_a"].flip(-1))
    assert not torch.allclose(enc(obs), enc(swapped))


def test_categorical_reconstruction_loss_is_cross_entropy():
    net = SIZES["debug"]
    latent = net.stoch * net.classes
    dec = Decoder(MIXED, net.deter, latent, net.units, net.depth, net.blocks, net.dec_layers,
                  _ops())
    batch = make_batch(MIXED, ActSpace(True, 3), net, 2, 3)
    pred = dec(torch.randn(2, 3, net.deter), torch.randn(2, 3, net.stoch, net.classes))
    assert pred["grid"].shape == (2, 3, 2, 3) and pred["cam_b"].shape == (2, 3, 1, 16, 16)
    losses = dec.loss(pred, {k: batch[k] for k in MIXED})
    want = F.cross_entropy(pred["grid"].reshape(-1, 3), batch["grid"].argmax(-1).reshape(-1),
                           reduction="none").reshape(2, 3, 2).sum(-1)
    torch.testing.assert_close(losses["grid"], want)
    probs = dec.observation("grid", pred["grid"])
    torch.testing.assert_close(probs.sum(-1), torch.ones(2, 3, 2))


@pytest.mark.parametrize("strided", [False, True], ids=["stride1", "strided"])
def test_decoder_learns_every_key_of_a_mixed_space(strided):
    """Two image keys, a vector and a categorical key: each reconstruction loss falls."""
    torch.manual_seed(0)
    net = replace(SIZES["debug"], strided=strided)
    cfg = AgentConfig(batch_size=2, batch_length=4, imag_horizon=3,
                      optim=OptimConfig(lr=1e-3, warmup=0))
    agent = Agent(MIXED, ActSpace(True, 3), net, cfg)
    batch = make_batch(MIXED, ActSpace(True, 3), net, 2, 5)
    # Learnable targets (noise is not): flat images, a fixed vector and class.
    batch["cam_a"].fill_(200)
    batch["cam_b"].fill_(30)
    batch["pos"].fill_(0.7)
    batch["grid"] = F.one_hot(torch.full((2, 5, 2), 2), 3).to(torch.uint8)
    first = {k: float(v) for k, v in _rec(agent, batch).items()}
    for _ in range(30):
        agent.train_step(batch)
    last = _rec(agent, batch)
    assert set(first) == set(MIXED)
    for key in MIXED:
        assert last[key] < 0.9 * first[key], (key, first[key], float(last[key]))


def _rec(agent, batch):
    from dreamer_fast.agent.dists import one_hot

    with torch.no_grad():
        obs = {k: batch[k][:, 1:] for k in agent.obs_space}
        n = agent.net
        deters, stochs, _ = agent.dyn.observe(
            batch["deter"][:, 0].float(), one_hot(batch["stoch"][:, 0].long(), n.classes),
            batch["action"][:, :-1], agent.enc(obs), batch["is_first"][:, 1:])
        return {k: v.mean() for k, v in agent.dec.loss(agent.dec(deters, stochs), obs).items()}


def test_enc_and_dec_keys_select_what_the_model_reads():
    cfg = AgentConfig(batch_size=2, batch_length=4, imag_horizon=3, enc_keys="cam_.*|pos",
                      dec_keys="cam_a")
    agent = Agent(MIXED, ActSpace(True, 3), SIZES["debug"], cfg)
    assert agent.enc.keys.img == ["cam_a", "cam_b"] and agent.enc.keys.mlp == ["pos"]
    assert agent.dec.keys.img == ["cam_a"] and agent.dec.keys.mlp == []
    batch = make_batch(MIXED, ActSpace(True, 3), SIZES["debug"], 2, 5)
    losses, metrics, _ = agent.losses(batch)
    assert sorted(k for k in metrics if k.startswith("loss/rec/")) == ["loss/rec/cam_a"]
    with pytest.raises(ConfigError, match=r"agent.dec_keys='nope' matches none"):
        Agent(MIXED, ActSpace(True, 3), SIZES["debug"], replace(cfg, dec_keys="nope"))


def _ops():
    from dreamer_fast.kernels import get_ops
    return get_ops("ref")


def test_strided_conv_pads_as_xla_same():
    """A centre-tap kernel reads the odd pixels: windows start 1 before the map (XLA's
    'same' for stride 2 on even sides), not 2 (torch's symmetric padding)."""
    conv = StridedConv(1, 1)
    with torch.no_grad():
        conv.weight.zero_()
        conv.weight[0, 0, 2, 2] = 1.0
    x = torch.randn(2, 1, 8, 8)
    torch.testing.assert_close(conv(x), x[..., 1::2, 1::2])
    assert StridedConv(3, 4)(torch.randn(1, 3, 64, 64)).shape == (1, 4, 32, 32)


def test_strided_transposed_conv_equals_the_official_zero_insertion():
    torch.manual_seed(0)
    conv = StridedConvT(3, 5)
    x = torch.randn(2, 3, 4, 6, requires_grad=True)
    y, ref = conv(x), conv.reference(x)
    assert y.shape == (2, 5, 8, 12)
    torch.testing.assert_close(y, ref)
    g = torch.randn_like(y)
    got = torch.autograd.grad(y, (x, conv.weight, conv.bias), g)
    want = torch.autograd.grad(ref, (x, conv.weight, conv.bias), g)
    for a, b in zip(got, want):
        torch.testing.assert_close(a, b)


def _official_size12m_image_params(img_chans=3, res=64, act=18):
    """Parameter count of the official size12m (deter 2048, hidden 256, 32x16 latents, depth
    16, units 256, 8 blocks) on a 64x64 RGB image and 18 discrete actions, from its layout
    (dreamerv3/rssm.py, embodied/jax/nets.py): conv kernels 5x5 with biases, RMS norm scales,
    the strided and the stride-1 variants share every parameter."""
    D, H, S, K, d, U, G, bins = 2048, 256, 32, 16, 16, 256, 8, 255
    lin = lambda i, o: i * o + o  # noqa: E731
    norm = lambda n: n  # noqa: E731
    conv = lambda i, o: 25 * i * o + o  # noqa: E731
    enc, c = 0, img_chans
    for m in (2, 3, 4, 4):
        enc += conv(c, m * d) + norm(m * d)
        c = m * d
    tokens = c * (res // 16) ** 2
    flat = (res // 16) ** 2 * 4 * d
    dec = (G * (D // G) * (flat // G) + flat) + lin(S * K, 2 * U) + norm(2 * U) + \
        lin(2 * U, flat) + norm(4 * d)
    c = 4 * d
    for m in (4, 3, 2):
        dec += conv(c, m * d) + norm(m * d)
        c = m * d
    dec += conv(c, img_chans)
    inp = D + 3 * G * H
    rssm = (lin(D, H) + norm(H)) + (lin(S * K, H) + norm(H)) + (lin(act, H) + norm(H)) + \
        (G * (inp // G) * (D // G) + D + norm(D)) + (G * (D // G) * (3 * D // G) + 3 * D) + \
        (lin(D, H) + norm(H) + lin(H, H) + norm(H) + lin(H, S * K)) + \
        (lin(D + tokens, H) + norm(H) + lin(H, S * K))
    feat = D + S * K
    mlp = lambda n: lin(feat, U) + norm(U) + (n - 1) * (lin(U, U) + norm(U))  # noqa: E731
    heads = (mlp(1) + lin(U, bins)) + (mlp(1) + lin(U, 1)) + (mlp(3) + lin(U, act)) + \
        (mlp(3) + lin(U, bins))
    return enc + dec + rssm + heads


@pytest.mark.parametrize("strided", [False, True], ids=["stride1", "strided"])
def test_size12m_parameter_count_matches_the_official_layout(strided):
    net = replace(SIZES["size12m"], strided=strided)
    agent = Agent({"image": ((3, 64, 64), np.uint8)}, ActSpace(True, 18), net, AgentConfig())
    count = sum(p.numel() for p in agent.trained_parameters())
    assert count == _official_size12m_image_params()


def test_achievements_score_is_the_crafter_geometric_mean():
    assert crafter_score(np.zeros(22)) == pytest.approx(0.0)
    assert crafter_score(np.full(22, 100.0)) == pytest.approx(100.0)
    rates = np.array([50.0, 10.0, 0.0])
    assert crafter_score(rates) == pytest.approx(np.exp(np.log([51, 11, 1]).mean()) - 1)
    import collections
    ach = Achievements(("log/achievement_a", "log/other", "log/achievement_b"))
    rows = collections.deque([np.array([1, 9, 0]), np.array([0, 9, 0]), np.array([2, 0, 1]),
                              np.array([0, 0, 0])])
    out = ach.update(rows)
    assert not rows and out["achievement/a"] == 50.0 and out["achievement/b"] == 25.0
    assert out["achievement/score"] == pytest.approx(crafter_score([50.0, 25.0]))


def test_crafter_env_contract():
    pytest.importorskip("crafter")
    env = make_env("crafter", 1, replace(GYM, time_limit=5))
    assert env.obs_space == {"image": ((3, 64, 64), np.dtype(np.uint8))}
    assert env.act_space == ActSpace(True, 17) and len(env.log_keys) == 22
    env.start()
    step = env.recv()
    assert step["is_first"].all() and step["image"].shape == (1, 3, 64, 64)
    lasts = 0
    for t in range(12):
        env.send(np.full(1, 5), step["env_id"])  # 5 = do (collects what is in front)
        step = env.recv()
        assert all(step[k].shape == (1,) for k in env.log_keys)
        lasts += int(step["is_last"].sum())
        assert not (step["is_last"] & step["is_terminal"]).any()  # time limit: truncation
    assert lasts >= 2
    assert preset_for("crafter") == ("crafter", "Crafter, the official crafter config")


def test_rendered_frames_as_the_observation():
    pytest.importorskip("flappy_bird_gymnasium")
    opts = replace(GYM, render_image=True, obs_keys="image")
    env = make_env("flappy_bird_gymnasium:FlappyBird-v0", 2, opts)
    assert env.obs_space == {"image": ((3, 64, 64), np.dtype(np.uint8))}
    assert env.notes == ["image 512x288x3 -> 64x64x3"]
    env.start()
    step = env.recv()
    env.send(np.zeros(2, np.int64), step["env_id"])
    assert env.recv()["image"].std() > 0
    env.close()
    assert preset_for("flappy_bird_gymnasium:FlappyBird-v0", True)[0] == "vision"


def _run(args, logdir, timeout=300):
    out = subprocess.run([sys.executable, "run.py", *args, "--logdir", str(logdir)], cwd=ROOT,
                         capture_output=True, text=True, timeout=timeout,
                         env=dict(os.environ, PYTHONPATH=os.path.join(ROOT, "tests")))
    assert out.returncode == 0, out.stdout + out.stderr
    return out.stdout


def _metrics(logdir):
    with open(os.path.join(logdir, "metrics.jsonl")) as f:
        return [json.loads(line) for line in f]


def test_crafter_run_logs_achievements_and_score(tmp_path):
    pytest.importorskip("crafter")
    out = _run(["--env", "crafter", "--model", "debug", "--steps", "240", "--num-envs", "2",
                "--env-opts.time-limit", "40", "--train-ratio", "4", "--log-every", "1",
                "--agent.batch-size", "2", "--agent.batch-length", "8",
                "--replay.capacity", "1000"], tmp_path)
    assert "preset crafter (Crafter, the official crafter config; --preset to change)" in out
    rows = [r for r in _metrics(tmp_path) if "achievement/score" in r]
    assert rows, out
    last = rows[-1]
    names = sorted(k for k in last if k.startswith("achievement/") and k != "achievement/score")
    assert len(names) == 22
    assert last["achievement/score"] == pytest.approx(crafter_score([last[k] for k in names]))


def test_flappy_bird_from_pixels_trains_with_a_report_video(tmp_path):
    """A 288x512 phone-style game from its render() frames, no wrapper code."""
    pytest.importorskip("flappy_bird_gymnasium")
    out = _run(["--env", "flappy_bird_gymnasium:FlappyBird-v0", "--env-opts.render-image",
                "--env-opts.obs-keys", "image", "--model", "debug", "--steps", "200",
                "--num-envs", "2", "--train-ratio", "8", "--log-every", "1",
                "--report-every", "1", "--agent.batch-size", "2",
                "--agent.batch-length", "8", "--replay.capacity", "1000"], tmp_path)
    assert "preset vision (Gymnasium, rendered frames; --preset to change)" in out, out
    assert "image 512x288x3 -> 64x64x3" in out
    assert any(f.endswith(".mp4") for f in os.listdir(tmp_path / "reports")), out
    ckpt = torch.load(tmp_path / "checkpoint.pt", weights_only=True)
    assert ckpt["counters"]["updates"] > 0


def test_eval_of_an_image_env_films_the_envs_own_frames(tmp_path):
    """The eval video of a Gymnasium image env is its render() frames at their size, not the
    64x64 view the model reads."""
    import imageio

    env = "image_envs:RenderedImage-v0"
    _run(["--env", env, "--model", "debug", "--steps", "120", "--num-envs", "2",
          "--train-ratio", "4", "--agent.batch-size", "2", "--agent.batch-length", "8",
          "--replay.capacity", "1000"], tmp_path)
    out = _run(["--eval", "--episodes", "1", "--env", env], tmp_path)
    frames = imageio.mimread(str(tmp_path / "eval" / "episode.mp4"))
    assert frames[0].shape == (80, 96, 3) and len(frames) == 21, out

