"""Patient fields the reader may pass on: a salted key instead of the id, and the age in years."""

from __future__ import annotations

import hashlib
import os
import re
from typing import Any

MAX_AGE_YEARS = 120  # older is a data-entry error (NIH's 2017 table has ages such as 414): unknown


_AGE = re.compile(r"^(\d+(?:\.\d+)?)\s*([YMWD]?)$", re.IGNORECASE)


_AGE_PER_YEAR = {"": 1, "Y": 1, "M": 12, "W": 52.18, "D": 365.25}


# The salt keeps raw patient ids from being recoverable by hashing a list of known ids.
SALT_ENV = "CXR_PATIENT_SALT"


DEFAULT_SALT = "cxr-patient-key-v1"


def patient_key(patient_id: str | None, source: str = "") -> str | None:
    """Salted, truncated SHA-256 of a patient id: stable for splitting, not reversible to the id."""
    if patient_id is None or str(patient_id).strip() == "":
        return None
    salt = os.environ.get(SALT_ENV, DEFAULT_SALT)
    digest = hashlib.sha256(f"{salt}|{source}|{str(patient_id).strip()}".encode()).hexdigest()
    return digest[:16]


def age_years(value: Any) -> float | None:
    """An age in years from a DICOM Age String ("045Y", "006M", "003W", "010D") or a number of years as
    text ("58", as source tables write it). None when missing, unreadable or over MAX_AGE_YEARS. Whole
    years stay an int, so a manifest (and its dataset hash) reads as it did."""
    match = _AGE.match(str(value if value is not None else "").strip())
    if not match:
        return None
    number, unit = match.groups()
    per_year = _AGE_PER_YEAR[unit.upper()]
    n = float(number) if "." in number else int(number)
    years = n if per_year == 1 else n / per_year
    return years if years <= MAX_AGE_YEARS else None
