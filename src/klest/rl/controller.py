r"""A KL coefficient that follows a target: fixed, the proportional controller, or a
proportional controller that ignores moves within the noise.

``"adaptive"`` is the controller of Ziegler et al. (2019, §2.2), as verl 0.9.1
(``verl/trainer/ppo/core_algos.py::AdaptiveKLController``) and OpenRLHF 0.11.2
(``openrlhf/trainer/ppo_utils/kl_controller.py``) implement it: after each batch with measured
KL :math:`\hat{KL}`,

.. math::
    e = \mathrm{clip}\Big(\frac{\hat{KL}}{\mathrm{target}} - 1,\ -0.2,\ 0.2\Big), \qquad
    \beta \leftarrow \beta\,\Big(1 + e\,\frac{n}{\mathrm{horizon}}\Big)

with n = ``n_steps`` (verl and OpenRLHF pass the number of samples in the batch). β is multiplied
by at most 1 ± 0.2·n/horizon per update, so it needs about horizon/(0.2·n) updates to move by a
factor e.

``"adaptive_se"`` (klest's): the same update, made only when the measured KL is further from the
target than ``z`` standard errors of its measurement,

.. math:: |\hat{KL} - \mathrm{target}| > z \cdot \mathrm{se}(\hat{KL}),

so that β does not random-walk on sampling noise when the KL sits at its target (with
``kl_stderr=0`` it is ``"adaptive"``). Under the null (true KL = target) and a normal measurement,
z = 2 lets about 4.6 % of updates through.

>>> from klest.rl import KLController
>>> c = KLController("adaptive", init=0.1, target=6.0, horizon=100)
>>> c.update(9.0, n_steps=10)  # error clip(9/6 - 1) = 0.2: β ×= 1 + 0.2·10/100
>>> round(c.value, 6)
0.102
>>> s = KLController("adaptive_se", init=0.1, target=6.0, horizon=100)
>>> s.update(6.5, kl_stderr=0.4, n_steps=10)  # |6.5 - 6| = 0.5 < 2·0.4: within the noise
>>> s.value
0.1
"""

from __future__ import annotations

import math
import numbers
from typing import Any, Literal

from ..errors import KlestError

__all__ = ["CONTROLLER_KINDS", "KLController"]

ControllerKind = Literal["fixed", "adaptive", "adaptive_se"]
CONTROLLER_KINDS: tuple[ControllerKind, ...] = ("fixed", "adaptive", "adaptive_se")

_CLIP = 0.2  # Ziegler et al.'s bound on the proportional error


def _real(name: str, x: Any) -> float:
    """``x`` as a float (a Python or NumPy number, or a 0-d array/tensor); NaN refused."""
    if isinstance(x, bool):
        raise KlestError("must be a real number, not a bool", argument=name, value=x)
    if not isinstance(x, numbers.Real):
        if getattr(x, "ndim", None) != 0:
            raise KlestError(
                f"must be a real number (or a 0-d array), got {type(x).__name__}",
                argument=name,
                value=x,
            )
        try:
            x = float(x)
        except (TypeError, ValueError):
            raise KlestError("must be a real number", argument=name, value=x) from None
    v = float(x)
    if math.isnan(v):
        raise KlestError("is NaN", argument=name)
    return v


def _positive(name: str, x: Any) -> float:
    v = _real(name, x)
    if not (0.0 < v < math.inf):
        raise KlestError(f"must be a finite number > 0, got {v}", argument=name)
    return v


