"""The melanoma classifier: a ViT image encoder whose embedding is aligned with the lesion's
ABC(D) features by contrastive learning, and a classification head.

- **Image side.** MONAI's ``ViT`` (2-D, patch tokens mean-pooled) gives the image feature; a
  classification head turns it into the melanoma logit, and an MLP projector into z_v,
  L2-normalised.
- **Feature side.** The ABC(D) vector (``AbcFeatures.vector``, standardised by the training
  set's mean and spread, which the card keeps) goes through its own MLP projector to z_c,
  L2-normalised.
- **Descriptors.** A text tower (``radlens.models.text``, the one the density task uses)
  embeds each phrase of the fixed descriptor list; a third projector maps the image feature
  into the same space, and the scaled cosine plus a bias is each descriptor's logit. Trained
  with a sigmoid loss against the image's true descriptors (several are true at once, so
  each image-phrase pair is its own binary question, as in SigLIP); images whose folder
  states no descriptors add nothing to it. Ranking the phrases by similarity is the
  retrieval the report's visual features come from.
- **Alignment.** NT-Xent, the normalised temperature-scaled cross-entropy, between the two
  sides of a batch: z_v of an image and z_c of the same image are the positive pair, every
  other image's z_c in the batch a negative, and the same from the feature side (the
  symmetric cross-modal form CLIP uses). The loss is the classification's binary
  cross-entropy plus ``alignment_weight`` times NT-Xent (0 is the ablation without it) plus
  ``descriptor_weight`` times the descriptors' sigmoid loss.

The encoder may be frozen, as in the published work (only the head and the projectors
train), or trained with the rest: radlens's phantoms give it nothing pretrained to keep, so
it trains by default. MONAI's ViT needs ``einops``. Grad-CAM on the ViT reads the last
block's patch tokens as a grid (``token_grid``).
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import torch
import torch.nn.functional as F
from monai.networks.nets import ViT
from torch import nn

from radlens.models.text import TextEncoder, Vocabulary
from radlens.tasks.dermoscopy.descriptors import DESCRIPTORS

ABC_FEATURES = 8  # AbcFeatures.vector(): A, A major, A minor, B turns, sigma H S V, D mm


@dataclass(frozen=True)
class ClassifierShape:
    """What the card records to rebuild the network."""

    image_size: int = 128
    patch_size: int = 16
    hidden_size: int = 192
    mlp_dim: int = 384
    num_layers: int = 4
    num_heads: int = 4
    embedding: int = 64
    temperature: float = 0.1

    @property
    def grid(self) -> int:
        return self.image_size // self.patch_size


def _projector(inputs: int, outputs: int) -> nn.Sequential:
    return nn.Sequential(nn.Linear(inputs, 2 * outputs), nn.GELU(), nn.Linear(2 * outputs,
                                                                               outputs))


class CrossModalClassifier(nn.Module):
    """ViT image encoder, classification head, image, ABC and descriptor projectors, and the
    descriptors' text tower."""

    def __init__(self, shape: ClassifierShape | None = None,
                 vocabulary: Vocabulary | None = None) -> None:
        super().__init__()
        self.shape = shape or ClassifierShape()
        self.vocabulary = vocabulary or Vocabulary(DESCRIPTORS)
        s = self.shape
        self.encoder = ViT(in_channels=3, img_size=(s.image_size, s.image_size),
                           patch_size=(s.patch_size, s.patch_size), hidden_size=s.hidden_size,
                           mlp_dim=s.mlp_dim, num_layers=s.num_layers, num_heads=s.num_heads,
                           spatial_dims=2, classification=False)
        self.head = nn.Linear(s.hidden_size, 1)
        self.image_projector = _projector(s.hidden_size, s.embedding)
        self.abc_projector = _projector(ABC_FEATURES, s.embedding)
        self.descriptor_projector = _projector(s.hidden_size, s.embedding)
        self.text_encoder = TextEncoder(len(self.vocabulary.tokens), embed_dim=s.embedding)
        # SigLIP's start: a logit scale of 10 and a bias of -10, every pair at first "no".
        self.descriptor_scale = nn.Parameter(torch.tensor(math.log(10.0)))
        self.descriptor_bias = nn.Parameter(torch.tensor(-10.0))
        self.register_buffer("descriptor_ids", self.vocabulary.encode(DESCRIPTORS),
                             persistent=True)

    def tokens(self, images: torch.Tensor) -> torch.Tensor:
        """The last block's patch tokens (B, n, hidden)."""
        tokens, _ = self.encoder(images)
        return tokens

    def forward(self, images: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """(melanoma logits (B,), image feature (B, hidden))."""
        feature = self.tokens(images).mean(dim=1)
        return self.head(feature).squeeze(-1), feature

    def image_embedding(self, feature: torch.Tensor) -> torch.Tensor:
        return F.normalize(self.image_projector(feature), dim=-1)

    def abc_embedding(self, abc: torch.Tensor) -> torch.Tensor:
        return F.normalize(self.abc_projector(abc), dim=-1)

    def descriptor_embeddings(self) -> torch.Tensor:
        """(13, d) L2-normalised embeddings of the fixed descriptor list."""
        return F.normalize(self.text_encoder(self.descriptor_ids), dim=-1)

    def descriptor_similarity(self, feature: torch.Tensor) -> torch.Tensor:
        """(B, 13) cosine similarity of each image to each descriptor."""
        image = F.normalize(self.descriptor_projector(feature), dim=-1)
        return image @ self.descriptor_embeddings().T

    def descriptor_logits(self, feature: torch.Tensor) -> torch.Tensor:
        scale = self.descriptor_scale.clamp(max=math.log(100.0)).exp()
        return scale * self.descriptor_similarity(feature) + self.descriptor_bias

    def freeze_encoder(self) -> None:
        for parameter in self.encoder.parameters():
            parameter.requires_grad_(False)


def token_grid(tokens: torch.Tensor, grid: int) -> torch.Tensor:
    """(B, n, hidden) patch tokens as a (B, hidden, grid, grid) map, row-major as the ViT's
    patch embedding lays them out."""
    batch, count, hidden = tokens.shape
    if count != grid * grid:
        raise ValueError(f"{count} tokens do not make a {grid} x {grid} grid")
    return tokens.transpose(1, 2).reshape(batch, hidden, grid, grid)


def nt_xent(image: torch.Tensor, abc: torch.Tensor, temperature: float) -> torch.Tensor:
    """Symmetric NT-Xent between L2-normalised (B, d) embeddings: row i of each side is the
    other's positive, every other row of the batch a negative."""
    if image.shape != abc.shape or image.shape[0] < 2:
        raise ValueError(f"NT-Xent needs two embeddings of one shape and a batch of at least "
                         f"2, not {tuple(image.shape)} and {tuple(abc.shape)}")
    logits = image @ abc.T / temperature
    targets = torch.arange(image.shape[0], device=image.device)
    return (F.cross_entropy(logits, targets) + F.cross_entropy(logits.T, targets)) / 2


def pair_similarities(image: torch.Tensor, abc: torch.Tensor
                      ) -> tuple[torch.Tensor, torch.Tensor]:
    """Cosine similarities of the positive pairs (the diagonal) and of the negative pairs
    (every other entry), for the alignment's histogram."""
    similarity = image @ abc.T
    diagonal = torch.eye(similarity.shape[0], dtype=torch.bool, device=similarity.device)
    return similarity[diagonal], similarity[~diagonal]


@dataclass(frozen=True)
class ClassifierEpoch:
    epoch: int
    train_loss: float
    val_loss: float
    val_classification_loss: float
    val_alignment_loss: float | None
    val_descriptor_loss: float | None
    val_accuracy: float
    seconds: float


def train_classifier(images: torch.Tensor, abc: torch.Tensor, targets: torch.Tensor,
                     train: list[int], val: list[int], *, shape: ClassifierShape,
                     epochs: int, batch_size: int, learning_rate: float, patience: int,
                     alignment_weight: float, freeze_encoder: bool, seed: int, device: str,
                     descriptors: torch.Tensor | None = None, descriptor_weight: float = 1.0,
                     confounder_rate: float = 0.0, on_epoch=None
                     ) -> tuple[CrossModalClassifier, list[ClassifierEpoch], int]:
    """Train on prepared ``images`` (N, 3, s, s) uint8, standardised ``abc`` (N, 8) and
    ``targets`` (N,) 0/1; the melanoma class is weighted by the nevi per melanoma of the
    training cases. ``descriptors`` (N, 13): each image's true descriptors (1/0), a row of
    -1 where the folder states none. ``confounder_rate``: the share of training photographs
    painted with an ink mark, and independently with hairs (``augment.paint_confounders``).
    Returns the network holding the epoch of lowest validation loss, the history and that
    epoch."""
    import time

    from radlens.models.training import EarlyStopping, fit
    from radlens.tasks.dermoscopy.augment import paint_confounders
    from radlens.tasks.dermoscopy.segment import augment

    if batch_size < 2:
        raise ValueError("the alignment needs batches of at least 2 images")
    torch.manual_seed(seed)
    generator = torch.Generator().manual_seed(seed)
    network = CrossModalClassifier(shape).to(device)
    if freeze_encoder:
        network.freeze_encoder()
    optimiser = torch.optim.AdamW([p for p in network.parameters() if p.requires_grad],
                                  lr=learning_rate, weight_decay=1e-4)
    positives = float(targets[train].sum())
    weight = torch.tensor((len(train) - positives) / max(positives, 1.0), device=device)

    def losses(indices: list[int], training: bool
               ) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor | None, torch.Tensor | None,
                          torch.Tensor]:
        x = images[indices].float().div(255).to(device)
        if training:
            (x,) = augment(generator, x)
            x = paint_confounders(generator, x, confounder_rate)
        y = targets[indices].float().to(device)
        logits, feature = network(x)
        classification = F.binary_cross_entropy_with_logits(logits, y, pos_weight=weight)
        alignment = None
        if alignment_weight > 0 and len(indices) >= 2:
            alignment = nt_xent(network.image_embedding(feature),
                                network.abc_embedding(abc[indices].to(device)),
                                shape.temperature)
        described = None
        if descriptors is not None and descriptor_weight > 0:
            truth = descriptors[indices].to(device)
            stated = truth[:, 0] >= 0
            if bool(stated.any()):
                described = F.binary_cross_entropy_with_logits(
                    network.descriptor_logits(feature[stated]), truth[stated].float())
        total = classification
        if alignment is not None:
            total = total + alignment_weight * alignment
        if described is not None:
            total = total + descriptor_weight * described
        return total, classification, alignment, described, logits

    def run_epoch(epoch: int) -> ClassifierEpoch:
        started = time.perf_counter()
        network.train()
        order = [train[i] for i in torch.randperm(len(train), generator=generator).tolist()]
        total, seen = 0.0, 0
        for start in range(0, len(order), batch_size):
            chosen = order[start:start + batch_size]
            if len(chosen) < 2:
                continue
            optimiser.zero_grad()
            loss = losses(chosen, True)[0]
            loss.backward()
            optimiser.step()
            total, seen = total + loss.item() * len(chosen), seen + len(chosen)
        network.eval()
        sums = {"total": 0.0, "classification": 0.0, "alignment": 0.0, "descriptors": 0.0}
        aligned, described_count, correct = 0, 0, 0
        with torch.no_grad():
            for start in range(0, len(val), batch_size):
                chosen = val[start:start + batch_size]
                loss, classification, alignment, described, logits = losses(chosen, False)
                sums["total"] += loss.item() * len(chosen)
                sums["classification"] += classification.item() * len(chosen)
                if alignment is not None:
                    sums["alignment"] += alignment.item() * len(chosen)
                    aligned += len(chosen)
                if described is not None:
                    sums["descriptors"] += described.item() * len(chosen)
                    described_count += len(chosen)
                correct += int(((logits > 0).long().cpu() == targets[chosen]).sum())
        count = max(1, len(val))
        return ClassifierEpoch(epoch, total / max(1, seen), sums["total"] / count,
                               sums["classification"] / count,
                               sums["alignment"] / aligned if aligned else None,
                               (sums["descriptors"] / described_count if described_count
                                else None),
                               correct / count, time.perf_counter() - started)

    result = fit(network, epochs=epochs, stopping=EarlyStopping(patience, 1e-4),
                 run_epoch=run_epoch, val_loss=lambda record: record.val_loss,
                 on_epoch=on_epoch)
    return network.cpu().eval(), result.history, result.best_epoch
