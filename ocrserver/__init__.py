"""The local RecognizeCarNumber-compatible server behind ``carnumber serve`` (see ``ops/server.md``).

Start one with :func:`ocrserver.server.start_server` (thread) or
:func:`ocrserver.server.spawn_server` (child process); make test images that carry their own truth
with :func:`ocrserver.truth.make_test_image`. This package imports nothing heavy at import time.
"""
