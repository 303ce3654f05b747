#!/usr/bin/env python3
"""packdebug: pack Gentoo split debug info into seekable, reproducible tarballs.

A Gentoo binhost builds with FEATURES="splitdebug installsources" and serves the
debug info to its clients through elfutils' debuginfod.  packdebug packs one
Portage image's /usr/lib/debug and /usr/src/debug into

    ${ED}/usr/lib/debug/.tarball/${CATEGORY}/${PN}/${PF}-${BUILD_ID}-debug.tar.xz

as Portage's FEATURES=packdebug does, but as a multi-block xz file that
debuginfod (>= 0.192) can seek in, byte-identical for the same image, and
written atomically.

Usage (see --help of each command):

    packdebug pack [--image D] [--category C --pn PN --pf PF --build-id N]
    packdebug buildid FILE...
    packdebug list TARBALL [--json]
    packdebug verify TARBALL...
    packdebug extract TARBALL (--build-id ID | --member PATH) [-o FILE|-]
    packdebug extract TARBALL --all -C DIR
    packdebug find BUILDID [ROOT]
    packdebug repack (TARBALL... | --root DIR) [--force] [--dry-run]
    packdebug prune --pkgdir DIR [--root DIR] [--vardb DIR] [--dry-run]
    packdebug settings [--format make.conf|shell|json] [--dedup] [--bashrc]
    packdebug settings --debuginfod [--listen ADDR:PORT]

From /etc/portage/bashrc (print a ready hook with `packdebug settings --bashrc`):

    pre_pkg_preinst() { packdebug pack -q || die "packdebug failed"; }

The file is self-contained (standard library only, Python >= 3.9) and also
importable: `import packdebug`.
"""

from __future__ import annotations

import argparse
import bisect
import concurrent.futures
import contextlib
import dataclasses
import errno
import functools
import io
import lzma
import os
import re
import shlex
import signal
import stat
import struct
import sys
import tarfile
import time
import zlib
from collections.abc import Callable, Iterable, Iterator, Sequence

__version__ = "0.1.0"

# Paths inside an image (${ED}), as Portage's __generate_packdebug uses them.
DEBUG_TREES = ("usr/src/debug", "usr/lib/debug")  # sources first, as Portage
TARBALL_DIR = "usr/lib/debug/.tarball"  # Portage's PACKDEBUG_PATH, relative
TARBALL_SUFFIX = "-debug.tar.xz"

# Portage variables read by `pack`, with the flag that overrides each.
PORTAGE_INPUTS = {
    "ED": "--image",
    "CATEGORY": "--category",
    "PN": "--pn",
    "PF": "--pf",
    "BUILD_ID": "--build-id",
}

MiB = 1 << 20


# ---------------------------------------------------------------------------
# Errors and messages
# ---------------------------------------------------------------------------


class PackdebugError(Exception):
    """Base of every error packdebug reports; the CLI prints it and exits 1."""

    exit_code = 1


class UsageError(PackdebugError):
    """A missing or malformed input; the CLI exits 2 as for a usage error."""

    exit_code = 2


class ElfError(PackdebugError):
    """A file that looks like ELF but whose headers or notes are broken."""


class XzError(PackdebugError):
    """An xz file that does not follow the xz format, or fails its checks."""


class ArchiveError(PackdebugError):
    """A tar archive that is malformed, or a member that cannot be found."""


class PackError(PackdebugError):
    """Packing failed: unreadable input, a file changed, or no space left."""


class UnsafeMemberError(ArchiveError):
    """Extraction refused a member that would escape or harm the target."""


class Log:
    """Messages for the user: results on stdout, warnings on stderr.

    verbosity -1 (-q) keeps only warnings and errors; 1 (-v) adds details.
    """

    def __init__(
        self,
        verbosity: int = 0,
        out: io.TextIOBase | None = None,
        err: io.TextIOBase | None = None,
    ):
        self.verbosity = verbosity
        self.out = out or sys.stdout
        self.err = err or sys.stderr

    def info(self, message: str) -> None:
        if self.verbosity >= 0:
            print(message, file=self.out, flush=True)

    def detail(self, message: str) -> None:
        if self.verbosity > 0:
            print(message, file=self.out, flush=True)

    def warning(self, message: str) -> None:
        print(f"packdebug: warning: {message}", file=self.err, flush=True)


def to_json(document: object) -> str:
    """JSON for --json and --format json; json is imported only then."""
    import json

    return json.dumps(document, indent=2) + "\n"


def format_size(n: float) -> str:
    """1536 -> '1.5 KiB', as xz -l prints sizes."""
    for unit in ("B", "KiB", "MiB", "GiB"):
        if abs(n) < 1024 or unit == "GiB":
            return f"{n:.0f} {unit}" if unit == "B" else f"{n:.1f} {unit}"
        n /= 1024
    raise AssertionError("unreachable")


# ---------------------------------------------------------------------------
# 1. ELF notes (gABI "Note Section"; elfutils gelf_getnote for 8-byte notes)
# ---------------------------------------------------------------------------

ELF_MAGIC = b"\x7fELF"
ELFCLASS32, ELFCLASS64 = 1, 2
ELFDATA2LSB, ELFDATA2MSB = 1, 2
ET_EXEC, ET_DYN = 2, 3
PT_NOTE = 4
SHT_PROGBITS, SHT_SYMTAB, SHT_NOTE, SHT_NOBITS = 1, 2, 7, 8
SHF_ALLOC = 0x2
SHN_XINDEX = PN_XNUM = 0xFFFF
NT_GNU_BUILD_ID = 3

# Field layouts after e_ident, per ELF class: (header, program header,
# section header).  Only the fields packdebug uses are named below.
_ELF_LAYOUTS = {
    ELFCLASS32: ("16xHHIIIIIHHHHHH", "IIIIIIII", "IIIIIIIIII"),
    ELFCLASS64: ("16xHHIQQQIHHHHHH", "IIQQQQQQ", "IIQQQQIIQQ"),
}
NOTE_LIMIT = 1 * MiB  # a note region larger than this is not a build-id note
STRTAB_LIMIT = 16 * MiB
TABLE_LIMIT = 64 * MiB


@dataclasses.dataclass(frozen=True)
class ElfInfo:
    """What debuginfod looks at in an ELF file (debuginfod.cxx elf_classify)."""

    build_id: str | None
    e_type: int
    has_debug_sections: bool = False  # any .debug_* or .zdebug_* section
    has_symtab: bool = False
    has_alloc_progbits: bool = False  # loaded code or data
    has_other_alloc: bool = False  # allocated, neither NOBITS nor NOTE

    @property
    def is_debuginfo(self) -> bool:
        symtab_only = self.has_symtab and not self.has_other_alloc
        return bool(self.build_id) and (self.has_debug_sections or symtab_only)

    @property
    def is_executable(self) -> bool:
        loaded = self.e_type in (ET_EXEC, ET_DYN) and self.has_alloc_progbits
        return bool(self.build_id) and loaded


ReadAt = Callable[[int, int], bytes]


class _ElfReader:
    """Bounds-checked reads of one ELF file through read_at(offset, size)."""

    def __init__(self, read_at: ReadAt, size: int, name: str) -> None:
        self.read_at, self.size, self.name = read_at, size, name
        ident = self.read(0, 16, "ELF identification")
        if ident[:4] != ELF_MAGIC:
            raise ElfError(f"{name}: not an ELF file")
        if ident[4] not in _ELF_LAYOUTS or ident[5] not in (ELFDATA2LSB, ELFDATA2MSB):
            raise ElfError(
                f"{name}: unknown ELF class {ident[4]} or data encoding {ident[5]}"
            )
        self.endian = "<" if ident[5] == ELFDATA2LSB else ">"
        self.ehdr, self.phdr, self.shdr = (
            struct.Struct(self.endian + f) for f in _ELF_LAYOUTS[ident[4]]
        )

    def read(self, offset: int, size: int, what: str) -> bytes:
        if offset < 0 or size < 0 or offset + size > self.size:
            raise ElfError(
                f"{self.name}: {what} at offset {offset} runs past the end of the "
                f"file ({self.size} bytes): truncated or corrupt ELF"
            )
        data = self.read_at(offset, size)
        if len(data) != size:
            raise ElfError(f"{self.name}: short read of {what} at offset {offset}")
        return data

    def table(
        self, offset: int, count: int, entsize: int, layout: struct.Struct, what: str
    ):
        if count and entsize < layout.size:
            raise ElfError(f"{self.name}: {what} entry size {entsize} is too small")
        if count * entsize > TABLE_LIMIT:
            raise ElfError(
                f"{self.name}: {what} of {count} entries is implausibly large"
            )
        data = self.read(offset, count * entsize, what)
        return [layout.unpack_from(data, i * entsize) for i in range(count)]


def iter_notes(
    data: bytes, align: int, endian: str
) -> Iterator[tuple[bytes, int, bytes]]:
    """Yield (name, type, desc) for each note of a note section or segment.

    Name and descriptor are padded to 4 bytes, or to 8 in a region aligned
    to 8 (as elfutils' gelf_getnote reads ELF64 property notes).
    """
    pad = 8 if align == 8 else 4
    pos = 0
    while pos + 12 <= len(data):
        namesz, descsz, note_type = struct.unpack_from(endian + "III", data, pos)
        name_at = pos + 12
        desc_at = _round_up(name_at + namesz, pad)
        if desc_at + descsz > len(data):
            raise ElfError("note runs past the end of its section")
        yield (
            data[name_at : name_at + namesz],
            note_type,
            data[desc_at : desc_at + descsz],
        )
        pos = _round_up(desc_at + descsz, pad)


def _build_id_in(data: bytes, align: int, endian: str) -> str | None:
    for name, note_type, desc in iter_notes(data, align, endian):
        if note_type == NT_GNU_BUILD_ID and name.rstrip(b"\0") == b"GNU" and desc:
            return desc.hex()
    return None


def read_elf(
    read_at: ReadAt, size: int, name: str = "ELF file", *, sections: bool = True
) -> ElfInfo:
    """Parse the ELF headers and notes reachable through read_at.

    Reads the program headers first (their PT_NOTE is near the start of the
    file), then the section headers and section names when `sections` is
    set or no PT_NOTE held a build-id.  Never reads section contents other
    than notes and the section name table.
    """
    elf = _ElfReader(read_at, size, name)
    header = elf.ehdr.unpack(elf.read(0, elf.ehdr.size, "ELF header"))
    e_type, _mach, _ver, _entry, phoff, shoff = header[:6]
    phentsize, phnum, shentsize, shnum, shstrndx = header[8:]
    section0 = None
    if shoff and (shnum == 0 or shstrndx == SHN_XINDEX or phnum == PN_XNUM):
        # Extended numbering (gABI): real counts live in section header 0.
        section0 = elf.table(shoff, 1, shentsize, elf.shdr, "section header 0")[0]
        shnum = shnum or section0[5]
        shstrndx = section0[6] if shstrndx == SHN_XINDEX else shstrndx
        phnum = section0[7] if phnum == PN_XNUM else phnum
    build_id = None
    for ph in (
        elf.table(phoff, phnum, phentsize, elf.phdr, "program header table")
        if phoff
        else ()
    ):
        p_type, p_offset, p_filesz, p_align = _phdr_fields(ph, elf.phdr.size)
        if p_type == PT_NOTE and 0 < p_filesz <= NOTE_LIMIT and build_id is None:
            data = elf.read(p_offset, p_filesz, "PT_NOTE segment")
            build_id = _notes_build_id(data, p_align, elf, "PT_NOTE segment")
    if not shoff or not (sections or build_id is None):
        return ElfInfo(build_id, e_type)
    return _read_sections(elf, e_type, build_id, shoff, shnum, shentsize, shstrndx)


def _phdr_fields(ph: tuple, size: int) -> tuple[int, int, int, int]:
    if size == 32:  # ELF32: type, offset, vaddr, paddr, filesz, memsz, flags, align
        return ph[0], ph[1], ph[4], ph[7]
    return (
        ph[0],
        ph[2],
        ph[5],
        ph[7],
    )  # ELF64: type, flags, offset, ..., filesz, memsz, align


def _notes_build_id(data: bytes, align: int, elf: _ElfReader, what: str) -> str | None:
    try:
        return _build_id_in(data, align, elf.endian)
    except ElfError as e:
        raise ElfError(f"{elf.name}: {what}: {e}") from None


def _read_sections(
    elf: _ElfReader, e_type, build_id, shoff, shnum, shentsize, shstrndx
) -> ElfInfo:
    shdrs = elf.table(shoff, shnum, shentsize, elf.shdr, "section header table")
    names = b""
    if 0 < shstrndx < len(shdrs):
        strtab = shdrs[shstrndx]
        if strtab[1] != SHT_NOBITS and strtab[5] <= STRTAB_LIMIT:
            names = elf.read(strtab[4], strtab[5], "section name table")
    flags = {
        "has_debug_sections": False,
        "has_symtab": False,
        "has_alloc_progbits": False,
        "has_other_alloc": False,
    }
    for sh in shdrs[1:]:
        sh_name, sh_type, sh_flags, _addr, sh_offset, sh_size = sh[:6]
        sh_align = sh[8]
        end = names.find(b"\0", sh_name)
        section = names[sh_name : end if end >= 0 else len(names)]
        if section.startswith((b".debug_", b".zdebug_")):
            flags["has_debug_sections"] = True
        flags["has_symtab"] |= sh_type == SHT_SYMTAB
        if sh_flags & SHF_ALLOC:
            flags["has_alloc_progbits"] |= sh_type == SHT_PROGBITS
            flags["has_other_alloc"] |= sh_type not in (SHT_NOBITS, SHT_NOTE)
        if sh_type == SHT_NOTE and build_id is None and 0 < sh_size <= NOTE_LIMIT:
            data = elf.read(sh_offset, sh_size, "SHT_NOTE section")
            build_id = _notes_build_id(data, sh_align, elf, "SHT_NOTE section")
    return ElfInfo(build_id, e_type, **flags)


def read_elf_file(path, *, sections: bool = False) -> ElfInfo | None:
    """ElfInfo of the file at `path`, or None if it is not ELF at all."""
    name = os.fsdecode(path)
    try:
        with open(path, "rb", buffering=0) as f:
            size = os.fstat(f.fileno()).st_size
            if os.pread(f.fileno(), 4, 0) != ELF_MAGIC:
                return None
            return read_elf(
                lambda off, n: os.pread(f.fileno(), n, off),
                size,
                name,
                sections=sections,
            )
    except OSError as e:
        raise PackdebugError(f"{name}: cannot read: {e.strerror}") from None


def read_build_id(path) -> str | None:
    """The GNU build-id of an ELF file as lowercase hex, or None."""
    info = read_elf_file(path)
    return info.build_id if info else None


