"""What the user sees: a live progress line, TensorBoard scalars/images, metrics.jsonl, videos.

Scalars go to TensorBoard (torch.utils.tensorboard) and, one JSON object per log, to
<logdir>/metrics.jsonl. Videos (open-loop reports, evaluation episodes) are mp4 files under
<logdir> and TensorBoard video summaries: animated GIFs in the Images tab, the format
TensorBoard's own add_video writes (encoded here with Pillow, so moviepy is not needed).
"""

from __future__ import annotations

import json
import math
import os
import sys
import threading
import time

import numpy as np
import torch


def _quiet_event_writer(args) -> None:
    """threading.excepthook: TensorBoard's event-writer thread re-raises a failed write (a
    full disk) to print it; the Logger already reports it in one line (the thread's error
    surfaces again at the next flush), so its traceback is not printed."""
    if type(args.thread).__name__ == "_AsyncWriterThread" and isinstance(args.exc_value,
                                                                          OSError):
        return
    _EXCEPTHOOK(args)


_EXCEPTHOOK = threading.excepthook


def check_wandb() -> None:
    """ConfigError naming the install command when --track cannot import wandb."""
    try:
        import wandb  # noqa: F401
    except ImportError:
        from dreamer_fast.checks import ConfigError

        raise ConfigError("--track logs to Weights & Biases, which is not installed: pip "
                          "install wandb (or pip install -e '.[wandb]'), or drop --track") from None


class Logger:
    """Writes scalars to TensorBoard and metrics.jsonl (and W&B with `cfg.track`); prints the
    progress line.

    enabled=False (data-parallel ranks > 0: rank 0 alone logs) makes every method a no-op.
    cfg (a Config with track set): the same scalars and videos go to a W&B run named
    cfg.name (else the logdir's name), resumed with the run (its id is `run_id`)."""

    def __init__(self, logdir: str, enabled: bool = True, cfg=None, run_id: str | None = None):
        self.logdir, self.enabled = logdir, enabled
        self.fields: dict[str, str] = {}  # written with every metrics.jsonl row (update_mode)
        self.tty = sys.stdout.isatty()
        self.wandb = None
        if not enabled:
            return
        self.failing = False
        threading.excepthook = _quiet_event_writer
        self.writer = self._tensorboard()
        self.jsonl = open(os.path.join(logdir, "metrics.jsonl"), "a")
        if cfg is not None and cfg.track:
            check_wandb()
            import dataclasses

            import wandb

            self.wandb = wandb.init(
                project=cfg.wandb_project, entity=cfg.wandb_entity,
                name=cfg.name or os.path.basename(os.path.abspath(logdir)), dir=logdir,
                config=dataclasses.asdict(cfg), id=run_id, resume="allow")

    def scalars(self, step: int, values: dict[str, float]) -> None:
        """One log row to W&B, TensorBoard and metrics.jsonl. A write the disk refuses (full,
        gone read-only) loses this row only: one line says so, the run goes on, and the next
        row tries again (a fresh TensorBoard event file)."""
        if not self.enabled:
            return
        try:
            if self.wandb is not None:
                self.wandb.log({k: float(v) for k, v in values.items()}, step=step)
            if self.writer is None:
                self.writer = self._tensorboard()
            for k, v in values.items():
                self.writer.add_scalar(k, v, step)
            row = {"step": step, "time": time.time(), **self.fields,
                   **{k: float(v) for k, v in values.items()}}
            self.jsonl.write(json.dumps(row) + "\n")
            self.jsonl.flush()
            self.writer.flush()
        except OSError as e:
            self._lost(f"the log row at step {step:,}", e)
            return
        self.failing = False

    def _tensorboard(self):
        from torch.utils.tensorboard import SummaryWriter

        return SummaryWriter(self.logdir)

    def _lost(self, what: str, e: OSError) -> None:
        """A write that failed: say it once per run of failures; drop the broken writers."""
        if not self.failing:
            self.message(f"warning: {what} was not written ({e.strerror or e}); training goes "
                         "on, and each later log tries again")
        self.failing = True
        try:
            if self.writer is not None:
                self.writer.close()
        except Exception:  # noqa: BLE001 (a writer broken by the same error)
            pass
        self.writer = None

    def progress(self, line: str, final: bool = False) -> None:
        """A live line on a terminal (carriage return); a plain line per call otherwise."""
        if not self.enabled:
            return
        if self.tty:
            sys.stdout.write("\r" + line.ljust(110)[:160] + ("\n" if final else ""))
        else:
            sys.stdout.write(line + "\n")
        sys.stdout.flush()

    def message(self, text: str) -> None:
        if not self.enabled:
            return
        if self.tty:
            sys.stdout.write("\n")
        print(text, flush=True)

    def video(self, step: int, name: str, frames: np.ndarray, fps: int = 16,
              path: str | None = None) -> str | None:
        """frames (T, H, W, C) uint8 -> an mp4 (default <logdir>/reports/<name>-<step>.mp4)
        and a TensorBoard video summary `name` of the first TB_VIDEO_FRAMES frames. Returns
        the mp4's path, or None when it could not be written (no ffmpeg, a full disk): one
        line says why, and the run goes on."""
        if path is None:
            path = os.path.join(self.logdir, "reports", f"{name.replace('/', '_')}-{step}.mp4")
        frames = displayable(frames)
        if self.enabled and self.writer is not None:
            try:
                self.writer._get_file_writer().add_summary(
                    video_summary(name, frames[:TB_VIDEO_FRAMES], fps), step)
                self.writer.flush()
            except OSError as e:
                self._lost(f"the TensorBoard video {name} at step {step:,}", e)
        try:
            os.makedirs(os.path.dirname(path) or ".", exist_ok=True)
            write_mp4(path, frames, fps=fps)
        except Exception as e:  # noqa: BLE001 (a video is never worth a run)
            self.message(f"video {name} at step {step} not written ({type(e).__name__}: "
                         f"{str(e).splitlines()[0][:150] if str(e) else ''}); training goes on")
            if os.path.exists(path):
                os.remove(path)
            path = None
        if self.wandb is not None and path is not None:
            import wandb

            # From the mp4 file: raw frames would need moviepy to encode.
            self.wandb.log({name: wandb.Video(path, format="mp4")}, step=step)
        return path

    def close(self) -> None:
        """Close the writers; what they could not flush (a full disk) is said, not raised."""
        if not self.enabled:
            return
        for close in (lambda: self.writer is not None and self.writer.close(), self.jsonl.close,
                      lambda: self.wandb is not None and self.wandb.finish()):
            try:
                close()
            except OSError as e:
                self._lost("the last log rows", e)


