"""Student-side distillation losses: fused lm_head + CE + KL in token chunks, and a cosine loss
between student and teacher hidden states.

- targets.py: the teacher's targets as the loss reads them (top-k, sampled)
- divergences.py: the KL divergences by name (`loss.kl_mode`); a new one goes there
- chunked.py: `distill_loss`, the chunk loop over the lm_head that runs any divergence
- config.py: `LossConfig` and the weighted objective shared by training and eval
- channel_weights.py: `loss.channel_weights`, CE and KL weighted per token by its channel
- hidden.py: the hidden-state cosine loss and its projection

Shape suffixes: N positions (batch x sequence, flattened; the caller has already shifted, so row n
of every input describes the token that follows position n), D student width, E teacher width,
V vocabulary, K kept top-k ids, M distinct sampled ids (padded), T cached temperatures, C positions
in one chunk.

Every loss returns sum / num_valid_global, where the count spans all ranks and accumulation steps
(torchtitan style), so chunks, microbatches and ranks add up.
"""

from student_train.losses.channel_weights import ChannelWeights, position_weights_BP, weighted_valid_tokens
from student_train.losses.chunked import distill_loss
from student_train.losses.config import LossConfig, objective_weights
from student_train.losses.divergences import DIVERGENCES, Divergence, divergence_names, get_divergence, register
from student_train.losses.hidden import HiddenProjection, build_hidden_projection, hidden_cosine_loss
from student_train.losses.targets import SampledTargets, Targets, TopkTargets, lse_column

__all__ = [
    "ChannelWeights", "DIVERGENCES", "Divergence", "HiddenProjection", "LossConfig", "SampledTargets", "Targets", "TopkTargets",
    "build_hidden_projection", "distill_loss", "divergence_names", "get_divergence", "hidden_cosine_loss",
    "lse_column", "objective_weights", "position_weights_BP", "register", "weighted_valid_tokens",
]
