"""What a CUDA graph capture rejects, checked on a machine without a GPU.

A capture records the GPU work a callable enqueues and replays it later without Python. So
it rejects (an error at capture) or silently freezes (a wrong replay) whatever makes the host
take part in an update. The rules, from PyTorch's "CUDA semantics: CUDA Graphs, Constraints"
(docs.pytorch.org/docs/stable/notes/cuda.html#constraints), NVIDIA's CUDA Graphs guide for
PyTorch ("Quick Checklist", docs.nvidia.com/dl-cuda-graph) and the CUDA Programming Guide's
stream-capture rules (prohibited: synchronous calls, stream/event queries and syncs, copies
from pageable host memory, which are synchronous):

1. device-to-host reads: `.item()`, `.tolist()`, `bool(tensor)`, `nonzero`, boolean-mask
   indexing, `unique`, a copy to the CPU (the host waits for the device);
2. host-to-device data: `torch.tensor` / `torch.as_tensor` / `torch.from_numpy` of host data,
   `lift_fresh`, a copy from a CPU tensor to the device, a CPU tensor mixed into a device op
   (indexing with a list, a 0-d CPU tensor: captured as a constant, silently stale later);
3. pinned memory allocated or queried (a hidden event query);
4. RNG reseeding or a non-default generator (`manual_seed`, `set_rng_state`, `generator=`):
   a replay advances only the default generator's registered Philox offset;
5. explicit syncs and queries (`torch.cuda.synchronize`, `Stream/Event.synchronize`,
   `.query()`, `empty_cache`).

`CaptureCheck` raises AssertionError at the first op that breaks one of these, naming the op and
the rule. `python_state` snapshots every non-tensor attribute (rule: what changes between
updates must be a device tensor, or a replay repeats the captured value).

Run the same callable twice: on the CPU (the host trace: rules 1, 3, 4, 5 and tensor creation
from host data) and on the stand-in device: every tensor a fake tensor (PyTorch's
FakeTensorMode: shapes and dtypes, no data) on the `meta` device, which plays the GPU. There a
CPU tensor is "the host", so a copy to the device or a tensor left on the CPU shows (rule 2),
and the Triton ops take their GPU registration (`torch.library.triton_op`, launches traced,
not run) when TRITON_INTERPRET is unset. Fake tensors cannot play CUDA itself on a CPU-only
build (indexing a fake CUDA tensor needs CUDA's device guard: "PyTorch is not linked with
support for cuda devices"), hence the meta device. What neither trace can see is the GPU's
own behaviour: the kernels' values and launch limits, memory, bfloat16 autocast on CUDA.
"""

from __future__ import annotations

import contextlib
import os
import traceback
import weakref

import torch
from torch._subclasses.fake_tensor import FakeTensorMode
from torch.overrides import TorchFunctionMode
from torch.utils._python_dispatch import TorchDispatchMode
from torch.utils._pytree import tree_leaves

SYNC = {"_local_scalar_dense", "item", "nonzero", "is_nonzero", "equal", "masked_select",
        "_unique", "_unique2", "unique_dim", "unique_consecutive", "bincount", "argwhere",
        "allclose", "_assert_async_msg"}
"""Ops whose result the host must wait for (rule 1)."""
PINNED = {"_pin_memory", "pin_memory", "is_pinned"}
HOST_DATA = {"lift_fresh", "lift_fresh_copy"}
COPIES = {"_to_copy", "copy_", "copy", "to"}
SEEDING = [("torch", "manual_seed"), ("torch", "seed"), ("torch", "set_rng_state"),
           ("torch.random", "manual_seed"), ("torch.random", "set_rng_state"),
           ("torch.cuda", "manual_seed"), ("torch.cuda", "manual_seed_all"),
           ("torch.cuda", "seed"), ("torch.cuda", "seed_all"), ("torch.cuda", "set_rng_state"),
           ("torch.cuda", "set_rng_state_all")]
SYNCING = [("torch.cuda", "synchronize"), ("torch.cuda", "empty_cache"),
           ("torch.cuda.Stream", "synchronize"), ("torch.cuda.Stream", "query"),
           ("torch.cuda.Event", "synchronize"), ("torch.cuda.Event", "query"),
           ("torch.Tensor", "tolist"), ("torch.Tensor", "numpy"), ("torch", "from_numpy")]
"""Python-level calls a capture rejects (rules 1, 2, 4, 5): replaced by a failing stand-in
while the check runs."""


