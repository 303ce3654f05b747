"""Tests for packdebug, grouped in the order of packdebug.py's parts.

Real artifacts wherever they exist: gcc-built ELF split the estrip way
(tests/estrip-image.sh), cross-compiled 32-bit and big-endian ELF, GNU tar,
bsdtar, xz and a real debuginfod.  Hand-made bytes only for malformed input.

Set PACKDEBUG_REQUIRE_TOOLS=1 (as .ci/run does) to turn every "tool not
installed" skip into a failure.
"""

from __future__ import annotations

import contextlib
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
import urllib.request

import pytest

import packdebug as pd

HERE = pathlib.Path(__file__).resolve().parent
SCRIPT = HERE / "packdebug.py"
ESTRIP_IMAGE = HERE / "tests" / "estrip-image.sh"
REQUIRE_TOOLS = os.environ.get("PACKDEBUG_REQUIRE_TOOLS") == "1"
HARNESS = pathlib.Path(os.environ.get("HARNESS", "/var/tmp/debuginfod-harness"))
REQUIRE_HARNESS = os.environ.get("PACKDEBUG_REQUIRE_HARNESS") == "1"
CROSS_COMPILERS = {  # (ELF class, data encoding) each makes
    "i686-linux-gnu-gcc": "ELF32 little-endian",
    "powerpc-linux-gnu-gcc": "ELF32 big-endian",
    "s390x-linux-gnu-gcc": "ELF64 big-endian",
}
PACK_NAMES = ("--category", "app-misc", "--pn", "hello", "--pf", "hello-1.0")


# ---------------------------------------------------------------------------
# helpers
# ---------------------------------------------------------------------------


def need(*tools: str) -> None:
    missing = [t for t in tools if not shutil.which(t)]
    if missing and REQUIRE_TOOLS:
        pytest.fail(f"required tools missing: {missing} (PACKDEBUG_REQUIRE_TOOLS=1)")
    if missing:
        pytest.skip(f"not installed: {' '.join(missing)}")


def run(*cmd, check: bool = True, **kwargs) -> subprocess.CompletedProcess:
    kwargs.setdefault("stdout", subprocess.PIPE)
    kwargs.setdefault("stderr", subprocess.PIPE)
    result = subprocess.run([str(c) for c in cmd], check=False, **kwargs)
    if check and result.returncode != 0:
        raise AssertionError(
            f"{cmd} exited {result.returncode}:\n{result.stdout!r}\n{result.stderr!r}"
        )
    return result


def cli(
    *args, env: dict | None = None, check: bool = True, **kwargs
) -> subprocess.CompletedProcess:
    """Run packdebug.py as a user would, with a clean Portage-free environment."""
    base = {
        k: v
        for k, v in os.environ.items()
        if k not in pd.PORTAGE_INPUTS and k not in ("D", "EPREFIX")
    }
    base.pop("PORTAGE_BUILDDIR", None)
    base.pop("SOURCE_DATE_EPOCH", None)
    return run(
        sys.executable,
        SCRIPT,
        *args,
        env={**base, **(env or {})},
        check=check,
        text=True,
        **kwargs,
    )


def copy_tree(src: pathlib.Path, dst: pathlib.Path) -> pathlib.Path:
    run("cp", "-a", src, dst)  # keeps hardlinks, symlinks, modes and mtimes
    return dst


def pack(image: pathlib.Path, *extra: str, env: dict | None = None) -> pathlib.Path:
    cli("pack", "--image", image, *PACK_NAMES, "--build-id", "1", "-q", *extra, env=env)
    return image / "usr/lib/debug/.tarball/app-misc/hello/hello-1.0-1-debug.tar.xz"


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
                    result[rel] = ("dir", stat.S_IMODE(st.st_mode) & 0o777)
                else:
                    digest = hashlib.sha256(path.read_bytes()).hexdigest()
                    inodes.setdefault(st.st_ino, []).append(rel)
                    result[rel] = (
                        "file",
                        stat.S_IMODE(st.st_mode) & 0o777,
                        digest,
                        st.st_ino,
                    )
    # Replace inode numbers by the group of names sharing them.
    return {
        k: v[:3] + (tuple(sorted(inodes[v[3]])),) if v[0] == "file" else v
        for k, v in result.items()
    }


def xz_blocks(path: pathlib.Path) -> list[dict]:
    """Blocks as `xz --robot -lvv` reports them."""
    out = run("xz", "--robot", "-lvv", path, text=True).stdout
    rows = [line.split("\t") for line in out.splitlines() if line.startswith("block\t")]
    return [
        {
            "uncompressed_offset": int(r[5]),
            "uncompressed_size": int(r[7]),
            "check": r[9],
        }
        for r in rows
    ]


def xz_summary(path: pathlib.Path) -> dict:
    out = run("xz", "--robot", "-lvv", path, text=True).stdout
    totals = next(
        line.split("\t") for line in out.splitlines() if line.startswith("totals\t")
    )
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
    return image / "usr/lib/debug" / (name + ".debug")


def elf_with_section(tmp_path: pathlib.Path, size: int, seed: int = 0) -> pathlib.Path:
    """A real debug file plus a .debug_junk section of `size` random bytes."""
    need("gcc", "objcopy")
    src = tmp_path / f"big{seed}.c"
    src.write_text(f"int main(void) {{ return {seed}; }}\n")
    binary = tmp_path / f"big{seed}"
    run("gcc", "-g", "-Wl,--build-id", "-o", binary, src)
    junk = tmp_path / f"junk{seed}"
    junk.write_bytes(
        random.Random(seed).randbytes(size)
        if hasattr(random.Random, "randbytes")
        else bytes(random.Random(seed).getrandbits(8) for _ in range(size))
    )
    out = tmp_path / f"big{seed}.debug"
    run(
        "objcopy",
        "--only-keep-debug",
        "--add-section",
        f".debug_junk={junk}",
        binary,
        out,
    )
    return out


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


@pytest.mark.parametrize("compiler", sorted(CROSS_COMPILERS))
def test_build_id_of_32_bit_and_big_endian_elf(tmp_path, compiler):
    need(compiler, "readelf")
    src = tmp_path / "x.c"
    src.write_text("int main(void) { return 0; }\n")
    binary = tmp_path / "x"
    run(compiler, "-g", "-O2", "-Wl,--build-id", "-o", binary, src)
    ident = binary.read_bytes()[:6]
    cls, data = CROSS_COMPILERS[compiler].split()
    assert ident[4] == (1 if cls == "ELF32" else 2) and ident[5] == (
        1 if data == "little-endian" else 2
    )
    debug = tmp_path / "x.debug"
    prefix = compiler[: -len("gcc")]
    objcopy = prefix + "objcopy" if shutil.which(prefix + "objcopy") else "objcopy"
    run(objcopy, "--only-keep-debug", binary, debug)
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
    assert pd._build_id_in(notes, 8, "<") == "deadbeef"
    try:  # read 4-aligned, the same bytes are garbage
        assert pd._build_id_in(notes, 4, "<") != "deadbeef"
    except pd.ElfError:
        pass


def test_build_id_read_touches_only_headers_and_notes(tmp_path):
    debug = elf_with_section(tmp_path, 8 * 1024 * 1024)
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
            assert "cut.debug" in str(e)
            outcomes.add("error")
    assert "error" in outcomes  # most cuts lose the section headers at the end


