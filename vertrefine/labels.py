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


def parse_label_list(text: str) -> frozenset[int]:
    """Label ids from '20-24,19' or 'L1-L5,T12' (ranges inclusive; level names or VerSe ids)."""

    def one(token: str) -> int:
        token = token.strip()
        if token.isdigit():
            return int(token)
        label = label_for_level(token)
        if label is None:
            raise ValueError(f"{token!r} is neither a label id nor a level name such as L1 or T12")
        return label

    labels: set[int] = set()
    for part in text.split(","):
        if not part.strip():
            continue
        if "-" in part:
            low, high = (one(p) for p in part.split("-", 1))
            if high < low:
                raise ValueError(f"range {part.strip()!r} runs backwards")
            labels.update(range(low, high + 1))
        else:
            labels.add(one(part))
    if not labels or 0 in labels:
        raise ValueError(f"{text!r} names no label ids (0 is background)")
    return frozenset(labels)