def _where(func) -> str:
    return getattr(func, "__name__", str(func))


class _FunctionRules(TorchFunctionMode):
    """Rule 2 at the torch-function level: tensors built from host data (Python lists,
    numbers, numpy arrays) never reach the dispatcher as an op a dispatch mode sees."""

    def __torch_function__(self, func, types, args=(), kwargs=None):
        kwargs = kwargs or {}
        if func in (torch.tensor, torch.as_tensor) and args and not isinstance(
                args[0], torch.Tensor):
            raise AssertionError(f"capture breaker (rule 2, host-to-device data): "
                                 f"torch.{_where(func)}({type(args[0]).__name__} ...) inside a "
                                 f"graphed step, at {_caller()}; make it a device buffer at "
                                 "construction")
        return func(*args, **kwargs)


class _DispatchRules(TorchDispatchMode):
    def __init__(self):
        super().__init__()
        self.constants = weakref.WeakSet()  # Python numbers vmap made tensors (0-d, CPU)

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        kwargs = kwargs or {}
        name = func.overloadpacket.__name__
        tensors = [t for t in tree_leaves((args, kwargs)) if isinstance(t, torch.Tensor)]
        devices = {t.device.type for t in tensors}
        where = f"{func} on {sorted(devices) or ['no tensor']}"
        if name in SYNC:
            self.fail(1, "device-to-host read", where)
        if name in ("index", "index_put", "index_put_") and any(
                isinstance(i, torch.Tensor) and i.dtype == torch.bool
                for i in args[1] if i is not None):
            self.fail(1, "device-to-host read (a boolean mask index runs nonzero)", where)
        if name in PINNED or kwargs.get("pin_memory"):
            self.fail(3, "pinned memory allocated or queried", where)
        if name in HOST_DATA:
            self.fail(2, "host-to-device data (a tensor made from host data)", where)
        if kwargs.get("generator") is not None:
            self.fail(4, "a non-default generator", where)
        if name in COPIES:
            src = args[1] if name == "copy_" else args[0]
            if not isinstance(src, torch.Tensor):  # vmap (packed seeds) lifting a Python
                out = func(*args, **kwargs)  # number: a constant, passed to the kernels
                self.constants.add(out)  # as a scalar, as outside vmap
                return out
            dst = args[0].device if name == "copy_" else kwargs.get("device") or src.device
            dst = torch.device(dst)
            if src.device.type == "cpu" and dst.type != "cpu":
                self.fail(2, "host-to-device copy", where)
            if src.device.type != "cpu" and dst.type == "cpu":
                self.fail(1, "device-to-host copy", where)
        elif "cpu" in {t.device.type for t in tensors if t not in self.constants} and len(
                devices) > 1:
            self.fail(2, "a CPU tensor mixed into a device op (copied or baked in as a "
                         "constant at capture)", where)
        try:
            return func(*args, **kwargs)
        except AssertionError as e:  # the stand-in's fake mode met a tensor it did not make
            if "convert all Tensors to FakeTensors" not in str(e):
                raise
            self.fail(2, "a tensor made on the device from host data, e.g. by indexing with a "
                         "Python list", where)

    @staticmethod
    def fail(rule: int, what: str, where: str):
        raise AssertionError(f"capture breaker (rule {rule}, {what}): {where}, at {_caller()}")


def _caller() -> str:
    """The innermost frame of the project's code (the line to fix)."""
    ours = [f for f in traceback.extract_stack()[:-2]
            if ("dreamer_fast" in f.filename or f"kernels{os.sep}" in f.filename)]
    if not ours:
        return "?"
    f = ours[-1]
    return f"{os.path.relpath(f.filename)}:{f.lineno} ({f.line})"


def _refuse(rule: int, what: str, name: str):
    def refused(*args, **kwargs):
        raise AssertionError(f"capture breaker (rule {rule}, {what}): {name} inside a "
                             f"graphed step, at {_caller()}")
    return refused


def _owners() -> dict:
    return {"torch": torch, "torch.random": torch.random, "torch.cuda": torch.cuda,
            "torch.cuda.Stream": torch.cuda.Stream, "torch.cuda.Event": torch.cuda.Event,
            "torch.Tensor": torch.Tensor}


