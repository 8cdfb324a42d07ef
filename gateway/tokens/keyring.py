"""The keys each trusted issuer may sign with right now.

Two sources per issuer: the admin's key files (re-read on SIGHUP) and, when the issuer
names a ``jwks_url``, the keys last fetched from it (see :mod:`gateway.tokens.jwks`). A kid
in a key file wins over the same kid fetched from the network: the admin's word is final.

Every change bumps :attr:`KeyRing.generation`; the verifier drops its cache of verified
tokens when it sees a new generation, so a token signed with a withdrawn key stops working
at once instead of living on in the cache.
"""

from __future__ import annotations

from collections.abc import Mapping

from gateway.config.keys import PublicKey
from gateway.config.settings import Issuer


class KeyRing:
    def __init__(self, issuers: Mapping[str, Issuer]) -> None:
        self._files: dict[str, Mapping[str, PublicKey]] = {
            name: issuer.keys for name, issuer in issuers.items()
        }
        self._fetched: dict[str, Mapping[str, PublicKey]] = {}
        self.generation = 0

    def keys_of(self, issuer: str) -> Mapping[str, PublicKey]:
        """The issuer's usable keys by kid (fetched ones under the files' own)."""
        fetched = self._fetched.get(issuer)
        files = self._files.get(issuer, {})
        if not fetched:
            return files
        return {**fetched, **files}

    def knows(self, issuer: str, kid: str) -> bool:
        return kid in self._files.get(issuer, {}) or kid in self._fetched.get(issuer, {})

    def set_fetched(self, issuer: str, keys: Mapping[str, PublicKey]) -> bool:
        """Replace the keys fetched for ``issuer``; True when the set changed."""
        old = self._fetched.get(issuer, {})
        if _same(old, keys):
            return False
        self._fetched[issuer] = dict(keys)
        self.generation += 1
        return True

    def replace_files(self, issuers: Mapping[str, Issuer]) -> list[str]:
        """Take the key files' keys as just re-read; the names of issuers whose keys
        changed. Issuers are not added or removed here: that needs a restart."""
        changed = []
        for name in self._files:
            issuer = issuers.get(name)
            if issuer is not None and not _same(self._files[name], issuer.keys):
                self._files[name] = issuer.keys
                changed.append(name)
        if changed:
            self.generation += 1
        return changed


def _same(a: Mapping[str, PublicKey], b: Mapping[str, PublicKey]) -> bool:
    if a.keys() != b.keys():
        return False
    return all(a[kid].as_dict(private=False) == b[kid].as_dict(private=False) for kid in a)
