"""Mutation fuzzing of ``cxr.imaging.read_image``: seed files in, deterministic mutants out, every answer checked.

The property: each input either decodes to a sane Image or raises ImageReadError. The loop runs in a child
process (``python reader_fuzz.py PLAN.json OUT_DIR``) whose address space is capped at 2 GiB above what it
holds after warming up (RLIMIT_AS) and which an alarm kills when one case runs for HANG_SECONDS, so a decoder
that hangs, crashes or asks for gigabytes fails the test with the case named instead of taking the run down.

PLAN.json: ``{"seed": int, "seeds": [{"path": str, "mutants": int}, ...]}``. Mutant ``k`` of seed ``i`` is
drawn from ``numpy.random.default_rng([seed, i, k])``, so a case named in a report can be rebuilt alone
(``mutant(data, [seed, i, k])``); the bytes of every failing case are also kept in OUT_DIR/failures/.
OUT_DIR/report.json holds the counts (decoded / refused, per mutation kind), failures and peak memory.
"""

from __future__ import annotations

import io
import json
import math
import os
import resource
import signal
import struct
import subprocess
import sys
import time
import warnings
import zlib
from collections import Counter
from collections.abc import Callable
from pathlib import Path

import numpy as np
import pydicom
from pydicom.data import get_testdata_file
from pydicom.encaps import generate_frames

from cxr.imaging import Image, ImageReadError, ReadLimits, read_image
from cxr.preprocess import PreprocessSpec, preprocess

MEMORY_CAP = 2 * 1024**3  # bytes of address space a case may add to the warmed-up process
HANG_SECONDS = 60  # one case of a few kB decodes in milliseconds: a minute without an answer is a hang
LIMITS = ReadLimits()
SPEC = PreprocessSpec(size=32)
PNG_MAGIC = b"\x89PNG\r\n\x1a\n"
Rng = np.random.Generator

# --- byte-level mutations (any format) ---------------------------------------------------------------


def truncate(rng: Rng, data: bytes) -> bytes:
    return data[: int(rng.integers(0, len(data)))]


def flip_bits(rng: Rng, data: bytes) -> bytes:
    out = bytearray(data)
    for _ in range(int(rng.integers(1, 9))):
        out[int(rng.integers(len(out)))] ^= 1 << int(rng.integers(8))
    return bytes(out)


def overwrite_run(rng: Rng, data: bytes) -> bytes:
    at, n = int(rng.integers(len(data))), int(rng.integers(1, 65))
    return data[:at] + rng.bytes(n) + data[at + n :]


def splice(rng: Rng, data: bytes) -> bytes:
    """Delete a chunk or repeat it: lengths and offsets no longer match the content."""
    a, b = sorted(int(v) for v in rng.integers(0, len(data), 2))
    return data[:a] + data[b:] if rng.random() < 0.5 else data[:b] + data[a:b] + data[b:]


# --- DICOM header mutations --------------------------------------------------------------------------

_UIDS = [
    "1.2.840.10008.1.2",  # implicit VR little endian
    "1.2.840.10008.1.2.1",  # explicit VR little endian
    "1.2.840.10008.1.2.2",  # explicit VR big endian
    "1.2.840.10008.1.2.4.50",  # JPEG baseline
    "1.2.840.10008.1.2.4.70",  # JPEG lossless
    "1.2.840.10008.1.2.4.80",  # JPEG-LS lossless
    "1.2.840.10008.1.2.4.90",  # JPEG 2000 lossless
    "1.2.840.10008.1.2.5",  # RLE lossless
    "1.2.3.4.5",  # no such syntax
]
ABSURD: dict[str, list] = {
    "Rows": [0, 1, 15, 7745, 65535],
    "Columns": [0, 1, 15, 7745, 65535],
    "BitsAllocated": [0, 1, 7, 12, 32, 64, 65535],
    "BitsStored": [0, 1, 17, 32, 65535],
    "HighBit": [0, 31, 65535],
    "SamplesPerPixel": [0, 2, 3, 4, 65535],
    "PixelRepresentation": [1, 2, 65535],
    "PlanarConfiguration": [1, 65535],
    "NumberOfFrames": ["0", "-1", "2", "999999999"],
    "PhotometricInterpretation": ["MONOCHROME1", "RGB", "PALETTE COLOR", "YBR_FULL_422", "", "NONSENSE"],
    "RescaleSlope": ["0", "-1", "1e30", "1e308", "NaN", "inf"],
    "RescaleIntercept": ["-1e38", "1e308", "nan"],
    "WindowCenter": ["0", "-1e308", "nan"],
    "WindowWidth": ["0", "-1", "1e-30", "1e308"],
}
# Pairs that pass imaging.max_pixels alone yet make a decoder size a buffer of ~60 M pixels
HUGE_SHAPES = [(7745, 7745), (65535, 915), (915, 65535)]


