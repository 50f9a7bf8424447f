r"""``"klest:<preset or option>"`` names: klest's KL terms where a trainer takes an estimator name.

verl (``kl_loss_type``, ``algorithm.kl_penalty``, a distillation ``loss_mode``) and OpenRLHF
(``--algo.kl.estimator``) choose their per-token KL term by a string. The adapters
(:mod:`klest.integrations.verl`, :mod:`klest.integrations.openrlhf`) make every string that starts
with ``"klest:"`` valid there; this module says what such a name means.

``"klest:<spec>"``, where ``<spec>`` is

- a :mod:`klest.rl.presets` name (``"verl@0.9.1:low_var_kl"``, ``"openrlhf:k3"``,
  ``"trl@1.16.0:grpo"``, or one you registered with :func:`klest.rl.presets.register`): that
  preset's value and gradient, clamps included;
- ``"<estimator>"`` or ``"<estimator>:<gradient>"``: :func:`klest.rl.kl_per_token` with that
  ``estimator`` (``k1``, ``k2``, ``k3``, ``abs``, ``forward_k1``, ``forward_k3``, an f-divergence
  name or ``fdiv:<name>``) and ``gradient`` (``reverse_kl``, the default, ``forward_kl``,
  ``as_written`` or ``none``). ``"klest:k3"`` is klest's default: the value k3 = (r - 1) - log r
  (unbiased for KL(π‖π_ref), low variance) and the per-token derivative ℓ = logp - ref_logp,
  whose expectation is ∇KL(π‖π_ref) at the sampled prefixes.

Refused (:class:`klest.KlestError` naming the trainer's option): unknown names, and terms that
couple the tokens of a row (``gradient="sequence_reverse_kl"``, presets with a sequence-level
weight): the trainers call their KL function without the response mask, so a sum along a row
would run over the padding. For a sequence-level KL in verl use
:func:`klest.integrations.verl.klest_ppo_loss`.
"""

from __future__ import annotations

import functools
from dataclasses import dataclass, field
from typing import Any

import torch

from ..errors import KlestError
from ..rl import presets as _presets
from ..rl.penalty import kl_per_token

__all__ = ["PREFIX", "TOKEN_GRADIENTS", "KLName", "is_klest_name", "parse"]

PREFIX = "klest:"
#: the ``gradient`` options a ``"klest:<estimator>:<gradient>"`` name may end with
TOKEN_GRADIENTS = ("reverse_kl", "forward_kl", "as_written", "none")
_ROW_GRADIENTS = ("sequence_reverse_kl",)


@dataclass(frozen=True)
class KLName:
    """A parsed ``"klest:..."`` name: a preset, or :func:`klest.rl.kl_per_token` options."""

    name: str
    preset: _presets.Preset | None = None
    options: dict[str, Any] = field(default_factory=dict)

    def per_token(
        self,
        logp: torch.Tensor,
        ref_logp: torch.Tensor,
        *,
        old_logp: torch.Tensor | None = None,
        mask: torch.Tensor | None = None,
    ) -> torch.Tensor:
        """The per-token term (value and gradient), :func:`klest.rl.kl_per_token`'s.

        ``old_logp`` weights the term by π/π_old as the preset or options say (presets that do
        not use it ignore it; options weight by the detached π/π_old)."""
        if self.preset is not None:
            return self.preset(logp, ref_logp, old_logp=old_logp, mask=mask)
        return kl_per_token(logp, ref_logp, old_logp=old_logp, mask=mask, **self.options)


def is_klest_name(name: object) -> bool:
    """Whether ``name`` is a string starting with ``"klest:"``."""
    return isinstance(name, str) and name.startswith(PREFIX)


def _framework(spec: str) -> bool:
    """Whether ``spec`` names a framework's preset (``"verl:..."``, ``"openrlhf@0.11.2:..."``)."""
    head = spec.partition(":")[0]
    return "@" in head or head in _presets.RELEASES


def _refuse_row_terms(name: str, options: dict[str, Any], argument: str) -> None:
    if options.get("gradient") in _ROW_GRADIENTS or options.get("weight_level") == "sequence":
        raise KlestError(
            f"{name!r} couples the tokens of a row (a sum along the sequence), but the trainer "
            "computes its KL without the response mask, so the sum would run over padding; use a "
            "per-token term here (for verl's loss, klest.integrations.verl.klest_ppo_loss takes "
            "'sequence_kl:k1')",
            argument=argument,
        )


def _hint() -> str:
    return (
        f"a klest KL name is 'klest:<preset>' (one of {', '.join(_presets.names())}, or a name "
        "without '@' for the newest release) or 'klest:<estimator>[:<gradient>]' with gradient "
        f"one of {', '.join(TOKEN_GRADIENTS)} (default reverse_kl)"
    )


@functools.lru_cache(maxsize=256)
def _checked_options(estimator: str, gradient: str, name: str, argument: str) -> None:
    """kl_per_token's own checks of the options, on a one-token batch (once per name)."""
    try:
        x = torch.zeros(1, 1)
        kl_per_token(x, x, estimator=estimator, gradient=gradient)
    except KlestError as e:
        reason = str(e).removeprefix("`estimator`: ").removeprefix("`gradient`: ")
        raise KlestError(
            f"unknown klest KL name {name!r} ({reason}); {_hint()}", argument=argument
        ) from None


def parse(name: str, argument: str) -> KLName:
    """``name`` (``"klest:<spec>"``) as a :class:`KLName`, checked; ``argument`` is the trainer's
    option that holds it, named in the :class:`klest.KlestError` a bad name raises. Presets are
    looked up at each call (a preset registered later is found); options are checked once."""
    if not is_klest_name(name):
        raise KlestError(f"a klest KL name starts with {PREFIX!r}, got {name!r}", argument=argument)
    spec = name[len(PREFIX) :]
    if not spec:
        raise KlestError(f"{name!r} names no term; {_hint()}", argument=argument)
    try:
        preset = _presets.get(spec)
    except KlestError as e:
        if _framework(spec):
            reason = str(e).removeprefix("`name`: ")
            raise KlestError(
                f"unknown klest KL name {name!r}: {reason}", argument=argument
            ) from None
    else:
        _refuse_row_terms(name, preset.options, argument)
        return KLName(name, preset=preset)
    estimator, sep, gradient = spec.rpartition(":")
    if not sep or gradient not in TOKEN_GRADIENTS + _ROW_GRADIENTS:
        estimator, gradient = spec, "reverse_kl"
    options = {"estimator": estimator, "gradient": gradient}
    _refuse_row_terms(name, options, argument)
    _checked_options(estimator, gradient, name, argument)
    return KLName(name, options=options)
