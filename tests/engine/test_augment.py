"""Augmentation, class balancing and normalisation statistics."""

import numpy as np
import pytest
import torch

from leukotree.engine.augment import augment, channel_stats, rotation_balance


def test_rotation_balance_tops_up_minority_classes():
    index, rotation = rotation_balance(["a"] * 6 + ["b"] * 2, seed=0)
    labels = np.array(["a"] * 6 + ["b"] * 2)[index]
    assert (labels == "a").sum() == 6 and (labels == "b").sum() == 6
    for image in (6, 7):  # each "b" image: the original and two distinct rotated copies
        assert sorted(rotation[index == image].tolist()) == [0, 1, 2]
    assert (rotation[labels == "a"] == 0).all()


def test_augment_keeps_range_and_forced_rotation_rotates():
    gen = torch.Generator().manual_seed(0)
    x = torch.arange(2 * 3 * 4 * 4, dtype=torch.float32).reshape(2, 3, 4, 4)
    y = augment(x, gen, 0.2)
    assert y.shape == x.shape and y.min() >= 0 and y.max() <= 255
    gen1, gen2 = torch.Generator().manual_seed(5), torch.Generator().manual_seed(5)
    plain = augment(x, gen1, 0.0)
    turned = augment(x, gen2, 0.0, forced_rot=torch.tensor([2, 2]))
    assert torch.equal(turned, torch.rot90(plain, 2, dims=(2, 3)))


def test_augment_keeps_the_batch_on_its_device():
    # The random draws come from a CPU generator; a batch on another device (here
    # "meta", standing in for a GPU) must not meet CPU tensors.
    gen = torch.Generator().manual_seed(0)
    x = torch.rand(4, 3, 8, 8, device="meta")
    y = augment(x, gen, 0.1, forced_rot=torch.tensor([0, 1, 2, 3]))
    assert y.device.type == "meta" and y.shape == x.shape


def test_channel_stats_hand_computed():
    px = np.zeros((2, 1, 1, 3), np.uint8)
    px[1] = 255
    mean, std = channel_stats(px)
    assert mean == pytest.approx([0.5] * 3) and std == pytest.approx([0.5] * 3)


def test_zoom_without_scale_on_an_image_of_the_output_size_is_the_identity():
    from leukotree.engine.augment import random_zoom_crop

    x = torch.rand(3, 3, 16, 16) * 255
    out = random_zoom_crop(x, 16, torch.Generator().manual_seed(0), scale=0.0)
    assert torch.allclose(out, x, atol=1e-3)


def test_zoom_changes_the_apparent_size_of_a_cell():
    from leukotree.engine.augment import random_zoom_crop

    x = torch.zeros(64, 3, 40, 40)
    x[:, :, 15:25, 15:25] = 255  # a 10-pixel "cell" in the centre of a padded cache
    out = random_zoom_crop(x, 32, torch.Generator().manual_seed(1), scale=0.5)
    assert out.shape == (64, 3, 32, 32)
    area = (out[:, 0] > 127).float().sum(dim=(1, 2))
    # at 32/40 of the cache the cell covers ~64 px; zoomed by 1/1.5..1.5: ~28..144
    assert area.min() < 50 and area.max() > 90
    again = random_zoom_crop(x, 32, torch.Generator().manual_seed(1), scale=0.5)
    assert torch.equal(out, again)  # the generator decides everything


def test_stain_jitter_round_trips_at_zero_strength_and_moves_colour_otherwise():
    from leukotree.engine.augment import stain_jitter

    x = torch.rand(4, 3, 8, 8) * 200 + 20
    same = stain_jitter(x, torch.Generator().manual_seed(0), 0.0)
    assert torch.allclose(same, x, atol=0.05)
    moved = stain_jitter(x, torch.Generator().manual_seed(0), 0.3)
    assert moved.shape == x.shape and moved.min() >= 0 and moved.max() <= 255
    assert (moved - x).abs().mean() > 1.0


def test_with_replay_repeats_the_new_images_to_their_share_of_the_epoch():
    import numpy as np

    from leukotree.engine.augment import with_replay

    index, rotations = np.arange(4), np.array([0, 1, 0, 2])
    # 4 new images beside 12 replayed, share 0.5: k = round(1 * 12 / 4) = 3
    out, rots, k = with_replay(index, rotations, 4, 12, 0.5)
    assert k == 3
    assert sorted(out.tolist()) == sorted([0, 1, 2, 3] * 3 + list(range(4, 16)))
    assert rots.tolist() == [0, 1, 0, 2] * 3 + [0] * 12
    # share 0.2 of 2 replayed images: k = max(1, round(0.25 * 2 / 4)) = 1
    assert with_replay(index, rotations, 4, 2, 0.2)[2] == 1
    same, same_rots, k = with_replay(index, rotations, 4, 0, 0.5)
    assert (same is index, same_rots is rotations, k) == (True, True, 1)
