"""Tiny Stable-Diffusion-1.5-architecture pipelines, built offline.

Same component classes as SD1.5 (AutoencoderKL with 4 latent channels and x8 downsampling,
UNet2DConditionModel with cross-attention, CLIPTextModel + CLIPTokenizer, DDIM scheduler with SD's
scaled-linear betas), just narrow. The tokenizer is SD1.5's real vocabulary, derived from OpenAI's
BPE file (shipped in assets/clip_tokenizer), so prompts tokenize to SD1.5's ids.

`build_tiny(seed)` gives random weights (plumbing tests, target name "tiny-random"); the trained
weights shipped in `assets/tiny-v3` are target "tiny" (see zoo/train_tiny.py and docs/zoo.md);
`assets/tiny-v2`, its predecessor, is "tiny-v2".
"""
from __future__ import annotations

from pathlib import Path

import torch

from spdbench.targets.base import Target

ASSETS = Path(__file__).parent / "assets"
TOKENIZER_DIR = ASSETS / "clip_tokenizer"
#: tiny v3, trained on the zoo's photo list (docs/zoo.md): the target "tiny" since the switch-over
V3_DIR = ASSETS / "tiny-v3"
TRAINED_DIR = V3_DIR
#: tiny v2 (12 bundled photos), "tiny" before the switch-over; kept as "tiny-v2" so the entries
#: measured on it (in the repository's history) can still be reproduced
V2_DIR = ASSETS / "tiny-v2"
#: tiny-b: a sibling of tiny v3 trained independently (seed 1, the other half of the photos): transfer
TINY_B_DIR = ASSETS / "tiny-b"
#: tiny-inpaint: only a 9-channel UNet; the VAE, text encoder and tokenizer are tiny's
INPAINT_DIR = ASSETS / "tiny-inpaint"
#: tiny-ip2p: only an 8-channel (InstructPix2Pix) UNet; the VAE, text encoder and tokenizer are tiny's
IP2P_DIR = ASSETS / "tiny-ip2p"

VAE_CONFIG = dict(
    in_channels=3, out_channels=3, latent_channels=4,
    down_block_types=("DownEncoderBlock2D",) * 4,
    up_block_types=("UpDecoderBlock2D",) * 4,
    block_out_channels=(16, 32, 64, 64), layers_per_block=1, norm_num_groups=8,
    sample_size=128, scaling_factor=0.18215,
)
TEXT_CONFIG = dict(
    vocab_size=49408, hidden_size=32, intermediate_size=64, num_hidden_layers=2,
    num_attention_heads=2, max_position_embeddings=77, hidden_act="quick_gelu",
    bos_token_id=49406, eos_token_id=49407, pad_token_id=49407, projection_dim=32,
)
UNET_CONFIG = dict(
    sample_size=16, in_channels=4, out_channels=4, layers_per_block=1,
    block_out_channels=(32, 64, 64),
    down_block_types=("CrossAttnDownBlock2D", "CrossAttnDownBlock2D", "DownBlock2D"),
    up_block_types=("UpBlock2D", "CrossAttnUpBlock2D", "CrossAttnUpBlock2D"),
    cross_attention_dim=32, attention_head_dim=8, norm_num_groups=8,
)
SCHEDULER_CONFIG = dict(
    num_train_timesteps=1000, beta_start=0.00085, beta_end=0.012, beta_schedule="scaled_linear",
    clip_sample=False, set_alpha_to_one=False, steps_offset=1,
)


def tiny_tokenizer():
    """SD1.5's CLIP tokenizer (49,408 ids), loaded from the shipped vocab/merges files."""
    from transformers import CLIPTokenizer  # deferred: transformers is slow to import; only building a model needs it

    return CLIPTokenizer(str(TOKENIZER_DIR / "vocab.json"), str(TOKENIZER_DIR / "merges.txt"),
                         model_max_length=77, pad_token="<|endoftext|>")


def build_tiny_components(seed: int = 0) -> dict:
    """Random-weight components, deterministic for `seed` (no global RNG state is touched)."""
    # deferred: diffusers takes seconds to import; only building a model needs it
    from diffusers import AutoencoderKL, DDIMScheduler, UNet2DConditionModel
    # deferred: transformers is slow to import; only building a model needs it
    from transformers import CLIPTextConfig, CLIPTextModel

    devices = []  # fork_rng keeps the caller's global RNG untouched
    with torch.random.fork_rng(devices=devices):
        torch.manual_seed(seed)
        vae = AutoencoderKL(**VAE_CONFIG)
        unet = UNet2DConditionModel(**UNET_CONFIG)
        text_encoder = CLIPTextModel(CLIPTextConfig(**TEXT_CONFIG))
    return dict(vae=vae, unet=unet, text_encoder=text_encoder, tokenizer=tiny_tokenizer(),
                scheduler=DDIMScheduler(**SCHEDULER_CONFIG))


def build_tiny(seed: int = 0, device=None, dtype=None):
    """A random-weight tiny `Target` (plumbing only: its edits are noise)."""
    return Target(**build_tiny_components(seed), name=f"tiny-random-{seed}",
                  source=f"spdbench:tiny-random(seed={seed})", device=device, dtype=dtype)
