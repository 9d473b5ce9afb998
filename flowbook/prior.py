"""The standard normal prior of every flow in flowbook."""
import math

import torch

_LOG_2PI = math.log(2 * math.pi)


def gaussian_log_prob(z: torch.Tensor) -> torch.Tensor:
    """log N(z; 0, I) summed over all but the batch dimension.

    z: [B, ...] -> [B], in z's dtype and on z's device.
    """
    return (-0.5 * (z * z + _LOG_2PI)).flatten(1).sum(dim=1)