def test_garbage_after_elf_magic_is_reported_never_crashes(tmp_path, estrip_image):
    original = debug_file(estrip_image).read_bytes()
    rng = random.Random(1)
    for _ in range(300):
        data = bytearray(original)
        for _ in range(rng.randint(1, 8)):
            data[rng.randrange(4, 64 + 13 * 56)] = rng.randrange(
                256
            )  # header and program headers
        path = tmp_path / "garbage.debug"
        path.write_bytes(bytes(data))
        try:
            pd.read_elf_file(path, sections=True)
        except pd.ElfError:
            pass


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
    assert bad.stdout.count("\n") == 1 and "Traceback" not in bad.stderr


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


def write_xz(path: pathlib.Path, payloads: list) -> None:
    """One xz stream with one block per payload, as packdebug writes it."""
    with open(path, "wb") as f:
        writer = pd.XzStreamWriter(f)
        for payload in payloads:
            writer.write_block(*pd.compress_block(payload))
        writer.close()


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
        bytes(rng.getrandbits(8) for _ in range(n)) for n in (5000, 300_000, 1, 70_000)
    ]
    whole = b"".join(payloads)
    path = tmp_path / "t.xz"
    write_xz(path, payloads)
    reader = pd.XzReader(path)
    for _ in range(200):
        offset = rng.randrange(len(whole) + 10)
        size = rng.randrange(1, 100_000)
        reader.seek(offset)
        assert reader.read(size) == whole[offset : offset + size]
    sequential = pd.XzReader(path, sequential=True)
    sequential.verify_all()
    assert sequential.verified_blocks == {1, 2, 3, 4}


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


# ---------------------------------------------------------------------------
# 3. tar member collection
# ---------------------------------------------------------------------------


def make_tree(root: pathlib.Path, files: dict, order=None) -> None:
    names = list(files) if order is None else order
    for name in names:
        path = root / name
        path.parent.mkdir(parents=True, exist_ok=True)
        path.write_bytes(files[name])


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
    names = [m.info.name for m in pd.scan_image(tmp_path / "one").members]
    assert names == [m.info.name for m in pd.scan_image(tmp_path / "two").members]
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
    names = [m.info.name for m in pd.scan_image(tmp_path).members]
    assert names == ["usr/lib/debug", "usr/lib/debug/x.debug"]


def test_symlinks_are_stored_not_followed(tmp_path):
    make_tree(tmp_path, {"usr/lib/debug/real/x.debug": b"x"})
    debug = tmp_path / "usr/lib/debug"
    (debug / "dangling").symlink_to("../../../../usr/bin/gone")
    (debug / "to-dir").symlink_to("real")
    members = {m.info.name: m.info for m in pd.scan_image(tmp_path).members}
    assert (
        members["usr/lib/debug/dangling"].issym()
        and members["usr/lib/debug/dangling"].linkname == "../../../../usr/bin/gone"
    )
    assert members["usr/lib/debug/to-dir"].issym()
    assert "usr/lib/debug/to-dir/x.debug" not in members


def test_hardlinked_files_are_stored_once_under_their_first_sorted_name(tmp_path):
    make_tree(tmp_path, {"usr/lib/debug/z.debug": b"data" * 100})
    os.link(tmp_path / "usr/lib/debug/z.debug", tmp_path / "usr/lib/debug/a.debug")
    members = {m.info.name: m.info for m in pd.scan_image(tmp_path).members}
    assert (
        members["usr/lib/debug/a.debug"].isreg()
        and members["usr/lib/debug/a.debug"].size == 400
    )
    assert (
        members["usr/lib/debug/z.debug"].islnk()
        and members["usr/lib/debug/z.debug"].linkname == "usr/lib/debug/a.debug"
    )


def test_headers_drop_owner_setuid_and_clamp_mtime(tmp_path):
    make_tree(tmp_path, {"usr/lib/debug/x.debug": b"x"})
    path = tmp_path / "usr/lib/debug/x.debug"
    os.chmod(path, 0o6755)
    os.utime(path, (2_000_000_000.7, 2_000_000_000.7))
    if os.geteuid() == 0:
        os.chown(path, 1234, 5678)
    info = {
        m.info.name: m.info
        for m in pd.scan_image(tmp_path, source_date_epoch=1_700_000_000).members
    }
    x = info["usr/lib/debug/x.debug"]
    assert (x.mode, x.uid, x.gid, x.uname, x.gname, x.mtime) == (
        0o755,
        0,
        0,
        "root",
        "root",
        1_700_000_000,
    )
    unclamped = {m.info.name: m.info for m in pd.scan_image(tmp_path).members}[
        "usr/lib/debug/x.debug"
    ]
    assert unclamped.mtime == 2_000_000_000


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
        result = cli("pack", "--image", tmp_path, "--output", tmp_path / "out.tar.xz")
    for name, kind in kinds.items():
        assert (
            f"{debug / name}: skipped, a {kind} cannot go in the tarball"
            in result.stderr
        )
    with tarfile.open(tmp_path / "out.tar.xz") as tar:
        assert tar.getnames() == ["usr/lib/debug", "usr/lib/debug/x.debug"]


# ---------------------------------------------------------------------------
# 4. packing
# ---------------------------------------------------------------------------


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
    }
    for name, extract in extractors.items():
        dest = tmp_path / name
        dest.mkdir()
        extract(dest)
        assert snapshot(dest) == expected, name


def _extract_with_tarfile(tarball, dest):
    with tarfile.open(tarball) as tar:
        if hasattr(tarfile, "tar_filter"):
            tar.extractall(dest, filter="tar")
        else:
            tar.extractall(dest)


def test_member_names_are_relative_and_clean(image):
    with tarfile.open(pack(image)) as tar:
        names = tar.getnames()
    assert names[0] == "usr/src/debug" and "usr/lib/debug" in names
    assert all(n.startswith(("usr/src/debug", "usr/lib/debug")) for n in names)
    assert not any(
        n.startswith(("/", "./")) or "//" in n or "/./" in n or ".." in n.split("/")
        for n in names
    )
    assert not any(n.startswith("usr/lib/debug/.tarball") for n in names)


def test_tiny_package_gets_one_crc64_stream_of_several_blocks(image):
    need("xz")
    tarball = pack(image)
    run("xz", "-t", tarball)
    summary = xz_summary(tarball)
    assert (
        summary["streams"] == 1
        and summary["padding"] == 0
        and summary["check"] == "CRC64"
    )
    assert summary["blocks"] > 1


def test_large_members_start_their_own_block(tmp_path):
    need("xz")
    big = elf_with_section(tmp_path, 3 * 1024 * 1024)
    image = tmp_path / "image"
    make_tree(
        image,
        {
            "usr/src/debug/a/p/small.c": b"int x;\n" * 50,
            "usr/lib/debug/usr/lib/z-small": b"s" * 1000,
        },
    )
    (image / "usr/lib/debug/usr/bin").mkdir(parents=True)
    shutil.copy(big, image / "usr/lib/debug/usr/bin/big.debug")
    tarball = tmp_path / "out.tar.xz"
    cli("pack", "--image", image, "--output", tarball, "--block-size", "1MiB")
    starts = {b["uncompressed_offset"] for b in xz_blocks(tarball)}
    with tarfile.open(tarball) as tar:
        members = {m.name: m for m in tar.getmembers()}
    big_member = members["usr/lib/debug/usr/bin/big.debug"]
    assert big_member.offset in starts, "the large member's header must open a Block"
    after = _round_up_512(big_member.offset_data + big_member.size)
    assert after in starts, "the member after it must open a Block too"
    sizes = [b["uncompressed_size"] for b in xz_blocks(tarball)]
    assert max(sizes) <= 1024 * 1024


