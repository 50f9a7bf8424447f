"""klest.logits: log-probs and exact divergences straight from logits, in PyTorch.

- :func:`token_logprobs`: log-probs of given tokens (and the entropy), never [N, V] in float32.
- :func:`full_kl`: exact per-position KL(π‖π_ref) or KL(π_ref‖π) over the whole vocabulary.
- :func:`full_jsd`: generalised Jensen-Shannon with weight β (β = 0 forward KL, β = 1 reverse KL).
- :func:`full_tv`: total variation.
- :func:`full_kl_from_hidden`, :func:`token_logprobs_from_hidden`: the output layer fused in
  (hidden @ weightᵀ block by block), never [N, V].
- :func:`topk_kl`: KL against a reference known only by its top-k log-probs (a lower bound).

Every function streams over chunks of rows with a custom autograd Function that saves a few
floats per row, accepts 16-bit logits (computed in float32) and a vocabulary-parallel
``process_group``; ``token_logprobs`` and ``full_kl`` also take the sampler's ``top_k``,
``top_p``, ``min_p`` (the distribution vLLM or Hugging Face draws from). Second derivatives
(``create_graph=True``, Hessian-vector products) are exact: backward then recomputes through
differentiable torch ops. Importing this module imports torch; importing ``klest`` does not.
"""

from ._api import (
    full_jsd,
    full_kl,
    full_kl_from_hidden,
    full_tv,
    token_logprobs,
    token_logprobs_from_hidden,
    topk_kl,
)

__all__ = [
    "full_jsd",
    "full_kl",
    "full_kl_from_hidden",
    "full_tv",
    "token_logprobs",
    "token_logprobs_from_hidden",
    "topk_kl",
]
