"""Config keys renamed in 0.2, still read in this release with a warning naming the new key.

Names that explain themselves (`pi` -> `pixel_kd`, `str` -> `structural`, ...), and each
regime's loss weights in its own section (`method.weights.cls` -> `method.weakly.weights.cls`).
`config.merge_config` moves old keys of a YAML file or an override (with the warning);
`config.from_dict` moves those of a checkpoint's own metadata quietly.
"""

from __future__ import annotations

import sys

# Keys renamed in 0.2 (names that explain themselves; each regime's weights in its own section).
# The old names are still accepted in this release, with a warning naming the new key.
RENAMED = {
    "method.weights.pi": "method.weights.pixel_kd",
    "method.weights.adv": "method.weights.adversarial",
    "method.weights.str": "method.weights.structural",
    "method.weights.sta": "method.weights.statistical",
    "method.weights.cwd_feat": "method.weights.cwd_feature",
    "method.weights.skd": "method.weights.pairwise",
    "method.weights.critic": "method.adversarial.critic_weight",
    **{
        f"method.weights.{k}": f"method.semisup.weights.{k}" for k in ("unsup", "relation", "style")
    },
    **{f"method.weights.{k}": f"method.weakly.weights.{k}" for k in ("cls", "seg", "aff", "scd")},
}


def renamed_key(old: str, source: str | None) -> str:
    new = RENAMED[old]
    if source is not None:
        print(
            f"warning: {source}: '{old}' is deprecated and will be removed in the next "
            f"release; use '{new}'",
            file=sys.stderr,
            flush=True,
        )
    return new


def rename_keys(tree: dict, source: str | None = None) -> dict:
    """A config tree (nested dicts) with every old key of RENAMED moved to its new place;
    warns naming both unless `source` is None (a checkpoint's own metadata). An old weight left
    at null (its method's published default) is dropped."""
    moves = []
    for old in RENAMED:
        *parents, leaf = old.split(".")
        node = tree
        for part in parents:
            node = node.get(part) if isinstance(node, dict) else None
        if isinstance(node, dict) and leaf in node:
            moves.append((old, node.pop(leaf)))
    for old, value in moves:
        if value is None:
            continue
        *parents, leaf = renamed_key(old, source).split(".")
        node = tree
        for part in parents:
            node = node.setdefault(part, {})
        node[leaf] = value
    return tree


def rename_override(item: str) -> str:
    key, _, value = item.partition("=")
    return f"{renamed_key(key, 'command line')}={value}" if key in RENAMED else item