def _round_up_512(n):
    return -(-n // 512) * 512


def test_same_image_packs_byte_identical_whatever_jobs_order_umask_locale_owner(
    estrip_image, tmp_path
):
    first = copy_tree(estrip_image, tmp_path / "first")
    # The second copy is created in reverse order, under another umask, with
    # other owners, and packed on one thread in another locale.
    second = tmp_path / "second"
    old_umask = os.umask(0o077)
    try:
        entries = sorted(estrip_image.rglob("*"), key=lambda p: str(p), reverse=True)
        for src in sorted(entries, key=lambda p: len(p.parts)):
            dst = second / src.relative_to(estrip_image)
            if src.is_symlink():
                continue
            if src.is_dir():
                dst.mkdir(parents=True, exist_ok=True)
        inode_first: dict = {}
        for src in entries:
            dst = second / src.relative_to(estrip_image)
            if src.is_symlink():
                dst.symlink_to(os.readlink(src))
            elif src.is_file():
                key = src.stat().st_ino
                if key in inode_first:
                    os.link(inode_first[key], dst)
                else:
                    shutil.copyfile(src, dst)
                    inode_first[key] = dst
        for src in entries + [estrip_image]:
            dst = second / src.relative_to(estrip_image)
            if not src.is_symlink():
                os.chmod(dst, stat.S_IMODE(src.stat().st_mode))
                if os.geteuid() == 0:
                    os.chown(dst, 4321, 4321)
            st = src.lstat()
            os.utime(dst, ns=(st.st_atime_ns, st.st_mtime_ns), follow_symlinks=False)
    finally:
        os.umask(old_umask)
    a = pack(first, "--jobs", "2", env={"LC_ALL": "C.UTF-8"})
    b = pack(
        second,
        "--jobs",
        "1",
        env={"LC_ALL": "POSIX", "LANG": "", "TZ": "Pacific/Kiritimati"},
    )
    assert a.read_bytes() == b.read_bytes()
    # Packing again (now that .tarball exists inside usr/lib/debug) changes nothing.
    before = a.read_bytes()
    assert pack(first).read_bytes() == before


def test_presets_change_compression_but_not_content(image, tmp_path):
    outputs = {}
    for flag in ("-0", "-9", "--preset=6"):
        out = tmp_path / f"{flag.strip('-=')}.tar.xz"
        cli("pack", "--image", image, "--output", out, flag)
        run("xz", "-t", out)
        outputs[flag] = out.read_bytes()
    assert outputs["-0"] != outputs["--preset=6"]
    assert len({lzma.decompress(data) for data in outputs.values()}) == 1
    assert outputs["--preset=6"] == pack(image).read_bytes()
    # A block no larger than 8 MiB gets a dictionary no larger than itself,
    # so -9 can only differ from -6 on a larger image: its blocks grow to 64 MiB.
    assert (
        pd.default_block_size(9) == 64 << 20
        and pd.default_block_size(6) == pd.BLOCK_SIZE
    )


def test_progress_line_only_on_a_terminal(image, tmp_path):
    import pty

    (image / "usr/lib/debug/usr/lib/blob").write_bytes(
        random.Random(6).getrandbits(8 * (16 << 20)).to_bytes(16 << 20, "little")
    )
    main, child = pty.openpty()
    command = [
        sys.executable,
        SCRIPT,
        "pack",
        "--image",
        image,
        "--output",
        tmp_path / "a.tar.xz",
        "-j1",
        "--block-size",
        "512KiB",
    ]
    env = {**os.environ, "PYTHONPATH": str(HERE)}
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
    assert re.search(rb"\r +\d+%  .* read, .* written, .*/s, ETA \d+:\d\d", seen), seen
    piped = cli(
        "pack",
        "--image",
        image,
        "--output",
        tmp_path / "b.tar.xz",
        "-j1",
        "--block-size",
        "512KiB",
    )
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
    cli("pack", env=env)
    assert (
        image / "usr/lib/debug/.tarball/app-misc/hello/hello-1.0-42-debug.tar.xz"
    ).is_file()


def test_without_build_id_the_tarball_is_named_pf_debug_and_says_so(image):
    result = cli("pack", "--image", image, *PACK_NAMES)
    assert (
        image / "usr/lib/debug/.tarball/app-misc/hello/hello-1.0-debug.tar.xz"
    ).is_file()
    assert "no BUILD_ID" in result.stdout and "hello-1.0-debug.tar.xz" in result.stdout


def test_image_under_an_eprefix(estrip_image, tmp_path):
    d = tmp_path / "D"
    copy_tree(estrip_image, d.parent / "ed")
    (d / "opt").mkdir(parents=True)
    (d.parent / "ed").rename(d / "opt/gentoo")
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
    assert (
        f"{missing} is not set" in result.stderr
        and flag in result.stderr
        and "Traceback" not in result.stderr
    )
    assert not (image / "usr/lib/debug/.tarball").exists()


def test_missing_image_names_ed_and_image_flag(tmp_path):
    result = cli("pack", *PACK_NAMES, check=False)
    assert (
        result.returncode == 2 and "ED" in result.stderr and "--image" in result.stderr
    )


def test_no_debug_content_writes_nothing_and_says_so_in_one_line(tmp_path):
    (tmp_path / "usr/bin").mkdir(parents=True)
    (tmp_path / "usr/lib/debug/empty").mkdir(parents=True)
    result = cli("pack", "--image", tmp_path, *PACK_NAMES, "--build-id", "1")
    assert (
        result.returncode == 0
        and len(result.stdout.splitlines()) == 1
        and "nothing to pack" in result.stdout
    )
    assert not (tmp_path / "usr/lib/debug/.tarball").exists()


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
    assert (
        strict.returncode == 1
        and "noid.debug" in strict.stderr
        and "garbage.debug" in strict.stderr
    )
    assert not list(image.glob("usr/lib/debug/.tarball/**/*.tar.xz"))
    lenient = cli("pack", "--image", image, *PACK_NAMES, "--build-id", "1")
    assert "noid.debug: debug ELF without a build-id" in lenient.stderr
    assert (
        "garbage.debug: ELF header" in lenient.stderr
        and "truncated or corrupt" in lenient.stderr
    )
    assert "2 of 4 debug ELF with a build-id" in lenient.stdout


def test_pack_does_not_modify_the_image_outside_its_tarball(image):
    before = snapshot(image)
    pack(image)
    assert snapshot(image) == before


def test_failure_while_writing_leaves_nothing_and_keeps_previous_tarball(
    image, tmp_path
):
    if os.geteuid() != 0:
        pytest.skip("mounting a tiny tmpfs needs root")
    mount = tmp_path / "tiny"
    mount.mkdir()
    if (
        run(
            "mount", "-t", "tmpfs", "-o", "size=64k", "tmpfs", mount, check=False
        ).returncode
        != 0
    ):
        pytest.skip("mounting is not allowed here")
    try:
        big = elf_with_section(tmp_path, 1024 * 1024)
        shutil.copy(big, image / "usr/lib/debug/usr/bin/big.debug")
        target = mount / "out-debug.tar.xz"
        target.write_bytes(b"previous tarball")
        result = cli("pack", "--image", image, "--output", target, check=False)
        assert result.returncode == 1 and "No space left on device" in result.stderr
        assert str(target) in result.stderr and "Traceback" not in result.stderr
        assert target.read_bytes() == b"previous tarball"
        assert sorted(p.name for p in mount.iterdir()) == ["out-debug.tar.xz"]
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
    finally:
        run("umount", mount, check=False)


@pytest.mark.parametrize("sig,code", [(signal.SIGTERM, 143), (signal.SIGINT, 130)])
def test_signal_while_writing_leaves_nothing(tmp_path, sig, code):
    image = tmp_path / "image"
    (image / "usr/lib/debug").mkdir(parents=True)
    rng = random.Random(3)
    for i in range(6):  # incompressible data: several seconds of work
        (image / f"usr/lib/debug/blob{i}").write_bytes(
            rng.getrandbits(8 * 4 * 1024 * 1024).to_bytes(4 << 20, "little")
        )
    out_dir = tmp_path / "out"
    out_dir.mkdir()
    target = out_dir / "x-debug.tar.xz"
    proc = subprocess.Popen(
        [sys.executable, SCRIPT, "pack", "--image", image, "--output", target, "-j1"],
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
        text=True,
    )
    deadline = time.monotonic() + 30
    while not list(out_dir.iterdir()) and time.monotonic() < deadline:
        time.sleep(0.05)
    assert list(out_dir.iterdir()), "the temporary file never appeared"
    proc.send_signal(sig)
    _, err = proc.communicate(timeout=60)
    assert (
        proc.returncode == code
        and "nothing was written" in err
        and "Traceback" not in err
    )
    assert list(out_dir.iterdir()) == []


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
# 4b. packing, served by a real debuginfod
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
            and int(traversed.group(1)) >= 1
            and pending
            and pending.group(1) == "0"
            and (not busy or busy.group(1) == "0")
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
    source = "/usr/src/debug/app-misc/hello-1.0/hello-1.0/hello.c"
    with debuginfod(tarball.parents[2], tmp_path) as port:
        cache = tmp_path / "cache"
        got = debuginfod_find(port, cache, "debuginfo", hello_id)
        run("cmp", got, debug_file(image))
        got = debuginfod_find(port, cache, "debuginfo", lib_id)
        run("cmp", got, debug_file(image, "usr/lib/libgreet.so.1"))
        got = debuginfod_find(port, cache, "source", hello_id, source)
        run("cmp", got, image / source.lstrip("/"))


@contextlib.contextmanager
def debuginfod_0192(root: pathlib.Path):
    """elfutils 0.192 (the first that seeks in .tar.xz), from the harness chroot."""
    if not (HARNESS / "run-debuginfod.sh").exists():
        if REQUIRE_HARNESS:
            pytest.fail(
                f"no debuginfod 0.192 harness at {HARNESS} (PACKDEBUG_REQUIRE_HARNESS=1)"
            )
        pytest.skip(
            f"no debuginfod 0.192 harness at {HARNESS} (see ../shared/tools/debuginfod-harness)"
        )
    port = free_port()
    pid = run(HARNESS / "run-debuginfod.sh", root, port, text=True).stdout.strip()
    try:
        run(HARNESS / "wait-scan.sh", port, 120)
        yield port, HARNESS / f"trixie/tmp/debuginfod-{port}/debuginfod.log"
    finally:
        run(HARNESS / "stop-debuginfod.sh", pid, check=False)


def assert_served_by_seeking(
    root: pathlib.Path, tarball: pathlib.Path, debug_files: dict
) -> str:
    """debuginfod 0.192 calls the tarball seekable and seeks to serve each file."""
    with debuginfod_0192(root) as (port, log):
        for build_id, expected in debug_files.items():
            got = run(
                HARNESS / "find.sh", port, "debuginfo", build_id, text=True
            ).stdout.strip()
            try:
                run("cmp", got, expected)
            finally:
                cache = next(
                    p
                    for p in pathlib.Path(got).parents
                    if p.name.startswith("find-cache.")
                )
                shutil.rmtree(cache)  # find.sh made a fresh client cache for this call
        text = log.read_text()
        served = re.search(
            r'http_responses_total\{result="seekable xz archive"\} (\d+)', metrics(port)
        )
    assert f"{tarball.name} is seekable" in text
    assert re.search(rf"{re.escape(tarball.name)} has \d+ xz Blocks", text)
    assert "seeking in xz archive" in text
    assert served and int(served.group(1)) == len(debug_files)
    return text


def test_debuginfod_0192_seeks_in_a_one_binary_tarball(image):
    tarball = pack(image)
    ids = {
        readelf_build_id(image / "usr/bin/hello"): debug_file(image),
        readelf_build_id(image / "usr/lib/libgreet.so.1"): debug_file(
            image, "usr/lib/libgreet.so.1"
        ),
    }
    assert_served_by_seeking(tarball.parents[2], tarball, ids)


def test_debuginfod_0192_seeks_in_a_large_tarball(image, tmp_path):
    ids = {readelf_build_id(image / "usr/bin/hello"): debug_file(image)}
    for seed in range(3):
        big = elf_with_section(tmp_path, 6 * 1024 * 1024, seed=10 + seed)
        target = image / f"usr/lib/debug/usr/lib/big{seed}.so.debug"
        shutil.copy(big, target)
        ids[readelf_build_id(target)] = target
    tarball = pack(image)
    assert len(xz_blocks(tarball)) > 4
    log = assert_served_by_seeking(tarball.parents[2], tarball, ids)
    offsets = [
        int(m)
        for m in re.findall(
            r"seeking in xz archive \S+ offset=\d+ block_offset=(\d+)", log
        )
    ]
    assert any(offsets), (
        "a file deep in the archive is served from a later block, not from the start"
    )


# ---------------------------------------------------------------------------
# 5. reading / extraction
# ---------------------------------------------------------------------------


def portage_tarball(image: pathlib.Path, out: pathlib.Path) -> pathlib.Path:
    """Exactly what Portage's __generate_packdebug runs, from ${ED}."""
    need("tar", "xz")
    trees = [f"./{t}" for t in pd.DEBUG_TREES if (image / t).is_dir()]
    with open(out, "wb") as f:
        run("tar", "-cJf", "-", *trees, cwd=image, stdout=f)
    return out


def big_image(
    image: pathlib.Path, tmp_path: pathlib.Path, count: int = 3, size: int = 3 << 20
) -> dict:
    """Add `count` large debug files to an image; return {build-id: path}."""
    ids = {}
    for seed in range(count):
        big = elf_with_section(tmp_path, size, seed=20 + seed)
        target = image / f"usr/lib/debug/usr/lib/big{seed}.so.debug"
        shutil.copy(big, target)
        build_id = readelf_build_id(target)
        link = image / f"usr/lib/debug/.build-id/{build_id[:2]}/{build_id[2:]}.debug"
        link.parent.mkdir(exist_ok=True)
        link.symlink_to(f"../../usr/lib/big{seed}.so.debug")  # as estrip links it
        ids[build_id] = target
    return ids


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
    assert rows["usr/src/debug/app-misc/hello-1.0/hello-1.0/hello.c"][0] == "source"
    assert rows["usr/lib/debug"][0] == "directory"
    data = json.loads(cli("list", "--json", tarball).stdout)
    kinds = {m["name"]: m["kind"] for m in data["members"]}
    assert kinds["usr/lib/debug/usr/lib/libgreet.so.1.debug"] == "debuginfo"
    assert len(data["members"]) == len(out)


def test_list_classifies_an_unstripped_executable_as_debuginfod_does(tmp_path):
    need("gcc")
    (tmp_path / "x.c").write_text("int main(void) { return 0; }\n")
    run(
        "gcc",
        "-O2",
        "-Wl,--build-id",
        "-s",
        "-o",
        tmp_path / "stripped",
        tmp_path / "x.c",
    )
    image = tmp_path / "image"
    (image / "usr/lib/debug").mkdir(parents=True)
    shutil.copy(tmp_path / "stripped", image / "usr/lib/debug/stripped")
    tarball = tmp_path / "t.tar.xz"
    cli("pack", "--image", image, "--output", tarball)
    rows = {
        r["name"]: r
        for r in json.loads(cli("list", "--json", tarball).stdout)["members"]
    }
    assert rows["usr/lib/debug/stripped"]["kind"] == "executable"


def test_list_reads_headers_and_notes_not_whole_files(image, tmp_path):
    big_image(image, tmp_path, count=2, size=6 << 20)
    tarball = tmp_path / "t.tar.xz"
    cli("pack", "--image", image, "--output", tarball, "--block-size", "1MiB")
    archive = pd.Archive(tarball)
    rows = list(pd.list_archive(archive))
    assert sum(r.kind == "debuginfo" for r in rows) == 4
    assert archive.reader.decoded < archive.reader.size / 3, (
        archive.reader.decoded,
        archive.reader.size,
    )


def test_verify_passes_on_a_packed_tarball(image):
    result = cli("verify", pack(image))
    assert result.stdout.count("  ok  ") == 6 and "FAIL" not in result.stdout


def test_verify_fails_portage_tarball_for_one_block_and_dot_slash_names(
    image, tmp_path
):
    tarball = portage_tarball(image, tmp_path / "portage-debug.tar.xz")
    result = cli("verify", tarball, check=False)
    assert result.returncode == 1
    lines = {
        line.split(":")[0].split()[-1]: line for line in result.stdout.splitlines()[1:]
    }
    assert (
        lines["seekable"].lstrip().startswith("FAIL")
        and "1 xz block" in lines["seekable"]
    )
    assert (
        lines["names"].lstrip().startswith("FAIL") and "leading './'" in lines["names"]
    )
    for ok in ("xz", "tar", "build-ids", "links"):
        assert lines[ok].lstrip().startswith("ok"), lines[ok]


def test_verify_reports_padding_streams_missing_build_ids_and_broken_links(
    image, tmp_path
):
    add_debug_file_without_build_id(image, tmp_path)
    (image / "usr/lib/debug/.build-id/00").mkdir()
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
    assert "FAIL  seekable: stream padding" in result and "FAIL  xz:" in result
    doubled = tmp_path / "two-streams.tar.xz"
    first_stream = run("xz", "-c", input=b"x" * 1000).stdout
    doubled.write_bytes(first_stream + tarball.read_bytes())
    result = cli("verify", doubled, check=False).stdout
    assert (
        "FAIL  seekable: 2 xz streams: debuginfod reads only the last one's index and would serve wrong bytes"
        in result
    )


def test_extract_by_build_id_decompresses_only_its_blocks(image, tmp_path):
    ids = big_image(image, tmp_path, count=4)
    tarball = pack(image)
    last_id, last_path = list(ids.items())[-1]
    out = tmp_path / "got.debug"
    cli("extract", tarball, "--build-id", last_id.upper(), "-o", out)
    run("cmp", out, last_path)
    archive = pd.Archive(tarball)
    info = archive.find_build_id(last_id)
    with open(os.devnull, "wb") as sink:
        pd.copy_member(archive, info, sink)
    assert archive.reader.decoded < archive.reader.size / 3, (
        archive.reader.decoded,
        archive.reader.size,
    )
    blocks = archive.reader.layout.blocks
    member_blocks = {
        b.number
        for b in blocks
        if b.uncompressed_offset < info.offset_data + info.size
        and b.uncompressed_end > info.offset
    }
    assert member_blocks <= archive.reader.verified_blocks


def test_extract_by_member_follows_links_and_accepts_any_spelling(image, tmp_path):
    tarball = pack(image)
    hello_id = readelf_build_id(debug_file(image))
    link = f"./usr/lib/debug/.build-id/{hello_id[:2]}/{hello_id[2:]}.debug"
    out = tmp_path / "via-link.debug"
    cli("extract", tarball, "--member", link, "-o", out)
    run("cmp", out, debug_file(image))
    source = "/usr/src/debug/app-misc/hello-1.0/hello-1.0/hello.c"
    got = cli("extract", tarball, "--member", source, "-o", "-").stdout
    assert got == (image / source.lstrip("/")).read_text()


def test_extract_of_a_missing_member_or_build_id_is_a_clear_error(image, tmp_path):
    tarball = pack(image)
    for args in (
        ("--member", "usr/lib/debug/nope"),
        ("--build-id", "00" * 20),
        ("--build-id", "xyz"),
    ):
        result = cli("extract", tarball, *args, "-o", tmp_path / "out", check=False)
        assert result.returncode in (1, 2) and "Traceback" not in result.stderr
        assert str(tarball) in result.stderr or "--build-id" in result.stderr
        assert not (tmp_path / "out").exists()


def test_extract_all_reproduces_the_image_trees(image, tmp_path):
    tarball = pack(image)
    cli("extract", tarball, "--all", "-C", tmp_path / "out")
    assert snapshot(tmp_path / "out") == snapshot(image)


def hostile_tarball(path: pathlib.Path, *members) -> pathlib.Path:
    """A .tar.xz with hand-made members: (TarInfo fields, data) pairs."""
    with tarfile.open(path, "w:xz", format=tarfile.GNU_FORMAT) as tar:
        for fields, data in members:
            fields = dict(fields)
            info = tarfile.TarInfo(fields.pop("name"))
            for key, value in fields.items():
                setattr(info, key, value)
            info.size = len(data)
            tar.addfile(info, io.BytesIO(data))
    return path


@pytest.mark.parametrize(
    "members,refused",
    [
        ([({"name": "/etc/evil"}, b"x")], "'/etc/evil': absolute path"),
        ([({"name": "usr/../../evil"}, b"x")], "'usr/../../evil': '..' component"),
        (
            [({"name": "up", "type": tarfile.SYMTYPE, "linkname": "../.."}, b"")],
            "'up': symlink '../..' points outside",
        ),
        (
            [({"name": "abs", "type": tarfile.SYMTYPE, "linkname": "/etc"}, b"")],
            "'abs': symlink to an absolute path",
        ),
        (
            [
                (
                    {
                        "name": "hl",
                        "type": tarfile.LNKTYPE,
                        "linkname": "../outside/sentinel",
                    },
                    b"",
                )
            ],
            "'hl': hardlink",
        ),
        (
            [
                (
                    {
                        "name": "null",
                        "type": tarfile.CHRTYPE,
                        "devmajor": 1,
                        "devminor": 3,
                    },
                    b"",
                )
            ],
            "'null': devices",
        ),
        ([({"name": "fifo", "type": tarfile.FIFOTYPE}, b"")], "'fifo': devices, FIFOs"),
    ],
)
def test_extract_all_refuses_members_that_escape_or_harm(tmp_path, members, refused):
    outside = tmp_path / "outside"
    outside.mkdir()
    (outside / "sentinel").write_text("keep")
    tarball = hostile_tarball(tmp_path / "evil.tar.xz", *members)
    dest = tmp_path / "dest"
    result = cli("extract", tarball, "--all", "-C", dest, check=False)
    assert (
        result.returncode == 1
        and refused in result.stderr
        and "Traceback" not in result.stderr
    )
    assert [p.name for p in outside.iterdir()] == ["sentinel"] and (
        outside / "sentinel"
    ).read_text() == "keep"
    assert sorted(p.name for p in tmp_path.iterdir()) == [
        "dest",
        "evil.tar.xz",
        "outside",
    ]


def test_extract_all_does_not_write_through_an_extracted_symlink(tmp_path):
    outside = tmp_path / "outside"
    outside.mkdir()
    tarball = hostile_tarball(
        tmp_path / "evil.tar.xz",
        (
            {"name": "d", "type": tarfile.SYMTYPE, "linkname": "."},
            b"",
        ),  # harmless itself
        ({"name": "link", "type": tarfile.SYMTYPE, "linkname": "d"}, b""),
        ({"name": "link/file", "mode": 0o4755}, b"payload"),
    )
    dest = tmp_path / "dest"
    result = cli("extract", tarball, "--all", "-C", dest, check=False)
    assert (
        result.returncode == 1
        and "'link'" in result.stderr
        and "symlink" in result.stderr
    )
    assert not list(outside.iterdir())


def test_extract_all_drops_setuid_bits(tmp_path):
    tarball = hostile_tarball(
        tmp_path / "s.tar.xz", ({"name": "usr/lib/debug/x", "mode": 0o6755}, b"x")
    )
    cli("extract", tarball, "--all", "-C", tmp_path / "dest")
    assert stat.S_IMODE((tmp_path / "dest/usr/lib/debug/x").stat().st_mode) == 0o755


def test_find_names_the_tarball_and_member_reading_only_block_starts(image, tmp_path):
    ids = big_image(image, tmp_path, count=4)
    tarball = pack(image)
    last_id = list(ids)[-1]
    out = cli("find", last_id, image / pd.TARBALL_DIR).stdout.splitlines()
    assert out == [f"{tarball}  usr/lib/debug/usr/lib/big3.so.debug"]
    archive = pd.Archive(tarball)
    assert (
        archive.find_build_id_by_link(last_id).name
        == "usr/lib/debug/usr/lib/big3.so.debug"
    )
    assert archive.reader.decoded < 1 << 20 < archive.reader.size / 8
    missing = cli("find", "ab" * 20, image / pd.TARBALL_DIR, check=False)
    assert missing.returncode == 1 and "in no tarball" in missing.stderr


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


def test_locate_reads_only_block_starts_in_packdebug_layout(image, tmp_path):
    big_image(image, tmp_path, count=4)
    tarball = pack(image)
    archive = pd.Archive(tarball)
    assert archive._is_packdebug_layout()
    names = [i.name for i in pd.Archive(tarball).members()]
    for name in names:
        fresh = pd.Archive(tarball)
        assert fresh.locate(name).name == name
    fresh = pd.Archive(tarball)
    fresh.locate(names[-1])
    assert fresh.reader.decoded < pd.BLOCK_SIZE
    for missing in (
        "usr/lib/debug/.build-id/00/0000.debug",
        "usr/lib/debug/usr/lib/big1.so.debug.x",
        "zzz",
    ):
        fresh = pd.Archive(tarball)
        assert fresh.locate(missing) is None
        assert fresh.reader.decoded < 1 << 20, (missing, fresh.reader.decoded)
    assert pd.Archive(tarball).locate_by_walking("zzz") is None  # the slow way agrees


# ---------------------------------------------------------------------------
# 5b. bad input: clear one-line errors, never a traceback, a hang or a partial file
# ---------------------------------------------------------------------------


def in_process(*args) -> tuple[int, str, str]:
    out, err = io.StringIO(), io.StringIO()
    with contextlib.redirect_stdout(out), contextlib.redirect_stderr(err):
        code = pd.main([str(a) for a in args])
    return code, out.getvalue(), err.getvalue()


def rewrite_index(data: bytes, change) -> bytes:
    """Apply change(records) to a one-stream xz file's Index, keeping CRCs valid."""
    _, index_size = pd.parse_stream_footer(data[-12:])
    records = change(pd.parse_index(data[-12 - index_size : -12]))
    index = pd.create_index(records)
    assert len(index) == index_size, "the lie must keep the Index size"
    return data[: -12 - index_size] + index + data[-12:]


@pytest.fixture
def packed(image, tmp_path) -> pathlib.Path:
    big_image(image, tmp_path, count=1, size=2 << 20)
    return pack(image)


def bad_inputs(packed: pathlib.Path, tmp_path: pathlib.Path) -> dict:
    data = packed.read_bytes()
    blocks = pd.XzReader(packed).layout.blocks
    second = blocks[1]
    big0 = pd.Archive(packed).locate("usr/lib/debug/usr/lib/big0.so.debug")
    lied = next(
        b.number - 1
        for b in blocks
        if b.uncompressed_offset <= big0.offset_data < b.uncompressed_end
    )
    corrupt = bytearray(data)
    corrupt[second.offset + 40] ^= 0xFF
    wrong_check = bytearray(data)
    wrong_check[second.end - 1] ^= 0x01  # last byte of its CRC64
    raw = tarfile.TarInfo("usr/lib/debug/long").tobuf(tarfile.USTAR_FORMAT)
    fields = bytearray(raw)
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
            assert (
                "Traceback" not in result.stderr
                and str(path) in result.stdout + result.stderr
            ), (name, args)
            errors = [
                line
                for line in result.stderr.splitlines()
                if "error" in line or "warning" in line
            ]
            assert errors or "FAIL" in result.stdout, (name, args)
            assert not out.exists() and path.read_bytes() == before, (name, args)
            assert not [p for p in path.parent.iterdir() if p.name.endswith(".tmp")]
        shutil.rmtree(tmp_path / "all", ignore_errors=True)


def test_cuts_and_flipped_bytes_anywhere_never_crash(image, packed, tmp_path):
    data = packed.read_bytes()
    original = (image / "usr/lib/debug/usr/lib/big0.so.debug").read_bytes()
    rng = random.Random(5)
    points = sorted(
        {
            *range(0, 64, 3),
            *range(len(data) - 64, len(data)),
            *(rng.randrange(len(data)) for _ in range(60)),
        }
    )
    target = tmp_path / "t.tar.xz"
    out = tmp_path / "out.debug"
    for point in points:
        for variant in ("cut", "flip"):
            mutated = bytearray(data[:point] if variant == "cut" else data)
            if variant == "flip":
                mutated[point] ^= 1 << rng.randrange(8)
            target.write_bytes(bytes(mutated))
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
                assert code in (0, 1), (variant, point, args)
                assert (
                    code == 0 or "packdebug: error: " in stderr or "FAIL" in stdout
                ), (variant, point, args)
                if args[0] == "extract" and code == 1:
                    assert not out.exists(), (variant, point)
                if (
                    args[0] == "extract" and code == 0
                ):  # the damage missed this member's blocks
                    assert out.read_bytes() == original, (variant, point)
                out.unlink(missing_ok=True)


# ---------------------------------------------------------------------------
# 6. binhost upkeep: repack
# ---------------------------------------------------------------------------


def test_repack_turns_portage_tarball_into_exactly_what_pack_writes(image, tmp_path):
    tarball = portage_tarball(image, tmp_path / "hello-1.0-1-debug.tar.xz")
    result = cli("repack", tarball)
    assert (
        "repacked (" in result.stdout
        and "1 xz block" in result.stdout
        and "repacked 1 of 1" in result.stdout
    )
    assert tarball.read_bytes() == pack(image).read_bytes()
    assert cli("verify", tarball).returncode == 0


def test_repack_keeps_file_contents_byte_identical(image, tmp_path):
    need("tar")
    tarball = portage_tarball(image, tmp_path / "p-debug.tar.xz")
    (tmp_path / "before").mkdir()
    run("tar", "-xJf", tarball, "-C", tmp_path / "before")
    cli("repack", tarball)
    (tmp_path / "after").mkdir()
    run("tar", "-xJf", tarball, "-C", tmp_path / "after")
    before, after = snapshot(tmp_path / "before"), snapshot(tmp_path / "after")
    assert {k: v[:3] for k, v in before.items() if v[0] == "file"} == {
        k: v[:3] for k, v in after.items() if v[0] == "file"
    }
    assert {k: v for k, v in before.items() if v[0] == "symlink"} == {
        k: v for k, v in after.items() if v[0] == "symlink"
    }


def test_repack_skips_canonical_tarballs_unless_forced_and_dry_run_writes_nothing(
    image, tmp_path
):
    tarball = pack(image)
    stamp = tarball.stat().st_mtime_ns
    assert (
        "repacked 0 of 1" in cli("repack", tarball).stdout
        and tarball.stat().st_mtime_ns == stamp
    )
    forced = cli("repack", "--force", tarball).stdout
    assert "--force" in forced and tarball.stat().st_mtime_ns != stamp
    assert tarball.read_bytes() == pack(image).read_bytes()
    portage = portage_tarball(image, tmp_path / "p-debug.tar.xz")
    before, stamp = portage.read_bytes(), portage.stat().st_mtime_ns
    dry = cli("repack", "--dry-run", "--root", tmp_path).stdout
    assert f"{portage}: would repack:" in dry and "member names are not clean" in dry
    assert portage.read_bytes() == before and portage.stat().st_mtime_ns == stamp


def test_repack_leaves_a_damaged_tarball_untouched(packed, tmp_path):
    broken = bad_inputs(packed, tmp_path)["corrupted block"]
    before = broken.read_bytes()
    result = cli("repack", broken, check=False)
    assert (
        result.returncode == 1 and "fails verification, left untouched" in result.stderr
    )
    assert broken.read_bytes() == before


def test_repack_of_a_large_single_block_tarball_spools_it(image, tmp_path):
    ids = big_image(
        image, tmp_path, count=2, size=10 << 20
    )  # one block of more than 16 MiB
    tarball = portage_tarball(image, tmp_path / "big-debug.tar.xz")
    assert len(xz_blocks(tarball)) == 1
    cli("repack", tarball)
    assert tarball.read_bytes() == pack(image).read_bytes()
    for build_id, path in ids.items():
        cli("extract", tarball, "--build-id", build_id, "-o", tmp_path / "x")
        run("cmp", path, tmp_path / "x")


def test_debuginfod_0192_seeks_in_a_repacked_portage_tarball(image, tmp_path):
    root = tmp_path / "root"
    (root / "app-misc/hello").mkdir(parents=True)
    tarball = portage_tarball(image, root / "app-misc/hello/hello-1.0-1-debug.tar.xz")
    cli("repack", tarball)
    ids = {
        readelf_build_id(image / "usr/bin/hello"): debug_file(image),
        readelf_build_id(image / "usr/lib/libgreet.so.1"): debug_file(
            image, "usr/lib/libgreet.so.1"
        ),
    }
    assert_served_by_seeking(root, tarball, ids)


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
    pkgdir: pathlib.Path,
    category: str,
    pn: str,
    pf: str,
    build_id: str | None,
    image: dict,
) -> pathlib.Path:
    """A GPKG binpkg (FACTS.md §5): an uncompressed tar of PF[-BUILD_ID]/{gpkg-1,
    metadata.tar.xz, image.tar.xz, Manifest}, image members under image/."""
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
        self, category: str, pn: str, pf: str, build_id: str | None, fmt: str = "gpkg"
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

    def installed(self, category: str, pf: str, build_id: str | None) -> None:
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
    )  # PMS 3.3: trailing zeros after a leading zero do not count


