"""Text for the image-text models: a word-level vocabulary and a small transformer text tower.

The density task compares a mammogram with the BI-RADS atlas's four sentences and the
dermoscopy task ranks its fixed list of dermoscopic descriptors by their similarity to a
photograph; both encode their phrases with these. The phrases are few and fixed, so words
are the tokens (no sub-word tokenizer to ship); a word outside the vocabulary becomes
``<unk>``. A site's own CLIP folder brings its own tokenizer instead (``open_clip``).
"""

from __future__ import annotations

import re
from collections.abc import Sequence

import torch
from torch import nn

MAX_TOKENS = 24


def words(text: str) -> list[str]:
    return re.findall(r"[a-z]+", text.lower())


class Vocabulary:
    """Word-level tokens: the descriptions' words, and <pad>, <unk>, <bos>."""

    SPECIAL = ("<pad>", "<unk>", "<bos>")

    def __init__(self, texts: Sequence[str]) -> None:
        known = sorted({w for text in texts for w in words(text)})
        self.tokens = [*self.SPECIAL, *known]
        self.index = {token: i for i, token in enumerate(self.tokens)}

    @classmethod
    def of_tokens(cls, tokens: Sequence[str]) -> Vocabulary:
        """The vocabulary a model was saved with (its token list)."""
        vocabulary = cls([])
        vocabulary.tokens = list(tokens)
        vocabulary.index = {token: i for i, token in enumerate(vocabulary.tokens)}
        return vocabulary

    def encode(self, texts: Sequence[str], length: int = MAX_TOKENS) -> torch.Tensor:
        rows = []
        for text in texts:
            ids = [self.index["<bos>"]] + [self.index.get(w, 1) for w in words(text)]
            ids = ids[:length] + [0] * max(0, length - len(ids))
            rows.append(ids)
        return torch.tensor(rows, dtype=torch.long)


class TextEncoder(nn.Module):
    """Token embeddings, one transformer layer, mean over the words, a projection."""

    def __init__(self, vocabulary_size: int, width: int = 64, embed_dim: int = 64) -> None:
        super().__init__()
        self.tokens = nn.Embedding(vocabulary_size, width, padding_idx=0)
        self.positions = nn.Parameter(torch.zeros(MAX_TOKENS, width))
        self.layer = nn.TransformerEncoderLayer(width, nhead=4, dim_feedforward=2 * width,
                                                dropout=0.0, batch_first=True)
        self.projection = nn.Linear(width, embed_dim)

    def forward(self, token_ids: torch.Tensor) -> torch.Tensor:
        padding = token_ids == 0
        hidden = self.tokens(token_ids) + self.positions[: token_ids.shape[1]]
        hidden = self.layer(hidden, src_key_padding_mask=padding)
        keep = (~padding).unsqueeze(-1).float()
        pooled = (hidden * keep).sum(1) / keep.sum(1).clamp(min=1.0)
        return self.projection(pooled)
