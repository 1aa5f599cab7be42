"""How much VRAM inference needs on top of the weights, and whether to offload (seed 000 §5, seed 001).

Pure functions: the caller passes free/total bytes (``torch.cuda.mem_get_info``); nothing here queries CUDA.

The default estimate is ``12 GB x MP + 5 GB + loader reserve`` (seed 000). Seed 001's table (1 MP -> 12 GB,
2.07 MP -> 22, 3.69 MP -> 45) fits that linear rule; its own ``12 x MP^1.4`` formula does not, so the
exponent is a parameter (default 1.0). Once a model has run, :func:`record_run` stores the measured
activation peak (peak VRAM minus weights) and later estimates for that model use the calibrated cost.
"""

from __future__ import annotations

import json
import math
import numbers
import os
import threading
from dataclasses import dataclass, field

from ..units import GB

# Seed values (seed 000 §5, seed 001).
DEFAULT_PER_MP_GB = 12.0
DEFAULT_BASE_GB = 5.0
DEFAULT_MIN_FREE_GB = 25.0
DEFAULT_MAX_USED_PCT = 70.0
DEFAULT_QUANTIZED_SWITCH_MP = 1.2
MODES = ("smart", "always", "disabled")
MAX_SIDE = 65536  # pixels per image side
MAX_GB = 1e6  # no reserve, cost or free memory is a petabyte: a larger number is a typo
MAX_EXPONENT = 4.0


def plain_number(value: float) -> str:
    """``1000000`` -> ``"1,000,000"``, ``80.5`` -> ``"80.5"``, ``0.001`` -> ``"0.001"`` (for ranges in messages)."""
    return f"{value:,.3f}".rstrip("0").rstrip(".")


def number_in(what: str, value, low: float, high: float, low_open: bool = False) -> float:
    """``value`` as a float when it is a finite number in ``[low, high]`` (``(low, high]`` with ``low_open``);
    else ValueError naming ``what``, the value and the accepted range."""
    ok = not isinstance(value, bool) and isinstance(value, numbers.Real) and math.isfinite(value) and \
        (value > low if low_open else value >= low) and value <= high
    if not ok:
        raise ValueError(f"{what}={value!r}: expected a number from {plain_number(low)}"
                         f"{' (excluded)' if low_open else ''} to {plain_number(high)}")
    return float(value)


def megapixels(width: int, height: int) -> float:
    """Megapixels of a ``width`` x ``height`` image; ValueError unless both are 1 .. :data:`MAX_SIDE` pixels."""
    for what, side in (("width", width), ("height", height)):
        if isinstance(side, bool) or not isinstance(side, numbers.Real) or not math.isfinite(side) \
                or not 1 <= side <= MAX_SIDE:
            raise ValueError(f"image size must be positive, 1 to {MAX_SIDE} pixels per side, got {width}x{height} "
                             f"({what} {side!r})")
    return width * height / 1_000_000


def estimate_inference_vram_gb(width: int, height: int, loader_reserve_gb: float = 0.0,
                               per_mp_gb: float = DEFAULT_PER_MP_GB, exponent: float = 1.0,
                               base_gb: float = DEFAULT_BASE_GB) -> float:
    """VRAM (GB) inference needs beyond the weights: ``per_mp_gb * MP**exponent + base_gb + loader_reserve_gb``.
    Each term is checked (finite, >= 0, below a petabyte; the exponent in (0, 4])."""
    number_in("loader_reserve_gb", loader_reserve_gb, 0, MAX_GB)
    number_in("per_mp_gb", per_mp_gb, 0, MAX_GB)
    number_in("exponent", exponent, 0, MAX_EXPONENT, low_open=True)
    number_in("base_gb", base_gb, 0, MAX_GB)
    return per_mp_gb * megapixels(width, height) ** exponent + base_gb + loader_reserve_gb


@dataclass
class Calibration:
    """Measured activation cost of one model: ``base_gb + per_mp_gb * MP**exponent``."""

    model_id: str
    per_mp_gb: float
    base_gb: float
    exponent: float
    runs: int


