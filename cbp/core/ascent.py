"""The multiplier rules: which optimizer climbs the Lagrangian in lambda.

``dL / d lambda_i = cs(w_i; g) >= 0``, so a rule is any torch optimizer run with ``maximize=True``
on the multipliers, given ``cs`` as their gradient once per schedule update. Resume is the
optimizer's own ``state_dict``. A new rule is one line here; ``CBPConfig.multiplier_rule`` and
``cbp quantize --multiplier-rule`` accept every name of this table.
"""

from __future__ import annotations

from collections.abc import Callable

import torch

ASCENT_RULES: dict[str, Callable[[list[torch.Tensor], float], torch.optim.Optimizer]] = {
    # the reference code: Adam, default betas
    "adam": lambda params, lr: torch.optim.Adam(params, lr=lr, maximize=True),
    # paper Algorithm 1: lambda += eta_lambda * cs
    "plain": lambda params, lr: torch.optim.SGD(params, lr=lr, maximize=True),
}
