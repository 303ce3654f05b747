"""Tests for packdebug, grouped in the order of packdebug.py's parts.

Real artifacts wherever they exist: gcc-built ELF split the estrip way
(tests/estrip-image.sh), cross-compiled 32-bit and big-endian ELF, GNU tar,
bsdtar, xz, real debuginfod servers (Debian's, 0.192 and 0.196 from the
workplace harnesses), gdb, a real systemd and real Portage.  Hand-made bytes
only for malformed or hostile input.

Set PACKDEBUG_REQUIRE_TOOLS=1 (as .ci/run does) to turn every "tool not
installed" skip into a failure, and PACKDEBUG_REQUIRE_HARNESS=1 to do the
same for the harnesses.  PACKDEBUG_HARNESS_TESTS=0 skips the harness tests
(.ci/run runs them once, in the main pass, not again for each Python).
"""

from __future__ import annotations

import bisect
import contextlib
import gc
import hashlib
import io
import json
import lzma
import os
import pathlib
import random
import re
import shutil
import signal
import socket
import stat
import struct
import subprocess
import sys
import tarfile
import time
import tracemalloc
import urllib.request
import zlib

import pytest

import packdebug as pd

HERE = pathlib.Path(__file__).resolve().parent
SCRIPT = HERE / "packdebug.py"
ESTRIP_IMAGE = HERE / "tests" / "estrip-image.sh"
REQUIRE_TOOLS = os.environ.get("PACKDEBUG_REQUIRE_TOOLS") == "1"
REQUIRE_HARNESS = os.environ.get("PACKDEBUG_REQUIRE_HARNESS") == "1"
HARNESS_TESTS = os.environ.get("PACKDEBUG_HARNESS_TESTS", "1") != "0"
SHARED_TOOLS = HERE.parent / "shared" / "tools"
HARNESS = pathlib.Path(os.environ.get("HARNESS", "/var/tmp/debuginfod-harness"))
CROSS_COMPILERS = {  # (ELF class, data encoding) each makes
    "i686-linux-gnu-gcc": "ELF32 little-endian",
    "powerpc-linux-gnu-gcc": "ELF32 big-endian",
    "s390x-linux-gnu-gcc": "ELF64 big-endian",
}
PACK_NAMES = ("--category", "app-misc", "--pn", "hello", "--pf", "hello-1.0")
TARBALL = "usr/lib/debug/.tarball/app-misc/hello/hello-1.0-1-debug.tar.xz"
SOURCE = "usr/src/debug/app-misc/hello-1.0/hello-1.0/hello.c"
MiB = 1 << 20


# ---------------------------------------------------------------------------
# helpers
# ---------------------------------------------------------------------------


def need(*tools: str) -> None:
    missing = [t for t in tools if not shutil.which(t)]
    if missing and REQUIRE_TOOLS:
        pytest.fail(f"required tools missing: {missing} (PACKDEBUG_REQUIRE_TOOLS=1)")
    if missing:
        pytest.skip(f"not installed: {' '.join(missing)}")


def need_root() -> None:
    if os.geteuid() != 0:
        if REQUIRE_TOOLS:
            pytest.fail("this test needs root (PACKDEBUG_REQUIRE_TOOLS=1)")
        pytest.skip("needs root")


def need_harness(path: pathlib.Path, what: str) -> None:
    """A workplace harness (../shared/tools): skipped only where it cannot be."""
    if not HARNESS_TESTS:
        pytest.skip(
            "harness tests run once, in the main pass (PACKDEBUG_HARNESS_TESTS=0)"
        )
    if not path.exists():
        message = f"no {what} at {path} (see ../shared/tools)"
        if REQUIRE_HARNESS:
            pytest.fail(message + " (PACKDEBUG_REQUIRE_HARNESS=1)")
        pytest.skip(message)


def run(*cmd, check: bool = True, **kwargs) -> subprocess.CompletedProcess:
    kwargs.setdefault("stdout", subprocess.PIPE)
    kwargs.setdefault("stderr", subprocess.PIPE)
    result = subprocess.run([str(c) for c in cmd], check=False, **kwargs)
    if check and result.returncode != 0:
        raise AssertionError(
            f"{cmd} exited {result.returncode}:\n{result.stdout!r}\n{result.stderr!r}"
        )
    return result


def clean_env(extra: dict | None = None) -> dict:
    """The environment without Portage's variables, plus `extra`."""
    portage = {
        *pd.PORTAGE_INPUTS,
        "D",
        "EPREFIX",
        "PORTAGE_BUILDDIR",
        "SOURCE_DATE_EPOCH",
    }
    portage |= {"INSTALL_MASK", "EMERGE_FROM"}
    base = {k: v for k, v in os.environ.items() if k not in portage}
    return {**base, **(extra or {})}


def cli(
    *args, env: dict | None = None, check: bool = True, **kwargs
) -> subprocess.CompletedProcess:
    """Run packdebug.py as a user would, with a clean Portage-free environment."""
    return run(
        sys.executable,
        SCRIPT,
        *args,
        env=clean_env(env),
        check=check,
        text=True,
        **kwargs,
    )


def in_process(*args) -> tuple[int, str, str]:
    out, err = io.StringIO(), io.StringIO()
    with contextlib.redirect_stdout(out), contextlib.redirect_stderr(err):
        code = pd.main([str(a) for a in args])
    return code, out.getvalue(), err.getvalue()


def no_traceback(result: subprocess.CompletedProcess) -> None:
    assert "Traceback" not in result.stderr, result.stderr


def copy_tree(src: pathlib.Path, dst: pathlib.Path) -> pathlib.Path:
    run("cp", "-a", src, dst)  # keeps hardlinks, symlinks, modes and mtimes
    return dst


def pack(image: pathlib.Path, *extra: str, env: dict | None = None) -> pathlib.Path:
    cli("pack", "--image", image, *PACK_NAMES, "--build-id", "1", "-q", *extra, env=env)
    return image / TARBALL


def snapshot(root: pathlib.Path, trees=pd.DEBUG_TREES) -> dict:
    """Everything tar should preserve of the debug trees under root."""
    result, inodes = {}, {}
    for tree in trees:
        for dirpath, dirnames, filenames in os.walk(root / tree):
            dirnames[:] = [
                d
                for d in dirnames
                if os.path.join(dirpath, d) != str(root / pd.TARBALL_DIR)
            ]
            for name in sorted(dirnames + filenames):
                path = pathlib.Path(dirpath, name)
                rel = str(path.relative_to(root))
                st = path.lstat()
                if stat.S_ISLNK(st.st_mode):
                    result[rel] = ("symlink", os.readlink(path))
                elif stat.S_ISDIR(st.st_mode):
                    result[rel] = ("dir", stat.S_IMODE(st.st_mode) & 0o755)
                else:
                    digest = hashlib.sha256(path.read_bytes()).hexdigest()
                    inodes.setdefault(st.st_ino, []).append(rel)
                    mode = stat.S_IMODE(st.st_mode) & 0o755
                    result[rel] = ("file", mode, digest, st.st_ino)
    # Replace inode numbers by the group of names sharing them.
    return {
        k: v[:3] + (tuple(sorted(inodes[v[3]])),) if v[0] == "file" else v
        for k, v in result.items()
    }


def tree_state(root: pathlib.Path) -> dict:
    """Every entry under root, with its kind and content: to prove nothing changed."""
    state = {}
    for path in sorted(root.rglob("*")):
        st = path.lstat()
        if stat.S_ISLNK(st.st_mode):
            state[str(path)] = ("symlink", os.readlink(path))
        elif stat.S_ISDIR(st.st_mode):
            state[str(path)] = ("dir",)
        else:
            state[str(path)] = ("file", path.read_bytes())
    return state


def xz_robot(path: pathlib.Path) -> list[list[str]]:
    return [
        line.split("\t")
        for line in run("xz", "--robot", "-lvv", path, text=True).stdout.splitlines()
    ]


def xz_blocks(path: pathlib.Path) -> list[dict]:
    """Blocks as `xz --robot -lvv` reports them."""
    return [
        {
            "uncompressed_offset": int(r[5]),
            "uncompressed_size": int(r[7]),
            "check": r[9],
        }
        for r in xz_robot(path)
        if r[0] == "block"
    ]


def xz_summary(path: pathlib.Path) -> dict:
    totals = next(r for r in xz_robot(path) if r[0] == "totals")
    return {
        "streams": int(totals[1]),
        "blocks": int(totals[2]),
        "check": totals[6],
        "padding": int(totals[7]),
    }


def readelf_build_id(path) -> str | None:
    out = run("readelf", "-n", path, text=True, check=False).stdout
    match = re.search(r"Build ID: ([0-9a-f]+)", out)
    return match.group(1) if match else None


@pytest.fixture(scope="session")
def estrip_image(tmp_path_factory) -> pathlib.Path:
    """A gcc-built image split the estrip way (read-only: copy it to change it)."""
    need("gcc", "objcopy", "strip", "debugedit")
    image = tmp_path_factory.mktemp("estrip") / "image"
    run("bash", ESTRIP_IMAGE, image)
    return image


@pytest.fixture
def image(estrip_image, tmp_path) -> pathlib.Path:
    return copy_tree(estrip_image, tmp_path / "image")


def debug_file(image: pathlib.Path, name: str = "usr/bin/hello") -> pathlib.Path:
    """The .debug of a binary: estrip names it after one of its hard links."""
    for candidate in (name, name + "-again"):
        path = image / "usr/lib/debug" / (candidate + ".debug")
        if path.exists():
            return path
    raise AssertionError(f"no debug file for {name}")


def random_bytes(size: int, seed: int) -> bytes:
    return (
        random.Random(seed).getrandbits(8 * size).to_bytes(size, "little")
        if size
        else b""
    )


def elf_with_section(tmp_path: pathlib.Path, size: int, seed: int = 0) -> pathlib.Path:
    """A real debug file plus a .debug_junk section of `size` random bytes."""
    need("gcc", "objcopy")
    src = tmp_path / f"big{seed}.c"
    src.write_text(f"int main(void) {{ return {seed}; }}\n")
    binary = tmp_path / f"big{seed}"
    run("gcc", "-g", "-Wl,--build-id", "-o", binary, src)
    return debug_with_junk(binary, tmp_path / f"big{seed}.debug", size, seed)


def debug_with_junk(
    elf: pathlib.Path, out: pathlib.Path, size: int, seed: int
) -> pathlib.Path:
    """elf's debug file (objcopy --only-keep-debug) with a .debug_junk section of
    `size` random bytes."""
    junk = out.with_name(out.name + ".junk")
    junk.write_bytes(random_bytes(size, seed))
    run(
        "objcopy", "--only-keep-debug", "--add-section", f".debug_junk={junk}", elf, out
    )
    return out


def big_image(
    image: pathlib.Path, tmp_path: pathlib.Path, count: int = 3, size: int = 3 << 20
) -> dict:
    """Add `count` large debug files to an image, linked as estrip links; {build-id: path}."""
    ids = {}
    for seed in range(count):
        big = elf_with_section(tmp_path, size, seed=20 + seed)
        target = image / f"usr/lib/debug/usr/lib/big{seed}.so.debug"
        shutil.copy(big, target)
        build_id = readelf_build_id(target)
        link = image / f"usr/lib/debug/.build-id/{build_id[:2]}/{build_id[2:]}.debug"
        link.parent.mkdir(exist_ok=True)
        link.symlink_to(f"../../usr/lib/big{seed}.so.debug")
        ids[build_id] = target
    return ids


def make_tree(root: pathlib.Path, files: dict, order=None) -> None:
    names = list(files) if order is None else order
    for name in names:
        path = root / name
        path.parent.mkdir(parents=True, exist_ok=True)
        path.write_bytes(files[name])


def portage_tarball(image: pathlib.Path, out: pathlib.Path) -> pathlib.Path:
    """Exactly what Portage's __generate_packdebug runs, from ${ED}."""
    need("tar", "xz")
    trees = [f"./{t}" for t in pd.DEBUG_TREES if (image / t).is_dir()]
    with open(out, "wb") as f:
        run("tar", "-cJf", "-", *trees, cwd=image, stdout=f)
    return out


def write_xz(path: pathlib.Path, payloads: list) -> None:
    """One xz stream with one block per payload, as packdebug writes it."""
    with open(path, "wb") as f:
        writer = pd.XzStreamWriter(f)
        for payload in payloads:
            writer.write_block(*pd.compress_block(payload))
        writer.close()


def tar_bytes(members) -> bytes:
    """An uncompressed tar of (TarInfo fields, data) pairs, GNU format."""
    buffer = io.BytesIO()
    with tarfile.open(fileobj=buffer, mode="w", format=tarfile.PAX_FORMAT) as tar:
        for fields, data in members:
            fields = dict(fields)
            info = tarfile.TarInfo(fields.pop("name"))
            for key, value in fields.items():
                setattr(info, key, value)
            info.size = (
                len(data) if info.type in (tarfile.REGTYPE, tarfile.AREGTYPE) else 0
            )
            tar.addfile(info, io.BytesIO(data))
    return buffer.getvalue()


def hostile_tarball(path: pathlib.Path, *members) -> pathlib.Path:
    """A multi-block .tar.xz with hand-made members: (TarInfo fields, data) pairs."""
    data = tar_bytes(members)
    write_xz(path, [data[:512], data[512:]] if len(data) > 512 else [data])
    return path


def rewrite_index(data: bytes, change) -> bytes:
    """Apply change(records) to a one-stream xz file's Index, keeping CRCs valid."""
    _, index_size = pd.parse_stream_footer(data[-12:])
    records = change(pd.parse_index(data[-12 - index_size : -12]))
    index = pd.create_index(records)
    assert len(index) == index_size, "the lie must keep the Index size"
    return data[: -12 - index_size] + index + data[-12:]


def swap_blocks(data: bytes, first: int, second: int) -> bytes:
    """Swap two Blocks of a one-stream xz file and rewrite its Index to match."""
    _, index_size = pd.parse_stream_footer(data[-12:])
    records = pd.parse_index(data[-12 - index_size : -12])
    starts, offset = [], 12
    for r in records:
        starts.append(offset)
        offset += pd.round_up(r.unpadded_size)
    pieces = [
        data[s : s + pd.round_up(r.unpadded_size)] for s, r in zip(starts, records)
    ]
    pieces[first], pieces[second] = pieces[second], pieces[first]
    records[first], records[second] = records[second], records[first]
    index = pd.create_index(records)
    return (
        data[:12]
        + b"".join(pieces)
        + index
        + pd.create_stream_footer(pd.CHECK_CRC64, len(index))
    )


def peak_rss_mib(argv: list) -> tuple[float, float, subprocess.CompletedProcess]:
    """(peak RSS in MiB, CPU seconds, result) of a command, as GNU time measures them.

    Not getrusage: a child forked from pytest counts pytest's memory until it
    execs.  CPU seconds, not wall: the suite shares its 2 cores.
    """
    need("time")
    with open(os.devnull, "w") as sink:
        result = run(
            "/usr/bin/time",
            "-f",
            "%M %U %S",
            *argv,
            text=True,
            check=False,
            stdout=sink,
        )
    *errors, last = result.stderr.rstrip("\n").split("\n")
    rss, user, system = last.split()
    result.stderr = "\n".join(errors)
    return int(rss) / 1024, float(user) + float(system), result


@contextlib.contextmanager
def tiny_tmpfs(path: pathlib.Path, size: str = "64k"):
    """A small tmpfs mounted at path (root only), unmounted afterwards."""
    need_root()
    path.mkdir(exist_ok=True)
    if run(
        "mount", "-t", "tmpfs", "-o", f"size={size}", "tmpfs", path, check=False
    ).returncode:
        pytest.fail("cannot mount a tmpfs, although root")
    try:
        yield path
    finally:
        run("umount", "-l", path, check=False)


# ---------------------------------------------------------------------------
# helpers and errors
# ---------------------------------------------------------------------------


def test_shown_escapes_names_as_ls_b_does():
    assert pd.shown("usr/lib/debug/x.debug") == "usr/lib/debug/x.debug"
    assert pd.shown("a\nb\tc\\d") == "a\\nb\\tc\\\\d"
    assert pd.shown(b"caf\xc3\xa9 \xff\x1b[31m") == "café \\377\\033[31m"
    assert pd.shown("x\udcff") == "x\\377"  # a surrogate-escaped byte


def test_errors_carry_path_reason_and_hint():
    error = pd.XzError("Index CRC32 does not match", hint="get a fresh copy")
    assert (error.path, error.reason) == (None, "Index CRC32 does not match")
    assert error.at("/t.tar.xz") is error and error.path == "/t.tar.xz"
    assert str(error) == "/t.tar.xz: Index CRC32 does not match; get a fresh copy"
    assert error.at("/other").path == "/t.tar.xz", "the first path named stays"
    refusal = pd.LinkOutsideDestinationError("a\nb", "symlink to '..'")
    assert isinstance(refusal, pd.ExtractError) and refusal.member == "a\nb"
    assert str(refusal) == "member 'a\\nb': symlink to '..'"


def test_name_problems_are_constants_tested_by_identity():
    assert pd.name_problems("/etc/x") == [pd.ABSOLUTE_NAME]
    assert pd.name_problems("./usr/x") == [pd.DOT_SLASH_NAME]
    assert pd.name_problems("usr/../x") == [pd.DOTDOT_NAME]
    assert pd.name_problems("usr//x/./y") == [pd.DOT_NAME, pd.EMPTY_COMPONENT]
    assert pd.name_problems("usr/lib/debug/x") == []


# ---------------------------------------------------------------------------
# 1. ELF notes
# ---------------------------------------------------------------------------


def test_build_id_of_gcc_binary_and_its_debug_files_matches_readelf(estrip_image):
    files = [
        estrip_image / "usr/bin/hello",
        estrip_image / "usr/lib/libgreet.so.1",
        debug_file(estrip_image),
        debug_file(estrip_image, "usr/lib/libgreet.so.1"),
    ]
    for path in files:
        expected = readelf_build_id(path)
        assert expected and pd.read_build_id(path) == expected, path


def test_build_id_survives_compress_debug_sections(tmp_path, estrip_image):
    need("objcopy")
    for style in ("zlib", "zlib-gnu"):
        out = tmp_path / f"hello-{style}.debug"
        run(
            "objcopy",
            f"--compress-debug-sections={style}",
            debug_file(estrip_image),
            out,
        )
        assert pd.read_build_id(out) == readelf_build_id(debug_file(estrip_image))
        info = pd.read_elf_file(out, sections=True)
        assert info.has_debug_sections and info.is_debuginfo, style


def cross_binary(
    tmp_path: pathlib.Path, compiler: str
) -> tuple[pathlib.Path, pathlib.Path]:
    """A binary built by a cross compiler, and its .debug split with objcopy."""
    need(compiler, "readelf")
    src = tmp_path / "x.c"
    src.write_text("int main(void) { return 0; }\n")
    binary = tmp_path / f"x-{compiler}"
    run(compiler, "-g", "-O2", "-Wl,--build-id", "-o", binary, src)
    debug = tmp_path / f"x-{compiler}.debug"
    prefix = compiler[: -len("gcc")]
    objcopy = prefix + "objcopy" if shutil.which(prefix + "objcopy") else "objcopy"
    run(objcopy, "--only-keep-debug", binary, debug)
    return binary, debug


@pytest.mark.parametrize("compiler", sorted(CROSS_COMPILERS))
def test_build_id_of_32_bit_and_big_endian_elf(tmp_path, compiler):
    binary, debug = cross_binary(tmp_path, compiler)
    ident = binary.read_bytes()[:6]
    cls, data = CROSS_COMPILERS[compiler].split()
    assert ident[4] == (1 if cls == "ELF32" else 2)
    assert ident[5] == (1 if data == "little-endian" else 2)
    for path in (binary, debug):
        assert pd.read_build_id(path) == readelf_build_id(path) is not None
        info = pd.read_elf_file(path, sections=True)
        assert info.is_executable if path == binary else info.is_debuginfo


def test_elf_without_build_id_has_none(tmp_path):
    need("gcc")
    src = tmp_path / "x.c"
    src.write_text("int main(void) { return 0; }\n")
    run("gcc", "-g", "-Wl,--build-id=none", "-o", tmp_path / "x", src)
    assert pd.read_build_id(tmp_path / "x") is None
    assert readelf_build_id(tmp_path / "x") is None


def test_non_elf_file_has_no_elf_info(tmp_path):
    (tmp_path / "t.c").write_text("int x;\n")
    assert pd.read_elf_file(tmp_path / "t.c") is None


def test_notes_in_8_byte_aligned_region_are_padded_to_8():
    # A GNU property note with a 12-byte descriptor, then the build-id: with
    # 8-byte alignment the second note starts at 32, with 4-byte at 28.
    prop = struct.pack("<III", 4, 12, 5) + b"GNU\0" + bytes(12) + bytes(4)
    build_id = (
        struct.pack("<III", 4, 4, pd.NT_GNU_BUILD_ID) + b"GNU\0" + b"\xde\xad\xbe\xef"
    )
    notes = prop + build_id
    assert [n[1] for n in pd.iter_notes(notes, 8, "<")] == [5, pd.NT_GNU_BUILD_ID]
    assert pd.build_id_of_notes(notes, 8, "<") == "deadbeef"
    with contextlib.suppress(pd.ElfError):  # read 4-aligned, the same bytes are garbage
        assert pd.build_id_of_notes(notes, 4, "<") != "deadbeef"


def test_build_id_read_touches_only_headers_and_notes(tmp_path):
    debug = elf_with_section(tmp_path, 8 * MiB)
    data = debug.read_bytes()
    touched = []

    def read_at(offset, size):
        touched.append(size)
        return data[offset : offset + size]

    info = pd.read_elf(read_at, len(data), str(debug), sections=True)
    assert info.build_id == readelf_build_id(debug)
    assert sum(touched) < 16 * 1024, (
        f"read {sum(touched)} bytes of a {len(data)}-byte file"
    )


def test_truncated_elf_is_reported_never_crashes(tmp_path, estrip_image):
    data = debug_file(estrip_image).read_bytes()
    outcomes = set()
    for cut in list(range(0, 200, 7)) + list(range(200, len(data), 97)):
        path = tmp_path / "cut.debug"
        path.write_bytes(data[:cut])
        try:
            info = pd.read_elf_file(path, sections=True)
            outcomes.add("none" if info is None else "parsed")
        except pd.ElfError as e:
            assert e.path == path and "cut.debug" in str(e)
            outcomes.add("error")
    assert {"none", "error"} <= outcomes


def elf_seeds(tmp_path: pathlib.Path, estrip_image: pathlib.Path) -> dict:
    """Real ELF of every shape packdebug reads: the fuzzers' seeds."""
    seeds = {
        "elf64 binary": estrip_image / "usr/bin/hello",
        "elf64 .debug": debug_file(estrip_image),
        "elf64 library .debug": debug_file(estrip_image, "usr/lib/libgreet.so.1"),
    }
    compressed = tmp_path / "zlib.debug"
    run(
        "objcopy",
        "--compress-debug-sections=zlib",
        debug_file(estrip_image),
        compressed,
    )
    seeds["compressed sections"] = compressed
    seeds["extended numbering"] = extended_numbering_elf(
        tmp_path, debug_file(estrip_image)
    )
    for compiler in sorted(CROSS_COMPILERS):
        binary, debug = cross_binary(tmp_path, compiler)
        seeds[f"{CROSS_COMPILERS[compiler]} binary"] = binary
        seeds[f"{CROSS_COMPILERS[compiler]} .debug"] = debug
    return {name: path.read_bytes() for name, path in seeds.items()}


def extended_numbering_elf(
    tmp_path: pathlib.Path, source: pathlib.Path
) -> pathlib.Path:
    """An ELF64 copy whose e_shnum and e_shstrndx live in section header 0 (gABI)."""
    data = bytearray(source.read_bytes())
    (shoff,) = struct.unpack_from("<Q", data, 0x28)
    shnum, shstrndx = struct.unpack_from("<HH", data, 0x3C)
    struct.pack_into("<Q", data, shoff + 0x20, shnum)  # section 0's sh_size
    struct.pack_into("<I", data, shoff + 0x28, shstrndx)  # section 0's sh_link
    struct.pack_into("<HH", data, 0x3C, 0, pd.SHN_XINDEX)
    path = tmp_path / "extended.debug"
    path.write_bytes(bytes(data))
    assert pd.read_elf_file(path, sections=True) == pd.read_elf_file(
        source, sections=True
    )
    return path


def mutate(data: bytes, rng: random.Random) -> bytes:
    """One random mutation aimed at what the ELF reader parses."""
    out = bytearray(data)
    choice = rng.randrange(5)
    if choice == 0:  # a cut
        return bytes(out[: rng.randrange(len(out))])
    if choice == 1:  # bytes of the headers or tables
        for _ in range(rng.randint(1, 8)):
            out[rng.randrange(4, min(len(out), 1024))] = rng.randrange(256)
    elif choice == 2:  # anywhere
        for _ in range(rng.randint(1, 16)):
            out[rng.randrange(len(out))] ^= 1 << rng.randrange(8)
    elif choice == 3:  # an extreme value in a header field
        offset = rng.randrange(16, 64)
        out[offset : offset + 4] = rng.choice(
            [b"\xff\xff\xff\xff", b"\0\0\0\0", b"\xff\xff\0\0"]
        )
    else:  # the section header table's offset or count
        offset = rng.choice([0x20, 0x28, 0x30, 0x3C, 0x38])
        out[offset : offset + 2] = rng.randrange(65536).to_bytes(2, "little")
    return bytes(out)


