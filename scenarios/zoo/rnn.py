"""LSTM language models: next-token logits [B, T, V] from token ids [B, T].

``lstm_cell_lm`` unrolls time in Python, calling each ``nn.LSTMCell`` once per step, so a cell
is T units of the training step (and a chain over time); ``lstm_lm`` runs the same task with one
fused ``nn.LSTM`` call.
"""

from __future__ import annotations

import torch
from torch import Tensor, nn


class LSTMCellLM(nn.Module):
    """Embedding -> a stack of ``nn.LSTMCell`` stepped over time -> linear head."""

    def __init__(self, vocab_size: int, embed_dim: int, hidden_size: int, num_layers: int, dropout: float) -> None:
        super().__init__()
        self.embedding = nn.Embedding(vocab_size, embed_dim)
        sizes = [embed_dim] + [hidden_size] * num_layers
        self.cells = nn.ModuleList(nn.LSTMCell(sizes[i], hidden_size) for i in range(num_layers))
        self.drop = nn.Dropout(dropout)
        self.head = nn.Linear(hidden_size, vocab_size)

    def forward(self, idx: Tensor) -> Tensor:
        """``idx``: token ids [B, T] -> logits [B, T, V]."""
        x = self.drop(self.embedding(idx))  # [B, T, E]
        batch, steps = idx.shape
        state = [(x.new_zeros(batch, c.hidden_size), x.new_zeros(batch, c.hidden_size)) for c in self.cells]
        outputs = []
        for t in range(steps):
            h = x[:, t]
            for layer, cell in enumerate(self.cells):
                state[layer] = cell(h, state[layer])
                h = state[layer][0]
            outputs.append(h)
        hidden = self.drop(torch.stack(outputs, dim=1))  # [B, T, H]
        return self.head(hidden)


class LSTMLM(nn.Module):
    """Embedding -> ``nn.LSTM`` (``num_layers`` deep) -> linear head."""

    def __init__(self, vocab_size: int, embed_dim: int, hidden_size: int, num_layers: int, dropout: float) -> None:
        super().__init__()
        self.embedding = nn.Embedding(vocab_size, embed_dim)
        between_layers = dropout if num_layers > 1 else 0.0
        self.lstm = nn.LSTM(embed_dim, hidden_size, num_layers, batch_first=True, dropout=between_layers)
        self.drop = nn.Dropout(dropout)
        self.head = nn.Linear(hidden_size, vocab_size)

    def forward(self, idx: Tensor) -> Tensor:
        """``idx``: token ids [B, T] -> logits [B, T, V]."""
        hidden, _ = self.lstm(self.drop(self.embedding(idx)))  # [B, T, H]
        return self.head(self.drop(hidden))


def lstm_cell_lm(
    vocab_size: int = 10000,
    embed_dim: int = 1024,
    hidden_size: int = 1024,
    num_layers: int = 2,
    dropout: float = 0.0,
) -> LSTMCellLM:
    """LSTM language model unrolled over time with ``num_layers`` stacked ``nn.LSTMCell``."""
    return LSTMCellLM(vocab_size, embed_dim, hidden_size, num_layers, dropout)


def lstm_lm(
    vocab_size: int = 10000,
    embed_dim: int = 1024,
    hidden_size: int = 1024,
    num_layers: int = 2,
    dropout: float = 0.0,
) -> LSTMLM:
    """LSTM language model with one ``nn.LSTM`` of ``num_layers`` layers."""
    return LSTMLM(vocab_size, embed_dim, hidden_size, num_layers, dropout)
