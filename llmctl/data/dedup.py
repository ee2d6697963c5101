"""Exact and near-duplicate detection: normalised hashes and MinHash LSH (datasketch)."""

from __future__ import annotations

import hashlib
import re
import zlib

import numpy as np
from datasketch import MinHash, MinHashLSH

WORDS = re.compile(r"\w+")
SHINGLE = 5
NUM_PERM = 128


def exact_key(text: str) -> str:
    """Hash of the text with case and whitespace differences removed."""
    return hashlib.sha1(" ".join(text.lower().split()).encode()).hexdigest()


def _crc32(data: bytes) -> int:
    return zlib.crc32(data)


def minhash_signature(text: str, num_perm: int = NUM_PERM) -> np.ndarray:
    """MinHash of the document's word 5-grams (crc32 base hash: deterministic across processes)."""
    words = WORDS.findall(text.lower())
    shingles = {" ".join(words[i : i + SHINGLE]) for i in range(max(1, len(words) - SHINGLE + 1))}
    minhash = MinHash(num_perm=num_perm, seed=1, hashfunc=_crc32, scheme="affine32")
    minhash.update_batch([shingle.encode() for shingle in shingles])
    return minhash.hashvalues.astype(np.uint32)


class NearDuplicateIndex:
    """Keeps the first of every group of documents whose estimated Jaccard similarity reaches `threshold`."""

    def __init__(self, threshold: float, num_perm: int = NUM_PERM) -> None:
        self.threshold = threshold
        self.num_perm = num_perm
        self.lsh = MinHashLSH(threshold=threshold, num_perm=num_perm)
        self.signatures: dict[str, np.ndarray] = {}

    def is_duplicate_then_add(self, key: str, signature: np.ndarray) -> bool:
        minhash = MinHash(num_perm=self.num_perm, hashvalues=signature.astype(np.uint64), scheme="affine32")
        for candidate in self.lsh.query(minhash):
            # LSH buckets are approximate: confirm with the signature estimate before dropping anything.
            if np.mean(self.signatures[candidate] == signature) >= self.threshold:
                return True
        self.lsh.insert(key, minhash)
        self.signatures[key] = signature
        return False
