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
    packdebug list TARBALL... [--json]
    packdebug verify TARBALL...
    packdebug extract TARBALL (--build-id ID | --member PATH) [-o FILE|-]
    packdebug extract TARBALL --all -C DIR
    packdebug find BUILDID [ROOT|TARBALL]...
    packdebug repack (TARBALL... | --root DIR) [--force] [--dry-run]
    packdebug prune --pkgdir DIR [--root DIR] [--vardb DIR] [--dry-run]
    packdebug settings [--format make.conf|shell|json] [--dedup] [--bashrc]
    packdebug settings --debuginfod [--listen ADDR:PORT]

From /etc/portage/bashrc (print a ready hook with `packdebug settings --bashrc`).

The file is self-contained (standard library only, Python >= 3.9) and also
importable: `import packdebug`, then `packdebug.pack(request, options, log)`.

Parts, each depending only on those above it: helpers and errors; 1. ELF
notes; 2. xz container; 3. tar member collection; 4. packing; 5. reading and
extraction; 6. binhost upkeep (repack, prune, settings); 7. command line.
"""

from __future__ import annotations

if __name__ == "__main__":
    # Until main() takes over, Ctrl-C ends the program quietly: a SIGINT while
    # the modules below load must not print a KeyboardInterrupt traceback.
    # _signal is built in; the signal module would first import enum.
    import _signal

    _signal.signal(_signal.SIGINT, _signal.SIG_DFL)

import argparse
import bisect
import collections
import contextlib
import dataclasses
import errno
import functools
import io
import lzma
import math
import os
import queue
import re
import shlex
import signal
import stat
import struct
import sys
import tarfile
import threading
import time
import zlib
from collections.abc import Callable, Iterable, Iterator, Mapping, Sequence

__version__ = "0.2.0"

# Paths inside an image (${ED}), as Portage's __generate_packdebug uses them.
SOURCE_DIR = "usr/src/debug"
DEBUG_DIR = "usr/lib/debug"
DEBUG_TREES = (SOURCE_DIR, DEBUG_DIR)  # sources first, as Portage
BUILD_ID_DIR = DEBUG_DIR + "/.build-id"  # estrip's links, by build-id
TARBALL_DIR = DEBUG_DIR + "/.tarball"  # Portage's PACKDEBUG_PATH, relative
TARBALL_SUFFIX = "-debug.tar.xz"
# Binary packages, as Portage 3.0.83's bintree names them (getname_build_id):
# with a BUILD_ID under CAT/PN/, without one under CAT/.
BINPKG_SUFFIXES_MULTI = (".gpkg.tar", ".xpak")
BINPKG_SUFFIXES_SINGLE = (".gpkg.tar", ".tbz2")
# Portage's small files, read whole: a larger one is not what it claims.
BUILD_ID_FILE_LIMIT = 4 * 1024
PACKAGES_LIMIT = 1 << 30  # PKGDIR/Packages: about 1 KiB per binpkg

# Portage variables read by `pack`, with the flag that overrides each.
PORTAGE_INPUTS = {
    "ED": "--image",
    "CATEGORY": "--category",
    "PN": "--pn",
    "PF": "--pf",
    "BUILD_ID": "--build-id",
}

KiB, MiB = 1 << 10, 1 << 20
READ_CHUNK = 1 * MiB  # unit of file reads and copies

# ---------------------------------------------------------------------------
# Helpers
# ---------------------------------------------------------------------------


def round_up(n: int, multiple: int = 4) -> int:
    return -(-n // multiple) * multiple


def plural(count: int, noun: str, plural_form: str = "") -> str:
    """'1 block', '2 blocks'."""
    return f"{count} {noun if count == 1 else plural_form or noun + 's'}"


def format_size(n: float) -> str:
    """1536 -> '1.5 KiB', as xz -l prints sizes."""
    for unit in ("B", "KiB", "MiB", "GiB"):
        if abs(n) < 1024 or unit == "GiB":
            return f"{n:.0f} {unit}" if unit == "B" else f"{n:.1f} {unit}"
        n /= 1024
    raise AssertionError("unreachable")


_ESCAPES = {"\\": "\\\\", "\n": "\\n", "\t": "\\t", "\r": "\\r"}


def shown(name: str | bytes | os.PathLike) -> str:
    """A file or member name fit for one line of output, as `ls -b` shows it.

    Printable characters stay; a backslash, a control character or a byte
    that is not UTF-8 becomes a C escape (\\n, \\t, \\377), so a hostile name
    can neither break a listing's rows nor smuggle terminal escapes.
    """
    name = os.fspath(name)
    if isinstance(name, bytes):
        name = name.decode("utf-8", "surrogateescape")
    if name.isprintable() and "\\" not in name:
        return name
    out = []
    for char in name:
        if char in _ESCAPES:
            out.append(_ESCAPES[char])
        elif char.isprintable() and not 0xDC80 <= ord(char) <= 0xDCFF:
            out.append(char)
        else:
            raw = char.encode("utf-8", "surrogateescape")
            out.append("".join(f"\\{byte:03o}" for byte in raw))
    return "".join(out)


class Terminated(BaseException):
    """SIGTERM, raised in the main thread so that cleanups run."""


class _Signals:
    """How SIGINT and SIGTERM are answered: as exceptions, held back in `signals_held`."""

    held = 0  # depth of signals_held()
    pending: int | None = None
    worker = working = False  # in a worker process; running a task there
    stopping = False  # a signal was answered, or main has its outcome


def on_signal(signum: int, frame) -> None:
    """SIGINT raises KeyboardInterrupt, SIGTERM Terminated, so that cleanups run.

    Only the first: a second Ctrl-C must not cut the cleanups the first one
    started (a temporary file's removal), nor hit main's closing message.
    """
    if _Signals.stopping:
        return
    if _Signals.held:
        _Signals.pending = signum
        return
    if _Signals.worker and not _Signals.working:
        os._exit(128 + signum)  # an idle worker has nothing to clean up
    raise _stop(signum)


def _stop(signum: int) -> BaseException:
    """The exception that answers a signal; later ones are ignored."""
    _Signals.stopping = True
    return KeyboardInterrupt() if signum == signal.SIGINT else Terminated()


@contextlib.contextmanager
def signals_held() -> Iterator[None]:
    """Hold SIGINT and SIGTERM back while a temporary file is made and recorded.

    Otherwise a signal answered between the file's creation and the
    statement that records it would leave it behind.
    """
    _Signals.held += 1
    try:
        yield
    finally:
        _Signals.held -= 1
        if not _Signals.held and _Signals.pending is not None:
            signum, _Signals.pending = _Signals.pending, None
            raise _stop(signum)


def to_json(document: object) -> str:
    """JSON for --json and --format json; json is imported only then."""
    import json

    return json.dumps(document, indent=2) + "\n"


# ---------------------------------------------------------------------------
# Errors and messages
# ---------------------------------------------------------------------------


class PackdebugError(Exception):
    """Base of every error packdebug reports; the CLI prints it and exits 1.

    Like OSError's filename, `path` names the file the error is about (or
    None), `reason` says what is wrong with it, and `hint` what to do.
    """

    exit_code = 1

    def __init__(self, reason: str, path=None, hint: str = "") -> None:
        super().__init__(reason, path, hint)
        self.reason, self.path, self.hint = reason, path, hint

    def __str__(self) -> str:
        where = f"{shown(self.path)}: " if self.path is not None else ""
        return where + self.reason + (f"; {self.hint}" if self.hint else "")

    def at(self, path) -> PackdebugError:
        """This error, about `path` if it names no file yet."""
        if self.path is None:
            self.path = path
        return self


class UsageError(PackdebugError):
    """A missing or malformed input; the CLI exits 2 as for a usage error."""

    exit_code = 2


class InputError(PackdebugError):
    """An input that cannot be read, or is not a regular file or directory."""


class ElfError(PackdebugError):
    """A file that looks like ELF but whose headers or notes are broken."""


class XzError(PackdebugError):
    """An xz file that does not follow the xz format, or fails its checks."""


class ArchiveError(PackdebugError):
    """A tar archive that is malformed, or a member that cannot be found."""


class PackError(PackdebugError):
    """Packing failed: unreadable input, a file changed, or no space left."""


class UnsafeTreeError(PackError):
    """A directory of the image changed under packdebug, or is a symlink."""


class OutputError(PackdebugError):
    """An output file or directory could not be written."""


class ExtractError(ArchiveError):
    """`extract --all` could not extract a member; `member` names it."""

    def __init__(self, member: str, reason: str, path=None) -> None:
        super().__init__(f"member '{shown(member)}': {reason}", path)
        self.member = member


# Refusals of `extract --all`, after tarfile's PEP 706 filter errors: each
# is a member that would escape the directory, or harm what is in it.
class AbsolutePathError(ExtractError):
    """A member name that starts with '/'."""


class OutsideDestinationError(ExtractError):
    """A member name with a '..' component."""


class AbsoluteLinkError(ExtractError):
    """A symlink to an absolute path."""


class LinkOutsideDestinationError(ExtractError):
    """A symlink or hardlink whose target is, or may become, outside."""


class SpecialFileError(ExtractError):
    """A device, FIFO or other member that is neither file, directory nor link."""


class HardlinkTargetError(ExtractError):
    """A hardlink to a member that is missing, later, or a directory."""


class BadNameError(ExtractError):
    """A name with a NUL byte, or that names the directory itself."""


class TypeConflictError(ExtractError):
    """A member whose name is taken by an entry of another kind."""


class NameTooLongError(ExtractError):
    """A name or link target too long for the file system."""


@dataclasses.dataclass(frozen=True, eq=False)
class NameProblem:
    """Why a member name is not as packdebug writes names; test by identity."""

    text: str


ABSOLUTE_NAME = NameProblem("absolute path")
DOTDOT_NAME = NameProblem("'..' component")
DOT_SLASH_NAME = NameProblem("leading './'")
DOT_NAME = NameProblem("'.' component")
EMPTY_COMPONENT = NameProblem("'//'")
ESCAPING_NAMES = (ABSOLUTE_NAME, DOTDOT_NAME)


def name_problems(name: str) -> list[NameProblem]:
    """Why a member name is not clean, as packdebug writes names."""
    problems = []
    if name.startswith("/"):
        problems.append(ABSOLUTE_NAME)
    parts = name.rstrip("/").split("/")
    if ".." in parts:
        problems.append(DOTDOT_NAME)
    if name.startswith("./"):
        problems.append(DOT_SLASH_NAME)
    elif "." in parts:
        problems.append(DOT_NAME)
    if "//" in name.lstrip("/"):
        problems.append(EMPTY_COMPONENT)
    return problems


def normalize_name(name: str) -> str:
    """A member name as debuginfod and tar resolve it: no '.', '', or '/'."""
    return "/".join(p for p in name.split("/") if p not in ("", "."))


class Log:
    """Messages for the user: results on stdout, warnings on stderr.

    verbosity -1 (-q) keeps only warnings and errors; 1 (-v) adds details.
    A report that cannot be written (stdout on a full disk) is remembered in
    `report_error` and the rest of the report dropped, so that a job that is
    done is not failed by its report; the CLI decides what that means.
    """

    def __init__(self, verbosity: int = 0, out=None, err=None) -> None:
        self.verbosity = verbosity
        self.out = out or sys.stdout
        self.err = err or sys.stderr
        self.report_error: OSError | None = None

    def write(self, text: str) -> None:
        """Write report text to stdout, as it is (no newline added)."""
        if self.report_error is not None:
            return
        try:
            self.out.write(text)
            self.out.flush()
        except BrokenPipeError:
            raise
        except OSError as e:
            self.report_error = e

    def info(self, message: str) -> None:
        if self.verbosity >= 0:
            self.write(message + "\n")

    def detail(self, message: str) -> None:
        if self.verbosity > 0:
            self.write(message + "\n")

    def warning(self, message: str) -> None:
        with contextlib.suppress(OSError):
            print(f"packdebug: warning: {message}", file=self.err, flush=True)


def open_beneath(
    root_fd: int, parts: Sequence[str], *, create: bool = False, created=None
) -> int:
    """Open the directory root/parts... without following any symlink on the way.

    With `create`, missing directories are made 0755 (as install -d does)
    and their part lists appended to `created`, for undoing.
    """
    fd = os.dup(root_fd)
    try:
        for depth, part in enumerate(parts):
            made = False
            if create:
                with contextlib.suppress(FileExistsError):
                    os.mkdir(part, 0o755, dir_fd=fd)
                    made = True
            child = os.open(
                part,
                os.O_RDONLY | os.O_DIRECTORY | os.O_NOFOLLOW | os.O_CLOEXEC,
                dir_fd=fd,
            )
            os.close(fd)
            fd = child
            if made:
                os.fchmod(fd, 0o755)  # whatever the umask
                if created is not None:
                    created.append(list(parts[: depth + 1]))
    except BaseException:
        os.close(fd)
        raise
    return fd


def remove_beneath(root_fd: int, created: Sequence[Sequence[str]]) -> None:
    """rmdir the directories open_beneath created, deepest first, if still empty."""
    for parts in sorted(created, key=len, reverse=True):
        with contextlib.suppress(OSError):
            parent = open_beneath(root_fd, parts[:-1])
            try:
                os.rmdir(parts[-1], dir_fd=parent)
            finally:
                os.close(parent)


# ---------------------------------------------------------------------------
# 1. ELF notes (System V gABI, "ELF Header", "Program Header", "Sections",
#    "Note Section"; elfutils' gelf_getnote for 8-byte aligned notes)
# ---------------------------------------------------------------------------

ELF_MAGIC = b"\x7fELF"
EI_CLASS, EI_DATA = 4, 5
ELFCLASS32, ELFCLASS64 = 1, 2
ELFDATA2LSB, ELFDATA2MSB = 1, 2
ET_EXEC, ET_DYN = 2, 3
PT_NOTE = 4
SHT_PROGBITS, SHT_SYMTAB, SHT_NOTE, SHT_NOBITS = 1, 2, 7, 8
SHF_ALLOC = 0x2
SHN_XINDEX = PN_XNUM = 0xFFFF
NT_GNU_BUILD_ID = 3
DEBUG_SECTION_PREFIXES = (b".debug_", b".zdebug_")  # debuginfod.cxx elf_classify

# The fields packdebug reads of each structure; struct pad bytes (x) skip
# the others.  ELF32 and ELF64 differ in field sizes and, for program
# headers, in field order.  The tables' entries (millions, in a hostile
# file) are plain tuples of these fields, unpacked under these names; a
# program header gives (p_type, p_offset, p_filesz, p_align).
Elf_Ehdr = collections.namedtuple(
    "Elf_Ehdr",
    "e_type e_machine e_version e_entry e_phoff e_shoff e_flags e_ehsize"
    " e_phentsize e_phnum e_shentsize e_shnum e_shstrndx",
)
Elf_Shdr = collections.namedtuple(
    "Elf_Shdr",
    "sh_name sh_type sh_flags sh_offset sh_size sh_link sh_info sh_addralign",
)
_ELF_FORMATS = {  # e_ident[EI_CLASS]: (Elf_Ehdr, program header, Elf_Shdr)
    ELFCLASS32: ("16xHHIIIIIHHHHHH", "II8xI8xI", "III4xIIIII4x"),
    ELFCLASS64: ("16xHHIQQQIHHHHHH", "I4xQ16xQ8xQ", "IIQ8xQQIIQ8x"),
}

NOTE_REGION_LIMIT = 1 * MiB  # a larger note region holds no build-id note
NOTE_REGIONS_MAX = 256  # real files have a handful; more is hostile
STRTAB_LIMIT = 16 * MiB
TABLE_CHUNK = 64 * KiB  # header tables are read this much at a time


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


class ElfFile:
    """Bounds-checked reads of one ELF file's headers through read_at(offset, size).

    Header tables are read in chunks of TABLE_CHUNK bytes and parsed one
    entry at a time, so memory stays bounded whatever e_phnum or e_shnum
    claim, and at most NOTE_REGIONS_MAX note regions are read.
    """

    def __init__(self, read_at: ReadAt, size: int) -> None:
        self.read_at, self.size = read_at, size
        ident = self.read(0, 16, "ELF identification")
        if ident[:4] != ELF_MAGIC:
            raise ElfError("not an ELF file")
        if ident[EI_CLASS] not in _ELF_FORMATS or ident[EI_DATA] not in (
            ELFDATA2LSB,
            ELFDATA2MSB,
        ):
            raise ElfError(
                f"unknown ELF class {ident[EI_CLASS]} or data encoding {ident[EI_DATA]}"
            )
        self.endian = "<" if ident[EI_DATA] == ELFDATA2LSB else ">"
        self.ehdr_format, self.phdr_format, self.shdr_format = (
            struct.Struct(self.endian + f) for f in _ELF_FORMATS[ident[EI_CLASS]]
        )
        self.note_regions = 0

    def read(self, offset: int, size: int, what: str) -> bytes:
        if offset < 0 or size < 0 or offset + size > self.size:
            raise ElfError(
                f"{what} at offset {offset} runs past the end of the file "
                f"({self.size} bytes): truncated or corrupt ELF"
            )
        data = self.read_at(offset, size)
        if len(data) != size:
            raise ElfError(f"short read of {what} at offset {offset}")
        return data

    def ehdr(self) -> Elf_Ehdr:
        return Elf_Ehdr._make(
            self.ehdr_format.unpack(self.read(0, self.ehdr_format.size, "ELF header"))
        )

    def table(
        self, offset: int, count: int, entsize: int, layout: struct.Struct, what: str
    ) -> Iterator[tuple]:
        """The raw entries of a header table, read chunk by chunk."""
        if count and entsize < layout.size:
            raise ElfError(f"{what} entry size {entsize} is too small")
        self.read(offset, 0, what)  # the table must start inside the file
        if count * entsize > self.size - offset:
            raise ElfError(
                f"{what} of {count} entries runs past the end of the file: "
                "truncated or corrupt ELF"
            )
        per_chunk = max(1, TABLE_CHUNK // max(entsize, 1))
        for first in range(0, count, per_chunk):
            n = min(per_chunk, count - first)
            chunk = self.read(offset + first * entsize, n * entsize, what)
            if entsize == layout.size:
                yield from layout.iter_unpack(chunk)
            else:
                yield from (layout.unpack_from(chunk, i * entsize) for i in range(n))

    def phdrs(self, ehdr: Elf_Ehdr, phnum: int) -> Iterator[tuple]:
        """(p_type, p_offset, p_filesz, p_align) of each program header."""
        if not ehdr.e_phoff:
            return iter(())
        return self.table(
            ehdr.e_phoff,
            phnum,
            ehdr.e_phentsize,
            self.phdr_format,
            "program header table",
        )

    def shdrs(self, ehdr: Elf_Ehdr, shnum: int) -> Iterator[tuple]:
        """The Elf_Shdr fields of each section header, as plain tuples (millions may come)."""
        return self.table(
            ehdr.e_shoff,
            shnum,
            ehdr.e_shentsize,
            self.shdr_format,
            "section header table",
        )

    def shdr(self, ehdr: Elf_Ehdr, index: int) -> Elf_Shdr:
        """One section header: 0 holds the real counts under extended numbering."""
        if ehdr.e_shentsize < self.shdr_format.size:
            raise ElfError(f"section header entry size {ehdr.e_shentsize} is too small")
        offset = ehdr.e_shoff + index * ehdr.e_shentsize
        data = self.read(offset, self.shdr_format.size, f"section header {index}")
        return Elf_Shdr._make(self.shdr_format.unpack(data))

    def build_id_in(self, offset: int, size: int, align: int, what: str) -> str | None:
        """The build-id of a note region, if it holds one."""
        if not 0 < size <= NOTE_REGION_LIMIT:
            return None
        self.note_regions += 1
        if self.note_regions > NOTE_REGIONS_MAX:
            raise ElfError(f"more than {NOTE_REGIONS_MAX} note regions: corrupt ELF")
        try:
            return build_id_of_notes(self.read(offset, size, what), align, self.endian)
        except ElfError as e:
            raise ElfError(f"{what}: {e.reason}") from None


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
        desc_at = round_up(name_at + namesz, pad)
        if desc_at + descsz > len(data):
            raise ElfError("note runs past the end of its section")
        yield (
            data[name_at : name_at + namesz],
            note_type,
            data[desc_at : desc_at + descsz],
        )
        pos = round_up(desc_at + descsz, pad)


def build_id_of_notes(data: bytes, align: int, endian: str) -> str | None:
    """The NT_GNU_BUILD_ID descriptor of a note region, as lowercase hex."""
    for name, note_type, desc in iter_notes(data, align, endian):
        if note_type == NT_GNU_BUILD_ID and name.rstrip(b"\0") == b"GNU" and desc:
            return desc.hex()
    return None


def read_elf(
    read_at: ReadAt, size: int, name=None, *, sections: bool = True
) -> ElfInfo:
    """Parse the ELF headers and notes reachable through read_at.

    Reads the program headers first (their PT_NOTE is near the start of the
    file), then the section headers and section names when `sections` is
    set or no PT_NOTE held a build-id.  Never reads section contents other
    than notes and the section name table.
    """
    try:
        elf = ElfFile(read_at, size)
        ehdr = elf.ehdr()
        shnum, shstrndx, phnum = ehdr.e_shnum, ehdr.e_shstrndx, ehdr.e_phnum
        if ehdr.e_shoff and (shnum == 0 or shstrndx == SHN_XINDEX or phnum == PN_XNUM):
            section0 = elf.shdr(ehdr, 0)  # gABI extended numbering
            shnum = shnum or section0.sh_size
            shstrndx = section0.sh_link if shstrndx == SHN_XINDEX else shstrndx
            phnum = section0.sh_info if phnum == PN_XNUM else phnum
        build_id = None
        for p_type, p_offset, p_filesz, p_align in elf.phdrs(ehdr, phnum):
            if p_type == PT_NOTE:
                build_id = elf.build_id_in(
                    p_offset, p_filesz, p_align, "PT_NOTE segment"
                )
                if build_id:
                    break
        if not ehdr.e_shoff or not (sections or build_id is None):
            return ElfInfo(build_id, ehdr.e_type)
        return _classify_sections(elf, ehdr, shnum, shstrndx, build_id)
    except ElfError as e:
        raise e.at(name) from None


def _section_names(elf: ElfFile, ehdr: Elf_Ehdr, shnum: int, shstrndx: int) -> bytes:
    if not 0 < shstrndx < shnum:
        return b""
    strtab = elf.shdr(ehdr, shstrndx)
    if strtab.sh_type == SHT_NOBITS or strtab.sh_size > STRTAB_LIMIT:
        return b""
    return elf.read(strtab.sh_offset, strtab.sh_size, "section name table")


def _classify_sections(
    elf: ElfFile, ehdr: Elf_Ehdr, shnum: int, shstrndx: int, build_id: str | None
) -> ElfInfo:
    """ElfInfo from the section headers, one at a time (elf_classify's tests)."""
    names = _section_names(elf, ehdr, shnum, shstrndx)
    debug = symtab = alloc_progbits = other_alloc = False
    sections = elf.shdrs(ehdr, shnum)
    next(sections, None)  # section 0 is reserved
    for sh_name, sh_type, sh_flags, sh_offset, sh_size, _, _, sh_addralign in sections:
        if not debug and names.startswith(DEBUG_SECTION_PREFIXES, sh_name):
            debug = True
        if sh_type == SHT_SYMTAB:
            symtab = True
        elif sh_type == SHT_NOTE and build_id is None:
            build_id = elf.build_id_in(
                sh_offset, sh_size, sh_addralign, "SHT_NOTE section"
            )
        if sh_flags & SHF_ALLOC:
            alloc_progbits = alloc_progbits or sh_type == SHT_PROGBITS
            other_alloc = other_alloc or sh_type not in (SHT_NOBITS, SHT_NOTE)
    return ElfInfo(build_id, ehdr.e_type, debug, symtab, alloc_progbits, other_alloc)


def open_regular(path, what: str = "file") -> int:
    """A read-only descriptor of a regular file; anything else is an InputError.

    O_NONBLOCK keeps a FIFO from blocking the open; the file's kind is then
    checked on the descriptor itself, so it cannot change in between.
    """
    flags = os.O_RDONLY | os.O_NONBLOCK | os.O_NOCTTY | os.O_CLOEXEC
    try:
        fd = os.open(path, flags)
    except OSError as e:
        raise InputError(f"cannot open the {what}: {e.strerror}", path) from None
    mode = os.fstat(fd).st_mode
    if not stat.S_ISREG(mode):
        os.close(fd)
        raise InputError(f"is {file_kind(mode)}, not a regular {what}", path)
    os.set_blocking(fd, True)
    return fd


def read_small_file(path: str, what: str, limit: int) -> bytes | None:
    """The whole of a small regular file; None if there is none.

    Anything but a regular file (a FIFO would block, /dev/zero never ends),
    or one over `limit` bytes, is an InputError.
    """
    try:
        fd = open_regular(path, what)
    except InputError:
        if not os.path.lexists(path):
            return None
        raise
    with open(fd, "rb") as f:
        data = f.read(limit + 1)
    if len(data) > limit:
        raise InputError(f"is larger than a {what} can be ({format_size(limit)})", path)
    return data


def is_decimal(text: str) -> bool:
    """ASCII digits only: str.isdigit() also takes '²', which int() refuses."""
    return text.isascii() and text.isdigit()


def file_kind(mode: int) -> str:
    """'a directory', 'a FIFO', ... for messages."""
    kinds = {
        stat.S_IFDIR: "a directory",
        stat.S_IFCHR: "a character device",
        stat.S_IFBLK: "a block device",
        stat.S_IFIFO: "a FIFO",
        stat.S_IFSOCK: "a socket",
        stat.S_IFLNK: "a symlink",
        stat.S_IFREG: "a regular file",
    }
    return kinds.get(stat.S_IFMT(mode), "a special file")


def read_elf_file(path, *, sections: bool = False) -> ElfInfo | None:
    """ElfInfo of the file at `path`, or None if it is not ELF at all."""
    fd = open_regular(path)
    try:
        size = os.fstat(fd).st_size
        if os.pread(fd, 4, 0) != ELF_MAGIC:
            return None
        return read_elf(
            lambda offset, n: os.pread(fd, n, offset), size, path, sections=sections
        )
    except OSError as e:
        raise InputError(f"cannot read: {e.strerror}", path) from None
    finally:
        os.close(fd)


def read_build_id(path) -> str | None:
    """The GNU build-id of an ELF file as lowercase hex, or None."""
    info = read_elf_file(path)
    return info.build_id if info else None


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
    256 * KiB,
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
# Compressor memory per thread (xz(1), "Presets", CompMem), for -j's budget.
PRESET_ENCODER_MEMORY = tuple(
    n * MiB for n in (3, 9, 17, 32, 48, 94, 94, 186, 370, 674)
)
DECODER_MEMLIMIT = 512 * MiB  # refuses hostile dictionary sizes
# Beyond these a file is hostile (a sparse file can claim anything): an Index
# this large lists about a million Blocks, and real Stream Padding is a few
# bytes, for alignment.
INDEX_LIMIT = 16 * MiB
PADDING_LIMIT = 64 * MiB
# What other compressors' files start with, to name them in errors.
OTHER_MAGIC = (
    (b"\x1f\x8b", "gzip"),
    (b"BZh", "bzip2"),
    (b"\x28\xb5\x2f\xfd", "zstd"),
    (b"\x04\x22\x4d\x18", "lz4"),
    (b"LZIP", "lzip"),
    (b"\x89LZO", "lzop"),
    (b"\x5d\x00\x00", "lzma (xz --format=lzma)"),
)


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
        return self.offset + round_up(self.unpadded_size)

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


def create_stream_flags(check: int) -> bytes:
    """Stream Flags (2.1.1.2): a null byte, then the Check ID."""
    return bytes((0, check))


def parse_stream_flags(flags: bytes) -> int:
    if flags[0] or flags[1] & 0xF0:
        raise XzError("unsupported Stream Flags (reserved bits are set)")
    return flags[1]


def create_stream_header(check: int) -> bytes:
    """Stream Header (2.1.1): magic, Stream Flags, CRC32 of the flags."""
    flags = create_stream_flags(check)
    return HEADER_MAGIC + flags + struct.pack("<I", zlib.crc32(flags))


def parse_stream_header(buf: bytes) -> int:
    """Check a Stream Header; return its Check ID."""
    if len(buf) != STREAM_HEADER_SIZE or buf[:6] != HEADER_MAGIC:
        raise XzError("no xz Stream Header where one must start")
    if struct.unpack("<I", buf[8:12])[0] != zlib.crc32(buf[6:8]):
        raise XzError("Stream Header CRC32 does not match")
    return parse_stream_flags(buf[6:8])


def create_stream_footer(check: int, index_size: int) -> bytes:
    """Stream Footer (2.1.2): CRC32, Backward Size, Stream Flags, magic."""
    body = struct.pack("<I", index_size // 4 - 1) + create_stream_flags(check)
    return struct.pack("<I", zlib.crc32(body)) + body + FOOTER_MAGIC


def parse_stream_footer(buf: bytes) -> tuple[int, int]:
    """Check a Stream Footer; return (Check ID, size of the Index)."""
    if len(buf) != STREAM_FOOTER_SIZE or buf[10:] != FOOTER_MAGIC:
        raise XzError("no xz Stream Footer at the end: truncated")
    if struct.unpack("<I", buf[:4])[0] != zlib.crc32(buf[4:10]):
        raise XzError("Stream Footer CRC32 does not match")
    backward_size = (struct.unpack("<I", buf[4:8])[0] + 1) * 4
    return parse_stream_flags(buf[8:10]), backward_size


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
    if round_up(pos) != len(buf) - 4 or any(buf[pos:-4]):
        raise XzError("Index size does not match its record count")
    return records


def block_filters(preset: int, size: int) -> list[dict]:
    """LZMA2 at `preset` (| lzma.PRESET_EXTREME), the dictionary shrunk to the block."""
    level = preset & ~lzma.PRESET_EXTREME
    dict_size = min(PRESET_DICT_SIZE[level], max(4096, 1 << (size - 1).bit_length()))
    return [{"id": lzma.FILTER_LZMA2, "preset": preset, "dict_size": dict_size}]


def encode_block(
    chunks: Iterable[bytes | memoryview],
    size: int,
    write: Callable[[memoryview], object],
    preset: int = 6,
    check: int = CHECK_CRC64,
) -> IndexRecord:
    """Compress `size` bytes, arriving in `chunks`, into one xz Block, written as it comes.

    The stdlib cannot write a bare Block, so liblzma writes a one-Block
    Stream and the Block is cut out of it: its Stream Header is dropped from
    the first output, its Index and Stream Footer (which come only with the
    final flush) from the last.  liblzma's output does not depend on how its
    input is cut, so streamed or whole, a payload gives the same bytes.  lzma
    releases the GIL, so threads compress Blocks in parallel; on the main
    thread, Ctrl-C waits for one chunk (files are read READ_CHUNK at a time).
    """
    encoder = lzma.LZMACompressor(
        lzma.FORMAT_XZ, check=check, filters=block_filters(preset, size)
    )
    header = STREAM_HEADER_SIZE  # bytes of Stream Header still to drop
    written = fed = 0

    def emit(out: bytes) -> None:
        nonlocal header, written
        dropped = min(header, len(out))
        header -= dropped
        if len(out) > dropped:
            write(memoryview(out)[dropped:])
            written += len(out) - dropped

    for chunk in chunks:
        fed += len(chunk)
        emit(encoder.compress(chunk))
    tail = encoder.flush()
    _, index_size = parse_stream_footer(tail[-STREAM_FOOTER_SIZE:])
    (record,) = parse_index(
        tail[-STREAM_FOOTER_SIZE - index_size : -STREAM_FOOTER_SIZE]
    )
    emit(tail[: -STREAM_FOOTER_SIZE - index_size])
    if written != round_up(record.unpadded_size) or not (
        record.uncompressed_size == size == fed
    ):
        raise XzError("liblzma wrote a Block of unexpected size")
    return record


def compress_block(
    data: bytes, preset: int = 6, check: int = CHECK_CRC64
) -> tuple[bytearray, IndexRecord]:
    """Compress `data` into one xz Block (header, data, padding, check)."""
    block = bytearray()
    record = encode_block((data,), len(data), block.extend, preset, check)
    return block, record


class XzStreamWriter:
    """Writes exactly one xz Stream, Block by Block, with no Stream Padding."""

    def __init__(self, fileobj, check: int = CHECK_CRC64) -> None:
        self.fileobj, self.check = fileobj, check
        self.records: list[IndexRecord] = []
        self.size = 0
        self._write(create_stream_header(check))

    def _write(self, data: bytes | memoryview) -> None:
        self.fileobj.write(data)
        self.size += len(data)

    def write_block(self, block: bytes | memoryview, record: IndexRecord) -> None:
        self.records.append(record)
        self._write(block)

    def encode_block(self, chunks: Iterable[bytes], size: int, preset: int) -> None:
        """Compress a Block straight into the file as its chunks come (encode_block)."""
        self.records.append(encode_block(chunks, size, self._write, preset, self.check))

    def close(self) -> None:
        index = create_index(self.records)
        self._write(index + create_stream_footer(self.check, len(index)))


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


def identify_non_xz(start: bytes) -> str:
    """Why a file that does not start with the xz magic is not xz."""
    if not start:
        return "is empty, not an xz file"
    for magic, name in OTHER_MAGIC:
        if start.startswith(magic):
            return f"holds {name} data, not xz, whatever its name says"
    return "is not an xz file (it does not start with the xz magic bytes)"


def read_xz_layout(fd: int, file_size: int) -> XzLayout:
    """Read the Stream Footers and Indexes of an xz file, from its end.

    Handles several Streams and Stream Padding (2.2), as xz does; whether a
    file has them is for the caller to judge (debuginfod reads only the last
    Stream's Index, so packdebug writes one Stream and no padding).
    """
    start = _pread_exact(fd, min(file_size, len(HEADER_MAGIC)), 0)
    if start != HEADER_MAGIC:
        raise XzError(identify_non_xz(start))
    streams: list[list] = []
    checks, padding, end = set(), 0, file_size
    while end > 0:
        zeros = _padding_before(fd, end)
        padding, end = padding + zeros, end - zeros
        blocks, start_at, check = _read_stream(fd, end)
        streams.append(blocks)
        checks.add(check)
        end = start_at
    return XzLayout(
        _number_blocks(reversed(streams)), len(streams), padding, frozenset(checks)
    )


def _padding_before(fd: int, end: int) -> int:
    """Bytes of Stream Padding (2.2: null bytes, in fours) that end at `end`."""
    zeros = 0
    while zeros < end:
        size = min(READ_CHUNK, end - zeros)
        chunk = _pread_exact(fd, size, end - zeros - size)
        stripped = chunk.rstrip(b"\0")
        zeros += size - len(stripped)
        if zeros > PADDING_LIMIT:
            raise XzError(
                f"ends in more than {PADDING_LIMIT // MiB} MiB of null bytes: "
                "damaged, or not an xz file"
            )
        if stripped:
            break
    return zeros - zeros % 4


def _read_stream(fd: int, end: int) -> tuple[list, int, int]:
    if end < STREAM_HEADER_SIZE + STREAM_FOOTER_SIZE + 8:
        raise XzError("truncated xz file (too short for a Stream)")
    check, index_size = parse_stream_footer(
        _pread_exact(fd, STREAM_FOOTER_SIZE, end - STREAM_FOOTER_SIZE)
    )
    index_at = end - STREAM_FOOTER_SIZE - index_size
    if index_at < STREAM_HEADER_SIZE:
        raise XzError("Backward Size points before the start of the file")
    if index_size > INDEX_LIMIT:
        raise XzError(
            f"claims an Index of {format_size(index_size)}, more than the "
            f"{format_size(INDEX_LIMIT)} of about a million Blocks: damaged or hostile"
        )
    records = parse_index(_pread_exact(fd, index_size, index_at))
    start = (
        index_at - sum(round_up(r.unpadded_size) for r in records) - STREAM_HEADER_SIZE
    )
    if start < 0:
        raise XzError("the Index describes more Blocks than the file holds")
    if parse_stream_header(_pread_exact(fd, STREAM_HEADER_SIZE, start)) != check:
        raise XzError("Stream Header and Stream Footer disagree on the check type")
    offset, located = start + STREAM_HEADER_SIZE, []
    for r in records:
        located.append((offset, r, check))
        offset += round_up(r.unpadded_size)
    return located, start, check


def _number_blocks(streams: Iterable[list]) -> tuple[Block, ...]:
    blocks, uncompressed = [], 0
    for stream in streams:
        for offset, r, check in stream:
            number = len(blocks) + 1
            blocks.append(
                Block(
                    offset,
                    r.unpadded_size,
                    uncompressed,
                    r.uncompressed_size,
                    check,
                    number,
                )
            )
            uncompressed += r.uncompressed_size
    return tuple(blocks)


def _pread_exact(fd: int, size: int, offset: int) -> bytes:
    data = os.pread(fd, size, offset)
    if len(data) != size:
        raise XzError(f"truncated at offset {offset + len(data)}")
    return data


class BlockDecoder:
    """Decompresses one Block incrementally, in bounded memory.

    The Block is fed to liblzma inside a one-Block Stream made of a Stream
    Header, the Block as stored, and an Index holding the file's own record
    for it.  liblzma thereby verifies the Block's check and that the Index's
    sizes are the Block's real sizes; both are known only at the Block's end.
    The last WINDOW bytes produced are kept, so short steps back are free.
    """

    CHUNK = 256 * KiB
    WINDOW = 1 * MiB

    def __init__(self, fd: int, block: Block) -> None:
        self.fd, self.block = fd, block
        self.position = 0  # in the Block's uncompressed data
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
                raise self._fail("is cut off: the file is truncated")
            self._next_in += size
            return data
        if self._trailer:
            data, self._trailer = self._trailer, b""
            return data
        raise self._fail("ends before its data does")

    def _fail(
        self, reason: str, hint: str = "the file is damaged, get a fresh copy"
    ) -> XzError:
        where = f"Block {self.block.number} (at byte {self.block.offset})"
        return XzError(f"{where} {reason}", hint=hint)

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
                    f"needs more than {DECODER_MEMLIMIT // MiB} MiB to decompress",
                    hint="its dictionary is larger than any preset's; packdebug "
                    "refuses it (xz -d can still read it)",
                ) from None
            raise self._fail(f"is corrupt ({e})") from None
        if self.position != self.block.uncompressed_size:
            raise self._fail("holds another size than its Index record says")
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
        self._fd = open_regular(path, "xz file")
        try:
            self.file_size = os.fstat(self._fd).st_size
            self.layout = read_xz_layout(self._fd, self.file_size)
        except PackdebugError as e:
            self.close()
            raise e.at(self.name) from None
        except BaseException:
            self.close()
            raise
        self.size = self.layout.uncompressed_size
        self.sequential = sequential
        self.verified_blocks: set[int] = set()
        self.decoded = 0  # uncompressed bytes produced so far, for measuring
        self.block_starts = [b.uncompressed_offset for b in self.layout.blocks]
        self._pos = 0
        self._decoder: BlockDecoder | None = None
        self._verified_prefix = 0  # Blocks 1..this are verified

    def close(self) -> None:
        if self._fd >= 0:
            os.close(self._fd)
            self._fd = -1
        self._decoder = None  # its dictionary goes now, not with the reader
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
        data = self.read_at(self._pos, size)
        self._pos += len(data)
        return data

    def read_at(self, offset: int, size: int) -> bytes:
        """`size` bytes at `offset`, fewer only at the end of the data."""
        parts = []
        while size > 0:
            data = self._read_in_block(offset, size)
            if not data:
                break
            parts.append(data)
            offset += len(data)
            size -= len(data)
        return b"".join(parts)

    def _read_in_block(self, offset: int, size: int) -> bytes:
        """Up to `size` bytes at `offset`, from one Block at most."""
        if offset >= self.size or size <= 0:
            return b""
        try:
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
        except PackdebugError as e:
            raise e.at(self.name) from None

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
        self._decoder = BlockDecoder(self._fd, block)
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
                self._finish(BlockDecoder(self._fd, block))

    def finish_block(self) -> None:
        """Decompress the rest of the current Block, verifying its check."""
        if self._decoder:
            try:
                self._finish(self._decoder)
            except PackdebugError as e:
                raise e.at(self.name) from None

    def chunks(self, size: int = READ_CHUNK) -> Iterator[tuple[int, bytes]]:
        """(offset, data) through all the data, in order, each Block verified.

        On decoders of its own: reads at other offsets in between do not
        make it decompress anything twice.
        """
        try:
            for block in self.layout.blocks:
                decoder, offset = (
                    BlockDecoder(self._fd, block),
                    block.uncompressed_offset,
                )
                while data := decoder.read(size):
                    self.decoded += len(data)
                    yield offset, data
                    offset += len(data)
                self.verified_blocks.add(block.number)
        except PackdebugError as e:
            raise e.at(self.name) from None

    def verify_all(self) -> None:
        """Decompress every Block not yet verified to its end."""
        try:
            self._finish_through(len(self.layout.blocks))
        except PackdebugError as e:
            raise e.at(self.name) from None

    def verified_until(self) -> int:
        """Uncompressed offset up to which every Block's check has passed."""
        blocks = self.layout.blocks
        while (
            self._verified_prefix < len(blocks)
            and blocks[self._verified_prefix].number in self.verified_blocks
        ):
            self._verified_prefix += 1
        if self._verified_prefix == len(blocks):
            return self.size
        return blocks[self._verified_prefix].uncompressed_offset


# ---------------------------------------------------------------------------
# 3. tar member collection
# ---------------------------------------------------------------------------

_SKIPPED_KINDS = {
    stat.S_IFCHR: "character device",
    stat.S_IFBLK: "block device",
    stat.S_IFIFO: "FIFO",
    stat.S_IFSOCK: "socket",
}
DIR_FLAGS = os.O_RDONLY | os.O_DIRECTORY | os.O_NOFOLLOW | os.O_CLOEXEC
FILE_FLAGS = os.O_RDONLY | os.O_NOFOLLOW | os.O_NONBLOCK | os.O_NOCTTY | os.O_CLOEXEC


def join(parent: bytes, name: bytes) -> bytes:
    """An image-relative path, b"" being the image root."""
    return parent + b"/" + name if parent else name


def identity(st: os.stat_result) -> tuple[int, int]:
    return st.st_dev, st.st_ino


class ImageTree:
    """An image directory, opened once, walked without following any symlink.

    Every directory below the root is opened relative to its parent's
    descriptor with O_NOFOLLOW | O_DIRECTORY, and must be the directory
    (device and inode) the scan saw: a directory swapped for a symlink or
    another directory meanwhile stops the walk with UnsafeTreeError, so
    nothing outside the image is read or removed.  The descriptors of the
    current path are kept open (one per level), so walking a tree in order
    opens each directory once.
    """

    def __init__(self, image) -> None:
        self.image = os.fsencode(os.path.abspath(image))
        try:
            self.root_fd = os.open(
                self.image, os.O_RDONLY | os.O_DIRECTORY | os.O_CLOEXEC
            )
        except OSError as e:
            raise InputError(
                f"cannot open the image: {e.strerror}", self.image
            ) from None
        self.seen: dict[bytes, tuple[int, int]] = {
            b"": identity(os.fstat(self.root_fd))
        }
        self._open: list[tuple[bytes, int]] = []  # (path, fd), one per level

    def close(self) -> None:
        for _, fd in reversed(self._open):
            os.close(fd)
        self._open.clear()
        os.close(self.root_fd)

    def __enter__(self):
        return self

    def __exit__(self, *exc) -> None:
        self.close()

    def full(self, path: bytes) -> bytes:
        """The absolute path, for messages."""
        return join(self.image, path) if path else self.image

    def lstat(self, path: bytes) -> os.stat_result | None:
        """lstat of an entry, without following links on the way; None if missing."""
        parent, _, name = path.rpartition(b"/")
        try:
            return os.stat(name, dir_fd=self.dir_fd(parent), follow_symlinks=False)
        except FileNotFoundError:
            return None
        except OSError as e:
            raise PackError(f"cannot stat: {e.strerror}", self.full(path)) from None

    def dir_fd(self, path: bytes) -> int:
        """Descriptor of the directory at `path`, opened beneath the root.

        The directories kept open are checked again first: each must still
        be, under its name, the directory the scan saw.
        """
        while self._open and not (path + b"/").startswith(self._open[-1][0] + b"/"):
            os.close(self._open.pop()[1])
        fd, done = self.root_fd, b""
        for opened, opened_fd in self._open:
            self._check_entry(fd, opened)
            fd, done = opened_fd, opened
        rest = path[len(done) :].strip(b"/")
        for name in rest.split(b"/") if rest else ():
            done = join(done, name)
            fd = self._open_child(fd, done, name)
            self._open.append((done, fd))
        return fd

    def _check_entry(self, parent_fd: int, path: bytes) -> None:
        try:
            st = os.stat(
                os.path.basename(path), dir_fd=parent_fd, follow_symlinks=False
            )
        except OSError:
            st = None
        if st is None or not stat.S_ISDIR(st.st_mode):
            raise self._unsafe(path, "is no longer a directory (a symlink now?)")
        if identity(st) != self.seen[path]:
            raise self._unsafe(
                path, "was replaced by another directory while packdebug ran"
            )

    def _unsafe(self, path: bytes, what: str) -> UnsafeTreeError:
        return UnsafeTreeError(
            f"{what}; stopped, nothing outside the image was touched", self.full(path)
        )

    def _open_child(self, parent_fd: int, path: bytes, name: bytes) -> int:
        try:
            fd = os.open(name, DIR_FLAGS, dir_fd=parent_fd)
        except OSError as e:
            if e.errno in (errno.ELOOP, errno.ENOTDIR):
                raise self._unsafe(
                    path, "is no longer a directory (a symlink now?)"
                ) from None
            raise PackError(f"cannot open: {e.strerror}", self.full(path)) from None
        seen = self.seen.setdefault(path, identity(os.fstat(fd)))
        if identity(os.fstat(fd)) != seen:
            os.close(fd)
            raise self._unsafe(
                path, "was replaced by another directory while packdebug ran"
            )
        return fd

    def listdir(self, path: bytes) -> list[bytes]:
        try:
            return sorted(os.fsencode(n) for n in os.listdir(self.dir_fd(path)))
        except OSError as e:
            raise PackError(f"cannot list: {e.strerror}", self.full(path)) from None

    def open_file(self, path: bytes, st: os.stat_result) -> int:
        """Descriptor of the regular file at `path`, which must be the one scanned."""
        parent, _, name = path.rpartition(b"/")
        try:
            fd = os.open(name, FILE_FLAGS, dir_fd=self.dir_fd(parent))
        except OSError as e:
            raise PackError(f"cannot open: {e.strerror}", self.full(path)) from None
        if identity(os.fstat(fd)) != identity(st):
            os.close(fd)
            raise PackError("replaced while packing", self.full(path), "pack again")
        os.set_blocking(fd, True)
        return fd


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

    tree: ImageTree
    members: list[Member]
    children: dict[bytes, list[bytes]]  # every listed directory: its entries
    skipped: list[tuple[bytes, str]]  # (path, why) of entries not packed

    @property
    def image(self) -> bytes:
        return self.tree.image

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
    name: str, kind: int, mode: int, mtime: float, sde: int | None, size: int = 0
) -> tarfile.TarInfo:
    """The one header policy, for pack and repack alike.

    Owner root:root, permission bits without setuid/setgid/sticky, integer
    mtime clamped to SOURCE_DATE_EPOCH (reproducible-builds.org) when set;
    `kind` is a tarfile type (REGTYPE, DIRTYPE, SYMTYPE, LNKTYPE).
    """
    info = tarfile.TarInfo(name)
    info.type = kind
    info.mode = stat.S_IMODE(mode) & 0o777
    info.uid = info.gid = 0
    info.uname = info.gname = "root"
    info.mtime = int(mtime) if sde is None else min(int(mtime), sde)
    info.size = size if kind == tarfile.REGTYPE else 0
    return info


