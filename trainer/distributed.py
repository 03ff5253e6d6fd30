"""Where collective tensors must live: the GPU under NCCL, the CPU under gloo."""
from __future__ import annotations

import torch
import torch.distributed as dist


def comm_device() -> torch.device:
    return torch.device("cuda", torch.cuda.current_device()) if dist.get_backend() == "nccl" else torch.device("cpu")
