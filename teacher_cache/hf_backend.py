"""Teacher backend on transformers: one padded forward per token-budget batch.

The decoder (the causal LM without its lm_head) runs on the batch; its
`last_hidden_state` is the final norm's output, i.e. the lm_head input. Forward
hooks on the selected decoder layers capture layer i = the residual stream
leaving decoder layer i (1-based), before the final norm. The lm_head is then
applied by `compute_targets` in token chunks, so [tokens x vocab] logits never
exist at once. Rows are right-padded: a causal model's valid positions never
see the padding, and the attention mask keeps padding out of their keys.

Shape suffixes: B rows in a batch, L padded length, D hidden size, N target
positions (each row's 0..L_b-2, rows in batch order), H kept hidden positions.
"""

from __future__ import annotations

from typing import Iterable, Iterator, Sequence

import torch
from torch import nn

from common.causal_lm import DTYPES_BY_NAME, capture_block_outputs, decoder_layers
from common.codec import quantize_fp8
from common.shard_format import TeacherRow
from common.spec import ShardSpec
from teacher_cache.backend import (BackendOptions, SourceRow, assemble_rows, flat_uniforms, kept_positions,
                                   read_teacher_info)
from teacher_cache.targets import compute_targets


def resolve_device(name: str) -> torch.device:
    if name == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    device = torch.device(name)
    if device.type == "cuda" and not torch.cuda.is_available():
        raise ValueError(f"--device {name}: CUDA is not available on this machine")
    return device


def resolve_dtype(name: str, device: torch.device) -> torch.dtype:
    if name == "auto":
        # bf16 is what GPUs run the teacher in; CPUs are faster and exact in fp32.
        return torch.bfloat16 if device.type == "cuda" else torch.float32
    if name not in DTYPES_BY_NAME:
        raise ValueError(f"--dtype must be auto or one of {', '.join(DTYPES_BY_NAME)}, got {name!r}")
    return DTYPES_BY_NAME[name]


def token_budget_batches(rows: Sequence[SourceRow], max_tokens: int) -> list[list[SourceRow]]:
    """Longest rows first, grouped so that rows x padded length <= max_tokens.
    Sorting by length keeps padding small; a row longer than the budget runs alone."""
    if max_tokens < 1:
        raise ValueError(f"--max-tokens-per-batch must be >= 1, got {max_tokens}")
    ordered = sorted(rows, key=lambda r: (-r.num_tokens, r.row_id))
    batches: list[list[SourceRow]] = []
    for row in ordered:
        # Descending order: the batch's first row sets its padded length.
        if batches and (len(batches[-1]) + 1) * batches[-1][0].num_tokens <= max_tokens:
            batches[-1].append(row)
        else:
            batches.append([row])
    return batches


# `HFBackend.run` batches a stream of rows a window at a time: enough rows for
# `token_budget_batches` to sort by length and fill batches, few enough that the
# stream is never read (and held in memory) far ahead of the device.
WINDOW_ROWS = 256
WINDOW_BATCHES = 16  # a window closes once it holds this many batches' worth of tokens


def row_windows(rows: Iterable[SourceRow], max_rows: int, max_tokens: int,
                rows_per_shard: int | None = None) -> Iterator[list[SourceRow]]:
    """Consecutive runs of `rows`, read lazily: each ends after `max_rows` rows or
    once it holds `max_tokens` tokens, whichever comes first, and (with
    `rows_per_shard`) before a row of another shard, so a shard's windows depend
    only on its own rows."""
    window: list[SourceRow] = []
    tokens = 0
    for row in rows:
        if window and rows_per_shard and row.row_id // rows_per_shard != window[0].row_id // rows_per_shard:
            yield window
            window, tokens = [], 0
        window.append(row)
        tokens += row.num_tokens
        if len(window) >= max_rows or tokens >= max_tokens:
            yield window
            window, tokens = [], 0
    if window:
        yield window


