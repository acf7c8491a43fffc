"""Fuzzing the reader on the real files: ../shared/data's DICOMs, NIH PNGs and a few Kermany JPEGs as seeds.

The same property, mutations and memory cap as tests/unit/test_reader_fuzz.py, with fewer mutants of
the large files (see support.reader_fuzz.mutants_for_size).
"""

from __future__ import annotations

from pathlib import Path

import pytest

from support.reader_fuzz import fuzz_seeds

pytestmark = pytest.mark.realdata


def real_seeds(shared: Path) -> list[tuple[str, bytes]]:
    paths = sorted((shared / "dicom").glob("*.dcm")) + sorted((shared / "samples").rglob("*.png"))
    paths += sorted((shared / "kermany224").rglob("*.jpeg"))[:4]
    return [(p.name, p.read_bytes()) for p in paths]


@pytest.mark.timeout(600)
def test_every_mutant_of_the_real_files_decodes_sanely_or_is_refused(shared_data, tmp_path, record_property):
    seeds = real_seeds(shared_data)
    assert any(name.endswith(".dcm") for name, _ in seeds), f"no DICOMs under {shared_data / 'dicom'}"
    result = fuzz_seeds(seeds, tmp_path, record_property)
    assert result["decoded"] > 0 and result["refused"] > 0
