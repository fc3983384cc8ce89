"""The only module that speaks HTTP: STOW-RS (and a QIDO-RS look-up) through
``dicomweb-client``, for ``iomt-agent receive --stow-url``.

``StowClient.store`` sends one instance and says what the archive did with it
(``Stored``: ``stored`` / ``duplicate``, or ``refused`` / ``transient`` with the HTTP status
and the DICOM failure reason, PS3.18 Table 10.5.3-1). Retrying is the caller's
(``agent.cloud.export``): dicomweb-client's own retrying is switched off so there is one
policy. Authentication: HTTP basic, a bearer token, or a TLS client certificate.
"""

from __future__ import annotations

import io
import urllib.request
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Literal

import pydicom

Kind = Literal["stored", "duplicate", "refused", "transient"]
# PS3.18 / PS3.4 failure reasons in a STOW-RS response's FailedSOPSequence.
DUPLICATE_SOP_INSTANCE = 0x0111
# HTTP statuses worth another try: the archive is busy, restarting or behind a proxy.
TRANSIENT_HTTP = frozenset({408, 425, 429, 500, 502, 503, 504})


def _url_problem(url: str) -> str | None:
    """What makes an http(s) URL unusable before any request, or None."""
    from urllib.parse import urlsplit

    try:
        parts = urlsplit(url)
        port = parts.port  # ValueError when out of range or not a number
    except ValueError as exc:
        return f"not a URL ({exc})"
    if not parts.hostname:
        return "no host name"
    if port == 0:
        return "port 0"
    return None


@dataclass(frozen=True)
class StowSettings:
    url: str
    user: str | None = None
    password_file: Path | None = None
    token_file: Path | None = None
    cert: Path | None = None
    key: Path | None = None
    ca: Path | None = None
    timeout_s: float = 30.0
    attempts: int = 6

    def problems(self) -> list[str]:
        """What is wrong with the flags, one line each (empty: usable)."""
        out = []
        if not self.url.startswith(("http://", "https://")):
            out.append(f"--stow-url {self.url!r}: give an http:// or https:// DICOMweb base URL")
        elif (why := _url_problem(self.url)) is not None:
            out.append(f"--stow-url {self.url!r}: {why} (e.g. http://archive:8042/dicom-web)")
        if (self.user is None) != (self.password_file is None):
            out.append("--stow-user and --stow-password-file go together (HTTP basic auth)")
        if self.token_file is not None and self.user is not None:
            out.append("give either --stow-token-file or --stow-user, not both")
        if self.key is not None and self.cert is None:
            out.append("--stow-key needs --stow-cert")
        for flag, path in (("--stow-password-file", self.password_file),
                           ("--stow-token-file", self.token_file), ("--stow-cert", self.cert),
                           ("--stow-key", self.key), ("--stow-ca", self.ca)):
            if path is not None and not path.is_file():
                out.append(f"{flag} {path}: no such file")
        if self.attempts < 1:
            out.append("--stow-attempts must be at least 1")
        return out


@dataclass(frozen=True)
class Stored:
    kind: Kind
    http_status: int | None = None
    failure_reason: int | None = None
    detail: str = ""


def _secret(path: Path) -> str:
    return path.read_text(encoding="utf-8").strip()


