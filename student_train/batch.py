"""One micro batch of student inputs and teacher targets, as the loader yields it.

Shape suffixes: B rows (batch rows; packed, each holds R cache rows), L tokens
(right-padded), P = L - 1 target positions (position t describes token t + 1),
D teacher hidden size (the targets' own in common/targets/).
"""

from __future__ import annotations

import dataclasses
from dataclasses import dataclass, field

import torch

from common.causal_lm import IGNORE_INDEX
from common.codec import dequantize_fp8
from common.targets import BatchTargets

PAD_TOKEN_ID = 0


@dataclass
class StudentBatch:
    # int64 source row ids of each batch row, R = 1 unless packed (several rows back to back);
    # -1 for filler rows (see loader) and empty slots
    row_ids_BR: torch.Tensor
    input_ids_BL: torch.Tensor  # int64, right-padded with PAD_TOKEN_ID
    attention_mask_BL: torch.Tensor  # int64, 1 real / 0 pad
    labels_BL: torch.Tensor  # int64, IGNORE_INDEX at pads and where the source masked
    # Packed batches only: positions restarting at 0 with each row (and the pad tail), which
    # is how the model keeps rows apart; the model then gets no attention mask.
    position_ids_BL: torch.Tensor | None = None
    # Teacher targets for positions 0..L-2 (position t describes token t+1): the target kind's
    # BatchTargets (common.targets), e.g. TopkBatchTargets; None when none are loaded.
    targets: BatchTargets | None = None
    # Teacher layer -> [B, L, D] in the cache's stored form (bf16, or fp8 bytes as uint8 with
    # per-token scales in teacher_hidden_scale, 0 where nothing is stored); `hidden_float`
    # dequantizes on whatever device the batch is on. Not shifted: position t is token t.
    teacher_hidden: dict[int, torch.Tensor] = field(default_factory=dict)
    teacher_hidden_scale: dict[int, torch.Tensor] = field(default_factory=dict)  # layer -> [B, L] float32
    hidden_mask_BL: torch.Tensor | None = None  # bool: teacher hidden stored here and the token is real
    num_tokens: int = 0  # real tokens in the batch (filler rows excluded)
    # Caches with the optional row columns (common.row_columns), per token at each row's offset
    # (packed rows too); -1 at pads and filler rows. Not shifted: position t is token t.
    channels_BL: torch.Tensor | None = None  # int64 channel code (common.row_columns.CHANNEL_NAMES)
    source_ids_BL: torch.Tensor | None = None  # int64 index into the loader's `source_names`

    @property
    def row_ids_B(self) -> torch.Tensor:
        """The source row id of each batch row (a batch that is not packed)."""
        assert self.row_ids_BR.shape[1] == 1, "a packed batch holds several rows per batch row"
        return self.row_ids_BR[:, 0]

    @property
    def batch_size(self) -> int:
        return int(self.input_ids_BL.shape[0])

    @property
    def seq_len(self) -> int:
        return int(self.input_ids_BL.shape[1])

    def target_labels_BP(self) -> torch.Tensor:
        """Labels of the tokens positions 0..L-2 predict, IGNORE_INDEX at pads: what the loss
        trains on, and so what the trainer counts for its global normaliser."""
        return self.labels_BL[:, 1:].masked_fill(self.attention_mask_BL[:, 1:] == 0, IGNORE_INDEX)

    def target_channels_BP(self) -> torch.Tensor | None:
        """The channel of the token each position 0..L-2 predicts (shifted like the labels)."""
        return None if self.channels_BL is None else self.channels_BL[:, 1:]

    def target_source_ids_BP(self) -> torch.Tensor | None:
        """The source of the row each position 0..L-2 belongs to (that of the token it predicts)."""
        return None if self.source_ids_BL is None else self.source_ids_BL[:, 1:]

    def _map(self, fn) -> "StudentBatch":
        changes = {}
        for f in dataclasses.fields(self):
            value = getattr(self, f.name)
            if isinstance(value, torch.Tensor):
                changes[f.name] = fn(value)
        if self.targets is not None:
            changes["targets"] = self.targets.map(fn)
        changes["teacher_hidden"] = {layer: fn(h) for layer, h in self.teacher_hidden.items()}
        changes["teacher_hidden_scale"] = {layer: fn(s) for layer, s in self.teacher_hidden_scale.items()}
        return dataclasses.replace(self, **changes)

    def hidden_float(self, layer: int) -> torch.Tensor:
        """Teacher hidden states of `layer`, [B, L, D] float32 (or wider, when given wider)."""
        hidden_BLD = self.teacher_hidden[layer]
        scale_BL = self.teacher_hidden_scale.get(layer)
        if scale_BL is not None:
            return dequantize_fp8(hidden_BLD, scale_BL)
        return hidden_BLD if hidden_BLD.dtype in (torch.float32, torch.float64) else hidden_BLD.float()

    def to(self, device, non_blocking: bool = False) -> "StudentBatch":
        return self._map(lambda t: t.to(device, non_blocking=non_blocking))

    def pin_memory(self) -> "StudentBatch":
        return self._map(lambda t: t if t.is_pinned() else t.pin_memory())
