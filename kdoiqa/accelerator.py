"""Every CUDA-only decision and call of the library, behind one object.

Code that behaves differently on a GPU asks `ACCELERATOR` rather than testing `device.type` itself:
whether a device takes the accelerator's paths (`takes`), a canonical device (`canonical`: always
an indexed `cuda:N`, so that two names of one GPU compare equal), pinned host buffers and
non-blocking copies (`empty_pinned`, `to_device`), the GPU's free memory, compute capability and
count. On a machine with a GPU these are CUDA's own answers.

`simulated()` lets a test on a machine without a GPU run the same branches: inside it, CPU tensors
take every accelerator path (the GPU pixel cache, pinned and non-blocking copies, autocast's dtype
by compute capability, loss scaling, fused Adam, channels_last, the cuDNN/TF32/determinism
switches), pinning is counted instead of done (a CPU-only machine cannot pin), and the free
memory, capability and GPU count are the values the test gives. tests/README.md lists each
CUDA-only place and the test that executes it.
"""
from __future__ import annotations

import contextlib
from collections.abc import Iterator
from dataclasses import dataclass, field

import torch


@dataclass
class Simulation:
    """What a simulated accelerator answers, and what the code asked of it (for the tests' asserts)."""

    free_memory: int = 80 * 2**30
    capability: tuple[int, int] = (9, 0)
    device_count: int = 1
    pinned: int = 0                       # host buffers that would have been pinned
    non_blocking_copies: int = 0          # host-to-device copies made non-blocking
    calls: list[str] = field(default_factory=list)


class Accelerator:
    """The CUDA paths of the library (see the module's docstring)."""

    def __init__(self) -> None:
        self.simulation: Simulation | None = None

    # -- which path ------------------------------------------------------------------------------
    def takes(self, device: torch.device) -> bool:
        """Whether `device` takes the accelerator's paths: a CUDA device (or, simulated, the CPU)."""
        return device.type == "cuda" or (self.simulation is not None and device.type == "cpu")

    @staticmethod
    def canonical(device: torch.device | str) -> torch.device:
        """`device` with its index: `cuda` is the current GPU, `cuda:N`; other devices as they are.

        torch.device("cuda") != torch.device("cuda:0") although a tensor made on the first reports the
        second: every device the library keeps is canonical, and no branch compares device objects."""
        device = torch.device(device)
        if device.type == "cuda" and device.index is None:
            return torch.device("cuda", torch.cuda.current_device() if torch.cuda.is_available() else 0)
        return device

    # -- host memory and copies ------------------------------------------------------------------
    def empty_pinned(self, shape: tuple[int, ...], dtype: torch.dtype, device: torch.device) -> torch.Tensor:
        """A host buffer for a batch bound for `device`: pinned (page-locked) when the device takes the
        accelerator's paths, so that its copy runs asynchronously. PyTorch's caching host allocator keeps
        a pinned block until the copies that read it have finished, so a new buffer per batch is safe."""
        if not self.takes(device):
            return torch.empty(shape, dtype=dtype)
        if self.simulation is not None and device.type == "cpu":
            self.simulation.pinned += 1
            return torch.empty(shape, dtype=dtype)
        return torch.empty(shape, dtype=dtype, pin_memory=True)

    def to_device(self, tensor: torch.Tensor, device: torch.device) -> torch.Tensor:
        """`tensor` on `device`: from pinned host memory without blocking on an accelerator."""
        if not self.takes(device) or tensor.device.type != "cpu":
            return tensor.to(device)
        if self.simulation is not None and device.type == "cpu":
            self.simulation.pinned += int(not tensor.is_pinned())
            self.simulation.non_blocking_copies += 1
            return tensor.to(device, non_blocking=True)
        if not tensor.is_pinned():
            tensor = tensor.pin_memory()
        return tensor.to(device, non_blocking=True)

    def loader_pins(self, device: torch.device) -> bool:
        """Whether a DataLoader feeding `device` pins its batches (only a real GPU can)."""
        return device.type == "cuda"

    # -- what the GPU is -------------------------------------------------------------------------
    def free_memory(self, device: torch.device) -> int:
        if self.simulation is not None and device.type == "cpu":
            self.simulation.calls.append("free_memory")
            return self.simulation.free_memory
        return int(torch.cuda.mem_get_info(device)[0])

    def capability(self, device: torch.device) -> tuple[int, int]:
        if self.simulation is not None and device.type == "cpu":
            self.simulation.calls.append("capability")
            return self.simulation.capability
        return tuple(torch.cuda.get_device_capability(device))

    def device_count(self) -> int:
        if self.simulation is not None:
            return self.simulation.device_count
        return torch.cuda.device_count()

    def set_device(self, device: torch.device) -> None:
        if device.type == "cuda":
            torch.cuda.set_device(device)

    @contextlib.contextmanager
    def simulated(self, **answers) -> Iterator[Simulation]:
        """Within the block CPU tensors take the accelerator's paths (tests; see the module's docstring)."""
        previous, self.simulation = self.simulation, Simulation(**answers)
        try:
            yield self.simulation
        finally:
            self.simulation = previous


ACCELERATOR = Accelerator()


def process_group_backend(device: torch.device, gpu_sharers: int) -> str:
    """NCCL when each process has a GPU of its own; gloo on CPUs and for processes sharing a GPU."""
    return "nccl" if device.type == "cuda" and gpu_sharers == 1 else "gloo"
