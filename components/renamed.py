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


# Old flat weights of the supervised terms (old name -> new term name).
_OLD_TERMS = {
    "pi": "pixel_kd",
    "adv": "adversarial",
    "str": "structural",
    "sta": "statistical",
    "cwd_feat": "cwd_feature",
    "cwd_logit": "cwd_logit",
    "skd": "pairwise",
    "batch_pixel": "batch_pixel",
    "memory_pixel": "memory_pixel",
    "memory_region": "memory_region",
}
_OLD_ONLY = {k.rsplit(".", 1)[1] for k in RENAMED}


def _old_weights(flat: dict, method: str) -> tuple[dict, dict, list[str]]:
    """An old flat `method.weights` (every regime's weights in one bag) as the new sections:
    ({dotted key: value}, {old key: new key} for the warning, [ignored old keys]). Only what the
    old code read for `method` is kept: a supervised method used ce, aux, critic, its own terms
    and pi / adv when set; fixmatch ce, aux, unsup; cross_image also relation, style; tscd cls,
    seg, aff, scd."""
    from components.distillation.terms import METHODS

    out, moved, ignored = {}, {}, []
    for old, value in flat.items():
        new = None
        if method in METHODS:
            term = _OLD_TERMS.get(old)
            if old in ("ce", "aux"):
                new = f"method.weights.{old}"
            elif old == "critic":
                new = "method.adversarial.critic_weight"
            elif term is not None and (term in METHODS[method] or old in ("pi", "adv")):
                new = None if value is None else f"method.weights.{term}"  # null: published
                if value is None:
                    continue
        elif method in ("fixmatch", "cross_image"):
            used = ("ce", "aux", "unsup") + (
                ("relation", "style") if method == "cross_image" else ()
            )
            new = f"method.semisup.weights.{old}" if old in used else None
        elif method == "tscd":
            new = f"method.weakly.weights.{old}" if old in ("cls", "seg", "aff", "scd") else None
        if new is None:
            ignored.append(f"method.weights.{old}")
            continue
        out[new] = value
        if f"method.weights.{old}" != new:
            moved[f"method.weights.{old}"] = new
    return out, moved, ignored


def rename_keys(tree: dict, source: str | None = None) -> dict:
    """A config tree (nested dicts) with the keys of before 0.2 moved to their new places.

    A `method.weights` holding any old-only name (`pi`, `sta`, `unsup`, `cls`, ...) is an old
    flat bag: each weight goes where the run's method (`method.name`, default sstkd) reads it,
    and the weights the old code ignored for that method are dropped, so an old file means what
    it meant. Warns on stderr naming old and new keys, unless `source` is None (a checkpoint's
    own metadata)."""
    method_tree = tree.get("method") if isinstance(tree.get("method"), dict) else None
    flat = method_tree.get("weights") if method_tree is not None else None
    if not isinstance(flat, dict) or not (set(flat) & _OLD_ONLY):
        return tree
    method = method_tree.get("name") or "sstkd"
    new, moved, ignored = _old_weights(method_tree.pop("weights"), method)
    for key, value in new.items():
        *parents, leaf = key.split(".")
        node = tree
        for part in parents:
            node = node.setdefault(part, {})
        node[leaf] = value
    if source is not None and (moved or ignored):
        lines = [f"'{a}' is now '{b}'" for a, b in moved.items()]
        if ignored:
            lines.append(f"ignored as before by method '{method}': {', '.join(ignored)}")
        print(
            f"warning: {source}: key names of before 0.2 (still read in this release, to be "
            f"removed in the next): {'; '.join(lines)}",
            file=sys.stderr,
            flush=True,
        )
    return tree


def rename_override(item: str) -> str:
    key, _, value = item.partition("=")
    return f"{renamed_key(key, 'command line')}={value}" if key in RENAMED else item
