"""The committed gRPC stubs are exactly what `python -m proto.generate` makes from proto/inference.proto."""
from proto.generate import OUT, generate


def test_committed_stubs_are_not_stale(tmp_path):
    for fresh in generate(tmp_path):
        committed = OUT / fresh.name
        assert committed.is_file(), f"{committed} is missing: run python -m proto.generate"
        assert committed.read_text() == fresh.read_text(), f"{committed} is stale: run python -m proto.generate"
