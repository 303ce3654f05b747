#!/usr/bin/env python3
"""make fuzz: many more fixed-seed cases than `make test` runs, with counts per outcome.

ELF: real seeds (ELF32/64, LE/BE, binaries and .debug, compressed sections,
extended numbering), mutated and cut, through packdebug's ELF reader; every
outcome must be a parse or an ElfError.  Tarballs: a real packed image, cut,
bit-flipped and with Blocks swapped (Index rewritten), through verify, list
and extract; every outcome must be exit 0 (extract: the right bytes) or a
one-line error, never a traceback.

    python3 tests/fuzz.py [--elf N] [--tarballs N] [--seed S]
"""

from __future__ import annotations

import argparse
import collections
import pathlib
import random
import sys
import tempfile
import time

HERE = pathlib.Path(__file__).resolve().parent.parent
sys.path.insert(0, str(HERE))

import test_packdebug as t  # the tests' seeds and mutators


def fuzz_tarballs(work: pathlib.Path, cases: int, seed: int) -> collections.Counter:
    image = work / "image"
    t.run("bash", t.ESTRIP_IMAGE, image)
    t.big_image(image, work, count=1, size=2 << 20)
    tarball = t.pack(image, "-0")
    data = tarball.read_bytes()
    original = (image / "usr/lib/debug/usr/lib/big0.so.debug").read_bytes()
    target, out = work / "t.tar.xz", work / "out.debug"
    outcomes: collections.Counter = collections.Counter()
    for kind, mutated in t.tarball_mutations(data, random.Random(seed), cases):
        target.write_bytes(mutated)
        for command in ("verify", "list", "extract"):
            args = (command, target)
            if command == "extract":
                args += ("--member", "usr/lib/debug/usr/lib/big0.so.debug", "-o", out)
            code, stdout, stderr = t.in_process(*args)
            if code == 0 and command == "extract" and out.read_bytes() != original:
                raise SystemExit(f"fuzz: {kind}: extract wrote wrong bytes")
            if code not in (0, 1) or (
                code and "packdebug: error: " not in stderr and "FAIL" not in stdout
            ):
                raise SystemExit(f"fuzz: {kind}: {command} exited {code}: {stderr}")
            outcomes[f"{command} exit {code}"] += 1
            out.unlink(missing_ok=True)
        outcomes[f"mutation {kind}"] += 1
    return outcomes


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--elf", type=int, default=100_000)
    parser.add_argument("--tarballs", type=int, default=1_000)
    parser.add_argument("--seed", type=int, default=1)
    args = parser.parse_args()
    with tempfile.TemporaryDirectory(prefix="packdebug-fuzz.") as tmp:
        work = pathlib.Path(tmp)
        (work / "seeds").mkdir()
        t.run("bash", t.ESTRIP_IMAGE, work / "seeds/image")
        start = time.monotonic()
        seeds = t.elf_seeds(work / "seeds", work / "seeds/image")
        elf = t.fuzz_elf(seeds, args.elf, args.seed)
        print(
            f"ELF: {args.elf} cases from {len(seeds)} seeds in {time.monotonic() - start:.0f} s"
        )
        for outcome, count in sorted(elf.items()):
            print(f"  {outcome:<14} {count:>8}")
        start = time.monotonic()
        tarballs = fuzz_tarballs(work, args.tarballs, args.seed)
        print(f"tarballs: {args.tarballs} cases in {time.monotonic() - start:.0f} s")
        for outcome, count in sorted(tarballs.items()):
            print(f"  {outcome:<18} {count:>6}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
