#!/usr/bin/env python3
"""make bench: packdebug measured side by side with what a binhost runs today.

Everything runs in one go, on the same inputs, at the same preset (6):

  pack    packdebug pack -j1 and -jN (N = all CPUs), against
          Portage's own command:  tar -cJf - ./usr/src/debug ./usr/lib/debug
          xz >= 5.6's default:    tar -cf - ... | xz -6 -T N --block-size=24MiB
          (spelled out, so that it also runs with xz 5.4)
  blocks  packdebug at several --block-size against one plain xz block
  small   pack of a one-binary image against Portage's command (fixed cost)
  big     peak memory on a ~1 GiB image against a ~50 MiB one; extraction of
          the last debug file by build-id against xz -dc | tar -xO, from
          packdebug's tarball and from Portage's single-block one; peak memory
          of list, verify and extract

Inputs, built once and cached under --work (default /var/tmp/packdebug-bench):
  dbg    Debian -dbg packages (apt-get download + dpkg -x), as shipped: their
         debug sections are zlib-compressed, as with FEATURES=compressdebug
  plain  the same with the sections decompressed (objcopy
         --decompress-debug-sections), as Gentoo builds without compressdebug
  big    plain repeated to ~1 GiB, each copy with its own build-ids
  small  tests/estrip-image.sh: one program split the estrip way
--image DIR replaces dbg and plain by any image directory.

Times are medians of --runs runs; the report is Markdown on stdout and JSON in
bench-results/results.json.
"""

from __future__ import annotations

import argparse
import hashlib
import json
import os
import pathlib
import platform
import re
import shutil
import statistics
import subprocess
import sys
import time

HERE = pathlib.Path(__file__).resolve().parent.parent
PACKDEBUG = HERE / "packdebug.py"
sys.path.insert(0, str(HERE))
import packdebug as pd

DEBS = ("python3.11-dbg", "libc6-dbg")
MiB = 1 << 20


def sh(command: str, **kwargs) -> subprocess.CompletedProcess:
    return subprocess.run(command, shell=True, check=True, **kwargs)


def measure(argv: list[str]) -> tuple[float, int]:
    """Wall seconds and peak RSS (KiB) of one run, its largest process.

    GNU time reports the RSS: a child forked from this Python process would
    count this process's memory until it execs.
    """
    report = HERE / "bench-results" / ".time"
    report.parent.mkdir(exist_ok=True)
    start = time.perf_counter()
    result = subprocess.run(
        ["/usr/bin/time", "-f", "%M", "-o", str(report), *argv],
        stdout=subprocess.DEVNULL,
        check=False,
    )
    wall = time.perf_counter() - start
    if result.returncode:
        raise SystemExit(f"bench: {argv} failed ({result.returncode})")
    return wall, int(report.read_text().split()[-1])


def repeat(argv: list[str], runs: int) -> dict:
    samples = [measure(argv) for _ in range(runs)]
    return {
        "wall": statistics.median(s[0] for s in samples),
        "walls": [round(s[0], 3) for s in samples],
        "rss_kib": max(s[1] for s in samples),
    }


def trees(image: pathlib.Path) -> str:
    return " ".join(f"./{t}" for t in pd.DEBUG_TREES if (image / t).is_dir())


def tarball_facts(path: pathlib.Path) -> dict:
    reader = pd.XzReader(path)
    facts = {
        "path": str(path),
        "size": path.stat().st_size,
        "blocks": len(reader.layout.blocks),
        "seekable": pd.seekability(reader.layout).ok,
    }
    reader.close()
    return facts


# ---------------------------------------------------------------------------
# inputs
# ---------------------------------------------------------------------------


def cached(work: pathlib.Path, name: str, build) -> pathlib.Path:
    """work/name, built once by build(staging directory), then renamed into place."""
    image = work / name
    if not (image / "usr/lib/debug").is_dir():
        staging = work / f"{name}.tmp"
        shutil.rmtree(staging, ignore_errors=True)
        build(staging)
        staging.rename(image)
    return image


def install(work: pathlib.Path) -> pathlib.Path:
    """`make install` into work/install: the launcher that runs compiled bytecode."""
    prefix = work / "install"
    shutil.rmtree(prefix, ignore_errors=True)
    subprocess.run(
        [
            "make",
            "-s",
            "-C",
            HERE,
            "install",
            f"PREFIX={prefix}",
            f"PYTHON={sys.executable}",
        ],
        check=True,
        stdout=subprocess.DEVNULL,
    )
    return prefix / "bin/packdebug"


def build_dbg(work: pathlib.Path) -> pathlib.Path:
    def build(staging: pathlib.Path) -> None:
        debs = work / "debs"
        debs.mkdir(parents=True, exist_ok=True)
        if subprocess.run(
            ["apt-get", "download", *DEBS], cwd=debs, check=False
        ).returncode:
            sh("apt-get update -q", stdout=subprocess.DEVNULL)
            subprocess.run(["apt-get", "download", *DEBS], cwd=debs, check=True)
        extracted = work / "debs.x"
        shutil.rmtree(extracted, ignore_errors=True)
        for package in DEBS:  # not the kernel's, which shares the directory
            deb = max(debs.glob(f"{package}_*.deb"))
            subprocess.run(["dpkg", "-x", deb, extracted], check=True)
        (staging / "usr/lib").mkdir(parents=True)
        (extracted / "usr/lib/debug").rename(
            staging / "usr/lib/debug"
        )  # only the debug info
        shutil.rmtree(extracted)

    return cached(work, "dbg", build)


