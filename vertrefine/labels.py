"""Vertebra label numbering (VerSe): label ids, level names and their order."""

from __future__ import annotations

# VerSe: 1-7 = C1-C7, 8-19 = T1-T12, 20-24 = L1-L5, 25 = L6, 26 = sacrum, 27 = coccyx, 28 = T13.
_NAMES: dict[int, str] = {
    **{i: f"C{i}" for i in range(1, 8)},
    **{i + 7: f"T{i}" for i in range(1, 13)},
    **{i + 19: f"L{i}" for i in range(1, 7)},
    26: "sacrum",
    27: "coccyx",
    28: "T13",
}
_IDS: dict[str, int] = {name.upper(): label for label, name in _NAMES.items()}

LUMBAR_LABELS: tuple[int, ...] = (20, 21, 22, 23, 24)
"""L1..L5, the labels that ``synth`` writes."""


def level_name(label: int) -> str:
    """'L1' for 20, 'T12' for 19; other ids are named 'label N'."""
    return _NAMES.get(int(label), f"label {int(label)}")


def label_for_level(name: str) -> int | None:
    """VerSe id of a level name such as 'L1', 'l1', 'T12', 'L1 vertebra'; None when not a known level."""
    key = name.strip().upper()
    for suffix in (" VERTEBRA", "_VERTEBRA", " VERTEBRAE"):
        if key.endswith(suffix):
            key = key[: -len(suffix)].strip()
    if key.startswith(("VERTEBRAE_", "VERTEBRA_")):
        key = key.split("_", 1)[1]
    return _IDS.get(key)
