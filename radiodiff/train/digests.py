"""A checkpoint's files hashed by all the ranks, each a share: for its commit record and at resume.

The reference model's checkpoint at 32 ranks is a few GB, most of it the ranks' ZeRO shards. Hashed
by rank 0 alone, every byte of it would cross the shared filesystem to one node at every save and
again at every resume. Here each rank hashes the files its own name is on (its rank file, its ZeRO
shards: what it wrote, still in its page cache, and what it loads at resume); the others, largest
first, go to the least-loaded rank that sees them. Every rank then gets every result, so all take
the same decision.

At commit the list of files is the union of what every rank sees in the folder, so a rank whose view
of a directory on a network filesystem lags still has its own files recorded by itself.
"""

from __future__ import annotations

import re
from pathlib import Path

from radiodiff.dist import all_gather_object, broadcast_object
from radiodiff.runs.layout import CheckpointError, check_file, checkpoint_files, committed_files, file_digest

# Our rank files (rank_00003.pt) and DeepSpeed's ZeRO shards (zero_pp_rank_3_mp_rank_00_..., with a
# bf16_ prefix under its BF16 optimizer): written, and read at resume, by that data-parallel rank.
# mp_rank_00_model_states.pt is rank 0's (unowned here).
_OWNER = re.compile(r"(?:^|/)(?:bf16_)?(?:zero_pp_)?rank_(\d+)[_.]")


def owner(name: str) -> int | None:
    """The rank whose file ``name`` is, where its name says so."""
    found = _OWNER.search(name)
    return int(found.group(1)) if found else None


def shares(listings: list[dict[str, int]]) -> list[list[str]]:
    """Which files each rank hashes: ``listings[r]`` is {file: size} as rank r sees the folder.

    Every file any rank sees goes to exactly one rank that sees it: to its owner where the owner sees
    it, otherwise (largest first) to the one with the fewest bytes so far (the lower rank on a tie).
    """
    seen: dict[str, list[int]] = {}
    sizes: dict[str, int] = {}
    for rank, listing in enumerate(listings):
        for name, size in listing.items():
            seen.setdefault(name, []).append(rank)
            sizes[name] = max(sizes.get(name, 0), size)
    out: list[list[str]] = [[] for _ in listings]
    load = [0] * len(listings)
    rest = []
    for name in sorted(seen):
        rank = owner(name)
        if rank in seen[name]:
            out[rank].append(name)
            load[rank] += sizes[name]
        else:
            rest.append(name)
    for name in sorted(rest, key=lambda n: (-sizes[n], n)):
        rank = min(seen[name], key=lambda r: (load[r], r))
        out[rank].append(name)
        load[rank] += sizes[name]
    return out


def _first(reasons: list[str | None]) -> str | None:
    return next((reason for reason in reasons if reason is not None), None)


def spread_digests(folder: Path, rank: int) -> dict[str, list]:
    """{file: [size, sha256]} of every file of a checkpoint folder but COMMITTED (collective: every
    rank calls it after every rank's files are complete, and gets the whole record). Raises OSError,
    on every rank, naming the file, where any rank could not read its share."""
    reason = None
    try:
        listing = checkpoint_files(folder)
    except OSError as err:  # still enter the collectives below: the other ranks wait in them
        listing, reason = {}, f"{folder}: {err.strerror or err}"
    share = shares(all_gather_object(listing))[rank]
    digests: dict[str, list] = {}
    for name in share if reason is None else []:
        try:
            digests[name] = file_digest(folder / name)
        except OSError as err:
            reason = f"{folder / name}: {err.strerror or err}"
            break
    gathered = all_gather_object((digests, reason))
    if (failed := _first([r for _, r in gathered])) is not None:
        raise OSError(f"hashing the checkpoint's files failed: {failed}")
    return {name: entry for part, _ in gathered for name, entry in part.items()}


def spread_verify(folder: Path, rank: int, world_size: int) -> str | None:
    """Why a committed checkpoint does not verify (None: it does), the same on every rank
    (collective). Rank 0 reads the record; every rank checks its share of the files."""
    record: tuple[dict | None, str | None] = (None, None)
    if rank == 0:
        try:
            record = (committed_files(folder), None)
        except (CheckpointError, ValueError) as err:
            record = (None, str(err))
    files, reason = broadcast_object(record)
    if reason is not None or files is None:  # unreadable, or an older bare-step record
        return reason
    sizes = {name: size for name, (size, _) in files.items()}
    mine = None
    for name in shares([sizes] * world_size)[rank]:
        try:
            check_file(folder, name, *files[name])
        except (CheckpointError, OSError) as err:
            mine = str(err)
            break
    return _first(all_gather_object(mine))