def dicom_header(rng: Rng, data: bytes) -> bytes:
    """One to three header attributes (or the transfer syntax) set to absurd values, the file re-encoded."""
    ds = pydicom.dcmread(io.BytesIO(data), force=True)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")  # pydicom warns about each invalid value: that is the point
        _set_absurd_values(rng, ds)
    buf = io.BytesIO()
    ds.save_as(buf, enforce_file_format=False)
    return buf.getvalue()


def _set_absurd_values(rng: Rng, ds: pydicom.Dataset) -> None:
    for _ in range(int(rng.integers(1, 4))):
        pick = int(rng.integers(len(ABSURD) + 2))
        if pick == len(ABSURD):
            ds.Rows, ds.Columns = HUGE_SHAPES[int(rng.integers(len(HUGE_SHAPES)))]
        elif pick == len(ABSURD) + 1:
            ds.file_meta.TransferSyntaxUID = _UIDS[int(rng.integers(len(_UIDS)))]
        else:
            key = list(ABSURD)[pick]
            setattr(ds, key, ABSURD[key][int(rng.integers(len(ABSURD[key])))])


# --- PNG and JPEG header mutations -------------------------------------------------------------------


def png_chunks(data: bytes) -> list[tuple[int, bytes, bytes]]:
    """(offset, type, payload) of each chunk of a PNG that is whole enough to walk."""
    chunks, at = [], len(PNG_MAGIC)
    while at + 12 <= len(data):
        (length,) = struct.unpack_from(">I", data, at)
        chunks.append((at, data[at + 4 : at + 8], data[at + 8 : at + 8 + length]))
        at += 12 + length
    return chunks


def png_with_chunk(data: bytes, offset: int, kind: bytes, payload: bytes) -> bytes:
    """``data`` with the chunk at ``offset`` replaced by ``kind`` + ``payload`` under a valid CRC."""
    (length,) = struct.unpack_from(">I", data, offset)
    chunk = struct.pack(">I", len(payload)) + kind + payload + struct.pack(">I", zlib.crc32(kind + payload))
    return data[:offset] + chunk + data[offset + 12 + length :]


def png_ihdr(width: int, height: int, data: bytes, **fields: int) -> bytes:
    """``data`` (a PNG) whose IHDR claims ``width`` x ``height`` (and other fields), with a valid CRC."""
    offset, _, ihdr = png_chunks(data)[0]
    depth, colour, comp, filt, interlace = (fields.get(k, ihdr[8 + i]) for i, k in enumerate(IHDR_FIELDS))
    payload = struct.pack(">IIBBBBB", width, height, depth, colour, comp, filt, interlace)
    return png_with_chunk(data, offset, b"IHDR", payload)


IHDR_FIELDS = ("depth", "colour", "compression", "filter", "interlace")
IHDR_ABSURD = {"depth": [0, 3, 16, 255], "colour": [1, 5, 7, 255], "compression": [1], "filter": [1], "interlace": [2]}
HUGE_SIDES = [0, 1, 100_000, 65_535, 2**31 - 1]


