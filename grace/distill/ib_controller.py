"""Adaptive information-bottleneck controller: steers the weight beta of the gated-DKD term from its own loss."""

from __future__ import annotations

import math


class AdaptiveIBController:
    """beta_t from an EMA of the distillation loss, pushed towards a target tau.

        m_1     = v_1                                       (the first finite value seeds the EMA)
        m_t     = d * m_{t-1} + (1 - d) * v_t
        beta_t  = clip(beta_{t-1} + eta * (m_t - tau), beta_min, beta_max)

    While the smoothed L_GDKD sits above tau, beta grows; below it, beta shrinks. A NaN or
    infinite value is skipped (EMA and beta unchanged) and counted in `skipped`.
    """

    def __init__(self, tau: float, eta: float, beta_init: float, beta_min: float, beta_max: float,
                 ema_decay: float = 0.99):
        if not beta_min <= beta_init <= beta_max:
            raise ValueError(f"need beta_min <= beta_init <= beta_max, got {beta_min}, {beta_init}, {beta_max}")
        if not 0.0 <= ema_decay < 1.0:
            raise ValueError(f"ema_decay must be in [0, 1), got {ema_decay}")
        self.tau, self.eta = float(tau), float(eta)
        self.beta_min, self.beta_max, self.ema_decay = float(beta_min), float(beta_max), float(ema_decay)
        self.beta = float(beta_init)
        self.ema: float | None = None
        self.steps = 0       # finite values taken
        self.skipped = 0     # non-finite values ignored

    def update(self, value: float) -> float:
        """Take one (already averaged) L_GDKD value; return the new beta."""
        value = float(value)
        if not math.isfinite(value):
            self.skipped += 1
            return self.beta
        self.ema = value if self.ema is None else self.ema_decay * self.ema + (1.0 - self.ema_decay) * value
        self.beta = min(max(self.beta + self.eta * (self.ema - self.tau), self.beta_min), self.beta_max)
        self.steps += 1
        return self.beta

    def state_dict(self) -> dict:
        """JSON-serialisable state (ema is None before the first finite value)."""
        return {"beta": self.beta, "ema": self.ema, "steps": self.steps, "skipped": self.skipped}

    def load_state_dict(self, state: dict) -> None:
        """Restore beta / ema / counters; tau, eta and the bounds stay as constructed."""
        self.beta = float(state["beta"])
        self.ema = None if state.get("ema") is None else float(state["ema"])
        self.steps = int(state.get("steps", 0))
        self.skipped = int(state.get("skipped", 0))

    def __repr__(self) -> str:
        return (f"AdaptiveIBController(beta={self.beta:.6g}, ema={self.ema}, tau={self.tau}, eta={self.eta}, "
                f"range=[{self.beta_min}, {self.beta_max}], decay={self.ema_decay})")


def reduce_for_controller(values: list[float], accelerator=None) -> float:
    """Mean of the L_GDKD values of one optimizer step, over accumulation steps and processes.

    Every process must feed the controller the same number so that beta stays identical across
    ranks: with an accelerate `Accelerator` running more than one process, the (sum, count) pairs
    are summed over processes, giving the mean over all values everywhere. A NaN anywhere makes
    the result NaN on every rank, so every rank's controller skips the step alike. No values at
    all gives NaN.
    """
    local_sum, local_count = float(sum(float(v) for v in values)), float(len(values))
    if accelerator is not None and getattr(accelerator, "num_processes", 1) > 1:
        import torch

        pair = torch.tensor([local_sum, local_count], dtype=torch.float64, device=accelerator.device)
        total_sum, total_count = accelerator.reduce(pair, reduction="sum").tolist()
    else:
        total_sum, total_count = local_sum, local_count
    return total_sum / total_count if total_count > 0 else float("nan")
