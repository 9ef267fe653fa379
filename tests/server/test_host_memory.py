"""Host allocator tuning: applied on Linux/glibc, harmless elsewhere."""
import sys

from server.host_memory import keep_freed_memory


def test_keep_freed_memory_succeeds_on_glibc_and_can_be_repeated():
    result = keep_freed_memory()
    assert isinstance(result, bool)
    if sys.platform.startswith("linux"):
        import platform
        if platform.libc_ver()[0] == "glibc":
            assert result and keep_freed_memory()
