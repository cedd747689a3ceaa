"""Search-space distributions, written as the text of a call: `loguniform(0.1, 10)`, `choice([4, 8])`.

    dist = parse_distribution("method.weights.structural", "loguniform(0.1, 10)")
    dist.edge_values()   # [0.1, 10.0]: what the sweep checks against distill's validation

Parsed with `ast` (literal arguments only, nothing is evaluated); errors name the key. No Ray here:
components/training/sweep.py turns a Distribution into Ray Tune's sampler.
"""

from __future__ import annotations

import ast
import math
from dataclasses import dataclass
from typing import Any

from components.config import ConfigError

# name -> (number of arguments, what they are); the Ray Tune function of the same name samples it.
DISTRIBUTIONS = {
    "uniform": (2, "low, high"),
    "loguniform": (2, "low, high (both > 0)"),
    "quniform": (3, "low, high, q"),
    "qloguniform": (3, "low, high, q"),
    "randint": (2, "low, high (high exclusive)"),
    "qrandint": (3, "low, high, q (high inclusive)"),
    "choice": (1, "[a list of values]"),
    "grid": (1, "[a list of values, every one tried]"),
}


@dataclass(frozen=True)
class Distribution:
    name: str
    args: tuple

    def text(self) -> str:
        return f"{self.name}({', '.join(repr(a) for a in self.args)})"

    @property
    def log_scale(self) -> bool:
        return self.name in ("loguniform", "qloguniform")

    def edge_values(self) -> list:
        """Values the distribution can produce that span it: the bounds, or every choice."""
        if self.name in ("choice", "grid"):
            return list(self.args[0])
        low, high = self.args[0], self.args[1]
        if self.name == "randint":
            return [int(low), int(high) - 1]
        if self.name == "qrandint":
            q = self.args[2]
            top = high if q != 1 else high - 1  # Ray: high is exclusive when q == 1
            return [int(math.ceil(low / q) * q), int(math.floor(top / q) * q)]
        return [float(low), float(high)]


def parse_distribution(key: str, text: Any) -> Distribution:
    """`"loguniform(0.1, 10)"` -> Distribution; raises ConfigError naming `key`."""
    where = f"search '{key}'"
    if not isinstance(text, str):
        raise ConfigError(
            f"{where}: expected a distribution such as 'loguniform(0.1, 10)' or "
            f"'choice([1, 2])', got {text!r} (a fixed value goes under 'overrides:')"
        )
    try:
        node = ast.parse(text.strip(), mode="eval").body
    except SyntaxError as e:
        raise ConfigError(f"{where}: cannot parse {text!r}: {e.msg}") from e
    if not (isinstance(node, ast.Call) and isinstance(node.func, ast.Name)) or node.keywords:
        raise ConfigError(f"{where}: {text!r} is not of the form name(arguments)")
    name = node.func.id
    if name not in DISTRIBUTIONS:
        raise ConfigError(
            f"{where}: unknown distribution '{name}' (known: {', '.join(DISTRIBUTIONS)})"
        )
    try:
        args = tuple(ast.literal_eval(a) for a in node.args)
    except ValueError as e:
        raise ConfigError(f"{where}: arguments of {text!r} must be literal values") from e
    count, meaning = DISTRIBUTIONS[name]
    if len(args) != count:
        raise ConfigError(f"{where}: {name} takes {count} argument(s) ({meaning}), got {len(args)}")
    if name in ("choice", "grid"):
        values = args[0]
        if not isinstance(values, (list, tuple)) or not values:
            raise ConfigError(f"{where}: {name} needs a non-empty list, got {values!r}")
        return Distribution(name, (list(values),))
    numbers = [a for a in args if isinstance(a, (int, float)) and not isinstance(a, bool)]
    if len(numbers) != count:
        raise ConfigError(f"{where}: {name}({meaning}) takes numbers, got {args!r}")
    low, high = args[0], args[1]
    if name in ("randint", "qrandint") and not all(isinstance(a, int) for a in args):
        raise ConfigError(f"{where}: {name} takes integers, got {args!r}")
    if not low < high:
        raise ConfigError(f"{where}: {name} needs low < high, got {low} and {high}")
    if name in ("loguniform", "qloguniform") and low <= 0:
        raise ConfigError(f"{where}: {name} needs low > 0, got {low}")
    if count == 3 and args[2] <= 0:
        raise ConfigError(f"{where}: {name} needs q > 0, got {args[2]}")
    if name in ("quniform", "qloguniform"):
        q = args[2]
        for bound in (low, high):
            if not math.isclose(bound / q, round(bound / q)):
                raise ConfigError(
                    f"{where}: {name} needs bounds that are multiples of q ({q}), got {bound}"
                )
    return Distribution(name, args)


__all__ = ["DISTRIBUTIONS", "Distribution", "parse_distribution"]
