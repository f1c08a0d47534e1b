"""Constructor arguments of the Stable-Diffusion component classes at three sizes.

- ``sd_v1``: the shapes of Stable Diffusion v1.x (U-Net, VAE, CLIP ViT-L/14 text encoder), for random-weight
  benchmarks and shape tests; real weights come from a local directory (``core.models.loading``).
- ``mini``: the toolkit's mini prior for the 128 px synthetic world. The VAE downsamples by 4 (latent 32x32x4).
  The U-Net keeps SD's four-level layout and block names, but its top level (32x32) has no attention: on a 2-core
  CPU, self-attention over 1024 positions with 8-dim heads cost more than the whole rest of the network. So the
  cross-attention layers sit at 1/2 and 1/4 of the latent size (``down_blocks.1/.2``, ``up_blocks.1/.2``), the
  same relative resolutions and block indices at which SD's SeaS / CUT layers sit.
- ``tiny``: the mini layout at toy width and 64 px, for tests (random weights, builds in milliseconds).

Each entry: ``resolution`` (image side in pixels), ``unet`` / ``vae`` / ``text`` constructor kwargs,
``max_length`` (tokenizer length) and the noise schedule (SD v1's, which every method assumes).
"""
from __future__ import annotations

import copy
from typing import Any

SD_V1_SCHEDULE: dict[str, Any] = dict(
    num_train_timesteps=1000, beta_start=0.00085, beta_end=0.012, beta_schedule="scaled_linear",
    prediction_type="epsilon", clip_sample=False, set_alpha_to_one=False, steps_offset=1)

_MINI_LAYOUT = dict(
    down_block_types=("DownBlock2D", "CrossAttnDownBlock2D", "CrossAttnDownBlock2D", "DownBlock2D"),
    up_block_types=("UpBlock2D", "CrossAttnUpBlock2D", "CrossAttnUpBlock2D", "UpBlock2D"),
)

ARCHITECTURES: dict[str, dict[str, Any]] = {
    "sd_v1": dict(
        resolution=512, max_length=77,
        unet=dict(sample_size=64, in_channels=4, out_channels=4, layers_per_block=2,
                  block_out_channels=(320, 640, 1280, 1280),
                  down_block_types=("CrossAttnDownBlock2D",) * 3 + ("DownBlock2D",),
                  up_block_types=("UpBlock2D",) + ("CrossAttnUpBlock2D",) * 3,
                  cross_attention_dim=768, attention_head_dim=8),
        vae=dict(in_channels=3, out_channels=3, latent_channels=4, layers_per_block=2,
                 block_out_channels=(128, 256, 512, 512),
                 down_block_types=("DownEncoderBlock2D",) * 4, up_block_types=("UpDecoderBlock2D",) * 4,
                 sample_size=512, scaling_factor=0.18215),
        text=dict(hidden_size=768, intermediate_size=3072, num_hidden_layers=12, num_attention_heads=12,
                  max_position_embeddings=77, hidden_act="quick_gelu", projection_dim=768),
    ),
    "mini": dict(
        resolution=128, max_length=32,
        unet=dict(sample_size=32, in_channels=4, out_channels=4, layers_per_block=1,
                  block_out_channels=(32, 64, 128, 128), cross_attention_dim=128, attention_head_dim=4,
                  norm_num_groups=16, **_MINI_LAYOUT),
        vae=dict(in_channels=3, out_channels=3, latent_channels=4, layers_per_block=1,
                 block_out_channels=(32, 64, 64), norm_num_groups=16, mid_block_add_attention=False,
                 down_block_types=("DownEncoderBlock2D",) * 3, up_block_types=("UpDecoderBlock2D",) * 3,
                 sample_size=128, scaling_factor=1.0),
        text=dict(hidden_size=128, intermediate_size=512, num_hidden_layers=3, num_attention_heads=4,
                  max_position_embeddings=32, hidden_act="quick_gelu", projection_dim=128),
    ),
    "tiny": dict(
        resolution=64, max_length=24,
        unet=dict(sample_size=16, in_channels=4, out_channels=4, layers_per_block=1,
                  block_out_channels=(8, 16, 16, 16), cross_attention_dim=16, attention_head_dim=2,
                  norm_num_groups=4, **_MINI_LAYOUT),
        vae=dict(in_channels=3, out_channels=3, latent_channels=4, layers_per_block=1,
                 block_out_channels=(8, 8, 16), norm_num_groups=4, mid_block_add_attention=False,
                 down_block_types=("DownEncoderBlock2D",) * 3, up_block_types=("UpDecoderBlock2D",) * 3,
                 sample_size=64, scaling_factor=1.0),
        text=dict(hidden_size=16, intermediate_size=32, num_hidden_layers=2, num_attention_heads=2,
                  max_position_embeddings=24, hidden_act="quick_gelu", projection_dim=16),
    ),
}


def architecture(name: str) -> dict[str, Any]:
    """A deep copy of ``ARCHITECTURES[name]`` (callers may edit it)."""
    if name not in ARCHITECTURES:
        raise KeyError(f"Unknown architecture '{name}'. Available: {', '.join(ARCHITECTURES)}.")
    return copy.deepcopy(ARCHITECTURES[name])