def _round_up(n: int, multiple: int = 4) -> int:
    return -(-n // multiple) * multiple


# ---------------------------------------------------------------------------
# 2. xz container (xz-file-format 1.2.1; section numbers below are the spec's)
# ---------------------------------------------------------------------------

HEADER_MAGIC = b"\xfd7zXZ\x00"  # 2.1.1.1
FOOTER_MAGIC = b"YZ"  # 2.1.2.4
STREAM_HEADER_SIZE = STREAM_FOOTER_SIZE = 12
CHECK_NONE, CHECK_CRC32, CHECK_CRC64, CHECK_SHA256 = 0x00, 0x01, 0x04, 0x0A
LIBLZMA_CHECKS = {
    CHECK_NONE: "None",
    CHECK_CRC32: "CRC32",
    CHECK_CRC64: "CRC64",
    CHECK_SHA256: "SHA-256",
}
VLI_MAX = (1 << 63) - 1  # 1.2
# Presets' LZMA2 dictionary sizes (xz(1), "Presets"): a block smaller than
# the dictionary gets a smaller one, which saves the encoder's memory and
# start-up time without changing what it can find.
PRESET_DICT_SIZE = (
    256 << 10,
    1 * MiB,
    2 * MiB,
    4 * MiB,
    4 * MiB,
    8 * MiB,
    8 * MiB,
    16 * MiB,
    32 * MiB,
    64 * MiB,
)
DECODER_MEMLIMIT = 512 * MiB  # refuses hostile dictionary sizes


@dataclasses.dataclass(frozen=True)
class IndexRecord:
    """One Index Record (4.3): the sizes of one Block."""

    unpadded_size: int
    uncompressed_size: int


@dataclasses.dataclass(frozen=True)
class Block:
    """A Block located in a file: where it starts and what it holds."""

    offset: int  # of its Block Header in the file
    unpadded_size: int
    uncompressed_offset: int  # in the concatenated uncompressed data
    uncompressed_size: int
    check: int
    number: int  # 1-based, in file order, as `xz -lvv` numbers them

    @property
    def end(self) -> int:
        return self.offset + _round_up(self.unpadded_size)

    @property
    def uncompressed_end(self) -> int:
        return self.uncompressed_offset + self.uncompressed_size


def encode_mbi(n: int) -> bytes:
    """Multibyte integer (1.2): 7 bits per byte, least significant first."""
    if not 0 <= n <= VLI_MAX:
        raise ValueError(f"{n} does not fit in a multibyte integer")
    out = bytearray()
    while n >= 0x80:
        out.append(n & 0x7F | 0x80)
        n >>= 7
    out.append(n)
    return bytes(out)


def decode_mbi(buf: bytes, pos: int) -> tuple[int, int]:
    """Decode a multibyte integer at buf[pos]; return (value, next position)."""
    value = 0
    for i in range(9):
        if pos + i >= len(buf):
            raise XzError("multibyte integer runs past the end of the Index")
        byte = buf[pos + i]
        value |= (byte & 0x7F) << (7 * i)
        if not byte & 0x80:
            if byte == 0 and i:
                raise XzError("multibyte integer is not in its shortest form")
            return value, pos + i + 1
    raise XzError("multibyte integer is longer than 9 bytes")


def _stream_flags(check: int) -> bytes:
    return bytes((0, check))


def _parse_stream_flags(flags: bytes) -> int:
    if flags[0] or flags[1] & 0xF0:
        raise XzError("unsupported Stream Flags (reserved bits are set)")
    return flags[1]


def create_stream_header(check: int) -> bytes:
    """Stream Header (2.1.1): magic, Stream Flags, CRC32 of the flags."""
    flags = _stream_flags(check)
    return HEADER_MAGIC + flags + struct.pack("<I", zlib.crc32(flags))


def parse_stream_header(buf: bytes) -> int:
    """Check a Stream Header; return its Check ID."""
    if len(buf) != STREAM_HEADER_SIZE or buf[:6] != HEADER_MAGIC:
        raise XzError("not an xz file (no xz Stream Header magic)")
    if struct.unpack("<I", buf[8:12])[0] != zlib.crc32(buf[6:8]):
        raise XzError("Stream Header CRC32 does not match")
    return _parse_stream_flags(buf[6:8])


def create_stream_footer(check: int, index_size: int) -> bytes:
    """Stream Footer (2.1.2): CRC32, Backward Size, Stream Flags, magic."""
    body = struct.pack("<I", index_size // 4 - 1) + _stream_flags(check)
    return struct.pack("<I", zlib.crc32(body)) + body + FOOTER_MAGIC


def parse_stream_footer(buf: bytes) -> tuple[int, int]:
    """Check a Stream Footer; return (Check ID, size of the Index)."""
    if len(buf) != STREAM_FOOTER_SIZE or buf[10:] != FOOTER_MAGIC:
        raise XzError("no xz Stream Footer at the end (truncated, or not xz)")
    if struct.unpack("<I", buf[:4])[0] != zlib.crc32(buf[4:10]):
        raise XzError("Stream Footer CRC32 does not match")
    backward_size = (struct.unpack("<I", buf[4:8])[0] + 1) * 4
    return _parse_stream_flags(buf[8:10]), backward_size


def create_index(records: Sequence[IndexRecord]) -> bytes:
    """Index (4): indicator, record count, records, padding, CRC32."""
    out = bytearray(b"\0") + encode_mbi(len(records))
    for r in records:
        out += encode_mbi(r.unpadded_size) + encode_mbi(r.uncompressed_size)
    out += bytes(-len(out) % 4)
    return bytes(out + struct.pack("<I", zlib.crc32(out)))


def parse_index(buf: bytes) -> list[IndexRecord]:
    """Parse a whole Index field; raise XzError at the first inconsistency."""
    if len(buf) < 8 or buf[0] != 0:
        raise XzError("Index Indicator is missing")
    if struct.unpack("<I", buf[-4:])[0] != zlib.crc32(buf[:-4]):
        raise XzError("Index CRC32 does not match")
    count, pos = decode_mbi(buf, 1)
    records = []
    for _ in range(count):
        unpadded, pos = decode_mbi(buf, pos)
        uncompressed, pos = decode_mbi(buf, pos)
        if unpadded < 5 or unpadded > VLI_MAX - 3:  # 4.3.2: header >= 1, check, data
            raise XzError(f"Index Record has an impossible Unpadded Size {unpadded}")
        records.append(IndexRecord(unpadded, uncompressed))
    if _round_up(pos) != len(buf) - 4 or any(buf[pos:-4]):
        raise XzError("Index size does not match its record count")
    return records


def block_filters(preset: int, size: int) -> list[dict]:
    """LZMA2 at `preset`, with the dictionary shrunk to the block's size."""
    dict_size = min(PRESET_DICT_SIZE[preset], max(4096, 1 << (size - 1).bit_length()))
    return [{"id": lzma.FILTER_LZMA2, "preset": preset, "dict_size": dict_size}]


def compress_block(
    data: bytes, preset: int = 6, check: int = CHECK_CRC64
) -> tuple[memoryview, IndexRecord]:
    """Compress `data` into one xz Block (header, data, padding, check).

    The stdlib cannot write a bare Block, so liblzma writes a one-Block
    Stream and the Block is cut out of it: its Stream Header and its Index
    and Stream Footer are dropped (FACTS.md §4).  lzma releases the GIL, so
    threads compress Blocks in parallel.
    """
    stream = lzma.compress(
        data,
        format=lzma.FORMAT_XZ,
        check=check,
        filters=block_filters(preset, len(data)),
    )
    _, index_size = parse_stream_footer(stream[-STREAM_FOOTER_SIZE:])
    (record,) = parse_index(
        stream[-STREAM_FOOTER_SIZE - index_size : -STREAM_FOOTER_SIZE]
    )
    block = memoryview(stream)[STREAM_HEADER_SIZE : -STREAM_FOOTER_SIZE - index_size]
    assert len(block) == _round_up(
        record.unpadded_size
    ) and record.uncompressed_size == len(data)
    return block, record


class XzStreamWriter:
    """Writes exactly one xz Stream, Block by Block, with no Stream Padding."""

    def __init__(self, fileobj: io.BufferedIOBase, check: int = CHECK_CRC64) -> None:
        self.fileobj, self.check = fileobj, check
        self.records: list[IndexRecord] = []
        self.size = self._write(create_stream_header(check))

    def _write(self, data: bytes) -> int:
        self.fileobj.write(data)
        return len(data)

    def write_block(self, block: bytes | memoryview, record: IndexRecord) -> None:
        self.records.append(record)
        self.size += self._write(block)

    def close(self) -> None:
        index = create_index(self.records)
        self.size += self._write(index + create_stream_footer(self.check, len(index)))


@dataclasses.dataclass(frozen=True)
class XzLayout:
    """Where the Streams and Blocks of an xz file are, read from its Indexes."""

    blocks: tuple[Block, ...]
    streams: int
    stream_padding: int  # bytes of Stream Padding anywhere in the file
    checks: frozenset[int]

    @property
    def uncompressed_size(self) -> int:
        return self.blocks[-1].uncompressed_end if self.blocks else 0


def read_xz_layout(fd: int, file_size: int, name: str = "xz file") -> XzLayout:
    """Read the Stream Footers and Indexes of an xz file, from its end.

    Handles several Streams and Stream Padding (2.2), as xz does; whether a
    file has them is for the caller to judge (debuginfod reads only the last
    Stream's Index, so packdebug writes one Stream and no padding).
    """
    streams: list[list[Block]] = []
    checks, padding, end = set(), 0, file_size
    while end > 0:
        tail = _pread_exact(fd, 4, end - 4, name) if end >= 4 else b"\xff"
        if tail == b"\0\0\0\0":
            padding, end = padding + 4, end - 4
            continue
        blocks, start, check = _read_stream(fd, end, name)
        streams.append(blocks)
        checks.add(check)
        end = start
    if not streams:
        raise XzError(f"{name}: not an xz file (empty, or only zero bytes)")
    return XzLayout(
        _number_blocks(reversed(streams)), len(streams), padding, frozenset(checks)
    )


def _read_stream(
    fd: int, end: int, name: str
) -> tuple[list[tuple[int, IndexRecord, int]], int, int]:
    if end < STREAM_HEADER_SIZE + STREAM_FOOTER_SIZE + 8:
        raise XzError(f"{name}: truncated xz file (too short for a Stream)")
    try:
        check, index_size = parse_stream_footer(
            _pread_exact(fd, STREAM_FOOTER_SIZE, end - STREAM_FOOTER_SIZE, name)
        )
        index_at = end - STREAM_FOOTER_SIZE - index_size
        if index_at < STREAM_HEADER_SIZE:
            raise XzError("Backward Size points before the start of the file")
        records = parse_index(_pread_exact(fd, index_size, index_at, name))
        start = (
            index_at
            - sum(_round_up(r.unpadded_size) for r in records)
            - STREAM_HEADER_SIZE
        )
        if start < 0:
            raise XzError("the Index describes more Blocks than the file holds")
        if (
            parse_stream_header(_pread_exact(fd, STREAM_HEADER_SIZE, start, name))
            != check
        ):
            raise XzError("Stream Header and Stream Footer disagree on the check type")
    except XzError as e:
        raise XzError(f"{name}: {e}") from None
    offset, located = start + STREAM_HEADER_SIZE, []
    for r in records:
        located.append((offset, r, check))
        offset += _round_up(r.unpadded_size)
    return located, start, check


def _number_blocks(streams: Iterable[list]) -> tuple[Block, ...]:
    blocks, uncompressed = [], 0
    for stream in streams:
        for offset, r, check in stream:
            blocks.append(
                Block(
                    offset,
                    r.unpadded_size,
                    uncompressed,
                    r.uncompressed_size,
                    check,
                    len(blocks) + 1,
                )
            )
            uncompressed += r.uncompressed_size
    return tuple(blocks)


def _pread_exact(fd: int, size: int, offset: int, name: str) -> bytes:
    data = os.pread(fd, size, offset)
    if len(data) != size:
        raise XzError(f"{name}: truncated at offset {offset + len(data)}")
    return data


class BlockDecoder:
    """Decompresses one Block incrementally, in bounded memory.

    The Block is fed to liblzma inside a one-Block Stream made of a Stream
    Header, the Block as stored, and an Index holding the file's own record
    for it.  liblzma thereby verifies the Block's check and that the Index's
    sizes are the Block's real sizes; both are known only at the Block's end.
    The last WINDOW bytes produced are kept, so short steps back are free.
    """

    CHUNK = 256 << 10
    WINDOW = 1 * MiB

    def __init__(self, fd: int, block: Block, name: str) -> None:
        self.fd, self.block, self.name = fd, block, name
        self.position = 0  # in the Block's uncompressed data
        self.verified = False
        self._decoder = lzma.LZMADecompressor(lzma.FORMAT_XZ, memlimit=DECODER_MEMLIMIT)
        index = create_index(
            [IndexRecord(block.unpadded_size, block.uncompressed_size)]
        )
        self._pending = [create_stream_header(block.check)]
        self._trailer = index + create_stream_footer(block.check, len(index))
        self._next_in = block.offset
        self._recent = bytearray()

    def _input(self) -> bytes:
        if self._pending:
            return self._pending.pop()
        if self._next_in < self.block.end:
            size = min(self.CHUNK, self.block.end - self._next_in)
            data = os.pread(self.fd, size, self._next_in)
            if len(data) != size:
                raise XzError(
                    f"{self.name}: truncated inside Block {self.block.number}"
                )
            self._next_in += size
            return data
        if self._trailer:
            data, self._trailer = self._trailer, b""
            return data
        raise XzError(
            f"{self.name}: Block {self.block.number} ends before its data does"
        )

    def _fail(self, reason: str) -> XzError:
        where = f"Block {self.block.number} (at byte {self.block.offset})"
        return XzError(
            f"{self.name}: {where} {reason}; the file is damaged, get a fresh copy"
        )

    def read(self, size: int) -> bytes:
        """Up to `size` bytes of the Block's data; b"" once it is verified."""
        try:
            while not self._decoder.eof:
                data = self._input() if self._decoder.needs_input else b""
                out = self._decoder.decompress(data, size)
                if out:
                    return self._produced(out)
        except lzma.LZMAError as e:
            if "Memory usage limit" in str(e):
                raise self._fail(
                    f"needs more than {DECODER_MEMLIMIT // MiB} MiB to decompress"
                ) from None
            raise self._fail(f"is corrupt ({e})") from None
        if self.position != self.block.uncompressed_size:
            raise self._fail("holds another size than its Index record says")
        self.verified = True
        return b""

    def _produced(self, out: bytes) -> bytes:
        self.position += len(out)
        if self.position > self.block.uncompressed_size:
            raise self._fail("holds more data than its Index record says")
        self._recent += out
        if len(self._recent) > self.WINDOW:
            del self._recent[: len(self._recent) - self.WINDOW]
        return out

    def recent(self, position: int, size: int) -> bytes | None:
        """Data already produced at `position`, if still in the window."""
        at = position - (self.position - len(self._recent))
        if at < 0 or position >= self.position:
            return None
        return bytes(self._recent[at : at + size])

    def skip(self, size: int) -> None:
        while size > 0:
            out = self.read(min(size, self.CHUNK))
            if not out:
                raise self._fail("is shorter than its Index record says")
            size -= len(out)

    def finish(self) -> None:
        """Decompress the rest of the Block, so that its check is verified."""
        while self.read(self.CHUNK):
            pass


class XzReader(io.RawIOBase):
    """Seekable read-only view of the uncompressed data of an xz file.

    A read decompresses only the Block that holds it, from that Block's
    start: that is the random access a multi-Block file allows.  With
    sequential=True, moving on to a later Block first decompresses every
    Block before it to its end, so a full read verifies every check.
    """

    def __init__(self, path, *, sequential: bool = False) -> None:
        super().__init__()
        self._fd = -1  # close() may run for a half-made reader (IOBase.__del__)
        self.name = os.fsdecode(path)
        try:
            self._fd = os.open(path, os.O_RDONLY | os.O_CLOEXEC)
        except OSError as e:
            raise XzError(f"{self.name}: cannot open: {e.strerror}") from None
        try:
            self.file_size = os.fstat(self._fd).st_size
            self.layout = read_xz_layout(self._fd, self.file_size, self.name)
        except BaseException:
            os.close(self._fd)
            self._fd = -1
            raise
        self.size = self.layout.uncompressed_size
        self.sequential = sequential
        self.verified_blocks: set[int] = set()
        self.decoded = 0  # uncompressed bytes produced so far, for measuring
        self.block_starts = [b.uncompressed_offset for b in self.layout.blocks]
        self._pos = 0
        self._decoder: BlockDecoder | None = None

    def close(self) -> None:
        if self._fd >= 0:
            os.close(self._fd)
            self._fd = -1
        super().close()

    def readable(self) -> bool:
        return True

    def seekable(self) -> bool:
        return True

    def tell(self) -> int:
        return self._pos

    def seek(self, offset: int, whence: int = io.SEEK_SET) -> int:
        base = {io.SEEK_SET: 0, io.SEEK_CUR: self._pos, io.SEEK_END: self.size}[whence]
        if base + offset < 0:
            raise ValueError("negative seek position")
        self._pos = base + offset
        return self._pos

    def readinto(self, buffer) -> int:
        data = self.read(len(buffer))
        buffer[: len(data)] = data
        return len(data)

    def read(self, size: int = -1) -> bytes:
        """Read like a regular file: short only at the end of the data."""
        size = self.size - self._pos if size is None or size < 0 else size
        data = self.pread(self._pos, size)
        self._pos += len(data)
        return data

    def pread(self, offset: int, size: int) -> bytes:
        """`size` bytes at `offset`, fewer only at the end of the data."""
        parts = []
        while size > 0:
            data = self.read_at(offset, size)
            if not data:
                break
            parts.append(data)
            offset += len(data)
            size -= len(data)
        return b"".join(parts)

    def read_at(self, offset: int, size: int) -> bytes:
        """Up to `size` bytes at `offset`, from one Block at most."""
        if offset >= self.size or size <= 0:
            return b""
        decoder = self._decoder_at(offset)
        position = offset - decoder.block.uncompressed_offset
        recent = decoder.recent(position, size)
        if recent is not None:
            return recent
        before = decoder.position
        decoder.skip(position - decoder.position)
        data = decoder.read(size)
        self.decoded += decoder.position - before
        if decoder.position == decoder.block.uncompressed_size:
            self._finish(decoder)
        return data

    def _decoder_at(self, offset: int) -> BlockDecoder:
        index = bisect.bisect_right(self.block_starts, offset) - 1
        block = self.layout.blocks[index]
        current = self._decoder
        if current and current.block is block:
            position = offset - block.uncompressed_offset
            if position >= current.position or current.recent(position, 1) is not None:
                return current
        if self.sequential:
            self._finish_through(index)
        self._decoder = BlockDecoder(self._fd, block, self.name)
        return self._decoder

    def _finish(self, decoder: BlockDecoder) -> None:
        before = decoder.position
        decoder.finish()
        self.decoded += decoder.position - before
        self.verified_blocks.add(decoder.block.number)

    def _finish_through(self, index: int) -> None:
        """Decompress the current Block and every later one before `index`."""
        first = 0
        if self._decoder:
            self._finish(self._decoder)
            first = self._decoder.block.number
        for block in self.layout.blocks[first:index]:
            if block.number not in self.verified_blocks:
                self._finish(BlockDecoder(self._fd, block, self.name))

    def finish_block(self) -> None:
        """Decompress the rest of the current Block, verifying its check."""
        if self._decoder:
            self._finish(self._decoder)

    def verify_all(self) -> None:
        """Decompress every Block not yet verified to its end."""
        self._finish_through(len(self.layout.blocks))


# ---------------------------------------------------------------------------
# 3. tar member collection
# ---------------------------------------------------------------------------

_SKIPPED_KINDS = {
    stat.S_IFCHR: "character device",
    stat.S_IFBLK: "block device",
    stat.S_IFIFO: "FIFO",
    stat.S_IFSOCK: "socket",
}


@dataclasses.dataclass
class Member:
    """One entry of the image that goes into the tarball."""

    path: bytes  # relative to the image: b"usr/lib/debug/usr/bin/x.debug"
    st: os.stat_result
    info: tarfile.TarInfo  # its reproducible tar header
    elf: ElfInfo | None = None  # for ELF files under usr/lib/debug
    elf_error: str = ""  # why the ELF headers could not be read

    @property
    def is_debug_elf(self) -> bool:
        return self.elf is not None or bool(self.elf_error)


@dataclasses.dataclass
class ImageScan:
    """What `pack` found under one image's debug trees."""

    image: bytes
    members: list[Member]
    children: dict[bytes, list[bytes]]  # every listed directory: its entries
    skipped: list[tuple[bytes, str]]  # (path, kind) of entries tar cannot hold

    @property
    def files(self) -> list[Member]:
        return [m for m in self.members if not m.info.isdir()]

    @property
    def data_size(self) -> int:
        return sum(m.info.size for m in self.members if m.info.isreg())


def member_name(path: bytes) -> str:
    """Tar member name for an image path: the bytes, decoded losslessly."""
    return path.decode("utf-8", "surrogateescape")


def reproducible_header(
    path: bytes, st: os.stat_result, source_date_epoch: int | None
) -> tarfile.TarInfo:
    """The tar header of one entry, independent of owner, umask and time of day.

    Owner root:root, permission bits without setuid/setgid/sticky, integer
    mtime clamped to SOURCE_DATE_EPOCH (reproducible-builds.org) when set.
    """
    info = tarfile.TarInfo(member_name(path))
    info.mode = stat.S_IMODE(st.st_mode) & 0o777
    info.uid = info.gid = 0
    info.uname = info.gname = "root"
    mtime = int(st.st_mtime)
    info.mtime = mtime if source_date_epoch is None else min(mtime, source_date_epoch)
    if stat.S_ISDIR(st.st_mode):
        info.type = tarfile.DIRTYPE
    elif stat.S_ISLNK(st.st_mode):
        info.type = tarfile.SYMTYPE
    else:
        info.size = st.st_size
    return info


def _is_protected(path: bytes) -> bool:
    """True for usr/lib/debug/.tarball and every directory above it."""
    tarball_dir = TARBALL_DIR.encode()
    return path == tarball_dir or tarball_dir.startswith(path + b"/") or not path


def scan_image(image, source_date_epoch: int | None = None) -> ImageScan:
    """Collect the debug trees of an image in tarball order.

    usr/src/debug, then usr/lib/debug (without usr/lib/debug/.tarball), each
    depth-first with entries sorted by their bytes, so neither directory
    read order nor locale changes the order.  Symlinks are never followed.
    The second and later names of a hardlinked file become tar hardlinks.
    """
    image = os.fsencode(image)
    scan = ImageScan(image, [], {}, [])
    first_name: dict[tuple[int, int], str] = {}
    for root in DEBUG_TREES:
        root = root.encode()
        if not os.path.lexists(os.path.join(image, root)):
            continue
        _list_ancestors(scan, root)
        stack = [root]
        while stack:
            path = stack.pop()
            member = _scan_entry(scan, path, source_date_epoch, first_name)
            if member and member.info.isdir():
                stack.extend(
                    c
                    for c in reversed(scan.children[path])
                    if c != TARBALL_DIR.encode()
                )
    _date_directories([m.info for m in scan.members])
    return scan


def _date_directories(infos: Sequence[tarfile.TarInfo]) -> None:
    """Give each non-empty directory the newest mtime of what it holds.

    A directory's own mtime records when entries were added or removed,
    which packing itself does (mkdir .tarball in usr/lib/debug): taking it
    from the packed entries keeps a repeated pack byte-identical.  `infos`
    must be in member order (parents before children).
    """
    newest: dict[str, int] = {}
    for info in reversed(infos):  # children before their parents
        name = info.name.rstrip("/")
        if info.isdir() and name in newest:
            info.mtime = newest[name]
        parent = os.path.dirname(name)
        newest[parent] = max(newest.get(parent, info.mtime), info.mtime)


def _list_ancestors(scan: ImageScan, root: bytes) -> None:
    parent = os.path.dirname(root)
    while parent and not _is_protected(parent):
        scan.children[parent] = _list_dir(scan.image, parent)
        parent = os.path.dirname(parent)


def _list_dir(image: bytes, path: bytes) -> list[bytes]:
    try:
        names = sorted(os.listdir(os.path.join(image, path)))
    except OSError as e:
        raise PackError(
            f"{os.fsdecode(os.path.join(image, path))}: cannot list: {e.strerror}"
        ) from None
    return [path + b"/" + name for name in names]


def _scan_entry(
    scan: ImageScan, path: bytes, sde: int | None, first_name: dict
) -> Member | None:
    full = os.path.join(scan.image, path)
    try:
        st = os.lstat(full)
    except OSError as e:
        raise PackError(f"{os.fsdecode(full)}: cannot stat: {e.strerror}") from None
    kind = _SKIPPED_KINDS.get(stat.S_IFMT(st.st_mode))
    if kind:
        scan.skipped.append((path, kind))
        return None
    member = Member(path, st, reproducible_header(path, st, sde))
    if stat.S_ISDIR(st.st_mode):
        scan.children[path] = _list_dir(scan.image, path)
    elif stat.S_ISLNK(st.st_mode):
        member.info.linkname = member_name(os.readlink(full))
    elif st.st_nlink > 1 and (st.st_dev, st.st_ino) in first_name:
        member.info.type = tarfile.LNKTYPE
        member.info.linkname = first_name[(st.st_dev, st.st_ino)]
        member.info.size = 0
    else:
        first_name.setdefault((st.st_dev, st.st_ino), member.info.name)
        if path.startswith(b"usr/lib/debug/"):
            _read_debug_elf(member, full)
    scan.members.append(member)
    return member


def _read_debug_elf(member: Member, full: bytes) -> None:
    try:
        member.elf = read_elf_file(full)
    except ElfError as e:
        member.elf_error = str(e)


# ---------------------------------------------------------------------------
# 4. packing
# ---------------------------------------------------------------------------

BLOCK_SIZE = 8 * MiB  # largest uncompressed Block; see README "Block layout"
LARGE_MEMBER = 1 * MiB  # members at least this big get Blocks of their own
READ_CHUNK = 1 * MiB
RECORD_SIZE = tarfile.RECORDSIZE  # GNU tar and tarfile pad archives to 10 KiB


@dataclasses.dataclass
class PackOptions:
    preset: int = 6
    jobs: int = 0  # 0: one per CPU
    block_size: int = BLOCK_SIZE
    large_member: int = LARGE_MEMBER

    @property
    def threads(self) -> int:
        return self.jobs or available_cpus()


def available_cpus() -> int:
    try:
        return len(os.sched_getaffinity(0))
    except (AttributeError, OSError):
        return os.cpu_count() or 1


def tar_blocks(
    entries: Iterable[tuple[tarfile.TarInfo, Callable[[], Iterable[bytes]]]],
    block_size: int = BLOCK_SIZE,
    large_member: int = LARGE_MEMBER,
) -> Iterator[bytes]:
    """Lay a tar archive out as xz Block payloads.

    `entries` are (header, data) pairs, data() yielding exactly the member's
    bytes.  Small members share Blocks of up to block_size, cut between
    members.  A large member (at least `large_member` bytes, or too big for
    a Block) starts a new Block with its header, its data is cut every
    block_size, and the member after it starts a new Block: extracting it
    never decompresses its neighbours.  So every Block starts with a tar
    header except those continuing a large member, which is what lets
    `find` and `extract` locate a member by reading only Block starts.
    The end-of-archive marker gets a Block of its own: any archive with a
    member then has more than one Block, which debuginfod >= 0.192 needs
    to seek in it.
    """
    block = bytearray()
    offset = 0
    for info, data in entries:
        header = info.tobuf(tarfile.PAX_FORMAT, "utf-8", "surrogateescape")
        size = info.size if info.type == tarfile.REGTYPE else 0
        padded = _round_up(size, tarfile.BLOCKSIZE)
        large = size >= large_member or len(header) + padded > block_size
        if block and (large or len(block) + len(header) + padded > block_size):
            yield block
            block = bytearray()
        for piece in (header, *((data(),) if size else ()), bytes(padded - size)):
            for chunk in (piece,) if isinstance(piece, bytes) else piece:
                view = memoryview(chunk)
                while view:
                    take = block_size - len(block)
                    block += view[:take]
                    view = view[take:]
                    if len(block) == block_size:
                        yield block
                        block = bytearray()
        offset += len(header) + padded
        if large and block:
            yield block
            block = bytearray()
    if block:
        yield block
    end = bytes(2 * tarfile.BLOCKSIZE)
    yield end + bytes(-(offset + len(end)) % RECORD_SIZE)


def _file_data(image: bytes, member: Member) -> Iterator[bytes]:
    """A regular file's bytes; it must not change while it is packed."""
    full = os.path.join(image, member.path)
    name = os.fsdecode(full)
    try:
        fd = os.open(full, os.O_RDONLY | os.O_NOFOLLOW | os.O_CLOEXEC)
    except OSError as e:
        raise PackError(f"{name}: cannot open: {e.strerror}") from None
    with open(fd, "rb", buffering=0) as f:
        st = os.fstat(fd)
        if (st.st_dev, st.st_ino) != (member.st.st_dev, member.st.st_ino):
            raise PackError(f"{name}: replaced while packing; pack again")
        left = member.info.size
        while left:
            chunk = f.read(min(READ_CHUNK, left))
            if not chunk:
                raise PackError(f"{name}: shrank while packing; pack again")
            left -= len(chunk)
            yield chunk
        if f.read(1):
            raise PackError(f"{name}: grew while packing; pack again")


M_MMAP_THRESHOLD = -3  # glibc's <malloc.h>
LARGE_PAYLOAD = 4 * MiB


def _mmap_large_buffers() -> bool:
    """Have glibc mmap every buffer from 1 MiB up, so that freed ones go back at once.

    glibc's mmap threshold grows with each large buffer freed; after that,
    the Blocks' buffers and encoders come from the heap, fragment it, and
    peak memory creeps up with the number of Blocks (bench: 270 MiB packing
    1 GiB against 232 MiB packing 50 MiB; 250 MiB with this).  Called only
    once a large Block shows up, so that small packs do not import ctypes;
    elsewhere than glibc it does nothing.
    """
    try:
        import ctypes

        ctypes.CDLL(None).mallopt(M_MMAP_THRESHOLD, MiB)
    except (OSError, AttributeError):
        pass
    return True


def compress_blocks(
    payloads: Iterable[bytes], preset: int, jobs: int
) -> Iterator[tuple[bytes, IndexRecord, int]]:
    """Compress Blocks on `jobs` threads; yield (Block, record, input size) in order.

    At most 2 x jobs payloads are in flight (2 with one job), so memory
    stays bounded by about jobs x (encoder + 2 Blocks), whatever the size
    of the image, while a worker that finishes a small Block early finds
    the next one queued instead of waiting for the oldest to be written.
    """
    limit = 2 if jobs == 1 else 2 * jobs
    pool = concurrent.futures.ThreadPoolExecutor(
        max_workers=jobs, thread_name_prefix="packdebug-xz"
    )
    pending: list[tuple[concurrent.futures.Future, int]] = []
    tuned = False
    try:
        for payload in payloads:
            if not tuned and len(payload) >= LARGE_PAYLOAD:
                tuned = _mmap_large_buffers()
            pending.append((pool.submit(compress_block, payload, preset), len(payload)))
            while len(pending) >= limit:
                future, size = pending.pop(0)
                yield (*future.result(), size)
        for future, size in pending:
            yield (*future.result(), size)
    finally:
        pool.shutdown(wait=True, cancel_futures=True)


def _make_parents(path: str) -> list[str]:
    """Create missing parent directories 0755 (as install -d); return them."""
    created = []
    parent = os.path.dirname(path)
    while not os.path.isdir(parent):
        created.append(parent)
        parent = os.path.dirname(parent)
    for directory in reversed(created):
        try:
            os.mkdir(directory)
            os.chmod(directory, 0o755)
        except OSError as e:
            _remove_dirs(created)
            raise PackError(f"{directory}: cannot create: {e.strerror}") from None
    return created


def _remove_dirs(created: list[str]) -> None:
    for directory in created:  # deepest first
        with contextlib.suppress(OSError):
            os.rmdir(directory)


@contextlib.contextmanager
def atomic_output(path: str, mode: int = 0o644) -> Iterator[io.BufferedIOBase]:
    """A file that appears at `path` complete and fsynced, or not at all.

    The data goes to a hidden ".NAME.XXXXXXXX.tmp" beside `path` (never
    matching *-debug.tar.xz, so neither debuginfod nor prune looks at it),
    which is renamed over `path` at the end and removed on any failure,
    SIGINT or SIGTERM.  A previous file at `path` stays intact until then.
    """
    directory = os.path.dirname(path) or "."
    fd, temp = _create_temporary(directory, os.path.basename(path))
    try:
        with open(fd, "wb") as f:
            yield f
            f.flush()
            os.fchmod(fd, mode)
            os.fsync(fd)
        os.replace(temp, path)
    except OSError as e:
        raise PackError(f"{path}: cannot write: {e.strerror}") from None
    finally:
        with contextlib.suppress(FileNotFoundError):
            os.unlink(temp)
    _fsync_dir(directory)


def _create_temporary(directory: str, name: str) -> tuple[int, str]:
    for attempt in range(100):
        temp = os.path.join(directory, f".{name}.{os.urandom(4).hex()}.tmp")
        flags = os.O_WRONLY | os.O_CREAT | os.O_EXCL | os.O_CLOEXEC
        try:
            return os.open(temp, flags, 0o600), temp
        except FileExistsError:
            continue
        except FileNotFoundError:
            if attempt > 3:
                raise PackError(
                    f"{directory}: keeps vanishing; is a prune running beside?"
                ) from None
            _make_parents(os.path.join(directory, name))  # a prune removed it as empty
        except OSError as e:
            raise PackError(
                f"{directory}: cannot create a file there: {e.strerror}"
            ) from None
    raise PackError(f"{directory}: no free temporary name")


def _fsync_dir(directory: str) -> None:
    fd = os.open(directory, os.O_RDONLY | os.O_DIRECTORY | os.O_CLOEXEC)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


@dataclasses.dataclass
class PackResult:
    output: str
    size: int = 0  # of the tarball
    tar_size: int = 0  # uncompressed
    blocks: int = 0


ProgressFn = Callable[[int, int], None]  # (tar bytes in, xz bytes out)


def write_blocks(
    payloads: Iterable[bytes],
    output: str,
    options: PackOptions,
    progress: ProgressFn | None = None,
) -> PackResult:
    """Compress Block payloads into one xz stream at `output`, atomically."""
    result = PackResult(output)
    with atomic_output(output) as f:
        writer = XzStreamWriter(f)
        blocks = compress_blocks(payloads, options.preset, options.threads)
        with contextlib.closing(blocks):
            for block, record, size in blocks:
                writer.write_block(block, record)
                result.tar_size += size
                if progress:
                    progress(result.tar_size, writer.size)
        writer.close()
    result.size, result.blocks = writer.size, len(writer.records)
    return result


def write_tarball(
    scan: ImageScan,
    output: str,
    options: PackOptions,
    progress: ProgressFn | None = None,
) -> PackResult:
    """Write the scan's tarball to `output` atomically; return what was written."""
    entries = (
        (m.info, functools.partial(_file_data, scan.image, m)) for m in scan.members
    )
    return write_blocks(
        tar_blocks(entries, options.block_size, options.large_member),
        output,
        options,
        progress,
    )


def removal_plan(scan: ImageScan) -> tuple[list[Member], list[bytes]]:
    """What --remove-packed deletes: the packed files, then emptied directories.

    A directory goes only if every entry in it is packed and going, so one
    that was empty before packing stays (packages install some on purpose),
    and so do usr/lib/debug/.tarball and every directory above it.  The
    directories are listed deepest first, ready for rmdir.
    """
    files = scan.files
    going = {m.path for m in files}
    dirs: list[bytes] = []
    candidates = [m.path for m in scan.members if m.info.isdir()]
    candidates += [p for p in scan.children if p not in going and p not in candidates]
    for path in sorted(candidates, key=lambda p: -p.count(b"/")):
        entries = scan.children.get(path, [])
        if entries and not _is_protected(path) and all(e in going for e in entries):
            going.add(path)
            dirs.append(path)
    return files, dirs


def remove_packed(scan: ImageScan, log: Log) -> tuple[int, int]:
    """Delete what removal_plan lists; a file changed since packing stays."""
    files, dirs = removal_plan(scan)
    removed_files = removed_dirs = 0
    for member in files:
        full = os.path.join(scan.image, member.path)
        try:
            st = os.lstat(full)
            if (st.st_ino, st.st_size, st.st_mtime_ns) != (
                member.st.st_ino,
                member.st.st_size,
                member.st.st_mtime_ns,
            ):
                log.warning(f"{os.fsdecode(full)}: changed since it was packed; kept")
                continue
            os.unlink(full)
            removed_files += 1
        except OSError as e:
            log.warning(f"{os.fsdecode(full)}: cannot remove: {e.strerror}")
    for path in dirs:
        try:
            os.rmdir(os.path.join(scan.image, path))
            removed_dirs += 1
        except OSError as e:
            if e.errno not in (errno.ENOTEMPTY, errno.EEXIST, errno.ENOENT):
                log.warning(
                    f"{os.fsdecode(os.path.join(scan.image, path))}: cannot remove: {e.strerror}"
                )
    return removed_files, removed_dirs


# ---------------------------------------------------------------------------
# 5. reading / extraction
# ---------------------------------------------------------------------------

PAX_LIMIT = 1 * MiB  # a pax or GNU long-name header larger than this is hostile
LINK_DEPTH = 40  # symlink hops, as the kernel's ELOOP limit


def name_problems(name: str) -> list[str]:
    """Why a member name is not clean, as packdebug writes names."""
    problems = []
    if name.startswith("/"):
        problems.append("absolute path")
    parts = name.rstrip("/").split("/")
    if ".." in parts:
        problems.append("'..' component")
    if name.startswith("./"):
        problems.append("leading './'")
    elif "." in parts:
        problems.append("'.' component")
    if "//" in name.lstrip("/"):
        problems.append("'//'")
    return problems


def normalize_name(name: str) -> str:
    """A member name as debuginfod and tar resolve it: no '.', '', or '/'."""
    return "/".join(p for p in name.split("/") if p not in ("", "."))


def canonical_key(name: str) -> tuple[int, tuple[bytes, ...]]:
    """Sort key of packdebug's member order: sources, then debug, then the rest.

    Within each tree, sorting by the path's components gives depth-first
    order with entries sorted by their bytes, as scan_image walks.
    """
    parts = tuple(
        p.encode("utf-8", "surrogateescape") for p in normalize_name(name).split("/")
    )
    for rank, tree in enumerate(DEBUG_TREES):
        top = tuple(t.encode() for t in tree.split("/"))
        if parts[: len(top)] == top:
            return rank, parts
    return len(DEBUG_TREES), parts


class _TarCursor:
    """What tarfile.TarInfo.fromtarfile() reads from a TarFile.

    TarFile.next() probes the byte before each header, which would make a
    seekable xz file decompress the previous member's last Block; reading
    headers through this cursor instead touches only the headers.
    """

    encoding, errors = "utf-8", "surrogateescape"

    def __init__(self, fileobj: XzReader) -> None:
        self.fileobj = fileobj
        self.pax_headers: dict = {}
        self.offset = 0


def link_target(info: tarfile.TarInfo) -> str | None:
    """The normalized member name a symlink or hardlink member points to."""
    if info.islnk():
        return normalize_name(info.linkname)
    if not info.issym():
        return None
    base = os.path.dirname(normalize_name(info.name))
    target = (
        info.linkname if info.linkname.startswith("/") else f"{base}/{info.linkname}"
    )
    return os.path.normpath("/" + target).lstrip("/")


class Archive:
    """A .tar.xz opened for reading: its xz Blocks, and tar on top of them."""

    def __init__(self, path, *, sequential: bool = False) -> None:
        self.path = os.fsdecode(path)
        self.reader = XzReader(path, sequential=sequential)

    def close(self) -> None:
        self.reader.close()

    def _fail(self, message: str) -> ArchiveError:
        return ArchiveError(f"{self.path}: {message}")

    def header_at(self, offset: int) -> tarfile.TarInfo | None:
        """The member whose header starts at `offset`; None at end of archive."""
        cursor = _TarCursor(self.reader)
        cursor.offset = offset
        first = self.reader.pread(offset, tarfile.BLOCKSIZE)
        if len(first) < tarfile.BLOCKSIZE:
            if not first:
                return None
            raise self._fail(
                f"tar header at byte {offset} is cut off: truncated archive"
            )
        if not any(first):
            return None
        try:
            peek = tarfile.TarInfo.frombuf(first, cursor.encoding, cursor.errors)
            if (
                peek.type in (tarfile.XHDTYPE, tarfile.XGLTYPE, *tarfile.GNU_TYPES)
                and peek.size > PAX_LIMIT
            ):
                raise self._fail(
                    f"extended header at byte {offset} claims {peek.size} bytes"
                )
            self.reader.seek(offset)
            info = tarfile.TarInfo.fromtarfile(cursor)
        except tarfile.HeaderError as e:
            raise self._fail(
                f"bad tar header at byte {offset} ({e}): not a tar archive, or damaged"
            ) from None
        if (
            info.type not in tarfile.SUPPORTED_TYPES
            or info.type == tarfile.GNUTYPE_SPARSE
        ):
            raise self._fail(
                f"member {info.name!r} has unsupported tar type {info.type!r}"
            )
        if info.offset_data + self.data_size(info) > self.reader.size:
            raise self._fail(f"member {info.name!r} runs past the end of the archive")
        return info

    @staticmethod
    def data_size(info: tarfile.TarInfo) -> int:
        return info.size if info.isreg() else 0

    @staticmethod
    def next_offset(info: tarfile.TarInfo) -> int:
        """Where the header after this member starts."""
        return info.offset_data + _round_up(Archive.data_size(info), tarfile.BLOCKSIZE)

    def members(self, start: int = 0) -> Iterator[tarfile.TarInfo]:
        """Every member from the header at `start` on, reading only headers."""
        offset = start
        while True:
            info = self.header_at(offset)
            if info is None:
                return
            yield info
            offset = self.next_offset(info)

    def pread(self, info: tarfile.TarInfo, offset: int, size: int) -> bytes:
        """Bytes of a member's data, as read_elf's read_at wants them."""
        return self.reader.pread(info.offset_data + offset, size)

    def data(self, info: tarfile.TarInfo, chunk: int = READ_CHUNK) -> Iterator[bytes]:
        """A member's data, in order, in bounded chunks."""
        done, size = 0, self.data_size(info)
        while done < size:
            piece = self.reader.pread(info.offset_data + done, min(chunk, size - done))
            if not piece:
                raise self._fail(
                    f"member {info.name!r} runs past the end of the archive"
                )
            done += len(piece)
            yield piece

    def elf_info(
        self, info: tarfile.TarInfo, *, sections: bool = True
    ) -> ElfInfo | None:
        """ElfInfo of a regular member, or None if it is not ELF."""
        if not info.isreg() or info.size < 4 or self.pread(info, 0, 4) != ELF_MAGIC:
            return None
        return read_elf(
            functools.partial(self.pread, info),
            info.size,
            f"{self.path}:{info.name}",
            sections=sections,
        )

    def locate(self, name: str) -> tarfile.TarInfo | None:
        """The member called `name` (any spelling), reading as little as possible.

        In packdebug's layout (sorted members, every Block but a large
        member's continuation starting with a header, the end marker in its
        own Block) only Block starts are read to find the right Block.  Any
        other archive is searched header by header.
        """
        wanted = normalize_name(name)
        key = canonical_key(wanted)
        start = self._block_holding(key) if self._is_packdebug_layout() else None
        if start is None:
            return self.locate_by_walking(wanted)
        previous = None
        for info in self.members(start):
            current = canonical_key(info.name)
            if previous is not None and current < previous:
                return self.locate_by_walking(wanted)  # not sorted after all
            if current >= key:
                return info if current == key else None  # sorted: passed it
            previous = current
        return None

    def locate_by_walking(self, name: str) -> tarfile.TarInfo | None:
        wanted = normalize_name(name)
        return next(
            (i for i in self.members() if normalize_name(i.name) == wanted), None
        )

    def _is_packdebug_layout(self) -> bool:
        blocks = self.reader.layout.blocks
        if len(blocks) < 2 or self.reader.layout.streams != 1:
            return False
        last = blocks[-1]
        return last.uncompressed_size >= 2 * tarfile.BLOCKSIZE and not any(
            self.reader.pread(last.uncompressed_offset, 2 * tarfile.BLOCKSIZE)
        )

    def _block_holding(self, key: tuple) -> int | None:
        """Offset of the last header-starting Block whose first member sorts <= key.

        Returns None when the Block starts do not behave as packdebug writes
        them (a header that does not parse, names out of order).
        """
        blocks, starts = self.reader.layout.blocks, self.reader.block_starts
        found, previous, index = 0, None, 0
        while index < len(blocks):
            block = blocks[index]
            try:
                info = self.header_at(block.uncompressed_offset)
            except ArchiveError:
                return None
            if info is None:
                break
            first = canonical_key(info.name)
            if previous is not None and first < previous:
                return None
            if first > key:
                break
            found, previous = block.uncompressed_offset, first
            end = self.next_offset(info)
            if end <= block.uncompressed_end:
                index += 1
                continue
            index = bisect.bisect_left(
                starts, end
            )  # skip the member's continuation Blocks
            if index == len(starts) or starts[index] != end:
                return None
        return found

    def resolve(self, info: tarfile.TarInfo) -> tarfile.TarInfo | None:
        """Follow symlinks and hardlinks inside the archive to a regular member."""
        for _ in range(LINK_DEPTH):
            if info.isreg():
                return info
            target = link_target(info)
            found = self.locate(target) if target is not None else None
            if found is None:
                return None
            info = found
        return None

    def find_build_id(self, build_id: str) -> tarfile.TarInfo | None:
        """The regular member holding the ELF with that build-id: by link, else by notes."""
        return self.find_build_id_by_link(build_id) or self.find_build_id_by_notes(
            build_id
        )

    def find_build_id_by_link(self, build_id: str) -> tarfile.TarInfo | None:
        """Through the .build-id/xx/yyyy.debug link estrip makes (a few headers), confirmed by the ELF note."""
        link = self.locate(
            f"usr/lib/debug/.build-id/{build_id[:2]}/{build_id[2:]}.debug"
        )
        target = self.resolve(link) if link is not None else None
        return (
            target
            if target is not None and self._has_build_id(target, build_id)
            else None
        )

    def find_build_id_by_notes(self, build_id: str) -> tarfile.TarInfo | None:
        """Reading the ELF notes of every member: for archives without the links."""
        return next(
            (i for i in self.members() if self._has_build_id(i, build_id)), None
        )

    def _has_build_id(self, info: tarfile.TarInfo, build_id: str) -> bool:
        try:
            elf = self.elf_info(info, sections=False)
        except ElfError:
            return False
        return elf is not None and elf.build_id == build_id


def member_kind(info: tarfile.TarInfo, elf: ElfInfo | None) -> str:
    """Classify a member as debuginfod does (debuginfod.cxx elf_classify)."""
    if info.issym():
        return "symlink"
    if info.islnk():
        return "hardlink"
    if info.isdir():
        return "directory"
    if not info.isreg():
        return "other"
    if elf and elf.is_debuginfo:
        return "debuginfo"
    if elf and elf.is_executable:
        return "executable"
    return "source"  # debuginfod indexes every other file as a possible source


@dataclasses.dataclass
class Listing:
    name: str
    size: int
    kind: str
    build_id: str | None = None
    link: str | None = None
    problem: str = ""


def list_archive(archive: Archive) -> Iterator[Listing]:
    """Each member with its kind and build-id, reading headers and ELF notes only."""
    for info in archive.members():
        elf, problem = None, ""
        try:
            elf = archive.elf_info(info)
        except ElfError as e:
            problem = str(e)
        link = info.linkname if info.issym() or info.islnk() else None
        yield Listing(
            info.name,
            Archive.data_size(info),
            member_kind(info, elf),
            elf and elf.build_id,
            link,
            problem,
        )


def _open_beneath(root_fd: int, parts: Sequence[str], *, create: bool = False) -> int:
    """Open the directory root/parts... without following any symlink on the way."""
    fd = os.dup(root_fd)
    try:
        for part in parts:
            if create:
                with contextlib.suppress(FileExistsError):
                    os.mkdir(part, 0o755, dir_fd=fd)
            child = os.open(
                part,
                os.O_RDONLY | os.O_DIRECTORY | os.O_NOFOLLOW | os.O_CLOEXEC,
                dir_fd=fd,
            )
            os.close(fd)
            fd = child
    except BaseException:
        os.close(fd)
        raise
    return fd


class SafeExtractor:
    """Extracts members under one directory and refuses all that could escape it.

    Refused: absolute names, '..', symlinks and hardlinks leading outside,
    devices, FIFOs.  setuid/setgid/sticky bits are dropped.  Every path is
    opened component by component with O_NOFOLLOW below the directory, so a
    symlink extracted earlier cannot redirect a later member (the checks of
    Python's tarfile 'data' filter, on every supported Python).
    """

    def __init__(self, archive: Archive, dest: str) -> None:
        self.archive, self.dest = archive, os.path.abspath(dest)
        os.makedirs(self.dest, exist_ok=True)
        self.dest_fd = os.open(self.dest, os.O_RDONLY | os.O_DIRECTORY | os.O_CLOEXEC)
        self.dir_times: list[tuple[str, int, int]] = []

    def close(self) -> None:
        os.close(self.dest_fd)

    def refuse(self, info: tarfile.TarInfo, why: str) -> UnsafeMemberError:
        return UnsafeMemberError(
            f"{self.archive.path}: refusing member {info.name!r}: {why}; nothing was written outside {self.dest}"
        )

    def extract(self, info: tarfile.TarInfo) -> None:
        problems = [
            p
            for p in name_problems(info.name)
            if p in ("absolute path", "'..' component")
        ]
        if problems:
            raise self.refuse(info, problems[0])
        parts = normalize_name(info.name).split("/")
        if parts == [""]:
            return
        if info.isdir():
            self._with_parent(parts, lambda fd, name: self._mkdir(fd, name, info))
        elif info.isreg():
            self._with_parent(parts, lambda fd, name: self._write(fd, name, info))
        elif info.issym():
            self._check_inside(info, parts[:-1], info.linkname)
            self._with_parent(
                parts,
                lambda fd, name: self._replace(
                    fd, name, lambda: os.symlink(info.linkname, name, dir_fd=fd)
                ),
            )
        elif info.islnk():
            self._link(info, parts)
        else:
            raise self.refuse(
                info, "devices, FIFOs and other special files are not extracted"
            )

    def _check_inside(
        self, info: tarfile.TarInfo, where: list[str], target: str
    ) -> None:
        if target.startswith("/"):
            raise self.refuse(info, f"symlink to an absolute path {target!r}")
        depth = 0
        for part in where + target.split("/"):
            depth += -1 if part == ".." else 0 if part in ("", ".") else 1
            if depth < 0:
                raise self.refuse(
                    info, f"symlink {target!r} points outside the directory"
                )

    def _with_parent(
        self, parts: list[str], action: Callable[[int, str], None]
    ) -> None:
        try:
            fd = _open_beneath(self.dest_fd, parts[:-1], create=True)
        except OSError:
            raise UnsafeMemberError(
                f"{self.archive.path}: refusing to extract under {'/'.join(parts[:-1])!r}: "
                f"it is a symlink or not a directory; nothing was written outside {self.dest}"
            ) from None
        try:
            action(fd, parts[-1])
        finally:
            os.close(fd)

    def _mkdir(self, fd: int, name: str, info: tarfile.TarInfo) -> None:
        with contextlib.suppress(FileExistsError):
            os.mkdir(name, 0o700, dir_fd=fd)
        st = os.stat(name, dir_fd=fd, follow_symlinks=False)
        if not stat.S_ISDIR(st.st_mode):
            raise self.refuse(info, "a non-directory of that name was extracted before")
        sub = os.open(
            name, os.O_RDONLY | os.O_DIRECTORY | os.O_NOFOLLOW | os.O_CLOEXEC, dir_fd=fd
        )
        try:
            os.chmod(sub, info.mode & 0o777 | 0o700)
        finally:
            os.close(sub)
        self.dir_times.append(
            (normalize_name(info.name), info.mode & 0o777, int(info.mtime))
        )

    def _replace(self, fd: int, name: str, create: Callable[[], None]) -> None:
        with contextlib.suppress(FileNotFoundError, IsADirectoryError):
            os.unlink(name, dir_fd=fd)
        create()

    def _write(self, fd: int, name: str, info: tarfile.TarInfo) -> None:
        def create() -> None:
            out = os.open(
                name,
                os.O_WRONLY | os.O_CREAT | os.O_EXCL | os.O_NOFOLLOW | os.O_CLOEXEC,
                0o600,
                dir_fd=fd,
            )
            with open(out, "wb") as f:
                f.writelines(self.archive.data(info))
                os.fchmod(out, info.mode & 0o777)
                os.utime(out, (int(info.mtime), int(info.mtime)))

        self._replace(fd, name, create)

    def _link(self, info: tarfile.TarInfo, parts: list[str]) -> None:
        target = normalize_name(info.linkname)
        if info.linkname.startswith("/") or ".." in target.split("/"):
            raise self.refuse(
                info, f"hardlink to {info.linkname!r} outside the directory"
            )
        source = target.split("/")
        self._with_parent(
            source,
            lambda sfd, sname: self._with_parent(
                parts,
                lambda fd, name: self._replace(
                    fd,
                    name,
                    lambda: os.link(
                        sname,
                        name,
                        src_dir_fd=sfd,
                        dst_dir_fd=fd,
                        follow_symlinks=False,
                    ),
                ),
            ),
        )

    def finish(self) -> None:
        """Directory modes and mtimes last, as tar does, deepest first."""
        for path, mode, mtime in sorted(self.dir_times, reverse=True):
            parts = path.split("/")

            def settle(fd: int, name: str, mode=mode, mtime=mtime) -> None:
                os.chmod(name, mode, dir_fd=fd)
                os.utime(name, (mtime, mtime), dir_fd=fd, follow_symlinks=False)

            self._with_parent(parts, settle)


def extract_all(archive: Archive, dest: str) -> int:
    """Extract every member safely under dest; return how many."""
    extractor = SafeExtractor(archive, dest)
    count = 0
    try:
        for info in archive.members():
            extractor.extract(info)
            count += 1
        archive.reader.verify_all()
        extractor.finish()
    finally:
        extractor.close()
    return count


@dataclasses.dataclass
class Check:
    """One line of `verify`: what was checked, whether it passed, and how."""

    name: str
    ok: bool
    detail: str


@dataclasses.dataclass
class Verification:
    path: str
    checks: list[Check]
    members: list[tarfile.TarInfo]

    @property
    def ok(self) -> bool:
        return all(c.ok for c in self.checks)


def seekability(layout: XzLayout) -> Check:
    """Whether debuginfod >= 0.192 seeks in the file (debuginfod.cxx is_seekable_archive)."""
    blocks = len(layout.blocks)
    if layout.streams > 1:
        return Check(
            "seekable",
            False,
            f"{layout.streams} xz streams: debuginfod reads only the last one's "
            "index and would serve wrong bytes; repack it",
        )
    if layout.stream_padding:
        return Check(
            "seekable",
            False,
            "stream padding after the stream footer: debuginfod decompresses it "
            "whole for every request; repack it",
        )
    if blocks < 2:
        return Check(
            "seekable",
            False,
            f"{blocks} xz block: debuginfod needs more than one to seek, so it "
            "decompresses the whole file for every request; repack it",
        )
    return Check("seekable", True, f"debuginfod >= 0.192 seeks in its {blocks} blocks")


def _container_check(layout: XzLayout, reader: XzReader) -> Check:
    names = ", ".join(
        LIBLZMA_CHECKS.get(c, f"check 0x{c:02x}") for c in sorted(layout.checks)
    )
    shape = f"{layout.streams} stream{'s' * (layout.streams > 1)}, {len(layout.blocks)} blocks, {names}"
    unverifiable = layout.checks - {CHECK_CRC32, CHECK_CRC64, CHECK_SHA256}
    if unverifiable:
        return Check(
            "xz", False, f"{shape}: {names} cannot be verified (xz --check=crc64 can)"
        )
    if layout.streams != 1 or layout.stream_padding:
        return Check(
            "xz",
            False,
            f"{shape}, {layout.stream_padding} bytes of stream padding: packdebug writes "
            "exactly one stream without padding",
        )
    missing = len(layout.blocks) - len(reader.verified_blocks)
    if missing:
        return Check("xz", False, f"{shape}: {missing} blocks not verified")
    return Check("xz", True, f"{shape}, every block's check verified")


class _TarAudit:
    """What one sequential pass over the members finds for `verify`."""

    def __init__(self, archive: Archive) -> None:
        self.archive = archive
        self.members: list[tarfile.TarInfo] = []
        self.by_name: dict[str, tarfile.TarInfo] = {}
        self.build_ids: dict[str, str | None] = {}
        self.problems: dict[str, list[str]] = {"tar": [], "build-ids": [], "names": []}
        self.debug_elf = 0

    def run(self) -> None:
        for info in self.archive.members():
            self.add(info)
        end = Archive.next_offset(self.members[-1]) if self.members else 0
        if self.archive.reader.pread(end, 2 * tarfile.BLOCKSIZE) != bytes(
            2 * tarfile.BLOCKSIZE
        ):
            self.problems["tar"].append("no end-of-archive marker")
        self.archive.reader.verify_all()

    def add(self, info: tarfile.TarInfo) -> None:
        name = normalize_name(info.name)
        self.members.append(info)
        problems = name_problems(info.name)
        if problems:
            self.problems["names"].append(f"{info.name!r}: {', '.join(problems)}")
        if name in self.by_name:
            self.problems["tar"].append(f"duplicate member {name!r}")
        if info.islnk() and normalize_name(info.linkname) not in self.by_name:
            self.problems["tar"].append(
                f"hardlink {name!r} to {info.linkname!r}, which comes later or not at all"
            )
        self.by_name[name] = info
        if info.isreg() and name.startswith("usr/lib/debug/"):
            self._check_elf(name, info)

    def _check_elf(self, name: str, info: tarfile.TarInfo) -> None:
        try:
            elf = self.archive.elf_info(info, sections=False)
        except ElfError as e:
            self.debug_elf += 1
            self.problems["build-ids"].append(str(e))
            return
        if elf is None:
            return
        self.debug_elf += 1
        self.build_ids[name] = elf.build_id
        if not elf.build_id:
            self.problems["build-ids"].append(f"{name}: debug ELF without a build-id")

    def link_problems(self) -> tuple[int, list[str]]:
        """Each .build-id/xx/yyyy.debug link must reach an ELF with that build-id."""
        links = [
            n
            for n, i in self.by_name.items()
            if i.issym()
            and re.fullmatch(
                r"usr/lib/debug/\.build-id/[0-9a-f]{2}/[0-9a-f]+\.debug", n
            )
        ]
        problems = []
        for name in links:
            target = self._resolve(name)
            build_id = name.split("/")[-2] + name.split("/")[-1][: -len(".debug")]
            if target is None:
                problems.append(
                    f"{name} -> {self.by_name[name].linkname}: does not resolve inside the archive"
                )
            elif self.build_ids.get(target) != build_id:
                problems.append(
                    f"{name} -> {target}: that file's build-id is {self.build_ids.get(target)}"
                )
        return len(links), problems

    def _resolve(self, name: str) -> str | None:
        for _ in range(LINK_DEPTH):
            info = self.by_name.get(name)
            if info is None or info.isreg():
                return name if info is not None else None
            name = link_target(info)
            if name is None:
                return None
        return None


def verify_archive(path) -> Verification:
    """Every check of `packdebug verify`, in one sequential pass."""
    archive = Archive(path, sequential=True)
    audit = _TarAudit(archive)
    try:
        audit.run()
    except XzError as e:
        layout_checks = [
            Check("xz", False, str(e).replace(f"{archive.path}: ", "")),
            seekability(archive.reader.layout),
        ]
        return Verification(
            archive.path,
            layout_checks
            + [Check("tar", False, "not checked: the xz data is damaged")],
            audit.members,
        )
    except ArchiveError as e:
        audit.problems["tar"].insert(0, str(e).replace(f"{archive.path}: ", ""))
        with contextlib.suppress(XzError):
            archive.reader.verify_all()
    finally:
        archive.close()
    links, link_problems = audit.link_problems()
    regular = sum(1 for m in audit.members if m.isreg())
    checks = [
        _container_check(archive.reader.layout, archive.reader),
        seekability(archive.reader.layout),
        _problems_check(
            "tar",
            audit.problems["tar"],
            f"{len(audit.members)} members ({regular} files), end-of-archive marker",
        ),
        _problems_check(
            "build-ids",
            audit.problems["build-ids"],
            f"{audit.debug_elf} debug ELF, each with a build-id",
        ),
        _problems_check(
            "links",
            link_problems,
            f"{links} .build-id/*.debug links, each resolving inside the archive to its ELF",
        ),
        _problems_check(
            "names", audit.problems["names"], "member names are relative and clean"
        ),
    ]
    return Verification(archive.path, checks, audit.members)


def _problems_check(name: str, problems: list[str], fine: str) -> Check:
    if not problems:
        return Check(name, True, fine)
    more = f" (and {len(problems) - 5} more)" if len(problems) > 5 else ""
    return Check(name, False, "; ".join(problems[:5]) + more)


def copy_member(
    archive: Archive, info: tarfile.TarInfo, out: io.BufferedIOBase
) -> None:
    """Copy a member's data, verifying the checks of every Block it spans.

    Reads from the member's header on, so the Blocks holding the header and
    the data are each decompressed to their end and so checked.
    """
    reader = archive.reader
    reader.seek(info.offset)
    reader.read(info.offset_data - info.offset)
    out.writelines(archive.data(info))
    reader.finish_block()


# ---------------------------------------------------------------------------
# 6. binhost upkeep: repack
# ---------------------------------------------------------------------------

RANDOM_ACCESS_BLOCK = 2 * BLOCK_SIZE  # larger Blocks are spooled, not re-read


def canonical_headers(
    members: Sequence[tarfile.TarInfo], source_date_epoch: int | None = None
) -> list[tuple[tarfile.TarInfo, tarfile.TarInfo]]:
    """(canonical header, original member) pairs in packdebug's member order.

    Names are normalized, headers made reproducible as pack makes them, and
    of each set of hardlinked names the first in the new order holds the data.
    """
    data_of: dict[str, str] = {}  # hardlink name -> name of the member with its data
    for info in members:
        if info.islnk():
            target = normalize_name(info.linkname)
            data_of[normalize_name(info.name)] = data_of.get(target, target)
    ordered = sorted(members, key=lambda i: canonical_key(i.name))
    holder: dict[str, str] = {}  # original data member -> first name in the new order
    pairs = []
    for info in ordered:
        name = normalize_name(info.name)
        new = tarfile.TarInfo(name)
        new.mode, new.uid, new.gid, new.uname, new.gname = (
            info.mode & 0o777,
            0,
            0,
            "root",
            "root",
        )
        mtime = int(info.mtime)
        new.mtime = (
            mtime if source_date_epoch is None else min(mtime, source_date_epoch)
        )
        original = data_of.get(name, name) if (info.islnk() or info.isreg()) else None
        if info.isdir():
            new.type = tarfile.DIRTYPE
        elif info.issym():
            new.type, new.linkname = tarfile.SYMTYPE, info.linkname
        elif original is not None and original in holder:
            new.type, new.linkname = tarfile.LNKTYPE, holder[original]
        elif original is not None:
            holder[original] = name
            new.type = tarfile.REGTYPE
        else:
            raise ArchiveError(
                f"member {info.name!r}: a {info.type!r} member cannot be repacked"
            )
        pairs.append((new, info))
    _date_directories([new for new, _ in pairs])
    return pairs


def _data_sources(
    pairs, members: Sequence[tarfile.TarInfo]
) -> dict[str, tarfile.TarInfo]:
    """For each new regular member, the original member that holds its data."""
    by_name = {normalize_name(i.name): i for i in members}
    sources = {}
    for new, info in pairs:
        if new.type == tarfile.REGTYPE:
            original = info
            while original.islnk():
                original = by_name[normalize_name(original.linkname)]
            new.size = original.size
            sources[new.name] = original
    return sources


def _spool(
    archive: Archive, stack: contextlib.ExitStack
) -> Callable[[tarfile.TarInfo], Iterator[bytes]]:
    """Decompress an archive with large Blocks once into an unnamed temporary file.

    Re-reading a single-Block archive in another member order would start
    decompressing from its beginning for every member; reading the spool
    costs nothing.  It sits beside the archive (the file system the new
    tarball goes to) and vanishes when closed, even after a crash.
    """
    import tempfile  # imported here: only repacking big-Block archives needs it

    directory = os.path.dirname(os.path.abspath(archive.path))
    spool = stack.enter_context(tempfile.TemporaryFile(dir=directory))  # noqa: SIM115 (closed by the stack)
    offset = 0
    while offset < archive.reader.size:
        chunk = archive.reader.pread(offset, READ_CHUNK)
        spool.write(chunk)
        offset += len(chunk)
    spool.flush()

    def data(info: tarfile.TarInfo) -> Iterator[bytes]:
        for done in range(0, info.size, READ_CHUNK):
            yield os.pread(
                spool.fileno(),
                min(READ_CHUNK, info.size - done),
                info.offset_data + done,
            )

    return data


@dataclasses.dataclass
class RepackResult:
    path: str
    reasons: list[str]
    old_size: int
    new_size: int | None = None  # None: not written


def repack_reasons(verification: Verification, pairs) -> list[str]:
    """What makes an archive differ from what packdebug would write."""
    reasons = [
        c.detail for c in verification.checks if c.name == "seekable" and not c.ok
    ]
    originals = [info for _, info in pairs]
    if any(name_problems(i.name) for i in verification.members):
        reasons.append("member names are not clean")
    if originals != verification.members:
        reasons.append("members are not in packdebug's order")
    fields = ("mode", "uid", "gid", "uname", "gname", "mtime", "type")
    if any(getattr(new, f) != getattr(info, f) for new, info in pairs for f in fields):
        reasons.append("headers are not reproducible (owner, mode, mtime or type)")
    return reasons


def repack_archive(
    path: str,
    options: PackOptions,
    *,
    force: bool = False,
    dry_run: bool = False,
    source_date_epoch: int | None = None,
    progress: ProgressFn | None = None,
) -> RepackResult:
    """Rewrite one tarball in packdebug's layout, atomically, under its name.

    The archive must first pass verify's integrity checks (xz, tar); then its
    members are rewritten in canonical order with reproducible headers, their
    data byte for byte.  An archive already canonical is left alone unless
    `force`.
    """
    verification = _repackable(path)
    pairs = canonical_headers(verification.members, source_date_epoch)
    result = RepackResult(
        path, repack_reasons(verification, pairs), os.path.getsize(path)
    )
    with contextlib.ExitStack() as stack:
        archive = Archive(path)
        stack.callback(archive.close)
        entries = _canonical_entries(archive, pairs, verification.members, stack)

        def payloads() -> Iterator[bytes]:
            return tar_blocks(entries, options.block_size, options.large_member)

        if not result.reasons:
            same = _same_blocks(archive, payloads())
            if same and not force:
                return result
            result.reasons.append(
                "--force" if same else "xz blocks are not in packdebug's layout"
            )
        if not dry_run:
            result.new_size = write_blocks(payloads(), path, options, progress).size
    return result


def _repackable(path: str) -> Verification:
    """verify's result, if the archive is sound enough to be rewritten."""
    verification = verify_archive(path)
    failed = [
        c.detail for c in verification.checks if c.name in ("xz", "tar") and not c.ok
    ]
    if failed:
        raise ArchiveError(
            f"{path}: fails verification, left untouched: {'; '.join(failed)}"
        )
    for info in verification.members:
        if {"absolute path", "'..' component"} & set(name_problems(info.name)):
            raise ArchiveError(
                f"{path}: member {info.name!r} escapes the archive root, left untouched"
            )
    return verification


def _canonical_entries(
    archive: Archive, pairs, members, stack: contextlib.ExitStack
) -> list:
    """(header, data) entries for tar_blocks, reading the data from the archive."""
    sources = _data_sources(pairs, members)
    big = (
        max((b.uncompressed_size for b in archive.reader.layout.blocks), default=0)
        > RANDOM_ACCESS_BLOCK
    )
    read = _spool(archive, stack) if big else archive.data
    return [
        (
            new,
            functools.partial(read, sources[new.name])
            if new.name in sources
            else tuple,
        )
        for new, _ in pairs
    ]


def _same_blocks(archive: Archive, payloads: Iterable[bytes]) -> bool:
    """Whether the archive's Blocks hold exactly these payloads, CRC64-checked."""
    layout = archive.reader.layout
    if layout.streams != 1 or layout.stream_padding or layout.checks != {CHECK_CRC64}:
        return False
    blocks = iter(layout.blocks)
    for payload in payloads:
        block = next(blocks, None)
        if block is None or block.uncompressed_size != len(payload):
            return False
        if archive.reader.pread(block.uncompressed_offset, len(payload)) != payload:
            return False
    return next(blocks, None) is None


# ---------------------------------------------------------------------------
# 6. binhost upkeep: prune
# ---------------------------------------------------------------------------

# PMS 3.2 version syntax, with the -rN revision and, in a tarball's name, -BUILD_ID.
_VERSION = r"(\d+(?:\.\d+)*)([a-z]?)((?:_(?:alpha|beta|pre|rc|p)\d*)*)(?:-r(\d+))?"
_TARBALL_TAIL = re.compile(rf"(?P<version>{_VERSION})(?:-(?P<build_id>\d+))?")
_SUFFIX_RANK = {"alpha": 0, "beta": 1, "pre": 2, "rc": 3, "p": 5}  # no suffix ranks 4
DAY = 86400


def _cmp(a, b) -> int:
    return (a > b) - (a < b)


def version_cmp(a: str, b: str) -> int:
    """Compare two Gentoo versions (PMS 3.3 algorithms 3.1-3.7): -1, 0 or 1."""
    ma, mb = re.fullmatch(_VERSION, a), re.fullmatch(_VERSION, b)
    if not ma or not mb:
        raise ValueError(f"not a Gentoo version: {a if not ma else b}")
    na, nb = ma[1].split("."), mb[1].split(".")
    c = _cmp(int(na[0]), int(nb[0]))
    for x, y in zip(na[1:], nb[1:]):
        if c:
            return c
        leading_zero = x.startswith("0") or y.startswith("0")
        c = _cmp(x.rstrip("0"), y.rstrip("0")) if leading_zero else _cmp(int(x), int(y))
    c = c or _cmp(len(na), len(nb)) or _cmp(ma[2], mb[2])
    if c:
        return c
    sa = re.findall(r"_(alpha|beta|pre|rc|p)(\d*)", ma[3])
    sb = re.findall(r"_(alpha|beta|pre|rc|p)(\d*)", mb[3])
    for (x, xn), (y, yn) in zip(sa, sb):
        c = _cmp(_SUFFIX_RANK[x], _SUFFIX_RANK[y]) or _cmp(int(xn or 0), int(yn or 0))
        if c:
            return c
    if len(sa) != len(sb):
        longer, sign = (sa, 1) if len(sa) > len(sb) else (sb, -1)
        return sign if longer[min(len(sa), len(sb))][0] == "p" else -sign
    return _cmp(int(ma[4] or 0), int(mb[4] or 0))


@dataclasses.dataclass
class DebugTarball:
    """A tarball under the root, named as pack and Portage name them."""

    path: str  # relative to the root: CAT/PN/FILE
    category: str
    pn: str
    pf: str
    version: str
    build_id: str | None
    size: int
    mtime: float
    ino: int

    def binpkgs(self, pkgdir: str) -> list[str]:
        """Where its binary package would be (bintree.py getname_build_id)."""
        if self.build_id:
            stem = os.path.join(
                pkgdir, self.category, self.pn, f"{self.pf}-{self.build_id}"
            )
            return [stem + ".gpkg.tar", stem + ".xpak"]
        stem = os.path.join(pkgdir, self.category, self.pf)
        return [stem + ".gpkg.tar", stem + ".tbz2"]


def parse_tarball_name(
    category: str, pn: str, filename: str
) -> tuple[str, str, str | None] | None:
    """(PF, version, BUILD_ID) of CAT/PN/PF[-BUILD_ID]-debug.tar.xz, or None."""
    if not filename.endswith(TARBALL_SUFFIX) or not filename.startswith(pn + "-"):
        return None
    match = _TARBALL_TAIL.fullmatch(filename[len(pn) + 1 : -len(TARBALL_SUFFIX)])
    if not match:
        return None
    return f"{pn}-{match['version']}", match["version"], match["build_id"]


@dataclasses.dataclass
class PruneDecision:
    tarball: DebugTarball
    remove: bool
    reason: str


@dataclasses.dataclass
class PrunePlan:
    decisions: list[PruneDecision]
    unrecognised: list[str]  # relative paths, kept

    @property
    def removals(self) -> list[PruneDecision]:
        return [d for d in self.decisions if d.remove]


def scan_tarballs(root: str) -> tuple[list[DebugTarball], list[str]]:
    """The tarballs under root, and every other entry (kept as unrecognised).

    Never follows a symlink: a symlinked directory or file is unrecognised.
    Hidden names (a pack's temporary files) are passed over silently.
    """
    tarballs, unrecognised = [], []
    for dirpath, dirnames, filenames in os.walk(root):
        rel = os.path.relpath(dirpath, root)
        depth = 0 if rel == "." else rel.count("/") + 1
        for name in sorted(dirnames):
            if os.path.islink(os.path.join(dirpath, name)) or depth >= 2:
                unrecognised.append(os.path.normpath(os.path.join(rel, name)))
        dirnames[:] = sorted(
            d
            for d in dirnames
            if depth < 2 and not os.path.islink(os.path.join(dirpath, d))
        )
        for name in sorted(filenames):
            if name.startswith("."):
                continue
            path = os.path.normpath(os.path.join(rel, name))
            try:
                st = os.lstat(os.path.join(dirpath, name))
            except FileNotFoundError:
                continue  # removed meanwhile, by another prune
            parsed = parse_tarball_name(*rel.split("/"), name) if depth == 2 else None
            if parsed is None or not stat.S_ISREG(st.st_mode):
                unrecognised.append(path)
                continue
            category, pn = rel.split("/")
            tarballs.append(
                DebugTarball(
                    path, category, pn, *parsed, st.st_size, st.st_mtime, st.st_ino
                )
            )
    return tarballs, unrecognised


def installed_instances(vardb: str) -> set[tuple[str, str, str | None]]:
    """(CATEGORY, PF, BUILD_ID) of every installed package in the vardb."""
    installed = set()
    for category in os.listdir(vardb):
        cat_dir = os.path.join(vardb, category)
        if not os.path.isdir(cat_dir) or category.startswith("."):
            continue
        for pf in os.listdir(cat_dir):
            try:
                with open(os.path.join(cat_dir, pf, "BUILD_ID"), encoding="utf-8") as f:
                    build_id = f.read().strip() or None
            except FileNotFoundError:
                build_id = None
            except NotADirectoryError:
                continue
            installed.add((category, pf, build_id))
    return installed


def plan_prune(
    root: str,
    pkgdir: str,
    vardb: str,
    keep_newest: int,
    min_age_days: float,
    now: float,
) -> PrunePlan:
    """Decide, for every tarball under root, whether prune may remove it.

    Only when all hold: its binary package is gone, it is not the debug info
    of the installed instance, it is older than min_age_days, and it is not
    among the keep_newest newest (by version, then BUILD_ID) of its CAT/PN.
    """
    tarballs, unrecognised = scan_tarballs(root)
    installed = installed_instances(vardb)
    by_package: dict[tuple[str, str], list[DebugTarball]] = {}
    for t in tarballs:
        by_package.setdefault((t.category, t.pn), []).append(t)
    newest = set()
    for group in by_package.values():
        group.sort(key=functools.cmp_to_key(_newer_first))
        newest.update(t.path for t in group[:keep_newest])
    decisions = [
        _decide(t, pkgdir, installed, newest, keep_newest, min_age_days, now)
        for t in tarballs
    ]
    return PrunePlan(decisions, unrecognised)


def _newer_first(a: DebugTarball, b: DebugTarball) -> int:
    return -(
        version_cmp(a.version, b.version)
        or _cmp(int(a.build_id or 0), int(b.build_id or 0))
    )


def _decide(
    t: DebugTarball,
    pkgdir: str,
    installed: set,
    newest: set,
    keep: int,
    min_age: float,
    now: float,
) -> PruneDecision:
    binpkg = next((p for p in t.binpkgs(pkgdir) if os.path.exists(p)), None)
    age_days = (now - t.mtime) / DAY
    if binpkg:
        return PruneDecision(t, False, f"binary package {binpkg} exists")
    if (t.category, t.pf, t.build_id) in installed:
        return PruneDecision(t, False, "debug info of the installed instance")
    if age_days < min_age:
        return PruneDecision(
            t, False, f"only {age_days:.1f} days old (--min-age {min_age:g})"
        )
    if t.path in newest:
        return PruneDecision(
            t, False, f"among the {keep} newest of {t.category}/{t.pn} (--keep-newest)"
        )
    return PruneDecision(
        t, True, f"binary package gone, not installed, {age_days:.0f} days old"
    )


def execute_prune(root: str, plan: PrunePlan, log: Log) -> list[PruneDecision]:
    """Remove the planned tarballs, then the directories that emptied; return what went."""
    root_fd = os.open(root, os.O_RDONLY | os.O_DIRECTORY | os.O_CLOEXEC)
    removed: list[PruneDecision] = []
    emptied: set[tuple[str, ...]] = set()
    try:
        for decision in plan.removals:
            t = decision.tarball
            *dirs, name = t.path.split("/")
            try:
                fd = _open_beneath(root_fd, dirs)
            except FileNotFoundError:
                continue  # another prune removed it and its directory
            except OSError as e:
                log.warning(
                    f"{os.path.join(root, t.path)}: kept, cannot reach it without following a link ({e.strerror})"
                )
                continue
            try:
                st = os.stat(name, dir_fd=fd, follow_symlinks=False)
                if not stat.S_ISREG(st.st_mode) or (st.st_ino, st.st_size) != (
                    t.ino,
                    t.size,
                ):
                    log.warning(
                        f"{os.path.join(root, t.path)}: kept, it changed since it was examined"
                    )
                    continue
                os.unlink(name, dir_fd=fd)
            except FileNotFoundError:
                continue  # another prune got there first
            finally:
                os.close(fd)
            removed.append(decision)
            emptied.add(tuple(dirs))
        _remove_emptied(root_fd, emptied)
    finally:
        os.close(root_fd)
    return removed


def _remove_emptied(root_fd: int, dirs: set[tuple[str, ...]]) -> None:
    """rmdir CAT/PN, then CAT, where a removal emptied them; never the root."""
    for parts in sorted(dirs | {d[:1] for d in dirs}, key=len, reverse=True):
        if not parts:
            continue
        try:
            fd = _open_beneath(root_fd, parts[:-1])
        except OSError:
            continue
        try:
            os.rmdir(parts[-1], dir_fd=fd)
        except OSError:
            pass  # not empty (kept tarballs, a pack's temporary file), or gone
        finally:
            os.close(fd)


# ---------------------------------------------------------------------------
# 6. binhost upkeep: settings
# ---------------------------------------------------------------------------

PORTAGE_CHECKED = "3.0.83"  # the Portage release these settings were read in


@dataclasses.dataclass(frozen=True)
class Setting:
    """A Portage variable that packdebug tarballs need, appended to."""

    variable: str
    append: str
    where: str
    why: str


SETTINGS = (
    Setting(
        "UNINSTALL_IGNORE",
        "/usr/lib/debug/.tarball/*",
        "make.conf",
        "keeps old debug tarballs when their package is upgraded or removed, so clients "
        "still running old binaries can fetch symbols. emerge reads it from its own "
        "configuration, never from the ebuild environment (special_env_vars.py "
        "environ_filter; vartree.py unmerge), so bashrc cannot set it.",
    ),
    Setting(
        "COLLISION_IGNORE",
        "/usr/lib/debug/.tarball/*",
        "make.conf",
        "tarballs kept by UNINSTALL_IGNORE belong to no package; without this a rebuild "
        "that writes one again stops on a file collision (vartree.py _collision_protect). "
        "Read by emerge like UNINSTALL_IGNORE, so bashrc cannot set it.",
    ),
    Setting(
        "PKG_INSTALL_MASK",
        "/usr/lib/debug/ /usr/src/debug/",
        "make.conf or bashrc",
        "keeps split debug info out of binary packages; clients fetch it through "
        "debuginfod. The package phase reads build-info/PKG_INSTALL_MASK, saved from the "
        "ebuild environment at the end of src_install (phase-functions.sh), so bashrc works too.",
    ),
)

DEDUP_SETTING = Setting(
    "INSTALL_MASK",
    "/usr/lib/debug/ /usr/src/debug/ -/usr/lib/debug/.tarball",
    "make.conf or bashrc",
    "binhost only: do not keep the debug info twice, on disk and in the tarball (a "
    "leading '-' excepts a path; the last match wins). Portage applies INSTALL_MASK "
    "when merging, BEFORE pkg_preinst (vartree.py treewalk: preinst_mask, then the "
    "preinst phase), so this suits Portage's own FEATURES=packdebug, which packs in the "
    "package phase. packdebug's pre_pkg_preinst hook would find the debug info gone: "
    "with packdebug, leave this out and use `pack --remove-packed` "
    "(`packdebug settings --bashrc --dedup`).",
)


DEBUGINFOD_LISTEN = "127.0.0.1:8002"  # 8002 is debuginfod's default port
DEBUGINFOD_DATABASE = "/var/cache/debuginfod/db.sqlite3"
BINPKG_DIR = "/var/cache/binpkgs"
# From the Portage pull request (sourceware PR33693): debuginfod runs this
# with the .gpkg.tar as stdin, to serve the executables inside binpkgs too.
GPKG_DECODER = "(bsdtar -xf- -O '*/image.tar.*' | bsdtar --strip-components 1 -cf- @-)<"
LISTEN_ADDRESS_SINCE = (0, 193)  # elfutils NEWS 0.193: debuginfod --listen-address
SEEKS_SINCE = (0, 192)


@dataclasses.dataclass
class DebuginfodSetup:
    """The server side that goes with packdebug tarballs."""

    root: str
    pkgdir: str
    address: str
    port: int
    version: tuple[int, int] | None  # None: unknown, assume the newest
    version_note: str
    database: str = DEBUGINFOD_DATABASE

    @property
    def has_listen_address(self) -> bool:
        return self.version is None or self.version >= LISTEN_ADDRESS_SINCE

    def argv(self, database: str = "") -> list[str]:
        """debuginfod's arguments: -Z with no decoder for .tar.xz, so it can seek."""
        database = database or self.database
        listen = [f"--listen-address={self.address}"] if self.has_listen_address else []
        return [
            "debuginfod",
            f"--port={self.port}",
            f"--database={database}",
            *listen,
            "-Z",
            ".tar.xz",
            self.root,
            "-Z",
            f".gpkg.tar={GPKG_DECODER}",
            self.pkgdir,
        ]

    def notes(self) -> list[str]:
        notes = [self.version_note]
        if not self.has_listen_address:
            notes.append(
                f"--listen-address needs elfutils >= 0.193: this debuginfod listens on ALL addresses, "
                f"port {self.port}; firewall it, or put it behind a reverse proxy"
            )
        if self.version is not None and self.version < SEEKS_SINCE:
            notes.append(
                "debuginfod < 0.192 serves the tarballs but never seeks in them (each request "
                "decompresses a whole tarball); 0.192 and later seek"
            )
        return notes

    def client_url(self) -> str:
        host = self.address if self.address not in ("0.0.0.0", "::") else "BINHOST"
        return f"http://{'[' + host + ']' if ':' in host else host}:{self.port}"

    def unit(self) -> str:
        """A systemd unit in the hardened style of the Portage pull request."""
        argv = self.argv("${CACHE_DIRECTORY}/db.sqlite3")
        exec_start = " ".join(
            _systemd_quote(a) for a in ["/usr/bin/debuginfod", *argv[1:]]
        )
        paths = " ".join(
            _systemd_quote(p)
            for p in (
                "-/usr/src/debug",
                "/usr/bin",
                "-/usr/lib64",
                "/usr/lib",
                "-/bin",
                self.root,
                self.pkgdir,
            )
        )
        return f"""\
# -*- conf-unix -*-
# /etc/systemd/system/debuginfod.service, from `packdebug settings --debuginfod`.
# The hardening follows the Portage pull request; packdebug's tests run the
# command line, not this unit: check it with `systemd-analyze verify`.
[Unit]
Description=elfutils debuginfod: debug info and binaries of this binhost's packages
Documentation=https://sourceware.org/elfutils/Debuginfod.html man:debuginfod(8)
After=network.target

[Service]
DynamicUser=true
ExecStart={exec_start}

ProtectProc=invisible
CapabilityBoundingSet=CAP_DAC_OVERRIDE
AmbientCapabilities=CAP_DAC_OVERRIDE
NoNewPrivileges=true
ProtectSystem=strict
ProtectHome=tmpfs
PrivateTmp=on
PrivateDevices=on
PrivateIPC=on
PrivateUsers=on
ProtectClock=on
ProtectHostname=on
ProtectKernelTunables=on
ProtectKernelModules=on
ProtectKernelLogs=on
ProtectControlGroups=on
LockPersonality=on
RestrictSUIDSGID=on
PrivateMounts=on
SystemCallFilter=@system-service
UnsetEnvironment=DEBUGINFOD_URLS

# The tarballs and binpkgs must be visible, and the .gpkg.tar decoder runs
# sh and bsdtar, so they may execute too.
TemporaryFileSystem=/:ro
BindReadOnlyPaths={paths}
NoExecPaths=/
ExecPaths=/usr/bin/debuginfod /bin/sh /usr/bin/sh /usr/bin/bsdtar /usr/lib /usr/lib64

CacheDirectory=debuginfod

[Install]
WantedBy=multi-user.target
"""


def _systemd_quote(arg: str) -> str:
    """One ExecStart= word (systemd.service(5) "Command lines"); ${VAR} is left to systemd."""
    escaped = arg.replace("\\", "\\\\").replace('"', '\\"').replace("%", "%%")
    return f'"{escaped}"' if re.search(r"[\s'\"]", arg) else escaped


def sh_quote(arg: str) -> str:
    """Quote for sh, readably: double quotes when nothing inside needs escaping."""
    if re.fullmatch(r"[\w@%+=:,./-]+", arg):
        return arg
    if not re.search(r'["$`\\!]', arg):
        return f'"{arg}"'
    return shlex.quote(arg)


def debuginfod_version(given: str | None) -> tuple[tuple[int, int] | None, str]:
    """The elfutils version to write for: as given, else `debuginfod --version`."""
    if given:
        match = re.fullmatch(r"(\d+)\.(\d+)", given)
        if not match:
            raise UsageError(f"--debuginfod-version {given!r} is not like 0.192")
        return (
            int(match[1]),
            int(match[2]),
        ), f"written for debuginfod {given} (--debuginfod-version)"
    import subprocess  # imported here: only this setting runs a program

    try:
        out = subprocess.run(
            ["debuginfod", "--version"],
            capture_output=True,
            text=True,
            timeout=10,
            check=False,
        ).stdout
    except (OSError, subprocess.SubprocessError):
        out = ""
    match = re.search(r"(\d+)\.(\d+)", out.splitlines()[0] if out else "")
    if not match:
        return (
            None,
            "debuginfod not found here: written for elfutils >= 0.193 (see --debuginfod-version)",
        )
    return (
        int(match[1]),
        int(match[2]),
    ), f"written for the installed debuginfod {match[1]}.{match[2]}"


def parse_listen(text: str) -> tuple[str, int]:
    """'127.0.0.1:8002', '[::1]:8002' -> (address, port) (argparse type)."""
    match = re.fullmatch(r"\[?([^\]]*?)\]?:(\d+)", text)
    if not match or not match[1] or not 0 < int(match[2]) < 65536:
        raise argparse.ArgumentTypeError(
            f"{text!r} is not ADDRESS:PORT, e.g. {DEBUGINFOD_LISTEN}"
        )
    return match[1], int(match[2])


def format_debuginfod(setup: DebuginfodSetup, fmt: str) -> str:
    argv = setup.argv()
    command = " ".join(sh_quote(a) for a in argv)
    if fmt == "json":
        document = {
            "argv": argv,
            "command": command,
            "unit": setup.unit(),
            "client": {"DEBUGINFOD_URLS": setup.client_url()},
            "notes": setup.notes(),
        }
        return to_json(document)
    groups, current = [], []
    for arg in argv:  # one line per -Z EXT DIR
        if arg == "-Z" and current:
            groups.append(current)
            current = []
        current.append(sh_quote(arg))
    lines = " \\\n    ".join(" ".join(g) for g in [*groups, current])
    notes = "".join(f"# {line}\n" for note in setup.notes() for line in _wrap(note, 76))
    return f"""\
# debuginfod for packdebug tarballs (-Z .tar.xz with no decoder, so it can seek)
# and for binary packages (their executables), as in the Portage pull request.
{notes}
# Server command line:
{lines}

{setup.unit()}
# Clients: put this in their environment (e.g. /etc/env.d/99debuginfod, then
# env-update), with the name clients reach the binhost by:
DEBUGINFOD_URLS="{setup.client_url()}"
"""


def portage_settings(dedup: bool = False) -> list[Setting]:
    return [*SETTINGS, DEDUP_SETTING] if dedup else list(SETTINGS)


def format_settings(settings: Sequence[Setting], fmt: str) -> str:
    """Render settings as make.conf lines, bashrc `export`s, or JSON."""
    if fmt == "json":
        rows = [dataclasses.asdict(s) for s in settings]
        return to_json({"portage": PORTAGE_CHECKED, "settings": rows})
    lines = [
        f"# Settings for packdebug tarballs (checked against Portage {PORTAGE_CHECKED})."
    ]
    for s in settings:
        lines.append("")
        lines.extend("# " + line for line in _wrap(f"{s.where}: {s.why}", 76))
        if fmt == "shell":
            lines.append(
                f'export {s.variable}="${{{s.variable}:+${{{s.variable}}} }}"{shlex.quote(s.append)}'
            )
        else:
            lines.append(f'{s.variable}="${{{s.variable}}} {s.append}"')
    return "\n".join(lines) + "\n"


def _wrap(text: str, width: int) -> list[str]:
    lines, line = [], ""
    for word in text.split():
        if line and len(line) + 1 + len(word) > width:
            lines.append(line)
            line = word
        else:
            line = f"{line} {word}" if line else word
    return lines + [line] if line else lines


def bashrc_snippet(dedup: bool = False, command: str = "") -> str:
    """A ready /etc/portage/bashrc hook that packs every merged package."""
    command = command or shlex.quote(os.path.realpath(__file__))
    flags = "pack -q --remove-packed" if dedup else "pack -q"
    return f"""\
# packdebug: pack split debug info into a seekable debuginfod tarball.
# pre_pkg_preinst is the first phase hook that sees the image after estrip
# has split the debug info and after the package phase has written
# build-info/BUILD_ID. If this bashrc already has a pre_pkg_preinst,
# add the command below to it instead.
pre_pkg_preinst() {{
\tED="${{ED}}" CATEGORY="${{CATEGORY}}" PN="${{PN}}" PF="${{PF}}" \\
\tBUILD_ID="${{BUILD_ID}}" PORTAGE_BUILDDIR="${{PORTAGE_BUILDDIR}}" \\
\t\t{command} {flags} || die "packdebug could not pack the debug info"
}}
"""


# ---------------------------------------------------------------------------
# 7. command line
# ---------------------------------------------------------------------------


@dataclasses.dataclass
class PackTarget:
    image: str  # ${ED}
    output: str
    build_id: str | None


def resolve_pack_target(args: argparse.Namespace, environ: dict) -> PackTarget:
    """ED, CATEGORY, PN, PF and BUILD_ID from flags, else as Portage sets them."""
    image = _image_dir(args, environ)
    build_id = args.build_id or environ.get("BUILD_ID") or _build_id_file(environ)
    if build_id is not None and not build_id.isdigit():
        raise UsageError(
            f"BUILD_ID {build_id!r} is not a number, as Portage's are; check --build-id"
        )
    if args.output:
        output = os.path.abspath(args.output)
        _check_output(image, output)
        return PackTarget(image, output, build_id)
    names = {
        var: _portage_name(var, getattr(args, var.lower()), environ)
        for var in ("CATEGORY", "PN", "PF")
    }
    stem = f"{names['PF']}-{build_id}" if build_id else names["PF"]
    output = os.path.join(
        image, TARBALL_DIR, names["CATEGORY"], names["PN"], stem + TARBALL_SUFFIX
    )
    return PackTarget(image, output, build_id)


def _image_dir(args: argparse.Namespace, environ: dict) -> str:
    eprefix = args.eprefix if args.eprefix is not None else environ.get("EPREFIX", "")
    if args.image:
        image = os.path.join(args.image, eprefix.lstrip("/"))
    elif environ.get("ED"):
        image = environ["ED"]
    elif environ.get("D"):
        image = os.path.join(environ["D"], eprefix.lstrip("/"))
    else:
        raise UsageError(
            "no image: ED (or D and EPREFIX) is not set; run from a Portage phase hook, or pass --image"
        )
    if not os.path.isdir(image):
        raise UsageError(
            f"{image}: the image directory does not exist (check ED or --image)"
        )
    return os.path.abspath(image)


def _build_id_file(environ: dict) -> str | None:
    """BUILD_ID as the package phase saves it with binpkg-multi-instance."""
    builddir = environ.get("PORTAGE_BUILDDIR")
    if not builddir:
        return None
    try:
        with open(
            os.path.join(builddir, "build-info", "BUILD_ID"), encoding="utf-8"
        ) as f:
            return f.read().strip() or None
    except FileNotFoundError:
        return None
    except OSError as e:
        raise UsageError(
            f"{builddir}/build-info/BUILD_ID: cannot read: {e.strerror}"
        ) from None


def _portage_name(var: str, flag_value: str | None, environ: dict) -> str:
    value = flag_value or environ.get(var)
    flag = PORTAGE_INPUTS[var]
    if not value:
        raise UsageError(
            f"{var} is not set: run from a Portage phase hook, or pass {flag}"
        )
    if "/" in value or value in (".", "..") or "\0" in value:
        raise UsageError(f"{var} {value!r} is not a valid name (check {flag})")
    return value


def _check_output(image: str, output: str) -> None:
    inside = os.path.relpath(output, image)
    for tree in DEBUG_TREES:
        if (inside + "/").startswith(tree + "/") and not inside.startswith(
            TARBALL_DIR + "/"
        ):
            raise UsageError(
                f"{output}: --output inside {tree} would be packed next time; put it under {TARBALL_DIR}"
            )


def source_date_epoch(environ: dict) -> int | None:
    value = environ.get("SOURCE_DATE_EPOCH")
    if value is None or value == "":
        return None
    if not value.isdigit():
        raise UsageError(
            f"SOURCE_DATE_EPOCH={value!r} is not a whole number of seconds"
        )
    return int(value)


def cmd_pack(args: argparse.Namespace, log: Log) -> int:
    target = resolve_pack_target(args, os.environ)
    scan = scan_image(target.image, source_date_epoch(os.environ))
    for path, kind in scan.skipped:
        log.warning(
            f"{os.fsdecode(os.path.join(scan.image, path))}: skipped, a {kind} cannot go in the tarball"
        )
    if not scan.files:
        log.info(
            f"packdebug: nothing to pack: {target.image} has no files under {' or '.join(DEBUG_TREES)}"
            + _install_mask_hint(os.environ)
        )
        return 0
    _check_build_ids(scan, args.strict, log)
    if target.build_id is None and not args.output:
        log.info(
            "packdebug: no BUILD_ID (FEATURES=binpkg-multi-instance off, or no binary package built): "
            f"naming the tarball {os.path.basename(target.output)}"
        )
    if args.dry_run:
        return _pack_dry_run(scan, target, args, log)
    created = _make_parents(target.output)
    progress = _progress(args, log, scan.data_size)
    try:
        result = write_tarball(scan, target.output, _pack_options(args), progress)
    except BaseException:
        _remove_dirs(created)
        raise
    finally:
        if progress:
            progress.clear()
    _report_pack(scan, result, log)
    if args.remove_packed:
        files, dirs = remove_packed(scan, log)
        log.info(
            f"removed {files} packed files and {dirs} emptied directories from {target.image}"
        )
    return 0


def _install_mask_hint(environ: dict) -> str:
    masked = [
        p
        for p in environ.get("INSTALL_MASK", "").split()
        if p.rstrip("/*") in ("/usr/lib/debug", "/usr/src/debug")
    ]
    if not masked:
        return ""
    return (
        " (INSTALL_MASK removes them before pkg_preinst; pack with --remove-packed instead"
        " of masking them)"
    )


def _check_build_ids(scan: ImageScan, strict: bool, log: Log) -> None:
    bad = []
    for m in scan.members:
        full = os.fsdecode(os.path.join(scan.image, m.path))
        if m.elf_error:
            bad.append(f"{m.elf_error}: debuginfod cannot index it")
        elif m.elf is not None and not m.elf.build_id:
            bad.append(
                f"{full}: debug ELF without a build-id: debuginfod cannot serve it (build with -Wl,--build-id)"
            )
    if bad and strict:
        raise PackError("\n  ".join(["--strict: refusing to pack:", *bad]))
    for message in bad:
        log.warning(message)


def _pack_options(args: argparse.Namespace) -> PackOptions:
    return PackOptions(
        args.preset, args.jobs, args.block_size or default_block_size(args.preset)
    )


def default_block_size(preset: int) -> int:
    """8 MiB, or the preset's dictionary if larger: -7 to -9 gain nothing otherwise."""
    return max(BLOCK_SIZE, PRESET_DICT_SIZE[preset])


def _pack_dry_run(
    scan: ImageScan, target: PackTarget, args: argparse.Namespace, log: Log
) -> int:
    log.info(
        f"would pack {len(scan.files)} files ({format_size(scan.data_size)}) into {target.output}"
    )
    for m in scan.members:
        log.detail(f"  {m.info.name}")
    if args.remove_packed:
        files, dirs = removal_plan(scan)
        for path in [m.path for m in files] + dirs:
            log.info(f"would remove {os.fsdecode(os.path.join(scan.image, path))}")
    return 0


def _report_pack(scan: ImageScan, result: PackResult, log: Log) -> None:
    for m in scan.members:
        if not m.info.isdir():
            build_id = f"  {m.elf.build_id}" if m.elf and m.elf.build_id else ""
            log.detail(f"  {m.info.name}  {format_size(m.info.size)}{build_id}")
    elf = [m for m in scan.members if m.is_debug_elf]
    with_id = sum(1 for m in elf if m.elf and m.elf.build_id)
    log.info(
        f"packed {len(scan.files)} files ({format_size(scan.data_size)}; {with_id} of {len(elf)} debug ELF "
        f"with a build-id) into {result.output}: {format_size(result.size)} in {result.blocks} xz blocks"
    )


class Progress:
    """One self-updating line on a terminal: bytes read and written, rate, ETA."""

    INTERVAL = 0.5  # seconds between redraws

    def __init__(self, total: int, stream) -> None:
        self.total, self.stream = max(total, 1), stream
        self.start = self.last = time.monotonic()
        self.drawn = False

    def __call__(self, done: int, written: int) -> None:
        now = time.monotonic()
        if now - self.last < self.INTERVAL:
            return
        self.last, elapsed = now, now - self.start
        rate = done / elapsed if elapsed else 0
        eta = (self.total - min(done, self.total)) / rate if rate else 0
        percent = min(100, 100 * done // self.total)
        self.stream.write(
            f"\r{percent:3d}%  {format_size(done)} read, {format_size(written)} written, "
            f"{format_size(rate)}/s, ETA {int(eta) // 60}:{int(eta) % 60:02d}\x1b[K"
        )
        self.stream.flush()
        self.drawn = True

    def clear(self) -> None:
        if self.drawn:
            self.stream.write("\r\x1b[K")
            self.stream.flush()


def _progress(args: argparse.Namespace, log: Log, total: int) -> Progress | None:
    """A progress line when stderr is a terminal and not -q; none in logs."""
    if log.verbosity < 0 or not log.err.isatty():
        return None
    return Progress(total, log.err)


def cmd_buildid(args: argparse.Namespace, log: Log) -> int:
    status = 0
    for path in args.files:
        try:
            build_id = read_build_id(path)
        except PackdebugError as e:
            log.warning(str(e))
            status = 1
            continue
        if build_id is None:
            log.warning(
                f"{path}: no GNU build-id (not ELF, or linked without --build-id)"
            )
            status = 1
        else:
            print(f"{build_id}  {path}", file=log.out)
    return status


def cmd_settings(args: argparse.Namespace, log: Log) -> int:
    if args.debuginfod:
        version, note = debuginfod_version(args.debuginfod_version)
        address, port = args.listen
        setup = DebuginfodSetup(
            args.root, args.pkgdir, address, port, version, note, args.database
        )
        log.out.write(format_debuginfod(setup, args.format))
        return 0
    if args.bashrc:
        snippet = bashrc_snippet(args.dedup)
        text = to_json({"bashrc": snippet}) if args.format == "json" else snippet
    else:
        text = format_settings(portage_settings(args.dedup), args.format)
    log.out.write(text)
    return 0


def iter_tarballs(root: str) -> Iterator[str]:
    """Every *.tar.xz under root, sorted, without following symlinks."""
    for dirpath, dirnames, filenames in os.walk(root):
        dirnames.sort()
        for name in sorted(filenames):
            path = os.path.join(dirpath, name)
            if (
                name.endswith(".tar.xz")
                and not name.startswith(".")
                and not os.path.islink(path)
            ):
                yield path


def cmd_list(args: argparse.Namespace, log: Log) -> int:
    archive = Archive(args.tarball)
    try:
        rows = []
        for row in list_archive(archive):
            if row.problem:
                log.warning(row.problem)
            if args.json:
                rows.append(dataclasses.asdict(row))
                continue
            link = f" -> {row.link}" if row.link else ""
            log.info(
                f"{row.kind:<10} {row.size:>11} {row.build_id or '-':<40} {row.name}{link}"
            )
        if args.json:
            log.out.write(to_json({"tarball": archive.path, "members": rows}))
    finally:
        archive.close()
    return 0


def cmd_verify(args: argparse.Namespace, log: Log) -> int:
    status = 0
    for path in args.tarballs:
        try:
            result = verify_archive(path)
        except PackdebugError as e:
            log.info(f"{path}: FAILED\n  FAIL  {e}")
            status = 1
            continue
        log.info(f"{path}: {'ok' if result.ok else 'FAILED'}")
        for check in result.checks:
            log.info(
                f"  {'ok  ' if check.ok else 'FAIL'}  {check.name}: {check.detail}"
            )
        status |= not result.ok
    return status


def cmd_extract(args: argparse.Namespace, log: Log) -> int:
    if args.all != bool(args.directory) or (args.all and args.output):
        raise UsageError(
            "--all goes with -C DIR (and no -o); --build-id and --member with -o FILE"
        )
    archive = Archive(args.tarball, sequential=args.all)
    try:
        if args.all:
            count = extract_all(archive, args.directory)
            log.info(
                f"extracted {count} members of {archive.path} into {args.directory}"
            )
            return 0
        info = _member_to_extract(archive, args)
        output = args.output or os.path.basename(normalize_name(info.name))
        if output == "-":
            _extract_to_stdout(archive, info)
        else:
            with atomic_output(output, mode=info.mode & 0o777 or 0o644) as f:
                copy_member(archive, info, f)
            log.detail(f"extracted {info.name} ({format_size(info.size)}) to {output}")
    finally:
        archive.close()
    return 0


def _member_to_extract(archive: Archive, args: argparse.Namespace) -> tarfile.TarInfo:
    if args.build_id:
        build_id = args.build_id.lower()
        if not re.fullmatch(r"[0-9a-f]{2,}", build_id):
            raise UsageError(
                f"--build-id {args.build_id!r} is not hexadecimal (see `packdebug buildid`)"
            )
        info = archive.find_build_id(build_id)
        if info is None:
            raise ArchiveError(f"{archive.path}: no ELF with build-id {build_id}")
        return info
    found = archive.locate(args.member)
    info = archive.resolve(found) if found is not None else None
    if info is None:
        what = "no member" if found is None else "no file behind the link"
        raise ArchiveError(
            f"{archive.path}: {what} {args.member!r} (see `packdebug list`)"
        )
    return info


def _extract_to_stdout(archive: Archive, info: tarfile.TarInfo) -> None:
    """Write a member to stdout only once its Blocks' checks have passed."""
    import tempfile  # imported here: only extraction to stdout needs it

    with tempfile.SpooledTemporaryFile(max_size=16 * MiB) as spool:
        copy_member(archive, info, spool)
        spool.seek(0)
        out = sys.stdout.buffer
        while chunk := spool.read(READ_CHUNK):
            out.write(chunk)
        out.flush()


def cmd_find(args: argparse.Namespace, log: Log) -> int:
    """Which tarball holds a build-id: first by .build-id link names, then by ELF notes."""
    build_id = args.build_id.lower()
    if not re.fullmatch(r"[0-9a-f]{2,}", build_id):
        raise UsageError(f"{args.build_id!r} is not a hexadecimal build-id")
    if not os.path.isdir(args.root):
        raise UsageError(
            f"{args.root}: no such directory (give the tarball root, e.g. {'/' + TARBALL_DIR})"
        )
    found = 0
    for search in (Archive.find_build_id_by_link, Archive.find_build_id_by_notes):
        for path in iter_tarballs(args.root):
            archive = None
            try:
                archive = Archive(path)
                hit = search(archive, build_id)
            except PackdebugError as e:
                log.warning(f"{e} (skipped)")
                continue
            finally:
                if archive:
                    archive.close()
            if hit:
                log.info(f"{path}  {hit.name}")
                found += 1
        if found:
            return 0
    log.warning(f"build-id {build_id} is in no tarball under {args.root}")
    return 1


def cmd_repack(args: argparse.Namespace, log: Log) -> int:
    if bool(args.tarballs) == bool(args.root):
        raise UsageError("give either TARBALL... or --root DIR")
    paths = list(args.tarballs) or list(iter_tarballs(args.root))
    options = _pack_options(args)
    sde = source_date_epoch(os.environ)
    status, saved, done = 0, 0, 0
    for path in paths:
        progress = _progress(
            args, log, os.path.getsize(path) * 4
        )  # a guess: xz shrinks DWARF ~4x
        try:
            result = repack_archive(
                path,
                options,
                force=args.force,
                dry_run=args.dry_run,
                source_date_epoch=sde,
                progress=progress,
            )
        except PackdebugError as e:
            log.warning(str(e))
            status = 1
            continue
        finally:
            if progress:
                progress.clear()
        reasons = "; ".join(result.reasons)
        if not result.reasons:
            log.detail(
                f"{path}: already in packdebug's layout, skipped (--force repacks it)"
            )
        elif result.new_size is None:
            log.info(f"{path}: would repack: {reasons}")
        else:
            done += 1
            saved += result.old_size - result.new_size
            change = result.new_size - result.old_size
            log.info(
                f"{path}: repacked ({reasons}): {format_size(result.old_size)} -> "
                f"{format_size(result.new_size)} ({'+' if change >= 0 else '-'}{format_size(abs(change))})"
            )
    if not args.dry_run:
        log.info(
            f"repacked {done} of {len(paths)} tarballs: {'saved' if saved >= 0 else 'added'} {format_size(abs(saved))}"
        )
    return status


def cmd_prune(args: argparse.Namespace, log: Log) -> int:
    for flag, path in (
        ("--root", args.root),
        ("--pkgdir", args.pkgdir),
        ("--vardb", args.vardb),
    ):
        if not os.path.isdir(path):
            raise UsageError(
                f"{path}: no such directory (check {flag}); without it prune cannot tell what to keep"
            )
    plan = plan_prune(
        args.root, args.pkgdir, args.vardb, args.keep_newest, args.min_age, time.time()
    )
    if plan.removals and not _has_binpkgs(args.pkgdir):
        raise UsageError(
            f"{args.pkgdir} holds no binary packages, so every tarball looks orphaned; "
            "is --pkgdir right? Nothing was removed"
        )
    removed = plan.removals if args.dry_run else execute_prune(args.root, plan, log)
    freed = sum(d.tarball.size for d in removed)
    if args.json:
        kept = [
            {"path": d.tarball.path, "reason": d.reason}
            for d in plan.decisions
            if not d.remove
        ]
        gone = [
            {"path": d.tarball.path, "size": d.tarball.size, "reason": d.reason}
            for d in removed
        ]
        document = {
            "root": args.root,
            "dry_run": args.dry_run,
            "removed": gone,
            "kept": kept,
            "unrecognised": plan.unrecognised,
            "freed": freed,
        }
        log.out.write(to_json(document))
        return 0
    verb = "would remove" if args.dry_run else "removed"
    for d in removed:
        log.info(f"{verb} {d.tarball.path} ({format_size(d.tarball.size)}): {d.reason}")
    for d in plan.decisions:
        if not d.remove:
            log.detail(f"kept {d.tarball.path}: {d.reason}")
    for path in plan.unrecognised:
        log.info(f"unrecognised, kept: {path}")
    log.info(
        f"{'would free' if args.dry_run else 'freed'} {format_size(freed)} in {len(removed)} tarballs "
        f"under {args.root} ({len(plan.decisions) - len(plan.removals)} kept)"
    )
    return 0


def _has_binpkgs(pkgdir: str) -> bool:
    for _dirpath, _dirnames, filenames in os.walk(pkgdir):
        if any(f.endswith((".gpkg.tar", ".xpak", ".tbz2")) for f in filenames):
            return True
    return False


def parse_size(text: str) -> int:
    """'8MiB', '8M', '512k' or '1048576' -> bytes (argparse type)."""
    match = re.fullmatch(r"\s*(\d+)\s*([kmg]?)(?:i?b)?\s*", text, re.IGNORECASE)
    if not match or int(match.group(1)) == 0:
        raise argparse.ArgumentTypeError(f"{text!r} is not a size such as 8MiB")
    return int(match.group(1)) << (10 * " kmg".index(match.group(2).lower() or " "))


def _positive_int(text: str) -> int:
    if not text.isdigit():
        raise argparse.ArgumentTypeError(f"{text!r} is not a whole number")
    return int(text)


class _HelpFormatter(argparse.RawDescriptionHelpFormatter):
    def __init__(self, prog: str) -> None:
        super().__init__(prog, max_help_position=30)


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="packdebug",
        formatter_class=_HelpFormatter,
        description="Pack Gentoo split debug info into seekable, reproducible .tar.xz for debuginfod.",
        epilog="Run `packdebug COMMAND --help` for each command. Start with `packdebug settings`.",
    )
    parser.add_argument(
        "--version", action="version", version=f"packdebug {__version__}"
    )
    common = argparse.ArgumentParser(add_help=False)
    noise = common.add_mutually_exclusive_group()
    noise.add_argument(
        "-v",
        "--verbose",
        action="store_const",
        const=1,
        dest="verbosity",
        default=0,
        help="say more: list each file",
    )
    noise.add_argument(
        "-q",
        "--quiet",
        action="store_const",
        const=-1,
        dest="verbosity",
        help="print only warnings and errors",
    )
    commands = parser.add_subparsers(dest="command", metavar="COMMAND")
    commands.required = True
    _add_pack(commands, common)
    _add_buildid(commands, common)
    _add_list(commands, common)
    _add_verify(commands, common)
    _add_extract(commands, common)
    _add_find(commands, common)
    _add_repack(commands, common)
    _add_prune(commands, common)
    _add_settings(commands, common)
    return parser


def _add_pack(commands, common) -> None:
    p = commands.add_parser(
        "pack",
        parents=[common],
        formatter_class=_HelpFormatter,
        help="pack one Portage image's debug info into a tarball",
        description="""\
Pack ${ED}/usr/src/debug and ${ED}/usr/lib/debug into
${ED}/usr/lib/debug/.tarball/${CATEGORY}/${PN}/${PF}-${BUILD_ID}-debug.tar.xz

Every input defaults from the Portage environment, so a bashrc hook needs no
arguments (see `packdebug settings --bashrc`).  BUILD_ID is read from the
environment, else from ${PORTAGE_BUILDDIR}/build-info/BUILD_ID; without one the
tarball is ${PF}-debug.tar.xz.

The tarball is one xz stream of independent blocks (debuginfod >= 0.192 seeks
in it), byte-identical for the same image (owner root, sorted names, modes
without setuid, mtimes clamped to SOURCE_DATE_EPOCH), and appears atomically.""",
        epilog="""\
examples:
  packdebug pack                       # inside a Portage phase hook
  packdebug pack --image /var/tmp/portage/app-misc/hello-1.0/image \\
      --category app-misc --pn hello --pf hello-1.0 --build-id 1
  packdebug pack --image ./image --output /tmp/hello-debug.tar.xz -v""",
    )
    inputs = p.add_argument_group(
        "inputs (default: the Portage variable of the same name)"
    )
    inputs.add_argument(
        "--image",
        metavar="D",
        help="image root, ${D} (default: ${ED}, or ${D}${EPREFIX})",
    )
    inputs.add_argument(
        "--eprefix",
        metavar="EPREFIX",
        help="offset prefix inside the image (default: ${EPREFIX})",
    )
    inputs.add_argument("--category", metavar="CATEGORY")
    inputs.add_argument("--pn", metavar="PN")
    inputs.add_argument("--pf", metavar="PF")
    inputs.add_argument(
        "--build-id",
        metavar="N",
        help="binpkg BUILD_ID (a number, not an ELF build-id)",
    )
    inputs.add_argument(
        "--output", metavar="FILE", help="write here instead of the .tarball path"
    )
    _add_compression(p)
    packing = p.add_argument_group("checks")
    packing.add_argument(
        "--strict",
        action="store_true",
        help="fail if a debug ELF has no build-id or cannot be read",
    )
    after = p.add_argument_group("afterwards")
    after.add_argument(
        "--remove-packed",
        action="store_true",
        help="delete the packed files from the image once the tarball is in place, and the "
        "directories that emptied (not one that was empty before, not .tarball)",
    )
    after.add_argument(
        "-n",
        "--dry-run",
        action="store_true",
        help="show what would be packed and removed; write nothing",
    )
    p.set_defaults(run=cmd_pack)


def _add_buildid(commands, common) -> None:
    p = commands.add_parser(
        "buildid",
        parents=[common],
        formatter_class=_HelpFormatter,
        help="print the GNU build-id of ELF files",
        description="Print `BUILDID  PATH` for each ELF file, reading only its headers and notes.\n"
        "Exits 1 if any file has no build-id.",
        epilog="example:\n  packdebug buildid /usr/bin/ls /usr/lib/debug/usr/bin/ls.debug",
    )
    p.add_argument("files", nargs="+", metavar="FILE")
    p.set_defaults(run=cmd_buildid)


def _add_compression(p: argparse.ArgumentParser) -> None:
    packing = p.add_argument_group("compression")
    packing.add_argument(
        "-j",
        "--jobs",
        type=_positive_int,
        default=0,
        metavar="N",
        help="compress on N threads (default: all CPUs); the output does not depend on it",
    )
    for level in range(10):
        packing.add_argument(
            f"-{level}",
            dest="preset",
            action="store_const",
            const=level,
            help=argparse.SUPPRESS,
        )
    packing.add_argument(
        "--preset",
        type=int,
        choices=range(10),
        default=6,
        metavar="0-9",
        help="xz preset, also -0 ... -9 (default: 6, as xz)",
    )
    packing.add_argument(
        "--block-size",
        type=parse_size,
        metavar="SIZE",
        help=f"largest uncompressed xz block (default: {BLOCK_SIZE // MiB}MiB; -7 to -9: their dictionary size)",
    )
    p.set_defaults(preset=6)


def _add_list(commands, common) -> None:
    p = commands.add_parser(
        "list",
        parents=[common],
        formatter_class=_HelpFormatter,
        help="list a tarball's members with their kind and build-id",
        description="""\
List each member: kind, size, build-id, name (-> link target).  Kinds follow
debuginfod: debuginfo, executable, source (any other file), symlink,
hardlink, directory, other.  Reads the tar headers and the ELF headers and
notes only, not whole files.""",
        epilog="""\
examples:
  packdebug list /usr/lib/debug/.tarball/app-misc/hello/hello-1.0-1-debug.tar.xz
  packdebug list --json T.tar.xz | jq '.members[] | select(.kind == "debuginfo")'""",
    )
    p.add_argument("tarball", metavar="TARBALL")
    p.add_argument("--json", action="store_true", help="print JSON instead of columns")
    p.set_defaults(run=cmd_list)


def _add_verify(commands, common) -> None:
    p = commands.add_parser(
        "verify",
        parents=[common],
        formatter_class=_HelpFormatter,
        help="check tarballs: xz checks, seekability, tar, build-ids, links, names",
        description="""\
Check each tarball and report, per tarball:
  xz         one stream, no padding, every block's check verified
  seekable   whether debuginfod >= 0.192 seeks in it, and if not, why
  tar        headers parse, members inside the data, end-of-archive marker
  build-ids  every ELF under usr/lib/debug has a GNU build-id
  links      every .build-id/xx/*.debug symlink resolves inside the archive,
             to an ELF with that build-id
  names      no absolute paths, '..', './' or '//'
Works on any .tar.xz, Portage's included.  Exits 0 only if all pass.""",
        epilog="""\
examples:
  packdebug verify T.tar.xz
  find /usr/lib/debug/.tarball -name '*.tar.xz' -exec packdebug verify {} +""",
    )
    p.add_argument("tarballs", nargs="+", metavar="TARBALL")
    p.set_defaults(run=cmd_verify)


def _add_extract(commands, common) -> None:
    p = commands.add_parser(
        "extract",
        parents=[common],
        formatter_class=_HelpFormatter,
        help="extract one file by build-id or name, or everything safely",
        description="""\
Extract one member, decompressing only the xz blocks that hold it (and its
tar header) and verifying their checks: nothing is written unless they pass.
Links inside the archive are followed.  Or extract everything under DIR,
refusing absolute names, '..', links leading outside DIR and device nodes,
and dropping setuid bits.""",
        epilog="""\
examples:
  packdebug extract T.tar.xz --build-id 1e0f33cff59b9ae1525e401b90e14e5cabc6c46b -o hello.debug
  packdebug extract T.tar.xz --member usr/src/debug/app-misc/hello-1.0/hello.c -o -
  packdebug extract T.tar.xz --all -C /tmp/debug""",
    )
    p.add_argument("tarball", metavar="TARBALL")
    which = p.add_mutually_exclusive_group(required=True)
    which.add_argument(
        "--build-id", metavar="ID", help="the ELF with this GNU build-id"
    )
    which.add_argument(
        "--member",
        metavar="PATH",
        help="the member of this name (./ or / prefix allowed)",
    )
    which.add_argument("--all", action="store_true", help="every member, under -C DIR")
    p.add_argument(
        "-o",
        "--output",
        metavar="FILE",
        help="write here, - for stdout (default: the member's basename)",
    )
    p.add_argument(
        "-C",
        "--directory",
        metavar="DIR",
        help="with --all: extract under DIR (created if missing)",
    )
    p.set_defaults(run=cmd_extract)


def _add_find(commands, common) -> None:
    p = commands.add_parser(
        "find",
        parents=[common],
        formatter_class=_HelpFormatter,
        help="which tarball holds a build-id",
        description="""\
Print `TARBALL  MEMBER` for the tarballs under ROOT that hold the ELF with
BUILDID.  It looks for estrip's usr/lib/debug/.build-id/xx/yyyy.debug link by
name, which in packdebug's layout reads only the start of a few xz blocks, and
confirms the ELF note; only if no tarball has the link does it read the ELF
notes of every member.  Exits 1 if no tarball holds it.""",
        epilog="example:\n  packdebug find 1e0f33cff59b9ae1525e401b90e14e5cabc6c46b",
    )
    p.add_argument("build_id", metavar="BUILDID")
    p.add_argument(
        "root",
        nargs="?",
        default="/" + TARBALL_DIR,
        metavar="ROOT",
        help=f"where the tarballs are (default: /{TARBALL_DIR})",
    )
    p.set_defaults(run=cmd_find)


def _add_repack(commands, common) -> None:
    p = commands.add_parser(
        "repack",
        parents=[common],
        formatter_class=_HelpFormatter,
        help="rewrite tarballs (Portage's too) in packdebug's seekable, reproducible layout",
        description="""\
Rewrite existing tarballs into packdebug's layout: seekable xz blocks,
canonical member names and order, reproducible headers.  The files inside
stay byte-identical; each tarball is replaced atomically under its own name.
One that fails verify's xz or tar checks is left untouched and reported; one
already in the layout is skipped unless --force.  A tarball with large xz
blocks is first decompressed into an unnamed temporary file beside it.""",
        epilog="""\
examples:
  packdebug repack --root /usr/lib/debug/.tarball --dry-run
  packdebug repack /usr/lib/debug/.tarball/dev-libs/foo/foo-1-3-debug.tar.xz""",
    )
    p.add_argument("tarballs", nargs="*", metavar="TARBALL")
    p.add_argument("--root", metavar="DIR", help="every *.tar.xz under DIR")
    p.add_argument(
        "--force",
        action="store_true",
        help="repack even tarballs already in the layout",
    )
    p.add_argument(
        "-n",
        "--dry-run",
        action="store_true",
        help="say what would change; write nothing",
    )
    _add_compression(p)
    p.set_defaults(run=cmd_repack)


def _add_prune(commands, common) -> None:
    p = commands.add_parser(
        "prune",
        parents=[common],
        formatter_class=_HelpFormatter,
        help="remove debug tarballs whose binary package is gone",
        description="""\
Portage keeps every debug tarball (UNINSTALL_IGNORE), owned by nothing.  prune
removes a tarball CAT/PN/PF[-BUILD_ID]-debug.tar.xz under ROOT only when all of
these hold:
  - its binary package is gone: PKGDIR/CAT/PN/PF-BUILD_ID.gpkg.tar or .xpak,
    or, without BUILD_ID, PKGDIR/CAT/PF.gpkg.tar or .tbz2;
  - it is not the debug info of the installed instance (VARDB/CAT/PF and its
    BUILD_ID);
  - it is older than --min-age days;
  - it is not among the --keep-newest newest of its CAT/PN (by version, then
    BUILD_ID), as clients may still run old binaries after an upgrade.
Then it removes the directories those removals emptied.  It never follows a
symlink, never touches anything but *-debug.tar.xz files under ROOT (nor a
pack's hidden temporary files), and lists names it cannot parse as
"unrecognised, kept".  Several prunes, or a prune beside a pack, can run at once.""",
        epilog="""\
examples:
  packdebug prune --pkgdir /var/cache/binpkgs --dry-run
  packdebug prune --pkgdir /var/cache/binpkgs --keep-newest 2 --min-age 30 --json""",
    )
    p.add_argument(
        "--root",
        default="/" + TARBALL_DIR,
        metavar="DIR",
        help=f"the tarballs (default: /{TARBALL_DIR})",
    )
    p.add_argument(
        "--pkgdir",
        default=BINPKG_DIR,
        metavar="DIR",
        help=f"Portage's PKGDIR (default: {BINPKG_DIR})",
    )
    p.add_argument(
        "--vardb",
        default="/var/db/pkg",
        metavar="DIR",
        help="installed packages (default: /var/db/pkg)",
    )
    p.add_argument(
        "--keep-newest",
        type=_positive_int,
        default=1,
        metavar="N",
        help="keep the N newest tarballs of each package whatever else (default: 1)",
    )
    p.add_argument(
        "--min-age",
        type=float,
        default=1.0,
        metavar="DAYS",
        help="keep tarballs younger than this (default: 1 day)",
    )
    p.add_argument(
        "-n", "--dry-run", action="store_true", help="print the plan; remove nothing"
    )
    p.add_argument("--json", action="store_true", help="print the result as JSON")
    p.set_defaults(run=cmd_prune)


def _add_settings(commands, common) -> None:
    p = commands.add_parser(
        "settings",
        parents=[common],
        formatter_class=_HelpFormatter,
        help="print the Portage settings that go with packdebug tarballs",
        description="""\
Print the Portage settings a binhost needs beside packdebug tarballs, each
with a comment saying where it must go and why; or, with --bashrc, a hook
that packs every merged package; or, with --debuginfod, the server side: the
debuginfod command line, a hardened systemd unit, and the clients' line.""",
        epilog="""\
examples:
  packdebug settings >> /etc/portage/make.conf
  packdebug settings --bashrc >> /etc/portage/bashrc
  packdebug settings --format json
  packdebug settings --debuginfod --listen 0.0.0.0:8002 --pkgdir /var/cache/binpkgs""",
    )
    p.add_argument(
        "--format",
        choices=("make.conf", "shell", "json"),
        default="make.conf",
        help="make.conf lines (default), `export` lines for eval in a bashrc, or JSON",
    )
    p.add_argument(
        "--dedup",
        action="store_true",
        help="also keep the debug info out of the binhost's own disk (see the comments)",
    )
    p.add_argument(
        "--bashrc",
        action="store_true",
        help="print an /etc/portage/bashrc hook that runs `packdebug pack`",
    )
    server = p.add_argument_group("the debuginfod side")
    server.add_argument(
        "--debuginfod",
        action="store_true",
        help="print the debuginfod command line, a systemd unit and DEBUGINFOD_URLS",
    )
    server.add_argument(
        "--listen",
        type=parse_listen,
        default=parse_listen(DEBUGINFOD_LISTEN),
        metavar="ADDR:PORT",
        help=f"where debuginfod listens (default: {DEBUGINFOD_LISTEN})",
    )
    server.add_argument(
        "--root",
        default="/" + TARBALL_DIR,
        metavar="DIR",
        help=f"the tarballs (default: /{TARBALL_DIR})",
    )
    server.add_argument(
        "--pkgdir",
        default=BINPKG_DIR,
        metavar="DIR",
        help=f"the binary packages (default: {BINPKG_DIR})",
    )
    server.add_argument(
        "--database",
        default=DEBUGINFOD_DATABASE,
        metavar="FILE",
        help=f"debuginfod's sqlite database for the command line (default: {DEBUGINFOD_DATABASE})",
    )
    server.add_argument(
        "--debuginfod-version",
        metavar="X.Y",
        help="write for this elfutils (default: ask `debuginfod --version`)",
    )
    p.set_defaults(run=cmd_settings)


class _Terminated(BaseException):
    """SIGTERM, raised in the main thread so that cleanups run."""


def _on_sigterm(signum, frame):
    raise _Terminated()


def main(argv: Sequence[str] | None = None) -> int:
    parser = build_parser()
    args = parser.parse_args(argv)
    log = Log(args.verbosity)
    previous = signal.signal(signal.SIGTERM, _on_sigterm)
    try:
        return args.run(args, log)
    except PackdebugError as e:
        print(f"packdebug: error: {e}", file=sys.stderr)
        return e.exit_code
    except KeyboardInterrupt:
        print("packdebug: interrupted; nothing was written", file=sys.stderr)
        return 130
    except _Terminated:
        print("packdebug: terminated; nothing was written", file=sys.stderr)
        return 143
    except BrokenPipeError:
        sys.stderr.close()  # the reader went away (`| head`); not an error of ours
        return 141
    finally:
        signal.signal(signal.SIGTERM, previous)


if __name__ == "__main__":
    sys.exit(main())
