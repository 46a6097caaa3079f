"""The full Stable Diffusion 1.5 architecture with random weights, built offline.

For timing and memory measurements on a GPU when the real weights are not at hand: the configs
are SD1.5's own (UNet 860M, VAE 84M, CLIP ViT-L/14 text encoder 123M parameters), so a step costs
what it costs with the real model. Its edits are meaningless; never score with it.
"""
from __future__ import annotations

import torch

from spdbench.targets.base import Target
from spdbench.targets.tiny import SCHEDULER_CONFIG, tiny_tokenizer

SD15_VAE = dict(in_channels=3, out_channels=3, latent_channels=4,
                down_block_types=("DownEncoderBlock2D",) * 4, up_block_types=("UpDecoderBlock2D",) * 4,
                block_out_channels=(128, 256, 512, 512), layers_per_block=2, norm_num_groups=32,
                sample_size=512, scaling_factor=0.18215)
SD15_UNET = dict(sample_size=64, in_channels=4, out_channels=4, layers_per_block=2,
                 block_out_channels=(320, 640, 1280, 1280),
                 down_block_types=("CrossAttnDownBlock2D",) * 3 + ("DownBlock2D",),
                 up_block_types=("UpBlock2D",) + ("CrossAttnUpBlock2D",) * 3,
                 cross_attention_dim=768, attention_head_dim=8, norm_num_groups=32)
SD15_TEXT = dict(vocab_size=49408, hidden_size=768, intermediate_size=3072, num_hidden_layers=12,
                 num_attention_heads=12, max_position_embeddings=77, hidden_act="quick_gelu",
                 bos_token_id=49406, eos_token_id=49407, pad_token_id=49407, projection_dim=768)


def build_sd15_random(seed: int = 0, device=None, dtype=None) -> Target:
    """SD1.5-architecture Target with random weights (built directly on `device`)."""
    # deferred: diffusers takes seconds to import; only this builder needs it
    from diffusers import AutoencoderKL, PNDMScheduler, UNet2DConditionModel
    # deferred: transformers is slow to import; only this builder needs it
    from transformers import CLIPTextConfig, CLIPTextModel

    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(seed)
        vae, unet = AutoencoderKL(**SD15_VAE), UNet2DConditionModel(**SD15_UNET)
        text = CLIPTextModel(CLIPTextConfig(**SD15_TEXT))
    cfg = {k: v for k, v in SCHEDULER_CONFIG.items() if k != "clip_sample"}
    return Target(vae, unet, text, tiny_tokenizer(), PNDMScheduler(**cfg, skip_prk_steps=True),
                  name=f"sd15-arch-random-{seed}", source=f"spdbench:sd15-arch-random(seed={seed})",
                  device=device, dtype=dtype)