@contextlib.contextmanager
def CaptureCheck():
    """Within: any op or call a CUDA graph capture rejects raises AssertionError."""
    owners, patched = _owners(), []
    for rule, what, names in ((4, "RNG reseeding", SEEDING), (5, "sync or query", SYNCING)):
        for path, attr in names:
            owner = owners[path]
            if hasattr(owner, attr):
                patched.append((owner, attr, getattr(owner, attr)))
                setattr(owner, attr, _refuse(rule, what, f"{path}.{attr}"))
    # Outside the check (warm-up, as before a capture) the stand-in may lift host constants
    # to the device; inside, a tensor it did not make is a breaker (rule 2).
    lenient = _MODE is not None and _MODE.allow_non_fake_inputs
    if _MODE is not None:
        _MODE.allow_non_fake_inputs = False
    try:
        with _FunctionRules(), _DispatchRules():
            yield
    finally:
        for owner, attr, value in reversed(patched):
            setattr(owner, attr, value)
        if _MODE is not None:
            _MODE.allow_non_fake_inputs = lenient


_MODE: FakeTensorMode | None = None


def stand_in_mode() -> FakeTensorMode:
    """The one fake-tensor mode of every stand-in trace (fakes of two modes cannot meet)."""
    global _MODE
    if _MODE is None:
        _MODE = FakeTensorMode(allow_non_fake_inputs=True)
    return _MODE


def fake(t: torch.Tensor) -> torch.Tensor:
    """t as a fake tensor on the meta device (shape, dtype and strides; no data)."""
    return stand_in_mode().from_tensor(t.detach().to("meta"))


def module_to_stand_in(module: torch.nn.Module) -> None:
    """Every parameter and buffer of module as a fake meta tensor, in place."""
    for m in module.modules():
        for k, p in list(m._parameters.items()):
            if p is not None:
                m._parameters[k] = torch.nn.Parameter(fake(p), requires_grad=p.requires_grad)
        for k, b in list(m._buffers.items()):
            if b is not None:
                m._buffers[k] = fake(b)


def agent_to_stand_in(agent) -> None:
    """An Agent with its optimizer state on the stand-in device."""
    module_to_stand_in(agent)
    opt = agent.opt
    opt.params = agent.trained_parameters()
    opt.count, opt.lr = fake(opt.count), fake(opt.lr)
    opt.nu, opt.mu = [fake(t) for t in opt.nu], [fake(t) for t in opt.mu]


@contextlib.contextmanager
def stand_in():
    """Run the stand-in trace: fake-tensor mode on; on exit the kernels' per-device caches
    forget the fake meta tensors it made (real meta tensors must not meet them later)."""
    from dreamer_fast.kernels import twohot

    try:
        with stand_in_mode():
            yield
    finally:
        for key in [k for k in twohot._BINS if k[1].type == "meta"]:
            del twohot._BINS[key]


def python_state(obj, seen=None, prefix="") -> dict:
    """Every non-tensor attribute reachable from obj (modules, optimizer, configs, ops)."""
    seen = set() if seen is None else seen
    if id(obj) in seen:
        return {}
    seen.add(id(obj))
    out = {}
    attrs = vars(obj) if hasattr(obj, "__dict__") else {}
    for k, v in attrs.items():
        if k in ("_parameters", "_buffers", "_forward_pre_hooks", "_forward_hooks",
                 "_backward_hooks", "_state_dict_hooks", "_load_state_dict_pre_hooks"):
            continue
        if isinstance(v, torch.Tensor):
            continue  # device state, not Python state
        if isinstance(v, (list, dict)) and v and all(
                isinstance(x, torch.Tensor) or (isinstance(x, tuple) and all(
                    isinstance(y, torch.Tensor) for y in x))
                for x in (v.values() if isinstance(v, dict) else v)):
            # Containers of device state: their values may change, but not which tensors
            # they hold (a graph replays on the tensors it captured).
            items = v.items() if isinstance(v, dict) else enumerate(v)
            out[prefix + k] = repr([(key, id(x) if isinstance(x, torch.Tensor) else
                                     tuple(id(y) for y in x)) for key, x in items])
            continue
        if isinstance(v, dict) and k == "_modules":
            for name, m in v.items():
                out.update(python_state(m, seen, f"{prefix}{name}."))
        elif isinstance(v, torch.nn.Module) or type(v).__module__.startswith("dreamer_fast"):
            out.update(python_state(v, seen, f"{prefix}{k}."))
        else:
            out[prefix + k] = repr(v)
    return out
