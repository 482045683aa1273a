"""Checkpoint files: a run's state with a SHA-256 of its bytes, written to a temporary file and
renamed (a crash mid-write leaves the old checkpoint), verified on load (a damaged or foreign
file is an error naming it). Read by the trainer (resume) and the pictures."""
from __future__ import annotations

import hashlib
import io
import os

import torch

MAGIC = b"pixcon-checkpoint sha256="


def write_checkpoint(state: dict, path: str) -> None:
    """``state`` (torch.save-able) to ``path``: the header line ``MAGIC + hex digest`` and the
    payload. Saving goes to ``path.tmp``, then renamed; a failure removes the temporary file
    and says which path could not be written."""
    buf = io.BytesIO()
    torch.save(state, buf)
    payload = buf.getvalue()
    tmp = f"{path}.tmp"
    try:
        with open(tmp, "wb") as f:
            f.write(MAGIC + hashlib.sha256(payload).hexdigest().encode() + b"\n")
            f.write(payload)
            f.flush()
            os.fsync(f.fileno())
        os.replace(tmp, path)
    except OSError as e:
        try:
            os.remove(tmp)
        except OSError:
            pass
        raise OSError(e.errno, f"could not write the checkpoint {path}: {e.strerror or e} "
                      "(a full disk or a read-only folder?); the previous checkpoint, if any, "
                      "is unchanged") from e


def read_checkpoint(path: str, map_location="cpu") -> dict:
    """The state written by :func:`write_checkpoint`, its checksum verified. Errors name the
    file: missing, not a pixcon checkpoint (empty, foreign, truncated header), or damaged (the
    bytes do not match their checksum)."""
    if not os.path.isfile(path):
        raise FileNotFoundError(f"no checkpoint at {path}")
    with open(path, "rb") as f:
        data = f.read()
    head, sep, payload = data.partition(b"\n")
    if not head.startswith(MAGIC) or not sep or len(head) != len(MAGIC) + 64:
        raise ValueError(f"{path} is not a checkpoint written by pixcon.train ({len(data)} "
                         "bytes, no pixcon checkpoint header)")
    if hashlib.sha256(payload).hexdigest().encode() != head[len(MAGIC):]:
        raise ValueError(f"{path} is damaged: its bytes do not match the checksum written with "
                         "them (a partial copy or a bad disk); resume from another checkpoint "
                         "or start fresh")
    return torch.load(io.BytesIO(payload), map_location=map_location, weights_only=False)