HEADER_FIELDS = ("mode", "uid", "gid", "uname", "gname", "mtime", "type")


def _tar_type(mode: int) -> int:
    if stat.S_ISDIR(mode):
        return tarfile.DIRTYPE
    return tarfile.SYMTYPE if stat.S_ISLNK(mode) else tarfile.REGTYPE


def is_protected(path: bytes) -> bool:
    """True for usr/lib/debug/.tarball and every directory above it."""
    tarball_dir = TARBALL_DIR.encode()
    return path == tarball_dir or tarball_dir.startswith(path + b"/") or not path


def scan_image(image, source_date_epoch: int | None = None) -> ImageScan:
    """Collect the debug trees of an image in tarball order.

    usr/src/debug, then usr/lib/debug (without usr/lib/debug/.tarball), each
    depth-first with entries sorted by their bytes, so neither directory
    read order nor locale changes the order.  No symlink is ever followed,
    on the way to a tree or inside it: a tree reached through a symlink is
    skipped and reported.  The second and later names of a hardlinked file
    become tar hardlinks.
    """
    tree = ImageTree(image)
    scan = ImageScan(tree, [], {}, [])
    try:
        first_name: dict[tuple[int, int], str] = {}
        for root in DEBUG_TREES:
            root = root.encode()
            if not _reachable(scan, root):
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
        date_directories([m.info for m in scan.members])
    except BaseException:
        tree.close()
        raise
    return scan


