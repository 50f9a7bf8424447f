r"""klest's KL terms in verl 0.9.1: :func:`install` and :func:`klest_ppo_loss`.

**Every KL in verl goes through one function.** ``verl.trainer.ppo.core_algos.kl_penalty(logprob,
ref_logprob, kl_penalty)`` strips a trailing ``"+"`` from the name and calls
``core_algos.kl_penalty_forward`` by module-global lookup; the actor's KL loss
(``workers/utils/losses.py::ppo_loss``, ``actor_rollout_ref.actor.kl_loss_type``), the KL in the
reward (``ray_trainer.apply_kl_penalty``, ``algorithm.kl_penalty``) and the distillation estimator
losses (``distillation_loss.loss_mode``) all call it. :func:`install` wraps
``kl_penalty_forward`` so that every name starting with ``"klest:"`` computes klest's term
(:mod:`klest.integrations._kl_names`: ``"klest:<preset>"`` or
``"klest:<estimator>[:<gradient>]"``; ``"klest:k3"`` is klest's default, value k3, per-token
derivative ℓ = logp - ref_logp, whose expectation is ∇KL(π‖π_ref)), with its value and its
gradient; other names reach verl's own code unchanged. It also lets verl's distillation config
accept ``"klest:..."`` loss modes (they run verl's single-sample estimator loss, whose KL is then
klest's).

**A trailing "+" keeps verl's meaning**: straight-through, the value of the term before the
``"+"``, the gradient of ½ℓ² (unclipped, unweighted). So ``"klest:X+"`` has the value of
``"klest:X"`` and the per-token derivative ℓ, whatever X's own gradient; ``"klest:k3+"`` equals
``"klest:k3"`` (klest's default already has that gradient) and
``"klest:verl@0.9.1:low_var_kl+"`` equals verl's ``"low_var_kl+"``.

**What verl passes.** ``kl_penalty_forward`` receives the two log-prob tensors and the name, no
response mask and no old log-probs: presets that weight by π/π_old (``uses_old_logp``) run
on-policy there (weight 1, or exp(logp - sg logp) for a differentiable weight), and terms that sum
along a row (``gradient="sequence_reverse_kl"``, sequence-level weights) are refused, since the row
would include padding. :func:`klest_ppo_loss` has the mask and the old log-probs.

**Ray.** A patch made in the driver does not reach verl's Ray workers (the actor, the reference,
the trainer's ``TaskRunner`` are separate processes). Run :func:`install` in every worker with
Ray's setup hook, e.g. on verl's command line::

    python -m verl.trainer.main_ppo ... \
        actor_rollout_ref.actor.kl_loss_type=klest:k3 \
        +ray_kwargs.ray_init.runtime_env.worker_process_setup_hook=klest.integrations.verl.install

or ``ray.init(runtime_env={"worker_process_setup_hook": "klest.integrations.verl.install"})``
before verl starts Ray. klest must be installed where the workers run.

**A sequence-level KL** cannot be a per-token ``kl_penalty_forward``: pass
``functools.partial(klest_ppo_loss, config=actor_config, kl="sequence_kl:k1")`` to
``ActorRolloutRefWorker.set_loss_fn``. A full-vocabulary KL is not possible there: verl's loss
functions never see the reference's logits (the reference worker returns only the sampled
tokens' log-probs, ``ref_log_prob``).

Importing this module imports verl (``pip install 'klest[verl]'``); ``import klest`` and
``import klest.integrations`` do not.
"""

from __future__ import annotations

import copy
import unittest
from collections.abc import Callable
from typing import Any, Literal

import torch

from ..errors import KlestError
from ..rl.sequence import sequence_kl
from ._kl_names import PREFIX, is_klest_name, parse


class _VerlMissing(ImportError, unittest.SkipTest):
    """verl is not installed (an ImportError; test collectors treat it as a skip)."""


try:
    import verl.trainer.distillation.losses as _distillation
    import verl.trainer.ppo.core_algos as _core_algos
    from verl.utils.metric import AggregationType, Metric
    from verl.workers.utils.losses import ppo_loss as _verl_ppo_loss
    from verl.workers.utils.padding import no_padding_2_padding