@dataclass
class CalibrationStore:
    """Measured runs per model id; optionally persisted as JSON (``path``).

    One run: the base stays at the seed value and the per-MP cost is solved from the measurement.
    Runs at two or more different sizes: least-squares fit of base and per-MP cost (both kept >= 0).
    """

    path: str | None = None
    exponent: float = 1.0
    default_base_gb: float = DEFAULT_BASE_GB
    runs: dict[str, list[tuple[float, float]]] = field(default_factory=dict)  # id -> [(MP, activation GB)]

    def __post_init__(self):
        self._lock = threading.Lock()
        number_in("exponent", self.exponent, 0, MAX_EXPONENT, low_open=True)
        number_in("default_base_gb", self.default_base_gb, 0, MAX_GB)
        if self.path and os.path.exists(self.path):
            self.runs = _read_runs(self.path)

    def record_run(self, model_id: str, width: int, height: int, peak_bytes: int, weights_bytes: int) -> Calibration:
        """Store one measured run: ``peak_bytes`` (MemoryTracker's peak allocated) minus ``weights_bytes``."""
        for what, value in (("peak_bytes", peak_bytes), ("weights_bytes", weights_bytes)):
            number_in(f"{model_id}: {what}", value, 0, MAX_GB * GB)
        activation_gb = max(peak_bytes - weights_bytes, 0) / GB
        with self._lock:
            self.runs.setdefault(model_id, []).append((megapixels(width, height), activation_gb))
            self._save()
        return self.calibration(model_id)

    def _save(self) -> None:
        if not self.path:
            return
        tmp = self.path + ".tmp"
        with open(tmp, "w", encoding="utf-8") as fh:
            json.dump({"runs": self.runs}, fh, indent=1)
        os.replace(tmp, self.path)

    def calibration(self, model_id: str) -> Calibration | None:
        runs = self.runs.get(model_id)
        if not runs:
            return None
        xs = [mp ** self.exponent for mp, _ in runs]
        ys = [act for _, act in runs]
        n = len(runs)
        mean_x, mean_y = sum(xs) / n, sum(ys) / n
        var_x = sum((x - mean_x) ** 2 for x in xs)
        if var_x > 1e-12:
            slope = sum((x - mean_x) * (y - mean_y) for x, y in zip(xs, ys)) / var_x
            base = mean_y - slope * mean_x
            if slope < 0 or base < 0:  # noisy measurements: fall back to the one-parameter fit
                base = None
        else:
            base = None
        if base is None:
            base = min(self.default_base_gb, min(ys))
            slope = max(0.0, sum(y - base for y in ys) / max(sum(xs), 1e-12))
        return Calibration(model_id, per_mp_gb=slope, base_gb=base, exponent=self.exponent, runs=n)

    def forget(self, model_id: str | None = None) -> None:
        with self._lock:
            if model_id is None:
                self.runs.clear()
            else:
                self.runs.pop(model_id, None)
            self._save()


def _read_runs(path: str) -> dict[str, list[tuple[float, float]]]:
    """The runs of a calibration file; ValueError naming the file when it is not one (it is only a cache of
    measurements: deleting it loses nothing but the calibration)."""
    fix = f"delete {path} to start the calibration over"
    try:
        with open(path, encoding="utf-8") as fh:
            data = json.load(fh)
    except (OSError, UnicodeDecodeError, json.JSONDecodeError) as err:
        raise ValueError(f"calibration file {path} cannot be read ({err}); {fix}") from None
    runs = data.get("runs") if isinstance(data, dict) else None
    if not isinstance(runs, dict):
        raise ValueError(f"calibration file {path} has no 'runs' table; {fix}")
    out: dict[str, list[tuple[float, float]]] = {}
    for model_id, entries in runs.items():
        try:
            pairs = [(float(mp), float(gb)) for mp, gb in entries]
        except (TypeError, ValueError):
            raise ValueError(f"calibration file {path}: the runs of {model_id!r} are not [megapixels, GB] pairs; "
                             f"{fix}") from None
        if not all(math.isfinite(mp) and mp > 0 and math.isfinite(gb) and gb >= 0 for mp, gb in pairs):
            raise ValueError(f"calibration file {path}: the runs of {model_id!r} hold a NaN, infinite or negative "
                             f"value; {fix}")
        out[model_id] = pairs
    return out


DEFAULT_STORE = CalibrationStore()


def record_run(model_id: str, width: int, height: int, peak_bytes: int, weights_bytes: int,
               store: CalibrationStore | None = None) -> Calibration:
    """Record a measured run in ``store`` (default: the process-wide store) and return the new calibration."""
    return (store or DEFAULT_STORE).record_run(model_id, width, height, peak_bytes, weights_bytes)