def _reachable(scan: ImageScan, root: bytes) -> bool:
    """Whether the tree and its ancestors are real directories, no symlinks.

    A missing tree is simply absent; one behind a symlink or a file is
    recorded in scan.skipped and not followed.
    """
    parts = root.split(b"/")
    for depth in range(1, len(parts) + 1):
        path = b"/".join(parts[:depth])
        st = scan.tree.lstat(path)
        if st is None:
            return False
        if not stat.S_ISDIR(st.st_mode):
            if all(path != skipped for skipped, _ in scan.skipped):
                scan.skipped.append((path, f"{file_kind(st.st_mode)}, not followed"))
            return False
    return True


def date_directories(infos: Sequence[tarfile.TarInfo]) -> None:
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
    while parent and not is_protected(parent):
        scan.children[parent] = [join(parent, n) for n in scan.tree.listdir(parent)]
        parent = os.path.dirname(parent)


def _scan_entry(
    scan: ImageScan, path: bytes, sde: int | None, first_name: dict
) -> Member | None:
    st = scan.tree.lstat(path)
    if st is None:
        raise PackError("vanished while packdebug read the image", scan.tree.full(path))
    kind = _SKIPPED_KINDS.get(stat.S_IFMT(st.st_mode))
    if kind:
        scan.skipped.append((path, f"a {kind} cannot go in the tarball"))
        return None
    name = member_name(path)
    info = reproducible_header(
        name, _tar_type(st.st_mode), st.st_mode, st.st_mtime, sde, st.st_size
    )
    member = Member(path, st, info)
    if info.isdir():
        scan.tree.seen.setdefault(path, identity(st))
        scan.children[path] = [join(path, n) for n in scan.tree.listdir(path)]
    elif info.issym():
        parent, _, base = path.rpartition(b"/")
        info.linkname = member_name(os.readlink(base, dir_fd=scan.tree.dir_fd(parent)))
    elif st.st_nlink > 1 and identity(st) in first_name:
        info.type = tarfile.LNKTYPE
        info.linkname = first_name[identity(st)]
        info.size = 0
    else:
        first_name.setdefault(identity(st), name)
        if path.startswith(DEBUG_DIR.encode() + b"/"):
            _read_debug_elf(scan.tree, member)
    scan.members.append(member)
    return member


def _read_debug_elf(tree: ImageTree, member: Member) -> None:
    fd = tree.open_file(member.path, member.st)
    try:
        if os.pread(fd, 4, 0) == ELF_MAGIC:
            member.elf = read_elf(
                lambda offset, n: os.pread(fd, n, offset),
                member.st.st_size,
                tree.full(member.path),
                sections=False,
            )
    except ElfError as e:
        member.elf_error = str(e)
    finally:
        os.close(fd)


# ---------------------------------------------------------------------------
# 4. packing
# ---------------------------------------------------------------------------

BLOCK_SIZE = 6 * MiB  # a Block closes at a member once this full; README "Block layout"
BLOCK_SIZE_MIN, BLOCK_SIZE_MAX = 256 * KiB, 512 * MiB
RECORD_SIZE = tarfile.RECORDSIZE  # GNU tar and tarfile pad archives to 10 KiB
MEMORY_SHARE = 4  # -j uses at most 1/4 of the RAM, as xz -T's default limit


