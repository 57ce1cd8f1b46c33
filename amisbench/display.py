"""Display names of result labels for figures and the results page (``prob_unet`` -> "Prob. U-Net").

The names come from the rows of ``configs/tables.yaml`` (one source of truth with the tables); labels no
table names get a name here or keep their label.
"""

from __future__ import annotations

from functools import lru_cache

#: rows that no table of the paper has
EXTRA = {"unet": "U-Net (floor)", "oracle": "Oracle (ceiling)", "p2sam": "P2SAM"}


@lru_cache(maxsize=1)
def _names() -> dict[str, str]:
    from .errors import UserError
    from .report.definitions import load_definitions

    out = dict(EXTRA)
    try:
        defs = load_definitions()
    except UserError:
        return out
    for d in defs.values():
        for r in d.rows:
            if r.name and "-" not in r.key:
                out.setdefault(r.key, r.name)
    return out


def display_name(label: str) -> str:
    """The name a reader knows a result label by; a variant is named after its method:
    ``atfm-act_gtr`` -> "ATFM (act_gtr)".

    Example:
        >>> display_name("prob_unet"), display_name("atfm-sfm"), display_name("mine")
        ('Prob. U-Net', 'ATFM (sfm)', 'mine')
    """
    names = _names()
    if label in names:
        return names[label]
    from .store import RunSpec

    method, variant, _ = RunSpec.parse_label(label)
    if variant and method in names:
        return f"{names[method]} ({variant})"
    return label