def fuzz_elf(seeds: dict, cases: int, seed: int) -> dict:
    """Parse `cases` mutated seeds; every outcome is ElfInfo, None or ElfError."""
    rng = random.Random(seed)
    outcomes: dict = {}
    names = sorted(seeds)
    for _ in range(cases):
        data = mutate(seeds[rng.choice(names)], rng)
        try:
            info = pd.read_elf(
                lambda o, n, d=data: d[o : o + n], len(data), "fuzz", sections=True
            )
            kind = "build-id" if info.build_id else "no build-id"
        except pd.ElfError:
            kind = "ElfError"
        outcomes[kind] = outcomes.get(kind, 0) + 1
    return outcomes


def test_mutated_and_truncated_elf_never_crash(tmp_path, estrip_image):
    """Fixed-seed fuzzing of real ELF32/64, LE/BE, .debug, compressed, extended numbering."""
    seeds = elf_seeds(tmp_path, estrip_image)
    assert len(seeds) == 11
    outcomes = fuzz_elf(seeds, 4000, seed=8)
    assert set(outcomes) == {"build-id", "no build-id", "ElfError"}, outcomes
    assert sum(outcomes.values()) == 4000


def hostile_table_elf(path: pathlib.Path, size: int, table: str) -> pathlib.Path:
    """An ELF64 whose program or section header table fills the file (extended numbering).

    Every entry is one a parser must look at: PT_LOAD program headers, or
    allocated PROGBITS section headers.
    """
    header = bytearray(64)
    header[:16] = b"\x7fELF\x02\x01\x01" + bytes(9)
    entries = (size - 64 - 64) // (56 if table == "program" else 64)
    struct.pack_into("<HHI", header, 16, pd.ET_DYN, 62, 1)
    if table == "program":
        entry = struct.pack("<IIQQQQQQ", 1, 5, 0, 0, 0, 0, 0, 8)
        # e_phoff = 128; e_shoff = 64 (section 0 holds the real e_phnum)
        struct.pack_into("<QQ", header, 0x20, 128, 64)
        struct.pack_into("<HHHHHH", header, 0x34, 64, 56, pd.PN_XNUM, 64, 1, 0)
        section0 = struct.pack("<IIQQQQIIQQ", 0, 0, 0, 0, 0, 0, 0, entries, 0, 0)
    else:
        entry = struct.pack(
            "<IIQQQQIIQQ", 1, pd.SHT_PROGBITS, pd.SHF_ALLOC, 0, 0, 16, 0, 0, 1, 0
        )
        struct.pack_into("<QQ", header, 0x20, 0, 128)
        struct.pack_into("<HHHHHH", header, 0x34, 64, 56, 0, 64, 0, 0)
        entries += 1
        section0 = b""
        entry0 = struct.pack("<IIQQQQIIQQ", 0, 0, 0, 0, 0, entries, 0, 0, 0, 0)
    with open(path, "wb") as f:
        f.write(header + section0.ljust(64, b"\0"))
        if table != "program":
            f.write(entry0)
            entries -= 1
        chunk = entry * 4096
        written = 0
        while written < entries:
            n = min(4096, entries - written)
            f.write(chunk[: n * len(entry)])
            written += n
    return path


@pytest.mark.parametrize("table", ["program", "section"])
def test_a_header_table_filling_64_mib_costs_bounded_memory_and_time(tmp_path, table):
    path = hostile_table_elf(tmp_path / f"{table}.elf", 64 * MiB, table)
    rss, seconds, result = peak_rss_mib([sys.executable, SCRIPT, "buildid", path])
    assert result.returncode == 1 and "Traceback" not in result.stderr, result.stderr
    assert rss < 64 and seconds < 2.5, (rss, seconds)
    baseline, _, _ = peak_rss_mib([sys.executable, SCRIPT, "--version"])
    assert baseline < 40  # the interpreter's own share of those 64 MiB


def test_buildid_command_prints_ids_and_fails_for_a_file_without(
    estrip_image, tmp_path
):
    ok = cli("buildid", estrip_image / "usr/bin/hello", debug_file(estrip_image))
    expected = readelf_build_id(estrip_image / "usr/bin/hello")
    assert ok.stdout.splitlines() == [
        f"{expected}  {estrip_image / 'usr/bin/hello'}",
        f"{expected}  {debug_file(estrip_image)}",
    ]
    (tmp_path / "plain.txt").write_text("not elf\n")
    bad = cli(
        "buildid", estrip_image / "usr/bin/hello", tmp_path / "plain.txt", check=False
    )
    assert bad.returncode == 1 and "plain.txt: no GNU build-id" in bad.stderr
    assert bad.stdout.count("\n") == 1
    no_traceback(bad)


def test_buildid_refuses_fifos_and_directories_at_once(tmp_path):
    os.mkfifo(tmp_path / "fifo")
    result = cli("buildid", tmp_path / "fifo", tmp_path, check=False, timeout=10)
    assert result.returncode == 1
    assert f"{tmp_path / 'fifo'}: is a FIFO, not a regular file" in result.stderr
    assert f"{tmp_path}: is a directory, not a regular file" in result.stderr
    no_traceback(result)


# ---------------------------------------------------------------------------
# 2. xz container
# ---------------------------------------------------------------------------


@pytest.mark.parametrize("value", [0, 1, 127, 128, 300, 2**32, pd.VLI_MAX])
def test_multibyte_integers_round_trip(value):
    encoded = pd.encode_mbi(value)
    assert pd.decode_mbi(encoded + b"\xff", 0) == (value, len(encoded))


def test_multibyte_integer_must_be_shortest_and_complete():
    with pytest.raises(pd.XzError):
        pd.decode_mbi(b"\x80\x00", 0)  # 0 in two bytes
    with pytest.raises(pd.XzError):
        pd.decode_mbi(b"\x80", 0)


def test_index_round_trips_and_rejects_a_flipped_bit():
    records = [pd.IndexRecord(100, 4096), pd.IndexRecord(12345, 8 << 20)]
    index = pd.create_index(records)
    assert len(index) % 4 == 0 and pd.parse_index(index) == records
    for i in range(len(index)):
        broken = bytearray(index)
        broken[i] ^= 0x01
        with pytest.raises(pd.XzError):
            pd.parse_index(bytes(broken))


def test_written_stream_is_valid_xz_with_one_block_per_payload(tmp_path):
    need("xz")
    payloads = [b"a" * 100_000, os.urandom(70_000), b"tail"]
    path = tmp_path / "t.xz"
    write_xz(path, payloads)
    run("xz", "-t", path)
    assert xz_summary(path) == {
        "streams": 1,
        "blocks": 3,
        "check": "CRC64",
        "padding": 0,
    }
    assert [b["uncompressed_size"] for b in xz_blocks(path)] == [
        len(p) for p in payloads
    ]
    assert lzma.decompress(path.read_bytes()) == b"".join(payloads)


def test_reader_reads_any_range_of_a_multi_block_file(tmp_path):
    rng = random.Random(2)
    payloads = [
        random_bytes(n, rng.randrange(1000)) for n in (5000, 300_000, 1, 70_000)
    ]
    whole = b"".join(payloads)
    path = tmp_path / "t.xz"
    write_xz(path, payloads)
    reader = pd.XzReader(path)
    assert reader.seek(10) == 10 == reader.tell() and reader.seek(5, io.SEEK_CUR) == 15
    assert (
        reader.seek(-4, io.SEEK_END) == len(whole) - 4 and reader.read() == whole[-4:]
    )
    for _ in range(200):
        offset = rng.randrange(len(whole) + 10)
        size = rng.randrange(1, 100_000)
        reader.seek(offset)
        assert reader.read(size) == whole[offset : offset + size]
    sequential = pd.XzReader(path, sequential=True)
    assert sequential.verified_until() == 0
    sequential.verify_all()
    assert sequential.verified_blocks == {1, 2, 3, 4}
    assert sequential.verified_until() == len(whole)


def test_reader_reads_what_xz_writes_with_several_streams_and_padding(tmp_path):
    need("xz")
    one, two = b"first stream " * 1000, b"second stream " * 2000
    path = tmp_path / "multi.xz"
    a = run("xz", "-c", "--block-size=4KiB", input=one).stdout
    b = run("xz", "-c", "--check=crc32", input=two).stdout
    path.write_bytes(a + bytes(8) + b + bytes(4))
    reader = pd.XzReader(path)
    assert reader.layout.streams == 2 and reader.layout.stream_padding == 12
    assert reader.layout.checks == {pd.CHECK_CRC64, pd.CHECK_CRC32}
    assert reader.read() == one + two


def test_reader_steps_back_within_its_window_without_decompressing_again(tmp_path):
    payload = random_bytes(600_000, 9)
    path = tmp_path / "t.xz"
    write_xz(path, [payload, b"tail"])
    reader = pd.XzReader(path)
    assert reader.read_at(500_000, 1000) == payload[500_000:501_000]
    decoded = reader.decoded
    assert reader.read_at(20_000, 1000) == payload[20_000:21_000]
    assert reader.decoded == decoded, "the last MiB decoded is kept"
    assert reader.read_at(0, 10) == payload[:10]


def test_a_block_asking_for_a_huge_dictionary_is_refused(tmp_path):
    block, record = pd.compress_block(b"x" * 1000)
    block = bytearray(block)
    assert block[:5] == bytes((2, 0, 0x21, 1, 0)), "LZMA2 with a 4 KiB dictionary"
    block[4] = 40  # the dictionary size property: 4 GiB - 1 (xz-file-format 5.3.1)
    block[8:12] = struct.pack("<I", zlib.crc32(bytes(block[:8])))
    path = tmp_path / "huge.xz"
    with open(path, "wb") as f:
        writer = pd.XzStreamWriter(f)
        writer.write_block(bytes(block), record)
        writer.close()
    with pytest.raises(
        pd.XzError,
        match="needs more than 512 MiB to decompress; its dictionary is larger than "
        "any preset's",
    ):
        pd.XzReader(path).read()


def test_verify_says_a_file_without_checks_has_nothing_to_verify_by(tmp_path):
    path = tmp_path / "nocheck-debug.tar.xz"
    path.write_bytes(lzma.compress(tar_bytes([]), check=lzma.CHECK_NONE))
    result = cli("verify", path, check=False)
    assert result.returncode == 1
    assert (
        "FAIL  xz: 1 stream, 1 block, None: no check to verify the data by"
        in result.stdout
    )


def test_packdebug_layout_is_recognised_only_as_packdebug_writes_it(image, tmp_path):
    def layout(path) -> bool:
        with pd.Archive(path) as archive:
            return archive.is_packdebug_layout()

    tarball = pack(image)
    assert layout(tarball)
    data = pd.XzReader(tarball).read()
    end = pd.XzReader(tarball).layout.blocks[-1].uncompressed_offset
    one_block = tmp_path / "one.tar.xz"
    write_xz(one_block, [data])
    shortest_end = tmp_path / "end1024.tar.xz"
    write_xz(shortest_end, [data[:end], bytes(1024)])
    with tarfile.open(fileobj=io.BytesIO(data)) as tar:
        last_header = tar.getmembers()[-1].offset
    late_end = tmp_path / "late.tar.xz"
    write_xz(late_end, [data[:last_header], data[last_header:]])
    two_streams = tmp_path / "two.tar.xz"
    two_streams.write_bytes(lzma.compress(b"x") + tarball.read_bytes())
    assert layout(shortest_end), "1024 zero bytes are a whole end marker"
    assert not layout(one_block)
    assert not layout(late_end), "the last block must start with the end marker"
    assert not layout(two_streams)


def test_a_damaged_stream_header_is_refused_even_in_a_later_stream(tmp_path):
    one, two = lzma.compress(b"first"), bytearray(lzma.compress(b"second"))
    two[1] ^= 0xFF  # magic, not flags: the header's CRC32 still matches
    path = tmp_path / "two.xz"
    path.write_bytes(one + bytes(two))
    with pytest.raises(pd.XzError, match="no xz Stream Header where one must start"):
        pd.XzReader(path)


@pytest.mark.parametrize(
    "compressor,expected",
    [
        ("gzip", "holds gzip data, not xz"),
        ("bzip2", "holds bzip2 data, not xz"),
        ("zstd", "holds zstd data, not xz"),
        (None, "is not an xz file"),
        ("empty", "is empty, not an xz file"),
    ],
)
def test_other_formats_are_named_even_behind_a_tar_xz_name(
    tmp_path, compressor, expected
):
    path = tmp_path / "x-debug.tar.xz"
    if compressor == "empty":
        path.write_bytes(b"")
    elif compressor is None:
        path.write_text("just some text\n" * 10)
    else:
        need(compressor)
        path.write_bytes(run(compressor, "-c", input=b"tar data " * 100).stdout)
    listed = cli("list", path, check=False)
    assert (
        listed.returncode == 1
        and f"packdebug: error: {path}: {expected}" in listed.stderr
    )
    verified = cli("verify", path, check=False)
    assert verified.returncode == 1
    assert verified.stdout.startswith(f"{path}: FAILED\n  FAIL  file: {expected}")
    no_traceback(listed)
    no_traceback(verified)


# ---------------------------------------------------------------------------
# 3. tar member collection
# ---------------------------------------------------------------------------


def scan_names(root: pathlib.Path, **kwargs) -> list:
    scan = pd.scan_image(root, **kwargs)
    scan.tree.close()
    return scan


def test_members_are_sources_first_then_debug_each_sorted_by_bytes(tmp_path):
    files = {
        "usr/lib/debug/b.debug": b"b",
        "usr/lib/debug/.build-id/aa/x.debug": b"x",
        "usr/lib/debug/B.debug": b"B",
        "usr/src/debug/cat/pf/z.c": b"z",
        "usr/src/debug/cat/pf/a.c": b"a",
    }
    make_tree(tmp_path / "one", files)
    make_tree(tmp_path / "two", files, order=sorted(files, reverse=True))
    names = [m.info.name for m in scan_names(tmp_path / "one").members]
    assert names == [m.info.name for m in scan_names(tmp_path / "two").members]
    assert names == [
        "usr/src/debug",
        "usr/src/debug/cat",
        "usr/src/debug/cat/pf",
        "usr/src/debug/cat/pf/a.c",
        "usr/src/debug/cat/pf/z.c",
        "usr/lib/debug",
        "usr/lib/debug/.build-id",
        "usr/lib/debug/.build-id/aa",
        "usr/lib/debug/.build-id/aa/x.debug",
        "usr/lib/debug/B.debug",
        "usr/lib/debug/b.debug",
    ]


def test_tarball_directory_is_never_packed(tmp_path):
    make_tree(
        tmp_path,
        {
            "usr/lib/debug/x.debug": b"x",
            "usr/lib/debug/.tarball/c/p/old-debug.tar.xz": b"old",
        },
    )
    names = [m.info.name for m in scan_names(tmp_path).members]
    assert names == ["usr/lib/debug", "usr/lib/debug/x.debug"]


def test_symlinks_are_stored_not_followed(tmp_path):
    make_tree(tmp_path, {"usr/lib/debug/real/x.debug": b"x"})
    debug = tmp_path / "usr/lib/debug"
    (debug / "dangling").symlink_to("../../../../usr/bin/gone")
    (debug / "to-dir").symlink_to("real")
    members = {m.info.name: m.info for m in scan_names(tmp_path).members}
    assert members["usr/lib/debug/dangling"].issym()
    assert members["usr/lib/debug/dangling"].linkname == "../../../../usr/bin/gone"
    assert members["usr/lib/debug/to-dir"].issym()
    assert "usr/lib/debug/to-dir/x.debug" not in members


def test_hardlinked_files_are_stored_once_under_their_first_sorted_name(tmp_path):
    make_tree(tmp_path, {"usr/lib/debug/z.debug": b"data" * 100})
    os.link(tmp_path / "usr/lib/debug/z.debug", tmp_path / "usr/lib/debug/a.debug")
    members = {m.info.name: m.info for m in scan_names(tmp_path).members}
    assert members["usr/lib/debug/a.debug"].isreg()
    assert members["usr/lib/debug/a.debug"].size == 400
    assert members["usr/lib/debug/z.debug"].islnk()
    assert members["usr/lib/debug/z.debug"].linkname == "usr/lib/debug/a.debug"


def test_headers_drop_owner_setuid_and_clamp_mtime(tmp_path):
    make_tree(tmp_path, {"usr/lib/debug/x.debug": b"x"})
    path = tmp_path / "usr/lib/debug/x.debug"
    if os.geteuid() == 0:
        os.chown(path, 1234, 5678)  # before the chmod: chown clears setuid
    os.chmod(path, 0o6755)
    os.utime(path, (2_000_000_000.7, 2_000_000_000.7))
    assert stat.S_IMODE(path.stat().st_mode) == 0o6755, (
        "the precondition: setuid and setgid set"
    )
    scan = scan_names(tmp_path, source_date_epoch=1_700_000_000)
    x = {m.info.name: m.info for m in scan.members}["usr/lib/debug/x.debug"]
    assert (x.mode, x.uid, x.gid, x.uname, x.gname, x.mtime) == (
        0o755,
        0,
        0,
        "root",
        "root",
        1_700_000_000,
    )
    unclamped = {m.info.name: m.info for m in scan_names(tmp_path).members}
    assert unclamped["usr/lib/debug/x.debug"].mtime == 2_000_000_000


def test_devices_fifos_and_sockets_are_skipped_and_named(tmp_path):
    make_tree(tmp_path, {"usr/lib/debug/x.debug": b"x"})
    debug = tmp_path / "usr/lib/debug"
    os.mkfifo(debug / "fifo")
    with socket.socket(socket.AF_UNIX) as s:
        s.bind(str(debug / "sock"))
        kinds = {"fifo": "FIFO", "sock": "socket"}
        if os.geteuid() == 0:
            os.mknod(debug / "null", stat.S_IFCHR | 0o600, os.makedev(1, 3))
            kinds["null"] = "character device"
        result = cli(
            "pack", "--image", tmp_path, "--output", tmp_path / "out-debug.tar.xz"
        )
    for name, kind in kinds.items():
        assert (
            f"{debug / name}: skipped, a {kind} cannot go in the tarball"
            in result.stderr
        )
    with tarfile.open(tmp_path / "out-debug.tar.xz") as tar:
        assert tar.getnames() == ["usr/lib/debug", "usr/lib/debug/x.debug"]


@pytest.mark.parametrize("ancestor", ["usr", "usr/lib", "usr/src", "usr/lib/debug"])
def test_a_symlinked_ancestor_of_a_debug_tree_is_reported_never_followed(
    tmp_path, ancestor
):
    """pack --remove-packed neither packs nor deletes what a symlink leads to."""
    outside = tmp_path / "outside"
    files = {
        "lib/debug/x.debug": b"outside",
        "src/debug/y.c": b"outside",
        "debug/z": b"outside",
    }
    make_tree(outside, {**files, "x.debug": b"outside"})
    before = tree_state(outside)
    image = tmp_path / "image"
    make_tree(image, {"usr/lib/debug/in.debug": b"in", "usr/src/debug/in.c": b"in"})
    shutil.rmtree(image / ancestor)
    (image / ancestor).symlink_to(outside)
    tarball = tmp_path / "t-debug.tar.xz"
    result = cli(
        "pack", "--image", image, "--output", tarball, "--remove-packed", check=False
    )
    assert result.returncode == 0
    no_traceback(result)
    assert (
        result.stderr.count(f"{image / ancestor}: skipped, a symlink, not followed")
        == 1
    )
    assert tree_state(outside) == before, "nothing outside the image was removed"
    if tarball.exists():
        with tarfile.open(tarball) as tar:
            assert [tar.extractfile(m).read() for m in tar if m.isreg()] == [b"in"]
    else:
        assert ancestor == "usr" and "nothing to pack" in result.stdout


def test_a_directory_swapped_for_a_symlink_after_the_scan_stops_removal(tmp_path):
    outside = tmp_path / "outside"
    make_tree(outside, {"keep.debug": b"keep", "sub/also.debug": b"also"})
    before = tree_state(outside)
    image = tmp_path / "image"
    make_tree(
        image,
        {"usr/lib/debug/a/keep.debug": b"in", "usr/lib/debug/a/sub/also.debug": b"in"},
    )
    scan = pd.scan_image(image)
    try:
        shutil.rmtree(image / "usr/lib/debug/a")
        (image / "usr/lib/debug/a").symlink_to(
            outside
        )  # the race: after scan, before removal
        with pytest.raises(pd.UnsafeTreeError) as error:
            pd.remove_packed(scan, pd.Log())
    finally:
        scan.tree.close()
    assert "is no longer a directory" in str(error.value) and "usr/lib/debug/a" in str(
        error.value
    )
    assert tree_state(outside) == before


def test_a_directory_replaced_by_another_after_the_scan_stops_packing(tmp_path):
    image = tmp_path / "image"
    make_tree(image, {"usr/lib/debug/a/x.debug": b"x" * 100})
    scan = pd.scan_image(image)
    try:
        os.rename(image / "usr/lib/debug/a", tmp_path / "moved")
        make_tree(image, {"usr/lib/debug/a/x.debug": b"y" * 100})
        target = pd.OutputTarget.at(str(tmp_path / "t-debug.tar.xz"))
        with pytest.raises(
            pd.UnsafeTreeError, match="was replaced by another directory"
        ):
            pd.write_tarball(scan, target, pd.PackOptions(jobs=1))
    finally:
        scan.tree.close()
    assert not (tmp_path / "t-debug.tar.xz").exists()
    assert [p.name for p in tmp_path.iterdir() if p.name.endswith(".tmp")] == []


# ---------------------------------------------------------------------------
# 4. packing
# ---------------------------------------------------------------------------


def _extract_with_tarfile(tarball, dest):
    with tarfile.open(tarball) as tar:
        if hasattr(tarfile, "tar_filter"):
            tar.extractall(dest, filter="tar")
        else:
            tar.extractall(dest)


def test_pack_names_the_tarball_as_portage_and_extracts_identically_everywhere(
    image, tmp_path
):
    need("tar", "bsdtar")
    expected = snapshot(image)
    tarball = pack(image)
    assert tarball.is_file() and oct(tarball.stat().st_mode & 0o777) == "0o644"
    extractors = {
        "gnu-tar": lambda dest: run("tar", "-xJf", tarball, "-C", dest),
        "bsdtar": lambda dest: run("bsdtar", "-xf", tarball, "-C", dest),
        "tarfile": lambda dest: _extract_with_tarfile(tarball, dest),
        "packdebug": lambda dest: cli("extract", tarball, "--all", "-C", dest),
    }
    for name, extract in extractors.items():
        dest = tmp_path / name
        dest.mkdir()
        extract(dest)
        assert snapshot(dest) == expected, name


def test_member_names_are_relative_and_clean(image):
    with tarfile.open(pack(image)) as tar:
        names = tar.getnames()
    assert names[0] == "usr/src/debug" and "usr/lib/debug" in names
    assert all(n.startswith(("usr/src/debug", "usr/lib/debug")) for n in names)
    assert all(pd.name_problems(n) == [] for n in names)
    assert not any(n.startswith("usr/lib/debug/.tarball") for n in names)


def test_tiny_package_gets_one_crc64_stream_of_several_blocks(image):
    need("xz")
    tarball = pack(image)
    run("xz", "-t", tarball)
    assert xz_summary(tarball) == {
        "streams": 1,
        "blocks": 2,
        "check": "CRC64",
        "padding": 0,
    }


def golden_image(root: pathlib.Path) -> pathlib.Path:
    """A fixed image: the same bytes, names, links and mtimes everywhere."""
    files = {
        "usr/src/debug/app-misc/golden-1/g.c": b"int golden(void) { return 42; }\n"
        * 40,
        "usr/lib/debug/usr/lib/libg.so.debug": bytes(range(256))
        * 9000,  # a large member
        "usr/lib/debug/usr/bin/g.debug": b"g.debug" + bytes(2000),
        "usr/lib/debug/usr/bin/z.debug": b"z" * 70_000,
    }
    make_tree(root, files)
    os.link(
        root / "usr/lib/debug/usr/bin/g.debug", root / "usr/lib/debug/usr/bin/g2.debug"
    )
    (root / "usr/lib/debug/.build-id/ab").mkdir(parents=True)
    (root / "usr/lib/debug/.build-id/ab/cdef.debug").symlink_to("../../usr/bin/g.debug")
    for path in sorted(root.rglob("*"), reverse=True):
        if not path.is_symlink():
            os.chmod(path, 0o755 if path.is_dir() else 0o644)
        os.utime(path, (1_600_000_000, 1_600_000_000), follow_symlinks=False)
    return root


def test_same_tarball_bytes_as_before(tmp_path):
    """The uncompressed tar and its block cuts, pinned: refactors must not change them.

    With the same blocks, the bytes written depend only on liblzma (each
    Block is lzma.compress of its payload), which the last assertion checks.
    """
    image = golden_image(tmp_path / "image")
    tarball = tmp_path / "g-debug.tar.xz"
    cli("pack", "--image", image, "--output", tarball, "--block-size", "1MiB")
    reader = pd.XzReader(tarball)
    tar = reader.read()
    assert hashlib.sha256(tar).hexdigest() == (
        "b87918a0cc796a6ff82e63704b6e8b8cc563b81ab0d14ce760fd3435937d3f2e"
    ), "the tar stream changed"
    assert [b.uncompressed_size for b in reader.layout.blocks] == [2385408, 10752]
    data = tarball.read_bytes()
    for block in reader.layout.blocks:
        payload = tar[block.uncompressed_offset : block.uncompressed_end]
        expected, _ = pd.compress_block(payload)
        assert data[block.offset : block.end] == bytes(expected)