@dataclasses.dataclass
class PackOptions:
    """How to compress: xz preset, threads, and the Block layout."""

    preset: int = 6
    jobs: int = 0  # 0: one per CPU
    block_size: int = 0  # 0: default_block_size(preset)
    extreme: bool = False
    large_block: int = 0  # 0: the larger of 2 x block_size and 3 x the dictionary
    large_member: int = 0  # 0: no member gets Blocks of its own (see tar_blocks)

    def __post_init__(self) -> None:
        self.block_size = self.block_size or default_block_size(self.preset)
        dictionary = PRESET_DICT_SIZE[self.preset]
        self.large_block = self.large_block or max(2 * self.block_size, 3 * dictionary)

    def blocks(self, entries) -> Iterator[BlockPlan]:
        """tar_blocks with this layout: the plan of each Block."""
        return tar_blocks(entries, self.block_size, self.large_block, self.large_member)

    @property
    def lzma_preset(self) -> int:
        return self.preset | (lzma.PRESET_EXTREME if self.extreme else 0)

    def threads(self) -> tuple[int, str]:
        """Threads to compress on, and what bounded them (for -v).

        -j asks; the CPUs this process may run on and a memory budget (a
        quarter of the RAM, for one encoder and two Blocks per thread) cap.
        """
        cpus = available_cpus()
        per_job = PRESET_ENCODER_MEMORY[self.preset] + 2 * self.large_block
        by_memory = max(1, physical_memory() // MEMORY_SHARE // per_job)
        wanted = self.jobs or cpus
        jobs = min(wanted, cpus, by_memory)
        if jobs == wanted:
            return jobs, f"{plural(jobs, 'thread')}"
        limit = (
            f"{plural(cpus, 'CPU')}"
            if jobs == cpus
            else (
                f"{format_size(per_job)} per thread within a quarter of "
                f"{format_size(physical_memory())} of RAM"
            )
        )
        return jobs, f"{plural(jobs, 'thread')} (-j {wanted}, limited by {limit})"


def default_block_size(preset: int) -> int:
    """BLOCK_SIZE; for -7 to -9 their dictionary (16 to 64 MiB), which a
    smaller Block would leave unused."""
    return PRESET_DICT_SIZE[preset] if preset >= 7 else BLOCK_SIZE


def available_cpus() -> int:
    try:
        return len(os.sched_getaffinity(0))
    except (AttributeError, OSError):
        return os.cpu_count() or 1


def physical_memory() -> int:
    try:
        return os.sysconf("SC_PHYS_PAGES") * os.sysconf("SC_PAGE_SIZE")
    except (ValueError, OSError):
        return 4 << 30


class _MemberData:
    """A member's data, read n bytes at a time by the Blocks it spans.

    data() must yield exactly `size` bytes; it is called at the first read,
    and run to its end after the last (where _file_data checks the file
    did not grow).
    """

    __slots__ = ("chunks", "data", "left", "rest")

    def __init__(self, data: Callable[[], Iterable[bytes]], size: int) -> None:
        self.data, self.left = data, size
        self.chunks: Iterator[bytes] | None = None
        self.rest = memoryview(b"")

    def read(self, n: int) -> Iterator[memoryview]:
        if self.chunks is None:
            self.chunks = iter(self.data())
        self.left -= n
        while n:
            while not self.rest:
                chunk = next(self.chunks, None)
                if chunk is None:
                    raise ValueError("member data ended before its size")
                self.rest = memoryview(chunk)
            piece, self.rest = self.rest[:n], self.rest[n:]
            n -= len(piece)
            yield piece
        if not self.left and (self.rest or next(self.chunks, None) is not None):
            raise ValueError("member data ran past its size")


class BlockPlan:
    """One Block's share of the tar stream: its size, and the pieces that fill it.

    A piece is bytes (a header, padding) or the next bytes of a member's
    data, read only when the Block is: tar_blocks gives plans one at a
    time, and each must be read before the next is asked for.
    """

    __slots__ = ("pieces", "size")

    def __init__(self) -> None:
        self.pieces: list[tuple[memoryview | _MemberData, int]] = []
        self.size = 0

    def add(self, piece: memoryview | _MemberData, n: int) -> None:
        self.pieces.append((piece, n))
        self.size += n

    def chunks(self) -> Iterator[memoryview]:
        for piece, n in self.pieces:
            if isinstance(piece, _MemberData):
                yield from piece.read(n)
            else:
                yield piece

    def payload(self) -> bytearray:
        """The Block's bytes, in one buffer of exactly its size."""
        payload = bytearray(self.size)
        view, at = memoryview(payload), 0
        for chunk in self.chunks():
            view[at : at + len(chunk)] = chunk
            at += len(chunk)
        return payload


def tar_blocks(
    entries: Iterable[tuple[tarfile.TarInfo, Callable[[], Iterable[bytes]]]],
    block_size: int = BLOCK_SIZE,
    large_block: int = 3 * BLOCK_SIZE,
    large_member: int = 0,
) -> Iterator[BlockPlan]:
    """Lay a tar archive out as xz Blocks.

    `entries` are (header, data) pairs, data() yielding exactly the member's
    bytes.  Members share Blocks in order; a Block is closed at the first
    member boundary once it holds block_size bytes or more, so no member
    starts further than block_size into its Block: that bounds what
    debuginfod decompresses before the member it serves, while the Blocks
    stay full (each Block's dictionary starts empty, so every Block boundary
    costs size).  A member that would take its Block past large_block goes
    on in Blocks of large_block bytes: a large file is decompressed whole
    anyway, so only fewer, larger Blocks matter for it; the members after
    it share the Block of its last part.  With large_member, a member of
    that size or more instead starts a Block of its own and ends it (the
    layout of packdebug before 2026-11-28, kept for the benchmark).  Every
    Block starts either with a tar header or inside a member begun in an
    earlier one, which lets `find` and `extract` locate a member by
    bisecting over Block starts.  The end-of-archive marker gets a Block of
    its own: any archive with a member then has more than one Block, which
    debuginfod >= 0.192 needs to seek in it.

    The layout needs only the headers' sizes, so each Block's size is known
    before its data is read, and a Block can be compressed as it is read.
    """
    block = BlockPlan()
    offset = 0
    for info, data in entries:
        header = info.tobuf(tarfile.PAX_FORMAT, "utf-8", "surrogateescape")
        size = info.size if info.type == tarfile.REGTYPE else 0
        padded = round_up(size, tarfile.BLOCKSIZE)
        own = bool(large_member) and size >= large_member
        if block.size and (own or block.size >= block_size):
            yield block
            block = BlockPlan()
        pieces = (
            (memoryview(header), len(header)),
            (_MemberData(data, size), size),
            (memoryview(bytes(padded - size)), padded - size),
        )
        for piece, length in pieces:
            at = 0
            while at < length:
                take = min(length - at, large_block - block.size)
                part = (
                    piece if isinstance(piece, _MemberData) else piece[at : at + take]
                )
                block.add(part, take)
                at += take
                if block.size == large_block:
                    yield block
                    block = BlockPlan()
        offset += len(header) + padded
        if own and block.size:
            yield block
            block = BlockPlan()
    if block.size:
        yield block
    end = bytes(2 * tarfile.BLOCKSIZE)
    end += bytes(-(offset + len(end)) % RECORD_SIZE)
    block = BlockPlan()
    block.add(memoryview(end), len(end))
    yield block


M_MMAP_THRESHOLD = -3  # glibc's <malloc.h>
LARGE_PAYLOAD = 4 * MiB


def _mmap_large_buffers() -> None:
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


class _CompressJob:
    """One Block to compress, and, once `done` is set, its result or error."""

    __slots__ = ("done", "error", "payload", "result")

    def __init__(self, payload) -> None:
        self.payload = payload
        self.done = threading.Event()
        self.result = self.error = None


class BlockCompressor:
    """Compresses Blocks on `jobs` daemon threads.

    Daemon threads, not a ThreadPoolExecutor: on Ctrl-C or SIGTERM the
    program must answer at once, and an executor's threads would be
    joined at exit, each finishing its Block first (tens of seconds for
    large Blocks on a loaded machine).  Queued Blocks are dropped.
    """

    def __init__(self, jobs: int, preset: int) -> None:
        self.preset = preset
        self.tasks: queue.SimpleQueue = queue.SimpleQueue()
        self.cancelled = False
        self.workers = [
            threading.Thread(target=self._work, name="packdebug-xz", daemon=True)
            for _ in range(jobs)
        ]
        for worker in self.workers:
            worker.start()

    def _work(self) -> None:
        while True:
            job = self.tasks.get()
            if job is None:
                return
            try:
                if not self.cancelled:
                    job.result = compress_block(job.payload, self.preset)
            except BaseException as e:  # noqa: BLE001 (handed to the main thread)
                job.error = e
            finally:
                job.payload = None
                job.done.set()

    def submit(self, payload) -> _CompressJob:
        job = _CompressJob(payload)
        self.tasks.put(job)
        return job

    def close(self) -> None:
        """Stop: queued Blocks are skipped, running ones finish on their own."""
        self.cancelled = True
        for _ in self.workers:
            self.tasks.put(None)


def compress_blocks(
    blocks: Iterable[BlockPlan], preset: int, jobs: int
) -> Iterator[tuple[bytearray, IndexRecord, int]]:
    """Compress Blocks on `jobs` threads; yield (Block, record, input size) in order.

    At most 2 x jobs payloads are in flight, so memory stays bounded by
    about jobs x (encoder + 2 Blocks), whatever the size of the image, while
    a worker that finishes a small Block early finds the next one queued
    instead of waiting for the oldest to be written.
    """
    compressor = BlockCompressor(jobs, preset)
    pending: collections.deque = collections.deque()
    try:
        for block in blocks:
            pending.append((compressor.submit(block.payload()), block.size))
            while len(pending) >= 2 * jobs:
                yield _result(*pending.popleft())
        while pending:
            yield _result(*pending.popleft())
    finally:
        compressor.close()


def write_each_block(
    blocks: Iterable[BlockPlan], writer: XzStreamWriter, preset: int, jobs: int
) -> Iterator[int]:
    """Compress and write the Blocks; yield each one's input size once written.

    With one job, each Block goes through the encoder as its data is read,
    so no Block is held whole and pack -j1 needs about what xz -T1 does;
    with more, whole Blocks go to compress_blocks' threads.
    """
    blocks = _tune_for_large(blocks)
    if jobs == 1:
        for block in blocks:
            writer.encode_block(block.chunks(), block.size, preset)
            yield block.size
        return
    with contextlib.closing(compress_blocks(blocks, preset, jobs)) as compressed:
        for data, record, size in compressed:
            writer.write_block(data, record)
            yield size


def _tune_for_large(blocks: Iterable[BlockPlan]) -> Iterator[BlockPlan]:
    """The Blocks, glibc tuned by _mmap_large_buffers once a large one shows up."""
    tuned = False
    for block in blocks:
        if not tuned and block.size >= LARGE_PAYLOAD:
            _mmap_large_buffers()
            tuned = True
        yield block


def _result(job: _CompressJob, size: int) -> tuple[bytearray, IndexRecord, int]:
    job.done.wait()
    if job.error is not None:
        raise job.error
    return (*job.result, size)


class Progress:
    """One self-updating line on a terminal: bytes read and written, rate, ETA.

    Drawn from the first read on, then at most every INTERVAL seconds.
    """

    INTERVAL = 0.5  # seconds between redraws

    def __init__(self, total: int, stream) -> None:
        self.total, self.stream = max(total, 1), stream
        self.start = time.monotonic()
        self.last = self.start - self.INTERVAL
        self.done = self.written = 0
        self.drawn = False

    def read(self, size: int) -> None:
        self.done += size
        self._draw()

    def wrote(self, total: int) -> None:
        self.written = total
        self._draw()

    def _draw(self) -> None:
        now = time.monotonic()
        if now - self.last < self.INTERVAL:
            return
        self.last, elapsed = now, now - self.start
        rate = self.done / elapsed if elapsed > 0.05 else 0
        eta = (self.total - min(self.done, self.total)) / rate if rate else 0
        percent = min(100, 100 * self.done // self.total)
        eta_text = f"{int(eta) // 60}:{int(eta) % 60:02d}" if rate else "-:--"
        with contextlib.suppress(OSError):
            self.stream.write(
                f"\r{percent:3d}%  {format_size(self.done)} read, "
                f"{format_size(self.written)} written, {format_size(rate)}/s, "
                f"ETA {eta_text}\x1b[K"
            )
            self.stream.flush()
        self.drawn = True

    def clear(self) -> None:
        if self.drawn:
            with contextlib.suppress(OSError):
                self.stream.write("\r\x1b[K")
                self.stream.flush()


def progress_line(log: Log, total: int) -> Progress | None:
    """A progress line when stderr is a terminal and not -q; none in logs."""
    # Portage runs phases on a pty: no progress line in a build log.
    if log.verbosity < 0 or not log.err.isatty() or os.environ.get("EBUILD_PHASE"):
        return None
    return Progress(total, log.err)


@dataclasses.dataclass
class OutputTarget:
    """Where an output file goes: a directory, opened safely, and a name."""

    directory: str  # for messages, and for the checks that reopen the file
    name: str
    root_fd: int = -1  # with `parts`: create the directory beneath this
    parts: tuple[str, ...] = ()

    @property
    def path(self) -> str:
        return os.path.join(self.directory, self.name)

    @classmethod
    def at(cls, path: str, beneath: ImageTree | None = None) -> OutputTarget:
        """A target at `path`; inside the image, every directory is made beneath it."""
        path = os.path.abspath(path)
        directory, name = os.path.split(path)
        if beneath is not None:
            image = os.fsdecode(beneath.image)
            inside = os.path.relpath(directory, image)
            if inside == "." or not inside.startswith(".."):
                parts = () if inside == "." else tuple(inside.split("/"))
                return cls(directory, name, beneath.root_fd, parts)
        return cls(directory, name)

    def open_directory(self, created: list) -> int:
        """The directory's descriptor, created (0755) where missing."""
        try:
            if self.root_fd >= 0:
                return open_beneath(
                    self.root_fd, self.parts, create=True, created=created
                )
            return _make_directory(self.directory, created)
        except OSError as e:
            if e.errno in (errno.ELOOP, errno.ENOTDIR):
                raise OutputError(
                    "is reached through a symlink or a file inside the image; "
                    "refusing to write there",
                    self.directory,
                ) from None
            raise OutputError(f"cannot create: {e.strerror}", self.directory) from None

    def undo(self, created: list) -> None:
        if self.root_fd >= 0:
            remove_beneath(self.root_fd, created)
        else:
            for directory in created:  # deepest first
                with contextlib.suppress(OSError):
                    os.rmdir(directory)


def _make_directory(directory: str, created: list) -> int:
    """Open `directory`, creating it and missing parents (install -d)."""
    missing = []
    parent = directory
    while not os.path.isdir(parent):
        missing.append(parent)
        parent = os.path.dirname(parent)
    for path in reversed(missing):
        with contextlib.suppress(FileExistsError):
            os.mkdir(path, 0o755)
            os.chmod(path, 0o755)
            created.insert(0, path)
    return os.open(directory, os.O_RDONLY | os.O_DIRECTORY | os.O_CLOEXEC)


@contextlib.contextmanager
def atomic_output(
    target: OutputTarget,
    mode: int = 0o644,
    check: Callable[[str], None] | None = None,
    owner: tuple[int, int] | None = None,
) -> Iterator[io.BufferedWriter]:
    """A file that appears at the target complete and fsynced, or not at all.

    It gets `mode`, and `owner` (uid, gid) where this process may give it.

    The data goes to a hidden ".NAME.XXXXXXXX.tmp" in the target's
    directory (never matching *-debug.tar.xz, so neither debuginfod nor
    prune looks at it); `check`, if given, examines it by path; then it is
    renamed over the name, and the directory fsynced.  Any error, SIGINT or
    SIGTERM removes it, and the directories made for it; a previous file at
    the target stays intact until the rename.
    """
    created: list = []
    dir_fd, temp, done = -1, "", False
    try:
        with signals_held():
            dir_fd, temp, fd = _create_temporary(target, created)
        try:
            with open(fd, "wb") as f:
                yield f
                f.flush()
                if owner:
                    with contextlib.suppress(PermissionError):  # not root: ours
                        os.fchown(fd, *owner)
                os.fchmod(fd, mode)
                os.fsync(fd)
            if check:
                check(os.path.join(target.directory, temp))
            _check_replaceable(target, dir_fd)
            os.replace(temp, target.name, src_dir_fd=dir_fd, dst_dir_fd=dir_fd)
            done = True
            os.fsync(dir_fd)
        except OSError as e:
            raise OutputError(f"cannot write: {e.strerror}", target.path) from None
    finally:
        if temp and not done:
            with contextlib.suppress(OSError):
                os.unlink(temp, dir_fd=dir_fd)
        if dir_fd >= 0:
            os.close(dir_fd)
        if not done:
            target.undo(created)


def _check_replaceable(target: OutputTarget, dir_fd: int) -> None:
    """Only a regular file may be replaced: never /dev/null, a FIFO or a symlink."""
    try:
        mode = os.stat(target.name, dir_fd=dir_fd, follow_symlinks=False).st_mode
    except FileNotFoundError:
        return
    if not stat.S_ISREG(mode):
        raise OutputError(
            f"is {file_kind(mode)}: packdebug writes a regular file, and would "
            "replace it",
            target.path,
            hint="name a regular file (extract -o - writes to standard output)",
        )


def _create_temporary(target: OutputTarget, created: list) -> tuple[int, str, int]:
    """(directory descriptor, name, descriptor) of a new empty file beside the target.

    A prune beside may remove the directory as empty between its creation
    and the temporary file's: then it is made again, a few times.
    """
    for _attempt in range(5):
        dir_fd = target.open_directory(created)
        try:
            _check_replaceable(target, dir_fd)
        except OutputError:
            os.close(dir_fd)
            raise
        for _ in range(100):
            temp = f".{target.name}.{os.urandom(4).hex()}.tmp"
            flags = os.O_WRONLY | os.O_CREAT | os.O_EXCL | os.O_NOFOLLOW | os.O_CLOEXEC
            try:
                return dir_fd, temp, os.open(temp, flags, 0o600, dir_fd=dir_fd)
            except FileExistsError:
                continue
            except FileNotFoundError:
                if os.fstat(dir_fd).st_nlink:  # not removed: the file system says no
                    os.close(dir_fd)
                    raise OutputError(
                        "cannot create files there (No such file or directory); "
                        "is it a real file system?",
                        target.directory,
                    ) from None
                break  # removed meanwhile: make it again
            except OSError as e:
                os.close(dir_fd)
                raise OutputError(
                    f"cannot create a file there: {e.strerror}", target.directory
                ) from None
        os.close(dir_fd)
    raise OutputError(
        "was removed again and again while packdebug wrote to it; "
        "is a prune running beside?",
        target.directory,
    )


@dataclasses.dataclass
class PackResult:
    output: str
    size: int = 0  # of the tarball
    tar_size: int = 0  # uncompressed
    blocks: int = 0
    files: int = 0
    data_size: int = 0
    removed: tuple[int, int] = (0, 0)  # files, directories


def write_blocks(
    blocks: Iterable[BlockPlan],
    target: OutputTarget,
    options: PackOptions,
    progress: Progress | None = None,
    check: Callable[[str], None] | None = None,
    like: os.stat_result | None = None,
) -> PackResult:
    """Compress the Blocks into one xz stream at the target, atomically.

    The file gets the mode and owner of `like` (the tarball it replaces).
    """
    result = PackResult(target.path)
    jobs, _ = options.threads()
    kept = {}
    if like:
        kept = {"mode": stat.S_IMODE(like.st_mode), "owner": (like.st_uid, like.st_gid)}
    with atomic_output(target, check=check, **kept) as f:
        writer = XzStreamWriter(f)
        written = write_each_block(blocks, writer, options.lzma_preset, jobs)
        with contextlib.closing(written):
            for size in written:
                result.tar_size += size
                if progress:
                    progress.wrote(writer.size)
        writer.close()
    result.size, result.blocks = writer.size, len(writer.records)
    return result


def _file_data(
    tree: ImageTree, member: Member, progress: Progress | None
) -> Iterator[bytes]:
    """A regular file's bytes; it must not change while it is packed."""
    fd = tree.open_file(member.path, member.st)
    name = tree.full(member.path)
    try:
        left = member.info.size
        while left:
            chunk = os.read(fd, min(READ_CHUNK, left))
            if not chunk:
                raise PackError("shrank while packing", name, "pack again")
            left -= len(chunk)
            if progress:
                progress.read(len(chunk))
            yield chunk
        if os.read(fd, 1):
            raise PackError("grew while packing", name, "pack again")
    except OSError as e:
        raise PackError(f"cannot read: {e.strerror}", name) from None
    finally:
        os.close(fd)


def write_tarball(
    scan: ImageScan,
    target: OutputTarget,
    options: PackOptions,
    progress: Progress | None = None,
) -> PackResult:
    """Write the scan's tarball to the target atomically; return what was written."""
    entries = (
        (m.info, functools.partial(_file_data, scan.tree, m, progress))
        for m in scan.members
    )
    return write_blocks(
        options.blocks(entries),
        target,
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
        if entries and not is_protected(path) and all(e in going for e in entries):
            going.add(path)
            dirs.append(path)
    return files, dirs


def remove_packed(scan: ImageScan, log: Log) -> tuple[int, int]:
    """Delete what removal_plan lists; a file changed since packing stays.

    Every unlink and rmdir is made relative to a directory opened beneath
    the image without following links and checked to be the one scanned
    (ImageTree), so nothing outside the image can be removed, even if a
    directory is swapped for a symlink meanwhile: that stops the removal.
    """
    files, dirs = removal_plan(scan)
    tree = scan.tree
    removed_files = removed_dirs = 0
    for member in files:
        parent, _, name = member.path.rpartition(b"/")
        st = tree.lstat(member.path)
        if st is None or (st.st_ino, st.st_size, st.st_mtime_ns) != (
            member.st.st_ino,
            member.st.st_size,
            member.st.st_mtime_ns,
        ):
            log.warning(
                f"{shown(tree.full(member.path))}: changed since it was packed; kept"
            )
            continue
        try:
            os.unlink(name, dir_fd=tree.dir_fd(parent))
            removed_files += 1
        except OSError as e:
            log.warning(f"{shown(tree.full(member.path))}: cannot remove: {e.strerror}")
    for path in dirs:
        parent, _, name = path.rpartition(b"/")
        st = tree.lstat(path)
        if st is None or identity(st) != tree.seen.get(path):
            continue  # gone, or another directory now: not ours to remove
        try:
            os.rmdir(name, dir_fd=tree.dir_fd(parent))
            removed_dirs += 1
        except OSError as e:
            if e.errno not in (errno.ENOTEMPTY, errno.EEXIST, errno.ENOENT):
                log.warning(f"{shown(tree.full(path))}: cannot remove: {e.strerror}")
    return removed_files, removed_dirs


# Packing one image: the request, as Portage's environment or flags give it.

_PORTAGE_NAME = re.compile(r"[A-Za-z0-9_][A-Za-z0-9+_.-]*")  # PMS 3.1.1, 3.1.2


@dataclasses.dataclass
class PackRequest:
    """One image to pack, and where: what a Portage phase hook knows."""

    image: str  # ${ED}
    category: str | None = None
    pn: str | None = None
    pf: str | None = None
    build_id: str | None = None  # Portage's BUILD_ID, a number
    build_info: str | None = None  # ${PORTAGE_BUILDDIR}/build-info, for BUILD_ID
    output: str | None = None  # instead of the .tarball path
    remove_packed: bool = False
    dry_run: bool = False
    strict: bool = False
    source_date_epoch: int | None = None
    install_mask: str = ""  # INSTALL_MASK, to explain an image without debug info
    from_binary: bool = False  # EMERGE_FROM=binary: no debug info is expected


def request_from_environment(
    environ: Mapping[str, str], flags: Mapping[str, object] | None = None
) -> PackRequest:
    """A PackRequest from Portage's variables, each overridden by its flag.

    Pure: it reads nothing but its arguments, and raises UsageError for a
    missing or malformed input, naming the variable and the flag.  `flags`
    may hold image, eprefix, category, pn, pf, build_id, output,
    remove_packed, dry_run and strict.
    """
    flags = {k: v for k, v in (flags or {}).items() if v is not None}
    request = PackRequest(
        _image_from(environ, flags),
        remove_packed=bool(flags.get("remove_packed")),
        dry_run=bool(flags.get("dry_run")),
        strict=bool(flags.get("strict")),
        source_date_epoch=_source_date_epoch(environ),
        install_mask=environ.get("INSTALL_MASK", ""),
        from_binary=environ.get("EMERGE_FROM") == "binary",
    )
    request.build_id = (
        str(flags.get("build_id") or environ.get("BUILD_ID") or "") or None
    )
    if request.build_id is not None and not is_decimal(request.build_id):
        raise UsageError(
            f"BUILD_ID {request.build_id!r} is not a number, as Portage's are",
            hint="--build-id takes Portage's binary package number, not an ELF build-id",
        )
    if environ.get("PORTAGE_BUILDDIR"):
        request.build_info = os.path.join(environ["PORTAGE_BUILDDIR"], "build-info")
    if flags.get("output"):
        request.output = os.path.abspath(str(flags["output"]))
        return request
    for var in ("CATEGORY", "PN", "PF"):
        setattr(request, var.lower(), _portage_name(var, flags, environ))
    if not request.pf.startswith(request.pn + "-"):
        raise UsageError(
            f"PF {request.pf!r} does not start with PN {request.pn!r} and a '-'",
            hint="check --pn and --pf (PF is PN-VERSION, e.g. hello-1.0)",
        )
    return request


def _image_from(environ: Mapping[str, str], flags: Mapping[str, object]) -> str:
    eprefix = str(flags.get("eprefix", environ.get("EPREFIX", "")))
    if flags.get("image"):
        image = str(flags["image"])
        return os.path.join(image, eprefix.lstrip("/")) if eprefix.strip("/") else image
    if environ.get("ED"):
        return environ["ED"]
    if environ.get("D"):
        return (
            os.path.join(environ["D"], eprefix.lstrip("/"))
            if eprefix.strip("/")
            else environ["D"]
        )
    raise UsageError(
        "no image: ED (or D and EPREFIX) is not set",
        hint="run from a Portage phase hook, or pass --image",
    )


def _portage_name(
    var: str, flags: Mapping[str, object], environ: Mapping[str, str]
) -> str:
    value = str(flags.get(var.lower()) or environ.get(var) or "")
    flag = PORTAGE_INPUTS[var]
    if not value:
        raise UsageError(
            f"{var} is not set", hint=f"run from a Portage phase hook, or pass {flag}"
        )
    if not _PORTAGE_NAME.fullmatch(value):
        raise UsageError(
            f"{var} {value!r} is not a valid Portage name", hint=f"check {flag}"
        )
    return value


def _source_date_epoch(environ: Mapping[str, str]) -> int | None:
    value = environ.get("SOURCE_DATE_EPOCH", "")
    if value == "":
        return None
    if not is_decimal(value):
        raise UsageError(
            f"SOURCE_DATE_EPOCH={value!r} is not a whole number of seconds"
        )
    return int(value)


def tarball_name(pf: str, build_id: str | None) -> str:
    """${PF}-${BUILD_ID}-debug.tar.xz, or ${PF}-debug.tar.xz without a BUILD_ID."""
    return f"{pf}-{build_id}{TARBALL_SUFFIX}" if build_id else pf + TARBALL_SUFFIX


def build_id_from_build_info(build_info: str | None) -> str | None:
    """BUILD_ID as the package phase saves it with binpkg-multi-instance."""
    if not build_info:
        return None
    path = os.path.join(build_info, "BUILD_ID")
    try:
        data = read_small_file(path, "BUILD_ID file", BUILD_ID_FILE_LIMIT)
    except InputError as e:
        raise UsageError(e.reason, path) from None
    if data is None:
        return None
    value = data.decode("ascii", "replace").strip()
    if value and not is_decimal(value):
        raise UsageError(f"BUILD_ID {value!r} is not a number, as Portage's are", path)
    return value or None


def check_image(image: str) -> None:
    """The image must be a directory."""
    try:
        st = os.stat(image)
    except FileNotFoundError:
        raise UsageError(
            "the image directory does not exist", image, "check ED or --image"
        ) from None
    except NotADirectoryError:
        raise UsageError(
            "is not a directory: a file is on its path", image, "check ED or --image"
        ) from None
    except OSError as e:
        raise UsageError(f"cannot reach the image: {e.strerror}", image) from None
    if not stat.S_ISDIR(st.st_mode):
        raise UsageError(
            f"is {file_kind(st.st_mode)}, not a directory: --image takes the "
            "image root, the directory that holds usr/",
            image,
        )


def target_of(request: PackRequest, tree: ImageTree) -> OutputTarget:
    """Where the tarball goes: --output, else the .tarball path in the image."""
    if request.output:
        # Compared as the file system sees them: an image or an output
        # directory given through a symlink is no way around this check.
        real = os.path.realpath(os.path.dirname(os.path.abspath(request.output)))
        inside = os.path.relpath(
            os.path.join(real, os.path.basename(request.output)),
            os.path.realpath(os.fsdecode(tree.image)),
        )
        for name in DEBUG_TREES:
            if (inside + "/").startswith(name + "/") and not inside.startswith(
                TARBALL_DIR + "/"
            ):
                raise UsageError(
                    f"--output inside {name} would be packed next time",
                    request.output,
                    f"put it under {TARBALL_DIR}",
                )
        return OutputTarget.at(request.output, tree)
    path = os.path.join(
        os.fsdecode(tree.image),
        TARBALL_DIR,
        request.category,
        request.pn,
        tarball_name(request.pf, request.build_id),
    )
    return OutputTarget.at(path, tree)


def _debug_tree_hint(image: str) -> str:
    """A hint when the image given looks like a debug tree itself."""
    for inside, what in (
        (".build-id", "a usr/lib/debug tree"),
        ("debug/.build-id", "a usr/lib tree"),
        ("lib/debug", "a usr tree"),
        ("src/debug", "a usr tree"),
    ):
        if os.path.isdir(os.path.join(image, inside)):
            return (
                f"; {shown(image)} looks like {what} itself: --image takes the image "
                f"root, the directory that holds {DEBUG_DIR}"
            )
    return ""


def _install_mask_hint(request: PackRequest) -> str:
    masked = [
        p
        for p in request.install_mask.split()
        if p.rstrip("/*") in ("/" + DEBUG_DIR, "/" + SOURCE_DIR)
    ]
    return (
        " INSTALL_MASK removed them before pkg_preinst ("
        + " ".join(masked)
        + "); keep debug info out of INSTALL_MASK and pack with --remove-packed instead"
        if masked
        else ""
    )


def pack(request: PackRequest, options: PackOptions, log: Log) -> PackResult | None:
    """Pack one image's debug trees; the one entry point of `packdebug pack`.

    Returns what was written, or None when there was nothing to pack or on
    a dry run.
    """
    check_image(request.image)
    if request.build_id is None:
        request.build_id = build_id_from_build_info(request.build_info)
    scan = scan_image(request.image, request.source_date_epoch)
    try:
        target = target_of(request, scan.tree)
        if not target.name.endswith(TARBALL_SUFFIX):
            log.warning(
                f"{shown(target.path)}: debuginfod (-Z .tar.xz) and prune only see "
                f"*{TARBALL_SUFFIX} files; name the tarball so"
            )
        return _pack_scan(request, options, log, scan, target)
    finally:
        scan.tree.close()


def _pack_scan(
    request: PackRequest,
    options: PackOptions,
    log: Log,
    scan: ImageScan,
    target: OutputTarget,
) -> PackResult | None:
    for path, why in scan.skipped:
        log.warning(f"{shown(scan.tree.full(path))}: skipped, {why}")
    if not scan.files:
        _nothing_to_pack(request, log)
        return None
    _check_build_ids(scan, request.strict, log)
    _, how = options.threads()
    log.detail(
        f"compressing on {how}, xz -{options.preset}{'e' * options.extreme}, "
        f"blocks of up to {format_size(options.block_size)}"
    )
    if request.dry_run:
        _pack_dry_run(scan, target, request, log)
        return None
    progress = progress_line(log, scan.data_size)
    try:
        result = write_tarball(scan, target, options, progress)
    finally:
        if progress:
            progress.clear()
    result.files, result.data_size = len(scan.files), scan.data_size
    _report_pack(scan, result, request, log)
    if request.remove_packed:
        result.removed = remove_packed(scan, log)
        log.detail(
            f"removed {plural(result.removed[0], 'packed file')} and "
            f"{plural(result.removed[1], 'emptied directory', 'emptied directories')}"
        )
    return result


def _nothing_to_pack(request: PackRequest, log: Log) -> None:
    trees = " or ".join(DEBUG_TREES)
    masked = _install_mask_hint(request)
    if masked and not request.from_binary:
        log.warning(
            f"nothing to pack: {shown(request.image)} has no files under {trees}.{masked}"
        )
        return
    hint = _debug_tree_hint(request.image)
    if hint:
        raise UsageError(f"nothing to pack under {trees}{hint}", request.image)
    if not request.from_binary:  # from a binpkg, no debug info is expected
        log.info(
            f"packdebug: nothing to pack: {shown(request.image)} has no files under {trees}"
        )


def _check_build_ids(scan: ImageScan, strict: bool, log: Log) -> None:
    bad = []
    for m in scan.members:
        full = shown(scan.tree.full(m.path))
        if m.elf_error:
            bad.append(f"{m.elf_error}: debuginfod cannot index it")
        elif m.elf is not None and not m.elf.build_id:
            bad.append(
                f"{full}: debug ELF without a build-id: debuginfod cannot serve it "
                "(build with -Wl,--build-id)"
            )
    if bad and strict:
        raise PackError("\n  ".join(["--strict: refusing to pack:", *bad]))
    for message in bad:
        log.warning(message)


def _pack_dry_run(
    scan: ImageScan, target: OutputTarget, request: PackRequest, log: Log
) -> None:
    log.info(
        f"would pack {_files_and_links(scan)} ({format_size(scan.data_size)}) "
        f"into {shown(target.path)}"
    )
    for m in scan.members:
        log.detail(f"  {shown(m.info.name)}")
    if request.remove_packed:
        files, dirs = removal_plan(scan)
        for path in [m.path for m in files] + dirs:
            log.info(f"would remove {shown(scan.tree.full(path))}")


def _files_and_links(scan: ImageScan) -> str:
    """'5 files and 5 links': regular files, then symlinks and hardlinks."""
    regular = sum(1 for m in scan.files if m.info.isreg())
    links = len(scan.files) - regular
    return plural(regular, "file") + (f" and {plural(links, 'link')}" if links else "")


def _report_pack(
    scan: ImageScan, result: PackResult, request: PackRequest, log: Log
) -> None:
    """-v: each file; otherwise one line, as a build log wants it."""
    for m in scan.members:
        if not m.info.isdir():
            build_id = f"  {m.elf.build_id}" if m.elf and m.elf.build_id else ""
            log.detail(f"  {shown(m.info.name)}  {format_size(m.info.size)}{build_id}")
    elf = [m for m in scan.members if m.is_debug_elf]
    with_id = sum(1 for m in elf if m.elf and m.elf.build_id)
    where = result.output
    image = os.fsdecode(scan.image)
    if not request.output and where.startswith(image + "/"):
        where = where[len(image) :]  # as installed: /usr/lib/debug/.tarball/...
    note = (
        ""
        if request.build_id or request.output
        else " (no BUILD_ID: FEATURES=binpkg-multi-instance is off, or no binpkg was built)"
    )
    log.info(
        f"packdebug: packed {_files_and_links(scan)} "
        f"({format_size(scan.data_size)}; {with_id} of {plural(len(elf), 'debug ELF', 'debug ELF')} "
        f"with a build-id) into {shown(where)}: {format_size(result.size)} in "
        f"{plural(result.blocks, 'xz block')}{note}"
    )


# ---------------------------------------------------------------------------
# 5. reading / extraction
# ---------------------------------------------------------------------------

PAX_LIMIT = 1 * MiB  # a pax or GNU long-name header larger than this is hostile
EXTENDED_CHAIN_MAX = 8  # extended headers before one member (pax g/x, GNU L/K)
MTIME_LIMIT = 1 << 40  # seconds either side of 1970: past this it is no time
# No package installs this many files; memory grows with the members verify
# and extract --all keep (a few hundred bytes each).
MEMBERS_LIMIT = 500_000
HEADER_CACHE = 65_536  # headers an Archive keeps, for lookups
EXTENDED_TYPES = (tarfile.XHDTYPE, tarfile.XGLTYPE, *tarfile.GNU_TYPES)
LINK_DEPTH = 40  # symlink hops, as the kernel's ELOOP limit
PATH_MAX = 4096  # <linux/limits.h>, with its terminating NUL
# estrip's links: .build-id/xx/yyyy.debug to the debug file, and
# .build-id/xx/yyyy to the binary (which is in the binpkg, not the tarball).
BUILD_ID_LINK = re.compile(
    re.escape(BUILD_ID_DIR) + r"/([0-9a-f]{2})/([0-9a-f]+)(\.debug)?"
)


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

    def __init__(self, fileobj: XzReader, offset: int) -> None:
        self.fileobj = fileobj
        self.pax_headers: dict = {}
        self.offset = offset


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


@dataclasses.dataclass
class Resolution:
    """Where following links from a member ends."""

    member: tarfile.TarInfo | None  # the regular file reached, if any
    last: tarfile.TarInfo  # the last member reached: the file, a directory...
    missing: str | None = None  # a link target that is not in the archive


def resolve_link(
    info: tarfile.TarInfo, members: Mapping[str, tarfile.TarInfo]
) -> Resolution:
    """Follow symlinks and hardlinks through `members` (normalized name -> member).

    The one link resolver: `verify`, `extract` and `repack` use it over a
    dict of the members read so far, or over an Archive's lazy lookup.
    """
    for _ in range(LINK_DEPTH):
        if info.isreg():
            return Resolution(info, info)
        target = link_target(info)
        if target is None:
            return Resolution(None, info)
        found = members.get(target)
        if found is None:
            return Resolution(None, info, target)
        info = found
    return Resolution(None, info)


class _Lookup(Mapping):
    """An Archive's members by name, looked up with `locate` when asked."""

    def __init__(self, archive: Archive) -> None:
        self.archive = archive

    def __getitem__(self, name: str) -> tarfile.TarInfo:
        info = self.archive.locate(name)
        if info is None:
            raise KeyError(name)
        return info

    def __iter__(self) -> Iterator[str]:
        return (normalize_name(i.name) for i in self.archive.members())

    def __len__(self) -> int:
        return sum(1 for _ in self.archive.members())


class Archive:
    """A .tar.xz opened for reading: its xz Blocks, and tar on top of them."""

    def __init__(self, path, *, sequential: bool = False) -> None:
        self.path = os.fsdecode(path)
        self.reader = XzReader(path, sequential=sequential)
        self._headers: dict[int, tarfile.TarInfo | None] = {}  # offset -> header

    def close(self) -> None:
        self.reader.close()

    @property
    def by_name(self) -> _Lookup:
        """Members by name.  Made on each use: kept, it would make a reference
        cycle, and every Archive, with its decoder's dictionary, would then
        live until the garbage collector's next full pass."""
        return _Lookup(self)

    def __enter__(self):
        return self

    def __exit__(self, *exc) -> None:
        self.close()

    def _fail(self, reason: str) -> ArchiveError:
        return ArchiveError(reason, self.path)

    def header_at(self, offset: int) -> tarfile.TarInfo | None:
        """The member whose header starts at `offset`; None at end of archive."""
        if offset not in self._headers:
            if len(self._headers) >= HEADER_CACHE:
                del self._headers[next(iter(self._headers))]  # the oldest
            self._headers[offset] = self._read_header(offset)
        return self._headers[offset]

    def _read_header(self, offset: int) -> tarfile.TarInfo | None:
        first = self.reader.read_at(offset, tarfile.BLOCKSIZE)
        if len(first) < tarfile.BLOCKSIZE:
            if not first:
                return None
            raise self._fail(
                f"tar header at byte {offset} is cut off: truncated archive"
            )
        if not any(first):
            return None
        try:
            info = tarfile.TarInfo.frombuf(first, "utf-8", "surrogateescape")
            if info.type in EXTENDED_TYPES:
                self._check_extended_chain(offset, info)
                self.reader.seek(offset)  # the extended header applies to the next one
                info = tarfile.TarInfo.fromtarfile(_TarCursor(self.reader, offset))
            else:  # what fromtarfile() would add to a plain header
                info.offset, info.offset_data = offset, offset + tarfile.BLOCKSIZE
                if info.isdir():
                    info.name = info.name.rstrip("/")
        except (tarfile.HeaderError, ValueError) as e:
            raise self._fail(
                f"bad tar header at byte {offset} ({e}): not a tar archive, or damaged"
            ) from None
        self._check_fields(info)
        if (
            info.type not in tarfile.SUPPORTED_TYPES
            or info.type == tarfile.GNUTYPE_SPARSE
        ):
            raise self._fail(
                f"member '{shown(info.name)}' has unsupported tar type {info.type!r}"
            )
        if info.offset_data + self.data_size(info) > self.reader.size:
            raise self._fail(
                f"member '{shown(info.name)}' runs past the end of the archive"
            )
        return info

    def _check_extended_chain(self, offset: int, info: tarfile.TarInfo) -> None:
        """Extended headers before a member: a few, each small.

        tarfile reads each one whole into memory, and recurses once per
        header; a crafted archive could chain thousands, or claim gigabytes.
        """
        start = offset
        for _ in range(EXTENDED_CHAIN_MAX):
            if not 0 <= info.size <= PAX_LIMIT:
                raise self._fail(
                    f"extended header at byte {offset} claims {info.size} bytes"
                )
            offset += tarfile.BLOCKSIZE + round_up(info.size, tarfile.BLOCKSIZE)
            block = self.reader.read_at(offset, tarfile.BLOCKSIZE)
            if len(block) < tarfile.BLOCKSIZE:
                return  # tarfile says it is cut off
            info = tarfile.TarInfo.frombuf(block, "utf-8", "surrogateescape")
            if info.type not in EXTENDED_TYPES:
                return
        raise self._fail(
            f"more than {EXTENDED_CHAIN_MAX} extended headers in a row at byte {start}"
        )

    def _check_fields(self, info: tarfile.TarInfo) -> None:
        """Sizes and times that later arithmetic can trust."""
        name = shown(info.name)
        if info.size < 0:
            raise self._fail(f"member '{name}' has a negative size ({info.size})")
        if not (math.isfinite(info.mtime) and abs(info.mtime) < MTIME_LIMIT):
            raise self._fail(f"member '{name}' has mtime {info.mtime}: not a time")

    def nonzero_from(self, offset: int) -> int | None:
        """Where the first non-zero byte from `offset` on is; None if only zeros follow."""
        while offset < self.reader.size:
            chunk = self.reader.read_at(offset, READ_CHUNK)
            zeros = len(chunk) - len(chunk.lstrip(b"\0"))
            if zeros < len(chunk):
                return offset + zeros
            offset += len(chunk)
        return None

    @staticmethod
    def data_size(info: tarfile.TarInfo) -> int:
        return info.size if info.isreg() else 0

    @staticmethod
    def next_offset(info: tarfile.TarInfo) -> int:
        """Where the header after this member starts."""
        return info.offset_data + round_up(Archive.data_size(info), tarfile.BLOCKSIZE)

    def members(self, start: int = 0) -> Iterator[tarfile.TarInfo]:
        """Every member from the header at `start` on, reading only headers."""
        offset = start
        for _ in range(MEMBERS_LIMIT):
            info = self.header_at(offset)
            if info is None:
                return
            yield info
            offset = self.next_offset(info)
        raise self._fail(
            f"holds more than {MEMBERS_LIMIT:,} members, more than any package "
            "installs: damaged or hostile"
        )

    def member_bytes(self, info: tarfile.TarInfo, offset: int, size: int) -> bytes:
        """Bytes of a member's data, as read_elf's read_at wants them."""
        return self.reader.read_at(info.offset_data + offset, size)

    def data(self, info: tarfile.TarInfo, chunk: int = READ_CHUNK) -> Iterator[bytes]:
        """A member's data, in order, in bounded chunks."""
        done, size = 0, self.data_size(info)
        while done < size:
            piece = self.reader.read_at(
                info.offset_data + done, min(chunk, size - done)
            )
            if not piece:
                raise self._fail(
                    f"member '{shown(info.name)}' runs past the end of the archive"
                )
            done += len(piece)
            yield piece

    def elf_info(
        self, info: tarfile.TarInfo, *, sections: bool = True
    ) -> ElfInfo | None:
        """ElfInfo of a regular member, or None if it is not ELF."""
        if (
            not info.isreg()
            or info.size < 4
            or self.member_bytes(info, 0, 4) != ELF_MAGIC
        ):
            return None
        return read_elf(
            functools.partial(self.member_bytes, info),
            info.size,
            f"{self.path}:{info.name}",
            sections=sections,
        )

    def locate(self, name: str) -> tarfile.TarInfo | None:
        """The member called `name` (any spelling), reading as little as possible.

        In packdebug's layout (sorted members, every Block but a large
        member's continuation starting with a header, the end marker in its
        own Block) a bisection over the Block starts finds the right Block,
        reading O(log n) headers; any other archive is searched header by
        header.
        """
        wanted = normalize_name(name)
        key = canonical_key(wanted)
        start = self._block_holding(key) if self.is_packdebug_layout() else None
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

    def is_packdebug_layout(self) -> bool:
        blocks = self.reader.layout.blocks
        if len(blocks) < 2 or self.reader.layout.streams != 1:
            return False
        last = blocks[-1]
        return last.uncompressed_size >= 2 * tarfile.BLOCKSIZE and not any(
            self.reader.read_at(last.uncompressed_offset, 2 * tarfile.BLOCKSIZE)
        )

    def _first_member(self, index: int) -> tarfile.TarInfo | None:
        """The member whose header opens Block `index`, or None if it continues one."""
        try:
            info = self.header_at(self.reader.layout.blocks[index].uncompressed_offset)
        except ArchiveError:
            return None
        if info is None or canonical_key(info.name)[0] == len(DEBUG_TREES):
            return None  # not a header, or not a name packdebug writes
        return info

    def _block_holding(self, key: tuple) -> int | None:
        """Offset of the last header-led Block whose first member sorts <= key.

        Bisects over the Blocks before the end marker's; a Block that does
        not start with a header continues a large member, so the probe
        steps back to the Block that holds that member's header.  Returns
        None when the probes are not in order, so not packdebug's layout.
        """
        lo, hi = 0, len(self.reader.layout.blocks) - 1
        found, probes = 0, []
        while lo < hi:
            mid = (lo + hi) // 2
            index = mid
            while index >= lo and (info := self._first_member(index)) is None:
                index -= 1
            if index < lo:
                lo = mid + 1
                continue
            first = canonical_key(info.name)
            probes.append((index, first))
            if first <= key:
                found = self.reader.layout.blocks[index].uncompressed_offset
                lo = mid + 1
            else:
                hi = index
        keys = [first for _, first in sorted(probes)]
        return found if keys == sorted(keys) else None

    def resolve(self, info: tarfile.TarInfo) -> Resolution:
        """Follow symlinks and hardlinks inside the archive."""
        return resolve_link(info, self.by_name)

    def find_build_id(self, build_id: str) -> tarfile.TarInfo | None:
        """The regular member holding the ELF with that build-id: by link, else by notes."""
        return self.find_build_id_by_link(build_id) or self.find_build_id_by_notes(
            build_id
        )

    def find_build_id_by_link(self, build_id: str) -> tarfile.TarInfo | None:
        """Through estrip's .build-id/xx/yyyy.debug link (a few headers), confirmed by the ELF note."""
        link = self.locate(f"{BUILD_ID_DIR}/{build_id[:2]}/{build_id[2:]}.debug")
        target = self.resolve(link).member if link is not None else None
        if target is not None and self._has_build_id(target, build_id):
            return target
        return None

    def find_build_id_by_notes(self, build_id: str) -> tarfile.TarInfo | None:
        """For archives without the links: one pass over the data for the note.

        A build-id note's name "GNU\\0" is followed at once by the id (for 4-
        and 8-byte note alignment alike), so only a member holding those
        bytes can be the ELF; its notes are then read to confirm it.
        """
        needle = b"GNU\x00" + bytes.fromhex(build_id)
        info = None
        for offset in self._offsets_of(needle):
            if info is None or self.next_offset(info) <= offset:
                start = self._header_before(offset, info.offset if info else 0)
                info = next(
                    (i for i in self.members(start) if self.next_offset(i) > offset),
                    None,
                )
            if info is None:
                return None
            if info.offset_data <= offset and self._has_build_id(info, build_id):
                return info
        return None

    def _header_before(self, offset: int, known: int) -> int:
        """A header at or before `offset`, no earlier than the header at `known`.

        In packdebug's layout, the nearest Block start before `offset` that
        opens with a header; elsewhere only `known` is certain.
        """
        if not self.is_packdebug_layout():
            return known
        starts = self.reader.block_starts
        index = bisect.bisect_right(starts, offset) - 1
        while starts[index] > known and self._first_member(index) is None:
            index -= 1
        return max(starts[index], known)

    def _offsets_of(self, needle: bytes) -> Iterator[int]:
        """Every offset in the uncompressed tar where `needle` starts, in order."""
        tail = b""
        for offset, chunk in self.reader.chunks():
            window, base = tail + chunk, offset - len(tail)
            found = window.find(needle)
            while found >= 0:
                yield base + found
                found = window.find(needle, found + 1)
            tail = window[len(window) - len(needle) + 1 :]

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
    mode: int = 0
    mtime: int = 0
    offset: int = 0  # of the header, in the uncompressed tar
    block: int = 0  # the xz Block holding the header


def list_archive(archive: Archive) -> Iterator[Listing]:
    """Each member with its kind and build-id, reading headers and ELF notes only."""
    starts = archive.reader.block_starts
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
            info.mode,
            int(info.mtime),
            info.offset,
            bisect.bisect_right(starts, info.offset),
        )


def copy_member(archive: Archive, info: tarfile.TarInfo, out) -> None:
    """Copy a member's data, verifying the checks of every Block it spans.

    Reads from the member's header on, so the Blocks holding the header and
    the data are each decompressed to their end and so checked.  Then a
    header, or the end of the archive, must follow the member: Blocks
    reordered under a rewritten Index each pass their check, but a member's
    data then runs into another's, and ends where neither follows.
    """
    reader = archive.reader
    reader.seek(info.offset)
    reader.read(info.offset_data - info.offset)
    out.writelines(archive.data(info))
    reader.finish_block()
    after = archive.next_offset(info)
    if archive.header_at(after) is None and archive.nonzero_from(after) is not None:
        raise ArchiveError(
            f"member '{shown(info.name)}' runs into data that is not its own: its "
            "Blocks are out of order or damaged (verify tells more)",
            archive.path,
        )


# Extraction of everything, safely.


def symlink_escapes(name: str, linkname: str) -> str:
    """Why a symlink `name` -> `linkname` may lead outside, or "" if it cannot.

    Stricter than tarfile's 'data' filter, and independent of the order in
    which links are made: '..' may only lead the target, and no further up
    than the link's own directory is deep.  A '..' after a name would climb
    out of whatever that name is or becomes (`d -> .` then `e -> d/..`).
    Every directory that holds a link is a real one (extraction never opens
    a symlink as a directory), so a target of that shape resolves inside,
    however other links in it resolve.
    """
    if linkname.startswith("/"):
        return "absolute"
    parts = [p for p in linkname.split("/") if p not in ("", ".")]
    ups = 0
    while ups < len(parts) and parts[ups] == "..":
        ups += 1
    if ".." in parts[ups:]:
        return f"'..' after a name in {shown(linkname)}"
    depth = normalize_name(name).count("/")
    if ups > depth:
        return f"{shown(linkname)} climbs {ups} levels from a link {depth} deep"
    return ""


def safe_file_mode(mode: int) -> int:
    """A file's mode as tarfile's 'data' filter leaves it (PEP 706).

    No setuid, setgid or sticky bit, no write for group and others, always
    read and write for the owner, and no exec bit if the owner has none.
    """
    safe = mode & 0o755 | 0o600
    return safe if mode & 0o100 else safe & ~0o111


def _temporary_name() -> str:
    """A hidden name of fixed length, so that no long member name makes it too long."""
    return f".packdebug-{os.urandom(6).hex()}.tmp"


_KINDS = (
    (tarfile.TarInfo.isdir, "directory"),
    (tarfile.TarInfo.isreg, "file"),
    (tarfile.TarInfo.issym, "symlink"),
    (tarfile.TarInfo.islnk, "hardlink"),
)


@dataclasses.dataclass
class _Pending:
    """A member read but not yet in place: its Blocks' checks are still to pass."""

    info: tarfile.TarInfo
    kind: str  # "directory", "file", "symlink" or "hardlink"
    parts: list[str]  # the normalized name's components
    end: int  # uncompressed offset up to which its Blocks must be verified
    temp: str = ""  # a file's data, written beside its final name
    target: str = ""  # a symlink's target; a hardlink's, normalized


class SafeExtractor:
    """Extracts members under one directory, refusing all that could escape it.

    Refused, each with its own error class: absolute names, '..', NUL
    bytes, devices and FIFOs, symlinks that lead or may come to lead
    outside (symlink_escapes), hardlinks to anything but an earlier file
    or a safe symlink, and a member whose name is taken by another kind.
    Every path is opened component by component with O_NOFOLLOW below the
    directory, so no symlink, extracted or already there, redirects a later
    member.  setuid/setgid/sticky bits are dropped.

    A regular file is written to a hidden temporary name in its directory,
    and nothing takes its final name, nor is any link made, until every
    Block its header and data span has passed its check: a failed or
    interrupted extraction leaves no file with wrong bytes.
    """

    def __init__(self, archive: Archive, dest: str) -> None:
        self.archive, self.dest = archive, os.path.abspath(dest)
        try:
            st = os.stat(self.dest)
            if not stat.S_ISDIR(st.st_mode):
                raise OutputError(
                    f"is {file_kind(st.st_mode)}, not a directory: -C takes the "
                    "directory to extract into",
                    self.dest,
                )
        except FileNotFoundError:
            pass
        try:
            os.makedirs(self.dest, exist_ok=True)
            self.dest_fd = os.open(
                self.dest, os.O_RDONLY | os.O_DIRECTORY | os.O_CLOEXEC
            )
        except OSError as e:
            raise OutputError(f"cannot create: {e.strerror}", self.dest) from None
        self.kinds: dict[str, str] = {"": "directory"}  # member name -> kind
        self.placed: set[str] = set()  # names this extraction put in place
        self.links: dict[str, str] = {}  # symlink member -> its target
        self.pending: list[_Pending] = []
        self.extracted = 0
        self.dir_times: list[tuple[list[str], int, int]] = []

    def close(self) -> None:
        os.close(self.dest_fd)

    def incomplete(self) -> str:
        return (
            f"{plural(self.extracted, 'member')} extracted before it; "
            f"{shown(self.dest)} is incomplete"
        )

    # Checks, before anything is written.

    def check(self, info: tarfile.TarInfo) -> tuple[str, str]:
        """(normalized name, kind) of a member that is safe to extract."""
        name = info.name
        if "\0" in name or "\0" in info.linkname:
            raise BadNameError(name, "has a NUL byte in its name or link target")
        if name.startswith("/"):
            raise AbsolutePathError(name, "absolute path")
        if ".." in name.split("/"):
            raise OutsideDestinationError(name, "'..' component leads outside")
        norm = normalize_name(name)
        kind = next((kind for test, kind in _KINDS if test(info)), "")
        if not kind:
            raise SpecialFileError(
                name, "devices, FIFOs and other special files are not extracted"
            )
        if not norm:
            if kind == "directory":
                return norm, kind
            raise BadNameError(name, "names the directory itself")
        self._check_lengths(info, norm, kind)
        self._check_parents(name, norm)
        previous = self.kinds.get(norm)
        if previous and (previous == "directory") != (kind == "directory"):
            raise TypeConflictError(
                name, f"a {previous} of that name was extracted before"
            )
        if kind == "symlink":
            why = symlink_escapes(norm, info.linkname)
            if why:
                error = (
                    AbsoluteLinkError
                    if why == "absolute"
                    else LinkOutsideDestinationError
                )
                raise error(name, f"symlink to {shown(info.linkname)}: {why}")
        if kind == "hardlink":
            self._check_hardlink(info, norm)
        return norm, kind

    def _check_lengths(self, info: tarfile.TarInfo, norm: str, kind: str) -> None:
        """Refuse, never cut, what the file system cannot hold (PATH_MAX 4096)."""
        path = len(os.fsencode(self.dest)) + 1 + len(os.fsencode(norm))
        target = len(os.fsencode(info.linkname))
        if path >= PATH_MAX or target >= PATH_MAX:
            raise NameTooLongError(
                info.name,
                f"{'path' if path >= PATH_MAX else 'link target'} longer than "
                f"the {PATH_MAX - 1} bytes a path may have",
            )
        if kind == "symlink" and not info.linkname:
            raise BadNameError(info.name, "symlink without a target")
        if kind == "hardlink" and not normalize_name(info.linkname):
            raise BadNameError(info.name, "hardlink without a target")

    def _check_parents(self, name: str, norm: str) -> None:
        parts = norm.split("/")
        for depth in range(1, len(parts)):
            parent = "/".join(parts[:depth])
            kind = self.kinds.get(parent)
            if kind not in (None, "directory"):
                raise TypeConflictError(
                    name, f"its parent {shown(parent)} is a {kind}, not a directory"
                )

    def _check_hardlink(self, info: tarfile.TarInfo, norm: str) -> None:
        target = info.linkname
        if target.startswith("/") or ".." in target.split("/"):
            raise LinkOutsideDestinationError(
                info.name, f"hardlink to {shown(target)} outside the directory"
            )
        kind = self.kinds.get(normalize_name(target))
        if kind is None:
            raise HardlinkTargetError(
                info.name,
                f"hardlink to {shown(target)}, which is not an earlier member",
            )
        if kind == "directory":
            raise HardlinkTargetError(
                info.name, f"hardlink to the directory {shown(target)}"
            )
        if kind == "symlink":  # the same inode as that symlink: judged where it lands
            linkname = self.links[normalize_name(target)]
            why = symlink_escapes(norm, linkname)
            if why:
                raise LinkOutsideDestinationError(
                    info.name,
                    f"hardlink to the symlink {shown(target)} -> {shown(linkname)}: {why}",
                )

    # Reading: regular files go to temporary files at once.

    def add(self, info: tarfile.TarInfo) -> None:
        norm, kind = self.check(info)
        end = Archive.next_offset(info)
        pending = _Pending(info, kind, norm.split("/") if norm else [], end)
        if kind == "symlink":
            pending.target = self.links[norm] = info.linkname
        elif kind == "hardlink":
            pending.target = normalize_name(info.linkname)
            if self.kinds[pending.target] == "symlink":  # the same inode: that symlink
                pending.kind = "symlink"
                pending.target = self.links[norm] = self.links[pending.target]
        self.kinds[norm] = "file" if pending.kind == "hardlink" else pending.kind
        self.pending.append(pending)  # first: abort() must find a temporary file
        if kind == "file":
            self._write_temporary(pending)
        self.commit(self.archive.reader.verified_until())

    def _parent(self, info: tarfile.TarInfo, parts: list[str]) -> int:
        """The member's parent directory, made where missing, never through a symlink."""
        try:
            return open_beneath(self.dest_fd, parts[:-1], create=True)
        except OSError as e:
            raise self._os_error(info, e, "its parent directory") from None

    def _os_error(
        self, info: tarfile.TarInfo, e: OSError, what: str = ""
    ) -> ExtractError:
        if e.errno == errno.ENAMETOOLONG:
            return NameTooLongError(
                info.name, "name or link target too long for the file system"
            )
        if e.errno in (errno.ELOOP, errno.ENOTDIR):
            return TypeConflictError(
                info.name,
                f"{what or 'its path'} is a symlink or a file in {shown(self.dest)}",
            )
        if e.errno in (errno.EISDIR, errno.ENOTEMPTY, errno.EEXIST):
            return TypeConflictError(
                info.name, f"a directory is in the way in {shown(self.dest)}"
            )
        return ExtractError(info.name, f"cannot extract: {e.strerror}")

    def _write_temporary(self, pending: _Pending) -> None:
        """The member's data, in a hidden file in its directory, until it is verified."""
        info = pending.info
        fd = self._parent(info, pending.parts)
        pending.temp = _temporary_name()  # before it exists: abort() may remove it
        try:
            flags = os.O_WRONLY | os.O_CREAT | os.O_EXCL | os.O_NOFOLLOW | os.O_CLOEXEC
            with open(os.open(pending.temp, flags, 0o600, dir_fd=fd), "wb") as f:
                f.writelines(self.archive.data(info))
                os.fchmod(f.fileno(), safe_file_mode(info.mode))
                os.utime(f.fileno(), (int(info.mtime), int(info.mtime)))
        except BaseException as e:
            with contextlib.suppress(OSError):
                os.unlink(pending.temp, dir_fd=fd)
            pending.temp = ""
            if isinstance(e, OSError):
                raise self._os_error(info, e) from None
            raise
        finally:
            os.close(fd)

    # Committing, once the Blocks are verified.

    def commit(self, verified: int) -> None:
        """Put in place, in order, every pending member whose Blocks are verified."""
        done = 0
        for pending in self.pending:
            if pending.end > verified:
                break
            self._put(pending)
            done += 1
            self.extracted += 1
        del self.pending[:done]

    def _put(self, pending: _Pending) -> None:
        info, parts = pending.info, pending.parts
        if not parts:
            return
        fd = self._parent(info, parts)
        name = parts[-1]
        try:
            if pending.kind == "directory":
                self._mkdir(fd, name, info)
            else:
                self._refuse_in_the_way(fd, name, info, "/".join(parts))
                if pending.kind == "file":
                    os.replace(pending.temp, name, src_dir_fd=fd, dst_dir_fd=fd)
                    pending.temp = ""
                elif pending.kind == "symlink":
                    target = pending.target
                    self._place(
                        fd, name, lambda temp: os.symlink(target, temp, dir_fd=fd)
                    )
                else:
                    self._hardlink(fd, name, info, pending.target.split("/"))
            self.placed.add("/".join(parts))
        except OSError as e:
            raise self._os_error(info, e) from None
        finally:
            os.close(fd)

    def _refuse_in_the_way(
        self, fd: int, name: str, info: tarfile.TarInfo, norm: str
    ) -> None:
        """A directory, or a symlink this extraction did not make, is never replaced."""
        try:
            mode = os.stat(name, dir_fd=fd, follow_symlinks=False).st_mode
        except FileNotFoundError:
            return
        if stat.S_ISDIR(mode):
            raise TypeConflictError(
                info.name, f"a directory is in the way in {shown(self.dest)}"
            )
        if stat.S_ISLNK(mode) and norm not in self.placed:
            raise TypeConflictError(
                info.name,
                f"a symlink that was already in {shown(self.dest)} is in the way",
            )

    def _mkdir(self, fd: int, name: str, info: tarfile.TarInfo) -> None:
        with contextlib.suppress(FileExistsError):
            os.mkdir(name, 0o700, dir_fd=fd)
        sub = os.open(
            name, os.O_RDONLY | os.O_DIRECTORY | os.O_NOFOLLOW | os.O_CLOEXEC, dir_fd=fd
        )
        try:
            os.fchmod(sub, info.mode & 0o755 | 0o700)
        finally:
            os.close(sub)
        self.dir_times.append(
            (
                normalize_name(info.name).split("/"),
                info.mode & 0o755 | 0o700,
                int(info.mtime),
            )
        )

    @staticmethod
    def _place(fd: int, name: str, make: Callable[[str], None]) -> None:
        """make() an entry under a hidden name, then rename it over `name`."""
        temp = _temporary_name()
        with signals_held():
            try:
                make(temp)
                os.replace(temp, name, src_dir_fd=fd, dst_dir_fd=fd)
            finally:  # rename() leaves both names of one inode (a hardlink to itself)
                with contextlib.suppress(OSError):
                    os.unlink(temp, dir_fd=fd)

    def _hardlink(
        self, fd: int, name: str, info: tarfile.TarInfo, source: list[str]
    ) -> None:
        src_fd = self._parent(info, source)
        try:
            st = os.stat(source[-1], dir_fd=src_fd, follow_symlinks=False)
            if not stat.S_ISREG(st.st_mode):
                raise HardlinkTargetError(
                    info.name,
                    f"hardlink to {shown(info.linkname)}, which is not a file",
                )
            self._place(
                fd,
                name,
                lambda temp: os.link(
                    source[-1],
                    temp,
                    src_dir_fd=src_fd,
                    dst_dir_fd=fd,
                    follow_symlinks=False,
                ),
            )
        finally:
            os.close(src_fd)

    def abort(self) -> None:
        """Remove the temporary files of members not yet in place."""
        for pending in self.pending:
            if pending.temp:
                with contextlib.suppress(OSError):
                    fd = open_beneath(self.dest_fd, pending.parts[:-1])
                    try:
                        os.unlink(pending.temp, dir_fd=fd)
                    finally:
                        os.close(fd)
        self.pending.clear()

    def finish(self) -> None:
        """Verify the rest, put everything in place, then directory modes and mtimes."""
        self.archive.reader.verify_all()
        self.commit(self.archive.reader.size)
        for parts, mode, mtime in sorted(self.dir_times, reverse=True):
            with contextlib.suppress(OSError):
                fd = open_beneath(self.dest_fd, parts)
                try:
                    os.fchmod(fd, mode)
                    os.utime(fd, (mtime, mtime))
                finally:
                    os.close(fd)


def extract_all(archive: Archive, dest: str) -> int:
    """Extract every member safely under dest; return how many."""
    extractor = SafeExtractor(archive, dest)
    try:
        for info in archive.members():
            extractor.add(info)
        extractor.finish()
        return extractor.extracted
    except PackdebugError as e:
        extractor.abort()
        e.hint = "; ".join(filter(None, (e.hint, extractor.incomplete())))
        raise e.at(archive.path) from None
    except BaseException as e:  # Ctrl-C, SIGTERM: say what is left
        extractor.abort()
        e.packdebug_state = extractor.incomplete()
        raise
    finally:
        extractor.close()


# verify


@dataclasses.dataclass
class Check:
    """One line of `verify`: what was checked, whether it passed, and how.

    A note passes, but says something worth knowing.
    """

    name: str
    ok: bool
    detail: str
    note: bool = False

    @property
    def label(self) -> str:
        return "FAIL" if not self.ok else "note" if self.note else "ok  "


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
            f"{plural(blocks, 'xz block')}: debuginfod needs more than one to seek, so it "
            "decompresses the whole file for every request; repack it",
        )
    return Check("seekable", True, f"debuginfod >= 0.192 seeks in its {blocks} blocks")


def _container_check(layout: XzLayout, reader: XzReader) -> Check:
    """The xz data's integrity: every Block's check verified.

    Several Streams or Stream Padding are not damage: `seekable` fails for
    them, and repack rewrites such a file.
    """
    names = ", ".join(
        LIBLZMA_CHECKS.get(c, f"check 0x{c:02x}") for c in sorted(layout.checks)
    )
    shape = f"{plural(layout.streams, 'stream')}, {plural(len(layout.blocks), 'block')}, {names}"
    if layout.stream_padding:
        shape += f", {layout.stream_padding} bytes of stream padding"
    unverifiable = layout.checks - {CHECK_CRC32, CHECK_CRC64, CHECK_SHA256}
    if unverifiable:
        what = ", ".join(
            "no check" if c == CHECK_NONE else f"check 0x{c:02x}"
            for c in sorted(unverifiable)
        )
        return Check(
            "xz",
            False,
            f"{shape}: {what} to verify the data by (xz --check=crc64 writes one)",
        )
    missing = len(layout.blocks) - len(reader.verified_blocks)
    if missing:
        return Check("xz", False, f"{shape}: {plural(missing, 'block')} not verified")
    return Check("xz", True, f"{shape}, every block's check verified")


class _TarAudit:
    """What one sequential pass over the members finds for `verify`."""

    def __init__(self, archive: Archive) -> None:
        self.archive = archive
        self.members: list[tarfile.TarInfo] = []
        self.by_name: dict[str, tarfile.TarInfo] = {}
        self.build_ids: dict[str, str | None] = {}
        self.problems: dict[str, list[str]] = {"tar": [], "build-ids": [], "names": []}
        self.dot_slash = 0  # names with only a leading './'
        self.debug_elf = 0

    def run(self) -> None:
        for info in self.archive.members():
            self.add(info)
        end = Archive.next_offset(self.members[-1]) if self.members else 0
        self._check_end(end)
        self.archive.reader.verify_all()

    def _check_end(self, end: int) -> None:
        """The end-of-archive marker, and nothing but zeros after it."""
        reader = self.archive.reader
        if reader.read_at(end, 2 * tarfile.BLOCKSIZE) != bytes(2 * tarfile.BLOCKSIZE):
            self.problems["tar"].append("no end-of-archive marker")
            return
        at = self.archive.nonzero_from(end + 2 * tarfile.BLOCKSIZE)
        if at is not None:
            self.problems["tar"].append(
                f"data after the end-of-archive marker (from byte {at}): members "
                "there are invisible to tar and debuginfod"
            )

    def add(self, info: tarfile.TarInfo) -> None:
        name = normalize_name(info.name)
        self.members.append(info)
        problems = name_problems(info.name)
        if problems == [DOT_SLASH_NAME]:
            self.dot_slash += 1
        elif problems:
            texts = ", ".join(p.text for p in problems)
            self.problems["names"].append(f"{shown(info.name)}: {texts}")
        if name in self.by_name:
            self.problems["tar"].append(f"duplicate member '{shown(name)}'")
        if info.islnk() and normalize_name(info.linkname) not in self.by_name:
            self.problems["tar"].append(
                f"hardlink '{shown(name)}' to {shown(info.linkname)}, which comes later or not at all"
            )
        self.by_name[name] = info
        if info.isreg() and name.startswith(DEBUG_DIR + "/"):
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
            self.problems["build-ids"].append(
                f"{shown(name)}: debug ELF without a build-id"
            )

    def link_problems(self) -> tuple[int, list[str]]:
        """Each .build-id/xx/yyyy.debug link must reach an ELF with that build-id."""
        problems, links = [], 0
        for name, info in self.by_name.items():
            match = BUILD_ID_LINK.fullmatch(name)
            if not match or not match[3] or not info.issym():
                continue
            links += 1
            target = resolve_link(info, self.by_name).member
            if target is None:
                problems.append(
                    f"{shown(name)} -> {shown(info.linkname)}: does not resolve inside the archive"
                )
                continue
            target_name = normalize_name(target.name)
            found = self.build_ids.get(target_name)
            if found != match[1] + match[2]:
                problems.append(
                    f"{shown(name)} -> {shown(target_name)}: that file's build-id is {found}"
                )
        return links, problems

    def names_check(self) -> Check:
        if self.problems["names"]:
            return _problems_check("names", self.problems["names"], "")
        if self.dot_slash:
            return Check(
                "names",
                True,
                f"{plural(self.dot_slash, 'member name')} start with './', as GNU tar "
                "writes them for Portage; debuginfod serves them as /usr/..., and "
                "`packdebug repack` writes clean names",
                note=True,
            )
        return Check("names", True, "member names are relative and clean")


def verify_archive(path, *, all_problems: bool = False) -> Verification:
    """Every check of `packdebug verify`, in one sequential pass."""
    with Archive(path, sequential=True) as archive:
        audit = _TarAudit(archive)
        try:
            audit.run()
        except XzError as e:
            return Verification(
                archive.path,
                [
                    Check("xz", False, e.reason + (f"; {e.hint}" if e.hint else "")),
                    seekability(archive.reader.layout),
                    Check("tar", False, "not checked: the xz data is damaged"),
                ],
                audit.members,
            )
        except ArchiveError as e:
            audit.problems["tar"].insert(0, e.reason)
            with contextlib.suppress(XzError):
                archive.reader.verify_all()
        links, link_problems = audit.link_problems()
        regular = sum(1 for m in audit.members if m.isreg())
        limit = None if all_problems else 5
        checks = [
            _container_check(archive.reader.layout, archive.reader),
            seekability(archive.reader.layout),
            _problems_check(
                "tar",
                audit.problems["tar"],
                f"{plural(len(audit.members), 'member')} ({plural(regular, 'file')}), "
                "end-of-archive marker, nothing after it",
                limit,
            ),
            _problems_check(
                "build-ids",
                audit.problems["build-ids"],
                f"{plural(audit.debug_elf, 'debug ELF', 'debug ELF')}, each with a build-id",
                limit,
            ),
            _problems_check(
                "links",
                link_problems,
                f"{plural(links, '.build-id/*.debug link')}, each resolving inside the "
                "archive to its ELF",
                limit,
            ),
            audit.names_check(),
        ]
        return Verification(archive.path, checks, audit.members)


def _problems_check(
    name: str, problems: list[str], fine: str, limit: int | None = 5
) -> Check:
    if not problems:
        return Check(name, True, fine)
    shown_problems = problems if limit is None else problems[:limit]
    more = len(problems) - len(shown_problems)
    suffix = f" (and {more} more; -v shows all)" if more else ""
    return Check(name, False, "; ".join(shown_problems) + suffix)


# ---------------------------------------------------------------------------
# 6. binhost upkeep: the tarball root
# ---------------------------------------------------------------------------


@dataclasses.dataclass(frozen=True)
class RootEntry:
    """An entry under a tarball root, as walk_root finds it."""

    path: str  # relative to the root: CAT/PN/FILE
    depth: int  # 1 for CAT, 2 for CAT/PN, 3 for CAT/PN/FILE
    st: os.stat_result

    @property
    def is_dir(self) -> bool:
        return stat.S_ISDIR(self.st.st_mode)


def check_root(root: str, flag: str) -> None:
    """A root given on the command line must be a directory (exit 2 if not)."""
    try:
        st = os.stat(root)
    except OSError as e:
        raise UsageError(f"{e.strerror} (check {flag})", root) from None
    if not stat.S_ISDIR(st.st_mode):
        raise UsageError(
            f"is {file_kind(st.st_mode)}, not a directory (check {flag})", root
        )


def walk_root(root: str, max_depth: int | None = None) -> Iterator[RootEntry]:
    """Every entry under root, depth-first, sorted by name, symlinks never followed.

    Hidden names (a pack's temporary files) are passed over; a directory
    at max_depth is yielded but not entered.  An entry removed meanwhile
    (a prune beside) is passed over too.
    """
    stack = [("", 0)]
    while stack:
        rel, depth = stack.pop()
        try:
            names = sorted(os.listdir(os.path.join(root, rel) if rel else root))
        except FileNotFoundError:
            continue
        except OSError as e:
            raise InputError(
                f"cannot list: {e.strerror}", os.path.join(root, rel)
            ) from None
        entered = []
        for name in names:
            if name.startswith("."):
                continue
            path = f"{rel}/{name}" if rel else name
            try:
                st = os.lstat(os.path.join(root, path))
            except FileNotFoundError:
                continue
            entry = RootEntry(path, depth + 1, st)
            yield entry
            if entry.is_dir and (max_depth is None or entry.depth < max_depth):
                entered.append((path, depth + 1))
        stack.extend(reversed(entered))


def iter_tarballs(root: str) -> Iterator[str]:
    """Every *.tar.xz file under root, sorted, without following symlinks."""
    for entry in walk_root(root):
        if entry.path.endswith(".tar.xz") and stat.S_ISREG(entry.st.st_mode):
            yield os.path.join(root, entry.path)


def each_tarball(
    work: Callable[[str], object], paths: Sequence[str], jobs: int
) -> Iterator:
    """work(path) for each path, in their order, on up to `jobs` worker processes.

    A binhost holds thousands of small tarballs, each a single xz Block that
    one core decompresses: the parallelism is across tarballs, in processes
    (reading tar headers and ELF notes holds the GIL).  At most `jobs`
    tarballs are open at once; results come back in order.  A worker keeps
    nothing from one tarball to the next, so its memory is that of the
    largest tarball, however many it goes through.
    """
    jobs = min(jobs or available_cpus(), len(paths))
    if jobs <= 1:
        yield from map(work, paths)
        return
    import multiprocessing  # imported here: a single tarball needs no workers

    pool = multiprocessing.get_context("fork").Pool(jobs, initializer=_worker_start)
    try:
        yield from pool.imap(functools.partial(_in_worker, work), paths, chunksize=4)
        pool.close()
    except BaseException:
        pool.terminate()
        raise
    finally:
        pool.join()


def _worker_start() -> None:
    """Ctrl-C is the parent's to answer; SIGTERM (terminate) still runs cleanups."""
    signal.signal(signal.SIGINT, signal.SIG_IGN)
    signal.signal(signal.SIGTERM, on_signal)
    _Signals.worker, _Signals.stopping = True, False  # forked maybe while stopping


def _in_worker(work: Callable[[str], object], path: str) -> object:
    _Signals.working = True
    try:
        return work(path)
    except Terminated:
        os._exit(143)  # cleanups ran; the parent says what happened
    finally:
        _Signals.working = False


# ---------------------------------------------------------------------------
# 6. binhost upkeep: repack
# ---------------------------------------------------------------------------

RANDOM_ACCESS_BLOCK = 16 * MiB  # larger Blocks are spooled, not re-read
STRUCTURE_CHECKS = ("xz", "seekable", "tar", "names")  # what repack must get right


def canonical_headers(
    members: Sequence[tarfile.TarInfo], source_date_epoch: int | None = None
) -> list[tuple[tarfile.TarInfo, tarfile.TarInfo | None]]:
    """(canonical header, member holding its data) pairs, in packdebug's order.

    Names are normalized and headers made by reproducible_header, as pack
    makes them; of each set of hardlinked names the first in the new order
    holds the data, the others become hardlinks to it.
    """
    by_name = {normalize_name(i.name): i for i in members}
    holder: dict[int, str] = {}  # id(member with the data) -> its first new name
    pairs = []
    for info in sorted(members, key=lambda i: canonical_key(i.name)):
        name = normalize_name(info.name)
        if info.isdir() or info.issym():
            kind = tarfile.DIRTYPE if info.isdir() else tarfile.SYMTYPE
            new = reproducible_header(
                name, kind, info.mode, info.mtime, source_date_epoch
            )
            new.linkname = info.linkname if info.issym() else ""
            pairs.append((new, None))
            continue
        data = _data_member(info, by_name)
        if id(data) in holder:
            new = reproducible_header(
                name, tarfile.LNKTYPE, info.mode, info.mtime, source_date_epoch
            )
            new.linkname = holder[id(data)]
        else:
            holder[id(data)] = name
            new = reproducible_header(
                name,
                tarfile.REGTYPE,
                info.mode,
                info.mtime,
                source_date_epoch,
                data.size,
            )
        pairs.append((new, data))
    date_directories([new for new, _ in pairs])
    return pairs


def _data_member(info: tarfile.TarInfo, by_name: Mapping) -> tarfile.TarInfo:
    """The regular member whose data a file or hardlink member has."""
    if not (info.isreg() or info.islnk()):
        raise ArchiveError(
            f"member '{shown(info.name)}': a {info.type!r} member cannot be repacked"
        )
    if info.islnk():
        target = by_name.get(normalize_name(info.linkname))
        if target is None or not (target.isreg() or target.islnk()):
            raise ArchiveError(
                f"hardlink '{shown(info.name)}' to {shown(info.linkname)}, which is not "
                "a file of the archive"
            )
    resolved = resolve_link(info, by_name).member
    if resolved is None:
        raise ArchiveError(
            f"hardlink '{shown(info.name)}': its data is not in the archive"
        )
    return resolved


def in_canonical_order(verification: Verification, pairs) -> bool:
    order = [normalize_name(i.name) for i in verification.members]
    return order == [new.name for new, _ in pairs]


def repack_reasons(verification: Verification, pairs) -> list[str]:
    """What makes an archive differ from what packdebug would write."""
    reasons = [
        c.detail for c in verification.checks if c.name == "seekable" and not c.ok
    ]
    if any(name_problems(i.name) for i in verification.members):
        reasons.append("member names are not clean")
    by_new = {new.name: new for new, _ in pairs}
    if not in_canonical_order(verification, pairs):
        reasons.append("members are not in packdebug's order")
    elif any(
        getattr(by_new[normalize_name(i.name)], f) != getattr(i, f)
        for i in verification.members
        for f in HEADER_FIELDS
    ):
        reasons.append("headers are not reproducible (owner, mode, mtime or type)")
    return reasons


@dataclasses.dataclass
class RepackResult:
    path: str
    reasons: list[str]
    old_size: int
    new_size: int | None = None  # None: not written
    decoded: int = 0  # uncompressed bytes read from the old tarball


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
        chunk = archive.reader.read_at(offset, READ_CHUNK)
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


def repack_archive(
    path: str,
    options: PackOptions,
    *,
    force: bool = False,
    dry_run: bool = False,
    source_date_epoch: int | None = None,
    progress: Progress | None = None,
    spool_above: int = RANDOM_ACCESS_BLOCK,
) -> RepackResult:
    """Rewrite one tarball in packdebug's layout, atomically, under its name.

    The archive must first pass verify's integrity checks (xz, tar); then its
    members are rewritten in canonical order with reproducible headers, their
    data byte for byte.  The new file must pass verify (structure, and every
    check the old one passed) before it replaces the old one.  An archive
    already canonical is left alone unless `force`.
    """
    verification = _repackable(path)
    pairs = canonical_headers(verification.members, source_date_epoch)
    old = os.stat(path)
    result = RepackResult(path, repack_reasons(verification, pairs), old.st_size)
    with contextlib.ExitStack() as stack:
        archive = stack.enter_context(Archive(path))
        blocks = archive.reader.layout.blocks
        # Read in packdebug's order, an archive in another order steps back
        # all the time; with large Blocks, each step back decompresses from
        # its Block's start again.
        reordered = not in_canonical_order(verification, pairs)
        big = (
            reordered
            and max((b.uncompressed_size for b in blocks), default=0) > spool_above
        )
        read = _spool(archive, stack) if big else archive.data

        def new_blocks() -> Iterator[BlockPlan]:
            entries = [
                (
                    new,
                    functools.partial(_counted, read, data, progress)
                    if data
                    else tuple,
                )
                for new, data in pairs
            ]
            return options.blocks(entries)

        if not result.reasons:
            same = _same_blocks(archive, new_blocks())
            if same and not force:
                result.decoded = archive.reader.decoded
                return result
            result.reasons.append(
                "--force" if same else "xz blocks are not in packdebug's layout"
            )
        if not dry_run:
            check = functools.partial(_check_repacked, verification)
            target = OutputTarget.at(path)
            result.new_size = write_blocks(
                new_blocks(), target, options, progress, check, like=old
            ).size
        result.decoded = archive.reader.decoded
    return result


def _counted(read, info: tarfile.TarInfo, progress: Progress | None) -> Iterator[bytes]:
    for chunk in read(info):
        if progress:
            progress.read(len(chunk))
        yield chunk


def _repackable(path: str) -> Verification:
    """verify's result, if the archive is sound enough to be rewritten."""
    verification = verify_archive(path)
    failed = [
        c.detail for c in verification.checks if c.name in ("xz", "tar") and not c.ok
    ]
    if failed:
        raise ArchiveError(
            f"fails verification, left untouched: {'; '.join(failed)}", path
        )
    if not verification.members:
        raise ArchiveError("holds no members: nothing to repack, left untouched", path)
    for info in verification.members:
        if set(ESCAPING_NAMES) & set(name_problems(info.name)):
            raise ArchiveError(
                f"member '{shown(info.name)}' escapes the archive root, left untouched",
                path,
            )
    return verification


def _check_repacked(before: Verification, temporary: str) -> None:
    """The new tarball must pass verify where it matters, before it replaces the old."""
    after = verify_archive(temporary)
    passed_before = {c.name for c in before.checks if c.ok}
    failed = [
        c
        for c in after.checks
        if not c.ok and (c.name in STRUCTURE_CHECKS or c.name in passed_before)
    ]
    if failed:
        details = "; ".join(f"{c.name}: {c.detail}" for c in failed)
        raise ArchiveError(
            f"the repacked tarball would fail verify ({details}); left untouched",
            before.path,
        )


def _same_blocks(archive: Archive, plans: Iterable[BlockPlan]) -> bool:
    """Whether the archive's Blocks hold exactly these Blocks' bytes, CRC64-checked."""
    layout = archive.reader.layout
    if layout.streams != 1 or layout.stream_padding or layout.checks != {CHECK_CRC64}:
        return False
    blocks = iter(layout.blocks)
    for plan in plans:
        block = next(blocks, None)
        if block is None or block.uncompressed_size != plan.size:
            return False
        if (
            archive.reader.read_at(block.uncompressed_offset, plan.size)
            != plan.payload()
        ):
            return False
    return next(blocks, None) is None


# ---------------------------------------------------------------------------
# 6. binhost upkeep: prune
# ---------------------------------------------------------------------------

# PMS 3.2 version syntax, with the -rN revision and, in a tarball's name, -BUILD_ID.
_VERSION = (
    r"([0-9]+(?:\.[0-9]+)*)([a-z]?)((?:_(?:alpha|beta|pre|rc|p)[0-9]*)*)(?:-r([0-9]+))?"
)
_TARBALL_TAIL = re.compile(rf"(?P<version>{_VERSION})(?:-(?P<build_id>[0-9]+))?")
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
    sa = re.findall(r"_(alpha|beta|pre|rc|p)([0-9]*)", ma[3])
    sb = re.findall(r"_(alpha|beta|pre|rc|p)([0-9]*)", mb[3])
    for (x, xn), (y, yn) in zip(sa, sb):
        c = _cmp(_SUFFIX_RANK[x], _SUFFIX_RANK[y]) or _cmp(int(xn or 0), int(yn or 0))
        if c:
            return c
    if len(sa) != len(sb):
        longer, sign = (sa, 1) if len(sa) > len(sb) else (sb, -1)
        return sign if longer[min(len(sa), len(sb))][0] == "p" else -sign
    return _cmp(int(ma[4] or 0), int(mb[4] or 0))


def split_pf(pf: str) -> tuple[str, str] | None:
    """(PN, version) of a PF, or None: PN never ends in -VERSION (PMS 3.1.2)."""
    for match in re.finditer("-", pf):
        pn, version = pf[: match.start()], pf[match.end() :]
        valid_pn = _PORTAGE_NAME.fullmatch(pn) and not re.search(rf"-{_VERSION}$", pn)
        if re.fullmatch(_VERSION, version) and valid_pn:
            return pn, version
    return None


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
            return [stem + suffix for suffix in BINPKG_SUFFIXES_MULTI]
        stem = os.path.join(pkgdir, self.category, self.pf)
        return [stem + suffix for suffix in BINPKG_SUFFIXES_SINGLE]


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
    layout_hint: str = ""  # when the root does not look like CAT/PN/

    @property
    def removals(self) -> list[PruneDecision]:
        return [d for d in self.decisions if d.remove]

    def emptied_packages(self) -> tuple[int, int]:
        """(packages that would lose every tarball, packages)."""
        packages: dict[tuple[str, str], bool] = {}
        for d in self.decisions:
            key = (d.tarball.category, d.tarball.pn)
            packages[key] = packages.get(key, True) and d.remove
        return sum(packages.values()), len(packages)


def scan_tarballs(root: str) -> tuple[list[DebugTarball], list[str], str]:
    """The tarballs under root, every other entry (kept as unrecognised), and a hint.

    Tarballs sit at CAT/PN/PF[-BUILD_ID]-debug.tar.xz.  Never follows a
    symlink: a symlinked directory or file is unrecognised.
    """
    tarballs, unrecognised, misplaced = [], [], collections.Counter()
    for entry in walk_root(root, max_depth=3):
        parts = entry.path.split("/")
        if entry.is_dir and entry.depth <= 2:
            continue
        if entry.is_dir or not stat.S_ISREG(entry.st.st_mode):
            unrecognised.append(entry.path)
            continue
        parsed = parse_tarball_name(*parts[:2], parts[2]) if entry.depth == 3 else None
        if parsed is None:
            unrecognised.append(entry.path)
            if parts[-1].endswith(TARBALL_SUFFIX):
                misplaced[entry.depth] += 1
            continue
        tarballs.append(
            DebugTarball(
                entry.path,
                *parts[:2],
                *parsed,
                entry.st.st_size,
                entry.st.st_mtime,
                entry.st.st_ino,
            )
        )
    hint = ""
    if not tarballs and misplaced:
        depth = max(misplaced, key=misplaced.__getitem__)
        hint = (
            f"--root should hold CAT/PN/PF-BUILD_ID{TARBALL_SUFFIX}; these tarballs are "
            f"{depth} level{'s' * (depth != 1)} down instead of 3: is --root "
            + (
                "too deep (give the directory that holds the categories)?"
                if depth < 3
                else "too high?"
            )
        )
    return tarballs, unrecognised, hint


@dataclasses.dataclass
class BinpkgIndex:
    """What PKGDIR holds: Portage's Packages index and the binpkg files."""

    pkgdir: str
    listed: set[tuple[str, str | None]]  # (CATEGORY/PF, BUILD_ID) from Packages

    def find(self, tarball: DebugTarball) -> str | None:
        """The binpkg of this tarball, by file or by index entry, or None."""
        for path in tarball.binpkgs(self.pkgdir):
            if os.path.exists(path):
                return path
        if (f"{tarball.category}/{tarball.pf}", tarball.build_id) in self.listed:
            return (
                os.path.join(self.pkgdir, "Packages")
                + f" (lists {tarball.category}/{tarball.pf})"
            )
        return None


def read_binpkg_index(pkgdir: str) -> BinpkgIndex:
    """PKGDIR's layout, checked before prune plans anything.

    Portage's PKGDIR/Packages index (bintree.py), when present, lists the
    binpkgs; otherwise binpkgs must sit where Portage writes them,
    CAT/PN/PF-BUILD_ID.gpkg.tar (or .xpak) or CAT/PF.gpkg.tar (or .tbz2).
    A PKGDIR matching neither is refused: a wrong --pkgdir would make every
    tarball look orphaned.
    """
    packages = os.path.join(pkgdir, "Packages")
    data = read_small_file(packages, "Packages index", PACKAGES_LIMIT)
    if data is not None:
        listed = _parse_packages(data.decode("utf-8", "surrogateescape"))
        if listed is not None:
            return BinpkgIndex(pkgdir, listed)
    if not _has_portage_binpkgs(pkgdir):
        raise UsageError(
            "holds no binary packages where Portage puts them (CAT/PN/PF-BUILD_ID.gpkg.tar "
            "or CAT/PF.gpkg.tar) and no Packages index, so every tarball would look "
            "orphaned; is --pkgdir the directory that holds the categories? Nothing was removed",
            pkgdir,
        )
    return BinpkgIndex(pkgdir, set())


def _parse_packages(text: str) -> set[tuple[str, str | None]] | None:
    """(CPV, BUILD_ID) of each entry of a Packages index; None if it is not one."""
    stanzas = [s for s in re.split(r"\n\s*\n", text) if s.strip()]
    if not stanzas:
        return None
    fields = [
        dict(re.findall(r"^([A-Z_0-9]+): ?(.*)$", s, re.MULTILINE)) for s in stanzas
    ]
    if "CPV" in fields[0] or not (
        {"VERSION", "PACKAGES", "TIMESTAMP"} & fields[0].keys()
    ):
        return None  # Portage's index starts with a header stanza
    return {(f["CPV"], f.get("BUILD_ID") or None) for f in fields[1:] if "CPV" in f}


def _has_portage_binpkgs(pkgdir: str) -> bool:
    for entry in walk_root(pkgdir, max_depth=3):
        parts = entry.path.split("/")
        name = parts[-1]
        if entry.depth == 3 and name.endswith(BINPKG_SUFFIXES_MULTI):
            stem = name[
                : -len(next(s for s in BINPKG_SUFFIXES_MULTI if name.endswith(s)))
            ]
            pf, _, build_id = stem.rpartition("-")
            if is_decimal(build_id) and (split_pf(pf) or ("",))[0] == parts[1]:
                return True
        suffix = next(
            (s for s in (*BINPKG_SUFFIXES_SINGLE, ".xpak") if name.endswith(s)), ""
        )
        if entry.depth == 2 and suffix and split_pf(name[: -len(suffix)]):
            return True
    return False


def installed_instances(vardb: str, log: Log) -> set[tuple[str, str, str | None]]:
    """(CATEGORY, PF, BUILD_ID) of every installed package in the vardb."""
    installed = set()
    for entry in walk_root(vardb, max_depth=2):
        if entry.depth != 2 or not entry.is_dir:
            continue
        category, pf = entry.path.split("/")
        path = os.path.join(vardb, entry.path, "BUILD_ID")
        try:
            data = read_small_file(path, "BUILD_ID file", BUILD_ID_FILE_LIMIT)
            build_id = data.decode("utf-8").strip() or None if data else None
        except (InputError, UnicodeDecodeError) as e:
            why = e.reason if isinstance(e, InputError) else "not UTF-8"
            log.warning(
                f"{shown(path)}: unreadable ({why}); "
                f"{category}/{pf} counts as installed without a BUILD_ID"
            )
            build_id = None
        installed.add((category, pf, build_id))
    return installed


def plan_prune(
    root: str,
    binpkgs: BinpkgIndex,
    installed: set,
    keep_newest: int,
    min_age_days: float,
    now: float,
) -> PrunePlan:
    """Decide, for every tarball under root, whether prune may remove it.

    Only when all hold: its binary package is gone, it is not the debug info
    of the installed instance, it is older than min_age_days, and it is not
    among the keep_newest newest (by version, then BUILD_ID) of its CAT/PN.
    """
    tarballs, unrecognised, hint = scan_tarballs(root)
    by_package: dict[tuple[str, str], list[DebugTarball]] = {}
    for t in tarballs:
        by_package.setdefault((t.category, t.pn), []).append(t)
    newest = set()
    for group in by_package.values():
        group.sort(key=functools.cmp_to_key(_newer_first))
        newest.update(t.path for t in group[:keep_newest])
    decisions = [
        _decide(t, binpkgs, installed, t.path in newest, keep_newest, min_age_days, now)
        for t in tarballs
    ]
    return PrunePlan(decisions, unrecognised, hint)


def _newer_first(a: DebugTarball, b: DebugTarball) -> int:
    return -(
        version_cmp(a.version, b.version)
        or _cmp(int(a.build_id or 0), int(b.build_id or 0))
    )


def _decide(
    t: DebugTarball,
    binpkgs: BinpkgIndex,
    installed: set,
    is_newest: bool,
    keep: int,
    min_age: float,
    now: float,
) -> PruneDecision:
    binpkg = binpkgs.find(t)
    age_days = (now - t.mtime) / DAY
    if binpkg:
        return PruneDecision(t, False, f"binary package {shown(binpkg)} exists")
    if (t.category, t.pf, t.build_id) in installed:
        return PruneDecision(t, False, "debug info of the installed instance")
    if age_days < min_age:
        return PruneDecision(
            t, False, f"only {age_days:.1f} days old (--min-age {min_age:g})"
        )
    if is_newest:
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
            if _remove_tarball(root_fd, root, decision.tarball, log):
                removed.append(decision)
                emptied.add(tuple(decision.tarball.path.split("/")[:-1]))
        _remove_emptied(root_fd, emptied)
    finally:
        os.close(root_fd)
    return removed


def _remove_tarball(root_fd: int, root: str, t: DebugTarball, log: Log) -> bool:
    *dirs, name = t.path.split("/")
    full = os.path.join(root, t.path)
    try:
        fd = open_beneath(root_fd, dirs)
    except FileNotFoundError:
        return False  # another prune removed it and its directory
    except OSError as e:
        log.warning(
            f"{shown(full)}: kept, cannot reach it without following a link ({e.strerror})"
        )
        return False
    try:
        st = os.stat(name, dir_fd=fd, follow_symlinks=False)
        if not stat.S_ISREG(st.st_mode) or (st.st_ino, st.st_size) != (t.ino, t.size):
            log.warning(f"{shown(full)}: kept, it changed since it was examined")
            return False
        os.unlink(name, dir_fd=fd)
        return True
    except FileNotFoundError:
        return False  # another prune got there first
    finally:
        os.close(fd)


def _remove_emptied(root_fd: int, dirs: set[tuple[str, ...]]) -> None:
    """rmdir CAT/PN, then CAT, where a removal emptied them; never the root."""
    for parts in sorted(dirs | {d[:1] for d in dirs}, key=len, reverse=True):
        if not parts:
            continue
        try:
            fd = open_beneath(root_fd, parts[:-1])
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

PORTAGE_CHECKED = "3.0.83"  # the Portage release these settings were tried with


@dataclasses.dataclass(frozen=True)
class Setting:
    """A Portage variable that packdebug tarballs need, appended to."""

    variable: str
    append: str
    where: str
    why: str


# Each line is there because a real emerge went wrong without it (the tests
# in test_packdebug.py "real Portage" show it).  COLLISION_IGNORE is not one
# of them: Portage checks collisions on the image before pre_pkg_preinst
# runs the hook, so the hook's tarball is never checked (vartree.py
# treewalk); only Portage's own FEATURES=packdebug needs it, and sets it.
SETTINGS = (
    Setting(
        "UNINSTALL_IGNORE",
        "/usr/lib/debug/.tarball/*",
        "make.conf",
        "without it an upgrade or unmerge deletes the old version's tarball, which "
        "clients still running the old binaries need (Portage sets this itself only for "
        "its own FEATURES=packdebug). emerge reads it from make.conf, never from the "
        "ebuild environment, so bashrc cannot set it.",
    ),
    Setting(
        "PKG_INSTALL_MASK",
        "/usr/lib/debug/ /usr/src/debug/",
        "make.conf or bashrc",
        "without it every binary package carries the split debug info too: the package "
        "phase builds the binpkg before pre_pkg_preinst packs the tarball. Clients fetch "
        "debug info through debuginfod instead. Portage saves it from the ebuild "
        "environment at the end of src_install (phase-functions.sh), so bashrc works too.",
    ),
)

DEDUP_NOTE = """\
Not keeping the debug info twice on the binhost: with packdebug, let its hook
delete what it packed, `packdebug settings --bashrc --dedup`, which runs
`pack --remove-packed` once the tarball is in place. The man page's line
below belongs to Portage's own FEATURES=packdebug only: Portage applies
INSTALL_MASK before pkg_preinst (vartree.py treewalk), so with packdebug's
hook it would remove the debug info before it is packed."""
DEDUP_INSTALL_MASK = 'INSTALL_MASK="${INSTALL_MASK} /usr/lib/debug/ /usr/src/debug/ -/usr/lib/debug/.tarball"'


def format_settings(settings: Sequence[Setting], fmt: str, dedup: bool = False) -> str:
    """Render settings as make.conf lines, bashrc `export`s, or JSON."""
    if fmt == "json":
        rows = [dataclasses.asdict(s) for s in settings]
        document = {"portage": PORTAGE_CHECKED, "settings": rows}
        if dedup:
            document["dedup"] = {
                "note": " ".join(DEDUP_NOTE.split()),
                "bashrc": bashrc_snippet(True),
            }
        return to_json(document)
    lines = [
        f"# Settings for packdebug tarballs (tried with Portage {PORTAGE_CHECKED})."
    ]
    for s in settings:
        lines.append("")
        lines.extend("# " + line for line in wrap(f"{s.where}: {s.why}", 76))
        if fmt == "shell":
            lines.append(
                f'export {s.variable}="${{{s.variable}:+${{{s.variable}}} }}"{shlex.quote(s.append)}'
            )
        else:
            lines.append(f'{s.variable}="${{{s.variable}}} {s.append}"')
    if dedup:
        lines += [
            "",
            *("# " + line for line in DEDUP_NOTE.splitlines()),
            f"# {DEDUP_INSTALL_MASK}",
        ]
    return "\n".join(lines) + "\n"


def wrap(text: str, width: int) -> list[str]:
    import textwrap  # imported here: only settings wrap text

    return textwrap.wrap(text, width, break_long_words=False, break_on_hyphens=False)


def program_path() -> str:
    """The file to run packdebug again by: this one, or the launcher that
    `make install` writes, which imports this file as a module (its bytecode
    is compiled once) and is then the __main__ that holds it."""
    main = sys.modules.get("__main__")
    launched = getattr(main, "packdebug", None) is sys.modules.get(__name__)
    return os.path.realpath(main.__file__ if launched else __file__)


def bashrc_snippet(dedup: bool = False, command: str = "") -> str:
    """A ready /etc/portage/bashrc hook that packs every merged package.

    Portage's variables are shell variables in a phase, some readonly (ED,
    PORTAGE_BUILDDIR: ebuild.sh portage_readonly_vars), so the hook never
    assigns them: a subshell exports them and runs packdebug.  An unset
    variable stays unset.
    """
    command = command or shlex.quote(program_path())
    flags = "pack --remove-packed" if dedup else "pack"
    return f"""\
# packdebug: pack split debug info into a seekable debuginfod tarball.
# pre_pkg_preinst is the first phase hook that sees the image after estrip
# has split the debug info and after the package phase has written
# build-info/BUILD_ID. pack prints one line into the build log (what it
# packed, and where), warnings, or nothing for a binary package.
# If this bashrc already has a pre_pkg_preinst, add the subshell to it.
pre_pkg_preinst() {{
\t(
\t\texport ED D EPREFIX CATEGORY PN PF BUILD_ID PORTAGE_BUILDDIR EMERGE_FROM INSTALL_MASK
\t\texec {command} {flags}
\t) || die "packdebug could not pack the debug info"
}}
"""


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

    def __post_init__(self) -> None:
        # systemd ignores relative paths in BindReadOnlyPaths=, and debuginfod
        # would resolve them against its own working directory.
        self.root, self.pkgdir, self.database = (
            os.path.abspath(p) for p in (self.root, self.pkgdir, self.database)
        )
        for flag, path in (
            ("--root", self.root),
            ("--pkgdir", self.pkgdir),
            ("--database", self.database),
        ):
            bad = UNIT_UNSAFE.search(path)
            if bad:
                raise UsageError(
                    f"{flag} {shown(path)} holds {bad[0]!r}, which the systemd unit "
                    "cannot carry as it is (a line break, a quote, or what systemd "
                    "expands: $, %, and : in BindReadOnlyPaths=)",
                    hint="give a path of letters, digits and /._+-@",
                )

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
                "--listen-address needs elfutils >= 0.193: this debuginfod listens on ALL "
                f"addresses, port {self.port}; firewall it, or put it behind a reverse proxy"
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
# The hardening follows the Portage pull request; packdebug's tests start this
# unit under a real systemd and fetch through it.
[Unit]
Description=elfutils debuginfod: debug info and binaries of this binhost's packages
Documentation=https://sourceware.org/elfutils/Debuginfod.html man:debuginfod(8)
After=network.target

[Service]
DynamicUser=true
ExecStart={exec_start}

ProtectProc=invisible
ProcSubset=pid
CapabilityBoundingSet=CAP_DAC_OVERRIDE
AmbientCapabilities=CAP_DAC_OVERRIDE
NoNewPrivileges=true
ProtectSystem=strict
ProtectHome=tmpfs
PrivateTmp=on
PrivateDevices=on
DevicePolicy=closed
PrivateIPC=on
PrivateUsers=on
ProtectClock=on
ProtectHostname=on
ProtectKernelTunables=on
ProtectKernelModules=on
ProtectKernelLogs=on
ProtectControlGroups=on
LockPersonality=on
MemoryDenyWriteExecute=on
RestrictNamespaces=on
RestrictRealtime=on
RestrictSUIDSGID=on
RestrictAddressFamilies=AF_INET AF_INET6 AF_UNIX
PrivateMounts=on
SystemCallArchitectures=native
SystemCallFilter=@system-service
SystemCallFilter=~@privileged @resources
UMask=0077
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


# What a path in the printed unit may not hold: control characters and
# white space, quotes, backslashes, and what systemd expands or splits on.
UNIT_UNSAFE = re.compile(r"[\x00-\x20\x7f\"'\\$%:;]")


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
        match = re.fullmatch(r"([0-9]+)\.([0-9]+)", given)
        if not match:
            raise UsageError(f"--debuginfod-version {given!r} is not like 0.192")
        version = int(match[1]), int(match[2])
        return version, f"written for debuginfod {given} (--debuginfod-version)"
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
    match = re.search(r"([0-9]+)\.([0-9]+)", out.splitlines()[0] if out else "")
    if not match:
        return (
            None,
            "debuginfod not found here: written for elfutils >= 0.193 (see --debuginfod-version)",
        )
    version = int(match[1]), int(match[2])
    return version, f"written for the installed debuginfod {match[1]}.{match[2]}"


def parse_listen(text: str) -> tuple[str, int]:
    """'127.0.0.1:8002', '[::1]:8002' -> (address, port) (argparse type)."""
    match = re.fullmatch(r"\[?([^\]]*?)\]?:([0-9]+)", text)
    if not match or not match[1]:
        raise argparse.ArgumentTypeError(
            f"{text!r} is not ADDRESS:PORT, e.g. {DEBUGINFOD_LISTEN}"
        )
    if not 0 < int(match[2]) < 65536:
        raise argparse.ArgumentTypeError(f"port {match[2]} is out of range (1-65535)")
    if not _is_ip_address(match[1]):
        raise argparse.ArgumentTypeError(
            f"{match[1]!r} is not an IP address (debuginfod listens on an address, "
            "e.g. 0.0.0.0 for all)"
        )
    return match[1], int(match[2])


def _is_ip_address(text: str) -> bool:
    import ipaddress  # imported here: only --listen needs it

    try:
        ipaddress.ip_address(text)
    except ValueError:
        return False
    return True


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
    notes = "".join(f"# {line}\n" for note in setup.notes() for line in wrap(note, 76))
    return f"""\
# debuginfod for packdebug tarballs (-Z .tar.xz with no decoder, so it can seek)
# and for binary packages (their executables), as in the Portage pull request.
{notes}
# Server command line:
{lines}

{setup.unit()}
# Clients: put this in their environment (e.g. /etc/env.d/99debuginfod, then
# env-update), with the name clients reach the binhost by. gdb must have
# debuginfod on before it loads a file: gdb -iex 'set debuginfod enabled on'.
DEBUGINFOD_URLS="{setup.client_url()}"
"""


# ---------------------------------------------------------------------------
# 7. command line
# ---------------------------------------------------------------------------

DEMO_TARBALL = "/usr/lib/debug/.tarball/app-misc/hello/hello-1.0-1-debug.tar.xz"
DEMO_IMAGE = "/var/tmp/portage/app-misc/hello-1.0/image"  # the examples' Portage image


def cmd_pack(args: argparse.Namespace, log: Log) -> int:
    flags = {
        name: getattr(args, name)
        for name in (
            "image",
            "eprefix",
            "category",
            "pn",
            "pf",
            "build_id",
            "output",
            "remove_packed",
            "dry_run",
            "strict",
        )
    }
    request = request_from_environment(os.environ, flags)
    pack(request, pack_options(args), log)
    return 0


def pack_options(args: argparse.Namespace) -> PackOptions:
    return PackOptions(
        args.preset, args.jobs, args.block_size or 0, extreme=args.extreme
    )


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
                f"{shown(path)}: no GNU build-id (not ELF, or linked without --build-id)"
            )
            status = 1
        else:
            log.write(f"{build_id}  {shown(path)}\n")
    return status


