"""Timestep-aware expert-choice capacity: how many experts a sequence gets, as a function of its
realized mask ratio r.

    k_b = clamp(round(k_min + (k_max - k_min) * s(r_b)), k_min, k_max)

`round` is half up by default (floor(x + 0.5)); `rounding="half_even"` is torch.round, EC-DLM's.
They differ only where x is exactly an odd multiple of 1/2, which some realizable ratios r = m/L hit
(linear k 8..32, L=512: at 4 of the 513 ratios, e.g. r = 96/512 gives 12.5 -> 12 or 13).

Low-mask-ratio sequences learn far faster per token, so the `*_reverse` schedules give them more
experts. FLOP matching keeps comparisons fair: the expected k under r ~ U(0, 1) must equal the
static k it replaces, computed here by fine quadrature that includes the rounding.
"""
from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Callable, Literal, Optional, Sequence

import torch

from ..errors import ConfigError, require as _require


@dataclass
class CapacityConfig:
    """Timestep-aware expert-choice capacity: k_b = clamp(round(k_min + (k_max-k_min) s(r_b)))."""
    schedule: Literal["static", "linear", "linear_reverse", "cosine", "cosine_reverse", "bell",
                      "gaussian", "gaussian_reverse", "piecewise"] = "static"
    k_min: Optional[float] = None       # defaults to moe.k for `static`
    k_max: Optional[float] = None       # float so `flop_match: solve` can land between integers
    k_target: Optional[float] = None    # expected k to match; defaults to moe.k
    sigma: float = 0.22                 # width of the `gaussian` schedules
    points: Optional[list] = None       # `piecewise`: [[r, s], ...], r ascending over [0, 1]
    flop_match: Literal["check", "off", "solve"] = "check"
    # half_up: ecdlm's floor(x + 0.5); half_even: torch.round, as EC-DLM (differs only at exact .5)
    rounding: Literal["half_up", "half_even"] = "half_up"

SCHEDULES = ("static", "linear", "linear_reverse", "cosine", "cosine_reverse", "bell",
             "gaussian", "gaussian_reverse", "piecewise")

ROUNDINGS = ("half_up", "half_even")

_QUADRATURE_POINTS = 1 << 20   # midpoint rule; the rounding steps make the error O(1/n)


def _gaussian(sigma: float) -> Callable[[torch.Tensor], torch.Tensor]:
    g0 = math.exp(-0.25 / (2 * sigma ** 2))   # g(0) = g(1): shift/scale so s(0) = 0, s(0.5) = 1
    return lambda r: (torch.exp(-(r - 0.5) ** 2 / (2 * sigma ** 2)) - g0) / (1 - g0)


def _piecewise(points: Sequence[Sequence[float]]) -> Callable[[torch.Tensor], torch.Tensor]:
    rs = torch.tensor([float(p[0]) for p in points], dtype=torch.float64)
    ss = torch.tensor([float(p[1]) for p in points], dtype=torch.float64)

    def s(r: torch.Tensor) -> torch.Tensor:
        r64 = r.to(torch.float64).clamp(0, 1)
        rs_, ss_ = rs.to(r64.device), ss.to(r64.device)
        hi = torch.searchsorted(rs_, r64, right=True).clamp(1, len(rs) - 1)
        r0, r1, s0, s1 = rs_[hi - 1], rs_[hi], ss_[hi - 1], ss_[hi]
        return (s0 + (s1 - s0) * (r64 - r0) / (r1 - r0)).to(r.dtype)
    return s


def shape_fn(schedule: str, sigma: float = 0.22,
             points: Optional[Sequence[Sequence[float]]] = None) -> Callable[[torch.Tensor], torch.Tensor]:
    """The schedule's s(r), mapping mask ratio in [0, 1] to [0, 1]."""
    pi = math.pi
    table = {
        "static": lambda r: torch.zeros_like(r),
        "linear": lambda r: r,
        "linear_reverse": lambda r: 1 - r,
        "cosine": lambda r: (1 - torch.cos(pi * r)) / 2,
        "cosine_reverse": lambda r: (1 + torch.cos(pi * r)) / 2,
        "bell": lambda r: 1 - 4 * (r - 0.5) ** 2,
    }
    if schedule in table:
        return table[schedule]
    if schedule == "gaussian":
        return _gaussian(sigma)
    if schedule == "gaussian_reverse":
        g = _gaussian(sigma)
        return lambda r: 1 - g(r)
    if schedule == "piecewise":
        if not points:
            raise ValueError("schedule 'piecewise' needs points [[r, s], ...]")
        return _piecewise(points)
    raise ValueError(f"unknown capacity schedule {schedule!r}; choose one of {', '.join(SCHEDULES)}")


