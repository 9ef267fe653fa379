"""Connection limits uvicorn lacks: a cap on open connections, a deadline for each request's headers (so
idle connections that never send a request and slowloris clients that drip one are closed), and a cap on
header bytes. Built on uvicorn's httptools protocol; uvicorn's own keep-alive timeout covers the idle time
between requests on one connection.
"""
import logging
import resource

from uvicorn.protocols.http.httptools_impl import HttpToolsProtocol

log = logging.getLogger(__name__)


def guarded_protocol(max_connections: int, header_timeout: float, max_header_bytes: int) -> type:
    """An HttpToolsProtocol class with these limits, for uvicorn.Config(http=...)."""

    class GuardedHttpToolsProtocol(HttpToolsProtocol):
        def connection_made(self, transport):
            super().connection_made(transport)
            # bytes received since the current request began, counted until its headers are complete
            self._header_bytes, self._in_headers, self._header_timer, self._refused = 0, True, None, False
            if len(self.connections) > max_connections:
                self._refuse(503, f"the server holds its maximum of {max_connections} connections "
                                  f"(--max-connections); retry later")
                return
            self._arm_header_timer()

        def connection_lost(self, exc):
            self._cancel_header_timer()
            super().connection_lost(exc)

        def data_received(self, data: bytes):
            # Counted before the parser sees them: it buffers an unfinished header value whole, however long.
            if self._in_headers and not self._refused:
                room = max_header_bytes - self._header_bytes
                end = data.find(b"\r\n\r\n", 0, max(room, 0) + 4)   # the headers end within the room: fine
                self._header_bytes += len(data) if end == -1 else end + 4
                if end == -1 and self._header_bytes > max_header_bytes:
                    self._refuse(431, f"the request line and headers are larger than {max_header_bytes} bytes "
                                      f"(--max-header-bytes)")
                    return
            if not self._refused:
                super().data_received(data)

        def on_message_begin(self):
            super().on_message_begin()
            self._in_headers = True
            self._arm_header_timer()

        def on_headers_complete(self):
            self._cancel_header_timer()
            self._in_headers, self._header_bytes = False, 0
            super().on_headers_complete()

        def on_response_complete(self):
            super().on_response_complete()
            self._in_headers = True   # what arrives next belongs to the next request's headers

        def send_400_response(self, msg: str):
            if not self._refused:   # the parser reports our own refusal as a parse error: already answered
                super().send_400_response(msg)

        def _arm_header_timer(self):
            if self._header_timer is None and not self.transport.is_closing():
                self._header_timer = self.loop.call_later(header_timeout, self._headers_late)

        def _cancel_header_timer(self):
            if self._header_timer is not None:
                self._header_timer.cancel()
                self._header_timer = None

        def _headers_late(self):
            self._header_timer = None
            if not self.transport.is_closing():
                self._refuse(408, f"no complete request headers within {header_timeout:g} s (--header-timeout)")

        def _refuse(self, status: int, message: str):
            """Answer status with message as plain text and close; nothing reaches the app."""
            self._refused = True
            self._cancel_header_timer()
            body = message.encode()
            reason = {408: b"Request Timeout", 431: b"Request Header Fields Too Large",
                      503: b"Service Unavailable"}[status]
            self.transport.write(b"HTTP/1.1 %d %s\r\ncontent-type: text/plain; charset=utf-8\r\ncontent-length: %d"
                                 b"\r\nconnection: close\r\n\r\n%s" % (status, reason, len(body), body))
            self.transport.close()

    return GuardedHttpToolsProtocol


def raise_open_file_limit(wanted: int) -> int:
    """Raise this process's soft limit on open files toward wanted (as far as the hard limit allows); returns it."""
    soft, hard = resource.getrlimit(resource.RLIMIT_NOFILE)
    target = wanted if hard == resource.RLIM_INFINITY else min(wanted, hard)
    if soft != resource.RLIM_INFINITY and soft < target:
        try:
            resource.setrlimit(resource.RLIMIT_NOFILE, (target, hard))
            soft = target
        except (ValueError, OSError) as e:
            log.warning("could not raise the open-file limit from %d to %d: %s", soft, target, e)
    return soft