def cmd_list(args: argparse.Namespace, log: Log) -> int:
    documents = []
    for path in args.tarballs:
        with Archive(path) as archive:
            rows = []
            if len(args.tarballs) > 1 and not args.json:
                log.write(
                    f"{'' if path == args.tarballs[0] else chr(10)}{shown(path)}:\n"
                )
            for row in list_archive(archive):
                if row.problem:
                    log.warning(row.problem)
                if args.json:
                    rows.append(dataclasses.asdict(row))
                else:
                    log.write(_list_row(row, args.verbosity > 0) + "\n")
            documents.append({"tarball": archive.path, "members": rows})
    if args.json:
        log.write(to_json(documents[0] if len(documents) == 1 else documents))
    return 0


def _list_row(row: Listing, verbose: bool) -> str:
    link = f" -> {shown(row.link)}" if row.link else ""
    extra = ""
    if verbose:
        when = time.strftime("%Y-%m-%d %H:%M", time.gmtime(row.mtime))
        extra = f"{row.mode:04o} {when} {row.offset:>11} {row.block:>5} "
    return f"{row.kind:<10} {row.size:>11} {row.build_id or '-':<40} {extra}{shown(row.name)}{link}"


def cmd_verify(args: argparse.Namespace, log: Log) -> int:
    status = 0
    work = functools.partial(_verify_one, all_problems=args.verbosity > 0)
    for path, ok, checks in each_tarball(work, args.tarballs, args.jobs):
        status |= not ok
        if ok and args.verbosity < 0:
            continue
        log.write(f"{shown(path)}: {'ok' if ok else 'FAILED'}\n")
        for check in checks:
            if not check.ok or args.verbosity >= 0:
                log.write(f"  {check.label}  {check.name}: {check.detail}\n")
    return status


