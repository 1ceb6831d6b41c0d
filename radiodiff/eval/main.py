"""Entry points radiodiff-eval and radiodiff-sample.

Evaluation and prediction need trained checkpoints, which need the training commands: until those
land, the commands say so and exit 2.
"""

from radiodiff.cli import not_available

evaluate_main = not_available("radiodiff-eval (PSNR/SSIM/NMSE/RMSE evaluation of a trained run)")
sample_main = not_available("radiodiff-sample (radio-map prediction from a trained run)")
