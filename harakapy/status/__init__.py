"""The status page (``config/status.ini``, docs/status-page.md): the outbound TLS posture
of every destination, as a web page and as JSON."""