def _verify_one(path: str, all_problems: bool) -> tuple[str, bool, list[Check]]:
    try:
        result = verify_archive(path, all_problems=all_problems)
    except PackdebugError as e:
        return path, False, [Check("file", False, e.reason)]
    return path, result.ok, result.checks


def cmd_extract(args: argparse.Namespace, log: Log) -> int:
    if args.all != bool(args.directory) or (args.all and args.output):
        raise UsageError(
            "--all goes with -C DIR (and no -o); --build-id and --member with -o FILE"
        )
    with Archive(args.tarball, sequential=args.all) as archive:
        if args.all:
            count = extract_all(archive, args.directory)
            log.info(
                f"extracted {plural(count, 'member')} of {shown(archive.path)} "
                f"into {shown(args.directory)}"
            )
            return 0
        info = _member_to_extract(archive, args)
        # Without -o, the member's own name in the current directory: a
        # member called "-" is a file there too, not standard output.
        output = args.output or os.path.join(
            os.curdir, os.path.basename(normalize_name(info.name))
        )
        if output == "-":
            _extract_to_stdout(archive, info, log)
        else:
            with atomic_output(
                OutputTarget.at(output), mode=info.mode & 0o777 or 0o644
            ) as f:
                copy_member(archive, info, f)
            log.detail(
                f"extracted {shown(info.name)} ({format_size(info.size)}) to {shown(output)}"
            )
    return 0


