"""Summarise a shard set and verify it against its manifest.

    python tools/inspect_shards.py <shard root or URL> [--verify] [--show N]

Prints the manifest's protocol and settings, per split the maps, samples, shards and bytes, and
the skipped source files. With --verify every shard is read and checked: size, sha256, sample count
and member types (the same checks the training reader makes). --show N lists the first N sample
keys of each split. Exit code 1 when verification finds a problem, 2 for an unreadable root.
"""

from __future__ import annotations

import argparse
import sys

from radiodiff.data.schema import DataFormatError
from radiodiff.data.manifest import join_url, manifest_summary, read_manifest, split_shards
from radiodiff.data.shard_stream import fetch_shard, index_tar


def verify(root: str, manifest: dict, show: int) -> int:
    """Read every shard; returns the number of problems found (each is printed)."""
    problems = 0
    for split in manifest["splits"]:
        keys: list[str] = []
        for shard in split_shards(manifest, split, root):
            try:
                samples = index_tar(fetch_shard(root, shard, verify=True), join_url(root, shard.path))
                if len(samples) != shard.num_samples:
                    raise DataFormatError(f"{shard.path}: {len(samples)} samples, manifest says {shard.num_samples}")
                keys += [key for key, _ in samples]
            except DataFormatError as err:
                problems += 1
                print(f"  BAD {err}")
        duplicates = len(keys) - len(set(keys))
        if duplicates:
            problems += 1
            print(f"  BAD {split}: {duplicates} duplicate sample keys")
        print(f"  {split}: {len(keys)} samples verified" + (f"; first: {', '.join(keys[:show])}" if show else ""))
    return problems


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("root")
    parser.add_argument("--verify", action="store_true")
    parser.add_argument("--show", type=int, default=0)
    args = parser.parse_args(argv)
    try:
        manifest = read_manifest(args.root)
    except DataFormatError as err:
        print(f"error: {err}", file=sys.stderr)
        return 2
    print("\n".join(manifest_summary(manifest)))
    if not (args.verify or args.show):
        return 0
    problems = verify(args.root, manifest, args.show)
    print("all shards verified" if not problems else f"{problems} problem(s) found")
    return 1 if problems else 0


if __name__ == "__main__":
    sys.exit(main())
