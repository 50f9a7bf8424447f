"""klest.rl: KL penalties and losses for RL on language models, with the gradient you chose.

Per-token inputs [batch, seq]: ``logp`` (policy log-probs of the sampled tokens), ``ref_logp``
(reference), optional ``old_logp`` (the policy that sampled) and ``mask``. ``ℓ = logp - ref_logp``.

- :func:`kl_penalty`: detached per-token penalty for the reward.
- :func:`kl_loss`: a scalar loss term plus :class:`KLDiagnostics`, fused.
- :func:`kl_per_token`: the per-token term with the chosen value and gradient.
- :func:`aggregate`, :func:`reward_to_go`: masked reductions (verl's names), returns.
- :mod:`klest.rl.presets`: what verl, OpenRLHF, TRL and NeMo-RL compute, by name.

Importing this module imports torch; importing ``klest`` does not.
"""

from . import presets
from .aggregate import AGGREGATIONS, aggregate, aggregation_scale, reward_to_go
from .penalty import GRADIENTS, KLDiagnostics, KLLoss, kl_loss, kl_penalty, kl_per_token

__all__ = [
    "AGGREGATIONS",
    "GRADIENTS",
    "KLDiagnostics",
    "KLLoss",
    "aggregate",
    "aggregation_scale",
    "kl_loss",
    "kl_penalty",
    "kl_per_token",
    "presets",
    "reward_to_go",
]
