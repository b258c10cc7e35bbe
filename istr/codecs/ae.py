"""Convolutional autoencoder mask codec: the non-linear arm of the codec ablation (docs/method.md#mask-embedding)."""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from istr.codecs.base import MASK_SIZE, MaskCodec


class AECodec(MaskCodec):
    """Small conv autoencoder ``28x28 -> dim -> 28x28 logits`` (docs/method.md#mask-embedding).

    Encoder: conv 1->16 and 16->32 (3x3, stride 2, ReLU; 28 -> 14 -> 7), then a
    linear layer to ``dim``. Decoder mirrors it: linear to 32x7x7, two stride-2
    transposed convs back to one 28x28 channel of logits. Trained in ``fit``
    with Adam on BCE-with-logits for ``epochs`` (seeded init and batch order),
    then frozen: parameters get ``requires_grad=False`` so the ISTR optimizer
    skips them, while gradients still flow through ``decode`` to the codes.
    There is no BatchNorm/dropout, so train/eval mode does not change outputs.
    Its latents are then standardised per dimension on the fitting masks
    (``MaskCodec.standardize_codes``), like PCA's whitened codes.
    """

    standardize_codes = True

    def __init__(
        self,
        dim: int = 60,
        epochs: int = 30,
        seed: int = 0,
        lr: float = 2e-3,
        batch_size: int = 64,
    ) -> None:
        super().__init__(dim, epochs=epochs, seed=seed, lr=lr, batch_size=batch_size)
        self.epochs, self.seed, self.lr, self.batch_size = epochs, seed, lr, batch_size
        side = MASK_SIZE // 4
        # Seed a private RNG stream so construction is reproducible without
        # disturbing the caller's global RNG.
        with torch.random.fork_rng(devices=[]):
            torch.manual_seed(seed)
            self.encoder = nn.Sequential(
                nn.Conv2d(1, 16, 3, stride=2, padding=1),
                nn.ReLU(),
                nn.Conv2d(16, 32, 3, stride=2, padding=1),
                nn.ReLU(),
                nn.Flatten(),
                nn.Linear(32 * side * side, dim),
            )
            self.decoder = nn.Sequential(
                nn.Linear(dim, 32 * side * side),
                nn.ReLU(),
                nn.Unflatten(1, (32, side, side)),
                nn.ConvTranspose2d(32, 16, 4, stride=2, padding=1),
                nn.ReLU(),
                nn.ConvTranspose2d(16, 1, 4, stride=2, padding=1),
            )

    def _fit(self, masks: Tensor) -> dict[str, float]:
        self.requires_grad_(True)
        self.train()
        optimizer = torch.optim.Adam(self.parameters(), lr=self.lr)
        gen = torch.Generator().manual_seed(self.seed)
        targets = masks.unsqueeze(1)
        loss = torch.zeros(())
        for _ in range(self.epochs):
            order = torch.randperm(targets.shape[0], generator=gen).to(targets.device)
            for batch in order.split(self.batch_size):
                x = targets[batch]
                loss = F.binary_cross_entropy_with_logits(self.decoder(self.encoder(x)), x)
                optimizer.zero_grad(set_to_none=True)
                loss.backward()
                optimizer.step()
        return {"final_loss": float(loss.detach())}

    def _encode(self, masks: Tensor) -> Tensor:
        return self.encoder(masks.clamp(0.0, 1.0).unsqueeze(1))

    def _decode(self, codes: Tensor) -> Tensor:
        return self.decoder(codes)