def check_build_id(text: str, what: str = "--build-id") -> str:
    build_id = text.lower()
    if not re.fullmatch(r"[0-9a-f]{2,}", build_id):
        raise UsageError(
            f"{what} {text!r} is not a hexadecimal ELF build-id (`packdebug buildid FILE` prints one)"
        )
    return build_id


def _member_to_extract(archive: Archive, args: argparse.Namespace) -> tarfile.TarInfo:
    if args.build_id:
        build_id = check_build_id(args.build_id)
        info = archive.find_build_id(build_id)
        if info is None:
            short = (
                f"; a build-id has 40 hex digits (this has {len(build_id)}): give it whole"
                if len(build_id) < 32
                else ""
            )
            raise ArchiveError(f"no ELF with build-id {build_id}{short}", archive.path)
        return info
    found = archive.locate(args.member)
    if found is None:
        raise ArchiveError(
            f"no member '{shown(args.member)}'",
            archive.path,
            "`packdebug list` shows them",
        )
    resolution = archive.resolve(found)
    if resolution.member is not None:
        return resolution.member
    if resolution.missing is not None:
        link = BUILD_ID_LINK.fullmatch(normalize_name(found.name))
        to_binary = link and not link[3]
        hint = (
            "executables are in the binary package, not the debug tarball"
            if to_binary
            else "the link dangles"
        )
        raise ArchiveError(
            f"{shown(args.member)} is a link to {shown(resolution.missing)}, which is not "
            "in the tarball",
            archive.path,
            hint,
        )
    kind = member_kind(resolution.last, None)
    raise ArchiveError(
        f"{shown(args.member)} is a {kind}, not a file",
        archive.path,
        "extract a file in it, or everything with --all -C DIR",
    )


def _extract_to_stdout(archive: Archive, info: tarfile.TarInfo, log: Log) -> None:
    """Write a member to stdout only once its Blocks' checks have passed."""
    import tempfile  # imported here: only extraction to stdout needs it

    with tempfile.SpooledTemporaryFile(max_size=16 * MiB) as spool:
        copy_member(archive, info, spool)
        spool.seek(0)
        out = sys.stdout.buffer if log.out is sys.stdout else log.out
        try:
            while chunk := spool.read(READ_CHUNK):
                out.write(chunk)
            out.flush()
        except BrokenPipeError:
            raise
        except OSError as e:
            raise OutputError(
                f"cannot write to standard output: {e.strerror}"
            ) from None


def cmd_find(args: argparse.Namespace, log: Log) -> int:
    """Which tarball holds a build-id: first by .build-id link names, then by ELF notes."""
    build_id = check_build_id(args.build_id, "BUILDID")
    places = args.places or ["/" + TARBALL_DIR]
    tarballs = []
    for place in places:
        if os.path.isfile(place):
            tarballs.append(place)
            continue
        if not os.path.isdir(place):
            raise UsageError(
                "no such tarball or directory",
                place,
                f"give tarballs or the tarball root, e.g. /{TARBALL_DIR}",
            )
        tarballs.extend(iter_tarballs(place))
    found = 0
    for by_link in (True, False):
        work = functools.partial(_find_one, build_id=build_id, by_link=by_link)
        for path, hit, problem in each_tarball(work, tarballs, args.jobs):
            if problem:
                log.warning(f"{problem} (skipped)")
            elif hit:
                log.write(f"{shown(path)}  {shown(hit)}\n")
                found += 1
        if found:
            return 0
    where = " ".join(shown(p) for p in places)
    log.warning(f"build-id {build_id} is in no tarball under {where}")
    return 1


def _find_one(path: str, build_id: str, by_link: bool) -> tuple[str, str | None, str]:
    """(path, member holding the build-id or None, problem)."""
    try:
        with Archive(path) as archive:
            search = (
                archive.find_build_id_by_link
                if by_link
                else archive.find_build_id_by_notes
            )
            hit = search(build_id)
    except PackdebugError as e:
        return path, None, str(e)
    return path, hit.name if hit else None, ""


def cmd_repack(args: argparse.Namespace, log: Log) -> int:
    if bool(args.tarballs) == bool(args.root):
        raise UsageError("give either TARBALL... or --root DIR")
    if args.root:
        check_root(args.root, "--root")
    paths = list(args.tarballs) or list(iter_tarballs(args.root))
    options = pack_options(args)
    workers = min(options.jobs or available_cpus(), len(paths))
    if workers > 1:
        options.jobs = 1  # a thread per tarball, a tarball per worker
    progress = None
    if workers <= 1 and paths and not args.dry_run and progress_line(log, 0):
        with Archive(paths[0]) as archive:  # the exact total, from the xz Index
            progress = Progress(archive.reader.size, log.err)
    work = functools.partial(
        _repack_one,
        options=options,
        force=args.force,
        dry_run=args.dry_run,
        source_date_epoch=_source_date_epoch(os.environ),
        progress=progress,
    )
    status, saved, done = 0, 0, 0
    try:
        for path, result, problem in each_tarball(work, paths, workers):
            if problem:
                log.warning(problem)
                status = 1
                continue
            _report_repack(path, result, log)
            if result.new_size is not None:
                done += 1
                saved += result.old_size - result.new_size
    except (KeyboardInterrupt, Terminated) as e:
        e.packdebug_state = (
            f"{plural(done, 'tarball')} repacked before; the others are untouched"
        )
        raise
    finally:
        if progress:
            progress.clear()
    if not args.dry_run:
        log.info(
            f"repacked {done} of {plural(len(paths), 'tarball')}: "
            f"{'saved' if saved >= 0 else 'added'} {format_size(abs(saved))}"
        )
    return status


def _repack_one(path: str, **options) -> tuple[str, RepackResult | None, str]:
    try:
        return path, repack_archive(path, **options), ""
    except PackdebugError as e:
        return path, None, str(e)


