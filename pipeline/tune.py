"""Entry point radiodiff-tune (Ray Tune sweeps over the VAE-GAN's disc_start and kl_weight).

Sweeps call the training function, which has not landed yet: the command says so and exits 2.
"""

from radiodiff.cli import not_available

main = not_available("radiodiff-tune (Ray Tune sweeps of VAE-GAN training)")
