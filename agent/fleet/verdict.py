"""Why an update was rejected: ``UpdateRejected`` carries a code from
``agent.errors.UPDATE_REASONS`` (the status's ``update.reason``) and a sentence that says
what to fix; ``from_tuf`` names the code of each python-tuf failure."""

from __future__ import annotations

from tuf.api import exceptions as tuf_errors

from agent.errors import UPDATE_REASONS, AgentError


class UpdateRejected(AgentError):
    """A fleet update that the node will not activate. The message holds no PHI (it
    names versions, lengths and digests only)."""

    def __init__(self, reason: str, message: str) -> None:
        if reason not in UPDATE_REASONS:
            raise ValueError(f"unknown update reason {reason!r} (add it to agent/errors.py "
                             "and docs/protocol.md)")
        super().__init__(message)
        self.reason: str = reason


def from_tuf(exc: Exception, what: str) -> UpdateRejected:
    """The rejection for a python-tuf error raised while ``what`` (a sentence fragment:
    "refreshing metadata", "downloading bundle.tar") ran."""
    if isinstance(exc, UpdateRejected):
        return exc
    text = f"{what}: {exc}" if str(exc) else f"{what}: {type(exc).__name__}"
    cause = exc.__cause__
    if isinstance(exc, tuf_errors.DownloadError) and isinstance(cause, UpdateRejected):
        return cause  # our fetcher's own verdict, wrapped by FetcherInterface.fetch
    table: tuple[tuple[type[Exception], str, str], ...] = (
        (tuf_errors.UnsignedMetadataError, "metadata_unsigned",
         "not signed by enough of the trusted keys: sign with the repository's keys "
         "(`iomt-agent fleet publish --repo DIR`)"),
        (tuf_errors.BadVersionNumberError, "metadata_replayed",
         "an older version than the node already trusts (a replay or a repository "
         "restored from an old copy): publish a newer version"),
        (tuf_errors.ExpiredMetadataError, "metadata_expired",
         "the metadata has expired: publish again (or `fleet refresh`), and check the "
         "node's clock"),
        (tuf_errors.LengthOrHashMismatchError, "target_mismatch",
         "the downloaded target does not match its signed length and sha256 (a corrupted "
         "or substituted chunk): publish again"),
        (tuf_errors.DownloadLengthMismatchError, "target_too_long",
         "more bytes than the signed length were offered: the node stopped reading"),
        (tuf_errors.SlowRetrievalError, "download_stalled",
         "the transfer did not finish before its deadline: check the cloud broker"),
        (tuf_errors.DownloadHTTPError, "metadata_unavailable",
         "a message the metadata names is not on the broker (yet): publish it again"),
        (tuf_errors.RepositoryError, "metadata_invalid",
         "the metadata is not valid TUF metadata for this node's trusted root"),
        (tuf_errors.DownloadError, "metadata_unavailable",
         "the broker did not deliver the message: check the cloud broker"),
    )
    for kind, reason, hint in table:
        if isinstance(exc, kind):
            return UpdateRejected(reason, f"{text} ({hint})")
    return UpdateRejected("metadata_invalid", f"{text} ({type(exc).__name__})")