def _report_repack(path: str, result: RepackResult, log: Log) -> None:
    reasons = "; ".join(result.reasons)
    if not result.reasons:
        log.detail(
            f"{shown(path)}: already in packdebug's layout, skipped (--force repacks it)"
        )
    elif result.new_size is None:
        log.info(f"{shown(path)}: would repack: {reasons}")
    else:
        change = result.new_size - result.old_size
        log.info(
            f"{shown(path)}: repacked ({reasons}): {format_size(result.old_size)} -> "
            f"{format_size(result.new_size)} ({'+' if change >= 0 else '-'}{format_size(abs(change))})"
        )


def cmd_prune(args: argparse.Namespace, log: Log) -> int:
    for flag, path in (
        ("--root", args.root),
        ("--pkgdir", args.pkgdir),
        ("--vardb", args.vardb),
    ):
        check_root(path, flag)
    binpkgs = read_binpkg_index(args.pkgdir)
    installed = installed_instances(args.vardb, log)
    plan = plan_prune(
        args.root, binpkgs, installed, args.keep_newest, args.min_age, time.time()
    )
    emptied, packages = plan.emptied_packages()
    if emptied * 2 > packages and not args.force:
        message = (
            f"would remove every tarball of {emptied} of {plural(packages, 'package')}: "
            "is --pkgdir or --vardb wrong? Check with --dry-run, then add --force"
        )
        if not args.dry_run:
            raise UsageError(message + "; nothing was removed", args.root)
        log.warning(message)
    removed = plan.removals if args.dry_run else execute_prune(args.root, plan, log)
    _report_prune(args, plan, removed, log)
    return 0


def _report_prune(args: argparse.Namespace, plan: PrunePlan, removed, log: Log) -> None:
    freed = sum(d.tarball.size for d in removed)
    if args.json:
        document = {
            "root": args.root,
            "dry_run": args.dry_run,
            "removed": [
                {"path": d.tarball.path, "size": d.tarball.size, "reason": d.reason}
                for d in removed
            ],
            "kept": [
                {"path": d.tarball.path, "reason": d.reason}
                for d in plan.decisions
                if not d.remove
            ],
            "unrecognised": plan.unrecognised,
            "freed": freed,
        }
        log.write(to_json(document))
        return
    verb = "would remove" if args.dry_run else "removed"
    for d in removed:
        log.info(
            f"{verb} {shown(d.tarball.path)} ({format_size(d.tarball.size)}): {d.reason}"
        )
    for d in plan.decisions:
        if not d.remove:
            log.detail(f"kept {shown(d.tarball.path)}: {d.reason}")
    for path in plan.unrecognised:
        log.info(f"unrecognised, kept: {shown(path)}")
    if plan.layout_hint:
        log.warning(plan.layout_hint)
    kept = len(plan.decisions) - len(plan.removals)
    log.info(
        f"{'would free' if args.dry_run else 'freed'} {format_size(freed)} in "
        f"{plural(len(removed), 'tarball')} under {shown(args.root)} ({kept} kept)"
    )


def cmd_settings(args: argparse.Namespace, log: Log) -> int:
    if args.debuginfod:
        version, note = debuginfod_version(args.debuginfod_version)
        address, port = args.listen or parse_listen(DEBUGINFOD_LISTEN)
        setup = DebuginfodSetup(
            args.root or "/" + TARBALL_DIR,
            args.pkgdir or BINPKG_DIR,
            address,
            port,
            version,
            note,
            args.database or DEBUGINFOD_DATABASE,
        )
        log.write(format_debuginfod(setup, args.format))
        return 0
    server_only = [
        flag
        for flag, value in (
            ("--listen", args.listen),
            ("--root", args.root),
            ("--pkgdir", args.pkgdir),
            ("--database", args.database),
            ("--debuginfod-version", args.debuginfod_version),
        )
        if value is not None
    ]
    if server_only:
        raise UsageError(f"{', '.join(server_only)} go with --debuginfod")
    if args.bashrc:
        snippet = bashrc_snippet(args.dedup)
        log.write(to_json({"bashrc": snippet}) if args.format == "json" else snippet)
    else:
        log.write(format_settings(SETTINGS, args.format, args.dedup))
    return 0


# Argument types: each error names the rule, and argparse exits 2.


def parse_size(text: str) -> int:
    """'8MiB', '8M', '512k' or '1048576' -> bytes (argparse type)."""
    match = re.fullmatch(
        r"\s*([0-9]+)\s*([kmg]?)(?:i?b)?\s*", text, re.IGNORECASE | re.ASCII
    )
    if not match:
        raise argparse.ArgumentTypeError(f"{text!r} is not a size such as 8MiB")
    return int(match.group(1)) << (10 * " kmg".index(match.group(2).lower() or " "))


def block_size_arg(text: str) -> int:
    size = parse_size(text)
    if size < BLOCK_SIZE_MIN:
        raise argparse.ArgumentTypeError(
            f"{text} is too small: at least {format_size(BLOCK_SIZE_MIN)} (smaller blocks "
            "make the tarball much larger)"
        )
    if size > BLOCK_SIZE_MAX:
        raise argparse.ArgumentTypeError(
            f"{text} is too large: at most {format_size(BLOCK_SIZE_MAX)} (each thread holds "
            "two blocks in memory, and debuginfod decompresses up to a block per request)"
        )
    return size


def count_arg(text: str) -> int:
    if not is_decimal(text):
        raise argparse.ArgumentTypeError(f"{text!r} is not a whole number (0 or more)")
    return int(text)


def jobs_arg(text: str) -> int:
    if not is_decimal(text):
        raise argparse.ArgumentTypeError(
            f"{text!r} is not a number: 0 (all CPUs) or more"
        )
    return int(text)


def days_arg(text: str) -> float:
    try:
        days = float(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"{text!r} is not a number of days") from None
    if not days >= 0:  # also refuses nan
        raise argparse.ArgumentTypeError(f"{text} days: must be 0 or more")
    return days


def _negative_jobs(argv: Sequence[str]) -> str | None:
    """-j -1 looks like the preset flag -1 to argparse; catch it first."""
    for i, arg in enumerate(argv):
        value = None
        if arg in ("-j", "--jobs") and i + 1 < len(argv):
            value = argv[i + 1]
        elif arg.startswith("--jobs="):
            value = arg[len("--jobs=") :]
        elif arg.startswith("-j") and arg[2:3] == "-":
            value = arg[2:]
        if value is not None and re.fullmatch(r"-[0-9]+", value):
            return value
    return None


class _HelpFormatter(argparse.RawDescriptionHelpFormatter):
    def __init__(self, prog: str) -> None:
        super().__init__(prog, max_help_position=30)


def _verbosity(parser: argparse.ArgumentParser, verbose: str, quiet: str) -> None:
    """-v and -q, each with what it means for this command ("" leaves it out)."""
    group = parser.add_mutually_exclusive_group()
    if verbose:
        group.add_argument(
            "-v",
            "--verbose",
            action="store_const",
            const=1,
            dest="verbosity",
            help=verbose,
        )
    if quiet:
        group.add_argument(
            "-q",
            "--quiet",
            action="store_const",
            const=-1,
            dest="verbosity",
            help=quiet,
        )
    parser.set_defaults(verbosity=0)


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
    commands = parser.add_subparsers(dest="command", metavar="COMMAND")
    commands.required = True
    for add in (
        _add_pack,
        _add_buildid,
        _add_list,
        _add_verify,
        _add_extract,
        _add_find,
        _add_repack,
        _add_prune,
        _add_settings,
    ):
        add(commands)
    return parser


def _command(commands, name: str, summary: str, description: str, examples: str):
    return commands.add_parser(
        name,
        formatter_class=_HelpFormatter,
        help=summary,
        description=description,
        epilog="examples:\n" + examples,
    )


def _add_pack(commands) -> None:
    p = _command(
        commands,
        "pack",
        "pack one Portage image's debug info into a tarball",
        """\
Pack ${ED}/usr/src/debug and ${ED}/usr/lib/debug into
${ED}/usr/lib/debug/.tarball/${CATEGORY}/${PN}/${PF}-${BUILD_ID}-debug.tar.xz

Every input defaults from the Portage environment, so a bashrc hook needs no
arguments (see `packdebug settings --bashrc`).  BUILD_ID is read from the
environment, else from ${PORTAGE_BUILDDIR}/build-info/BUILD_ID; without one the
tarball is ${PF}-debug.tar.xz.

The tarball is one xz stream of independent blocks (debuginfod >= 0.192 seeks
in it), byte-identical for the same image (owner root, sorted names, modes
without setuid, mtimes clamped to SOURCE_DATE_EPOCH), and appears atomically.
It prints one line: what it packed, and where.""",
        f"""\
  packdebug pack                       # inside a Portage phase hook
  packdebug pack --image {DEMO_IMAGE} \\
      --category app-misc --pn hello --pf hello-1.0 --build-id 1
  packdebug pack --image {DEMO_IMAGE} --output /tmp/hello-1.0-debug.tar.xz -v""",
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
    inputs.add_argument(
        "--category", metavar="CATEGORY", help="the package's category, e.g. app-misc"
    )
    inputs.add_argument("--pn", metavar="PN", help="the package name, e.g. hello")
    inputs.add_argument(
        "--pf",
        metavar="PF",
        help="name, version and revision, e.g. hello-1.0-r1 (PN-...)",
    )
    inputs.add_argument(
        "--build-id",
        metavar="N",
        help="Portage's BUILD_ID, a number (binpkg-multi-instance), not an ELF build-id",
    )
    inputs.add_argument(
        "--output",
        metavar="FILE",
        help=f"write here instead of the .tarball path (name it *{TARBALL_SUFFIX})",
    )
    _add_compression(p)
    checks = p.add_argument_group("checks")
    checks.add_argument(
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
    _verbosity(p, "list each file packed", "print only warnings and errors")
    p.set_defaults(run=cmd_pack)


def _add_compression(p: argparse.ArgumentParser) -> None:
    packing = p.add_argument_group("compression")
    packing.add_argument(
        "-j",
        "--jobs",
        type=jobs_arg,
        default=0,
        metavar="N",
        help="compress on N threads; 0 (the default) means one per CPU. Capped at "
        "the CPUs and a quarter of the RAM; the output does not depend on it",
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
        "-e",
        "--extreme",
        action="store_true",
        help="xz's extreme variant of the preset (-9e): slower, a little smaller",
    )
    packing.add_argument(
        "--block-size",
        type=block_size_arg,
        metavar="SIZE",
        help=f"close an xz block at the first file boundary once it holds SIZE, "
        f"{format_size(BLOCK_SIZE_MIN)} to {format_size(BLOCK_SIZE_MAX)} (default: "
        f"{format_size(BLOCK_SIZE)}; -7 to -9: their dictionary size); a file that "
        "would take its block past 2 x SIZE or 3 x the dictionary (24 MiB at -6), "
        "whichever is larger, goes on in blocks of that size",
    )
    p.set_defaults(preset=6)


def _add_workers(p: argparse.ArgumentParser) -> None:
    p.add_argument(
        "-j",
        "--jobs",
        type=jobs_arg,
        default=0,
        metavar="N",
        help="read N tarballs at a time, in worker processes; 0 (the default) "
        "means one per CPU",
    )


def _add_buildid(commands) -> None:
    p = _command(
        commands,
        "buildid",
        "print the GNU build-id of ELF files",
        "Print `BUILDID  PATH` for each ELF file, reading only its headers and notes.\n"
        "Exits 1 if any file has no build-id.",
        "  packdebug buildid /usr/bin/ls /usr/lib/debug/usr/bin/hello.debug",
    )
    p.add_argument("files", nargs="+", metavar="FILE")
    p.set_defaults(run=cmd_buildid, verbosity=0)


def _add_list(commands) -> None:
    p = _command(
        commands,
        "list",
        "list tarballs' members with their kind and build-id",
        """\
List each member: kind, size, build-id, name (-> link target).  Kinds follow
debuginfod: debuginfo, executable, source (any other file), symlink,
hardlink, directory, other.  Reads the tar headers and the ELF headers and
notes only, not whole files.  Names are shown as `ls -b` shows them.""",
        f"""\
  packdebug list {DEMO_TARBALL}
  packdebug list -v {DEMO_TARBALL}
  packdebug list --json {DEMO_TARBALL}""",
    )
    p.add_argument("tarballs", nargs="+", metavar="TARBALL")
    p.add_argument("--json", action="store_true", help="print JSON instead of columns")
    _verbosity(p, "add mode, mtime, header offset and xz block number", "")
    p.set_defaults(run=cmd_list)


def _add_verify(commands) -> None:
    p = _command(
        commands,
        "verify",
        "check tarballs: xz checks, seekability, tar, build-ids, links, names",
        """\
Check each tarball and report, per tarball:
  xz         one stream, no padding, every block's check verified
  seekable   whether debuginfod >= 0.192 seeks in it, and if not, why
  tar        headers parse, members inside the data, end-of-archive marker,
             nothing but zeros after it
  build-ids  every ELF under usr/lib/debug has a GNU build-id
  links      every .build-id/xx/*.debug symlink resolves inside the archive,
             to an ELF with that build-id
  names      no absolute paths, '..', '.' or '//' (a leading './', as in
             Portage's tarballs, is only a note: debuginfod copes)
Works on any .tar.xz, Portage's included.  Exits 0 only if all pass.""",
        f"""\
  packdebug verify {DEMO_TARBALL}
  packdebug verify -q $(find /usr/lib/debug/.tarball -name '*.tar.xz')""",
    )
    p.add_argument("tarballs", nargs="+", metavar="TARBALL")
    _add_workers(p)
    _verbosity(
        p,
        "list every problem (otherwise the first 5 of each check)",
        "print only the tarballs that fail, and their failed checks",
    )
    p.set_defaults(run=cmd_verify)


def _add_extract(commands) -> None:
    p = _command(
        commands,
        "extract",
        "extract one file by build-id or name, or everything safely",
        """\
Extract one member, decompressing only the xz blocks that hold it (and its
tar header) and verifying their checks: nothing is written unless they pass.
Links inside the archive are followed.  Or extract everything under DIR,
refusing absolute names, '..', links that lead outside DIR, and devices;
setuid bits are dropped, and no file takes its name before its blocks'
checks have passed.""",
        f"""\
  packdebug extract {DEMO_TARBALL} \\
      --member usr/src/debug/app-misc/hello-1.0/hello-1.0/hello.c -o -
  packdebug extract {DEMO_TARBALL} \\
      --build-id "$(packdebug buildid {DEMO_IMAGE}/usr/bin/hello | cut -d' ' -f1)" \\
      -o /tmp/hello.debug
  packdebug extract {DEMO_TARBALL} --all -C /tmp/debug""",
    )
    p.add_argument("tarball", metavar="TARBALL")
    which = p.add_mutually_exclusive_group(required=True)
    which.add_argument(
        "--build-id", metavar="ID", help="the ELF with this GNU build-id (hex)"
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
    _verbosity(p, "say what was extracted", "print only warnings and errors")
    p.set_defaults(run=cmd_extract)


def _add_find(commands) -> None:
    p = _command(
        commands,
        "find",
        "which tarball holds a build-id",
        """\
Print `TARBALL  MEMBER` for the tarballs that hold the ELF with BUILDID, among
the tarballs given and those under the roots given (default: the tarball
root).  It looks for estrip's usr/lib/debug/.build-id/xx/yyyy.debug link by
name, which in packdebug's layout reads the start of a few xz blocks, and
confirms the ELF note; only if no tarball has the link does it read the ELF
notes of every member.  Exits 1 if no tarball holds it.""",
        f"""\
  packdebug find "$(packdebug buildid {DEMO_IMAGE}/usr/bin/hello | cut -d' ' -f1)"
  packdebug find "$(packdebug buildid {DEMO_IMAGE}/usr/lib/libgreet.so.1 | cut -d' ' -f1)" \\
      {DEMO_TARBALL}""",
    )
    p.add_argument("build_id", metavar="BUILDID")
    p.add_argument(
        "places",
        nargs="*",
        metavar="ROOT|TARBALL",
        help=f"tarballs, or directories holding them (default: /{TARBALL_DIR})",
    )
    _add_workers(p)
    p.set_defaults(run=cmd_find, verbosity=0)


def _add_repack(commands) -> None:
    p = _command(
        commands,
        "repack",
        "rewrite tarballs (Portage's too) in packdebug's seekable, reproducible layout",
        """\
Rewrite existing tarballs into packdebug's layout: seekable xz blocks,
canonical member names and order, reproducible headers.  The files inside
stay byte-identical; each tarball is replaced atomically under its own name,
and only once the new one passes verify.  One that fails verify's xz or tar
checks is left untouched and reported; one already in the layout is skipped
unless --force.  A tarball with large xz blocks is first decompressed into an
unnamed temporary file beside it.  Several tarballs are repacked -j at a
time, in worker processes, each compressed on one thread.""",
        """\
  packdebug repack --root /usr/lib/debug/.tarball --dry-run
  packdebug repack /usr/lib/debug/.tarball/app-misc/hello/hello-1.0-1-debug.tar.xz""",
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
    _verbosity(p, "also name the tarballs skipped", "print only warnings and errors")
    p.set_defaults(run=cmd_repack)


def _add_prune(commands) -> None:
    p = _command(
        commands,
        "prune",
        "remove debug tarballs whose binary package is gone",
        """\
Portage keeps every debug tarball (UNINSTALL_IGNORE), owned by nothing.  prune
removes a tarball CAT/PN/PF[-BUILD_ID]-debug.tar.xz under ROOT only when all of
these hold:
  - its binary package is gone: PKGDIR/CAT/PN/PF-BUILD_ID.gpkg.tar or .xpak,
    or, without BUILD_ID, PKGDIR/CAT/PF.gpkg.tar or .tbz2, and PKGDIR's
    Packages index does not list it either;
  - it is not the debug info of the installed instance (VARDB/CAT/PF and its
    BUILD_ID);
  - it is older than --min-age days;
  - it is not among the --keep-newest newest of its CAT/PN (by version, then
    BUILD_ID), as clients may still run old binaries after an upgrade.
Then it removes the directories those removals emptied.  It never follows a
symlink, never touches anything but *-debug.tar.xz files under ROOT (nor a
pack's hidden temporary files), and lists names it cannot parse as
"unrecognised, kept".  It refuses a PKGDIR without Portage's layout, and a
plan that would empty more than half the packages unless --force.  Several
prunes, or a prune beside a pack, can run at once.""",
        """\
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
        type=count_arg,
        default=1,
        metavar="N",
        help="keep the N newest tarballs of each package whatever else (default: 1)",
    )
    p.add_argument(
        "--min-age",
        type=days_arg,
        default=1.0,
        metavar="DAYS",
        help="keep tarballs younger than this (default: 1 day)",
    )
    p.add_argument(
        "--force",
        action="store_true",
        help="remove even when that empties more than half the packages",
    )
    p.add_argument(
        "-n", "--dry-run", action="store_true", help="print the plan; remove nothing"
    )
    p.add_argument("--json", action="store_true", help="print the result as JSON")
    _verbosity(
        p, "also list each tarball kept, and why", "print only warnings and errors"
    )
    p.set_defaults(run=cmd_prune)


def _add_settings(commands) -> None:
    p = _command(
        commands,
        "settings",
        "print the Portage settings that go with packdebug tarballs",
        """\
Print the Portage settings a binhost needs beside packdebug tarballs, each
with a comment saying where it must go and why; or, with --bashrc, a hook
that packs every merged package; or, with --debuginfod, the server side: the
debuginfod command line, a hardened systemd unit, and the clients' line.""",
        """\
  packdebug settings >> /etc/portage/make.conf
  packdebug settings --bashrc >> /etc/portage/bashrc
  packdebug settings --bashrc --dedup >> /etc/portage/bashrc
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
        help="do not keep the debug info twice on the binhost: with --bashrc, a hook "
        "that deletes what it packed; otherwise a note on how",
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
        metavar="ADDR:PORT",
        help=f"where debuginfod listens (default: {DEBUGINFOD_LISTEN})",
    )
    server.add_argument(
        "--root", metavar="DIR", help=f"the tarballs (default: /{TARBALL_DIR})"
    )
    server.add_argument(
        "--pkgdir", metavar="DIR", help=f"the binary packages (default: {BINPKG_DIR})"
    )
    server.add_argument(
        "--database",
        metavar="FILE",
        help=f"debuginfod's sqlite database for the command line (default: {DEBUGINFOD_DATABASE})",
    )
    server.add_argument(
        "--debuginfod-version",
        metavar="X.Y",
        help="write for this elfutils, e.g. for another host (default: ask `debuginfod --version`)",
    )
    p.set_defaults(run=cmd_settings, verbosity=0)


# Commands whose output is their product: one that cannot be written fails them.
PRODUCT_ON_STDOUT = {"buildid", "list", "find", "settings", "extract"}


def _quiet_stdout() -> None:
    """Point fd 1 at /dev/null, so that what is still buffered cannot fail again at exit."""
    with contextlib.suppress(OSError):
        devnull = os.open(os.devnull, os.O_WRONLY)
        os.dup2(devnull, sys.stdout.fileno())
        os.close(devnull)


class _ClosedStdout(io.TextIOBase):
    """sys.stdout once fd 1 was found closed: every write fails, as on a full disk."""

    def __init__(self) -> None:
        super().__init__()
        self.buffer = self  # extract -o - writes bytes to sys.stdout.buffer

    def writable(self) -> bool:
        return True

    def write(self, data) -> int:
        raise OSError(errno.EBADF, "it was closed")

    def fileno(self) -> int:
        return 1


def _fill_closed_std_streams() -> None:
    """Give a closed stdin, stdout or stderr (`>&-`) /dev/null.

    Otherwise the next file packdebug opens would take its number, and a
    report meant for stdout could land in a tarball.  What is written to a
    closed stdout then fails as it does on a full disk.
    """
    for fd in (0, 1, 2):
        try:
            os.fstat(fd)
        except OSError:
            null = os.open(os.devnull, os.O_RDWR)  # the lowest free number: fd
            if null != fd:
                os.dup2(null, fd)
                os.close(null)
            if fd == 1:
                sys.stdout = _ClosedStdout()
            elif fd == 2:
                sys.stderr = open(2, "w", closefd=False)  # noqa: SIM115


def _stopped(e: BaseException, what: str) -> str:
    state = getattr(e, "packdebug_state", "") or "nothing was written"
    return f"packdebug: {what}; {state}"


def main(argv: Sequence[str] | None = None) -> int:
    _fill_closed_std_streams()
    argv = list(sys.argv[1:] if argv is None else argv)
    parser = build_parser()
    negative = _negative_jobs(argv)
    if negative is not None:
        parser.error(
            f"argument -j/--jobs: must be 0 (all CPUs) or more, not {negative}"
        )
    args = parser.parse_args(argv)
    log = Log(args.verbosity)
    previous = {}
    try:
        try:
            for signum in (signal.SIGTERM, signal.SIGINT):
                previous[signum] = signal.signal(signum, on_signal)
            status = args.run(args, log)
            with contextlib.suppress(ValueError):  # stdout closed
                if log.out is sys.stdout and log.report_error is None:
                    try:
                        sys.stdout.flush()
                    except BrokenPipeError:
                        raise
                    except OSError as e:
                        log.report_error = e
        finally:
            # The outcome is known: a signal now changes nothing.
            _Signals.stopping = True
        if log.report_error is not None:
            message = f"cannot write to standard output: {log.report_error.strerror}"
            if log.out is sys.stdout:
                _quiet_stdout()
            if args.command in PRODUCT_ON_STDOUT:
                print(f"packdebug: error: {message}", file=sys.stderr)
                return 1
            log.warning(f"{message}; the {args.command} itself went through")
        return status
    except PackdebugError as e:
        print(f"packdebug: error: {e}", file=sys.stderr)
        return e.exit_code
    except KeyboardInterrupt as e:
        print(_stopped(e, "interrupted"), file=sys.stderr)
        return 130
    except Terminated as e:
        print(_stopped(e, "terminated"), file=sys.stderr)
        return 143
    except BrokenPipeError:
        _quiet_stdout()  # the reader went away (`| head`): not an error of ours
        return 141
    finally:
        for signum, handler in reversed(previous.items()):  # SIGINT first
            signal.signal(signum, handler)
        _Signals.stopping, _Signals.pending = False, None


if __name__ == "__main__":
    sys.exit(main())
