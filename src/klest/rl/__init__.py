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
- :class:`KLController`: the KL coefficient β, fixed or adaptive (verl/OpenRLHF's controller,
  and one that ignores deviations within the noise).
- :func:`mismatch`, :func:`importance_weights`, :func:`binary_kl`, :func:`binary_tv`: is the
  sampler the policy you train? Diagnostics, corrections and trust regions (docs/mismatch.md).
- :mod:`klest.rl.presets`: what verl, OpenRLHF, TRL, NeMo-RL and slime compute, by name and
  release (``"nemo_rl@0.7.0:k3"``).

Importing this module imports torch; importing ``klest`` does not.
"""

from . import presets
from .aggregate import AGGREGATIONS, TRL_LOSS_TYPES, aggregate, aggregation_scale, reward_to_go
from .binary import binary_kl, binary_tv
from .controller import CONTROLLER_KINDS, KLController
from .importance import IMPORTANCE_PRESETS, ImportanceStats, ImportanceWeights, importance_weights
from .logits_loss import full_kl_loss, full_kl_penalty, full_kl_per_token
from .mismatch import MISMATCH_NAMES, MismatchReport, mismatch
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
    "CONTROLLER_KINDS",
    "GRADIENTS",
    "IMPORTANCE_PRESETS",
    "MISMATCH_NAMES",
    "SEQUENCE_ESTIMATORS",
    "TRL_LOSS_TYPES",
    "WEIGHTINGS",
    "ImportanceStats",
    "ImportanceWeights",
    "KLController",
    "KLDiagnostics",
    "KLLoss",
    "MismatchReport",
    "SequenceKL",
    "aggregate",
    "aggregation_scale",
    "binary_kl",
    "binary_tv",
    "fit_alpha",
    "full_kl_loss",
    "full_kl_penalty",
    "full_kl_per_token",
    "importance_weights",
    "kl_loss",
    "kl_penalty",
    "kl_per_token",
    "mismatch",
    "presets",
    "reward_to_go",
    "sequence_kl",
    "sequence_kl_from_logits",
]
