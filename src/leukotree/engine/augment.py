"""What happens to training pixels: normalisation statistics, class balancing by rotation,
random crops and smear-friendly augmentation.

Every random draw comes from a CPU :class:`torch.Generator` passed in, so a seed gives
the same augmentation on a CPU and a GPU, and a resumed run the same as an
uninterrupted one.
"""

from __future__ import annotations

from collections.abc import Sequence

import numpy as np
import torch
import torch.nn.functional as F


def channel_stats(pixels: np.ndarray, chunk: int = 512) -> tuple[list[float], list[float]]:
    """Per-channel mean and standard deviation (in [0, 1] units) of uint8 pixels.

    ``mean_c = sum(x) / n`` and ``std_c = sqrt(sum(x^2) / n - mean_c^2)``, accumulated in
    float64 over chunks, so memory-mapped pixels are never loaded at once.
    """
    total = np.zeros(3)
    total_sq = np.zeros(3)
    count = 0
    for start in range(0, len(pixels), chunk):
        block = np.asarray(pixels[start:start + chunk], dtype=np.float64) / 255.0
        total += block.sum(axis=(0, 1, 2))
        total_sq += (block ** 2).sum(axis=(0, 1, 2))
        count += block.shape[0] * block.shape[1] * block.shape[2]
    mean = total / count
    std = np.sqrt(np.maximum(total_sq / count - mean ** 2, 1e-8))
    return mean.tolist(), std.tolist()


def rotation_balance(labels: Sequence[str], seed: int) -> tuple[np.ndarray, np.ndarray]:
    """The seed paper's balancing: minority classes topped up with rotated copies.

    Returns ``(index, rotation)`` arrays: every image once with rotation 0, then
    copies of images of smaller classes with rotations 1, 2, 3 (x 90 degrees),
    until each class reaches the largest class's count or four copies per image.
    """
    rng = np.random.default_rng(seed)
    labels_arr = np.asarray(labels)
    index = [np.arange(len(labels_arr))]
    rotation = [np.zeros(len(labels_arr), np.int64)]
    counts = {lab: int((labels_arr == lab).sum()) for lab in set(labels_arr.tolist())}
    target = max(counts.values())
    for lab, n in sorted(counts.items()):
        members = np.flatnonzero(labels_arr == lab)
        need = min(target - n, 3 * n)
        if need <= 0:
            continue
        extra = np.concatenate([rng.permutation(members) for _ in range(3)])[:need]
        rot = 1 + np.arange(need) // n
        index.append(extra)
        rotation.append(rot.astype(np.int64))
    return np.concatenate(index), np.concatenate(rotation)


def with_replay(index: np.ndarray, rotations: np.ndarray, n_new: int, n_replay: int,
                share: float) -> tuple[np.ndarray, np.ndarray, int]:
    """An epoch of new images (``index``/``rotations`` over images ``0..n_new-1``) mixed
    with ``n_replay`` replayed images (``n_new..n_new+n_replay-1``, once each).

    The new images are repeated ``k = max(1, round(share / (1 - share) * n_replay /
    len(index)))`` times, so they make about ``share`` of the epoch however few they are
    (a few labelled cells of a new lab beside a whole training set). Returns the index,
    the rotations and ``k``.
    """
    if n_replay == 0:
        return index, rotations, 1
    k = max(1, round(share / (1 - share) * n_replay / len(index)))
    replayed = np.arange(n_new, n_new + n_replay)
    return (np.concatenate([np.tile(index, k), replayed]),
            np.concatenate([np.tile(rotations, k), np.zeros(n_replay, np.int64)]), k)


def random_crop(batch: torch.Tensor, size: int, gen: torch.Generator, random: bool = True,
                ) -> torch.Tensor:
    """A ``size`` x ``size`` crop of every image, at a random place (or the centre)."""
    room = batch.shape[-1] - size
    if not random:
        o = room // 2
        return batch[..., o:o + size, o:o + size].contiguous()
    offsets = torch.randint(0, room + 1, (batch.shape[0], 2), generator=gen).tolist()
    return torch.stack([img[:, y:y + size, x:x + size] for img, (y, x) in zip(batch, offsets,
                                                                          strict=True)])


