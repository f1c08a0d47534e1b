"""Diffusion machinery shared by the methods: attention control, sampling, inversion, masks, features."""
from .attention import (AttentionStore, ControlledAttnProcessor, RegionTokenMask, TokenReweight, attention_control,
                        block_resolution, cross_attention_layers, layers_at)
from .features import capture_outputs, unet_up_blocks, vae_decoder_up_blocks
from .masks import binarize, isodata_threshold, normalize_minmax
from .sampling import (SAMPLERS, Step, cfg_eps, ddim_invert, img2img_start, img2img_timesteps, inference_scheduler,
                       noise_to, predict_x0, previous_latent, sample)

__all__ = ["SAMPLERS", "AttentionStore", "ControlledAttnProcessor", "RegionTokenMask", "Step", "TokenReweight",
           "attention_control", "binarize", "block_resolution", "capture_outputs", "cfg_eps", "cross_attention_layers",
           "ddim_invert", "img2img_start", "img2img_timesteps", "inference_scheduler", "isodata_threshold",
           "layers_at", "noise_to", "normalize_minmax", "predict_x0", "previous_latent", "sample", "unet_up_blocks",
           "vae_decoder_up_blocks"]