def test_blocks_close_at_the_first_member_boundary_and_large_files_go_on(tmp_path):
    """--block-size 1MiB at -1 (a 1 MiB dictionary): Blocks of up to 3 MiB."""
    need("xz")
    image = tmp_path / "image"
    files = {
        f"usr/src/debug/a/p/s{i:02d}.c": random_bytes(150_000, i) for i in range(20)
    }
    files["usr/lib/debug/usr/lib/z-small"] = b"s" * 1000
    make_tree(image, files)
    (image / "usr/lib/debug/usr/bin").mkdir(parents=True)
    shutil.copy(
        elf_with_section(tmp_path, 7 * MiB), image / "usr/lib/debug/usr/bin/big.debug"
    )
    tarball = tmp_path / "out-debug.tar.xz"
    layout = ("--block-size", "1MiB", "-1")
    cli("pack", "--image", image, "--output", tarball, *layout, "-j2")
    streamed = tmp_path / "j1-debug.tar.xz"
    cli("pack", "--image", image, "--output", streamed, *layout, "-j1")
    assert streamed.read_bytes() == tarball.read_bytes(), (
        "-j1 streams each Block through one encoder: the bytes of whole Blocks"
    )
    blocks = xz_blocks(tarball)[:-1]  # the end marker's is checked elsewhere
    starts = [b["uncompressed_offset"] for b in blocks]
    with tarfile.open(tarball) as tar:
        members = tar.getmembers()
    assert max(b["uncompressed_size"] for b in blocks) == 3 * MiB, (
        "no Block holds more than 3 x the dictionary, and the large file fills some"
    )
    for m in members[1:]:
        start = starts[bisect.bisect_right(starts, m.offset - 1) - 1]
        if m.offset - start >= MiB:
            assert m.offset in starts, "a full Block closes at the next member"
        else:
            assert m.offset not in starts or m.offset - start == 3 * MiB, (
                "a Block not yet full takes the next member"
            )
    big = next(m for m in members if m.name.endswith("big.debug"))
    inside = [s for s in starts if big.offset_data < s < big.offset_data + big.size]
    assert len(inside) >= 2, "the large file goes on in Blocks of its own"
    for start in set(starts) - {m.offset for m in members}:
        assert any(m.offset_data < start < m.offset_data + m.size for m in members), (
            "a Block starts with a header, or inside a file begun before"
        )


def test_pack_j1_holds_no_block_whole_and_j2_does(tmp_path):
    """-j1 streams each Block into its encoder; threads need whole Blocks."""
    image = tmp_path / "image"
    make_tree(image, {"usr/lib/debug/big.debug": random_bytes(32 * MiB, 9)})
    options = {"preset": 0, "block_size": 8 * MiB}  # Blocks of 16 MiB
    peaks = {}
    for jobs in (1, 2):
        scan = pd.scan_image(image)
        target = pd.OutputTarget.at(str(tmp_path / f"j{jobs}-debug.tar.xz"))
        tracemalloc.start()
        try:
            result = pd.write_tarball(
                scan, target, pd.PackOptions(jobs=jobs, **options)
            )
            peaks[jobs] = tracemalloc.get_traced_memory()[1]
        finally:
            tracemalloc.stop()
            scan.tree.close()
        assert result.blocks == 4
    assert peaks[1] < 16 * MiB <= peaks[2], peaks


def test_member_data_of_another_size_than_its_header_is_refused():
    def entry(data: bytes, size: int):
        info = tarfile.TarInfo("usr/lib/debug/x.debug")
        info.size = size
        return info, lambda: iter((data[:3], data[3:]))

    for data, size in ((b"short", 9), (b"toolong", 4)):
        (block, _end) = pd.tar_blocks([entry(data, size)])
        with pytest.raises(ValueError, match="member data"):
            block.payload()
    (block, _end) = pd.tar_blocks([entry(b"exact", 5)])
    assert block.payload()[512:517] == b"exact"


def reversed_copy(src: pathlib.Path, dst: pathlib.Path) -> pathlib.Path:
    """A copy made in reverse order, under another umask, with other owners."""
    old_umask = os.umask(0o077)
    try:
        entries = sorted(src.rglob("*"), key=str, reverse=True)
        for entry in sorted(entries, key=lambda p: len(p.parts)):
            if entry.is_dir() and not entry.is_symlink():
                (dst / entry.relative_to(src)).mkdir(parents=True, exist_ok=True)
        first: dict = {}
        for entry in entries:
            target = dst / entry.relative_to(src)
            if entry.is_symlink():
                target.symlink_to(os.readlink(entry))
            elif entry.is_file():
                if entry.stat().st_ino in first:
                    os.link(first[entry.stat().st_ino], target)
                else:
                    shutil.copyfile(entry, target)
                    first[entry.stat().st_ino] = target
        for entry in entries + [src]:
            target = dst / entry.relative_to(src)
            if not entry.is_symlink():
                os.chmod(target, stat.S_IMODE(entry.stat().st_mode))
                if os.geteuid() == 0:
                    os.chown(target, 4321, 4321)
            st = entry.lstat()
            os.utime(target, ns=(st.st_atime_ns, st.st_mtime_ns), follow_symlinks=False)
    finally:
        os.umask(old_umask)
    return dst


def test_same_image_packs_byte_identical_whatever_jobs_order_umask_locale_owner(
    estrip_image, tmp_path
):
    first = copy_tree(estrip_image, tmp_path / "first")
    second = reversed_copy(estrip_image, tmp_path / "second")
    a = pack(first, "--jobs", "2", env={"LC_ALL": "C.UTF-8"})
    b = pack(
        second,
        "--jobs",
        "1",
        env={"LC_ALL": "POSIX", "LANG": "", "TZ": "Pacific/Kiritimati"},
    )
    assert a.read_bytes() == b.read_bytes()
    # Packing again (now that .tarball exists inside usr/lib/debug) changes nothing;
    # without date_directories, usr/lib/debug's own mtime would.
    os.utime(first / "usr/lib/debug", (2_000_000_000, 2_000_000_000))
    before = a.read_bytes()
    assert pack(first).read_bytes() == before


def test_presets_change_compression_but_not_content(image, tmp_path):
    outputs = {}
    for flag in ("-0", "-9", "-9e", "--preset=6"):
        out = tmp_path / f"{flag.strip('-=')}-debug.tar.xz"
        cli("pack", "--image", image, "--output", out, flag)
        run("xz", "-t", out)
        outputs[flag] = out.read_bytes()
    assert outputs["-0"] != outputs["--preset=6"]
    assert len({lzma.decompress(data) for data in outputs.values()}) == 1
    assert outputs["--preset=6"] == pack(image).read_bytes()
    assert (
        pd.default_block_size(9) == 64 * MiB
        and pd.default_block_size(6) == pd.BLOCK_SIZE
    )
    assert (
        pd.block_filters(6 | lzma.PRESET_EXTREME, 100)[0]["preset"]
        & lzma.PRESET_EXTREME
    )


def test_progress_line_only_on_a_terminal_and_from_the_first_read(image, tmp_path):
    import pty

    (image / "usr/lib/debug/usr/lib/blob").write_bytes(random_bytes(6 * MiB, 6))
    command = [
        sys.executable,
        SCRIPT,
        "pack",
        "--image",
        image,
        "--output",
        tmp_path / "a-debug.tar.xz",
        "-j1",
        "--block-size",
        "256KiB",
        "-0",
    ]

    def on_a_pty(env: dict) -> bytes:
        main, child = pty.openpty()
        with subprocess.Popen(
            [str(c) for c in command], stderr=child, stdout=subprocess.DEVNULL, env=env
        ) as proc:
            os.close(child)
            seen = b""
            with contextlib.suppress(OSError):  # EIO once the child has closed the pty
                while chunk := os.read(main, 4096):
                    seen += chunk
            proc.wait(timeout=120)
        os.close(main)
        return seen

    seen = on_a_pty(clean_env())
    lines = re.findall(
        rb"\r +(\d+)%  (.*?) read, .* written, .*/s, ETA [-\d]+:[-\d]+", seen
    )
    assert lines, seen
    assert lines[0][0] == b"0" and lines[0][1] != b"0 B", (
        "drawn at the first read, before any block"
    )
    assert b"ETA" not in on_a_pty(clean_env({"EBUILD_PHASE": "preinst"})), (
        "none in a build log"
    )
    piped = cli("pack", "--image", image, "--output", tmp_path / "b-debug.tar.xz", "-0")
    assert "ETA" not in piped.stderr and "\r" not in piped.stderr


def test_source_date_epoch_clamps_every_mtime(image):
    tarball = pack(image, env={"SOURCE_DATE_EPOCH": "1000000000"})
    with tarfile.open(tarball) as tar:
        assert {m.mtime for m in tar.getmembers()} == {1_000_000_000}


def test_build_id_comes_from_portage_builddir_when_not_in_environment(image, tmp_path):
    builddir = tmp_path / "build"
    (builddir / "build-info").mkdir(parents=True)
    (builddir / "build-info/BUILD_ID").write_text("42")  # echo -n, as __dyn_package
    env = {
        "ED": str(image),
        "CATEGORY": "app-misc",
        "PN": "hello",
        "PF": "hello-1.0",
        "PORTAGE_BUILDDIR": str(builddir),
    }
    result = cli("pack", env=env)
    assert (
        image / "usr/lib/debug/.tarball/app-misc/hello/hello-1.0-42-debug.tar.xz"
    ).is_file()
    assert (
        "into /usr/lib/debug/.tarball/app-misc/hello/hello-1.0-42-debug.tar.xz:"
        in result.stdout
    )


def test_pack_prints_one_line_saying_what_and_where(image):
    result = cli("pack", "--image", image, *PACK_NAMES, "--build-id", "1")
    assert re.fullmatch(
        r"packdebug: packed \d+ files and \d+ links \(.*; 2 of 2 debug ELF with a build-id\) into "
        r"/usr/lib/debug/\.tarball/app-misc/hello/hello-1\.0-1-debug\.tar\.xz: \S+ \S+ in 2 xz blocks\n",
        result.stdout,
    ), result.stdout
    assert result.stderr == ""
    quiet = cli("pack", "--image", image, *PACK_NAMES, "--build-id", "1", "-q")
    assert quiet.stdout == quiet.stderr == ""


def test_without_build_id_the_tarball_is_named_pf_debug_and_says_so(image):
    result = cli("pack", "--image", image, *PACK_NAMES)
    assert (
        image / "usr/lib/debug/.tarball/app-misc/hello/hello-1.0-debug.tar.xz"
    ).is_file()
    assert len(result.stdout.splitlines()) == 1
    assert "no BUILD_ID" in result.stdout and "hello-1.0-debug.tar.xz" in result.stdout


def test_image_under_an_eprefix(estrip_image, tmp_path):
    d = tmp_path / "D"
    (d / "opt").mkdir(parents=True)
    copy_tree(estrip_image, d / "opt/gentoo")
    cli(
        "pack", "--image", d, "--eprefix", "/opt/gentoo", *PACK_NAMES, "--build-id", "3"
    )
    assert (
        d / "opt/gentoo/usr/lib/debug/.tarball/app-misc/hello/hello-1.0-3-debug.tar.xz"
    ).is_file()
    env = {
        "D": str(d),
        "EPREFIX": "/opt/gentoo",
        "CATEGORY": "app-misc",
        "PN": "hello",
        "PF": "hello-1.0",
        "BUILD_ID": "4",
    }
    cli("pack", env=env)
    assert (
        d / "opt/gentoo/usr/lib/debug/.tarball/app-misc/hello/hello-1.0-4-debug.tar.xz"
    ).is_file()


def test_request_from_environment_is_pure_and_names_each_input():
    env = {
        "ED": "/img",
        "CATEGORY": "app-misc",
        "PN": "hello",
        "PF": "hello-1.0",
        "BUILD_ID": "7",
    }
    request = pd.request_from_environment(env)
    assert (
        request.image,
        request.category,
        request.pn,
        request.pf,
        request.build_id,
    ) == (
        "/img",
        "app-misc",
        "hello",
        "hello-1.0",
        "7",
    )
    flags = pd.request_from_environment(env, {"pf": "hello-2", "build_id": "9"})
    assert (flags.pf, flags.build_id) == ("hello-2", "9")
    for missing, flag in (("CATEGORY", "--category"), ("PN", "--pn"), ("PF", "--pf")):
        with pytest.raises(pd.UsageError) as error:
            pd.request_from_environment({k: v for k, v in env.items() if k != missing})
        assert f"{missing} is not set" in str(error.value) and flag in str(error.value)
    with pytest.raises(pd.UsageError, match="does not start with PN 'calc'"):
        pd.request_from_environment({**env, "PN": "calc"})
    with pytest.raises(pd.UsageError, match="not an ELF build-id"):
        pd.request_from_environment({**env, "BUILD_ID": "7996afe4"})
    with pytest.raises(pd.UsageError, match="ED"):
        pd.request_from_environment({"PN": "x"})


def test_pack_is_importable_and_returns_what_it_wrote(image):
    request = pd.PackRequest(str(image), "app-misc", "hello", "hello-1.0", "5")
    out, err = io.StringIO(), io.StringIO()
    result = pd.pack(request, pd.PackOptions(jobs=1), pd.Log(-1, out, err))
    tarball = image / "usr/lib/debug/.tarball/app-misc/hello/hello-1.0-5-debug.tar.xz"
    assert result.output == str(tarball) and result.size == tarball.stat().st_size
    assert result.blocks == 2 and result.files == 10
    assert out.getvalue() == err.getvalue() == ""


@pytest.mark.parametrize(
    "missing,flag", [("CATEGORY", "--category"), ("PN", "--pn"), ("PF", "--pf")]
)
def test_missing_portage_input_names_the_variable_and_flag(image, missing, flag):
    env = {
        "ED": str(image),
        "CATEGORY": "app-misc",
        "PN": "hello",
        "PF": "hello-1.0",
        "BUILD_ID": "1",
    }
    del env[missing]
    result = cli("pack", env=env, check=False)
    assert result.returncode == 2
    assert f"{missing} is not set" in result.stderr and flag in result.stderr
    no_traceback(result)
    assert not (image / "usr/lib/debug/.tarball").exists()


def test_no_debug_content_writes_nothing_and_says_so_in_one_line(tmp_path):
    (tmp_path / "usr/bin").mkdir(parents=True)
    (tmp_path / "usr/lib/debug/empty").mkdir(parents=True)
    result = cli("pack", "--image", tmp_path, *PACK_NAMES, "--build-id", "1")
    assert result.returncode == 0 and len(result.stdout.splitlines()) == 1
    assert "nothing to pack" in result.stdout
    assert not (tmp_path / "usr/lib/debug/.tarball").exists()
    binary = cli(
        "pack", "--image", tmp_path, *PACK_NAMES, env={"EMERGE_FROM": "binary"}
    )
    assert binary.stdout == binary.stderr == "", (
        "a binpkg merge has no debug info to pack"
    )


def test_install_mask_that_removed_the_debug_info_is_a_warning_even_quiet(tmp_path):
    (tmp_path / "usr/bin").mkdir(parents=True)
    mask = "/usr/lib/debug/ /usr/src/debug/ -/usr/lib/debug/.tarball"
    result = cli(
        "pack", "--image", tmp_path, *PACK_NAMES, "-q", env={"INSTALL_MASK": mask}
    )
    assert result.returncode == 0 and result.stdout == ""
    assert result.stderr.startswith("packdebug: warning: nothing to pack")
    assert "INSTALL_MASK removed them before pkg_preinst" in result.stderr
    assert "--remove-packed" in result.stderr


def add_debug_file_without_build_id(
    image: pathlib.Path, tmp_path: pathlib.Path
) -> None:
    """usr/lib/debug/usr/bin/noid.debug, split from a binary linked without one."""
    need("gcc", "objcopy")
    src = tmp_path / "x.c"
    src.write_text("int main(void) { return 0; }\n")
    run("gcc", "-g", "-Wl,--build-id=none", "-o", tmp_path / "x", src)
    run(
        "objcopy",
        "--only-keep-debug",
        tmp_path / "x",
        image / "usr/lib/debug/usr/bin/noid.debug",
    )


def test_debug_elf_without_build_id_warns_and_strict_refuses(image, tmp_path):
    add_debug_file_without_build_id(image, tmp_path)
    (image / "usr/lib/debug/usr/bin/garbage.debug").write_bytes(
        b"\x7fELF\x02\x01\x01" + bytes(9)
    )
    strict = cli(
        "pack",
        "--image",
        image,
        *PACK_NAMES,
        "--build-id",
        "1",
        "--strict",
        check=False,
    )
    assert strict.returncode == 1
    assert "noid.debug" in strict.stderr and "garbage.debug" in strict.stderr
    assert not list(image.glob("usr/lib/debug/.tarball/**/*.tar.xz"))
    lenient = cli("pack", "--image", image, *PACK_NAMES, "--build-id", "1")
    assert "noid.debug: debug ELF without a build-id" in lenient.stderr
    assert "garbage.debug: ELF header" in lenient.stderr
    assert "truncated or corrupt" in lenient.stderr
    assert "2 of 4 debug ELF with a build-id" in lenient.stdout


def test_repack_takes_a_tarball_whose_own_failures_it_keeps(image, tmp_path):
    """A check that failed before may fail after: repack fixes the layout, not the ELF."""
    add_debug_file_without_build_id(image, tmp_path)
    tarball = portage_tarball(image, tmp_path / "hello-1.0-1-debug.tar.xz")
    before = cli("verify", tarball, check=False).stdout
    assert "FAIL  build-ids" in before and "FAIL  seekable" in before
    result = cli("repack", tarball)
    assert "repacked 1 of 1 tarball" in result.stdout
    after = cli("verify", tarball, check=False).stdout
    assert "FAIL  build-ids" in after and "ok    seekable" in after


def test_extract_gives_the_file_its_members_permissions_but_setuid(tmp_path):
    tarball = hostile_tarball(
        tmp_path / "modes-debug.tar.xz",
        ({"name": "usr/src/debug/run.sh", "mode": 0o755}, b"#!/bin/sh\n"),
        ({"name": "usr/src/debug/private.c", "mode": 0o640}, b"int x;\n"),
        ({"name": "usr/src/debug/suid", "mode": 0o6755}, b"s"),
        ({"name": "usr/src/debug/modeless", "mode": 0}, b"n"),
    )
    for name, mode in (
        ("run.sh", 0o755),
        ("private.c", 0o640),
        ("suid", 0o755),  # -o never makes a setuid or setgid file
        ("modeless", 0o644),
    ):
        out = tmp_path / name
        cli("extract", tarball, "--member", f"usr/src/debug/{name}", "-o", out)
        assert stat.S_IMODE(out.stat().st_mode) == mode, name


def test_pack_does_not_modify_the_image_outside_its_tarball(image):
    before = snapshot(image)
    pack(image)
    assert snapshot(image) == before


def test_failure_while_writing_leaves_nothing_and_keeps_previous_tarball(
    image, tmp_path
):
    with tiny_tmpfs(tmp_path / "tiny") as mount:
        shutil.copy(
            elf_with_section(tmp_path, MiB), image / "usr/lib/debug/usr/bin/big.debug"
        )
        target = mount / "out-debug.tar.xz"
        target.write_bytes(b"previous tarball")
        result = cli("pack", "--image", image, "--output", target, "-0", check=False)
        assert result.returncode == 1 and "No space left on device" in result.stderr
        assert str(target) in result.stderr
        no_traceback(result)
        assert target.read_bytes() == b"previous tarball"
        assert sorted(p.name for p in mount.iterdir()) == ["out-debug.tar.xz"]
        made = mount / "new/dirs/out-debug.tar.xz"
        result = cli("pack", "--image", image, "--output", made, "-0", check=False)
        assert result.returncode == 1 and not (mount / "new").exists(), (
            "made directories go too"
        )
        run("mount", "-o", "remount,ro", mount)
        result = cli(
            "pack",
            "--image",
            image,
            "--output",
            mount / "new-debug.tar.xz",
            check=False,
        )
        assert result.returncode == 1 and "Read-only file system" in result.stderr
        assert sorted(p.name for p in mount.iterdir()) == ["out-debug.tar.xz"]


def test_output_reached_through_a_symlink_inside_the_image_is_refused(image, tmp_path):
    outside = tmp_path / "outside"
    outside.mkdir()
    (image / "usr/lib/debug/.tarball").symlink_to(outside)
    result = cli("pack", "--image", image, *PACK_NAMES, "--build-id", "1", check=False)
    assert result.returncode == 1 and "through a symlink" in result.stderr
    no_traceback(result)
    assert list(outside.iterdir()) == []


def test_output_where_no_file_can_be_made_is_a_clear_error(image):
    result = cli(
        "pack", "--image", image, "--output", "/proc/x-debug.tar.xz", check=False
    )
    assert result.returncode == 1 and "/proc" in result.stderr
    assert "keeps vanishing" not in result.stderr and "prune" not in result.stderr
    no_traceback(result)


def big_random_image(tmp_path: pathlib.Path, count: int, size: int) -> pathlib.Path:
    image = tmp_path / "image"
    (image / "usr/lib/debug").mkdir(parents=True)
    for i in range(count):  # incompressible: seconds of work per block
        (image / f"usr/lib/debug/blob{i}").write_bytes(random_bytes(size, 3 + i))
    return image


@pytest.mark.parametrize(
    "sig,code,jobs",
    [
        (signal.SIGTERM, 143, "-j2"),
        (signal.SIGINT, 130, "-j2"),
        (signal.SIGINT, 130, "-j1"),
    ],
)
def test_signal_while_writing_leaves_nothing_and_exits_at_once(
    tmp_path, sig, code, jobs
):
    image = big_random_image(tmp_path, 3, 12 * MiB)
    out_dir = tmp_path / "out"
    out_dir.mkdir()
    target = out_dir / "x-debug.tar.xz"
    proc = subprocess.Popen(
        [
            sys.executable,
            SCRIPT,
            "pack",
            "--image",
            image,
            "--output",
            target,
            jobs,
            "-9",
            "--block-size",
            "12MiB",
        ],
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
        text=True,
        env=clean_env(),
    )
    deadline = time.monotonic() + 30
    while not list(out_dir.iterdir()) and time.monotonic() < deadline:
        time.sleep(0.05)
    assert list(out_dir.iterdir()), "the temporary file never appeared"
    time.sleep(0.5)  # blocks are being compressed now
    sent = time.monotonic()
    while proc.poll() is None:  # a user pressing Ctrl-C again and again
        proc.send_signal(sig)
        time.sleep(0.002)
    _, err = proc.communicate(timeout=60)
    assert time.monotonic() - sent < 2.5, (
        "answered at once, not after the running blocks"
    )
    # A later press may find main done and the signal's default action back:
    # killed by it, which a shell reports as the same 128 + signal.
    assert proc.returncode in (code, -sig) and "nothing was written" in err
    assert "Traceback" not in err
    assert list(out_dir.iterdir()) == []


def test_sigint_during_start_up_prints_no_traceback(tmp_path):
    """From the statement that makes Ctrl-C quiet on, Ctrl-C ends packdebug quietly.

    Before it, Python is still starting: a SIGINT while it compiles the
    script surfaces at the first statement that runs (`from __future__`),
    which no code in the script can prevent.
    """
    lines = SCRIPT.read_text().splitlines()
    quiet = next(
        i for i, line in enumerate(lines, 1) if "_signal.signal(_signal.SIGINT" in line
    )
    ours = []
    for delay in [0.005 * i for i in range(1, 41)]:
        proc = subprocess.Popen(
            [sys.executable, SCRIPT, "list", tmp_path / "none.tar.xz"],
            stdout=subprocess.PIPE,
            stderr=subprocess.PIPE,
            text=True,
        )
        time.sleep(delay)
        proc.send_signal(signal.SIGINT)
        _, err = proc.communicate(timeout=30)
        frames = re.findall(rf'File "{re.escape(str(SCRIPT))}", line (\d+)', err)
        if any(int(line) > quiet for line in frames):
            ours.append((delay, err))
    assert not ours, ours


def test_remove_packed_deletes_packed_files_and_only_the_dirs_it_emptied(image):
    debug = image / "usr/lib/debug"
    (image / "usr/src/debug/app-misc/hello-1.0/empty-on-purpose").mkdir()
    (image / "usr/lib/debug/usr/keep").mkdir()
    os.mkfifo(image / "usr/lib/debug/usr/lib/a-fifo")  # cannot be packed: stays
    (image / "usr/lib/debug/.tarball/other/pkg").mkdir(parents=True)
    before = {str(p) for p in image.rglob("*")}
    dry = cli(
        "pack",
        "--image",
        image,
        *PACK_NAMES,
        "--build-id",
        "1",
        "--remove-packed",
        "--dry-run",
    )
    assert {str(p) for p in image.rglob("*")} == before, (
        "--dry-run must not touch the image"
    )
    would_remove = {
        line[len("would remove ") :]
        for line in dry.stdout.splitlines()
        if line.startswith("would remove ")
    }
    cli("pack", "--image", image, *PACK_NAMES, "--build-id", "1", "--remove-packed")
    assert (debug / ".tarball/app-misc/hello/hello-1.0-1-debug.tar.xz").is_file()
    after = {str(p) for p in image.rglob("*")}
    assert before - after == would_remove
    left = sorted(
        str(p.relative_to(image)) for p in image.rglob("*") if ".tarball" not in p.parts
    )
    assert left == sorted(
        [
            "usr",
            "usr/bin",
            "usr/bin/hello",
            "usr/bin/hello-again",
            "usr/lib",
            "usr/lib/libgreet.so.1",
            "usr/lib/debug",
            "usr/lib/debug/usr",
            "usr/lib/debug/usr/keep",
            "usr/lib/debug/usr/lib",
            "usr/lib/debug/usr/lib/a-fifo",
            "usr/src",
            "usr/src/debug",
            "usr/src/debug/app-misc",
            "usr/src/debug/app-misc/hello-1.0",
            "usr/src/debug/app-misc/hello-1.0/empty-on-purpose",
        ]
    )
    assert (debug / ".tarball/other/pkg").is_dir()


def test_remove_packed_removes_usr_src_when_everything_in_it_was_packed(image):
    cli("pack", "--image", image, *PACK_NAMES, "--build-id", "1", "--remove-packed")
    assert not (image / "usr/src").exists()
    assert (image / "usr/lib/debug/.tarball").is_dir()


