"""The option vocabularies of the algorithm section, read and checked: each policy loss's options
(`algorithm.policy_loss_options`, verl's names and defaults) and verl's rejection criteria
(`algorithm.rollout_correction.rollout_rs`). The loss functions and the rejection itself live in grpo/.
"""
from __future__ import annotations

import math
from typing import Mapping

from kimina_jax.errors import KiminaError

# The options each policy loss takes (algorithm.policy_loss_options): verl's names, defaults and our ranges.
POLICY_LOSS_OPTIONS: dict[str, dict[str, tuple[float, str]]] = {
    "sapo": {"tau_pos": (1.0, "> 0"), "tau_neg": (1.05, "> 0")},
    "clip_cov": {"clip_cov_ratio": (0.0002, "(0, 1]"), "clip_cov_lb": (1.0, "finite"),
                 "clip_cov_ub": (5.0, "> clip_cov_lb")},
    "kl_cov": {"kl_cov_ratio": (0.0002, "(0, 1]"), "ppo_kl_coef": (0.1, ">= 0")},
}
POLICY_LOSS_NAMES = ("vanilla", "gspo", "cispo", "geo_mean", "sapo", "gpg", "clip_cov", "kl_cov")


def policy_loss_options(name: str, options: Mapping[str, float], key: str | None = None) -> dict[str, float]:
    """The options of policy loss `name`: `options` over verl's defaults, checked. An unknown loss, an option it
    does not take or a value out of range is a KiminaError naming it (`key`: the options' config key)."""
    if name not in POLICY_LOSS_NAMES:
        raise KiminaError(f"unknown policy loss {name!r}; expected one of {', '.join(POLICY_LOSS_NAMES)}")
    spec = POLICY_LOSS_OPTIONS.get(name, {})
    for option in options:
        if option not in spec:
            takes = f"takes {', '.join(spec)}" if spec else "takes no options"
            raise KiminaError(f"'{_option_key(key, option)}' is not an option of policy loss {name!r} (it {takes})")
    values = {option: float(options.get(option, default)) for option, (default, _) in spec.items()}
    for option, (_, allowed) in spec.items():
        value = values[option]
        ok = {"> 0": value > 0, ">= 0": value >= 0, "(0, 1]": 0 < value <= 1, "finite": math.isfinite(value),
              "> clip_cov_lb": value > values.get("clip_cov_lb", -math.inf)}[allowed]
        if not ok:
            raise KiminaError(f"'{_option_key(key, option)}' must be {allowed}, got {value}")
    return values


def _option_key(key: str | None, option: str) -> str:
    return option if key is None else f"{key}.{option}"


# verl's rollout_rs criteria: a divergence (k1: log-ratio, k2, k3) per token, or per sequence its sum, mean or max.
REJECTION_CRITERIA = ("token_k1", "token_k2", "token_k3", "seq_sum_k1", "seq_sum_k2", "seq_sum_k3", "seq_mean_k1",
                      "seq_mean_k2", "seq_mean_k3", "seq_max_k2", "seq_max_k3")


def rejection_criteria(spec: str, thresholds: str | float | None) -> list[tuple[str, float | None, float]]:
    """verl's `rollout_rs` and `rollout_rs_threshold` read: (criterion, lower, upper) for each distinct criterion,
    in order. k1 criteria bound the probability ratio (lower given, or 1/upper), the others the divergence."""
    key = "algorithm.rollout_correction"
    names = list(dict.fromkeys(part.strip() for part in spec.split(",") if part.strip()))
    if not names:
        raise KiminaError(f"'{key}.rollout_rs' names no criterion; expected some of {', '.join(REJECTION_CRITERIA)}")
    for name in names:
        if name not in REJECTION_CRITERIA:
            raise KiminaError(f"'{key}.rollout_rs': unknown criterion {name!r}; expected "
                              f"{', '.join(REJECTION_CRITERIA)}")
    if thresholds is None:
        raise KiminaError(f"'{key}.rollout_rs' needs '{key}.rollout_rs_threshold'")
    specs = [part.strip() for part in str(thresholds).split(",") if part.strip()]
    if len(specs) not in (1, len(names)):
        raise KiminaError(f"'{key}.rollout_rs_threshold' gives {len(specs)} thresholds for {len(names)} criteria: "
                          "give one for all or one each")
    criteria = []
    for name, text in zip(names, specs * len(names) if len(specs) == 1 else specs):
        parts = text.split("_") if name.endswith("k1") else [text]
        try:
            bounds = [float(part) for part in parts]
        except ValueError:
            bounds = []
        if len(bounds) not in (1, 2) or not all(b > 0 and math.isfinite(b) for b in bounds):
            form = "a ratio upper bound or lower_upper" if name.endswith("k1") else "one upper bound"
            raise KiminaError(f"'{key}.rollout_rs_threshold' {text!r} for {name}: expected {form}, positive numbers")
        lower = (bounds[0] if len(bounds) == 2 else 1.0 / bounds[0]) if name.endswith("k1") else None
        criteria.append((name, lower, bounds[-1]))
    return criteria