def test_tarball_names_parse_in_both_schemes():
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
    host.tarball(
        "app-misc/old/old-0.9-debug.tar.xz"
    )  # no BUILD_ID, nothing: removed, dirs stay (old-1)
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
    data = json.loads(Binhost.prune(host, "--json", "--dry-run").stdout)
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
    )  # a pack writing right now
    host.binpkg("dev-libs", "other", "other-1", "1")
    out = host.prune("--keep-newest", "0").stdout
    for name in (
        "dev-libs/linked",
        "dev-libs/foo/foo-2-1-debug.tar.xz",
        "dev-libs/foo/README",
        "dev-libs/foo/bar-1-1-debug.tar.xz",
        "stray-debug.tar.xz",
        "a/b/c",
    ):
        assert f"unrecognised, kept: {name}\n" in out, name
    assert "removed dev-libs/foo/foo-1-1-debug.tar.xz" in out
    assert (
        outside / "foo/foo-1-1-debug.tar.xz"
    ).read_bytes() == b"outside" and temp.exists()
    assert (host.root / "dev-libs/foo/foo-2-1-debug.tar.xz").is_symlink()


def test_prune_refuses_without_pkgdir_or_binpkgs(tmp_path):
    host = Binhost(tmp_path)
    host.tarball("dev-libs/foo/foo-1-1-debug.tar.xz")
    empty = host.prune("--keep-newest", "0", check=False)
    assert empty.returncode == 2 and "holds no binary packages" in empty.stderr
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
    assert host.left() == {"dev-libs/foo/foo-1-1-debug.tar.xz"}


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
    )  # orphan: goes, and would empty the directory
    host.binpkg("app-misc", "hello", "hello-1.0", "2")
    rng = random.Random(4)
    (image / "usr/lib/debug/usr/lib/blob").write_bytes(
        rng.getrandbits(8 * (12 << 20)).to_bytes(12 << 20, "little")
    )
    target = host.root / "app-misc/hello/hello-1.0-2-debug.tar.xz"
    pack_proc = subprocess.Popen(
        [sys.executable, SCRIPT, "pack", "--image", image, "--output", target, "-j1"],
        stderr=subprocess.PIPE,
        text=True,
    )
    deadline = time.monotonic() + 30
    while (
        not list((host.root / "app-misc/hello").glob(".*.tmp"))
        and time.monotonic() < deadline
    ):
        time.sleep(0.02)
    temps = list((host.root / "app-misc/hello").glob(".*.tmp"))
    assert temps, "the pack's temporary file never appeared"
    out = host.prune("--keep-newest", "0").stdout
    assert "removed app-misc/hello/hello-0.9-1-debug.tar.xz" in out
    assert temps[0].exists()
    assert pack_proc.wait(timeout=120) == 0, pack_proc.stderr.read()
    assert host.left() == {"app-misc/hello/hello-1.0-2-debug.tar.xz"}
    assert cli("verify", target).returncode == 0


