"""The one place that decides how HTTPS certificates are verified.

Verification is on by default. A connection may add a CA bundle. Only the environment variable
``INSECURE_TLS`` set to exactly ``true`` turns verification off, and then every caller is warned.
"""

from __future__ import annotations

import logging
import os

from scan_ingest.exceptions import ConfigError

log = logging.getLogger(__name__)

INSECURE_TLS_ENV = "INSECURE_TLS"


def insecure_tls_enabled(environ: dict[str, str] | None = None) -> bool:
    """True only for ``INSECURE_TLS=true`` exactly (``TRUE``, ``1`` and ``yes`` do not count)."""
    env = os.environ if environ is None else environ
    return env.get(INSECURE_TLS_ENV) == "true"


def requests_verify(ca_bundle: str | None = None, *, environ: dict[str, str] | None = None) -> bool | str:
    """The value for ``requests``' ``verify=``: ``True``, a CA bundle path, or ``False`` (loudly)."""
    if insecure_tls_enabled(environ):
        log.warning(
            "TLS CERTIFICATE VERIFICATION IS DISABLED because %s=true. Traffic to the Scan API can be "
            "intercepted; unset %s to restore verification.",
            INSECURE_TLS_ENV,
            INSECURE_TLS_ENV,
        )
        return False
    if ca_bundle:
        if not os.path.isfile(ca_bundle):
            raise ConfigError(f"ca_bundle {ca_bundle!r} from the Scan connection is not a readable file")
        return ca_bundle
    return True