# ---------------------------------------------------------------------------
# 5. reading / extraction
# ---------------------------------------------------------------------------


def test_list_shows_kind_size_and_build_id_as_readelf_sees_them(image):
    tarball = pack(image)
    out = cli("list", tarball).stdout.splitlines()
    rows = {line.split()[3]: line.split() for line in out}
    hello_id = readelf_build_id(debug_file(image))
    assert rows["usr/lib/debug/usr/bin/hello-again.debug"][:3] == [
        "debuginfo",
        str(debug_file(image).stat().st_size),
        hello_id,
    ]
    assert rows["usr/lib/debug/usr/bin/hello.debug"][0] == "hardlink"
    assert (
        rows[f"usr/lib/debug/.build-id/{hello_id[:2]}/{hello_id[2:]}.debug"][0]
        == "symlink"
    )
    assert rows[SOURCE][0] == "source"
    assert rows["usr/lib/debug"][0] == "directory"
    data = json.loads(cli("list", "--json", tarball).stdout)
    kinds = {m["name"]: m["kind"] for m in data["members"]}
    assert kinds["usr/lib/debug/usr/lib/libgreet.so.1.debug"] == "debuginfo"
    assert len(data["members"]) == len(out)
    verbose = cli("list", "-v", tarball).stdout.splitlines()
    assert len(verbose) == len(out)
    source = next(line for line in verbose if line.endswith("/hello.c"))
    assert re.search(
        r" 0644 \d{4}-\d\d-\d\d \d\d:\d\d +\d+ +1 usr/src/debug/", source
    ), source


def test_list_takes_several_tarballs(image, tmp_path):
    tarball = pack(image)
    copy = tmp_path / "copy-debug.tar.xz"
    shutil.copy(tarball, copy)
    out = cli("list", tarball, copy).stdout
    assert out.startswith(f"{tarball}:\n") and f"\n\n{copy}:\n" in out
    data = json.loads(cli("list", "--json", tarball, copy).stdout)
    assert [d["tarball"] for d in data] == [str(tarball), str(copy)]


def test_listing_and_messages_escape_hostile_names(tmp_path):
    tarball = hostile_tarball(
        tmp_path / "t-debug.tar.xz",
        ({"name": "usr/lib/debug/a\nb"}, b"x"),
        ({"name": "usr/lib/debug/c\udcffd"}, b"y"),
    )
    out = cli("list", tarball).stdout.splitlines()
    assert len(out) == 2
    assert out[0].endswith(" usr/lib/debug/a\\nb") and out[1].endswith(
        " usr/lib/debug/c\\377d"
    )
    result = cli(
        "extract", tarball, "--member", "usr/lib/debug/a\nbc", "-o", "-", check=False
    )
    assert "usr/lib/debug/a\\nbc" in result.stderr and "\udcff" not in result.stderr


def test_list_classifies_elf_as_debuginfod_does(tmp_path):
    """elf_classify: executable only for ET_EXEC/ET_DYN with loaded PROGBITS."""
    need("gcc", "ld", "strip", "objcopy")
    src = tmp_path / "x.c"
    src.write_text("int main(void) { return 0; }\n")
    image = tmp_path / "image"
    debug = image / "usr/lib/debug"
    debug.mkdir(parents=True)
    run("gcc", "-O2", "-Wl,--build-id", "-s", "-o", debug / "stripped", src)
    # a kernel module with its debug info stripped: ET_REL, loaded PROGBITS
    run("gcc", "-c", "-o", tmp_path / "x.o", src)
    run("ld", "-r", "--build-id", "-o", tmp_path / "x.ko", tmp_path / "x.o")
    run("strip", "-g", "-o", debug / "module.ko", tmp_path / "x.ko")
    # a debug file emptied of debug info and symbols: ET_DYN, NOBITS only
    run("gcc", "-g", "-Wl,--build-id", "-o", tmp_path / "x", src)
    run("objcopy", "--only-keep-debug", tmp_path / "x", tmp_path / "x.debug")
    run("objcopy", "--strip-all", tmp_path / "x.debug", debug / "emptied.debug")
    tarball = tmp_path / "t-debug.tar.xz"
    cli("pack", "--image", image, "--output", tarball)
    rows = {
        r["name"]: r["kind"]
        for r in json.loads(cli("list", "--json", tarball).stdout)["members"]
    }
    assert rows["usr/lib/debug/stripped"] == "executable"
    assert rows["usr/lib/debug/module.ko"] == "source"
    assert rows["usr/lib/debug/emptied.debug"] == "source"


def test_list_reads_headers_and_notes_not_whole_files(image, tmp_path):
    big_image(image, tmp_path, count=2, size=6 * MiB)
    tarball = tmp_path / "t-debug.tar.xz"
    cli("pack", "--image", image, "--output", tarball, "--block-size", "1MiB", "-0")
    with pd.Archive(tarball) as archive:
        rows = list(pd.list_archive(archive))
        assert sum(r.kind == "debuginfo" for r in rows) == 4
        assert archive.reader.decoded < archive.reader.size / 3


def test_verify_passes_on_a_packed_tarball(image):
    result = cli("verify", pack(image))
    assert result.stdout.count("  ok    ") == 6 and "FAIL" not in result.stdout
    assert cli("verify", "-q", pack(image)).stdout == ""


def verify_lines(result) -> dict:
    return {
        line.split(":")[0].split()[-1]: line for line in result.stdout.splitlines()[1:]
    }


def test_verify_on_portage_tarball_fails_seekability_and_only_notes_dot_slash(
    image, tmp_path
):
    tarball = portage_tarball(image, tmp_path / "portage-debug.tar.xz")
    result = cli("verify", tarball, check=False)
    assert result.returncode == 1
    lines = verify_lines(result)
    assert (
        lines["seekable"].lstrip().startswith("FAIL")
        and "1 xz block" in lines["seekable"]
    )
    assert (
        lines["names"].lstrip().startswith("note")
        and "start with './'" in lines["names"]
    )
    for ok in ("xz", "tar", "build-ids", "links"):
        assert lines[ok].lstrip().startswith("ok"), lines[ok]
    quiet = cli("verify", "-q", tarball, check=False)
    assert quiet.returncode == 1
    assert quiet.stdout.splitlines() == [f"{tarball}: FAILED", lines["seekable"]]


def test_verify_reports_padding_streams_missing_build_ids_and_broken_links(
    image, tmp_path
):
    add_debug_file_without_build_id(image, tmp_path)
    # exist_ok: a real build-id may start with 00 (it follows gcc and the build path).
    (image / "usr/lib/debug/.build-id/00").mkdir(exist_ok=True)
    (image / "usr/lib/debug/.build-id/00/1122334455.debug").symlink_to(
        "../../usr/bin/gone.debug"
    )
    tarball = pack(image)
    result = cli("verify", tarball, check=False)
    assert result.returncode == 1
    assert re.search(
        r"FAIL  build-ids: usr/lib/debug/usr/bin/noid.debug: debug ELF without a build-id",
        result.stdout,
    )
    assert (
        "FAIL  links: usr/lib/debug/.build-id/00/1122334455.debug -> ../../usr/bin/gone.debug"
        in result.stdout
    )
    padded = tmp_path / "padded.tar.xz"
    padded.write_bytes(tarball.read_bytes() + bytes(4))
    result = cli("verify", padded, check=False).stdout
    assert "FAIL  seekable: stream padding" in result
    assert (
        "ok    xz: 1 stream, 2 blocks, CRC64, 4 bytes of stream padding, every block"
        in result
    )
    doubled = tmp_path / "two-streams.tar.xz"
    doubled.write_bytes(
        run("xz", "-c", input=b"x" * 1000).stdout + tarball.read_bytes()
    )
    result = cli("verify", doubled, check=False).stdout
    assert (
        "FAIL  seekable: 2 xz streams: debuginfod reads only the last one's index"
        in result
    )


def test_verify_fails_data_hidden_after_the_end_marker(image, tmp_path):
    """Blocks swapped, Index rewritten: the end marker first, the members after it."""
    tarball = pack(image)
    hidden = tmp_path / "hidden-debug.tar.xz"
    hidden.write_bytes(swap_blocks(tarball.read_bytes(), 0, 1))
    run("xz", "-t", hidden)  # a valid xz file
    result = cli("verify", hidden, check=False)
    assert result.returncode == 1
    end = pd.XzReader(hidden).layout.blocks[0].uncompressed_size
    assert (
        f"FAIL  tar: data after the end-of-archive marker (from byte {end})"
        in result.stdout
    )
    repack = cli("repack", hidden, check=False)
    assert repack.returncode == 1 and "left untouched" in repack.stderr
    assert hidden.read_bytes() == swap_blocks(tarball.read_bytes(), 0, 1)


def test_extract_by_build_id_decompresses_only_its_blocks(image, tmp_path):
    ids = big_image(image, tmp_path, count=4)
    tarball = pack(image, "-0", "--block-size", "1MiB")
    last_id, last_path = list(ids.items())[-1]
    out = tmp_path / "got.debug"
    cli("extract", tarball, "--build-id", last_id.upper(), "-o", out)
    run("cmp", out, last_path)
    with pd.Archive(tarball) as archive:
        info = archive.find_build_id(last_id)
        with open(os.devnull, "wb") as sink:
            pd.copy_member(archive, info, sink)
        assert archive.reader.decoded < info.size + 2 * MiB, (
            "its own data, and at most a Block's worth on each side of it"
        )
        spanned = {
            b.number
            for b in archive.reader.layout.blocks
            if b.uncompressed_offset < info.offset_data + info.size
            and b.uncompressed_end > info.offset
        }
        assert spanned <= archive.reader.verified_blocks


def test_extract_by_member_follows_links_and_accepts_any_spelling(image, tmp_path):
    tarball = pack(image)
    hello_id = readelf_build_id(debug_file(image))
    link = f"./usr/lib/debug/.build-id/{hello_id[:2]}/{hello_id[2:]}.debug"
    out = tmp_path / "via-link.debug"
    cli("extract", tarball, "--member", link, "-o", out)
    run("cmp", out, debug_file(image))
    got = cli("extract", tarball, "--member", "/" + SOURCE, "-o", "-").stdout
    assert got == (image / SOURCE).read_text()


def test_extract_explains_what_is_not_a_file(image, tmp_path):
    tarball = pack(image)
    hello_id = readelf_build_id(debug_file(image))
    cases = {
        ("--member", "usr/lib/debug/nope"): "no member 'usr/lib/debug/nope'",
        (
            "--member",
            "usr/src/debug/app-misc",
        ): "usr/src/debug/app-misc is a directory, not a file",
        ("--member", f"usr/lib/debug/.build-id/{hello_id[:2]}/{hello_id[2:]}"): (
            "is a link to usr/bin/hello, which is not in the tarball; executables are in "
            "the binary package"
        ),
        ("--build-id", hello_id[:8]): "a build-id has 40 hex digits (this has 8)",
        ("--build-id", "00" * 20): "no ELF with build-id " + "00" * 20,
        ("--build-id", "ab" * 16): "no ELF with build-id "
        + "ab" * 16
        + "\n",  # md5-sized: whole
        ("--build-id", "xyz"): "--build-id 'xyz' is not a hexadecimal ELF build-id",
    }
    for args, message in cases.items():
        result = cli("extract", tarball, *args, "-o", tmp_path / "out", check=False)
        assert result.returncode in (1, 2), args
        assert message in result.stderr, (args, result.stderr)
        no_traceback(result)
        assert not (tmp_path / "out").exists()


def test_find_names_the_tarball_and_member_decompressing_one_block_at_most(
    image, tmp_path
):
    ids = big_image(image, tmp_path, count=4)
    tarball = pack(image, "-0")
    last_id = list(ids)[-1]
    out = cli("find", last_id, image / pd.TARBALL_DIR).stdout.splitlines()
    assert out == [f"{tarball}  usr/lib/debug/usr/lib/big3.so.debug"]
    assert cli("find", last_id, tarball).stdout.splitlines() == out, (
        "a tarball is a place too"
    )
    with pd.Archive(tarball) as archive:
        assert (
            archive.find_build_id_by_link(last_id).name
            == "usr/lib/debug/usr/lib/big3.so.debug"
        )
        assert archive.reader.decoded < pd.BLOCK_SIZE, (
            "a bisection over Block starts, then a walk inside one Block"
        )
    missing = cli("find", "ab" * 20, image / pd.TARBALL_DIR, check=False)
    assert missing.returncode == 1 and "in no tarball" in missing.stderr
    nowhere = cli("find", "ab" * 20, tmp_path / "nope", check=False)
    assert nowhere.returncode == 2 and "no such tarball or directory" in nowhere.stderr


def test_find_falls_back_to_elf_notes_without_build_id_links(image, tmp_path):
    for link in (image / "usr/lib/debug/.build-id").rglob("*"):
        if link.is_symlink():
            link.unlink()
    root = tmp_path / "root"
    (root / "cat/pn").mkdir(parents=True)
    cli("pack", "--image", image, "--output", root / "cat/pn/x-1-debug.tar.xz")
    lib_id = readelf_build_id(image / "usr/lib/libgreet.so.1")
    out = cli("find", lib_id, root).stdout.splitlines()
    assert out == [
        f"{root / 'cat/pn/x-1-debug.tar.xz'}  usr/lib/debug/usr/lib/libgreet.so.1.debug"
    ]


def module_with_section(tmp_path: pathlib.Path, size: int, seed: int) -> pathlib.Path:
    """A kernel module's debug file (ET_REL: section table at its end, no
    program headers) with a .debug_junk section of `size` random bytes."""
    need("gcc", "ld", "objcopy")
    src = tmp_path / f"mod{seed}.c"
    src.write_text(f"int f{seed}(void) {{ return {seed}; }}\n")
    module = tmp_path / f"mod{seed}.ko"
    run("gcc", "-g", "-c", "-o", src.with_suffix(".o"), src)
    run("ld", "-r", "--build-id=sha1", "-o", module, src.with_suffix(".o"))
    return debug_with_junk(module, tmp_path / f"mod{seed}.ko.debug", size, seed)


def test_build_id_without_links_is_found_in_one_pass(tmp_path):
    # Modules of 1.5 MiB sharing 4 MiB Blocks, as Debian ships them (no
    # .build-id links): reading each one's section table, then its notes,
    # would decompress its Block again from the start.
    image = tmp_path / "image"
    modules = [module_with_section(tmp_path, 3 << 19, seed) for seed in range(6)]
    for n, module in enumerate(modules):
        make_tree(image, {f"usr/lib/debug/lib/modules/m{n}.ko": module.read_bytes()})
    tarball = tmp_path / "modules-debug.tar.xz"
    cli("pack", "--image", image, "--output", tarball, "--block-size", "4MiB", "-0")
    last_id = readelf_build_id(modules[-1])
    with pd.Archive(tarball) as archive:
        assert archive.find_build_id(last_id).name == "usr/lib/debug/lib/modules/m5.ko"
        # one pass, and the found member's Block at most twice to confirm it
        assert archive.reader.decoded < archive.reader.size + 2 * 4 * MiB
    out = tmp_path / "got.debug"
    cli("extract", tarball, "--build-id", last_id, "-o", out)
    run("cmp", out, modules[-1])


def test_build_id_without_links_is_confirmed_past_decoys(image, tmp_path):
    ids = big_image(image, tmp_path, count=2, size=4096)
    for link in (image / "usr/lib/debug/.build-id").rglob("*"):
        if link.is_symlink():
            link.unlink()
    (_, first_path), (last_id, _) = ids.items()
    note = b"GNU\x00" + bytes.fromhex(last_id)
    decoys = {  # the note's bytes, in files that are not that ELF, sorted before it
        "usr/lib/debug/usr/lib/big0.txt": b"text " + note,
        "usr/lib/debug/usr/lib/big0.so.debug": first_path.read_bytes() + note,
    }
    make_tree(image, decoys)
    tarball = pack(image)
    with pd.Archive(tarball) as archive:
        assert (
            archive.find_build_id(last_id).name == "usr/lib/debug/usr/lib/big1.so.debug"
        )
        assert archive.find_build_id("ab" * 20) is None


def many_block_image(tmp_path: pathlib.Path, files: int = 40) -> pathlib.Path:
    image = tmp_path / "many"
    make_tree(
        image,
        {
            f"usr/lib/debug/usr/lib/f{i:03d}.debug": random_bytes(300 * 1024, i)
            for i in range(files)
        },
    )
    return image


def test_locate_bisects_reading_a_logarithmic_number_of_headers(tmp_path, monkeypatch):
    image = many_block_image(tmp_path)
    tarball = tmp_path / "many-debug.tar.xz"
    cli("pack", "--image", image, "--output", tarball, "--block-size", "256KiB", "-0")
    reads = []
    original = pd.Archive.header_at
    monkeypatch.setattr(
        pd.Archive,
        "header_at",
        lambda self, offset: reads.append(offset) or original(self, offset),
    )
    with pd.Archive(tarball) as archive:
        names = [i.name for i in archive.members()]
        blocks = len(archive.reader.layout.blocks)
    assert blocks > 40 and len(names) > 40
    worst = 0
    for name in [
        *names,
        "usr/lib/debug/usr/lib/f0205.debug",
        "zzz",
        "usr/lib/debug/.build-id/00/x.debug",
    ]:
        reads.clear()
        with pd.Archive(tarball) as archive:
            found = archive.locate(name)
        assert (found.name if found else None) == (name if name in names else None)
        worst = max(worst, len(reads))
    # A walk reads a header per member (about 45 here); bisection about 2 log2(blocks).
    assert worst <= 2 * blocks.bit_length() + 4, worst


def test_locate_falls_back_to_a_walk_when_blocks_are_not_sorted(tmp_path):
    members = [
        ({"name": f"usr/lib/debug/{c}"}, random_bytes(300 * 1024, i))
        for i, c in enumerate("zyxa")
    ]
    data = tar_bytes(members)
    with tarfile.open(fileobj=io.BytesIO(data)) as tar:
        infos = tar.getmembers()
    cuts = [
        0,
        *(i.offset for i in infos[1:]),
        pd.Archive.next_offset(infos[-1]),
        len(data),
    ]
    path = tmp_path / "unsorted-debug.tar.xz"
    write_xz(path, [data[cuts[i] : cuts[i + 1]] for i in range(len(cuts) - 1)])
    with pd.Archive(path) as archive:
        assert archive.is_packdebug_layout()
        for name in ("usr/lib/debug/a", "usr/lib/debug/y"):
            assert archive.locate(name).name == name


def test_bad_input_gets_one_line_error_and_no_output(packed, tmp_path):
    for name, path in bad_inputs(packed, tmp_path).items():
        out = tmp_path / "out.debug"
        for args in (
            ("verify", path),
            ("list", path),
            (
                "extract",
                path,
                "--member",
                "usr/lib/debug/usr/lib/big0.so.debug",
                "-o",
                out,
            ),
            ("extract", path, "--all", "-C", tmp_path / "all"),
            ("repack", path),
        ):
            if name == "wrong check" and args[0] == "list":
                continue  # list reads only what it needs and verifies no checks
            before = path.read_bytes()
            result = cli(*args, check=False, timeout=60)
            assert result.returncode == 1, (name, args, result.stdout, result.stderr)
            no_traceback(result)
            assert str(path) in result.stdout + result.stderr, (name, args)
            errors = [
                line
                for line in result.stderr.splitlines()
                if "error" in line or "warning" in line
            ]
            assert errors or "FAIL" in result.stdout, (name, args)
            assert not out.exists() and path.read_bytes() == before, (name, args)
            assert not [p for p in path.parent.rglob("*.tmp")]
        shutil.rmtree(tmp_path / "all", ignore_errors=True)


@pytest.fixture
def packed(image, tmp_path) -> pathlib.Path:
    """A tarball whose large member has Blocks of its own, between others.

    That is packdebug's layout before 2026-11-28 (a file of 1 MiB or more
    in Blocks of its own), which binhosts still hold; some swaps of its
    Blocks make another valid archive.
    """
    big_image(image, tmp_path, count=1, size=2 * MiB)
    output = image / TARBALL
    pd.pack(
        pd.PackRequest(str(image), output=str(output)),
        pd.PackOptions(preset=0, block_size=MiB, large_member=MiB),
        pd.Log(-1),
    )
    return output