except ImportError as _e:  # pragma: no cover - exercised only without verl
    raise _VerlMissing(
        "klest.integrations.verl needs verl 0.9.1: pip install 'klest[verl]'"
    ) from _e

__all__ = ["SEQUENCE_OPTIONS", "install", "installed", "klest_ppo_loss", "uninstall"]

#: where a bad ``"klest:..."`` name came from, as :class:`klest.KlestError` names it
ARGUMENT = "kl_penalty"
_ORIGINAL = "__klest_original__"

SequenceOption = Literal["sequence_kl:k1"]
SEQUENCE_OPTIONS: tuple[SequenceOption, ...] = ("sequence_kl:k1",)
_NEEDS_REFERENCE_LOGITS = ("full_kl", "sequence_kl", "sequence_kl:full", "sequence_kl:mix")


def _kl_penalty_forward(original: Callable[..., torch.Tensor]) -> Callable[..., torch.Tensor]:
    def kl_penalty_forward(
        logprob: torch.Tensor, ref_logprob: torch.Tensor, kl_penalty: str
    ) -> torch.Tensor:
        if is_klest_name(kl_penalty):
            return parse(kl_penalty, ARGUMENT).per_token(logprob, ref_logprob)
        return original(logprob, ref_logprob, kl_penalty)

    kl_penalty_forward.__doc__ = (
        "verl's kl_penalty_forward, with klest's term for names starting with 'klest:' "
        "(klest.integrations.verl.install)."
    )
    setattr(kl_penalty_forward, _ORIGINAL, original)
    return kl_penalty_forward


def _distillation_getter(original: Callable[[str], Any]) -> Callable[[str], Any]:
    """A ``get_distillation_loss_fn``/``_settings`` that maps a ``"klest:..."`` loss mode to verl's
    single-sample estimator loss (the one registered for ``"k3"``), whose KL is then klest's."""

    def get(loss_name: str) -> Any:
        if is_klest_name(loss_name):
            parse(loss_name.removesuffix("+"), "loss_mode")
            return original("k3")
        return original(loss_name)

    get.__doc__ = original.__doc__
    setattr(get, _ORIGINAL, original)
    return get


_TARGETS: tuple[tuple[Any, str, Callable[[Any], Any]], ...] = (
    (_core_algos, "kl_penalty_forward", _kl_penalty_forward),
    (_distillation, "get_distillation_loss_fn", _distillation_getter),
    (_distillation, "get_distillation_loss_settings", _distillation_getter),
)


def installed() -> bool:
    """Whether :func:`install` is in effect in this process."""
    return hasattr(_core_algos.kl_penalty_forward, _ORIGINAL)


def install() -> None:
    """Make ``"klest:..."`` names valid wherever verl computes a KL, in this process.

    Wraps ``core_algos.kl_penalty_forward`` (the loss, the reward and the distillation estimator
    losses reach it through ``core_algos.kl_penalty``) and verl's distillation loss-mode lookups.
    Idempotent; takes no argument, so it serves as Ray's ``worker_process_setup_hook``
    (``"klest.integrations.verl.install"``). :func:`uninstall` undoes it.
    """
    for module, attr, wrap in _TARGETS:
        current = getattr(module, attr)
        if not hasattr(current, _ORIGINAL):
            setattr(module, attr, wrap(current))


def uninstall() -> None:
    """Undo :func:`install` (verl's own functions back in place); a no-op if not installed."""
    for module, attr, _ in _TARGETS:
        current = getattr(module, attr)
        if hasattr(current, _ORIGINAL):
            setattr(module, attr, getattr(current, _ORIGINAL))


def _metric_aggregation(config: Any, data: Any) -> Any:
    """verl's rule (ppo_loss): SUM when the loss is normalised by global batch facts, else MEAN."""
    if (
        data["dp_size"] > 1
        or data["batch_num_tokens"] is not None
        or data["global_batch_size"] is not None
        or config.loss_scale_factor is not None
    ):
        return AggregationType.SUM
    return AggregationType.MEAN