class TimestepCapacity:
    """Per-sequence experts-per-token k_b from the mask ratio r_b."""

    def __init__(self, schedule: str, k_min: float, k_max: float, *, sigma: float = 0.22,
                 points: Optional[Sequence[Sequence[float]]] = None, k_static: Optional[float] = None,
                 rounding: str = "half_up"):
        if rounding not in ROUNDINGS:
            raise ValueError(f"rounding={rounding!r} must be one of {', '.join(ROUNDINGS)}")
        self.schedule, self.k_min, self.k_max = schedule, float(k_min), float(k_max)
        self.sigma, self.points, self.rounding = sigma, points, rounding
        # static ignores r: every sequence gets k_static (defaults to k_min, which equals k_max then)
        self.k_static = float(k_static if k_static is not None else k_min)
        self._s = shape_fn(schedule, sigma, points)

    def s(self, r: torch.Tensor) -> torch.Tensor:
        return self._s(r)

    def k(self, r: torch.Tensor) -> torch.Tensor:
        """LongTensor of k_b, one per entry of r (float mask ratios in [0, 1])."""
        r = torch.as_tensor(r, dtype=torch.float64)
        if self.schedule == "static":
            k_static = float(self._round(torch.tensor(self.k_static, dtype=torch.float64)))
            return torch.full_like(r, k_static, dtype=torch.long)
        raw = self.k_min + (self.k_max - self.k_min) * self._s(r)
        k = self._round(raw).clamp(math.ceil(self.k_min), math.floor(self.k_max))
        return k.to(torch.long)

    def static_k(self) -> int:
        """The static schedule's k, in plain Python (no tensor: it builds on the meta device too)."""
        return int(round(self.k_static) if self.rounding == "half_even" else math.floor(self.k_static + 0.5))

    def _round(self, x: torch.Tensor) -> torch.Tensor:
        # expected_k goes through k(), so the quadrature and FLOP matching use the same rounding
        return torch.round(x) if self.rounding == "half_even" else torch.floor(x + 0.5)

    def expected_k(self) -> float:
        """E[k(r)] for r ~ U(0, 1), including the rounding, by the midpoint rule."""
        n = _QUADRATURE_POINTS
        r = (torch.arange(n, dtype=torch.float64) + 0.5) / n
        return float(self.k(r).to(torch.float64).mean())

    def with_k_max(self, k_max: float) -> "TimestepCapacity":
        return TimestepCapacity(self.schedule, self.k_min, k_max, sigma=self.sigma,
                                points=self.points, k_static=self.k_static, rounding=self.rounding)

    def __repr__(self) -> str:
        return (f"TimestepCapacity({self.schedule!r}, k_min={self.k_min:g}, k_max={self.k_max:g}, "
                f"E[k]={self.expected_k():.3f})")


class FlopMatchError(ValueError):
    pass


def solve_k_max(cap: TimestepCapacity, k_target: float, k_limit: float, tol: float = 0.01) -> TimestepCapacity:
    """Smallest k_max in [k_min, k_limit] whose expected k is within `tol` of `k_target`.

    E[k] is non-decreasing in k_max (s >= 0), so bisection on the real line works; the rounding
    makes it a staircase, which is why a tolerance, not equality, is the goal.
    """
    lo, hi = cap.k_min, float(k_limit)
    if cap.with_k_max(hi).expected_k() < k_target * (1 - tol):
        raise FlopMatchError(
            f"cannot reach expected k={k_target:g} with schedule {cap.schedule!r}: even k_max={hi:g} "
            f"gives {cap.with_k_max(hi).expected_k():.3f}")
    if cap.with_k_max(lo).expected_k() > k_target * (1 + tol):
        raise FlopMatchError(f"schedule {cap.schedule!r} with k_min={lo:g} already exceeds "
                             f"expected k={k_target:g}; lower k_min")
    for _ in range(60):
        mid = (lo + hi) / 2
        if cap.with_k_max(mid).expected_k() < k_target:
            lo = mid
        else:
            hi = mid
    best = min((cap.with_k_max(x) for x in (lo, hi)), key=lambda c: abs(c.expected_k() - k_target))
    if abs(best.expected_k() - k_target) > tol * k_target:
        raise FlopMatchError(f"schedule {cap.schedule!r}: closest expected k is {best.expected_k():.3f}, "
                             f"not within {tol:.0%} of {k_target:g} (rounding steps are too coarse)")
    return best


