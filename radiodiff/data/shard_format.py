"""Writing the shard format: deterministic WebDataset tars and the manifest's shard entries.

A shard is a plain POSIX tar of samples, each sample's members adjacent and named
``{key}.{member}`` (see ``schema.IMAGE_SAMPLES``, and ``schema.LATENT_SAMPLES`` for a latent cache).
Tar headers carry no time, owner or mode variation, so the same samples always produce the same
bytes and the same sha256: a re-run can tell an intact shard from a stale or corrupt one by its
checksum alone.
"""

from __future__ import annotations

import hashlib
import io
import tarfile
from typing import Iterable

from radiodiff.data.schema import IMAGE_SAMPLES, SampleFormat


def shard_path(split: str, index: int) -> str:
    """Path of a shard relative to the shard root."""
    return f"{split}/{split}-{index:06d}.tar"


def write_tar(samples: Iterable[tuple[str, dict[str, bytes]]], fmt: SampleFormat = IMAGE_SAMPLES) -> bytes:
    """(key, members) pairs -> tar bytes; members in the fixed order of ``fmt.members``, and no others."""
    buffer = io.BytesIO()
    with tarfile.open(fileobj=buffer, mode="w", format=tarfile.USTAR_FORMAT) as tar:
        for key, members in samples:
            unknown = sorted(set(members) - set(fmt.members))
            assert not unknown, f"{key}: members {unknown} are not part of the format"
            for member in fmt.members:
                if member not in members:
                    continue
                info = tarfile.TarInfo(f"{key}.{member}")
                info.size = len(members[member])
                info.mode = 0o644
                info.mtime = 0
                tar.addfile(info, io.BytesIO(members[member]))
    return buffer.getvalue()


def sha256(data: bytes) -> str:
    return hashlib.sha256(data).hexdigest()
