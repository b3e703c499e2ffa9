"""Process-wide numeric settings that are not DeepSpeed's: TF32 for fp32 matmuls and convolutions."""

from __future__ import annotations

import torch


def set_tf32(enabled: bool) -> None:
    """TF32 tensor cores for fp32 matmuls and convolutions (Ampere and later GPUs; no effect elsewhere).

    PyTorch recommends it for training, but its default keeps matmuls in full fp32 (while cuDNN's
    convolutions already use TF32). Measurements that need full precision (a study's Hessian) turn
    it off for both.
    """
    precision = "tf32" if enabled else "ieee"
    if hasattr(torch.backends.cuda.matmul, "fp32_precision"):  # PyTorch 2.9 and later
        torch.backends.cuda.matmul.fp32_precision = precision
        torch.backends.cudnn.conv.fp32_precision = precision
    else:
        torch.backends.cuda.matmul.allow_tf32 = enabled
        torch.backends.cudnn.allow_tf32 = enabled
