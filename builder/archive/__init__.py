"""Debian archive access, verified end to end.

``verify`` (gpgv on InRelease) → ``release`` (parse the verified text) → ``client.Archive`` (indexes checked
against the Release, pool files against their index) → ``cache.ContentCache`` (sha256-addressed blobs) and
``deb`` (read .deb/.udeb files with the standard library).
"""

from .cache import ContentCache, cache_base
from .client import Archive
from .deb import MissingMemberError, ar_members, deb_control, deb_extract, deb_list
from .http import FetchStats
from .packages import iter_stanzas, parse_packages
from .release import FileEntry, Release, parse_release
from .verify import verify_inrelease

__all__ = [
    "Archive",
    "ContentCache",
    "FetchStats",
    "FileEntry",
    "MissingMemberError",
    "Release",
    "ar_members",
    "cache_base",
    "deb_control",
    "deb_extract",
    "deb_list",
    "iter_stanzas",
    "parse_packages",
    "parse_release",
    "verify_inrelease",
]
