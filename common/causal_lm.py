"""What both stages need of a Hugging Face causal LM: the label a loss ignores,
the dtype names, the decoder blocks, and the stream leaving a block.

Layer i (1-based) is the residual stream leaving decoder block i, before the
final norm: the numbering of `HiddenSpec.layers` and `loss.layer_pairs`.
"""

from __future__ import annotations

from typing import Iterable

import torch
from torch import nn
from torch.utils.hooks import RemovableHandle

IGNORE_INDEX = -100  # a label no loss counts: masked prompt tokens and padding (HF's convention)

# The short names configs and the CLI use.
TORCH_DTYPES = {"fp32": torch.float32, "bf16": torch.bfloat16, "fp16": torch.float16}


def dtype_name(dtype: torch.dtype) -> str:
    """torch's name of a dtype (float32, bfloat16, float16): what vLLM takes."""
    return str(dtype).removeprefix("torch.")


# The short names and torch's own.
DTYPES_BY_NAME = {name: dtype for short, dtype in TORCH_DTYPES.items() for name in (dtype_name(dtype), short)}


def decoder_layers(model: nn.Module, num_layers: int | None = None) -> nn.ModuleList:
    """The decoder blocks in order: the decoder's `layers`, else the first ModuleList of
    `num_layers` modules in it (default: the config's num_hidden_layers)."""
    if num_layers is None:
        num_layers = getattr(model.config, "num_hidden_layers", None)
    decoder = model.get_decoder() if hasattr(model, "get_decoder") else model
    layers = getattr(decoder, "layers", None)
    if isinstance(layers, nn.ModuleList) and (num_layers is None or len(layers) == num_layers):
        return layers
    for module in decoder.modules():
        if isinstance(module, nn.ModuleList) and len(module) == num_layers:
            return module
    raise ValueError(f"cannot find the decoder layers of {type(model).__name__} "
                     f"(no ModuleList of num_hidden_layers={num_layers} blocks)")


def capture_block_outputs(layers: nn.ModuleList, layer_numbers: Iterable[int],
                          captured: dict[int, torch.Tensor]) -> list[RemovableHandle]:
    """Forward hooks that put layer i's stream in `captured[i]` on every forward;
    the caller clears `captured` and removes the returned handles."""
    def hook_for(layer: int):
        def hook(_module, _inputs, output):
            # A block returns its output stream, or a tuple led by it.
            captured[layer] = output[0] if isinstance(output, (tuple, list)) else output
        return hook

    return [layers[layer - 1].register_forward_hook(hook_for(layer)) for layer in layer_numbers]