# ---------------------------------------------------------------------------
# 6. binhost upkeep: settings --debuginfod
# ---------------------------------------------------------------------------


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
    assert (
        "--listen-address" not in server_command(old)
        and "listens on ALL" in old
        and "never seeks" in old
    )
    assert 'DEBUGINFOD_URLS="http://127.0.0.1:9000"' in new
    assert "-Z .tar.xz /usr/lib/debug/.tarball" in server_command(new)
    data = debuginfod_json("--debuginfod-version", "0.192")
    assert (
        data["argv"][0] == "debuginfod"
        and "-Z" in data["argv"]
        and data["client"]["DEBUGINFOD_URLS"]
    )


def test_debuginfod_unit_passes_systemd_analyze_verify(tmp_path):
    need("systemd-analyze")
    root, pkgdir = tmp_path / "tarballs", tmp_path / "binpkgs"
    root.mkdir()
    pkgdir.mkdir()
    data = debuginfod_json("--root", root, "--pkgdir", pkgdir)
    unit = tmp_path / "debuginfod.service"
    unit.write_text(data["unit"])
    result = run("systemd-analyze", "verify", unit, check=False, text=True)
    assert result.returncode == 0 and not result.stderr.strip(), result.stderr
    assert (
        f"BindReadOnlyPaths=-/usr/src/debug /usr/bin -/usr/lib64 /usr/lib -/bin {root} {pkgdir}"
        in data["unit"]
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
    command = server_command(text)
    with (
        open(tmp_path / "debuginfod.log", "w") as log,
        subprocess.Popen(
            ["sh", "-c", f"exec {command}"], stdout=log, stderr=log
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


# ---------------------------------------------------------------------------
# 6. settings
# ---------------------------------------------------------------------------


def test_settings_for_make_conf_say_where_each_line_goes():
    out = cli("settings").stdout
    lines = out.splitlines()
    for var, value, where in [
        ("UNINSTALL_IGNORE", "/usr/lib/debug/.tarball/*", "make.conf:"),
        ("COLLISION_IGNORE", "/usr/lib/debug/.tarball/*", "make.conf:"),
        ("PKG_INSTALL_MASK", "/usr/lib/debug/ /usr/src/debug/", "make.conf or bashrc:"),
    ]:
        i = lines.index(f'{var}="${{{var}}} {value}"')
        comment = [line for line in lines[:i] if line.startswith("#")]
        block_start = max(j for j in range(i) if lines[j] == "") + 1
        assert lines[block_start].startswith(f"# {where}"), var
        assert comment
    assert 'INSTALL_MASK="${INSTALL_MASK}' not in out


def test_settings_dedup_adds_install_mask_with_the_tarball_exception_and_its_caveat():
    out = cli("settings", "--dedup").stdout
    assert (
        'INSTALL_MASK="${INSTALL_MASK} /usr/lib/debug/ /usr/src/debug/ -/usr/lib/debug/.tarball"'
        in out
    )
    assert "BEFORE pkg_preinst" in out and "--remove-packed" in out


def test_settings_shell_format_evaluates_in_bash_and_appends():
    need("bash")
    script = cli("settings", "--format", "shell", "--dedup").stdout
    out = run(
        "bash",
        "-c",
        'PKG_INSTALL_MASK="/usr/share/doc"; eval "$1"; '
        'printf "%s\\n" "$PKG_INSTALL_MASK" "$UNINSTALL_IGNORE" "$INSTALL_MASK"; env | grep -c "^UNINSTALL_IGNORE="',
        "-",
        script,
        text=True,
    ).stdout.splitlines()
    assert out == [
        "/usr/share/doc /usr/lib/debug/ /usr/src/debug/",
        "/usr/lib/debug/.tarball/*",
        "/usr/lib/debug/ /usr/src/debug/ -/usr/lib/debug/.tarball",
        "1",
    ]


def test_settings_json_lists_every_variable_with_where_and_why():
    data = json.loads(cli("settings", "--format", "json").stdout)
    assert data["portage"] == "3.0.83"
    assert [s["variable"] for s in data["settings"]] == [
        "UNINSTALL_IGNORE",
        "COLLISION_IGNORE",
        "PKG_INSTALL_MASK",
    ]
    assert all(s["where"] and s["why"] and s["append"] for s in data["settings"])


def test_bashrc_snippet_runs_pack_in_pre_pkg_preinst(image, tmp_path):
    need("bash")
    snippet = cli("settings", "--bashrc").stdout
    assert (
        "pre_pkg_preinst()" in snippet
        and "pack -q" in snippet
        and "--remove-packed" not in snippet
    )
    assert "--remove-packed" in cli("settings", "--bashrc", "--dedup").stdout
    builddir = tmp_path / "build"
    (builddir / "build-info").mkdir(parents=True)
    (builddir / "build-info/BUILD_ID").write_text("7")
    # Run the hook the way ebuild.sh would: Portage's variables as shell
    # variables, not exported, and die() defined.
    hook = (
        f'{snippet}\ndie() {{ echo "die: $*" >&2; exit 1; }}\n'
        f"ED={image} CATEGORY=app-misc PN=hello PF=hello-1.0 PORTAGE_BUILDDIR={builddir}\n"
        f"pre_pkg_preinst\n"
    )
    env = {k: v for k, v in os.environ.items() if k not in pd.PORTAGE_INPUTS}
    run("bash", "-c", hook, env=env)
    assert (
        image / "usr/lib/debug/.tarball/app-misc/hello/hello-1.0-7-debug.tar.xz"
    ).is_file()


# ---------------------------------------------------------------------------
# 7. command line
# ---------------------------------------------------------------------------


def test_help_of_every_command_teaches_with_examples():
    for command in ("pack", "buildid", "settings"):
        out = cli(command, "--help").stdout
        assert "example" in out, command


def test_usage_errors_exit_2_without_traceback():
    result = cli("pack", "--jobs", "many", check=False)
    assert result.returncode == 2 and "Traceback" not in result.stderr
    result = cli("pack", "--block-size", "huge", check=False)
    assert result.returncode == 2 and "not a size" in result.stderr


def test_parse_size_accepts_the_usual_spellings():
    assert [
        pd.parse_size(s) for s in ("8MiB", "8M", "8m", "512k", "1048576", "1GiB")
    ] == [8 << 20, 8 << 20, 8 << 20, 512 << 10, 1 << 20, 1 << 30]
