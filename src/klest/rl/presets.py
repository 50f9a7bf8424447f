"""What the RL frameworks compute today, by name, so that switching to klest changes nothing.

Each preset is a per-token function ``preset(logp, ref_logp, *, old_logp=None, mask=None)`` with
the framework's value *and* gradient (clamps included), built on :func:`klest.rl.kl_per_token`,
and a ``loss(...)`` method that reduces it with :func:`klest.rl.kl_loss`. Its ``follows``
attribute (and the first line of its ``__doc__``) says what its expected gradient follows; once you
have matched your framework, switch to a preset (or option) whose gradient follows the divergence
you meant.

>>> from klest.rl import presets
>>> presets.get("verl:low_var_kl").follows
'forward KL(π_ref‖π), not the reverse KL it reports (zero where a clamp binds)'

Descriptions follow the public releases verl 0.9.1, OpenRLHF 0.11.2, TRL 1.16.0 and NeMo-RL
(2026). ℓ = logp - ref_logp.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any

import torch

from ..errors import KlestError
from .penalty import KLLoss, kl_loss, kl_per_token

__all__ = ["Preset", "get", "names", "register"]

_NOTHING = "nothing: its expected gradient is 0 (E_π[∇ℓ] = 0)"
_REVERSE = "reverse KL(π‖π_ref) (the exact score-function gradient, k2's)"
_FORWARD = "forward KL(π_ref‖π), not the reverse KL it reports (zero where a clamp binds)"
_ABS = "no divergence: E_π[sign(ℓ)·∇log π], each token's |ℓ| pushed down"


@dataclass(frozen=True)
class Preset:
    """A framework's per-token KL term. Call it like :func:`klest.rl.kl_per_token`."""

    name: str
    follows: str
    description: str
    options: dict[str, Any] = field(default_factory=dict)
    uses_old_logp: bool = False

    def __post_init__(self) -> None:
        doc = f"Gradient follows {self.follows}.\n\n{self.description}"
        object.__setattr__(self, "__doc__", doc)

    def _old(self, old_logp: torch.Tensor | None) -> torch.Tensor | None:
        return old_logp if self.uses_old_logp else None

    def __call__(
        self,
        logp: torch.Tensor,
        ref_logp: torch.Tensor,
        *,
        old_logp: torch.Tensor | None = None,
        mask: torch.Tensor | None = None,
    ) -> torch.Tensor:
        return kl_per_token(logp, ref_logp, old_logp=self._old(old_logp), mask=mask, **self.options)

    def loss(
        self,
        logp: torch.Tensor,
        ref_logp: torch.Tensor,
        *,
        old_logp: torch.Tensor | None = None,
        mask: torch.Tensor | None = None,
        **kwargs: Any,
    ) -> KLLoss:
        """:func:`klest.rl.kl_loss` with this preset's options (``aggregation=`` etc. pass on)."""
        return kl_loss(
            logp, ref_logp, old_logp=self._old(old_logp), mask=mask, **self.options, **kwargs
        )


_REGISTRY: dict[str, Preset] = {}


def register(preset: Preset, *, overwrite: bool = False) -> Preset:
    """Add a preset (e.g. your own framework's) under ``preset.name``."""
    if preset.name in _REGISTRY and not overwrite:
        raise KlestError(f"preset {preset.name!r} exists (overwrite=True replaces it)")
    _REGISTRY[preset.name] = preset
    return preset


def get(name: str) -> Preset:
    """The preset called ``name`` (see :func:`names`)."""
    if name == "verl:full":
        raise KlestError(
            "verl's 'full' raises NotImplementedError there too; the full-vocabulary KL needs "
            "the logits, not the sampled tokens' log-probs",
            argument="name",
        )
    try:
        return _REGISTRY[name]
    except KeyError:
        raise KlestError(
            f"unknown preset {name!r}; known: {', '.join(names())}", argument="name"
        ) from None


def names() -> list[str]:
    """The registered preset names, sorted."""
    return sorted(_REGISTRY)


def _add(
    name: str, follows: str, description: str, *, uses_old: bool = False, **options: Any
) -> None:
    register(Preset(name, follows, description, dict(options), uses_old))