def png_header(rng: Rng, data: bytes) -> bytes:
    """IHDR claiming absurd dimensions or fields, under a valid CRC (a bomb or a lie, not a CRC error)."""
    if rng.random() < 0.5:
        side = [HUGE_SIDES[int(i)] for i in rng.integers(len(HUGE_SIDES), size=2)]
        return png_ihdr(side[0], side[1], data)
    _, _, ihdr = png_chunks(data)[0]
    key = IHDR_FIELDS[int(rng.integers(len(IHDR_FIELDS)))]
    width, height = struct.unpack_from(">II", ihdr)
    return png_ihdr(width, height, data, **{key: IHDR_ABSURD[key][int(rng.integers(len(IHDR_ABSURD[key])))]})


def png_chunk_bits(rng: Rng, data: bytes) -> bytes:
    """Bits flipped inside one chunk whose CRC is then made valid again: the decoder, not the CRC check, sees it."""
    offset, kind, payload = png_chunks(data)[int(rng.integers(len(png_chunks(data))))]
    return png_with_chunk(data, offset, kind, flip_bits(rng, payload) if payload else payload)


_SOF = {0xC0, 0xC1, 0xC2, 0xC3, 0xC5, 0xC6, 0xC7, 0xC9, 0xCA, 0xCB, 0xCD, 0xCE, 0xCF}


def jpeg_frame_header(rng: Rng, data: bytes) -> bytes:
    """The SOF segment's precision, height, width or component count set to an absurd value."""
    at = next(i for i in range(2, len(data) - 9) if data[i] == 0xFF and data[i + 1] in _SOF)
    out = bytearray(data)
    field = int(rng.integers(4))
    if field == 0:
        out[at + 4] = [0, 1, 12, 16, 255][int(rng.integers(5))]
    elif field in (1, 2):
        struct.pack_into(">H", out, at + 5 + 2 * (field - 1), [0, 1, 65535][int(rng.integers(3))])
    else:
        out[at + 9] = [0, 2, 4, 255][int(rng.integers(4))]
    return bytes(out)


# --- the mutant of a seed ----------------------------------------------------------------------------

GENERIC: list[Callable[[Rng, bytes], bytes]] = [truncate, flip_bits, flip_bits, overwrite_run, splice]


def mutations_for(data: bytes) -> list[Callable[[Rng, bytes], bytes]]:
    if data.startswith(PNG_MAGIC):
        return [*GENERIC, png_header, png_chunk_bits]
    if data.startswith(b"\xff\xd8\xff"):
        return [*GENERIC, jpeg_frame_header, jpeg_frame_header]
    return [*GENERIC, dicom_header, dicom_header]


def mutant(data: bytes, key: list[int]) -> tuple[str, bytes]:
    """(mutation name, bytes) for one key; a header mutation the seed cannot take becomes a bit flip."""
    rng = np.random.default_rng(key)
    choices = mutations_for(data)
    mutate = choices[int(rng.integers(len(choices)))]
    try:
        return mutate.__name__, mutate(rng, data)
    except Exception:  # e.g. pydicom refuses to re-encode this header: mutate the bytes instead
        return "flip_bits", flip_bits(rng, data)


def rle_with_one_flipped_bit() -> bytes:
    """pydicom's RLE test file with the top bit of its first RLE control byte flipped: a 14-byte literal run
    becomes a 116-byte replicate run that overruns the segment, and pylibjpeg-rle's Rust decoder panics. Relabelled
    a chest CR, so that a reader refusing non-chest headers first still hands it to the decoder."""
    ds = pydicom.dcmread(get_testdata_file("MR_small_RLE.dcm"))
    ds.BodyPartExamined, ds.Modality = "CHEST", "CR"
    buf = io.BytesIO()
    ds.save_as(buf)
    data = buf.getvalue()
    frame = next(generate_frames(ds.PixelData, number_of_frames=1))
    first_segment = data.find(frame) + struct.unpack_from("<I", frame, 4)[0]  # RLE header: count, then offsets
    flipped = bytearray(data)
    flipped[first_segment] ^= 0x80
    return bytes(flipped)