def estimate_for_model(width: int, height: int, model_id: str | None = None, loader_reserve_gb: float = 0.0,
                       store: CalibrationStore | None = None, per_mp_gb: float = DEFAULT_PER_MP_GB,
                       exponent: float = 1.0, base_gb: float = DEFAULT_BASE_GB) -> tuple[float, str]:
    """(estimate GB, how it was obtained): calibrated when ``model_id`` has measured runs, else the seed rule."""
    store = store or DEFAULT_STORE
    cal = store.calibration(model_id) if model_id else None
    mp = megapixels(width, height)
    if cal is not None:
        gb = estimate_inference_vram_gb(width, height, loader_reserve_gb, cal.per_mp_gb, cal.exponent, cal.base_gb)
        how = (f"calibrated from {cal.runs} measured run(s) of {model_id}: {cal.per_mp_gb:.1f} GB/MP x {mp:.2f} MP"
               f" + {cal.base_gb:.1f} GB + reserve {loader_reserve_gb:.1f} GB = {gb:.1f} GB")
    else:
        gb = estimate_inference_vram_gb(width, height, loader_reserve_gb, per_mp_gb, exponent, base_gb)
        power = "" if exponent == 1.0 else f"^{exponent:g}"
        how = (f"estimate {per_mp_gb:g} GB x {mp:.2f} MP{power} + {base_gb:g} GB + reserve {loader_reserve_gb:.1f} GB"
               f" = {gb:.1f} GB")
    return gb, how


@dataclass(frozen=True)
class OffloadDecision:
    offload: bool
    reason: str
    rule: str  # always | disabled | int8_switch_to_smart+<rule> | free_below_min | used_above_pct | free_below_estimate | fits
    mode: str = "smart"  # the mode actually applied
    estimate_gb: float | None = None

    def __bool__(self) -> bool:
        return self.offload


def should_offload(width: int, height: int, free_bytes: int, total_bytes: int, loader_reserve_gb: float = 0.0,
                   mode: str = "smart", quantized: bool = False, *, model_id: str | None = None,
                   store: CalibrationStore | None = None, min_free_gb: float = DEFAULT_MIN_FREE_GB,
                   max_used_pct: float = DEFAULT_MAX_USED_PCT,
                   quantized_switch_mp: float = DEFAULT_QUANTIZED_SWITCH_MP, per_mp_gb: float = DEFAULT_PER_MP_GB,
                   exponent: float = 1.0, base_gb: float = DEFAULT_BASE_GB) -> OffloadDecision:
    """Seed 000 §5: with the model loaded, is there room to run inference at this size?

    ``mode="smart"``: offload when free < ``min_free_gb``, or more than ``max_used_pct`` % of the card is
    used, or free < the inference estimate (rules checked in that order). ``"always"``: offload.
    ``"disabled"``: don't - except a quantized (INT8/NF4) model above ``quantized_switch_mp`` megapixels,
    which switches to smart (seed 001: INT8 at high resolution otherwise OOMs).
    """
    if mode not in MODES:
        raise ValueError(f"offload mode must be one of {MODES}, got {mode!r}")
    number_in("total_bytes", total_bytes, 0, MAX_GB * GB, low_open=True)
    number_in("free_bytes", free_bytes, 0, total_bytes)
    number_in("min_free_gb", min_free_gb, 0, MAX_GB)
    number_in("max_used_pct", max_used_pct, 0, 100)
    number_in("quantized_switch_mp", quantized_switch_mp, 0, MAX_SIDE * MAX_SIDE / 1e6)
    mp = megapixels(width, height)
    prefix = ""
    if mode == "always":
        return OffloadDecision(True, "offload mode 'always'", "always", "always")
    if mode == "disabled":
        if not (quantized and mp > quantized_switch_mp):
            return OffloadDecision(False, "offload mode 'disabled'", "disabled", "disabled")
        prefix = (f"quantized model at {mp:.2f} MP > {quantized_switch_mp:g} MP: offload 'disabled' switched to "
                  "'smart' to avoid an out-of-memory error; ")
    free_gb = free_bytes / GB
    total_gb = total_bytes / GB
    used_pct = 100.0 * (total_bytes - free_bytes) / total_bytes
    estimate_gb, how = estimate_for_model(width, height, model_id, loader_reserve_gb, store, per_mp_gb, exponent, base_gb)
    if free_gb < min_free_gb:
        rule, offload = "free_below_min", True
        why = f"free {free_gb:.1f} GB < {min_free_gb:g} GB minimum"
    elif used_pct > max_used_pct:
        rule, offload = "used_above_pct", True
        why = f"{used_pct:.1f} % of {total_gb:.1f} GB used > {max_used_pct:g} %"
    elif free_gb < estimate_gb:
        rule, offload = "free_below_estimate", True
        why = f"free {free_gb:.1f} GB < inference needs {estimate_gb:.1f} GB ({how})"
    else:
        rule, offload = "fits", False
        why = (f"no offload: free {free_gb:.1f} GB >= {min_free_gb:g} GB, {used_pct:.1f} % used <= {max_used_pct:g} %,"
               f" free >= inference needs {estimate_gb:.1f} GB ({how})")
    if offload:
        why = "offload: " + why
    if prefix:
        rule = "int8_switch_to_smart+" + rule
    return OffloadDecision(offload, prefix + why, rule, "smart", estimate_gb)
