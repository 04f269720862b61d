"""The policy weights the learner hands the actor: two copies of the acting modules, written
by the learner into the inactive one and flipped, so the actor never reads a half-written set
and the learner never waits for the actor (the hand-off of the module docstring of actor.py).
"""

from __future__ import annotations

import copy
import threading

import torch
from torch import nn

from dreamer_fast.agent.agent import Agent

POLICY_MODULES = ("enc", "dyn", "pol")


class Policy(nn.Module):
    """The acting part of an Agent (enc, dyn, pol); shares Agent's policy_step code."""

    def __init__(self, agent: Agent):
        super().__init__()
        self.net, self.act_space = agent.net, agent.act_space
        self.autocast_dtype = agent.autocast_dtype
        self.autocast_cache = agent.autocast_cache
        for name in POLICY_MODULES:
            setattr(self, name, copy.deepcopy(getattr(agent, name)).requires_grad_(False))
        self.register_buffer("anchor", torch.zeros((), device=agent.device))

    @property
    def device(self) -> torch.device:
        return self.anchor.device

    feat = Agent.feat
    initial_carry = Agent.initial_carry
    autocast = Agent.autocast
    policy_step = Agent.policy_step


class PolicyWeights:
    """Two Policy copies; the learner publishes into the inactive one, then flips `index`.

    Each copy has a lock held while it is read (actor) or written (learner). The learner only
    try-locks: if the actor still holds the inactive copy (it grabbed it just before a flip),
    that publish is skipped and the next update publishes instead. On CUDA an event recorded
    after the copy orders the actor's kernels after it, whatever streams the threads use.
    """

    def __init__(self, agent: Agent):
        self.copies = [Policy(agent), Policy(agent)]
        self.locks = [threading.Lock(), threading.Lock()]
        self.events = [None, None]
        self.index = 0
        self.published = self.skipped = 0
        self._src = [p for n in POLICY_MODULES for p in getattr(agent, n).state_dict().values()]
        self._dst = [[t for n in POLICY_MODULES for t in getattr(c, n).state_dict().values()]
                     for c in self.copies]

    def publish(self) -> bool:
        """Learner: copy the agent's current policy weights into the inactive copy, flip."""
        i = 1 - self.index
        if not self.locks[i].acquire(blocking=False):
            self.skipped += 1
            return False
        try:
            with torch.no_grad():
                torch._foreach_copy_(self._dst[i], self._src)
            if self._src[0].is_cuda:
                self.events[i] = torch.cuda.Event()
                self.events[i].record()
            self.index = i  # flip only after the copy is complete (enqueued, with its event)
            self.published += 1
        finally:
            self.locks[i].release()
        return True

    def acquire(self) -> tuple[Policy, threading.Lock]:
        """Actor: lock the active copy (re-checking the index after locking) and return it."""
        while True:
            i = self.index
            self.locks[i].acquire()
            if i == self.index:
                if self.events[i] is not None:
                    torch.cuda.current_stream().wait_event(self.events[i])
                return self.copies[i], self.locks[i]
            self.locks[i].release()
