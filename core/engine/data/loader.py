"""Batches on the device: normalisation and augmentation of whole batches of uint8 tensors."""

from __future__ import annotations

import torch

from .cache import seed_int

CROP_PADDING = 4  # random-crop padding (zeros in pixel space, i.e. black, as torchvision RandomCrop)



def normalize(x_uint8_batch: torch.Tensor, mean, std) -> torch.Tensor:
    """uint8 images (B, C, H, W) (or (C, H, W)) -> float32 (x/255 - mean) / std, on x's device."""
    x = x_uint8_batch
    m = torch.as_tensor(mean, dtype=torch.float32, device=x.device).view(-1, 1, 1)
    s = torch.as_tensor(std, dtype=torch.float32, device=x.device).view(-1, 1, 1)
    return (x.to(torch.float32) / 255.0 - m) / s


def crop_flip(x: torch.Tensor, dy: torch.Tensor, dx: torch.Tensor, flip: torch.Tensor,
              padding: int = CROP_PADDING) -> torch.Tensor:
    """Random-crop-with-padding and horizontal flip of a whole batch in one gather.

    x (B, C, H, W) is padded with zeros by `padding` on every side; image b is the H x W window
    whose top-left corner is (dy[b], dx[b]) in the padded image (0..2*padding; padding, padding
    = no shift), mirrored left-right where flip[b]. The flip is of the cropped window.
    """
    B, C, H, W = x.shape
    p = padding
    xp = x.new_zeros(B, C, H + 2 * p, W + 2 * p)  # (B, C, H+2p, W+2p)
    xp[:, :, p:p + H, p:p + W] = x
    ar_h = torch.arange(H, device=x.device)
    ar_w = torch.arange(W, device=x.device)
    rows = (dy.view(B, 1) + ar_h).view(B, 1, H, 1).expand(B, C, H, W + 2 * p)
    cols = dx.view(B, 1) + torch.where(flip.view(B, 1), W - 1 - ar_w, ar_w)  # (B, W)
    # two gathers with broadcast (stride-0) indices: rows, then columns (flip folded into them)
    return torch.gather(torch.gather(xp, 2, rows), 3, cols.view(B, 1, 1, W).expand(B, C, H, W))


class BatchLoader:
    """Batches from uint8 tensors already on `device`; augmentation on whole batches of tensors.

    train=True: shuffled, and (if `augment`) random crop with 4-pixel zero padding (black in
    pixel space, as torchvision's RandomCrop(32, padding=4)) and horizontal flip. eval: in
    order, no augmentation. All randomness of an epoch comes from a CPU torch.Generator seeded
    from (seed, epoch): an epoch is the same on any device and after a resume. `__iter__` uses
    the epoch given by `set_epoch` (or the one after the previous iteration's, starting at 0).
    drop_last defaults to True for train, False for eval. Yields (x float32 (B, 3, H, W)
    normalised, y int64 (B,)) on `device` (x in channels_last memory format if asked).
    """

    def __init__(self, images_u8, labels, mean, std, batch_size, *, train: bool, device="cpu", seed=0,
                 augment=True, drop_last=None, channels_last=False):
        if images_u8.dtype != torch.uint8 or images_u8.ndim != 4:
            raise ValueError(f"images must be uint8 (N, C, H, W), got {images_u8.dtype} {tuple(images_u8.shape)}")
        if len(labels) != len(images_u8):
            raise ValueError(f"{len(images_u8)} images but {len(labels)} labels")
        if batch_size < 1:
            raise ValueError("batch_size must be >= 1")
        self.device = torch.device(device)
        self.images = images_u8.to(self.device)
        self.labels = labels.to(self.device, torch.int64)
        self.mean, self.std = tuple(float(m) for m in mean), tuple(float(s) for s in std)
        std_t = torch.tensor(self.std, dtype=torch.float32, device=self.device).view(1, -1, 1, 1)
        mean_t = torch.tensor(self.mean, dtype=torch.float32, device=self.device).view(1, -1, 1, 1)
        self._scale, self._shift = 1.0 / (255.0 * std_t), -mean_t / std_t
        self.batch_size = int(batch_size)
        self.train = bool(train)
        self.augment = bool(augment) and self.train
        self.drop_last = self.train if drop_last is None else bool(drop_last)
        self.channels_last = bool(channels_last)
        self.seed = int(seed)
        self.epoch = 0
        self.padding = CROP_PADDING

    def set_epoch(self, epoch: int) -> None:
        self.epoch = int(epoch)

    def __len__(self) -> int:
        n = len(self.labels)
        return n // self.batch_size if self.drop_last else -(-n // self.batch_size)

    def epoch_plan(self, epoch: int) -> dict[str, torch.Tensor]:
        """The epoch's random choices (CPU): order (N,), crop offsets dy, dx (N,) in 0..8, flip (N,)."""
        n = len(self.labels)
        g = torch.Generator().manual_seed(seed_int("batches", self.seed, int(epoch)))
        order = torch.randperm(n, generator=g) if self.train else torch.arange(n)
        span = 2 * self.padding + 1
        dy = torch.randint(0, span, (n,), generator=g)
        dx = torch.randint(0, span, (n,), generator=g)
        flip = torch.rand(n, generator=g) < 0.5
        return {"order": order, "dy": dy, "dx": dx, "flip": flip}

    def __iter__(self):
        epoch = self.epoch
        self.epoch += 1  # the next iteration, unless set_epoch says otherwise, is a new epoch
        return self._batches(epoch)

    def _batches(self, epoch: int):
        n, bs = len(self.labels), self.batch_size
        plan = None
        if self.train:
            plan = {k: v.to(self.device) for k, v in self.epoch_plan(epoch).items()}
        for b in range(len(self)):
            lo, hi = b * bs, min(n, (b + 1) * bs)
            if plan is None:
                xb, yb = self.images[lo:hi], self.labels[lo:hi]
            else:
                idx = plan["order"][lo:hi]
                xb, yb = self.images[idx], self.labels[idx]
                if self.augment:
                    xb = crop_flip(xb, plan["dy"][lo:hi], plan["dx"][lo:hi], plan["flip"][lo:hi], self.padding)
            if self.channels_last:
                xb = xb.contiguous(memory_format=torch.channels_last)
            yield xb.to(torch.float32).mul_(self._scale).add_(self._shift), yb