def fixed_cases(seeds: list[bytes]) -> list[tuple[str, bytes]]:
    """Inputs that are no seed's mutant: empty, garbage, magic numbers followed by garbage, non-images."""
    rng = np.random.default_rng(0)
    png = next((s for s in seeds if s.startswith(PNG_MAGIC)), None)
    cases = [("empty", b""), ("text", b"patient list\nnothing to see here\n" * 30)]
    cases.append(("rle-flipped-bit", rle_with_one_flipped_bit()))
    cases += [(f"garbage-{n}", rng.bytes(n)) for n in (1, 7, 131, 132, 4096, 70_000)]
    cases += [
        ("png-magic+garbage", PNG_MAGIC + rng.bytes(300)),
        ("jpeg-magic+garbage", b"\xff\xd8\xff\xe0" + rng.bytes(300)),
        ("dicm-preamble+garbage", bytes(128) + b"DICM" + rng.bytes(300)),
        ("dicm-preamble-only", bytes(128) + b"DICM"),
        ("pdf", b"%PDF-1.4\n1 0 obj << /Type /Catalog >> endobj\ntrailer << /Root 1 0 R >>\n%%EOF\n"),
        ("zip", b"PK\x03\x04" + bytes(26) + rng.bytes(200)),
        ("gif", b"GIF89a" + struct.pack("<HH", 64, 64) + rng.bytes(200)),
        # zeros: pydicom reads them as millions of empty elements unless the reader stops it
        ("zeros-8MB", bytes(8 * 1024 * 1024)),
        ("dicom-tag+zeros-8MB", b"\x08\x00\x05\x00\x0a\x00\x00\x00ISO_IR 100" + bytes(8 * 1024 * 1024)),
        ("dicm-preamble+zeros-8MB", bytes(128) + b"DICM" + bytes(8 * 1024 * 1024)),
    ]
    if png is not None:
        cases.append(("png-100000x100000", png_ihdr(100_000, 100_000, png)))
    return cases


# --- checking one answer -----------------------------------------------------------------------------


def insanity(image: Image) -> str | None:
    """Why a decoded Image is not sane, or None."""
    px = image.pixels
    if not isinstance(px, np.ndarray) or px.dtype != np.float32 or px.ndim != 2:
        return f"pixels are {type(px).__name__} {getattr(px, 'dtype', '')} {getattr(px, 'shape', '')}"
    rows, cols = px.shape
    if min(rows, cols) < LIMITS.min_side or rows * cols > LIMITS.max_pixels:
        return f"shape {px.shape} is outside the read limits"
    if (image.meta.get("rows"), image.meta.get("cols")) != (rows, cols):
        return f"meta says {image.meta.get('rows')}x{image.meta.get('cols')}, pixels are {rows}x{cols}"
    if not np.isfinite(px).all() or px.min() == px.max():
        return "pixels are not finite or are constant"
    lo, hi = image.meta["range"]
    if not (math.isfinite(lo) and math.isfinite(hi) and lo <= hi):
        return f"nominal range {(lo, hi)}"
    x = preprocess(image, SPEC)
    if x.shape != (SPEC.size, SPEC.size) or x.dtype != np.uint8:
        return f"preprocess gave {x.dtype} {x.shape}"
    return None


def out_of_memory(exc: BaseException) -> bool:
    """True when a refusal hides a MemoryError, i.e. the case hit the address-space cap."""
    seen: BaseException | None = exc
    while seen is not None:
        if isinstance(seen, MemoryError):
            return True
        seen = seen.__cause__ or seen.__context__
    return False


