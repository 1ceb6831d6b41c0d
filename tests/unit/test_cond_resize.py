"""data.cond_resize: how a smaller data.image_size shrinks the buildings (and cars) of the condition,
against numpy's block means and strided samples; the transmitter survives either way."""

from __future__ import annotations

import numpy as np
import pytest
import torch

from radiodiff.config import ConfigError, DataConfig
from radiodiff.data.schema import resize_cond


def condition(seed: int = 0) -> tuple[torch.Tensor, tuple[int, int]]:
    """(2, 3, 256, 256) in [-1, 1]: random buildings and cars, one transmitter pixel per map."""
    rng = np.random.default_rng(seed)
    cond = np.where(rng.random((2, 3, 256, 256)) < 0.3, 1.0, -1.0).astype(np.float32)
    cond[:, 1] = -1.0
    cond[:, 1, 201, 38] = 1.0
    return torch.from_numpy(cond), (201 // 4, 38 // 4)


def test_area_gives_each_pixel_the_mean_of_its_block() -> None:
    cond, (row, col) = condition()
    out = resize_cond(cond, DataConfig(image_size=64, cond_resize="area")).numpy()
    blocks = cond.numpy().reshape(2, 3, 64, 4, 64, 4).mean(axis=(3, 5))
    np.testing.assert_allclose(out[:, [0, 2]], blocks[:, [0, 2]], atol=1e-6)  # buildings and cars: their share
    assert (out[:, 1, row, col] == 1.0).all() and (out[:, 1] == 1.0).sum() == 2  # the transmitter, max-pooled


def test_nearest_keeps_the_first_pixel_of_each_block() -> None:
    cond, (row, col) = condition(1)
    out = resize_cond(cond, DataConfig(image_size=64)).numpy()  # the default
    np.testing.assert_array_equal(out[:, [0, 2]], cond.numpy()[:, [0, 2], ::4, ::4])
    assert (out[:, 1, row, col] == 1.0).all()


def test_area_only_shrinks_a_larger_size_is_nearest() -> None:
    cond, _ = condition(2)
    area = resize_cond(cond, DataConfig(image_size=320, cond_resize="area"))
    assert torch.equal(area, resize_cond(cond, DataConfig(image_size=320)))


def test_an_unknown_resize_is_refused() -> None:
    with pytest.raises(ConfigError, match="data.cond_resize"):
        DataConfig(cond_resize="bilinear")
