"""Entry points radiodiff-train-vae and radiodiff-train-ldm.

Distributed training on DeepSpeed has not landed yet: the commands say so and exit 2.
"""

from radiodiff.cli import not_available

train_vae = not_available("radiodiff-train-vae (VAE-GAN training on DeepSpeed)")
train_ldm = not_available("radiodiff-train-ldm (latent diffusion training on DeepSpeed)")