def bad_inputs(packed: pathlib.Path, tmp_path: pathlib.Path) -> dict:
    data = packed.read_bytes()
    blocks = pd.XzReader(packed).layout.blocks
    second = blocks[1]
    with pd.Archive(packed) as archive:
        big0 = archive.locate("usr/lib/debug/usr/lib/big0.so.debug")
    lied = next(
        b.number - 1
        for b in blocks
        if b.uncompressed_offset <= big0.offset_data < b.uncompressed_end
    )
    corrupt = bytearray(data)
    corrupt[second.offset + 40] ^= 0xFF
    wrong_check = bytearray(data)
    wrong_check[second.end - 1] ^= 0x01  # last byte of its CRC64
    fields = bytearray(
        tarfile.TarInfo("usr/lib/debug/long").tobuf(tarfile.USTAR_FORMAT)
    )
    fields[124:136] = b"%011o\0" % (1 << 20)  # claims 1 MiB of data that is not there
    fields[148:156] = b"        "
    fields[148:156] = b"%06o\0 " % sum(fields)
    cases = {
        "truncated xz": data[: len(data) // 2],
        "corrupted block": bytes(corrupt),
        "wrong check": bytes(wrong_check),
        "not xz": b"this is not an xz file\n" * 10,
        "index lies": rewrite_index(
            data,
            lambda r: (
                r[:lied]
                + [pd.IndexRecord(r[lied].unpadded_size, r[lied].uncompressed_size + 1)]
                + r[lied + 1 :]
            ),
        ),
        "member past the end": lzma.compress(
            bytes(fields) + b"x" * 512 + bytes(1024), check=lzma.CHECK_CRC64
        ),
    }
    paths = {}
    for name, content in cases.items():
        path = tmp_path / (name.replace(" ", "-") + ".tar.xz")
        path.write_bytes(content)
        paths[name] = path
    return paths


def tarball_mutations(
    data: bytes, rng: random.Random, count: int
) -> list[tuple[str, bytes]]:
    """Cuts, bit flips and Block swaps (Index rewritten to match) of a real tarball."""
    blocks = len(
        pd.parse_index(data[-12 - pd.parse_stream_footer(data[-12:])[1] : -12])
    )
    out = []
    for _ in range(count):
        kind = rng.choice(
            ["cut", "flip", "flips", "swap"] if blocks > 1 else ["cut", "flip", "flips"]
        )
        if kind == "cut":
            out.append((kind, data[: rng.randrange(len(data))]))
        elif kind == "swap":
            a, b = rng.sample(range(blocks), 2)
            out.append((kind, swap_blocks(data, a, b)))
        else:
            mutated = bytearray(data)
            for _ in range(1 if kind == "flip" else rng.randint(2, 20)):
                mutated[rng.randrange(len(mutated))] ^= 1 << rng.randrange(8)
            out.append((kind, bytes(mutated)))
    return out


def swapped_truth(
    data: bytes, name: str = "usr/lib/debug/usr/lib/big0.so.debug"
) -> bytes:
    """The bytes after the member's header in a whole, valid xz file.

    Not tarfile's view: a swap can leave garbage before the header, where a
    sequential reader stops, while extract reads from the header on (the
    README's known limitations).
    """
    raw = lzma.decompress(data)
    for offset in range(0, len(raw), 512):
        try:
            info = tarfile.TarInfo.frombuf(
                raw[offset : offset + 512], "utf-8", "strict"
            )
        except tarfile.HeaderError:
            continue
        if info.name == name:
            return raw[offset + 512 : offset + 512 + info.size]
    raise AssertionError(f"no header of {name}")


def test_extract_refuses_a_member_whose_data_runs_into_another_block(packed, tmp_path):
    """Blocks swapped under a rewritten Index each pass their check; the
    large member then takes the next member's Block as its own data."""
    with pd.Archive(packed) as archive:
        big0 = archive.locate("usr/lib/debug/usr/lib/big0.so.debug")
        starts = archive.reader.block_starts
        big_tail = bisect.bisect_right(starts, big0.offset_data + big0.size - 1) - 1
        assert 0 < big_tail < len(starts) - 2, "another member's Block follows"
    swapped = tmp_path / "swapped-debug.tar.xz"
    swapped.write_bytes(swap_blocks(packed.read_bytes(), big_tail, big_tail + 1))
    out = tmp_path / "big0.debug"
    args = ("--member", "usr/lib/debug/usr/lib/big0.so.debug", "-o", out)
    result = cli("extract", swapped, *args, check=False)
    assert result.returncode == 1 and "damaged" in result.stderr, result.stderr
    assert not out.exists()
    assert cli("verify", swapped, check=False).returncode == 1


def test_cuts_flips_and_block_swaps_never_crash(image, packed, tmp_path):
    """Fixed-seed fuzzing of a real tarball through verify, list and extract."""
    data = packed.read_bytes()
    original = (image / "usr/lib/debug/usr/lib/big0.so.debug").read_bytes()
    target = tmp_path / "t.tar.xz"
    out = tmp_path / "out.debug"
    outcomes: dict = {}
    for kind, mutated in tarball_mutations(data, random.Random(5), 150):
        target.write_bytes(mutated)
        for args in (
            ("verify", target),
            ("list", target),
            (
                "extract",
                target,
                "--member",
                "usr/lib/debug/usr/lib/big0.so.debug",
                "-o",
                out,
            ),
        ):
            code, stdout, stderr = in_process(*args)
            assert code in (0, 1), (kind, args)
            assert code == 0 or "packdebug: error: " in stderr or "FAIL" in stdout, (
                kind,
                args,
            )
            if args[0] == "extract" and code:
                assert not out.exists(), kind
            elif (
                args[0] == "extract"
            ):  # a swap makes another valid archive: its own bytes
                expected = original if kind != "swap" else swapped_truth(mutated)
                assert out.read_bytes() == expected, kind
            outcomes[(kind, args[0], code)] = outcomes.get((kind, args[0], code), 0) + 1
            out.unlink(missing_ok=True)
    assert {k[2] for k in outcomes if k[1] == "verify"} == {0, 1}, outcomes


# Extraction of everything: hostile archives.

HOSTILE_CASES = json.loads((HERE / "tests/data/hostile-tar.json").read_text())
TAR_TYPES = {
    "file": tarfile.REGTYPE,
    "dir": tarfile.DIRTYPE,
    "symlink": tarfile.SYMTYPE,
    "hardlink": tarfile.LNKTYPE,
    "fifo": tarfile.FIFOTYPE,
    "chardev": tarfile.CHRTYPE,
    "blockdev": tarfile.BLKTYPE,
}


def realpath_limit_members(dest: str, path_max: int = 4096) -> list[dict]:
    """CVE-2025-4517's layout (CPython test_realpath_limit_attack), for this dest.

    Through one-letter symlinks the names fit PATH_MAX; expanded they do not,
    so a realpath() check could stop resolving and miss the escape.
    """
    steps = "abcdefghijklmnop"
    component = "d" * ((path_max - len(dest) - 1) // (len(steps) + 1))
    members, path = [], ""
    for step in steps:
        members.append(
            {"type": "dir", "name": os.path.join(path, component), "mode": 0o777}
        )
        members.append(
            {"type": "symlink", "name": os.path.join(path, step), "linkname": component}
        )
        path = os.path.join(path, component)
    link = os.path.join(*steps, "l" * 254)
    members += [
        {
            "type": "symlink",
            "name": link,
            "linkname": os.path.join(*[".."] * len(steps)),
        },
        {"type": "symlink", "name": "escape", "linkname": os.path.join(link, "..")},
        {"type": "hardlink", "name": "flaglink", "linkname": "escape/flag"},
        {"type": "file", "name": "flaglink", "data": "overwrite"},
        {"type": "file", "name": "escape/newfile", "data": "new"},
    ]
    return members


def build_hostile(case: dict, sandbox: pathlib.Path) -> pathlib.Path:
    """The case's archive, as a multi-block .tar.xz in the sandbox."""
    dest = sandbox / "dest"
    members = case.get("members") or realpath_limit_members(str(dest))
    buffer = io.BytesIO()
    formats = {
        "pax": tarfile.PAX_FORMAT,
        "gnu": tarfile.GNU_FORMAT,
        "ustar": tarfile.USTAR_FORMAT,
    }
    options = {"format": formats[case.get("format", "pax")]}
    options.update({k: case[k] for k in ("encoding", "errors") if k in case})
    with tarfile.open(fileobj=buffer, mode="w", **options) as tar:
        for m in members:
            info = tarfile.TarInfo(m["name"].replace("@SANDBOX@", str(sandbox)))
            info.type = TAR_TYPES[m["type"]]
            info.mtime = 1_700_000_000
            info.mode = m.get("mode", 0o755 if m["type"] == "dir" else 0o644)
            info.uid, info.gid = m.get("uid", 1000), m.get("gid", 1000)
            info.linkname = m.get("linkname", "").replace("@SANDBOX@", str(sandbox))
            info.devmajor, info.devminor = m.get("devmajor", 1), m.get("devminor", 3)
            if "pax_headers" in m:
                info.pax_headers = {
                    k: v.replace("@SANDBOX@", str(sandbox))
                    for k, v in m["pax_headers"].items()
                }
            data = m.get("data", "").encode() if m["type"] == "file" else b""
            info.size = len(data)
            tar.addfile(info, io.BytesIO(data))
    raw = buffer.getvalue()
    path = sandbox / f"{case['name']}.tar.xz"
    write_xz(path, [raw[:512], raw[512:]])
    return path


def make_sandbox(root: pathlib.Path, case: dict) -> pathlib.Path:
    sandbox = root / "box"
    (sandbox / "outside").mkdir(parents=True)
    (sandbox / "outside/flag").write_text("original")
    (sandbox / "flag").write_text("original")
    for entry in case.get("pre_existing", []):
        path = sandbox / entry["path"]
        path.parent.mkdir(parents=True, exist_ok=True)
        if entry["type"] == "dir":
            path.mkdir(exist_ok=True)
        elif entry["type"] == "symlink":
            path.symlink_to(entry["linkname"])
        else:
            path.write_text(entry.get("data", "pre-existing"))
    (sandbox / "dest").mkdir(exist_ok=True)
    return sandbox


def outside_state(sandbox: pathlib.Path) -> dict:
    """Every entry of the sandbox outside the destination, with its content."""
    dest = os.path.realpath(sandbox / "dest")
    state = {}
    for dirpath, dirnames, filenames in os.walk(sandbox):
        real = os.path.realpath(dirpath)
        if real == dest or real.startswith(dest + "/"):
            continue
        for name in dirnames + filenames:
            path = os.path.join(dirpath, name)
            st = os.lstat(path)
            if stat.S_ISLNK(st.st_mode):
                content = os.readlink(path)
            elif stat.S_ISREG(st.st_mode):
                content = (pathlib.Path(path).read_bytes(), st.st_nlink)
            else:
                content = "directory"
            state[path] = (stat.S_IFMT(st.st_mode), st.st_ino, content)
    return state


def assert_extraction_safe(dest: pathlib.Path, already=()) -> None:
    """What extraction put in dest may not lead outside it nor carry dangerous modes."""
    real = os.path.realpath(dest)
    for dirpath, dirnames, filenames in os.walk(dest):
        for name in dirnames + filenames:
            path = os.path.join(dirpath, name)
            if os.path.relpath(path, dest) in already:
                continue
            st = os.lstat(path)
            assert not name.endswith(".tmp"), f"temporary file left: {path}"
            if stat.S_ISLNK(st.st_mode):
                resolved = os.path.realpath(path)
                assert resolved == real or resolved.startswith(real + "/"), (
                    path,
                    resolved,
                )
            elif stat.S_ISREG(st.st_mode) or stat.S_ISDIR(st.st_mode):
                assert not st.st_mode & 0o7022, (path, oct(st.st_mode))
            else:
                raise AssertionError(f"special file extracted: {path}")


@pytest.mark.parametrize("case", HOSTILE_CASES, ids=[c["name"] for c in HOSTILE_CASES])
def test_extract_all_is_at_least_as_strict_as_python_3_14_data_filter(tmp_path, case):
    """CPython's TestExtractionFilters archives and the 2025 tarfile CVE cases."""
    sandbox = make_sandbox(tmp_path, case)
    tarball = build_hostile(case, sandbox)
    before = outside_state(sandbox)
    code, _, stderr = in_process("extract", tarball, "--all", "-C", sandbox / "dest")
    assert code in (0, 1) and "Traceback" not in stderr
    if code:
        assert (
            stderr.startswith(f"packdebug: error: {tarball}: member ")
            and stderr.count("\n") == 1
        ), stderr
        assert "extracted before it" in stderr and "is incomplete" in stderr
    if case["py314"] == "refused":
        assert code == 1, (
            f"Python 3.14's data filter refuses {case['name']}; so must packdebug"
        )
    before.pop(str(tarball), None)
    after = outside_state(sandbox)
    after.pop(str(tarball), None)
    assert after == before, "something outside the destination changed"
    already = {os.path.relpath(e["path"], "dest") for e in case.get("pre_existing", [])}
    if os.path.isdir(sandbox / "dest"):
        assert_extraction_safe(sandbox / "dest", already)


def test_the_hostile_catalogue_covers_the_reported_chains_and_cves():
    names = {c["name"] for c in HOSTILE_CASES}
    assert len(HOSTILE_CASES) >= 40
    assert {
        "chain_d_e_f",
        "deep_symlink_via_later_hardlink",
        "realpath_limit_attack",
        "sneaky_hardlink_fallback",
        "exfiltration_via_symlink",
        "link_named_like_dest",
        "pax_nul_in_name",
        "long_component_name",
        "dir_replaced_by_file",
        "hardlink_missing_member",
        "hardlink_to_directory",
    } <= names


@pytest.mark.parametrize(
    "members,error",
    [
        (
            [
                ({"name": "d", "type": tarfile.SYMTYPE, "linkname": "."}, b""),
                ({"name": "e", "type": tarfile.SYMTYPE, "linkname": "d/.."}, b""),
            ],
            "LinkOutsideDestinationError",
        ),
        (
            [
                (
                    {
                        "name": "a/b/c/s",
                        "type": tarfile.SYMTYPE,
                        "linkname": "../../outside",
                    },
                    b"",
                ),
                ({"name": "t", "type": tarfile.LNKTYPE, "linkname": "a/b/c/s"}, b""),
            ],
            "LinkOutsideDestinationError",
        ),
        (
            [({"name": "x", "type": tarfile.LNKTYPE, "linkname": "missing"}, b"")],
            "HardlinkTargetError",
        ),
        (
            [
                ({"name": "dir", "type": tarfile.DIRTYPE}, b""),
                ({"name": "x", "type": tarfile.LNKTYPE, "linkname": "dir"}, b""),
            ],
            "HardlinkTargetError",
        ),
        (
            [
                ({"name": "same", "type": tarfile.DIRTYPE}, b""),
                ({"name": "same"}, b"file"),
            ],
            "TypeConflictError",
        ),
        (
            [
                ({"name": "same", "type": tarfile.DIRTYPE}, b""),
                ({"name": "same", "type": tarfile.SYMTYPE, "linkname": "x"}, b""),
            ],
            "TypeConflictError",
        ),
        ([({"name": "n" * 300}, b"long")], "NameTooLongError"),
        (
            [({"name": "s", "type": tarfile.SYMTYPE, "linkname": "t" * 5000}, b"")],
            "NameTooLongError",
        ),
        ([({"name": "/etc/evil"}, b"x")], "AbsolutePathError"),
        ([({"name": "up/../../evil"}, b"x")], "OutsideDestinationError"),
        (
            [({"name": "abs", "type": tarfile.SYMTYPE, "linkname": "/etc"}, b"")],
            "AbsoluteLinkError",
        ),
        ([({"name": "null", "type": tarfile.CHRTYPE}, b"")], "SpecialFileError"),
        ([({"name": "fifo", "type": tarfile.FIFOTYPE}, b"")], "SpecialFileError"),
    ],
)
def test_extract_all_refusals_have_their_own_error_classes(tmp_path, members, error):
    tarball = hostile_tarball(tmp_path / "t.tar.xz", *members)
    with (
        pd.Archive(tarball, sequential=True) as archive,
        pytest.raises(pd.ExtractError) as caught,
    ):
        pd.extract_all(archive, str(tmp_path / "dest"))
    assert type(caught.value).__name__ == error
    assert caught.value.path == str(tarball) and caught.value.member
    result = cli("extract", tarball, "--all", "-C", tmp_path / "dest2", check=False)
    assert result.returncode == 1 and result.stderr.count("\n") == 1
    no_traceback(result)


def test_extract_all_refuses_a_nul_byte_in_a_pax_path(tmp_path):
    raw = bytearray(tar_bytes([({"name": "usr/lib/debug/" + "p" * 120}, b"x")]))
    index = raw.index(b"path=")
    raw[index + 5 + 14] = 0  # the PAX path record now holds a NUL byte
    path = tmp_path / "nul.tar.xz"
    write_xz(path, [bytes(raw[:1024]), bytes(raw[1024:])])
    result = cli("extract", path, "--all", "-C", tmp_path / "dest", check=False)
    assert result.returncode == 1 and "has a NUL byte in its name" in result.stderr
    no_traceback(result)


def test_extract_all_into_a_file_or_over_a_directory_is_a_clear_error(image, tmp_path):
    tarball = pack(image)
    (tmp_path / "afile").write_text("x")
    result = cli("extract", tarball, "--all", "-C", tmp_path / "afile", check=False)
    assert (
        result.returncode == 1 and "is a regular file, not a directory" in result.stderr
    )
    dest = tmp_path / "dest"
    (dest / SOURCE).mkdir(parents=True)
    result = cli("extract", tarball, "--all", "-C", dest, check=False)
    assert (
        result.returncode == 1
        and f"member '{SOURCE}': a directory is in the way" in result.stderr
    )
    no_traceback(result)


def test_extract_all_on_a_full_disk_says_what_is_left(image, tmp_path):
    big_image(image, tmp_path, count=1, size=MiB)
    tarball = pack(image, "-0")
    with tiny_tmpfs(tmp_path / "tiny", "256k") as dest:
        result = cli("extract", tarball, "--all", "-C", dest, check=False)
        assert result.returncode == 1 and "No space left on device" in result.stderr
        assert "is incomplete" in result.stderr
        no_traceback(result)
        assert not [p for p in dest.rglob("*.tmp")]


def test_failed_extract_all_leaves_no_file_with_wrong_bytes(image, tmp_path):
    """Data is put in place only once every Block it spans passed its check."""
    big_image(image, tmp_path, count=3, size=MiB)
    tarball = pack(image, "-0", "--block-size", "512KiB")
    data = tarball.read_bytes()
    blocks = pd.XzReader(tarball).layout.blocks
    originals = snapshot(image)
    wrong = 0
    for block in blocks[1:-1]:
        for where in (block.offset + 20, block.end - 1):  # data, and the check itself
            broken = bytearray(data)
            broken[where] ^= 0x55
            path = tmp_path / "broken.tar.xz"
            path.write_bytes(bytes(broken))
            dest = tmp_path / "dest"
            shutil.rmtree(dest, ignore_errors=True)
            result = cli("extract", path, "--all", "-C", dest, check=False)
            assert result.returncode == 1 and "is incomplete" in result.stderr
            got = snapshot(dest)
            for name, entry in got.items():
                if entry[0] == "file":
                    wrong += entry[2] != originals[name][2]
            assert_extraction_safe(dest)
    assert wrong == 0


# ---------------------------------------------------------------------------
# 6. binhost upkeep: repack
# ---------------------------------------------------------------------------


def test_repack_turns_portage_tarball_into_exactly_what_pack_writes(image, tmp_path):
    tarball = portage_tarball(image, tmp_path / "hello-1.0-1-debug.tar.xz")
    result = cli("repack", tarball)
    assert "repacked (" in result.stdout and "1 xz block" in result.stdout
    assert "repacked 1 of 1 tarball" in result.stdout
    assert tarball.read_bytes() == pack(image).read_bytes()
    assert cli("verify", tarball).returncode == 0


def test_reading_and_repacking_leave_no_reference_cycles(image, tmp_path):
    """An Archive caught in a cycle keeps its decoder's dictionary until the
    garbage collector's next full pass: over 2,000 tarballs, repack's peak
    memory grew from 47 to 124 MiB that way."""
    tarball = portage_tarball(image, tmp_path / "hello-1.0-1-debug.tar.xz")
    gc.collect()
    gc.disable()
    try:
        pd.repack_archive(str(tarball), pd.PackOptions(jobs=1))
        with pd.Archive(tarball) as archive:
            name = pd.normalize_name(next(archive.members()).name)
            assert pd.normalize_name(archive.by_name[name].name) == name
        assert gc.collect() == 0
    finally:
        gc.enable()


def test_repack_keeps_the_tarballs_mode_and_owner(image, tmp_path):
    need_root()
    tarball = portage_tarball(image, tmp_path / "hello-1.0-1-debug.tar.xz")
    os.chown(tarball, 65534, 65533)
    tarball.chmod(0o640)
    before = tarball.stat()
    cli("repack", tarball)
    after = tarball.stat()
    assert after.st_ino != before.st_ino, "replaced"
    assert (after.st_uid, after.st_gid, stat.S_IMODE(after.st_mode)) == (
        65534,
        65533,
        0o640,
    )


def test_repack_keeps_file_contents_byte_identical(image, tmp_path):
    need("tar")
    tarball = portage_tarball(image, tmp_path / "p-debug.tar.xz")
    (tmp_path / "before").mkdir()
    run("tar", "-xJf", tarball, "-C", tmp_path / "before")
    cli("repack", tarball)
    (tmp_path / "after").mkdir()
    run("tar", "-xJf", tarball, "-C", tmp_path / "after")
    before, after = snapshot(tmp_path / "before"), snapshot(tmp_path / "after")
    files = lambda s: {k: v[:3] for k, v in s.items() if v[0] == "file"}
    assert files(before) == files(after)
    assert {k: v for k, v in before.items() if v[0] == "symlink"} == {
        k: v for k, v in after.items() if v[0] == "symlink"
    }


def test_repack_skips_canonical_tarballs_unless_forced_and_dry_run_writes_nothing(
    image, tmp_path
):
    tarball = pack(image)
    stamp = tarball.stat().st_mtime_ns
    assert "repacked 0 of 1" in cli("repack", tarball).stdout
    assert tarball.stat().st_mtime_ns == stamp
    forced = cli("repack", "--force", tarball).stdout
    assert "--force" in forced and tarball.stat().st_mtime_ns != stamp
    assert tarball.read_bytes() == pack(image).read_bytes()
    portage = portage_tarball(image, tmp_path / "p-debug.tar.xz")
    before, stamp = portage.read_bytes(), portage.stat().st_mtime_ns
    dry = cli("repack", "--dry-run", "--root", tmp_path).stdout
    assert f"{portage}: would repack:" in dry and "member names are not clean" in dry
    assert portage.read_bytes() == before and portage.stat().st_mtime_ns == stamp


def test_repack_rewrites_a_tarball_that_differs_only_in_its_xz_container(
    image, tmp_path
):
    canonical = pack(image)
    payloads = [
        pd.XzReader(canonical).read_at(b.uncompressed_offset, b.uncompressed_size)
        for b in pd.XzReader(canonical).layout.blocks
    ]
    crc32 = tmp_path / "crc32-debug.tar.xz"
    with open(crc32, "wb") as f:
        writer = pd.XzStreamWriter(f, pd.CHECK_CRC32)
        for payload in payloads:
            writer.write_block(*pd.compress_block(payload, check=pd.CHECK_CRC32))
        writer.close()
    padded = tmp_path / "padded-debug.tar.xz"
    padded.write_bytes(canonical.read_bytes() + bytes(4))
    for path in (crc32, padded):
        result = cli("repack", path)
        assert "repacked 1 of 1" in result.stdout, path
        assert path.read_bytes() == canonical.read_bytes(), path


def test_repack_leaves_a_damaged_tarball_untouched(packed, tmp_path):
    broken = bad_inputs(packed, tmp_path)["corrupted block"]
    before = broken.read_bytes()
    result = cli("repack", broken, check=False)
    assert (
        result.returncode == 1 and "fails verification, left untouched" in result.stderr
    )
    assert broken.read_bytes() == before


def test_repack_refuses_an_empty_archive_it_could_only_make_unseekable(tmp_path):
    empty = tmp_path / "empty-debug.tar.xz"
    empty.write_bytes(lzma.compress(bytes(10240), check=lzma.CHECK_CRC64))
    result = cli("repack", empty, check=False)
    assert result.returncode == 1 and "holds no members" in result.stderr
    assert empty.read_bytes() == lzma.compress(bytes(10240), check=lzma.CHECK_CRC64)


def test_repack_checks_its_output_before_it_replaces_the_original(image, tmp_path):
    tarball = portage_tarball(image, tmp_path / "p-debug.tar.xz")
    before = tarball.read_bytes()
    verification = pd.verify_archive(tarball)
    unseekable = tmp_path / "one-block.tar.xz"
    unseekable.write_bytes(
        lzma.compress(
            tarball.read_bytes() and pd.XzReader(tarball).read(), check=lzma.CHECK_CRC64
        )
    )
    with pytest.raises(
        pd.ArchiveError, match="the repacked tarball would fail verify .*seekable"
    ):
        pd._check_repacked(verification, str(unseekable))
    pd._check_repacked(verification, str(pack(image)))  # a good one passes
    assert tarball.read_bytes() == before


def test_repack_of_a_large_single_block_tarball_spools_it_once(tmp_path):
    """Members in another order than packdebug's, in one Block larger than the window."""
    files = {
        f"usr/lib/debug/usr/lib/f{i}.debug": random_bytes(int(1.5 * MiB), i)
        for i in range(3)
    }
    members = [
        ({"name": name, "mode": 0o644}, data)
        for name, data in sorted(files.items(), reverse=True)
    ]
    raw = tar_bytes(members)
    tarball = tmp_path / "big-debug.tar.xz"
    tarball.write_bytes(lzma.compress(raw, check=lzma.CHECK_CRC64, preset=0))
    copy = tmp_path / "copy-debug.tar.xz"
    shutil.copy(tarball, copy)
    options = pd.PackOptions(preset=0, jobs=1)
    spooled = pd.repack_archive(str(tarball), options, spool_above=MiB)
    direct = pd.repack_archive(str(copy), options, spool_above=1 << 40)
    # The spool reads the Block once; without it, every member read steps
    # back past the decoder's window and decompresses from the Block's start.
    assert spooled.decoded == len(raw) < 1.5 * len(raw) < direct.decoded, (
        len(raw),
        spooled,
        direct,
    )
    assert tarball.read_bytes() == copy.read_bytes()
    with pd.Archive(tarball) as archive:
        for name, data in files.items():
            assert b"".join(archive.data(archive.locate(name))) == data


def test_several_tarballs_are_read_in_worker_processes_in_order(image, tmp_path):
    tarball = pack(image)
    root = tmp_path / "root"
    paths = []
    for i in range(6):
        path = root / f"cat/p{i}/p{i}-1-1-debug.tar.xz"
        path.parent.mkdir(parents=True)
        shutil.copy(tarball, path)
        paths.append(path)
    bad = paths[3]
    bad.write_bytes(bad.read_bytes()[:-20])
    one = cli("verify", "-j1", *paths, check=False)
    two = cli("verify", "-j2", *paths, check=False)
    assert one.returncode == two.returncode == 1 and one.stdout == two.stdout
    assert [
        line.split(":")[0]
        for line in two.stdout.splitlines()
        if not line.startswith(" ")
    ] == [str(p) for p in paths]
    hello_id = readelf_build_id(image / "usr/bin/hello")
    found = cli("find", "-j2", hello_id, root)
    assert [line.split()[0] for line in found.stdout.splitlines()] == [
        str(p) for p in paths if p != bad
    ]
    assert f"{bad}: " in found.stderr and "(skipped)" in found.stderr


def test_repack_root_in_parallel_replaces_each_tarball_atomically(image, tmp_path):
    root = tmp_path / "root"
    paths = []
    for i in range(4):
        path = root / f"app-misc/hello/hello-1.{i}-1-debug.tar.xz"
        path.parent.mkdir(parents=True, exist_ok=True)
        paths.append(portage_tarball(image, path))
    result = cli("repack", "--root", root, "-j2")
    assert "repacked 4 of 4 tarballs" in result.stdout
    assert [line.split(":")[0] for line in result.stdout.splitlines()[:-1]] == [
        str(p) for p in paths
    ]
    expected = pack(image).read_bytes()
    assert all(p.read_bytes() == expected for p in paths)
    assert not list(root.rglob("*.tmp"))


def test_interrupted_parallel_repack_leaves_each_tarball_whole(tmp_path):
    root = tmp_path / "root"
    originals = {}
    for i in range(4):
        image = tmp_path / f"image{i}"
        make_tree(image, {"usr/lib/debug/blob": random_bytes(6 * MiB, 40 + i)})
        path = root / f"cat/p{i}/p{i}-1-1-debug.tar.xz"
        path.parent.mkdir(parents=True)
        portage_tarball(image, path)
        originals[path] = path.read_bytes()
    proc = subprocess.Popen(
        [sys.executable, SCRIPT, "repack", "--root", root, "-j2", "-9"],
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
        text=True,
        env=clean_env(),
    )
    deadline = time.monotonic() + 60
    while not list(root.rglob(".*.tmp")) and time.monotonic() < deadline:
        time.sleep(0.05)
    proc.send_signal(signal.SIGINT)
    _, err = proc.communicate(timeout=60)
    assert (
        proc.returncode == 130
        and "interrupted;" in err
        and "the others are untouched" in err
    )
    assert "Traceback" not in err
    assert not list(root.rglob("*.tmp")), "no temporary file is left"
    for path, before in originals.items():
        assert path.read_bytes() == before or cli("verify", path).returncode == 0


def test_repack_root_must_exist(tmp_path):
    result = cli("repack", "--root", tmp_path / "nonexistent", check=False)
    assert (
        result.returncode == 2
        and "No such file or directory (check --root)" in result.stderr
    )
    assert result.stdout == ""


# ---------------------------------------------------------------------------
# 6. binhost upkeep: prune
# ---------------------------------------------------------------------------


def xz_tar(members: dict) -> bytes:
    """An xz-compressed tar of {name: bytes}, as Portage compresses gpkg parts."""
    buffer = io.BytesIO()
    with tarfile.open(fileobj=buffer, mode="w:xz") as tar:
        for name, data in members.items():
            info = tarfile.TarInfo(name)
            info.size, info.mode = len(data), 0o755
            tar.addfile(info, io.BytesIO(data))
    return buffer.getvalue()


def make_gpkg(
    pkgdir: pathlib.Path, category: str, pn: str, pf: str, build_id, image: dict
) -> pathlib.Path:
    """A GPKG binpkg: an uncompressed tar of PF[-BUILD_ID]/{gpkg-1, metadata.tar.xz,
    image.tar.xz, Manifest}, image members under image/ (Portage's gpkg.py)."""
    base = f"{pf}-{build_id}" if build_id else pf
    path = (
        pkgdir / category / pn / f"{base}.gpkg.tar"
        if build_id
        else pkgdir / category / f"{pf}.gpkg.tar"
    )
    path.parent.mkdir(parents=True, exist_ok=True)
    metadata = {
        f"metadata/{k}": f"{v}\n".encode()
        for k, v in (("CATEGORY", category), ("PF", pf))
    }
    if build_id:
        metadata["metadata/BUILD_ID"] = f"{build_id}\n".encode()
    parts = {
        f"{base}/gpkg-1": b"",
        f"{base}/metadata.tar.xz": xz_tar(metadata),
        f"{base}/image.tar.xz": xz_tar({f"image/{k}": v for k, v in image.items()}),
        f"{base}/Manifest": b"DATA image.tar.xz 0\n",
    }
    with tarfile.open(path, "w", format=tarfile.GNU_FORMAT) as tar:
        for name, data in parts.items():
            info = tarfile.TarInfo(name)
            info.size = len(data)
            tar.addfile(info, io.BytesIO(data))
    return path


class Binhost:
    """A tarball root, a PKGDIR and a vardb, built file by file."""

    def __init__(self, base: pathlib.Path) -> None:
        self.root, self.pkgdir, self.vardb = (
            base / "tarballs",
            base / "binpkgs",
            base / "vardb",
        )
        for d in (self.root, self.pkgdir, self.vardb):
            d.mkdir(parents=True)

    def tarball(
        self, rel: str, days_old: float = 30, data: bytes = b"not really xz"
    ) -> pathlib.Path:
        path = self.root / rel
        path.parent.mkdir(parents=True, exist_ok=True)
        path.write_bytes(data)
        stamp = time.time() - days_old * 86400
        os.utime(path, (stamp, stamp))
        return path

    def binpkg(
        self, category: str, pn: str, pf: str, build_id, fmt: str = "gpkg"
    ) -> None:
        """A binpkg where Portage's bintree puts it; xpak and tbz2 only by name."""
        if fmt == "gpkg":
            make_gpkg(self.pkgdir, category, pn, pf, build_id, {})
            return
        path = (
            self.pkgdir / category / pn / f"{pf}-{build_id}.{fmt}"
            if build_id
            else self.pkgdir / category / f"{pf}.{fmt}"
        )
        path.parent.mkdir(parents=True, exist_ok=True)
        path.write_bytes(b"xpak")

    def installed(self, category: str, pf: str, build_id) -> None:
        (self.vardb / category / pf).mkdir(parents=True)
        if build_id:
            (self.vardb / category / pf / "BUILD_ID").write_text(build_id + "\n")

    def prune(self, *args, check: bool = True) -> subprocess.CompletedProcess:
        return cli(
            "prune",
            "--root",
            self.root,
            "--pkgdir",
            self.pkgdir,
            "--vardb",
            self.vardb,
            *args,
            check=check,
        )

    def left(self) -> set:
        return {
            str(p.relative_to(self.root))
            for p in self.root.rglob("*")
            if not p.is_dir() or p.is_symlink()
        }


def test_version_comparison_follows_pms():
    ordered = [
        "1.0_alpha",
        "1.0_alpha1",
        "1.0_beta",
        "1.0_pre",
        "1.0_rc1",
        "1.0",
        "1.0-r1",
        "1.0_p1",
        "1.0a",
        "1.0.1",
        "1.01.1",
        "1.1",
        "1.2_alpha_p",
        "1.2",
        "2",
        "10",
    ]
    for i, a in enumerate(ordered):
        for j, b in enumerate(ordered):
            assert pd.version_cmp(a, b) == (i > j) - (i < j), (a, b)
    assert (
        pd.version_cmp("1.010", "1.01") == 0
    )  # PMS 3.3: trailing zeros after a leading zero


def test_tarball_and_binpkg_names_parse_as_portage_writes_them():
    assert pd.parse_tarball_name("dev-libs", "foo", "foo-1.2.3-r4-17-debug.tar.xz") == (
        "foo-1.2.3-r4",
        "1.2.3-r4",
        "17",
    )
    assert pd.parse_tarball_name("dev-libs", "foo", "foo-1.2.3-debug.tar.xz") == (
        "foo-1.2.3",
        "1.2.3",
        None,
    )
    assert pd.parse_tarball_name("dev-libs", "foo", "foo-bar-1-debug.tar.xz") is None
    assert pd.parse_tarball_name("dev-libs", "foo", "foo-1.tar.xz") is None
    assert pd.split_pf("foo-bar-1.2-r3") == ("foo-bar", "1.2-r3")
    assert pd.split_pf("hello-1.0-1") is None, "PN may not end in -VERSION: hello-1.0"


def test_prune_removes_only_orphans_and_keeps_by_every_rule(tmp_path):
    host = Binhost(tmp_path)
    host.tarball("dev-libs/foo/foo-1.0-1-debug.tar.xz")  # binpkg gone, old: removed
    host.tarball("dev-libs/foo/foo-1.1-2-debug.tar.xz")  # binpkg exists
    host.binpkg("dev-libs", "foo", "foo-1.1", "2")
    host.tarball("dev-libs/foo/foo-1.2-3-debug.tar.xz")  # installed instance
    host.installed("dev-libs", "foo-1.2", "3")
    host.tarball(
        "dev-libs/foo/foo-1.2-4-debug.tar.xz"
    )  # same PF, another BUILD_ID: removed
    host.tarball("dev-libs/bar/bar-2-5-debug.tar.xz")  # xpak binpkg exists
    host.binpkg("dev-libs", "bar", "bar-2", "5", "xpak")
    host.tarball("app-misc/old/old-1-debug.tar.xz")  # no BUILD_ID, tbz2 exists
    host.binpkg("app-misc", "old", "old-1", None, "tbz2")
    host.tarball("app-misc/old/old-0.9-debug.tar.xz")  # no BUILD_ID, nothing: removed
    host.tarball(
        "app-misc/gone/gone-3-debug.tar.xz"
    )  # removed, and app-misc/gone goes with it
    host.tarball("app-misc/young/young-1-1-debug.tar.xz", days_old=0.1)  # too young
    result = host.prune("--keep-newest", "0")
    removed = {
        line.split()[1]
        for line in result.stdout.splitlines()
        if line.startswith("removed ")
    }
    assert removed == {
        "dev-libs/foo/foo-1.0-1-debug.tar.xz",
        "dev-libs/foo/foo-1.2-4-debug.tar.xz",
        "app-misc/old/old-0.9-debug.tar.xz",
        "app-misc/gone/gone-3-debug.tar.xz",
    }
    assert host.left() == {
        "dev-libs/foo/foo-1.1-2-debug.tar.xz",
        "dev-libs/foo/foo-1.2-3-debug.tar.xz",
        "dev-libs/bar/bar-2-5-debug.tar.xz",
        "app-misc/old/old-1-debug.tar.xz",
        "app-misc/young/young-1-1-debug.tar.xz",
    }
    assert (
        not (host.root / "app-misc/gone").exists() and (host.root / "app-misc").is_dir()
    )
    assert re.search(r"^freed 52 B in 4 tarballs", result.stdout, re.MULTILINE)


def test_prune_keeps_the_newest_per_package_by_version(tmp_path):
    host = Binhost(tmp_path)
    for name in ("foo-1.9-1", "foo-1.10-2", "foo-1.10_rc1-3", "foo-1.2-4"):
        host.tarball(f"dev-libs/foo/{name}-debug.tar.xz")
    host.binpkg("dev-libs", "unrelated", "unrelated-1", "1")
    host.prune("--keep-newest", "2")
    assert host.left() == {
        "dev-libs/foo/foo-1.10-2-debug.tar.xz",
        "dev-libs/foo/foo-1.10_rc1-3-debug.tar.xz",
    }


def test_prune_dry_run_prints_the_same_plan_and_touches_nothing(tmp_path):
    host = Binhost(tmp_path)
    for i in range(3):
        host.tarball(f"dev-libs/foo/foo-{i}-1-debug.tar.xz")
    host.binpkg("dev-libs", "foo", "foo-2", "1")
    before = host.left()
    dry = host.prune("--keep-newest", "0", "--dry-run").stdout
    assert host.left() == before
    real = host.prune("--keep-newest", "0").stdout
    assert dry.replace("would remove", "removed").replace("would free", "freed") == real
    data = json.loads(host.prune("--json", "--dry-run").stdout)
    assert (
        data["dry_run"]
        and data["removed"] == []
        and data["kept"][0]["reason"].startswith("binary package")
    )


def test_prune_keeps_unrecognised_names_symlinks_and_temporary_files(tmp_path):
    host = Binhost(tmp_path)
    outside = tmp_path / "outside"
    (outside / "foo").mkdir(parents=True)
    (outside / "foo/foo-1-1-debug.tar.xz").write_bytes(b"outside")
    (host.root / "dev-libs").mkdir()
    (host.root / "dev-libs/linked").symlink_to(outside / "foo")
    host.tarball("dev-libs/foo/foo-1-1-debug.tar.xz")
    host.tarball("dev-libs/foo/foo-0-1-debug.tar.xz")
    (host.root / "dev-libs/foo/foo-2-1-debug.tar.xz").symlink_to(
        outside / "foo/foo-1-1-debug.tar.xz"
    )
    host.tarball("dev-libs/foo/README")
    host.tarball(
        "dev-libs/foo/bar-1-1-debug.tar.xz"
    )  # another package's name in foo's directory
    host.tarball("stray-debug.tar.xz")
    host.tarball("a/b/c/deep-1-debug.tar.xz")
    temp = host.tarball(
        "dev-libs/foo/.foo-3-1-debug.tar.xz.1a2b3c4d.tmp"
    )  # a pack writing now
    host.binpkg("dev-libs", "other", "other-1", "1")
    result = host.prune("--keep-newest", "1")
    out = result.stdout
    assert "--root should hold" not in result.stderr, "tarballs are where they belong"
    for name in (
        "dev-libs/linked",
        "dev-libs/foo/foo-2-1-debug.tar.xz",
        "dev-libs/foo/README",
        "dev-libs/foo/bar-1-1-debug.tar.xz",
        "stray-debug.tar.xz",
        "a/b/c",
    ):
        assert f"unrecognised, kept: {name}\n" in out, name
    assert "removed dev-libs/foo/foo-0-1-debug.tar.xz" in out
    assert (
        outside / "foo/foo-1-1-debug.tar.xz"
    ).read_bytes() == b"outside" and temp.exists()
    assert (host.root / "dev-libs/foo/foo-2-1-debug.tar.xz").is_symlink()


def test_prune_refuses_a_pkgdir_without_portage_layout(tmp_path):
    host = Binhost(tmp_path)
    host.tarball("app-misc/hello/hello-1.0-1-debug.tar.xz")
    host.tarball("app-misc/hello/hello-0.9-1-debug.tar.xz")
    empty = host.prune("--keep-newest", "0", check=False)
    assert (
        empty.returncode == 2
        and "holds no binary packages where Portage puts them" in empty.stderr
    )
    host.binpkg("app-misc", "hello", "hello-1.0", "1")
    too_deep = cli(
        "prune",
        "--root",
        host.root,
        "--pkgdir",
        host.pkgdir / "app-misc",
        "--vardb",
        host.vardb,
        "--keep-newest",
        "0",
        check=False,
    )
    assert (
        too_deep.returncode == 2
        and "is --pkgdir the directory that holds the categories" in too_deep.stderr
    )
    missing = cli(
        "prune",
        "--root",
        host.root,
        "--pkgdir",
        tmp_path / "nope",
        "--vardb",
        host.vardb,
        check=False,
    )
    assert missing.returncode == 2 and "--pkgdir" in missing.stderr
    assert host.left() == {
        "app-misc/hello/hello-1.0-1-debug.tar.xz",
        "app-misc/hello/hello-0.9-1-debug.tar.xz",
    }


def test_prune_accepts_binpkgs_only_where_portage_writes_them(tmp_path):
    host = Binhost(tmp_path)
    host.tarball("app-misc/a/a-1-1-debug.tar.xz")
    host.tarball("app-misc/b/b-1-1-debug.tar.xz")
    host.binpkg("app-misc", "b", "b-1", "1")  # CAT/PN/PF-BUILD_ID.gpkg.tar only
    assert (
        "removed app-misc/a/a-1-1-debug.tar.xz"
        in host.prune("--keep-newest", "0").stdout
    )
    deeper = Binhost(tmp_path / "deeper")
    deeper.tarball("app-misc/a/a-1-1-debug.tar.xz")
    make_gpkg(
        deeper.pkgdir / "extra", "app-misc", "b", "b-1", "1", {}
    )  # one level too deep
    refused = deeper.prune("--keep-newest", "0", check=False)
    assert refused.returncode == 2 and "where Portage puts them" in refused.stderr


def test_prune_trusts_portage_packages_index(tmp_path):
    host = Binhost(tmp_path)
    host.tarball("app-misc/hello/hello-1.0-1-debug.tar.xz")
    host.tarball("app-misc/hello/hello-1.1-1-debug.tar.xz")
    host.tarball("app-misc/hello/hello-0.9-1-debug.tar.xz")
    (host.pkgdir / "Packages").write_text(
        "CHOST: x86_64-pc-linux-gnu\nPACKAGES: 2\nTIMESTAMP: 1795830657\nVERSION: 0\n\n"
        "BUILD_ID: 1\nCPV: app-misc/hello-1.0\nPATH: app-misc/hello/hello-1.0-1.gpkg.tar\n\n"
        "BUILD_ID: 1\nCPV: app-misc/hello-1.1\nPATH: app-misc/hello/hello-1.1-1.gpkg.tar\n"
    )
    out = host.prune(
        "--keep-newest", "0"
    ).stdout  # no binpkg file at all: the index lists two
    assert "removed app-misc/hello/hello-0.9-1-debug.tar.xz" in out
    assert host.left() == {
        "app-misc/hello/hello-1.0-1-debug.tar.xz",
        "app-misc/hello/hello-1.1-1-debug.tar.xz",
    }


def test_prune_refuses_to_empty_most_packages_without_force(tmp_path):
    host = Binhost(tmp_path)
    for pn in ("a", "b", "c"):
        host.tarball(f"app-misc/{pn}/{pn}-1-1-debug.tar.xz")
    host.tarball("app-misc/d/d-1-1-debug.tar.xz")
    host.binpkg("app-misc", "d", "d-1", "1")
    dry = host.prune("--keep-newest", "0", "--dry-run")
    assert "would remove every tarball of 3 of 4 packages" in dry.stderr
    refused = host.prune("--keep-newest", "0", check=False)
    assert (
        refused.returncode == 2
        and "--force" in refused.stderr
        and "nothing was removed" in refused.stderr
    )
    assert len(host.left()) == 4
    host.prune("--keep-newest", "0", "--force")
    assert host.left() == {"app-misc/d/d-1-1-debug.tar.xz"}


def test_prune_warns_about_an_unreadable_vardb_build_id(tmp_path):
    host = Binhost(tmp_path)
    host.tarball("app-misc/x/x-1-1-debug.tar.xz")
    host.tarball("app-misc/y/y-1-2-debug.tar.xz")
    host.binpkg("app-misc", "y", "y-1", "2")
    (host.vardb / "app-misc/x-1/BUILD_ID").mkdir(parents=True)
    (host.vardb / "app-misc/y-1").mkdir(parents=True)
    (host.vardb / "app-misc/y-1/BUILD_ID").write_bytes(b"\xff\xfe")
    result = host.prune("--keep-newest", "0")
    no_traceback(result)
    assert f"{host.vardb / 'app-misc/x-1/BUILD_ID'}: unreadable" in result.stderr
    assert (
        f"{host.vardb / 'app-misc/y-1/BUILD_ID'}: unreadable (not UTF-8)"
        in result.stderr
    )


def test_prune_hints_at_the_layout_when_root_is_one_level_too_deep(tmp_path):
    host = Binhost(tmp_path)
    host.tarball("app-misc/hello/hello-0.9-1-debug.tar.xz")
    host.binpkg("app-misc", "hello", "hello-1.0", "1")
    result = cli(
        "prune",
        "--root",
        host.root / "app-misc",
        "--pkgdir",
        host.pkgdir,
        "--vardb",
        host.vardb,
    )
    assert "unrecognised, kept: hello/hello-0.9-1-debug.tar.xz" in result.stdout
    assert "--root should hold CAT/PN/PF-BUILD_ID-debug.tar.xz" in result.stderr
    assert "too deep" in result.stderr


def test_prune_rejects_a_negative_age():
    result = cli("prune", "--min-age", "-5", check=False)
    assert result.returncode == 2 and "must be 0 or more" in result.stderr


def test_two_prunes_at_once_remove_exactly_the_orphans(tmp_path):
    host = Binhost(tmp_path)
    expected = set()
    for i in range(300):
        rel = f"cat-{i % 7}/pkg{i % 13}/pkg{i % 13}-{i}-1-debug.tar.xz"
        host.tarball(rel)
        if i % 3 == 0:
            host.binpkg(f"cat-{i % 7}", f"pkg{i % 13}", f"pkg{i % 13}-{i}", "1", "xpak")
            expected.add(rel)
    command = [
        sys.executable,
        SCRIPT,
        "prune",
        "--root",
        host.root,
        "--pkgdir",
        host.pkgdir,
        "--vardb",
        host.vardb,
        "--keep-newest",
        "0",
        "--force",
        "-q",
    ]
    procs = [
        subprocess.Popen([str(c) for c in command], stderr=subprocess.PIPE, text=True)
        for _ in range(2)
    ]
    for proc in procs:
        assert proc.wait(timeout=120) == 0 and "Traceback" not in proc.stderr.read()
    assert host.left() == expected


def test_prune_beside_a_pack_loses_nothing(image, tmp_path):
    host = Binhost(tmp_path / "host")
    host.tarball(
        "app-misc/hello/hello-0.9-1-debug.tar.xz"
    )  # orphan: goes, emptying the directory
    host.binpkg("app-misc", "hello", "hello-1.0", "2")
    (image / "usr/lib/debug/usr/lib/blob").write_bytes(random_bytes(12 * MiB, 4))
    target = host.root / "app-misc/hello/hello-1.0-2-debug.tar.xz"
    pack_proc = subprocess.Popen(
        [sys.executable, SCRIPT, "pack", "--image", image, "--output", target, "-j1"],
        stderr=subprocess.PIPE,
        text=True,
        env=clean_env(),
    )
    deadline = time.monotonic() + 30
    while (
        not list((host.root / "app-misc/hello").glob(".*.tmp"))
        and time.monotonic() < deadline
    ):
        time.sleep(0.02)
    temps = list((host.root / "app-misc/hello").glob(".*.tmp"))
    assert temps, "the pack's temporary file never appeared"
    out = host.prune("--keep-newest", "0", "--force").stdout
    assert "removed app-misc/hello/hello-0.9-1-debug.tar.xz" in out
    assert temps[0].exists()
    assert pack_proc.wait(timeout=120) == 0, pack_proc.stderr.read()
    assert host.left() == {"app-misc/hello/hello-1.0-2-debug.tar.xz"}
    assert cli("verify", target).returncode == 0


# ---------------------------------------------------------------------------
# 6. binhost upkeep: settings
# ---------------------------------------------------------------------------


def test_settings_for_make_conf_say_where_each_line_goes():
    out = cli("settings").stdout
    lines = out.splitlines()
    for var, value, where in [
        ("UNINSTALL_IGNORE", "/usr/lib/debug/.tarball/*", "make.conf:"),
        ("PKG_INSTALL_MASK", "/usr/lib/debug/ /usr/src/debug/", "make.conf or bashrc:"),
    ]:
        i = lines.index(f'{var}="${{{var}}} {value}"')
        block_start = max(j for j in range(i) if lines[j] == "") + 1
        assert lines[block_start].startswith(f"# {where}"), var
        assert "without it" in " ".join(lines[block_start:i]), var
    assert "COLLISION_IGNORE" not in out, (
        "no real emerge needs it with packdebug's hook"
    )
    assert "INSTALL_MASK=" not in out.replace("PKG_INSTALL_MASK=", "")


def test_settings_dedup_only_mentions_the_install_mask_line_in_a_comment():
    out = cli("settings", "--dedup").stdout
    active = [line for line in out.splitlines() if not line.startswith("#")]
    assert not any(line.startswith("INSTALL_MASK") for line in active)
    assert f"# {pd.DEDUP_INSTALL_MASK}" in out
    assert "FEATURES=packdebug only" in out and "settings --bashrc --dedup" in out
    hook = cli("settings", "--bashrc", "--dedup").stdout
    assert "pack --remove-packed" in hook


def test_settings_shell_format_evaluates_in_bash_and_appends():
    need("bash")
    script = cli("settings", "--format", "shell").stdout
    out = run(
        "bash",
        "-c",
        'PKG_INSTALL_MASK="/usr/share/doc"; eval "$1"; '
        'printf "%s\\n" "$PKG_INSTALL_MASK" "$UNINSTALL_IGNORE"; env | grep -c "^UNINSTALL_IGNORE="',
        "-",
        script,
        text=True,
    ).stdout.splitlines()
    assert out == [
        "/usr/share/doc /usr/lib/debug/ /usr/src/debug/",
        "/usr/lib/debug/.tarball/*",
        "1",
    ]


def test_settings_json_lists_every_variable_with_where_and_why():
    data = json.loads(cli("settings", "--format", "json").stdout)
    assert data["portage"] == "3.0.83"
    assert [s["variable"] for s in data["settings"]] == [
        "UNINSTALL_IGNORE",
        "PKG_INSTALL_MASK",
    ]
    assert all(s["where"] and s["why"] and s["append"] for s in data["settings"])


def run_hook(
    snippet: str, env_lines: str, env: dict | None = None
) -> subprocess.CompletedProcess:
    """Run a bashrc hook the way ebuild.sh does: Portage's variables readonly, die()."""
    script = (
        f'{snippet}\ndie() {{ echo "die: $*" >&2; exit 1; }}\n'
        f"{env_lines}\ndeclare -r ED PORTAGE_BUILDDIR\npre_pkg_preinst\n"
    )
    return run("bash", "-c", script, env=clean_env(env), text=True, check=False)


def test_bashrc_hook_assigns_no_readonly_variable_and_packs(image, tmp_path):
    need("bash")
    snippet = cli("settings", "--bashrc").stdout
    assert "pre_pkg_preinst()" in snippet and "--remove-packed" not in snippet
    builddir = tmp_path / "build"
    (builddir / "build-info").mkdir(parents=True)
    (builddir / "build-info/BUILD_ID").write_text("7")
    result = run_hook(
        snippet,
        f"ED={image} CATEGORY=app-misc PN=hello PF=hello-1.0 PORTAGE_BUILDDIR={builddir}",
    )
    assert result.returncode == 0, result.stderr
    assert "readonly" not in result.stderr and result.stderr == ""
    assert (
        result.stdout.count("\n") == 1
        and "packed 5 files and 5 links (" in result.stdout
    )
    assert (
        image / "usr/lib/debug/.tarball/app-misc/hello/hello-1.0-7-debug.tar.xz"
    ).is_file()
    # Without binpkg-multi-instance: no BUILD_ID at all, and the hook still works.
    result = run_hook(
        snippet, f"ED={image} CATEGORY=app-misc PN=hello PF=hello-1.0 PORTAGE_BUILDDIR="
    )
    assert result.returncode == 0 and "no BUILD_ID" in result.stdout
    assert (
        image / "usr/lib/debug/.tarball/app-misc/hello/hello-1.0-debug.tar.xz"
    ).is_file()
    failing = run_hook(
        snippet, f"ED={tmp_path / 'none'} CATEGORY=app-misc PN=hello PF=hello-1.0"
    )
    assert failing.returncode == 1 and "die: packdebug could not pack" in failing.stderr


def test_settings_for_debuginfod_flags_require_debuginfod():
    for args in (("--listen", "127.0.0.1:9000"), ("--root", "/x"), ("--pkgdir", "/y")):
        result = cli("settings", *args, check=False)
        assert result.returncode == 2 and "go with --debuginfod" in result.stderr, args
    result = cli("settings", "--debuginfod", "--listen", "127.0.0.1:99999", check=False)
    assert result.returncode == 2 and "port 99999 is out of range" in result.stderr


def server_command(text: str) -> str:
    """The 'Server command line' that settings --debuginfod prints, joined."""
    lines = text.split("# Server command line:\n", 1)[1].split("\n\n", 1)[0]
    return lines.replace(" \\\n    ", " ")


def debuginfod_json(*args) -> dict:
    return json.loads(cli("settings", "--debuginfod", "--format", "json", *args).stdout)


def test_debuginfod_settings_follow_the_version(tmp_path):
    new = cli(
        "settings",
        "--debuginfod",
        "--debuginfod-version",
        "0.193",
        "--listen",
        "127.0.0.1:9000",
    ).stdout
    assert (
        "--listen-address=127.0.0.1 " in server_command(new)
        and "ALL addresses" not in new
    )
    old = cli("settings", "--debuginfod", "--debuginfod-version", "0.188").stdout
    assert "--listen-address" not in server_command(old)
    assert "listens on ALL" in old and "never seeks" in old
    assert 'DEBUGINFOD_URLS="http://127.0.0.1:9000"' in new
    assert "-Z .tar.xz /usr/lib/debug/.tarball" in server_command(new)
    assert "gdb -iex 'set debuginfod enabled on'" in new
    data = debuginfod_json("--debuginfod-version", "0.192")
    assert (
        data["argv"][0] == "debuginfod"
        and "-Z" in data["argv"]
        and data["client"]["DEBUGINFOD_URLS"]
    )


def test_debuginfod_settings_make_relative_paths_absolute(tmp_path):
    args = ("--root", "rel/dir", "--pkgdir", "./pk", "--database", "db.sqlite")
    data = json.loads(
        cli("settings", "--debuginfod", "--format", "json", *args, cwd=tmp_path).stdout
    )
    argv = data["argv"]
    assert str(tmp_path / "rel/dir") in argv and str(tmp_path / "pk") in argv
    assert f"--database={tmp_path / 'db.sqlite'}" in argv
    assert f" {tmp_path / 'rel/dir'} {tmp_path / 'pk'}\n" in data["unit"]


def test_debuginfod_unit_passes_systemd_analyze_verify(tmp_path):
    need("systemd-analyze")
    root, pkgdir = tmp_path / "tarballs", tmp_path / "binpkgs"
    root.mkdir()
    pkgdir.mkdir()
    data = debuginfod_json("--root", root, "--pkgdir", pkgdir)
    unit = tmp_path / "debuginfod.service"
    unit.write_text(data["unit"])
    result = run("systemd-analyze", "verify", "--man=no", unit, check=False, text=True)
    assert result.returncode == 0 and not result.stderr.strip(), result.stderr
    assert (
        f"BindReadOnlyPaths=-/usr/src/debug /usr/bin -/usr/lib64 /usr/lib -/bin {root} {pkgdir}"
        in data["unit"]
    )


# ---------------------------------------------------------------------------
# The real programs: debuginfod (Debian's, 0.192, 0.196), gdb, systemd, Portage
# ---------------------------------------------------------------------------


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def metrics(port: int) -> str:
    with urllib.request.urlopen(
        f"http://127.0.0.1:{port}/metrics", timeout=5
    ) as response:
        return response.read().decode()


@contextlib.contextmanager
def debuginfod(root: pathlib.Path, tmp_path: pathlib.Path, *extra_args: str):
    """Debian's debuginfod serving .tar.xz under root, scanned once."""
    need("debuginfod", "debuginfod-find")
    port = free_port()
    command = [
        "debuginfod",
        "-p",
        str(port),
        "-d",
        str(tmp_path / "db.sqlite"),
        "-t",
        "0",
        "-g",
        "0",
        *extra_args,
        "-Z",
        ".tar.xz",
        str(root),
    ]
    with (
        open(tmp_path / "debuginfod.log", "w") as log,
        subprocess.Popen(command, stdout=log, stderr=log) as proc,
    ):
        try:
            wait_for_scan(port, proc)
            yield port
        finally:
            proc.terminate()


def wait_for_scan(port: int, proc, timeout: float = 60) -> None:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        assert proc.poll() is None, "debuginfod exited"
        try:
            text = metrics(port)
        except OSError:
            time.sleep(0.2)
            continue
        traversed = re.search(r'thread_work_total\{role="traverse"\} (\d+)', text)
        pending = re.search(r'thread_work_pending\{role="scan"\} (\d+)', text)
        busy = re.search(r'thread_busy\{role="scan"\} (\d+)', text)
        if (
            traversed
            and int(traversed[1]) >= 1
            and pending
            and pending[1] == "0"
            and (not busy or busy[1] == "0")
        ):
            return
        time.sleep(0.2)
    raise AssertionError("debuginfod did not finish scanning")


def debuginfod_find(port: int, cache: pathlib.Path, *args: str) -> pathlib.Path:
    env = {
        **os.environ,
        "DEBUGINFOD_URLS": f"http://127.0.0.1:{port}",
        "DEBUGINFOD_CACHE_PATH": str(cache),
    }
    return pathlib.Path(
        run("debuginfod-find", *args, env=env, text=True).stdout.strip()
    )


def test_debian_debuginfod_serves_debuginfo_and_sources_from_the_tarball(
    image, tmp_path
):
    tarball = pack(image)
    hello_id = readelf_build_id(image / "usr/bin/hello")
    lib_id = readelf_build_id(image / "usr/lib/libgreet.so.1")
    with debuginfod(tarball.parents[2], tmp_path) as port:
        cache = tmp_path / "cache"
        run(
            "cmp",
            debuginfod_find(port, cache, "debuginfo", hello_id),
            debug_file(image),
        )
        got = debuginfod_find(port, cache, "debuginfo", lib_id)
        run("cmp", got, debug_file(image, "usr/lib/libgreet.so.1"))
        run(
            "cmp",
            debuginfod_find(port, cache, "source", hello_id, "/" + SOURCE),
            image / SOURCE,
        )


def test_printed_debuginfod_command_serves_tarballs_and_binpkg_executables(
    image, tmp_path
):
    need("debuginfod", "debuginfod-find", "bsdtar")
    host = Binhost(tmp_path / "host")
    tarball = pack(image)
    (host.root / "app-misc/hello").mkdir(parents=True)
    shutil.copy(tarball, host.root / "app-misc/hello" / tarball.name)
    make_gpkg(
        host.pkgdir,
        "app-misc",
        "hello",
        "hello-1.0",
        "1",
        {"usr/bin/hello": (image / "usr/bin/hello").read_bytes()},
    )
    port = free_port()
    text = cli(
        "settings",
        "--debuginfod",
        "--listen",
        f"127.0.0.1:{port}",
        "--root",
        host.root,
        "--pkgdir",
        host.pkgdir,
        "--database",
        tmp_path / "db.sqlite",
    ).stdout
    with (
        open(tmp_path / "debuginfod.log", "w") as log,
        subprocess.Popen(
            ["sh", "-c", f"exec {server_command(text)}"], stdout=log, stderr=log
        ) as proc,
    ):
        try:
            wait_for_scan(port, proc)
            deadline = time.monotonic() + 60
            while 'scanned_files_total{source=".gpkg.tar archive"} 1' not in metrics(
                port
            ):
                assert time.monotonic() < deadline, "the .gpkg.tar was never scanned"
                time.sleep(0.2)
            hello_id = readelf_build_id(image / "usr/bin/hello")
            url = re.search(r'DEBUGINFOD_URLS="([^"]+)"', text)[1]
            env = {
                **os.environ,
                "DEBUGINFOD_URLS": url,
                "DEBUGINFOD_CACHE_PATH": str(tmp_path / "cache"),
            }
            got = run(
                "debuginfod-find", "debuginfo", hello_id, env=env, text=True
            ).stdout.strip()
            run("cmp", got, debug_file(image))
            got = run(
                "debuginfod-find", "executable", hello_id, env=env, text=True
            ).stdout.strip()
            run("cmp", got, image / "usr/bin/hello")
        finally:
            proc.terminate()


@contextlib.contextmanager
def harness_debuginfod(
    root: pathlib.Path, chroot: str = "trixie", *extra: str, listen_all: bool = False
):
    """debuginfod from a harness chroot: 0.192 (trixie) or 0.196 (sid)."""
    need_harness(
        HARNESS / chroot / "usr/bin/debuginfod", f"debuginfod harness chroot {chroot}"
    )
    port = free_port()
    env = {**os.environ, "HARNESS_ROOT": str(HARNESS / chroot)}
    if listen_all:
        env["LISTEN_ALL"] = "1"
    pid = run(
        HARNESS / "run-debuginfod.sh", root, port, *extra, env=env, text=True
    ).stdout.strip()
    try:
        run(HARNESS / "wait-scan.sh", port, 120)
        yield port, HARNESS / chroot / f"tmp/debuginfod-{port}/debuginfod.log"
    finally:
        run(HARNESS / "stop-debuginfod.sh", pid, check=False, env=env)


def assert_served_by_seeking(
    root, tarball, debug_files: dict, chroot: str = "trixie", *extra, **kw
) -> str:
    """The harness debuginfod calls the tarball seekable and seeks to serve each file."""
    with harness_debuginfod(root, chroot, *extra, **kw) as (port, log):
        env = {**os.environ, "HARNESS_ROOT": str(HARNESS / chroot)}
        for build_id, expected in debug_files.items():
            got = run(
                HARNESS / "find.sh", port, "debuginfo", build_id, env=env, text=True
            ).stdout.strip()
            try:
                run("cmp", got, expected)
            finally:
                shutil.rmtree(
                    next(
                        p
                        for p in pathlib.Path(got).parents
                        if p.name.startswith("find-cache.")
                    )
                )
        text = log.read_text()
        served = re.search(
            r'http_responses_total\{result="seekable xz archive"\} (\d+)', metrics(port)
        )
        listening = run("ss", "-Hltn", f"sport = :{port}", text=True).stdout
    assert f"{tarball.name} is seekable" in text
    assert re.search(rf"{re.escape(tarball.name)} has \d+ xz Blocks", text)
    assert "seeking in xz archive" in text
    assert served and int(served[1]) == len(debug_files)
    return text + "\n" + listening


def hello_ids(image: pathlib.Path) -> dict:
    return {
        readelf_build_id(image / "usr/bin/hello"): debug_file(image),
        readelf_build_id(image / "usr/lib/libgreet.so.1"): debug_file(
            image, "usr/lib/libgreet.so.1"
        ),
    }


@pytest.mark.parametrize("chroot", ["trixie", "sid"])
def test_debuginfod_0192_and_0196_seek_in_a_one_binary_tarball(image, chroot):
    tarball = pack(image)
    assert_served_by_seeking(tarball.parents[2], tarball, hello_ids(image), chroot)


def test_debuginfod_0196_listen_address_binds_only_loopback(image):
    tarball = pack(image)
    listen = server_command(
        cli("settings", "--debuginfod", "--debuginfod-version", "0.196").stdout
    )
    flag = next(a for a in listen.split() if a.startswith("--listen-address="))
    assert flag == "--listen-address=127.0.0.1"
    out = assert_served_by_seeking(
        tarball.parents[2], tarball, hello_ids(image), "sid", flag, listen_all=True
    )
    sockets = [
        line.split()[3] for line in out.splitlines() if line.startswith("LISTEN")
    ]
    assert sockets and all(s.startswith("127.0.0.1:") for s in sockets), sockets


@pytest.mark.parametrize("chroot", ["trixie", "sid"])
def test_debuginfod_0192_and_0196_seek_in_a_large_tarball(image, tmp_path, chroot):
    ids = {readelf_build_id(image / "usr/bin/hello"): debug_file(image)}
    for seed in range(3):
        target = image / f"usr/lib/debug/usr/lib/big{seed}.so.debug"
        shutil.copy(elf_with_section(tmp_path, 6 * MiB, seed=10 + seed), target)
        ids[readelf_build_id(target)] = target
    tarball = pack(image, "-0", "--block-size", "1MiB")
    assert len(xz_blocks(tarball)) > 4
    log = assert_served_by_seeking(tarball.parents[2], tarball, ids, chroot)
    offsets = [
        int(m)
        for m in re.findall(
            r"seeking in xz archive \S+ offset=\d+ block_offset=(\d+)", log
        )
    ]
    assert any(offsets), (
        "a file deep in the archive is served from a later block, not from the start"
    )


@pytest.mark.parametrize("chroot", ["trixie", "sid"])
def test_debuginfod_0192_and_0196_seek_in_a_repacked_portage_tarball(
    image, tmp_path, chroot
):
    root = tmp_path / "root"
    (root / "app-misc/hello").mkdir(parents=True)
    tarball = portage_tarball(image, root / "app-misc/hello/hello-1.0-1-debug.tar.xz")
    cli("repack", tarball)
    assert_served_by_seeking(root, tarball, hello_ids(image), chroot)


def test_gdb_debugs_a_stripped_binary_through_debuginfod(image, tmp_path):
    """gdb (Debian unstable) fetches symbols and sources of the shared library."""
    sid = HARNESS / "sid"
    need_harness(sid / "usr/bin/gdb", "gdb in the sid chroot (setup-latest.sh)")
    tarball = pack(image)
    with harness_debuginfod(tarball.parents[2], "sid") as (port, _):
        work = tmp_path / "gdb"
        work.mkdir()
        copy_tree(
            image / "usr", work / "usr"
        )  # in-latest.sh binds the current directory
        shutil.rmtree(work / "usr/lib/debug")
        shutil.rmtree(work / "usr/src")
        command = [
            "env",
            f"DEBUGINFOD_URLS=http://127.0.0.1:{port}",
            f"DEBUGINFOD_CACHE_PATH={work}/cache",
            f"LD_LIBRARY_PATH={work}/usr/lib",
            "gdb",
            "-batch",
            "-nx",
            "-iex",
            "set debuginfod enabled on",
            "-ex",
            "break greet",
            "-ex",
            "run",
            "-ex",
            "info line greet",
            "-ex",
            "list greet",
            f"{work}/usr/bin/hello",
        ]
        result = run(
            HARNESS / "in-latest.sh", *command, cwd=work, text=True, check=False
        )
    assert re.search(
        r"Breakpoint 1, greet \(who=.*\) at greet\.c:\d+", result.stdout
    ), result.stdout
    assert "greet.c" in result.stdout and "printf" in result.stdout, (
        "list shows the source"
    )
    late = [("-ex" if c == "-iex" else c) for c in command]
    late = run(HARNESS / "in-latest.sh", *late, cwd=work, text=True, check=False)
    assert "answered N" in late.stdout + late.stderr, (
        "with -ex gdb says no to debuginfod itself"
    )


def systemd_run_unit(tmp_path: pathlib.Path) -> pathlib.Path:
    """The harness's run-unit.sh, waiting for systemd's bus socket before it asks.

    The shipped script asks `systemctl is-system-running --wait` as soon as
    PID 1 is systemd, which fails at once when /run/systemd/private does not
    exist yet ("Failed to connect to system scope bus"); this copy waits.
    """
    script = (SHARED_TOOLS / "systemd-harness/run-unit.sh").read_text()
    marker = "# 3. wait for the boot to finish\n"
    wait = (
        "for _ in $(seq $((BOOT_TIMEOUT * 5))); do\n"
        "\tinside test -S /run/systemd/private 2>/dev/null && break\n"
        '\tkill -0 "$pid1" 2>/dev/null || break\n\tsleep 0.2\ndone\n'
    )
    if "/run/systemd/private" not in script:
        script = script.replace(marker, marker + wait)
    copy = tmp_path / "run-unit.sh"
    copy.write_text(
        script.replace(
            'here=$(cd "$(dirname "${BASH_SOURCE[0]}")" && pwd)',
            f"here={SHARED_TOOLS / 'systemd-harness'}",
        )
    )
    copy.chmod(0o755)
    return copy


@pytest.mark.parametrize("version", ["0.192", "0.196"])
def test_printed_unit_starts_under_systemd_and_serves(image, tmp_path, version):
    tree = pathlib.Path("/var/tmp/systemd-harness/sid")
    need_harness(
        tree / "usr/lib/systemd/systemd",
        "systemd harness tree (systemd-harness/setup.sh)",
    )
    need_root()
    port = 18000 + os.getpid() % 1000
    tarball = pack(image)
    pkgdir = tmp_path / "binpkgs"
    make_gpkg(
        pkgdir,
        "app-misc",
        "hello",
        "hello-1.0",
        "1",
        {"usr/bin/hello": (image / "usr/bin/hello").read_bytes()},
    )
    args = ["--debuginfod-version", version, "--listen", f"127.0.0.1:{port}"]
    unit = pd.DebuginfodSetup(
        "/usr/lib/debug/.tarball",
        "/var/cache/binpkgs",
        "127.0.0.1",
        port,
        (0, int(version[2:])),
        "",
    ).unit()
    printed = json.loads(
        cli("settings", "--debuginfod", "--format", "json", *args).stdout
    )["unit"]
    assert printed == unit
    unit_file = tmp_path / f"packdebug-test-{os.getpid()}.service"
    unit_file.write_text(printed)
    shutil.rmtree(
        tree / "var/cache/private/debuginfod", ignore_errors=True
    )  # a cold database
    hello_id = readelf_build_id(image / "usr/bin/hello")
    expected = hashlib.sha256(debug_file(image).read_bytes()).hexdigest()
    env = {
        **os.environ,
        "BIND": f"{tarball.parents[2]}:/usr/lib/debug/.tarball {pkgdir}:/var/cache/binpkgs",
        # Until the first scan has found both (a cache per try: the client
        # remembers a miss), then fetch each once.
        "CMD": f"export DEBUGINFOD_URLS=http://127.0.0.1:{port}; "
        "for i in $(seq 300); do "
        f"DEBUGINFOD_CACHE_PATH=/tmp/try$i debuginfod-find debuginfo {hello_id} && "
        f"DEBUGINFOD_CACHE_PATH=/tmp/try$i debuginfod-find executable {hello_id} && "
        "break; sleep 0.2; done >/dev/null 2>&1; ss -Hltn; "
        f"DEBUGINFOD_CACHE_PATH=/tmp/c debuginfod-find debuginfo {hello_id} | xargs sha256sum; "
        f"DEBUGINFOD_CACHE_PATH=/tmp/c debuginfod-find executable {hello_id} | xargs sha256sum",
    }
    result = run(
        systemd_run_unit(tmp_path),
        unit_file,
        port,
        env=env,
        text=True,
        check=False,
        timeout=300,
    )
    assert result.returncode == 0, result.stdout + result.stderr
    assert f"{expected}  /tmp/c/{hello_id}/debuginfo" in result.stdout
    exe = hashlib.sha256((image / "usr/bin/hello").read_bytes()).hexdigest()
    assert f"{exe}  /tmp/c/{hello_id}/executable" in result.stdout, (
        "the gpkg decoder ran"
    )
    listening = re.findall(r"\|\s+LISTEN\s+\d+\s+\d+\s+(\S+)", result.stdout)
    if version == "0.196":
        assert listening == [f"127.0.0.1:{port}"], listening
    else:
        assert listening and all(
            a.startswith(("*:", "0.0.0.0:", "[::]:")) for a in listening
        ), listening


# Real Portage 3.0.83 (../shared/tools/portage-harness), with what `settings` prints.

PORTAGE_CHROOT = HARNESS / "trixie"
SESSION = r"""
set -u
. /opt/portage-harness/lib.sh || exit 125
ph_repo "$WD" && ph_config "$WD" || exit 125
cp "$WD/input/bashrc" "$WD/cfg/etc/portage/bashrc"
cat "$WD/input/make.conf.extra" >> "$WD/cfg/etc/portage/make.conf"
ph_mount "$WD" || exit 125
n=0
while IFS= read -r step; do
	n=$((n+1)); log=$WD/logs/step-$n.log
	if [ "${step#!}" != "$step" ]; then
		( cd "$WD" && PATH=$WD/bin:$PATH && eval "${step#!}" ) > "$log" 2>&1; rc=$?
	else
		PH_NICE= ph_emerge "$WD" $step > "$log" 2>&1; rc=$?
	fi
	echo "$rc" > "$WD/logs/step-$n.rc"
	[ $rc = 0 ] || exit $rc
done < "$WD/input/steps"
"""


class PortageRun:
    """One Portage session in the harness chroot: its work dir and how it went."""

    def __init__(
        self, name: str, steps: list[str], bashrc=("--bashrc",), make_conf=None
    ) -> None:
        self.name, self.steps = name, steps
        self.wd = f"/var/tmp/portage-harness/packdebug-test-{name}"
        self.w = pathlib.Path(str(PORTAGE_CHROOT) + self.wd)
        shutil.rmtree(self.w, ignore_errors=True)
        (self.w / "input").mkdir(parents=True)
        # Installed the README's way: the hook then runs the launcher.
        run(
            "make",
            "-s",
            "-C",
            HERE,
            "install",
            f"DESTDIR={PORTAGE_CHROOT}",
            f"PREFIX={self.wd}",
            "PYTHON=/usr/bin/python3",
            stdout=subprocess.DEVNULL,
        )
        printed = lambda *a: (
            run(
                "chroot",
                PORTAGE_CHROOT,
                f"{self.wd}/bin/packdebug",
                "settings",
                *a,
                text=True,
            ).stdout
        )
        self.settings = printed()
        (self.w / "input/bashrc").write_text(printed(*bashrc))
        (self.w / "input/make.conf.extra").write_text(
            make_conf(self.settings) if callable(make_conf) else self.settings
        )
        (self.w / "input/steps").write_text("\n".join(steps) + "\n")
        self.proc = subprocess.Popen(
            [
                SHARED_TOOLS / "portage-harness/in-chroot.sh",
                f"WD={self.wd}",
                "/bin/bash",
                "-c",
                SESSION,
            ],
            stdout=subprocess.PIPE,
            stderr=subprocess.STDOUT,
            text=True,
        )
        self.output = ""

    def wait(self) -> PortageRun:
        if self.proc.returncode is None:
            self.output = self.proc.communicate(timeout=900)[0]
        return self

    def rc(self, step: int) -> int | None:
        path = self.w / f"logs/step-{step}.rc"
        return int(path.read_text()) if path.exists() else None

    def build_logs(self) -> dict:
        return {
            p.name: p.read_text(errors="replace")
            for p in sorted((self.w / "buildlogs").glob("*.log"))
        }

    def tarballs(self) -> set:
        root = self.w / "root/usr/lib/debug/.tarball"
        return {p.name for p in root.rglob("*.tar.xz")} if root.exists() else set()

    def binpkg_image(self, pf: str, build_id: str = "1") -> list[str]:
        """The names in a binpkg's image.tar.zst."""
        gpkg = f"{self.wd}/pkgdir/app-misc/hello/{pf}-{build_id}.gpkg.tar"
        out = run(
            "chroot",
            PORTAGE_CHROOT,
            "sh",
            "-c",
            f"tar -xOf {gpkg} {pf}-{build_id}/image.tar.zst | zstd -dc | tar -t",
            text=True,
        )
        return out.stdout.split()


def without(variable: str):
    return lambda text: "\n".join(
        line for line in text.splitlines() if not line.startswith(variable + "=")
    )


@pytest.fixture(scope="module")
def portage():
    """Every Portage scenario, started at once in its own work dir (about a minute)."""
    need_harness(
        PORTAGE_CHROOT / "opt/portage-harness/portage.env",
        "Portage harness (portage-harness/setup.sh)",
    )
    need_root()
    hello = lambda v: f"--oneshot =app-misc/hello-{v}"
    fix_index = "ph_portage $WD emaint binhost --fix"
    prune = (
        "packdebug prune --root root/usr/lib/debug/.tarball --pkgdir pkgdir --vardb root/var/db/pkg "
        "--min-age 0 --keep-newest 0 --force --dry-run --json > prune.json"
    )
    runs = {
        "hook": PortageRun(
            "hook",
            [
                hello("1.0"),
                hello("1.1"),
                f"!rm pkgdir/app-misc/hello/hello-1.0-1.gpkg.tar && {fix_index}",
                f"!{prune}",
                "--unmerge app-misc/hello",
                f"!rm pkgdir/app-misc/hello/hello-1.1-1.gpkg.tar && {fix_index}",
                "!FEATURES=collision-protect PH_NICE= ph_emerge $WD --oneshot =app-misc/hello-1.1",
            ],
        ),
        "no-uninstall-ignore": PortageRun(
            "no-uninstall-ignore",
            [hello("1.0"), hello("1.1")],
            make_conf=without("UNINSTALL_IGNORE"),
        ),
        "no-pkg-install-mask": PortageRun(
            "no-pkg-install-mask", [hello("1.0")], make_conf=without("PKG_INSTALL_MASK")
        ),
        "install-mask": PortageRun(
            "install-mask",
            [hello("1.0")],
            make_conf=lambda s: s + "\n" + pd.DEDUP_INSTALL_MASK + "\n",
        ),
        "dedup": PortageRun("dedup", [hello("1.0")], bashrc=("--bashrc", "--dedup")),
        "binpkg": PortageRun(
            "binpkg",
            [
                hello("1.0"),
                "!rm -rf root && mkdir root",
                "--usepkgonly --oneshot =app-misc/hello-1.0",
            ],
        ),
    }
    yield {name: r.wait() for name, r in runs.items()}


def test_real_portage_hook_packs_with_no_error_in_any_build_log(portage):
    hook = portage["hook"]
    bashrc = (hook.w / "input/bashrc").read_text()
    assert f"exec {hook.wd}/bin/packdebug pack" in bashrc, "the installed launcher"
    assert [hook.rc(i) for i in range(1, 8)] == [0] * 7, hook.output
    logs = hook.build_logs()
    assert len(logs) == 3  # 1.0, 1.1, and 1.1 again
    for name, text in logs.items():
        assert "readonly variable" not in text, name
        assert "packdebug: error" not in text and "Traceback" not in text, name
        packed = [line for line in text.splitlines() if line.startswith("packdebug: ")]
        assert len(packed) == 1 and packed[0].startswith("packdebug: packed "), (
            name,
            packed,
        )
        assert "/usr/lib/debug/.tarball/app-misc/hello/hello-1." in packed[0]
        assert "ETA" not in text, "no progress line in a build log"


def test_real_portage_keeps_the_old_tarball_across_an_upgrade_only_with_uninstall_ignore(
    portage,
):
    with_it = portage["hook"]
    assert {
        "hello-1.0-1-debug.tar.xz",
        "hello-1.1-1-debug.tar.xz",
    } <= with_it.tarballs()
    without_it = portage["no-uninstall-ignore"]
    assert [without_it.rc(1), without_it.rc(2)] == [0, 0], without_it.output
    assert without_it.tarballs() == {"hello-1.1-1-debug.tar.xz"}, (
        "the upgrade deleted 1.0's tarball"
    )


def test_real_portage_needs_no_collision_ignore_for_the_hook(portage):
    hook = portage["hook"]
    assert "COLLISION_IGNORE" not in hook.settings
    assert hook.rc(5) == 0 and hook.tarballs() >= {"hello-1.1-1-debug.tar.xz"}
    # Step 7 rebuilt 1.1 with BUILD_ID 1 again under FEATURES=collision-protect,
    # while step 5's unmerge had left its tarball behind, owned by nothing.
    assert hook.rc(7) == 0, (hook.w / "logs/step-7.log").read_text()[-3000:]
    contents = (hook.w / "root/var/db/pkg/app-misc/hello-1.1/CONTENTS").read_text()
    assert "/usr/lib/debug/.tarball/app-misc/hello/hello-1.1-1-debug.tar.xz" in contents


def test_real_portage_binpkgs_carry_no_debug_info_only_with_pkg_install_mask(portage):
    names = portage["hook"].binpkg_image("hello-1.1")
    assert names and not [
        n for n in names if "/usr/lib/debug/" in n or "/usr/src/debug/" in n
    ]
    without_it = portage["no-pkg-install-mask"].binpkg_image("hello-1.0")
    assert [n for n in without_it if n.startswith("image/usr/lib/debug/")], without_it


def test_real_portage_install_mask_leaves_nothing_to_pack_and_the_hook_warns(portage):
    masked = portage["install-mask"]
    assert masked.rc(1) == 0 and masked.tarballs() == set()
    (log,) = masked.build_logs().values()
    assert (
        "packdebug: warning: nothing to pack" in log
        and "INSTALL_MASK removed them" in log
    )


def test_real_portage_dedup_hook_keeps_only_the_tarball(portage):
    dedup = portage["dedup"]
    assert dedup.rc(1) == 0 and dedup.tarballs() == {"hello-1.0-1-debug.tar.xz"}
    debug = dedup.w / "root/usr/lib/debug"
    assert sorted(p.name for p in debug.iterdir()) == [".tarball"]
    assert not (dedup.w / "root/usr/src/debug").exists()
    contents = (dedup.w / "root/var/db/pkg/app-misc/hello-1.0/CONTENTS").read_text()
    assert (
        "obj /usr/lib/debug/.tarball/app-misc/hello/hello-1.0-1-debug.tar.xz"
        in contents
    )
    assert "/usr/lib/debug/usr/" not in contents


def test_real_portage_binpkg_install_is_silent(portage):
    binpkg = portage["binpkg"]
    assert [binpkg.rc(i) for i in (1, 2, 3)] == [0, 0, 0], binpkg.output
    assert binpkg.tarballs() == set()
    log = (binpkg.w / "logs/step-3.log").read_text()
    assert ">>> Installing (1 of 1) app-misc/hello-1.0" in log
    assert "packdebug:" not in log, "a binpkg has no debug info: nothing to say"


def test_prune_on_the_pkgdir_and_vardb_portage_wrote(portage):
    hook = portage["hook"]
    plan = json.loads((hook.w / "prune.json").read_text())
    assert [d["path"] for d in plan["removed"]] == [
        "app-misc/hello/hello-1.0-1-debug.tar.xz"
    ]
    kept = {d["path"]: d["reason"] for d in plan["kept"]}
    assert kept == {
        "app-misc/hello/hello-1.1-1-debug.tar.xz": kept[
            "app-misc/hello/hello-1.1-1-debug.tar.xz"
        ]
    }
    assert "exists" in kept["app-misc/hello/hello-1.1-1-debug.tar.xz"]


# ---------------------------------------------------------------------------
# 7. command line
# ---------------------------------------------------------------------------

COMMANDS = (
    "pack",
    "buildid",
    "list",
    "verify",
    "extract",
    "find",
    "repack",
    "prune",
    "settings",
)


def help_examples(command: str) -> list[str]:
    """The example commands of `packdebug COMMAND --help`, joined and without comments."""
    text = cli(command, "--help").stdout.split("examples:\n", 1)[1]
    examples, current = [], ""
    for line in text.splitlines():
        current += line.strip() + " "
        if not line.rstrip().endswith("\\"):
            examples.append(current.replace("\\ ", "").split("  #")[0].strip())
            current = ""
    return [e for e in examples if e]


def test_help_of_every_command_teaches_with_examples():
    for command in COMMANDS:
        text = cli(command, "--help").stdout
        examples = help_examples(command)
        assert examples and all(e.startswith("packdebug ") for e in examples), command
        for option in re.findall(r"^  (--[a-z-]+)", text, re.MULTILINE):
            assert re.search(rf"^  {option}[^\n]*\n?\s+\S", text, re.MULTILINE), (
                command,
                option,
            )


def test_verbose_and_quiet_are_offered_only_where_they_mean_something():
    for command in COMMANDS:
        text = cli(command, "--help").stdout
        if command in ("buildid", "find", "settings"):
            assert "--verbose" not in text and "--quiet" not in text, command
        else:
            assert "--verbose" in text or "--quiet" in text, command
            assert "list each file" not in text or command == "pack", command


EXAMPLES_ROOT = """\
set -e
# Nothing mounted here may reach the host: private, or (in a chroot, where /
# is no mount point) already in a namespace with no shared mount.
mount --make-rprivate / 2>/dev/null || ! grep -q " shared:" /proc/self/mountinfo || exit 99
mount -t tmpfs tmpfs /var
mkdir -p /var/tmp/portage/app-misc/hello-1.0/image /var/cache/binpkgs /var/db/pkg /var/bin
mount --bind "$DEMO" /var/tmp/portage/app-misc/hello-1.0/image
mount --bind "$DEMO/usr/lib/debug" /usr/lib/debug
cp -a "$PKGDIR"/. /var/cache/binpkgs/
printf '#!/bin/sh\\nexec %s %s "$@"\\n' "$PYTHON" "$SCRIPT" > /var/bin/packdebug
chmod 755 /var/bin/packdebug
mount -t tmpfs tmpfs /tmp
cd /tmp
export PATH=/var/bin:$PATH
export ED=/var/tmp/portage/app-misc/hello-1.0/image CATEGORY=app-misc PN=hello PF=hello-1.0 BUILD_ID=1
set +e
eval "$EXAMPLE"
"""


def test_extract_all_and_directory_go_together(image, tmp_path):
    tarball = pack(image)
    member = "usr/lib/debug/usr/bin/hello.debug"
    for args in (
        ("--all",),
        ("--member", member, "-C", tmp_path / "d"),
        ("--all", "-C", tmp_path / "d", "-o", tmp_path / "f"),
    ):
        result = cli("extract", tarball, *args, check=False)
        assert result.returncode == 2, (args, result.stderr)
        assert "--all goes with -C DIR" in result.stderr, args
    assert not (tmp_path / "d").exists() and not (tmp_path / "f").exists()


def test_make_install_runs_compiled_bytecode_and_uninstall_removes_it(image, tmp_path):
    """The launcher imports packdebug.py from LIBDIR, where its bytecode is compiled."""
    prefix = tmp_path / "prefix"
    make = ["make", "-s", "-C", HERE, f"PREFIX={prefix}", f"PYTHON={sys.executable}"]
    run(*make, "install")
    launcher, library = prefix / "bin/packdebug", prefix / "lib/packdebug"
    (bytecode,) = (library / "__pycache__").glob("packdebug.*.pyc")
    compiled = bytecode.stat().st_mtime_ns
    assert (library / "packdebug.py").read_bytes() == SCRIPT.read_bytes()
    tarball = pack(image)
    listed = run(launcher, "list", tarball, env=clean_env(None), text=True).stdout
    assert listed == cli("list", tarball).stdout and "hello" in listed
    assert bytecode.stat().st_mtime_ns == compiled, (
        "run from its bytecode, not recompiled"
    )
    hook = run(launcher, "settings", "--bashrc", text=True).stdout
    assert f"exec {launcher} pack" in hook, "the hook runs the launcher, not the module"
    assert f"exec {SCRIPT} pack" in cli("settings", "--bashrc").stdout
    run(*make, "uninstall")
    assert not launcher.exists() and not library.exists()


def test_every_help_example_runs_as_written_on_the_demo_image(image, tmp_path):
    """In a private mount namespace where /usr/lib/debug, /var and /tmp are the demo's."""
    need_root()
    need("unshare")
    pack(image)
    pkgdir = tmp_path / "binpkgs"
    make_gpkg(pkgdir, "app-misc", "hello", "hello-1.0", "1", {"usr/bin/hello": b"x"})
    os.makedirs("/usr/lib/debug", exist_ok=True)
    env = clean_env(
        {
            "DEMO": str(image),
            "PKGDIR": str(pkgdir),
            "PYTHON": sys.executable,
            "SCRIPT": str(SCRIPT),
        }
    )
    failures = []
    for command in COMMANDS:
        for example in help_examples(command):
            if re.search(r">> /etc/portage/\S+$", example):
                example = example.rsplit(">>", 1)[
                    0
                ]  # no /etc/portage on this host to append to
            result = run(
                "unshare",
                "--mount",
                "--propagation",
                "unchanged",
                "sh",
                "-c",
                EXAMPLES_ROOT,
                env={**env, "EXAMPLE": example},
                text=True,
                check=False,
            )
            if (
                result.returncode != 0
                or "Traceback" in result.stderr
                or "error" in result.stderr
            ):
                failures.append((example, result.returncode, result.stderr[-500:]))
    assert not failures, failures


def test_usage_errors_exit_2_and_name_the_rule():
    cases = {
        ("pack", "--jobs", "many"): "is not a number: 0 (all CPUs) or more",
        ("pack", "-j", "-1"): "must be 0 (all CPUs) or more, not -1",
        ("pack", "--jobs=-3"): "must be 0 (all CPUs) or more, not -3",
        ("pack", "--block-size", "huge"): "not a size",
        ("pack", "--block-size", "1"): "1 is too small: at least 256.0 KiB",
        ("pack", "--block-size", "0"): "0 is too small",
        ("pack", "--block-size", "2GiB"): "2GiB is too large: at most 512.0 MiB",
        ("prune", "--min-age", "-5"): "-5 days: must be 0 or more",
        ("prune", "--keep-newest", "-1"): "argument --keep-newest",
        ("settings", "--listen", "nowhere"): "is not ADDRESS:PORT",
        (
            "settings",
            "--debuginfod",
            "--listen",
            "[::1]:65536",
        ): "port 65536 is out of range",
        ("list", "a.tar.xz", "--nope"): "unrecognized arguments: --nope",
    }
    for args, message in cases.items():
        result = cli(*args, check=False)
        assert result.returncode == 2 and message in result.stderr, (
            args,
            result.stderr,
        )
        no_traceback(result)


def test_parse_size_accepts_the_usual_spellings():
    sizes = ("8MiB", "8M", "8m", "512k", "1048576", "1GiB")
    assert [pd.parse_size(s) for s in sizes] == [
        8 << 20,
        8 << 20,
        8 << 20,
        512 << 10,
        1 << 20,
        1 << 30,
    ]


def test_jobs_are_capped_by_cpus_and_memory_and_verbose_says_so(image, tmp_path):
    result = cli(
        "pack",
        "--image",
        image,
        "--output",
        tmp_path / "t-debug.tar.xz",
        "-j",
        "1000",
        "-v",
    )
    cpus = pd.available_cpus()
    assert (
        f"compressing on {pd.plural(cpus, 'thread')} (-j 1000, limited by {pd.plural(cpus, 'CPU')})"
        in result.stdout
    )
    options = pd.PackOptions(preset=9, jobs=1000)
    jobs, _ = options.threads()
    per_job = pd.PRESET_ENCODER_MEMORY[9] + 2 * options.block_size
    assert jobs <= max(1, pd.physical_memory() // 4 // per_job) and jobs <= cpus


def test_messages_name_the_actual_mistake(image, tmp_path):
    (tmp_path / "afile").write_text("x")
    tarball = pack(image)
    cases = [
        (
            ("pack", "--image", tmp_path / "afile", *PACK_NAMES),
            2,
            "is a regular file, not a directory",
        ),
        (
            ("pack", "--image", image / "usr/lib/debug", *PACK_NAMES),
            2,
            "looks like a usr/lib/debug tree itself",
        ),
        (
            ("pack", "--image", image / "usr", *PACK_NAMES),
            2,
            "looks like a usr tree itself",
        ),
        (
            (
                "pack",
                "--image",
                image,
                "--category",
                "app-misc",
                "--pn",
                "calc",
                "--pf",
                "hello-1.0",
            ),
            2,
            "PF 'hello-1.0' does not start with PN 'calc'",
        ),
        (
            ("pack", "--image", image, *PACK_NAMES, "--build-id", "7996afe4"),
            2,
            "not an ELF build-id",
        ),
        (
            ("find", "ab" * 20, tarball.parent / "nothing.tar.xz"),
            2,
            "no such tarball or directory",
        ),
        (("settings", "--root", "/x"), 2, "--root go with --debuginfod"),
        (("repack", "--root", tmp_path / "nope"), 2, "check --root"),
        (("prune", "--root", tmp_path / "nope"), 2, "check --root"),
    ]
    for args, code, message in cases:
        result = cli(*args, check=False)
        assert result.returncode == code and message in result.stderr, (
            args,
            result.stderr,
        )
        no_traceback(result)
    warned = cli("pack", "--image", image, "--output", tmp_path / "out.tar")
    assert (
        "debuginfod (-Z .tar.xz) and prune only see *-debug.tar.xz files"
        in warned.stderr
    )


def test_plurals_are_right():
    assert (
        pd.plural(1, "xz block") == "1 xz block"
        and pd.plural(2, "xz block") == "2 xz blocks"
    )
    assert pd.plural(1, "directory", "directories") == "1 directory"
    assert "1 block" in pd.seekability(
        pd.XzLayout((), 1, 0, frozenset())
    ).detail.replace("0 xz blocks", "1 block")


def test_a_report_that_cannot_be_written_never_fails_a_finished_pack(image, tmp_path):
    with open("/dev/full", "w") as full:
        packed = run(
            sys.executable,
            SCRIPT,
            "pack",
            "--image",
            image,
            *PACK_NAMES,
            "--build-id",
            "1",
            stdout=full,
            env=clean_env(),
            text=True,
            check=False,
        )
    assert packed.returncode == 0, packed.stderr
    assert (
        "cannot write to standard output: No space left on device; the pack itself went through"
        in packed.stderr
    )
    no_traceback(packed)
    assert cli("verify", image / TARBALL).returncode == 0
    with open("/dev/full", "w") as full:
        listed = run(
            sys.executable,
            SCRIPT,
            "list",
            image / TARBALL,
            stdout=full,
            text=True,
            check=False,
        )
    assert listed.returncode == 1
    assert (
        listed.stderr
        == "packdebug: error: cannot write to standard output: No space left on device\n"
    )


def raw_header(
    name: bytes, size: int = 0, kind: bytes = b"0", size_field=None
) -> bytes:
    """A ustar header as no tar program would write it: any size field at all."""
    block = bytearray(512)
    block[: len(name)] = name
    block[100:124] = b"0000644\x000000000\x000000000\x00"
    block[124:136] = size_field if size_field is not None else b"%011o\x00" % size
    block[136:148] = b"00000000000\x00"
    block[156:157] = kind
    block[257:265] = b"ustar\x0000"
    block[148:156] = b" " * 8
    block[148:156] = b"%06o\x00 " % sum(block)
    return bytes(block)


def pax_record(key: str, value: str) -> bytes:
    body = f" {key}={value}\n".encode()
    length = len(body) + 1
    while len(str(length).encode() + body) != length:
        length += 1
    return str(length).encode() + body


def padded(data: bytes) -> bytes:
    return data + bytes(-len(data) % 512)


def hostile_headers() -> dict:
    """Tars whose headers would make a reader loop, recurse or allocate without end."""
    end = bytes(1024)
    file_f = raw_header(b"f", 3) + padded(b"abc")
    chain_gnu = b"".join(
        raw_header(b"././@LongLink", 11, b"L") + padded(b"x" * 10 + b"\x00")
        for _ in range(400)
    )
    chain_pax = b"".join(
        raw_header(b"pax", len(r), b"x") + padded(r)
        for r in (pax_record("path", f"p{i}") for i in range(400))
    )
    record = pax_record("path", "p")
    claims = raw_header(b"pax", len(record), b"x") + padded(record)
    claims += raw_header(b"././@LongLink", 300 << 20, b"L")
    minus_512 = bytes([0xFF]) + (256**11 - 512).to_bytes(11, "big")
    cases = {
        "a negative size": (
            raw_header(b"loop", size_field=minus_512) + end,
            "has a negative size (-512)",
        ),
        "400 GNU long names in a row": (
            chain_gnu + file_f + end,
            "more than 8 extended headers in a row at byte 0",
        ),
        "400 pax headers in a row": (
            chain_pax + file_f + end,
            "more than 8 extended headers in a row at byte 0",
        ),
        "a long name of 300 MiB after a pax header": (
            claims,
            f"extended header at byte {len(record) // 512 * 512 + 1024} claims",
        ),
    }
    for value in ("nan", "inf", "1e300"):
        record = pax_record("mtime", value)
        cases[f"mtime {value}"] = (
            raw_header(b"pax", len(record), b"x") + padded(record) + file_f + end,
            "has mtime ",
        )
    return cases


def test_hostile_headers_get_one_clear_error_from_every_reader(tmp_path):
    for what, (tar, message) in hostile_headers().items():
        tarball = tmp_path / "h-debug.tar.xz"
        write_xz(tarball, [tar])
        before = tarball.read_bytes()
        for args in (
            ("list", tarball),
            ("list", "-v", tarball),
            ("extract", tarball, "--all", "-C", tmp_path / "out"),
            ("extract", tarball, "--member", "f", "-o", tmp_path / "f"),
            ("repack", tarball),
            ("find", "ab" * 20, tarball),
        ):
            result = cli(*args, check=False, timeout=60)
            assert result.returncode == 1 and message in result.stderr, (what, args)
            no_traceback(result)
        verify = cli("verify", "-q", tarball, check=False, timeout=60)
        assert verify.returncode == 1 and message in verify.stdout, what
        assert tarball.read_bytes() == before, "inputs are never modified"


def test_crafted_xz_containers_are_refused_in_bounded_time_and_memory(tmp_path):
    empty = lzma.compress(b"", format=lzma.FORMAT_XZ)
    index = tmp_path / "index.tar.xz"  # sparse: 1 GiB long, an Index claimed as long
    body = struct.pack("<I", ((1 << 30) - 24) // 4 - 1) + b"\x00\x04"
    with open(index, "wb") as f:
        f.write(empty[:12])
        f.truncate(1 << 30)
        f.seek((1 << 30) - 12)
        f.write(struct.pack("<I", zlib.crc32(body)) + body + b"YZ")
    padding = tmp_path / "padding.tar.xz"  # sparse: 1 GiB of Stream Padding
    padding.write_bytes(empty)
    os.truncate(padding, len(empty) + (1 << 30))
    cases = {
        index: "claims an Index of 1024.0 MiB",
        padding: "ends in more than 64 MiB of null bytes",
    }
    for path, message in cases.items():
        # in 300 MiB of address space (Python itself takes about 30)
        result = run(
            "sh",
            "-c",
            'ulimit -v 300000; exec "$@"',
            "sh",
            sys.executable,
            SCRIPT,
            "list",
            path,
            check=False,
            text=True,
            timeout=30,
        )
        assert result.returncode == 1 and message in result.stderr, result.stderr
        no_traceback(result)


def test_archives_with_more_members_than_any_package_are_refused(tmp_path, monkeypatch):
    tarball = hostile_tarball(
        tmp_path / "many-debug.tar.xz",
        *[({"name": f"usr/src/debug/f{i}"}, b"") for i in range(30)],
    )
    monkeypatch.setattr(pd, "MEMBERS_LIMIT", 20)
    with pd.Archive(tarball) as archive:
        members = archive.members()
        with pytest.raises(pd.ArchiveError, match="holds more than 20 members"):
            list(members)


def test_outputs_never_replace_a_device_a_fifo_or_a_symlink(image, tmp_path):
    need_root()
    tarball = pack(image)
    places = tmp_path / "places"
    places.mkdir()
    os.mknod(places / "null", stat.S_IFCHR | 0o666, os.makedev(1, 3))
    os.mkfifo(places / "fifo")
    (places / "stdout").symlink_to("/proc/self/fd/1")
    (places / "real").write_text("kept")
    (places / "link").symlink_to("real")
    for name, kind in (
        ("null", "a character device"),
        ("fifo", "a FIFO"),
        ("stdout", "a symlink"),
        ("link", "a symlink"),
    ):
        result = cli(
            "extract", tarball, "--member", SOURCE, "-o", places / name, check=False
        )
        assert result.returncode == 1 and f"is {kind}" in result.stderr, result.stderr
        packed = cli("pack", "--image", image, "--output", places / name, check=False)
        assert packed.returncode == 1 and f"is {kind}" in packed.stderr
    assert stat.S_ISCHR(os.lstat(places / "null").st_mode)
    assert stat.S_ISFIFO(os.lstat(places / "fifo").st_mode)
    assert os.readlink(places / "stdout") == "/proc/self/fd/1"
    assert (places / "link").read_text() == "kept" and (places / "link").is_symlink()
    assert sorted(p.name for p in places.iterdir()) == [
        "fifo",
        "link",
        "null",
        "real",
        "stdout",
    ], "no temporary file left"


def test_a_member_named_dash_is_extracted_to_a_file(tmp_path):
    tarball = hostile_tarball(
        tmp_path / "dash-debug.tar.xz", ({"name": "usr/src/debug/-"}, b"abc")
    )
    work = tmp_path / "work"
    work.mkdir()
    result = cli("extract", tarball, "--member", "usr/src/debug/-", cwd=work)
    assert result.stdout == "" and (work / "-").read_bytes() == b"abc"


def test_numbers_are_ascii_digits_only(image):
    cases = {
        (("SOURCE_DATE_EPOCH", "\u00b2"),): "is not a whole number of seconds",
        (("BUILD_ID", "\u0661\u0662"),): "is not a number, as Portage's are",
    }
    for env, message in cases.items():
        result = cli("pack", "--image", image, *PACK_NAMES, env=dict(env), check=False)
        assert result.returncode == 2 and message in result.stderr, result.stderr
        no_traceback(result)
    result = cli(
        "pack", "--image", image, "--block-size", "\u0661M", *PACK_NAMES, check=False
    )
    assert result.returncode == 2 and "is not a size" in result.stderr


def test_a_closed_stdout_is_a_report_that_cannot_be_written(image):
    def closed(*args):
        return run(
            sys.executable,
            SCRIPT,
            *args,
            env=clean_env(),
            text=True,
            check=False,
            stdout=None,
            preexec_fn=lambda: os.close(1),
        )

    packed = closed("pack", "--image", image, *PACK_NAMES, "--build-id", "1")
    assert packed.returncode == 0, packed.stderr
    assert "cannot write to standard output: it was closed; the pack itself" in (
        packed.stderr
    )
    assert cli("verify", image / TARBALL).returncode == 0
    listed = closed("list", image / TARBALL)
    assert listed.returncode == 1
    assert listed.stderr == (
        "packdebug: error: cannot write to standard output: it was closed\n"
    )
    extracted = closed("extract", image / TARBALL, "--member", SOURCE, "-o", "-")
    assert extracted.returncode == 1 and "it was closed" in extracted.stderr


def test_settings_refuses_what_would_inject_into_the_unit_or_the_shell():
    cases = {
        ("--listen", '"; touch /tmp/x; echo ":8002'): "is not an IP address",
        ("--listen", "binhost:8002"): "is not an IP address",
        ("--root", "/srv/x\nExecStartPre=/bin/true"): "holds '\\n'",
        ("--root", "/srv/a:/etc"): "holds ':'",
        ("--pkgdir", "/srv/$HOME"): "holds '$'",
        ("--database", "/srv/%h.db"): "holds '%'",
    }
    for args, message in cases.items():
        result = cli("settings", "--debuginfod", *args, check=False)
        assert result.returncode == 2 and message in result.stderr, (
            args,
            result.stderr,
        )
        assert result.stdout == ""


def test_output_inside_the_debug_trees_is_refused_through_symlinks(image, tmp_path):
    link = tmp_path / "image-link"
    link.symlink_to(image)
    debug = debug_file(image)
    before = debug.read_bytes()
    for image_arg, output in (
        (link, debug),
        (image, link / debug.relative_to(image)),
    ):
        result = cli(
            "pack",
            "--image",
            image_arg,
            "--output",
            output,
            "--remove-packed",
            check=False,
        )
        assert result.returncode == 2 and "would be packed next time" in result.stderr
    assert debug.read_bytes() == before


def test_portage_files_that_are_not_regular_files_are_refused_at_once(image, tmp_path):
    root, pkgdir, vardb = (tmp_path / n for n in ("root", "pkgdir", "vardb"))
    (root / "app-misc/hello").mkdir(parents=True)
    shutil.copy(pack(image), root / "app-misc/hello/hello-1.0-1-debug.tar.xz")
    (pkgdir / "app-misc/hello").mkdir(parents=True)
    (pkgdir / "app-misc/hello/hello-1.2-3.gpkg.tar").touch()
    (vardb / "app-misc/hello-1.2").mkdir(parents=True)
    os.mkfifo(vardb / "app-misc/hello-1.2/BUILD_ID")
    prune = ("prune", "--root", root, "--pkgdir", pkgdir, "--vardb", vardb, "-n")
    for packages, kind in ((os.mkfifo, "a FIFO"), (None, "a character device")):
        index = pkgdir / "Packages"
        if packages:
            packages(index)
        else:
            index.symlink_to("/dev/zero")
        result = cli(*prune, check=False, timeout=30)
        assert result.returncode == 1, result.stderr
        assert f"Packages: is {kind}, not a regular Packages index" in result.stderr
        index.unlink()
    result = cli(*prune, "--min-age", "0", timeout=30)
    assert "BUILD_ID: unreadable (is a FIFO" in result.stderr
    builddir = tmp_path / "build"
    (builddir / "build-info").mkdir(parents=True)
    os.mkfifo(builddir / "build-info/BUILD_ID")
    result = cli(
        "pack",
        "--image",
        image,
        *PACK_NAMES,
        env={"PORTAGE_BUILDDIR": str(builddir)},
        check=False,
        timeout=30,
    )
    assert result.returncode == 2 and "is a FIFO" in result.stderr


def test_a_closed_pipe_ends_quietly():
    proc = subprocess.Popen(
        [sys.executable, SCRIPT, "settings", "--debuginfod"],
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
    )
    proc.stdout.close()
    _, err = proc.communicate(timeout=30)
    assert (
        proc.returncode in (0, 141)
        and b"Traceback" not in err
        and b"Exception ignored" not in err
    )
