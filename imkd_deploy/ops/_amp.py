"""Mixed precision for the imkd torch.library ops."""

from __future__ import annotations

import torch


def fp32_under_autocast(qualname: str) -> None:
    """Run the op in fp32 inside autocast (CUDA training uses bf16 AMP).

    Without this AMP hands the op bf16 activations beside fp32 parameters, which the analytic
    backwards would mix, and the sparse kernels have no bf16 form on the CPU. Both ops are cheap
    next to the convolutions around them, and their sums over many points want fp32 anyway.
    """
    for device in ("cuda", "cpu"):
        torch.library.register_autocast(qualname, device, torch.float32)