def augment(batch: torch.Tensor, gen: torch.Generator, jitter: float,
            forced_rot: torch.Tensor | None = None) -> torch.Tensor:
    """Smear-friendly augmentation of a float batch in [0, 255] (``(B, 3, S, S)``).

    Random horizontal flip, rotation by a multiple of 90 degrees (plus any forced
    rotation from class balancing), and small brightness, contrast and per-channel
    stain gains of relative size ``jitter``.
    """
    b, dev = batch.shape[0], batch.device
    # Random draws come from the CPU generator ``gen`` whatever the device, so a seed
    # gives the same augmentation on a CPU and a GPU; they then move to the batch.
    flip = (torch.rand(b, generator=gen) < 0.5).to(dev)
    batch = torch.where(flip[:, None, None, None], batch.flip(3), batch)
    k = torch.randint(0, 4, (b,), generator=gen)
    if forced_rot is not None:
        k = (k + forced_rot.cpu()) % 4
    out = batch.clone()
    for r in range(1, 4):
        sel = torch.nonzero(k == r).flatten()
        if sel.numel():
            sel = sel.to(dev)
            out[sel] = torch.rot90(batch[sel], r, dims=(2, 3))
    if jitter > 0:
        gains = (1 + (torch.rand(b, 3, generator=gen) * 2 - 1) * jitter).to(dev)
        bright = (1 + (torch.rand(b, 1, generator=gen) * 2 - 1) * jitter).to(dev)
        contrast = (1 + (torch.rand(b, 1, generator=gen) * 2 - 1) * jitter).to(dev)
        mean = out.mean(dim=(1, 2, 3), keepdim=True)
        out = (out - mean) * contrast[:, :, None, None] + mean
        out = out * (gains * bright)[:, :, None, None]
        out = out.clamp(0, 255)
    return out


def random_zoom_crop(batch: torch.Tensor, size: int, gen: torch.Generator, scale: float,
                     ) -> torch.Tensor:
    """A ``size`` x ``size`` view of every image at a random magnification and place.

    Each image is zoomed by ``z`` drawn log-uniformly in ``[1 / (1 + scale), 1 + scale]``
    (cells of other labs come at other magnifications): the window of side ``size / z``
    pixels of the (padded) cached image, at a random position, is resampled bilinearly
    to ``size``; where a zoomed-out window leaves the image, its border is reflected.
    """
    b, dev = batch.shape[0], batch.device
    side = batch.shape[-1]
    log_z = (torch.rand(b, generator=gen) * 2 - 1) * float(np.log1p(scale))
    frac = size / torch.exp(log_z) / side  # window side as a fraction of the image
    room = (1 - frac).clamp(min=0)
    shift = (torch.rand(b, 2, generator=gen) * 2 - 1) * room[:, None]
    theta = torch.zeros(b, 2, 3)
    theta[:, 0, 0] = theta[:, 1, 1] = frac
    theta[:, :, 2] = shift
    grid = F.affine_grid(theta.to(dev, batch.dtype), [b, 3, size, size], align_corners=False)
    return F.grid_sample(batch, grid, mode="bilinear", padding_mode="reflection",
                         align_corners=False)


def _hed_matrices() -> tuple[torch.Tensor, torch.Tensor]:
    """scikit-image's stain vectors: optical density ``od = hed @ rgb_from_hed``."""
    from skimage.color import hed_from_rgb, rgb_from_hed

    return (torch.tensor(hed_from_rgb, dtype=torch.float32),
            torch.tensor(rgb_from_hed, dtype=torch.float32))


def stain_jitter(batch: torch.Tensor, gen: torch.Generator, strength: float) -> torch.Tensor:
    """Random stain variation in haematoxylin-eosin-DAB space (Tellez et al. 2019).

    Pixels ``x`` in [0, 255] go to optical density ``od = -log((x + 1) / 256)``, then to
    stain concentrations ``c = od @ hed_from_rgb``; each image's channel ``k`` becomes
    ``c_k * a_k + b_k`` with ``a_k`` in ``[1 - s, 1 + s]`` and ``b_k`` in
    ``[-s / 5, s / 5]`` (``s = strength``), and the result goes back to RGB.
    """
    b, dev = batch.shape[0], batch.device
    to_hed, to_rgb = (m.to(dev) for m in _hed_matrices())
    a = (1 + (torch.rand(b, 1, 3, generator=gen) * 2 - 1) * strength).to(dev)
    shift = ((torch.rand(b, 1, 3, generator=gen) * 2 - 1) * strength / 5).to(dev)
    flat = batch.float().flatten(2).transpose(1, 2)  # (B, pixels, 3)
    od = -torch.log((flat + 1) / 256)
    hed = (od @ to_hed) * a + shift
    rgb = 256 * torch.exp(-(hed @ to_rgb)) - 1
    return rgb.transpose(1, 2).reshape(batch.shape).clamp(0, 255).to(batch.dtype)