class HFBackend:
    def __init__(self, spec: ShardSpec, options: BackendOptions, model: nn.Module | None = None):
        """`model`: an already loaded teacher whose config is `options.model`'s
        (benchmarks and notebooks); loaded from `options.model` when None."""
        from transformers import AutoModelForCausalLM

        self.spec, self.options = spec, options
        self.info = read_teacher_info(options.model, options.trust_remote_code)
        bad_layers = [layer for layer in spec.hidden.layers if layer > self.info.num_layers]
        if bad_layers:
            raise ValueError(f"hidden layers {bad_layers} exceed the teacher's {self.info.num_layers} layers")
        self.device = resolve_device(options.device)
        self.dtype = resolve_dtype(options.dtype, self.device)
        if model is None and options.load_format == "dummy":
            from transformers import AutoConfig

            config = AutoConfig.from_pretrained(options.model, trust_remote_code=options.trust_remote_code)
            torch.manual_seed(0)
            with self.device:  # random weights made where they run: a 20B teacher never passes the host
                model = AutoModelForCausalLM.from_config(config, dtype=self.dtype,
                                                         trust_remote_code=options.trust_remote_code)
        elif model is None:
            model = AutoModelForCausalLM.from_pretrained(options.model, dtype=self.dtype, use_safetensors=True,
                                                         trust_remote_code=options.trust_remote_code)
        self.model = model.to(self.device).eval()
        self.decoder = model.get_decoder() if hasattr(model, "get_decoder") else model.base_model
        self.lm_head = model.get_output_embeddings()
        text_config = model.config.get_text_config() if hasattr(model.config, "get_text_config") else model.config
        self.softcap = getattr(text_config, "final_logit_softcapping", None)
        self._captured: dict[int, torch.Tensor] = {}
        self._hooks = capture_block_outputs(decoder_layers(model, self.info.num_layers), spec.hidden.layers,
                                            self._captured)

    def _logits(self, hidden_nD: torch.Tensor) -> torch.Tensor:
        # The lm_head's own dtype: target selection reads bf16 logits without a
        # float32 copy and sums in float32 itself.
        logits_nV = self.lm_head(hidden_nD)
        if self.softcap:
            logits_nV = self.softcap * torch.tanh(logits_nV.float() / self.softcap)
        return logits_nV

    def run(self, rows: Iterable[SourceRow]) -> Iterator[TeacherRow]:
        """TeacherRows in batch order. `rows` is read lazily, a window at a time
        (`row_windows`, never across a shard boundary), and each window is cut into
        `token_budget_batches`, so one call can stream a whole run's rows."""
        # One batch of lookahead, across windows (and shards) too: batch i+1 is launched
        # before batch i's results are split into rows, so the device computes while the
        # host reads the next window, copies and encodes; it never drains between shards.
        budget = self.options.max_tokens_per_batch
        pending = None
        for window in row_windows(rows, WINDOW_ROWS, WINDOW_BATCHES * budget, self.options.rows_per_shard):
            empty = [r for r in window if r.num_tokens == 0]  # no targets, no hidden states: nothing to run
            if empty:
                yield from self._empty_rows(empty)
            for batch in token_budget_batches([r for r in window if r.num_tokens], budget):
                launched = self._launch(batch)
                if pending is not None:
                    yield from self._finish(*pending)
                pending = launched
        if pending is not None:
            yield from self._finish(*pending)

    @torch.no_grad()
    def _launch(self, batch: list[SourceRow]):
        """Forward, target selection and hidden gathers for one batch, then an async
        copy of the (small) results to host memory. Index tensors are built on the
        host so nothing here waits for the device."""
        lengths = [r.num_tokens for r in batch]
        max_len = max(lengths)
        input_ids_BL = torch.zeros((len(batch), max_len), dtype=torch.long)
        attention_mask_BL = torch.zeros((len(batch), max_len), dtype=torch.long)
        for b, row in enumerate(batch):
            input_ids_BL[b, :row.num_tokens] = torch.from_numpy(row.input_ids.astype("int64"))
            attention_mask_BL[b, :row.num_tokens] = 1
        # Target t is the distribution of token t+1: positions 0..L-2 of each row.
        target_index_N = torch.cat([torch.arange(n - 1) + b * max_len for b, n in enumerate(lengths)])
        self._captured.clear()
        out = self.decoder(input_ids=input_ids_BL.to(self.device), attention_mask=attention_mask_BL.to(self.device),
                           use_cache=False)
        final_BLD = out.last_hidden_state if hasattr(out, "last_hidden_state") else out[0]
        final_ND = final_BLD.reshape(-1, final_BLD.shape[-1])[target_index_N.to(self.device)]
        targets = compute_targets(final_ND, self._logits, self.spec.targets, flat_uniforms(batch, self.spec),
                                  chunk_size=self.options.logits_chunk, config=self.options.selection)
        hidden_by_layer, hidden_scales = {}, {}
        if self.spec.hidden.layers:
            flat_index_H = torch.cat([torch.from_numpy(kept_positions(row, self.spec)).long() + b * max_len
                                      for b, row in enumerate(batch)]).to(self.device)
            for layer in self.spec.hidden.layers:
                hidden_HD = self._captured[layer].reshape(-1, self.info.hidden_size)[flat_index_H]
                if self.spec.hidden.dtype == "fp8":
                    # Quantized before the copy: half the bytes to the host, no fp8 conversion on the CPU.
                    hidden_HD, hidden_scales[layer] = quantize_fp8(hidden_HD)
                hidden_by_layer[layer] = hidden_HD
        self._captured.clear()
        on_device = self.device.type == "cuda"
        targets = targets.to("cpu", non_blocking=on_device)
        hidden_by_layer = {layer: h.to("cpu", non_blocking=on_device) for layer, h in hidden_by_layer.items()}
        hidden_scales = {layer: s.to("cpu", non_blocking=on_device) for layer, s in hidden_scales.items()}
        copied = torch.cuda.Event() if on_device else None
        if copied is not None:
            copied.record()
        return batch, targets, hidden_by_layer, hidden_scales, copied

    def _finish(self, batch, targets, hidden_by_layer, hidden_scales, copied) -> list[TeacherRow]:
        if copied is not None:
            copied.synchronize()
        return assemble_rows(batch, targets, hidden_by_layer, self.spec, hidden_scales)

    def _empty_rows(self, rows: list[SourceRow]) -> list[TeacherRow]:
        targets = compute_targets(torch.zeros((0, self.info.hidden_size), device=self.device), self._logits,
                                  self.spec.targets, flat_uniforms(rows, self.spec))
        hidden = {layer: torch.zeros((0, self.info.hidden_size)) for layer in self.spec.hidden.layers}
        return assemble_rows(rows, targets, hidden, self.spec)

    def close(self) -> None:
        for hook in self._hooks:
            hook.remove()
        self._hooks = []
        self._captured.clear()