def check(data: bytes) -> tuple[str, str | None]:
    """("decoded" | "refused" | "failed", problem or None) for one input."""
    try:
        image = read_image(data)
    except ImageReadError as exc:
        if out_of_memory(exc):
            return "failed", f"needed more than {MEMORY_CAP} bytes: {exc}"
        return "refused", None
    except BaseException as exc:  # the bug this harness hunts: anything else escaping the reader
        return "failed", f"escaped the reader: {type(exc).__module__}.{type(exc).__qualname__}: {exc}"[:500]
    try:
        problem = insanity(image)
    except Exception as exc:
        problem = f"preprocess failed: {type(exc).__name__}: {exc}"[:500]
    return ("failed", problem) if problem else ("decoded", None)


# --- the child process -------------------------------------------------------------------------------


class Progress:
    """The case being run, in a file the parent reads when this process dies (crash, alarm, abort)."""

    def __init__(self, path: Path) -> None:
        self.fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_TRUNC)

    def at(self, name: str) -> None:
        os.pwrite(self.fd, name.encode()[:300].ljust(300), 0)


def proc_status_bytes(field: str) -> int:
    return next(int(line.split()[1]) * 1024 for line in open("/proc/self/status") if line.startswith(f"{field}:"))


def rss_mib() -> int:
    """Peak resident memory of this process so far (VmHWM: ru_maxrss would carry the parent's peak over exec)."""
    return round(proc_status_bytes("VmHWM") / 2**20)


def cap_address_space() -> None:
    vm = proc_status_bytes("VmSize")
    resource.setrlimit(resource.RLIMIT_AS, (vm + MEMORY_CAP, vm + MEMORY_CAP))


def current_case(work: Path) -> str:
    progress = work / "current_case"
    return progress.read_text().strip() if progress.exists() else "start-up"


def run(seeds: list[tuple[str, bytes, int]], work: Path, seed: int = 0, timeout: float = 450) -> dict:
    """Fuzz ``(name, bytes, number of mutants)`` seeds in a child process; its report, or AssertionError if it died."""
    (work / "seeds").mkdir(parents=True, exist_ok=True)
    entries = []
    for name, data, mutants in seeds:
        (work / "seeds" / name).write_bytes(data)
        entries.append({"path": str(work / "seeds" / name), "mutants": mutants})
    (work / "plan.json").write_text(json.dumps({"seed": seed, "seeds": entries}))
    env = {**os.environ, "OMP_NUM_THREADS": "1", "OPENBLAS_NUM_THREADS": "1", "RUST_BACKTRACE": "0"}
    command = [sys.executable, __file__, str(work / "plan.json"), str(work)]
    try:
        child = subprocess.run(command, capture_output=True, text=True, timeout=timeout, env=env)
    except subprocess.TimeoutExpired:
        raise AssertionError(f"the fuzz process ran past {timeout} s, at {current_case(work)}") from None
    if child.returncode < 0:
        hung = f": a case ran past {HANG_SECONDS} s" if child.returncode == -signal.SIGALRM else ""
        died = f"signal {signal.Signals(-child.returncode).name}{hung}"
        raise AssertionError(f"the fuzz process died ({died}) on {current_case(work)}:\n{child.stderr[-3000:]}")
    if child.returncode != 0:
        raise AssertionError(f"the fuzz process failed ({child.returncode}):\n{child.stderr[-3000:]}")
    return json.loads((work / "report.json").read_text())


def mutants_for_size(n_bytes: int) -> int:
    """Fewer mutants of big files: a 2k x 2k JPEG 2000 takes ~0.6 s to decode, a 64 x 64 RLE 1 ms."""
    return 100 if n_bytes <= 50_000 else 30 if n_bytes <= 300_000 else 6


