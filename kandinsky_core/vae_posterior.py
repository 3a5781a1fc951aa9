"""The latent both VAEs take from their encoder's moments: a diagonal Gaussian's mean, or a draw from it."""

import torch
from torch import Tensor


def posterior_latent(moments: Tensor, sample: bool = False, generator: torch.Generator | None = None) -> Tensor:
    """The mean of the posterior whose [mean, log-variance] halves are `moments` (split on dim 1), or with `sample`
    mean + std * noise, the noise drawn as diffusers draws it: on the generator's device, in the latent dtype."""
    mean, logvar = moments.chunk(2, dim=1)
    if not sample:
        return mean
    std = torch.exp(0.5 * logvar.clamp(-30.0, 20.0))
    noise_device = generator.device if generator is not None else mean.device
    noise = torch.randn(mean.shape, generator=generator, device=noise_device, dtype=mean.dtype)
    return mean + std * noise.to(mean.device)
