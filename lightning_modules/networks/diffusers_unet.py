"""A diffusers `UNet2DModel` behind this framework's network signature, so a sweep samples it like its own UNet.

The engine, the guided denoiser and the samplers call every diffusion network as `net(x_t, t, y) -> ε or v`, with
t the original training index (0..T−1) and y the label (index `num_classes` = the null label). `DiffusersUNet`
gives a `UNet2DModel` that signature, and a `decode` step from what it samples to images, which the sweep applies
before grids and features (`SweepModels.decode`): the identity here, since a `UNet2DModel` works in pixel space.

Not supported: the perturbation methods (PAG, SEG, TSG, degraded-guide autoguidance) hook this framework's UNet
modules (`time_embed`, `SelfAttention`, `ResBlock`), which a diffusers network does not have; the sweep refuses
them by name before sampling (the model's hyperparameters say `perturbable: False`).

Left for latent models (a DiT through diffusers, `DiTTransformer2DModel` + `AutoencoderKL`), which fit this shape:
- a wrapper like this one whose forward calls the transformer (`hidden_states`, `timestep`, `class_labels`) and
  keeps the ε half of a learned-variance output (DiT predicts ε and Σ: `out.chunk(2, dim=1)[0]`);
- `decode(z) = vae.decode(z / vae.config.scaling_factor).sample`, clamped to [−1, 1];
- in `SweepModels`: the latent shape for the initial noise beside the decoded image shape that grids, features
  and the FLOP count use (today one `shape` serves both), the VAE's weights in the model's identity hash, and the
  decode's cost in the cell's UNet equivalents.
"""

from __future__ import annotations

from torch import Tensor, nn


class DiffusersUNet(nn.Module):
    """`net(x_t, t, y)` = the UNet2DModel's output (ε or v, as its scheduler config says) at training index t.

    `conditional`: the UNet has a class embedding of num_classes + 1 rows (the last is the null label); an
    unconditional one ignores y (diffusers refuses labels for a UNet without a class embedding), so its
    conditional and unconditional predictions are one and the same output.
    """

    def __init__(self, unet: nn.Module, conditional: bool) -> None:
        super().__init__()
        self.unet, self.conditional = unet, conditional

    def forward(self, x: Tensor, t: Tensor, y: Tensor) -> Tensor:
        return self.unet(x, t, class_labels=y if self.conditional else None, return_dict=False)[0]

    def decode(self, samples: Tensor) -> Tensor:
        """What the sampler produced → images in [−1, 1]: pixel space, so the samples themselves."""
        return samples
