"""mask_pii: what --log-requests hides, and what it leaves alone."""
import pytest

from server.redact import mask_pii


@pytest.mark.parametrize("text,expected", [
    ("write to john.doe+x@example.co.uk today", "write to [email] today"),
    ("call +1 (415) 555-0132 or 415.555.0132", "call [phone] or [phone]"),
    ("ring 020 7946 0958", "ring [phone]"),
    ("ssn 123-45-6789", "ssn [id]"),
    ("passport X12345678, id 11010519491231002X", "passport [id], id [id]"),
    ("on 2026-11-24 at 09:30 I bought 3 cats and 12 dogs for 12345", "on 2026-11-24 at 09:30 I bought 3 cats and 12 dogs for 12345"),
])
def test_masks_personal_data_and_keeps_ordinary_numbers(text, expected):
    assert mask_pii(text) == expected