def klest_ppo_loss(
    config: Any,
    model_output: dict[str, Any],
    data: Any,
    dp_group: Any = None,
    *,
    kl: str = "sequence_kl:k1",
    aggregation: str | None = None,
) -> tuple[torch.Tensor, dict[str, Any]]:
    r"""verl's ``ppo_loss`` with its KL term replaced by klest's; a loss for ``set_loss_fn``.

    .. math:: \text{loss} = \text{ppo\_loss}_{\text{no KL}} + \beta\cdot
        \mathrm{agg}\big(\text{term}_{bt}\big), \qquad \beta = \texttt{config.kl\_loss\_coef}

    The policy-gradient and entropy terms are verl's own (``ppo_loss`` with ``use_kl_loss``
    off); with ``config.use_kl_loss`` the KL term is added (metrics ``kl_loss`` and ``kl_coef`` as
    verl logs them), else nothing. ``kl``:

    - ``"sequence_kl:k1"``: :func:`klest.rl.sequence_kl` with ``estimator="k1"``: row b's terms sum
      to Σ_t ℓ_bt, and the derivative at token t is Σ_{s>=t} ℓ_bs (the reward-to-go of ℓ), whose
      expectation is ∇ of the sequence KL(π‖π_ref) (what k1 in the reward with γ = 1 returns
      gives); off-policy (``old_log_probs`` ≠ the current log-probs, later PPO epochs) with
      per-decision importance weights. Reduced by default with ``"seq-mean-token-sum"`` (β times
      the mean sequence KL).
    - a ``"klest:..."`` name (:mod:`klest.integrations._kl_names`): that per-token term with the
      response mask and the detached π/π_old from ``old_log_probs`` (which ``install()``'s
      ``kl_loss_type`` path cannot pass), reduced with ``config.loss_agg_mode`` by default.

    ``aggregation`` overrides the reduction (verl's ``agg_loss`` modes, with its global batch
    normalisers). ``"sequence_kl"``, ``"sequence_kl:full"``, ``"sequence_kl:mix"`` and
    ``"full_kl"`` are refused: verl never gives a loss function the reference's logits.

    Use: ``worker.set_loss_fn(functools.partial(klest_ppo_loss, config=actor_config,
    kl="sequence_kl:k1"))`` (the partial is pickled to the workers; klest must be installed there).
    """
    if kl in _NEEDS_REFERENCE_LOGITS:
        raise KlestError(
            f"{kl!r} needs the reference model's logits over the whole vocabulary, and verl 0.9.1 "
            "never passes them to a loss function (its reference worker computes only the sampled "
            "tokens' log-probs, ref_log_prob); use 'sequence_kl:k1' (the sequence KL from those "
            "log-probs) or a per-token 'klest:...' name",
            argument="kl",
        )
    term_name = None
    if kl not in SEQUENCE_OPTIONS:
        if not is_klest_name(kl):
            raise KlestError(
                f"must be one of {', '.join(map(repr, SEQUENCE_OPTIONS))} or a {PREFIX!r} name, "
                f"got {kl!r}",
                argument="kl",
            )
        term_name = parse(kl, "kl")
    if not config.use_kl_loss:
        return _verl_ppo_loss(config, model_output, data, dp_group)
    without_kl = copy.copy(config)  # verl's configs are frozen dataclasses: a copy, one field off
    object.__setattr__(without_kl, "use_kl_loss", False)
    loss, metrics = _verl_ppo_loss(without_kl, model_output, data, dp_group)

    log_prob = no_padding_2_padding(model_output["log_probs"], data)
    batch = data.select("response_mask", "old_log_probs", "ref_log_prob").to_padded_tensor()
    mask = batch["response_mask"].to(bool)
    ref_logp, old_logp = batch["ref_log_prob"], batch["old_log_probs"]
    if term_name is None:
        terms = sequence_kl(log_prob, ref_logp, old_logp=old_logp, mask=mask, estimator="k1").terms
        mode = aggregation or "seq-mean-token-sum"
    else:
        terms = term_name.per_token(log_prob, ref_logp, old_logp=old_logp, mask=mask)
        mode = aggregation or config.loss_agg_mode
    kl_loss = _core_algos.agg_loss(
        loss_mat=terms, loss_mask=mask, loss_agg_mode=mode, **config.global_batch_info
    )
    metrics["kl_loss"] = Metric(value=kl_loss, aggregation=_metric_aggregation(config, data))
    metrics["kl_coef"] = config.kl_loss_coef
    return loss + kl_loss * config.kl_loss_coef, metrics
