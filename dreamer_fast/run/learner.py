"""The learner thread: rate-limited replay -> device -> train_step -> latents back.

    limiter.sample() -> ring.sample(B, out=pinned staging[k]) -> annotate is_last
    -> device (non_blocking) -> agent.train_step -> latents to pinned host[k] (async)
    -> ring.write_latents of the previous update (its copy has finished) -> publish weights

Staging is double-buffered: while the device trains on batch i the host may refill the other
buffer; an event per buffer guards reuse. Latents are written back one update late so the
device-to-host copy overlaps the next update instead of stalling on it (replay context only
needs them eventually; write_latents skips steps overwritten meanwhile).
"""

from __future__ import annotations

import threading

import torch

from dreamer_fast.run.clocks import Timer
from dreamer_fast.run.weights import PolicyWeights


def annotate(batch: dict[str, torch.Tensor]) -> None:
    """Mark is_last wherever the next step of the window is is_first (in place; windows
    (B, T+1), or (N, B, T+1) with packed seeds).

    Windows may cross episode boundaries; the step before an is_first is the last step of an
    episode even when the ring stored it otherwise (e.g. it was overwritten or the stream
    restarted after a resume)."""
    batch["is_last"][..., :-1] |= batch["is_first"][..., 1:]


class Learner:
    """Trains the agent on replayed windows at the limiter's pace; one thread.

    `lock` is held around each update (sample, train, write-back, publish), never while
    waiting on the limiter: hold it to pause training (checkpointing, reports).
    Metrics are summed on the device; `pop_metrics` reads and resets them (one host sync).
    """

    def __init__(self, agent, ring, limiter, weights: PolicyWeights, batch_size: int):
        self.agent, self.ring, self.limiter, self.weights = agent, ring, limiter, weights
        self.device = agent.device
        self.batch_size = batch_size
        pin = self.device.type == "cuda"  # pinned once, never per batch
        self.staging = [{k: torch.empty((batch_size, ring.length, *shape), dtype=dtype,
                                        pin_memory=pin) for k, (shape, dtype) in ring.spec.items()}
                        for _ in range(2)]
        self.events: list = [None, None]
        self.pending = None  # (keys, host latents, event) of the last update
        self.graph = None  # graphs.GraphedTrainStep, set before the thread starts
        self.k = 0
        self.updates = 0
        self.lock = threading.Lock()
        self.timer = Timer()
        self.stop = threading.Event()
        self.error: BaseException | None = None
        self._metrics: dict[str, torch.Tensor] = {}
        self._count = 0
        self._metrics_lock = threading.Lock()

    def run(self) -> None:
        """Thread body: one update each time the limiter allows, until stopped or closed."""
        try:
            while not self.stop.is_set():
                if not self.limiter.sample(timeout=0.5):
                    if self.limiter.closed:
                        break
                    continue
                with self.lock:
                    self.update()
        except BaseException as e:  # surfaced by the run loop
            self.error = e
            self.limiter.close()

    def update(self) -> None:
        """One update (the limiter has already counted it)."""
        with self.timer.section("replay"):
            batch, keys = self.load()
        with self.timer.section("train"):
            step = self.graph if self.graph is not None else self.agent.train_step
            metrics, latents = step(batch)  # graphed: static outputs, consumed before the next
            self.accumulate(metrics)
        with self.timer.section("replay"):
            self.write_back()
            self.pending = (keys, self.to_host(latents))
        self.weights.publish()
        self.updates += 1

    def load(self) -> tuple[dict[str, torch.Tensor], torch.Tensor]:
        """Sample B windows into the free staging buffer and move them to the device."""
        k, self.k = self.k, 1 - self.k
        if self.events[k] is not None:
            self.events[k].synchronize()  # the H2D copy of two updates ago has finished
        staging = self.staging[k]
        keys = self.sample_into(staging)
        annotate(staging)
        if self.device.type == "cpu":
            return staging, keys  # not refilled before the next-but-one update
        batch = {key: v.to(self.device, non_blocking=True) for key, v in staging.items()}
        self.events[k] = torch.cuda.Event()
        self.events[k].record()
        return batch, keys

    def to_host(self, latents: dict[str, torch.Tensor]):
        """Start the device-to-host copy of fresh latents; returns (host tensors, event)."""
        if self.device.type == "cpu":
            return latents, None
        host = {k: torch.empty(v.shape, dtype=v.dtype, pin_memory=True)
                for k, v in latents.items()}
        for k, v in latents.items():
            host[k].copy_(v, non_blocking=True)
        event = torch.cuda.Event()
        event.record()
        return host, event

    def write_back(self) -> None:
        """Write the previous update's latents into the ring."""
        if self.pending is None:
            return
        keys, (host, event) = self.pending
        if event is not None:
            event.synchronize()
        self.write_latents(keys, host)
        self.pending = None

    def sample_into(self, staging: dict[str, torch.Tensor]):
        """Fill the staging buffers with B windows of the ring; returns their keys (packed
        seeds: a batch per seed's ring, run/packed.PackedLearner)."""
        return self.ring.sample(self.batch_size, out=staging)[1]

    def write_latents(self, keys, host: dict[str, torch.Tensor]) -> None:
        """Write an update's fresh latents back into the ring (sample_into's keys)."""
        self.ring.write_latents(keys, host)

    def accumulate(self, metrics: dict[str, torch.Tensor]) -> None:
        with self._metrics_lock:
            for k, v in metrics.items():
                v = v.detach().float()
                self._metrics[k] = self._metrics[k] + v if k in self._metrics else v.clone()
            self._count += 1

    def pop_metrics(self) -> dict[str, float]:
        """Mean of every metric since the last call (host sync: call on the log clock)."""
        with self._metrics_lock:
            metrics, count = self._metrics, self._count
            self._metrics, self._count = {}, 0
        if not count:
            return {}
        values = torch.stack(list(metrics.values())).cpu() / count  # deliberate sync
        return dict(zip(metrics, values.tolist()))

    def last_batch(self, n: int) -> dict[str, torch.Tensor] | None:
        """The first n windows of the last trained batch, on the device (hold `lock`)."""
        if not self.updates:
            return None
        staging = self.staging[1 - self.k]
        return {k: v[:n].to(self.device) for k, v in staging.items()}

    def finish(self) -> None:
        """Flush the last pending latent write-back (call with the thread stopped)."""
        with self.lock:
            self.write_back()

    def catch_up(self) -> int:
        """After the actor stopped: train until the learner is within one update of
        train_ratio x (inserted - min_inserts). Returns the updates done."""
        done = 0
        while self.limiter.stats()["lag"] + self.limiter.batch_steps <= 0:
            if not self.limiter.sample(timeout=0):
                break
            with self.lock:
                self.update()
            done += 1
        return done