class StowClient:
    def __init__(self, settings: StowSettings) -> None:
        import requests
        from dicomweb_client.api import DICOMwebClient

        self._requests = requests
        session = requests.Session()
        if settings.user is not None and settings.password_file is not None:
            session.auth = (settings.user, _secret(settings.password_file))
        if settings.token_file is not None:
            session.headers["Authorization"] = f"Bearer {_secret(settings.token_file)}"
        if settings.cert is not None:
            session.cert = (str(settings.cert), str(settings.key)) if settings.key else str(
                settings.cert)
        if settings.ca is not None:
            session.verify = str(settings.ca)
            # requests lets REQUESTS_CA_BUNDLE / CURL_CA_BUNDLE override session.verify:
            # the flag must win, so the environment is not read; its proxies are kept.
            session.trust_env = False
            session.proxies.update(urllib.request.getproxies())
        self.settings = settings
        self._client = DICOMwebClient(url=settings.url.rstrip("/"), session=session,
                                      timeout=settings.timeout_s)
        self._client.set_http_retry_params(retry=False)

    def store(self, part10: bytes) -> Stored:
        """POST one instance (STOW-RS). Never raises for what the archive or the network
        did: that is in the answer."""
        ds = pydicom.dcmread(io.BytesIO(part10))
        requests = self._requests
        try:
            answer = self._client.store_instances([ds])
        except requests.HTTPError as exc:
            return _from_http_error(exc.response)
        except requests.exceptions.SSLError as exc:  # the why matters here: certificates
            return Stored("transient", detail=f"TLS: {_ssl_reason(exc)}")
        except (requests.ConnectionError, requests.Timeout) as exc:
            return Stored("transient", detail=f"{type(exc).__name__}: cannot reach the archive")
        except (requests.RequestException, ValueError) as exc:
            return Stored("transient", detail=f"{type(exc).__name__}: {exc}"[:300])
        return _from_answer(answer)

    def exists(self, study: str, series: str, sop: str) -> bool | None:
        """Whether the archive has this instance (QIDO-RS); None when it cannot tell."""
        requests = self._requests
        try:
            found = self._client.search_for_instances(
                study_instance_uid=study, series_instance_uid=series,
                search_filters={"SOPInstanceUID": sop})
        except (requests.RequestException, ValueError):
            return None
        return bool(found)


    def instances(self) -> list[dict[str, Any]]:
        """Every instance the archive holds (QIDO-RS, DICOM JSON with the series' description
        and modality): what ``demo --dicom`` shows at the end."""
        found = self._client.search_for_instances(
            fields=["SeriesDescription", "Modality", "SeriesInstanceUID"], get_remaining=True)
        return list(found)


def _ssl_reason(exc: Exception) -> str:
    """The innermost OpenSSL reason of a TLS failure (e.g. CERTIFICATE_VERIFY_FAILED)."""
    text = str(exc)
    for marker in ("SSLError(", "SSL: "):
        if marker in text:
            text = text[text.index(marker):]
            break
    return text[:200]


def _failure_reasons(answer: Any) -> list[int]:
    reasons = []
    for item in getattr(answer, "FailedSOPSequence", None) or []:
        value = item.get("FailureReason")
        if value is not None:
            reasons.append(int(value.value if hasattr(value, "value") else value))
    return reasons


def _from_answer(answer: Any) -> Stored:
    """A 2xx: stored, unless the response lists the instance as failed."""
    reasons = _failure_reasons(answer)
    if not reasons:
        return Stored("stored", 200)
    if all(r == DUPLICATE_SOP_INSTANCE for r in reasons):
        return Stored("duplicate", 200, DUPLICATE_SOP_INSTANCE, "the archive has it already")
    return Stored("refused", 200, reasons[0], f"FailureReason 0x{reasons[0]:04X}")


def _from_http_error(response: Any) -> Stored:
    status = int(getattr(response, "status_code", 0) or 0)
    reasons: list[int] = []
    try:
        if response is not None and "json" in response.headers.get("Content-Type", ""):
            reasons = _failure_reasons(pydicom.Dataset.from_json(response.json()))
    except Exception:  # a body that is not a DICOM JSON dataset: the status says enough  # noqa: S110
        pass
    reason = reasons[0] if reasons else None
    detail = f"HTTP {status} {getattr(response, 'reason', '') or ''}".strip()
    if reason is not None:
        detail += f", FailureReason 0x{reason:04X}"
    if status == 409 and reasons and all(r == DUPLICATE_SOP_INSTANCE for r in reasons):
        return Stored("duplicate", status, reason, "the archive has it already (409 Conflict)")
    if status in TRANSIENT_HTTP:
        return Stored("transient", status, reason, detail)
    return Stored("refused", status, reason, detail)
