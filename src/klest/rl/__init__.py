"""klest.rl: KL penalties and losses for RL on language models, with the gradient you chose.

Per-token inputs [batch, seq]: ``logp`` (policy log-probs of the sampled tokens), ``ref_logp``
(reference), optional ``old_logp`` (the policy that sampled) and ``mask``. ``ℓ = logp - ref_logp``.

- :func:`kl_penalty`: detached per-token penalty for the reward.
- :func:`kl_loss`: a scalar loss term plus :class:`KLDiagnostics`, fused.
- :func:`kl_per_token`: the per-token term with the chosen value and gradient.
- :func:`full_kl_per_token`, :func:`full_kl_loss`, :func:`full_kl_penalty`: the exact
  full-vocabulary KL at each position, from logits (:mod:`klest.logits`).
- :func:`aggregate`, :func:`reward_to_go`: masked reductions (verl's names, and TRL's loss
  types as ``"trl:<loss_type>"``), returns.
- :func:`sequence_kl`: the sequence-level KL (k1, full-vocabulary, cross-fitted mix) with a
  gradient whose expectation is ∇ of the sequence KL, on- or off-policy (per-decision weights).
- :mod:`klest.rl.presets`: what verl, OpenRLHF, TRL, NeMo-RL and slime compute, by name and
  release (``"nemo_rl@0.7.0:k3"``).

Importing this module imports torch; importing ``klest`` does not.
"""

from . import presets
from .aggregate import AGGREGATIONS, TRL_LOSS_TYPES, aggregate, aggregation_scale, reward_to_go
from .logits_loss import full_kl_loss, full_kl_penalty, full_kl_per_token
from .penalty import GRADIENTS, KLDiagnostics, KLLoss, kl_loss, kl_penalty, kl_per_token
from .sequence import (
    SEQUENCE_ESTIMATORS,
    WEIGHTINGS,
    SequenceKL,
    fit_alpha,
    sequence_kl,
    sequence_kl_from_logits,
)

__all__ = [
    "AGGREGATIONS",
    "GRADIENTS",
    "SEQUENCE_ESTIMATORS",
    "TRL_LOSS_TYPES",
    "WEIGHTINGS",
    "KLDiagnostics",
    "KLLoss",
    "SequenceKL",
    "aggregate",
    "aggregation_scale",
    "fit_alpha",
    "full_kl_loss",
    "full_kl_penalty",
    "full_kl_per_token",
    "kl_loss",
    "kl_penalty",
    "kl_per_token",
    "presets",
    "reward_to_go",
    "sequence_kl",
    "sequence_kl_from_logits",
]