class KLController:
    """The KL coefficient β, updated from the measured KL after each batch (module docstring).

    Args:
        kind: ``"fixed"`` (β = ``init`` for ever), ``"adaptive"`` (Ziegler et al.; verl's and
            OpenRLHF's ``AdaptiveKLController``) or ``"adaptive_se"`` (moves only when
            |KL - target| > z·stderr).
        init: the initial β (> 0).
        target: the KL aimed at (> 0), in the units of the KL passed to :meth:`update`.
        horizon: the controller's time constant, in ``n_steps`` units (> 0).
        z: the number of standard errors a deviation must exceed (``"adaptive_se"``; >= 0).
    """

    def __init__(
        self,
        kind: ControllerKind = "adaptive",
        init: float = 0.2,
        target: float = 6.0,
        horizon: float = 10000,
        z: float = 2.0,
    ) -> None:
        if kind not in CONTROLLER_KINDS:
            raise KlestError(
                f"must be one of {', '.join(map(repr, CONTROLLER_KINDS))}, got {kind!r}",
                argument="kind",
            )
        self.kind: ControllerKind = kind
        self.init = _positive("init", init)
        self.target = _positive("target", target)
        self.horizon = _positive("horizon", horizon)
        self.z = _real("z", z)
        if not 0.0 <= self.z < math.inf:
            raise KlestError(f"must be a finite number >= 0, got {self.z}", argument="z")
        self.value = self.init
        self.n_updates = 0  # updates that moved β
        self.n_calls = 0  # calls to update()

    def __repr__(self) -> str:
        return (
            f"KLController(kind={self.kind!r}, value={self.value!r}, target={self.target!r}, "
            f"horizon={self.horizon!r}, z={self.z!r})"
        )

    def update(self, kl: Any, kl_stderr: Any = 0.0, n_steps: int = 1) -> None:
        r"""Update β after a batch whose measured KL is ``kl`` (standard error ``kl_stderr``)
        and which counts ``n_steps`` steps (verl and OpenRLHF pass the batch's sample count).

        ``"adaptive"``: β ×= 1 + clip(kl/target - 1, ±0.2)·n_steps/horizon; ``"adaptive_se"``:
        the same if |kl - target| > z·kl_stderr, else nothing; ``"fixed"``: nothing (inputs are
        still checked). ``kl`` may be negative (an unbiased estimator's batch mean can be) or
        ±inf (the error clips); NaN is refused. n_steps >= 5·horizon is refused: the multiplier
        could then reach 0 or below.
        """
        k = _real("kl", kl)
        se = _real("kl_stderr", kl_stderr)
        if se < 0.0:
            raise KlestError(f"must be >= 0, got {se}", argument="kl_stderr")
        if isinstance(n_steps, bool) or not isinstance(n_steps, numbers.Integral):
            raise KlestError(
                f"must be an integer >= 0, got {type(n_steps).__name__}", argument="n_steps"
            )
        n = int(n_steps)
        if n < 0:
            raise KlestError(f"must be >= 0, got {n}", argument="n_steps")
        if _CLIP * n >= self.horizon:
            raise KlestError(
                f"n_steps={n} >= 5·horizon ({self.horizon}): one update could multiply β by "
                "1 - 0.2·n_steps/horizon <= 0",
                argument="n_steps",
            )
        self.n_calls += 1
        if self.kind == "fixed":
            return
        noise = self.z * se if self.z > 0.0 else 0.0  # z = 0: never 0·inf = NaN
        if self.kind == "adaptive_se" and not abs(k - self.target) > noise:
            return
        error = min(max(k / self.target - 1, -_CLIP), _CLIP)
        self.value *= 1 + error * n / self.horizon
        self.n_updates += 1

    def state_dict(self) -> dict[str, Any]:
        """Everything needed to resume: kind, parameters, β and the counters (plain Python)."""
        return {
            "kind": self.kind,
            "init": self.init,
            "target": self.target,
            "horizon": self.horizon,
            "z": self.z,
            "value": self.value,
            "n_updates": self.n_updates,
            "n_calls": self.n_calls,
        }

    def load_state_dict(self, state: dict[str, Any]) -> None:
        """Restore :meth:`state_dict`'s output (checked as the constructor checks its arguments)."""
        if not isinstance(state, dict):
            raise KlestError("must be a dict from state_dict()", argument="state", value=state)
        missing = {"kind", "init", "target", "horizon", "z", "value"} - set(state)
        if missing:
            raise KlestError(f"lacks {', '.join(sorted(missing))}", argument="state")
        fresh = KLController(
            state["kind"], state["init"], state["target"], state["horizon"], state["z"]
        )
        fresh.value = _positive("state['value']", state["value"])
        for key in ("n_updates", "n_calls"):
            v = state.get(key, 0)
            if isinstance(v, bool) or not isinstance(v, numbers.Integral) or v < 0:
                raise KlestError("must be an integer >= 0", argument=f"state[{key!r}]")
            setattr(fresh, key, int(v))
        self.__dict__.update(fresh.__dict__)