def build_plain(work: pathlib.Path, dbg: pathlib.Path) -> pathlib.Path:
    def build(staging: pathlib.Path) -> None:
        sh(f"cp -a {dbg} {staging}")
        for path in sorted(staging.rglob("*")):
            if (
                not path.is_file()
                or path.is_symlink()
                or path.read_bytes()[:4] != b"\x7fELF"
            ):
                continue
            decompress = ["objcopy", "--decompress-debug-sections", path]
            if subprocess.run(
                decompress, stderr=subprocess.DEVNULL, check=False
            ).returncode:
                subprocess.run(
                    ["eu-elfcompress", "-q", "-t", "none", path], check=True
                )  # objcopy refuses some

    return cached(work, "plain", build)


def build_big(
    work: pathlib.Path, plain: pathlib.Path, target: int = 1 << 30
) -> pathlib.Path:
    """Copies of plain, each debug file with a fresh build-id, up to ~target bytes."""

    def build(staging: pathlib.Path) -> None:
        files = sorted(
            p
            for p in (plain / "usr/lib/debug").rglob("*.debug")
            if p.is_file() and not p.is_symlink()
        )
        total, copy = 0, 0
        while total < target:
            copy += 1
            for src in files:
                data = bytearray(src.read_bytes())
                old = pd.read_build_id(src)
                new = hashlib.sha1(f"{copy}:{old}".encode()).hexdigest()[: len(old)]
                at = data.find(b"GNU\0" + bytes.fromhex(old), 0, MiB)
                data[at + 4 : at + 4 + len(old) // 2] = bytes.fromhex(new)
                dst = staging / f"usr/lib/debug/.build-id/{new[:2]}/{new[2:]}.debug"
                dst.parent.mkdir(parents=True, exist_ok=True)
                dst.write_bytes(data)
                total += len(data)
                if total >= target:
                    break

    return cached(work, "big", build)


def build_plain50(
    work: pathlib.Path, big: pathlib.Path, target: int = 50 * MiB
) -> pathlib.Path:
    """The first ~50 MiB of big: the same kind of data, a twentieth of the size."""

    def build(staging: pathlib.Path) -> None:
        total = 0
        for src in sorted((big / "usr/lib/debug").rglob("*.debug")):
            dst = staging / src.relative_to(big)
            dst.parent.mkdir(parents=True, exist_ok=True)
            shutil.copy2(src, dst)
            total += src.stat().st_size
            if total >= target:
                break

    return cached(work, "plain50", build)


def build_small(work: pathlib.Path) -> pathlib.Path:
    image = work / "small"
    if not image.is_dir():
        subprocess.run(["bash", HERE / "tests/estrip-image.sh", image], check=True)
    return image


def image_size(image: pathlib.Path) -> int:
    return sum(
        p.stat().st_size
        for t in pd.DEBUG_TREES
        for p in (image / t).rglob("*")
        if p.is_file() and not p.is_symlink()
    )


# ---------------------------------------------------------------------------
# contenders
# ---------------------------------------------------------------------------


def pack_argv(
    image: pathlib.Path, out: pathlib.Path, jobs: int, *extra: str
) -> list[str]:
    return [
        sys.executable,
        str(PACKDEBUG),
        "pack",
        "--image",
        str(image),
        "--output",
        str(out),
        "-q",
        "-j",
        str(jobs),
        *extra,
    ]


def portage_argv(image: pathlib.Path, out: pathlib.Path) -> list[str]:
    return ["sh", "-c", f"cd {image} && tar -cJf - {trees(image)} > {out}"]


def xz56_argv(image: pathlib.Path, out: pathlib.Path, threads: int) -> list[str]:
    return [
        "sh",
        "-c",
        f"cd {image} && tar -cf - {trees(image)} | xz -6 -T{threads} --block-size=24MiB > {out}",
    ]


def bench_pack(image: pathlib.Path, out: pathlib.Path, runs: int, cpus: int) -> dict:
    out.mkdir(parents=True, exist_ok=True)
    contenders = {
        "packdebug -j1": pack_argv(image, out / "pd-j1-debug.tar.xz", 1),
        f"packdebug -j{cpus}": pack_argv(image, out / f"pd-j{cpus}-debug.tar.xz", cpus),
        "portage tar -cJf": portage_argv(image, out / "portage.tar.xz"),
        "xz -T1 --block-size=24MiB": xz56_argv(image, out / "xz-T1.tar.xz", 1),
        f"xz -T{cpus} --block-size=24MiB": xz56_argv(
            image, out / f"xz-T{cpus}.tar.xz", cpus
        ),
    }
    results = {}
    for name, argv in contenders.items():
        print(f"bench: {image.name}: {name} ...", file=sys.stderr, flush=True)
        result = repeat(argv, runs)
        result.update(
            tarball_facts(
                pathlib.Path(argv[argv.index("--output") + 1])
                if "--output" in argv
                else pathlib.Path(argv[-1].rsplit("> ", 1)[1])
            )
        )
        results[name] = result
    return {"image": str(image), "bytes": image_size(image), "contenders": results}


def bench_blocks(image: pathlib.Path, out: pathlib.Path, cpus: int) -> list[dict]:
    """Compressed size and worst-case extraction cost per block size."""
    rows = []
    one = out / "one-block.tar.xz"
    sh(f"cd {image} && tar -cf - {trees(image)} | xz -6 -T1 > {one}")
    base = one.stat().st_size
    reader = pd.XzReader(one)
    rows.append(
        {
            "block_size": "one block",
            "size": base,
            "ratio": 1.0,
            "worst_decompress": reader.size,
        }
    )
    for size in ("1MiB", "2MiB", "4MiB", "8MiB", "16MiB", "24MiB"):
        path = out / f"blocks-{size}-debug.tar.xz"
        print(f"bench: blocks {size} ...", file=sys.stderr, flush=True)
        measure(pack_argv(image, path, cpus, "--block-size", size))
        reader = pd.XzReader(path)
        worst = max(b.uncompressed_size for b in reader.layout.blocks)
        rows.append(
            {
                "block_size": size,
                "size": path.stat().st_size,
                "ratio": path.stat().st_size / base,
                "worst_decompress": worst,
                "blocks": len(reader.layout.blocks),
            }
        )
    return rows


def bench_small(
    image: pathlib.Path, out: pathlib.Path, runs: int, launcher: pathlib.Path
) -> dict:
    """The fixed cost per package: run as a script, and as `make install` installs it."""
    out.mkdir(parents=True, exist_ok=True)
    script = pack_argv(image, out / "small-pd-debug.tar.xz", 1)
    return {
        "packdebug (python3 packdebug.py)": repeat(script, runs),
        "packdebug (installed)": repeat([str(launcher), *script[2:]], runs),
        "portage tar -cJf": repeat(
            portage_argv(image, out / "small-portage.tar.xz"), runs
        ),
        "python3 -c pass": repeat([sys.executable, "-c", "pass"], runs),
    }


def last_debug_member(tarball: pathlib.Path) -> tuple[str, str]:
    archive = pd.Archive(tarball)
    last = None
    for info in archive.members():
        if info.isreg():
            last = info
    build_id = archive.elf_info(last, sections=False).build_id
    archive.close()
    return last.name, build_id


def bench_big(
    big: pathlib.Path, plain50: pathlib.Path, out: pathlib.Path, runs: int, cpus: int
) -> dict:
    out.mkdir(parents=True, exist_ok=True)
    pd_tar, portage_tar = out / "big-pd-debug.tar.xz", out / "big-portage.tar.xz"
    print("bench: big: packdebug ...", file=sys.stderr, flush=True)
    small_pack = repeat(pack_argv(plain50, out / "plain50-pd-debug.tar.xz", cpus), 1)
    pack = repeat(pack_argv(big, pd_tar, cpus), 1)
    if not portage_tar.exists():
        print(
            "bench: big: Portage's single-block tarball (single-threaded, slow) ...",
            file=sys.stderr,
            flush=True,
        )
        measure(portage_argv(big, portage_tar))
    member, build_id = last_debug_member(pd_tar)
    extracted = out / "extracted.debug"
    extract = repeat(
        [
            sys.executable,
            str(PACKDEBUG),
            "extract",
            str(pd_tar),
            "--build-id",
            build_id,
            "-o",
            str(extracted),
        ],
        max(runs, 5),
    )
    pipe_pd = repeat(
        ["sh", "-c", f"xz -dc {pd_tar} | tar -xO {member} > {out}/x1"], runs
    )
    pipe_portage = repeat(
        ["sh", "-c", f"xz -dc {portage_tar} | tar -xO ./{member} > {out}/x2"], runs
    )
    sh(f"cmp {extracted} {out}/x1 && cmp {extracted} {out}/x2")
    readers = {
        name: repeat([sys.executable, str(PACKDEBUG), *argv, str(pd_tar)], 1)
        for name, argv in (("list", ["list"]), ("verify", ["verify"]))
    }
    readers["extract"] = extract
    return {
        "image_bytes": image_size(big),
        "small_image_bytes": image_size(plain50),
        "pack": pack,
        "pack_small_image": small_pack,
        "member": member,
        "build_id": build_id,
        "extract": extract,
        "xz -dc | tar -xO (packdebug's)": pipe_pd,
        "xz -dc | tar -xO (Portage's)": pipe_portage,
        "readers": readers,
        "tarball": tarball_facts(pd_tar),
        "portage_tarball": tarball_facts(portage_tar),
    }


# ---------------------------------------------------------------------------
# kernel: the size/latency frontier, served by debuginfod 0.192
# ---------------------------------------------------------------------------

KERNEL_DEB = "linux-image-6.12.117+deb12-cloud-amd64-dbg"
HARNESS = pathlib.Path("/var/tmp/debuginfod-harness")
FETCHES = 40  # build-ids fetched per layout, spread over the archive
FETCH_ROUNDS = 3  # each fetched this many times, cold each time
NO_FDCACHE = ["--fdcache-fds=0", "--fdcache-mbs=0"]
# (label, block size, own Blocks from; 0: none, the current rule): the frontier
# measured, packdebug's default among them.
KERNEL_LAYOUTS = [
    ("4 MiB blocks, own blocks from 4 MiB", 4 * MiB, 4 * MiB),
    ("8 MiB blocks, own blocks from 1 MiB", 8 * MiB, 1 * MiB),
    ("8 MiB blocks, own blocks from 8 MiB", 8 * MiB, 8 * MiB),
    ("16 MiB blocks, own blocks from 16 MiB", 16 * MiB, 16 * MiB),
    ("8 MiB blocks, large files go on in 24 MiB blocks", 8 * MiB, 0),
    ("6 MiB blocks, large files go on in 24 MiB blocks (default)", 6 * MiB, 0),
]


def build_kernel(work: pathlib.Path) -> pathlib.Path:
    """The Debian cloud kernel's debug info, downloaded and unpacked once."""

    def build(staging: pathlib.Path) -> None:
        debs = work / "debs"
        debs.mkdir(parents=True, exist_ok=True)
        download = ["apt-get", "download", KERNEL_DEB]
        if not list(debs.glob(f"{KERNEL_DEB.split('+')[0]}*.deb")) and (
            subprocess.run(download, cwd=debs, check=False).returncode
        ):
            sh("apt-get update -q", stdout=subprocess.DEVNULL)
            subprocess.run(["apt-get", "download", KERNEL_DEB], cwd=debs, check=True)
        deb = next(debs.glob(f"{KERNEL_DEB.split('+')[0]}*.deb"))
        subprocess.run(["dpkg", "-x", deb, staging], check=True)

    return cached(work, "kernel", build)


def pack_layout(
    image: pathlib.Path, out: pathlib.Path, block: int, large: int, cpus: int
) -> dict:
    """packdebug pack with this Block layout: wall, peak RSS and the tarball's facts."""
    if not out.exists():
        code = (
            "import sys; sys.path.insert(0, sys.argv[1]); import packdebug as pd\n"
            "request = pd.PackRequest(sys.argv[2], output=sys.argv[3])\n"
            "options = pd.PackOptions(jobs=int(sys.argv[4]), block_size=int(sys.argv[5]), large_member=int(sys.argv[6]))\n"
            "pd.pack(request, options, pd.Log(-1))\n"
        )
        argv = [
            sys.executable,
            "-c",
            code,
            str(HERE),
            str(image),
            str(out),
            str(cpus),
            str(block),
            str(large),
        ]
        wall, rss = measure(argv)
        (out.parent / (out.name + ".measured")).write_text(json.dumps([wall, rss]))
    wall, rss = json.loads((out.parent / (out.name + ".measured")).read_text())
    return {"wall": wall, "rss_kib": rss, **tarball_facts(out)}


def portage_xz58(image: pathlib.Path, out: pathlib.Path) -> dict:
    """Portage's `tar -cJf` with xz 5.8 (-T0, 24 MiB blocks), in the harness's trixie chroot."""
    if not out.exists():
        root = HARNESS / "trixie"
        script = (
            'set -e; mkdir -p "$3/mnt/bench-image" "$3/mnt/bench-out"; '
            'mount --bind -o ro "$1" "$3/mnt/bench-image"; mount --bind "$2" "$3/mnt/bench-out"; '
            'exec chroot "$3" /bin/sh -c "cd /mnt/bench-image && tar -cJf /mnt/bench-out/$4 ./usr/lib/debug"'
        )
        argv = [
            "unshare",
            "--mount",
            "--propagation",
            "private",
            "sh",
            "-c",
            script,
            "sh",
            str(image),
            str(out.parent),
            str(root),
            out.name,
        ]
        wall, rss = measure(argv)
        (out.parent / (out.name + ".measured")).write_text(json.dumps([wall, rss]))
    wall, rss = json.loads((out.parent / (out.name + ".measured")).read_text())
    return {"wall": wall, "rss_kib": rss, **tarball_facts(out)}


def spread_build_ids(tarball: pathlib.Path, count: int) -> list[tuple[str, str]]:
    """(build-id, member) of `count` debug ELF spread evenly over the archive's order."""
    elfs = []
    with pd.Archive(tarball) as archive:
        for info in archive.members():
            elf = archive.elf_info(info, sections=True) if info.isreg() else None
            if elf and elf.is_debuginfo:
                elfs.append((elf.build_id, pd.normalize_name(info.name)))
    return [elfs[int((k + 0.5) * len(elfs) / count)] for k in range(count)]


def cold_fetches(root: pathlib.Path, ids: list, image: pathlib.Path, port: int) -> dict:
    """Serve root with debuginfod 0.192; time cold debuginfod-finds of each build-id.

    Every fetch is cold: a fresh client cache, and a server whose fd cache
    holds nothing (--fdcache-fds=0 --fdcache-mbs=0), so that it extracts the
    file from the archive each time and FETCH_ROUNDS rounds can be taken
    without restarting it.  Each layout gets its own port: a server still
    shutting down would otherwise hold the next one's.
    """
    port = str(port)
    pid = subprocess.run(
        [HARNESS / "run-debuginfod.sh", root, port, *NO_FDCACHE],
        capture_output=True,
        text=True,
        check=True,
    ).stdout.strip()
    times = []
    try:
        subprocess.run(
            [HARNESS / "wait-scan.sh", port, "3600"], capture_output=True, check=True
        )
        for build_id, member in ids * FETCH_ROUNDS:
            start = time.perf_counter()
            got = subprocess.run(
                [HARNESS / "find.sh", port, "debuginfo", build_id],
                capture_output=True,
                text=True,
                check=True,
            ).stdout.strip()
            times.append(time.perf_counter() - start)
            subprocess.run(["cmp", got, image / member], check=True)
            shutil.rmtree(
                got[: got.index("/", len(str(HARNESS / "trixie/tmp/find-cache.")))]
            )
        log = (HARNESS / f"trixie/tmp/debuginfod-{port}/debuginfod.log").read_text(
            errors="replace"
        )
    finally:
        subprocess.run(
            [HARNESS / "stop-debuginfod.sh", pid], capture_output=True, check=False
        )
    times.sort()
    return {
        "median": statistics.median(times),
        "p95": times[round(0.95 * (len(times) - 1))],
        "seeks": log.count("seeking in xz archive"),
    }


def bench_kernel(
    work: pathlib.Path, cpus: int, layouts: list[tuple[str, int, int]]
) -> dict:
    image = build_kernel(work)
    out = work / "out/kernel"
    out.mkdir(parents=True, exist_ok=True)
    rows = {}
    portage_dir = out / "portage/k/kernel"
    portage_dir.mkdir(parents=True, exist_ok=True)
    print(
        "bench: kernel: Portage's tar -cJf with xz 5.8 ...", file=sys.stderr, flush=True
    )
    rows["portage tar -cJf (xz 5.8)"] = portage_xz58(
        image, portage_dir / "kernel-1-debug.tar.xz"
    )
    ids = spread_build_ids(portage_dir / "kernel-1-debug.tar.xz", FETCHES)
    for label, block, large in layouts:
        print(f"bench: kernel: packdebug {label} ...", file=sys.stderr, flush=True)
        directory = out / label.replace(" ", "") / "k/kernel"
        directory.mkdir(parents=True, exist_ok=True)
        rows[label] = pack_layout(
            image, directory / "kernel-1-debug.tar.xz", block, large, cpus
        )
    port = 18900 + os.getpid() % 50
    for n, (label, row) in enumerate(rows.items()):
        print(f"bench: kernel: serving {label} ...", file=sys.stderr, flush=True)
        tarball = pathlib.Path(row["path"])
        served = tarball.parent / (tarball.name + ".served")  # one run's, kept
        if not served.exists():
            fetched = cold_fetches(tarball.parents[1], ids, image, port + n)
            served.write_text(json.dumps(fetched))
        row.update(json.loads(served.read_text()))
    default = next(r for label, r in rows.items() if label.endswith("(default)"))
    return {
        "image_bytes": image_size(image),
        "rows": rows,
        "locate": bench_locate(pathlib.Path(default["path"]), image, install(work)),
    }


def bench_locate(
    tarball: pathlib.Path, image: pathlib.Path, launcher: pathlib.Path, runs: int = 15
) -> dict:
    """Finding one file in the kernel tarball, against python3 -c pass.

    The module is the median-sized one. Debian ships .build-id links for the
    vDSO only: --build-id of the vDSO goes through its link, --build-id of a
    module searches the data for its note in one pass (timed against
    `xz -dc | tar -xO`, which a user would run instead, knowing the name).
    Run as `python3 packdebug.py` (compiled at each start) and as installed
    (`make install`: bytecode compiled once).
    """
    with pd.Archive(tarball) as archive:
        names = [pd.normalize_name(i.name) for i in archive.members()]
    modules = sorted(
        (n for n in names if n.endswith(".ko")),
        key=lambda n: (image / n).stat().st_size,
    )
    module = modules[len(modules) // 2]
    vdso = next(n for n in names if n.endswith("/vdso64.so"))
    out = tarball.parent / "one.debug"
    script = [sys.executable, str(PACKDEBUG)]
    args = ["extract", str(tarball), "-o", str(out)]

    def timed(argv: list[str], expected: str, count: int) -> dict:
        result = repeat(argv, count)
        subprocess.run(["cmp", out, image / expected], check=True)
        out.unlink()
        return result

    module_id, vdso_id = (pd.read_build_id(image / n) for n in (module, vdso))
    rows = {
        "member": module,
        "member_bytes": (image / module).stat().st_size,
        "vdso": vdso,
        "python3 -c pass": repeat([sys.executable, "-c", "pass"], runs),
    }
    for how, command in (
        ("python3 packdebug.py", script),
        ("installed", [str(launcher)]),
    ):
        rows[f"{how} --version"] = repeat([*command, "--version"], runs)
        rows[f"{how} extract --member"] = timed(
            [*command, *args, "--member", module], module, runs
        )
        rows[f"{how} extract --build-id (link)"] = timed(
            [*command, *args, "--build-id", vdso_id], vdso, runs
        )
    rows["installed extract --build-id (no link)"] = timed(
        [str(launcher), *args, "--build-id", module_id], module, 3
    )
    rows["xz -dc | tar -xO"] = timed(
        ["sh", "-c", 'xz -dc "$1" | tar -xO "$2" > "$3"', "sh", tarball, module, out],
        module,
        3,
    )
    return rows


# ---------------------------------------------------------------------------
# binhost: thousands of small tarballs
# ---------------------------------------------------------------------------


BINHOST_PACKAGES = 1000  # the smallest kernel modules: 0.6 GB of debug info


def build_binhost(work: pathlib.Path, kernel: pathlib.Path) -> pathlib.Path:
    """One Portage tarball (`tar -cJf`, single-block with xz 5.4) per kernel module,
    for the BINHOST_PACKAGES smallest.

    Each module is a package's image: its .debug and estrip's .build-id link.
    Each package has two versions, as a binhost keeps them: 1.0 and 1.1.
    """

    def build(staging: pathlib.Path) -> None:
        debug = kernel / "usr/lib/debug"
        modules = [p for p in debug.rglob("*.ko") if p.is_file() and not p.is_symlink()]
        modules = sorted(
            sorted(modules, key=lambda p: p.stat().st_size)[:BINHOST_PACKAGES]
        )
        scratch = work / "binhost.image"
        for n, module in enumerate(modules):
            shutil.rmtree(scratch, ignore_errors=True)
            rel = module.relative_to(debug)
            target = scratch / "usr/lib/debug" / rel
            target.parent.mkdir(parents=True)
            shutil.copy2(module, target)
            build_id = pd.read_build_id(module)
            link = (
                scratch / f"usr/lib/debug/.build-id/{build_id[:2]}/{build_id[2:]}.debug"
            )
            link.parent.mkdir(parents=True)
            link.symlink_to("../../" + str(rel))
            pn = f"m{n:04d}-" + module.name.split(".")[0].replace("_", "-")
            pn = re.sub(r"-(\d)", r"-x\1", pn)  # a PN may not end in -VERSION
            directory = staging / f"sys-kernel-{n // 100:02d}" / pn
            directory.mkdir(parents=True)
            first = directory / f"{pn}-1.0-1-debug.tar.xz"
            sh(f"cd {scratch} && tar -cJf {first} ./usr/lib/debug")
            shutil.copy2(first, directory / f"{pn}-1.1-1-debug.tar.xz")
        shutil.rmtree(scratch, ignore_errors=True)

    tree = work / "binhost"
    if not tree.is_dir():
        print(
            "bench: binhost: one Portage tarball per kernel module (once) ...",
            file=sys.stderr,
            flush=True,
        )
        staging = work / "binhost.tmp"
        shutil.rmtree(staging, ignore_errors=True)
        build(staging)
        staging.rename(tree)
    return tree


def bench_binhost(
    work: pathlib.Path, kernel: pathlib.Path, runs: int, cpus: int
) -> dict:
    """repack --root, verify and find over the binhost tree, -j1 against -jN.

    Portage's single-block tarballs fail verify (not seekable), so verify is
    timed on the repacked tree, as a binhost would run it after repack.
    """
    tree = build_binhost(work, kernel)
    tarballs = sorted(str(p) for p in tree.rglob("*-debug.tar.xz"))
    results = {
        "tarballs": len(tarballs),
        "bytes": sum(os.path.getsize(p) for p in tarballs),
    }
    packdebug = [sys.executable, str(PACKDEBUG)]
    copy = work / "binhost.copy"
    for jobs in (1, cpus):
        shutil.rmtree(copy, ignore_errors=True)
        shutil.copytree(tree, copy)
        print(
            f"bench: binhost: repack --root -j{jobs} ...", file=sys.stderr, flush=True
        )
        results[f"repack -j{jobs}"] = repeat(
            [*packdebug, "repack", "-q", "--root", str(copy), f"-j{jobs}"], 1
        )
    repacked = sorted(str(p) for p in copy.rglob("*-debug.tar.xz"))
    small = work / "binhost.small"
    shutil.rmtree(small, ignore_errors=True)
    for path in tarballs[:200]:
        target = small / pathlib.Path(path).relative_to(tree)
        target.parent.mkdir(parents=True, exist_ok=True)
        shutil.copy2(path, target)
    results["repack 200"] = repeat(
        [*packdebug, "repack", "-q", "--root", str(small), f"-j{cpus}"], 1
    )
    shutil.rmtree(small, ignore_errors=True)
    print("bench: binhost: verify, find ...", file=sys.stderr, flush=True)
    verify = [*packdebug, "verify", "-q"]
    for jobs in (1, cpus):
        results[f"verify -j{jobs}"] = repeat([*verify, f"-j{jobs}", *repacked], runs)
    results["verify 200"] = repeat([*verify, f"-j{cpus}", *repacked[:200]], runs)
    with pd.Archive(repacked[-1]) as archive:
        last = next(
            archive.elf_info(i).build_id for i in archive.members() if i.isreg()
        )
    find = [*packdebug, "find", last]
    results["find (repacked)"] = repeat([*find, str(copy)], runs)
    results["find (Portage's)"] = repeat([*find, str(tree)], runs)
    return results


# ---------------------------------------------------------------------------
# report
# ---------------------------------------------------------------------------


def mib(n: float) -> str:
    return f"{n / MiB:.1f} MiB"


def report_pack(run: dict, cpus: int) -> list[str]:
    c = run["contenders"]
    pd1, pdn = c["packdebug -j1"], c[f"packdebug -j{cpus}"]
    portage, xz1, xzn = (
        c["portage tar -cJf"],
        c["xz -T1 --block-size=24MiB"],
        c[f"xz -T{cpus} --block-size=24MiB"],
    )
    lines = [
        f"Input: `{run['image']}`, {mib(run['bytes'])} of files.",
        "",
        "| contender | wall (median) | output | size / xz -TN | peak RSS | blocks | seekable (0.192) |",
        "| --- | --- | --- | --- | --- | --- | --- |",
    ]
    for name, r in c.items():
        lines.append(
            f"| {name} | {r['wall']:.2f} s | {mib(r['size'])} | {r['size'] / xzn['size']:.3f} | "
            f"{r['rss_kib'] / 1024:.0f} MiB | {r['blocks']} | {'yes' if r['seekable'] else 'no'} |"
        )
    lines += [
        "",
        "| ratio (packdebug / contender) | target | measured |",
        "| --- | --- | --- |",
    ]
    lines += [
        f"| wall, -j1 / xz -T1 | <= 1.0 | {pd1['wall'] / xz1['wall']:.2f} |",
        f"| wall, -j{cpus} / xz -T{cpus} | <= 1.0 | {pdn['wall'] / xzn['wall']:.2f} |",
        f"| wall, -j{cpus} / Portage (1 thread) | <= 0.6 | {pdn['wall'] / portage['wall']:.2f} |",
        f"| size, -j{cpus} / xz -T{cpus} | <= 1.02 | {pdn['size'] / xzn['size']:.3f} |",
        f"| peak RSS, -j1 - xz -T1 | <= +64 MiB | {(pd1['rss_kib'] - xz1['rss_kib']) / 1024:+.0f} MiB |",
        f"| peak RSS, -j{cpus} - xz -T{cpus} | <= +64 MiB | {(pdn['rss_kib'] - xzn['rss_kib']) / 1024:+.0f} MiB |",
    ]
    return lines


def report_kernel(kernel: dict) -> list[str]:
    rows = kernel["rows"]
    portage = rows["portage tar -cJf (xz 5.8)"]
    lines = [
        (
            f"Kernel: `{KERNEL_DEB}`, {mib(kernel['image_bytes'])}; {FETCHES} build-ids "
            f"spread over the archive, each fetched {FETCH_ROUNDS} times, cold, with "
            "`debuginfod-find debuginfo` from debuginfod 0.192 (seeks: of "
            f"{FETCHES * FETCH_ROUNDS} fetches)."
        ),
        "",
        "| layout | size | / Portage | blocks | pack peak RSS | fetch median | / Portage | fetch p95 | / Portage | seeks |",
        "| --- | --- | --- | --- | --- | --- | --- | --- | --- | --- |",
    ]
    for label, r in rows.items():
        lines.append(
            f"| {label} | {r['size'] / 1e6:.1f} MB | {r['size'] / portage['size']:.3f} | {r['blocks']} | "
            f"{r['rss_kib'] / 1024:.0f} MiB | {r['median'] * 1000:.0f} ms | "
            f"{r['median'] / portage['median']:.2f} | {r['p95'] * 1000:.0f} ms | "
            f"{r['p95'] / portage['p95']:.2f} | {r['seeks']} |"
        )
    locate = kernel["locate"]
    base = locate["python3 -c pass"]["wall"]
    lines += [
        "",
        (
            f"Finding one file in the default layout's tarball: the median-sized module "
            f"`{locate['member']}` ({mib(locate['member_bytes'])}), and the vDSO "
            f"`{locate['vdso']}` (the one ELF Debian gives a `.build-id` link):"
        ),
        "",
        "| command | wall (median) | minus python3 -c pass |",
        "| --- | --- | --- |",
    ]
    for name, r in locate.items():
        if isinstance(r, dict):
            name = name.replace("|", "\\|")  # a pipe in a command splits the cell
            lines.append(
                f"| {name} | {r['wall'] * 1000:.0f} ms | {(r['wall'] - base) * 1000:+.0f} ms |"
            )
    return lines


def report_binhost(b: dict, cpus: int) -> list[str]:
    n = b["tarballs"]
    v1, vn = b["verify -j1"], b[f"verify -j{cpus}"]
    r1, rn = b["repack -j1"], b[f"repack -j{cpus}"]
    portage_find = b["find (Portage's)"]["wall"]
    rows = [
        (
            f"repack --root, -j1 / -j{cpus}",
            ">= 1.8x",
            (
                f"{r1['wall']:.0f} s / {rn['wall']:.0f} s = {r1['wall'] / rn['wall']:.2f}x "
                f"({rn['wall'] / n * 1000:.0f} ms per tarball)"
            ),
        ),
        (
            f"verify (the repacked tree), -j1 / -j{cpus}",
            ">= 1.8x",
            (
                f"{v1['wall']:.1f} s / {vn['wall']:.1f} s = {v1['wall'] / vn['wall']:.2f}x "
                f"({vn['wall'] / n * 1000:.1f} ms per tarball)"
            ),
        ),
        (
            "find, a build-id in the last tarball (repacked)",
            "< 2 s",
            f"{b['find (repacked)']['wall']:.2f} s",
        ),
        ("same, in Portage's tarballs", "", f"{portage_find:.2f} s"),
        (
            f"peak RSS of verify -j{cpus}, 200 / {n} tarballs",
            "flat",
            f"{b['verify 200']['rss_kib'] / 1024:.0f} / {vn['rss_kib'] / 1024:.0f} MiB",
        ),
        (
            f"peak RSS of repack -j{cpus}, 200 / {n} tarballs",
            "flat",
            f"{b['repack 200']['rss_kib'] / 1024:.0f} / {rn['rss_kib'] / 1024:.0f} MiB",
        ),
    ]
    return [
        (
            f"Binhost: {n} Portage tarballs (`tar -cJf`, xz 5.4: one block each), "
            f"one per kernel module and version, {mib(b['bytes'])}."
        ),
        "",
        "| measure | target | measured |",
        "| --- | --- | --- |",
        *(f"| {a} | {t} | {m} |" for a, t, m in rows),
    ]


def report(results: dict) -> str:
    cpus = results["cpus"]
    out = [
        (
            f"Machine: {results['machine']}; {results['date']}; `{results['command']}`;"
            f" median of {results['runs']} runs."
        ),
        "",
    ]
    for run in results["pack"]:
        out += report_pack(run, cpus) + [""]
    if results.get("blocks"):
        out += [
            "| block size | compressed | vs one block | worst-case decompression to extract one file |",
            "| --- | --- | --- | --- |",
        ]
        for row in results["blocks"]:
            out.append(
                f"| {row['block_size']} | {mib(row['size'])} | {row['ratio']:.3f} | {mib(row['worst_decompress'])} |"
            )
        out.append("")
    small = results.get("small")
    if small:
        out += [
            "| one-binary image | wall (median) | peak RSS |",
            "| --- | --- | --- |",
        ]
        out += [
            f"| {name} | {r['wall'] * 1000:.0f} ms | {r['rss_kib'] / 1024:.0f} MiB |"
            for name, r in small.items()
        ]
        out.append("")
    big = results.get("big")
    if big:
        ext, p1, p2 = (
            big["extract"],
            big["xz -dc | tar -xO (packdebug's)"],
            big["xz -dc | tar -xO (Portage's)"],
        )
        small_rss = big["pack_small_image"]["rss_kib"]
        out += [
            f"Big image: {mib(big['image_bytes'])}; last debug file `{big['member']}`.",
            "",
            "| measure | target | measured |",
            "| --- | --- | --- |",
            (
                f"| pack -j{cpus} peak RSS, {mib(big['image_bytes'])} / {mib(big['small_image_bytes'])} image "
                f"| within 10% | {big['pack']['rss_kib'] / 1024:.0f} / "
                f"{small_rss / 1024:.0f} MiB = {big['pack']['rss_kib'] / small_rss:.2f} |"
            ),
            (
                f"| extract by build-id vs xz -dc \\| tar -xO, packdebug's tarball | >= 50x faster | "
                f"{ext['wall']:.3f} s vs {p1['wall']:.1f} s = {p1['wall'] / ext['wall']:.0f}x |"
            ),
            (
                f"| same, vs Portage's single-block tarball | >= 50x faster | "
                f"{ext['wall']:.3f} s vs {p2['wall']:.1f} s = {p2['wall'] / ext['wall']:.0f}x |"
            ),
        ]
        out += [
            f"| peak RSS of {name} | bounded | {r['rss_kib'] / 1024:.0f} MiB ({r['wall']:.1f} s) |"
            for name, r in big["readers"].items()
        ]
        out.append("")
    if results.get("kernel"):
        out += report_kernel(results["kernel"]) + [""]
    if results.get("binhost"):
        out += report_binhost(results["binhost"], cpus) + [""]
    return "\n".join(out)


def xz_version() -> str:
    return subprocess.run(
        ["xz", "--version"], capture_output=True, text=True, check=True
    ).stdout.split()[3]


def main() -> int:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument(
        "--work", default="/var/tmp/packdebug-bench", help="inputs and outputs (cached)"
    )
    parser.add_argument(
        "--image",
        action="append",
        help="bench this image directory instead of dbg and plain",
    )
    parser.add_argument(
        "--runs", type=int, default=3, help="runs per measurement (median)"
    )
    parser.add_argument(
        "--skip",
        action="append",
        default=[],
        choices=("pack", "blocks", "small", "big", "kernel", "binhost"),
    )
    args = parser.parse_args()
    work = pathlib.Path(args.work)
    work.mkdir(parents=True, exist_ok=True)
    cpus = pd.available_cpus()
    if args.image:
        images = [pathlib.Path(i).resolve() for i in args.image]
    elif {"pack", "blocks", "big"} - set(args.skip):
        dbg = build_dbg(work)
        images = [dbg, build_plain(work, dbg)]
    else:
        images = []
    results = {
        "machine": f"{platform.node()}, {cpus} CPUs, {platform.machine()}, Python {platform.python_version()}, "
        f"{xz_version()} xz",
        "date": time.strftime("%Y-%m-%d"),
        "command": "make bench",
        "runs": args.runs,
        "cpus": cpus,
    }
    results["pack"] = [
        bench_pack(image, work / "out" / image.name, args.runs, cpus)
        for image in (images if "pack" not in args.skip else [])
    ]
    if "blocks" not in args.skip:
        results["blocks"] = bench_blocks(images[-1], work / "out", cpus)
    if "small" not in args.skip:
        results["small"] = bench_small(
            build_small(work), work / "out", max(args.runs, 20), install(work)
        )
    if "big" not in args.skip and not args.image:
        big = build_big(work, images[-1])
        results["big"] = bench_big(
            big, build_plain50(work, big), work / "out", args.runs, cpus
        )
    if "kernel" not in args.skip:
        results["kernel"] = bench_kernel(work, cpus, KERNEL_LAYOUTS)
    if "binhost" not in args.skip:
        results["binhost"] = bench_binhost(work, build_kernel(work), args.runs, cpus)
    text = report(results)
    print(text)
    (HERE / "bench-results").mkdir(exist_ok=True)
    (HERE / "bench-results/results.json").write_text(
        json.dumps(results, indent=2) + "\n"
    )
    (HERE / "bench-results/report.md").write_text(text + "\n")
    return 0


if __name__ == "__main__":
    sys.exit(main())