def build_capacity(moe_cfg) -> TimestepCapacity:
    """The TimestepCapacity exactly as `moe.capacity` states it (no solving, no check)."""
    c = moe_cfg.capacity
    return TimestepCapacity(c.schedule, c.k_min, c.k_max, sigma=c.sigma, points=c.points,
                            k_static=c.k_target, rounding=getattr(c, "rounding", "half_up"))


def solve_capacity(moe_cfg) -> TimestepCapacity:
    """`flop_match: solve`: the schedule with the smallest k_max that matches moe.capacity.k_target."""
    cap = build_capacity(moe_cfg)
    if cap.schedule == "static":
        return cap
    return solve_k_max(cap, moe_cfg.capacity.k_target, moe_cfg.num_experts)


def check_flop_match(cap: TimestepCapacity, c) -> None:
    """Raises FlopMatchError when `flop_match` is check (or solve) and the expected k of `cap`
    misses `c.k_target` by more than 1%. Changes nothing."""
    if c.schedule == "static" or c.flop_match == "off":
        return
    ek = cap.expected_k()
    if abs(ek - c.k_target) > 0.01 * c.k_target:
        raise FlopMatchError(
            f"schedule {c.schedule!r} with k_min={c.k_min:g}, k_max={c.k_max:g} has "
            f"expected k={ek:.3f}, but moe.capacity.k_target={c.k_target:g} (differs by more than 1%); "
            f"set moe.capacity.flop_match=solve to adjust k_max, or flop_match=off to accept it")


# ---- the config's checks, beside the schedule they describe (model/config.py calls them) -------
def check_capacity_ranges(e) -> None:
    """moe.capacity's values are in range (after defaults are filled)."""
    c = e.capacity
    _require(c.k_min is not None and c.k_max is not None,
             f"moe.capacity.k_min and moe.capacity.k_max are required for schedule {c.schedule!r}")
    _require(c.k_min >= 1, f"moe.capacity.k_min={c.k_min:g} must be >= 1")
    _require(c.k_max >= c.k_min, f"moe.capacity.k_max={c.k_max:g} must be >= moe.capacity.k_min={c.k_min:g}")
    _require(c.k_max <= e.num_experts,
             f"moe.capacity.k_max={c.k_max:g} exceeds moe.num_experts={e.num_experts}")
    _require(c.sigma > 0, f"moe.capacity.sigma={c.sigma} must be > 0")
    _require(c.flop_match in ("check", "off", "solve"),
             f"moe.capacity.flop_match={c.flop_match!r} must be check, off or solve")
    _require(c.rounding in ("half_up", "half_even"),
             f"moe.capacity.rounding={c.rounding!r} must be half_up or half_even")
    if c.schedule == "piecewise":
        pts = c.points or []
        _require(len(pts) >= 2, "moe.capacity.points needs at least two [r, s] points for piecewise")
        rs = [float(p[0]) for p in pts]
        _require(rs[0] == 0.0 and rs[-1] == 1.0 and all(a < b for a, b in zip(rs, rs[1:])),
                 f"moe.capacity.points r values {rs} must increase strictly from 0 to 1")
        _require(all(0.0 <= float(p[1]) <= 1.0 for p in pts), "moe.capacity.points s values must be in [0, 1]")


def resolve_capacity(moe_cfg) -> TimestepCapacity:
    """The schedule of an expert-choice `moe` section whose capacity defaults are filled: ranges
    checked, and for `flop_match: solve` k_max solved. Errors are ConfigErrors naming moe.capacity."""
    check_capacity_ranges(moe_cfg)
    try:
        return solve_capacity(moe_cfg) if moe_cfg.capacity.flop_match == "solve" else build_capacity(moe_cfg)
    except (FlopMatchError, ValueError) as err:
        raise ConfigError(f"moe.capacity: {err}") from None


def validate_capacity(cap: TimestepCapacity, c: CapacityConfig) -> None:
    """`check_flop_match` as a ConfigError naming moe.capacity."""
    try:
        check_flop_match(cap, c)
    except FlopMatchError as err:
        raise ConfigError(f"moe.capacity: {err}") from None