def fuzz_seeds(seeds: list[tuple[str, bytes]], work: Path, record_property: Callable[[str, object], None]) -> dict:
    """Fuzz ``(name, bytes)`` seeds; print and record the counts; fail naming every case that broke the property.

    Returns the totals: decoded, refused and failed cases, and how many of them were mutants.
    """
    report = run([(name, data, mutants_for_size(len(data))) for name, data in seeds], work)
    counts = report["counts"]
    total = {o: sum(c.get(o, 0) for c in counts.values()) for o in ("decoded", "refused", "failed")}
    mutants = sum(sum(c.values()) for kind, c in counts.items() if kind not in ("seed", "fixed"))
    summary = (
        f"reader fuzz: {sum(total.values())} cases ({mutants} mutants of {len(seeds)} seeds): "
        f"{total['decoded']} decoded, {total['refused']} refused, {total['failed']} failed; "
        f"{report['seconds']} s ({report['cpu_seconds']} s CPU), peak RSS {report['peak_rss_mib']}, "
        f"slowest case {report['slowest_case']}"
    )
    print(summary)
    record_property("reader_fuzz", {**report, "mutants": mutants, "total": total})
    broken = "\n".join(f"{f['case']} [{f['mutation']}]: {f['problem']} ({f['bytes']})" for f in report["failures"])
    assert not report["failures"], f"{summary}\n{broken}"
    return {**total, "mutants": mutants}


def cases(plan: dict, seeds: list[bytes]):
    """(name, kind, bytes): each seed as it is, its mutants, then the fixed cases."""
    for i, (entry, data) in enumerate(zip(plan["seeds"], seeds)):
        name = Path(entry["path"]).name
        yield name, "seed", data
        for k in range(entry["mutants"]):
            kind, mutated = mutant(data, [plan["seed"], i, k])
            yield f"{name} mutant {k} (key [{plan['seed']}, {i}, {k}])", kind, mutated
    for name, data in fixed_cases(seeds):
        yield name, "fixed", data


def main(plan_path: str, out_dir: str) -> None:
    warnings.simplefilter("ignore")  # malformed files warn a lot; the answer is what is checked
    plan, out = json.loads(Path(plan_path).read_text()), Path(out_dir)
    (out / "failures").mkdir(parents=True, exist_ok=True)
    seeds = [Path(s["path"]).read_bytes() for s in plan["seeds"]]
    progress = Progress(out / "current_case")
    for entry, data in zip(plan["seeds"], seeds):  # warm up: every decoder is loaded before the cap is measured
        progress.at(f"warm-up on {Path(entry['path']).name}")
        check(data)
    cap_address_space()
    counts: dict[str, Counter] = {}
    failures, slowest, hungriest, start = [], (0.0, ""), (rss_mib(), "warm-up"), time.perf_counter()
    for name, kind, data in cases(plan, seeds):
        progress.at(name)
        signal.alarm(HANG_SECONDS)  # default action: the process dies, the parent names the case
        t = time.perf_counter()
        outcome, problem = check(data)
        signal.alarm(0)
        slowest = max(slowest, (time.perf_counter() - t, name))
        if rss_mib() > hungriest[0]:
            hungriest = (rss_mib(), name)
        counts.setdefault(kind, Counter())[outcome] += 1
        if problem:
            keep = out / "failures" / f"{len(failures)}.bin"
            keep.write_bytes(data)
            failures.append({"case": name, "mutation": kind, "problem": problem, "bytes": str(keep)})
    cpu = resource.getrusage(resource.RUSAGE_SELF)
    report = {
        "seconds": round(time.perf_counter() - start, 2),
        "cpu_seconds": round(cpu.ru_utime + cpu.ru_stime, 2),  # warm-up included
        "counts": {k: dict(v) for k, v in counts.items()},
        "failures": failures,
        "slowest_case": {"seconds": round(slowest[0], 3), "case": slowest[1]},
        "peak_rss_mib": {"mib": hungriest[0], "reached_on": hungriest[1]},
    }
    (out / "report.json").write_text(json.dumps(report, indent=1))


if __name__ == "__main__":
    main(*sys.argv[1:3])