# ------------------------------------------------------------------------------------------ verl
_VERL = {
    "kl": ("k1", _NOTHING, "ℓ, no clamp."),
    "abs": ("abs", _ABS, "|ℓ|, no clamp."),
    "mse": ("k2", _REVERSE, "½ℓ², no clamp."),
    "low_var_kl": (
        "k3",
        _FORWARD,
        "k3 = e^{-ℓ'} - 1 + ℓ' with ℓ' = ℓ clipped to [-20, 20], the result clipped to "
        "[-10, 10]; gradient of that expression (zero where either clamp binds).",
    ),
}
_VERL_ALIASES = {"k1": "kl", "k2": "mse", "k3": "low_var_kl"}
for _name, (_est, _follows, _desc) in _VERL.items():
    _clamps: dict[str, Any] = {"clamp": 20.0, "value_clamp": 10.0} if _name == "low_var_kl" else {}
    for _n in [_name] + [a for a, t in _VERL_ALIASES.items() if t == _name]:
        _add(
            f"verl:{_n}",
            _follows,
            f"verl kl_penalty {_n!r}: {_desc}",
            estimator=_est,
            gradient="as_written",
            **_clamps,
        )
        _add(
            f"verl:{_n}+",
            _REVERSE,
            f"verl kl_penalty {_n + '+'!r}: the value of {_n!r} ({_desc.rstrip('.')}), "
            "straight-through: value kN, gradient of ½ℓ² (unclipped).",
            estimator=_est,
            gradient="reverse_kl",
            **_clamps,
        )

# -------------------------------------------------------------------------------------- OpenRLHF
_ORL: dict[str, tuple[str, str, dict[str, Any]]] = {
    "k1": ("k1", _NOTHING, {}),
    "k2": ("k2", _REVERSE, {}),
    "k3": ("k3", _FORWARD, {"clamp": (-float("inf"), 10.0)}),
}
for _n, (_est, _follows, _extra) in _ORL.items():
    _pre = " with ℓ clipped below at -10 before the exp" if _n == "k3" else ""
    _add(
        f"openrlhf:{_n}",
        _follows if _n != "k2" else _REVERSE[:-1] + "; zero where the clamp binds)",
        f"OpenRLHF compute_approx_kl, kl_estimator={_n!r}: {_n}{_pre}, the result clipped to "
        "[-10, 10]; gradient of that expression.",
        estimator=_est,
        gradient="as_written",
        value_clamp=10.0,
        **_extra,
    )
    _add(
        f"openrlhf:{_n}:unbiased_gradient",
        "reverse KL(π‖π_ref), biased where π/π_old > 10 (the weight is clipped there)",
        f"OpenRLHF compute_approx_kl with its unbiased-gradient option: value {_n} (as "
        f"'openrlhf:{_n}', not weighted), gradient of ½ℓ² (unclipped) times the detached "
        "weight min(π/π_old, 10) (weight 1 without old_logp).",
        uses_old=True,
        estimator=_est,
        gradient="reverse_kl",
        weight="gradient_only",
        value_clamp=10.0,
        weight_clamp=10.0,
        **_extra,
    )

# ------------------------------------------------------------------------------------------- TRL
_add(
    "trl:grpo",
    _FORWARD.replace(" (zero where a clamp binds)", ""),
    "TRL GRPOTrainer per-token KL: k3 = e^{-ℓ} + ℓ - 1, no clamp; gradient of that expression.",
    estimator="k3",
    gradient="as_written",
)
_add(
    "trl:grpo:bias_correction",
    "reverse KL(π‖π_ref) (score + pathwise: ∇E_π[k3])",
    "TRL GRPOTrainer with use_bias_correction_kl: k3 times the non-detached weight π/π_old "
    "(exp(logp - sg(logp)) = 1 without old_logp, as TRL does on-policy).",
    uses_old=True,
    estimator="k3",
    gradient="as_written",
    weight="differentiable",
)

# --------------------------------------------------------------------------------------- NeMo-RL
_NEMO = {
    "k1": ("k1", _NOTHING, "reverse KL(π‖π_ref) (score + pathwise: ∇E_π[ℓ])"),
    "k2": ("k2", _REVERSE[:-1] + "; zero where a clamp binds)", "½E_π[ℓ²], not the KL"),
    "k3": ("k3", _FORWARD, "reverse KL(π‖π_ref) (score + pathwise: ∇E_π[k3])"),
}
for _n, (_est, _follows, _follows_is) in _NEMO.items():
    _desc = (
        f"NeMo-RL {_n} with its clamps: ℓ clipped to [-20, 20] before the estimator, the result "
        "clipped to [-10, 10]"
    )
    _add(
        f"nemo_rl:{_n}",
        _follows,
        _desc + "; gradient of that expression.",
        estimator=_est,
        gradient="as_written",
        clamp=20.0,
        value_clamp=10.0,
    )
    _add(
        f"nemo_rl:{_n}:importance_weight",
        _follows_is + " where no clamp binds",
        _desc + ", times the non-detached weight π/π_gen (exp(logp - sg(logp)) without "
        "old_logp); gradient of that product.",
        uses_old=True,
        estimator=_est,
        gradient="as_written",
        weight="differentiable",
        clamp=20.0,
        value_clamp=10.0,
    )