TB_VIDEO_FRAMES = 500
"""Frames of a video kept in TensorBoard (the mp4 keeps all): a long episode's GIF would be
tens of MB in the event file."""


def video_summary(tag: str, frames: np.ndarray, fps: int):
    """A TensorBoard video summary: (T, H, W, 3) uint8 frames as one animated GIF image."""
    import io

    from PIL import Image
    from tensorboard.compat.proto.summary_pb2 import Summary

    images = [Image.fromarray(f) for f in frames]
    buf = io.BytesIO()
    images[0].save(buf, format="GIF", save_all=True, append_images=images[1:],
                   duration=max(1, round(1000 / fps)), loop=0)
    T, H, W, C = frames.shape
    image = Summary.Image(height=H, width=W, colorspace=C, encoded_image_string=buf.getvalue())
    return Summary(value=[Summary.Value(tag=tag, image=image)])


def displayable(frames: np.ndarray) -> np.ndarray:
    """(..., C) uint8 frames of 1 to 4 channels -> RGB: gray repeated, the first of two
    channels as gray, RGBA without its alpha."""
    frames = np.asarray(frames, np.uint8)
    if frames.shape[-1] in (1, 2):
        return np.repeat(frames[..., :1], 3, -1)
    return frames[..., :3]


def write_mp4(path: str, frames: np.ndarray, fps: int = 16) -> None:
    """frames (T, H, W, C) uint8, C in 1..4 (see `displayable`); sides padded to multiples
    of 16 for codecs."""
    import imageio

    frames = displayable(frames)
    T, H, W, _ = frames.shape
    pad = ((0, 0), (0, -H % 16), (0, -W % 16), (0, 0))
    imageio.mimwrite(path, np.pad(frames, pad), fps=fps, macro_block_size=1)


def openloop_frames(truth: torch.Tensor, model: torch.Tensor) -> np.ndarray:
    """Report video: truth (B, T, C, H, W) in [0, 1] and model -> (T, 3H, B*W, C) uint8.

    Rows: real frames, predicted frames, and their absolute error; one column per sequence."""
    err = (truth - model).abs()
    grid = torch.cat([truth, model, err], 3)                  # B, T, C, 3H, W
    grid = grid.permute(1, 3, 0, 4, 2)                        # T, 3H, B, W, C
    T, H3, B, W, C = grid.shape
    grid = grid.reshape(T, H3, B * W, C)
    return (grid.clamp(0, 1) * 255).round().to(torch.uint8).cpu().numpy()


def format_progress(steps: int, total: int, rates: dict, fill: float,
                    score: float | None, eta_rate: float | None) -> str:
    """One progress line: agent steps, env steps/s, updates/s, replay fill, return, time left.

    rates: smoothed steps_per_s and updates_per_s (HeldRate.rates). eta_rate: the agent
    steps/s the time left is computed from (HeldRate.eta_rate); None while unknown (before
    the first update the actor runs at its unthrottled prefill speed) shows `left ?`."""
    sps = rates.get("steps_per_s", 0.0)
    left = max(0, total - steps) / eta_rate if eta_rate else math.inf
    score_text = "-" if score is None else f"{score:.1f}"
    end = (f"left {format_duration(left)}" if steps < total else
           "all steps taken: the last updates they are owed")
    return (f"step {steps:,}/{total:,} | {sps:,.0f} env steps/s (last min) | "
            f"{rates.get('updates_per_s', 0.0):.2f} updates/s | replay {fill:.0%} | "
            f"return {score_text} | {end}")


def format_duration(seconds: float) -> str:
    if not math.isfinite(seconds):
        return "?"
    seconds = int(seconds)
    d, rem = divmod(seconds, 86400)
    h, rem = divmod(rem, 3600)
    if d:
        return f"{d}d{h:02d}h"
    return f"{h}h{rem // 60:02d}m" if h else f"{rem // 60}m{rem % 60:02d}s"
