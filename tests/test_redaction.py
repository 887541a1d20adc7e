"""The secret rules: a table of texts that must be redacted and texts that must pass untouched."""

from __future__ import annotations

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from wordahead.store.redaction import (
    DEFAULT_EXCLUDED_SOURCES,
    REDACTED,
    excluded_by,
    find_secrets,
    looks_random,
    luhn_valid,
    redact,
)

PRIVATE_KEY = (
    "-----BEGIN OPENSSH PRIVATE KEY-----\n"
    "b3BlbnNzaC1rZXktdjEAAAAABG5vbmUAAAAEbm9uZQAAAAAAAAABAAAAMwAAAAtzc2gtZW\n"
    "-----END OPENSSH PRIVATE KEY-----"
)
JWT = (
    "eyJhbGciOiJIUzI1NiIsInR5cCI6IkpXVCJ9.eyJzdWIiOiIxMjM0NTY3ODkwIn0."
    "dozjgNryP4J3jVmNHl0w5N_XgL0n3I9PlFUP0THsR8U"
)

# (text, the secret that must disappear, the rule expected to find it)
POSITIVE = [
    ("my password: hunter2", "hunter2", "password"),
    ("Password = Tr0ub4dor3 for the wifi", "Tr0ub4dor3", "password"),
    ("login?user=bob&passwd=s3cr3tpass&x=1", "s3cr3tpass", "password"),
    ('{"password": "correct horse battery staple"}', "correct horse battery staple", "password"),
    ("DB_PASSWORD='p@ss w0rd'", "p@ss w0rd", "password"),
    ("pwd: qwerty123", "qwerty123", "password"),
    ("export API_KEY=abcd1234efgh5678", "abcd1234efgh5678", "secret_assignment"),
    (
        "aws_secret_access_key = wJalrXUtnFEMI/K7MDENG/bPxRfiCYEXAMPLEKEY",
        "wJalrXUtnFEMI/K7MDENG/bPxRfiCYEXAMPLEKEY",
        "secret_assignment",
    ),
    ("client_secret: 9f8e7d6c5b4a3f2e1d0c", "9f8e7d6c5b4a3f2e1d0c", "secret_assignment"),
    ("key id AKIAIOSFODNN7EXAMPLE in prod", "AKIAIOSFODNN7EXAMPLE", "api_token"),
    (
        "token ghp_16C7e42F292c6912E7710c838347Ae178B4a here",
        "ghp_16C7e42F292c6912E7710c838347Ae178B4a",
        "api_token",
    ),
    ("slack xoxb-1234567890-abcdefghijkl ok", "xoxb-1234567890-abcdefghijkl", "api_token"),
    (
        "OPENAI sk-proj-abcdefghijklmnopqrstuvwx1234",
        "sk-proj-abcdefghijklmnopqrstuvwx1234",
        "api_token",
    ),
    ("stripe sk_live_4eC39HqLyjWDarjtT1zdp7dc", "sk_live_4eC39HqLyjWDarjtT1zdp7dc", "api_token"),
    (
        "maps AIzaSyD-abcdefghijklmnopqrstuvwxyz12345 end",
        "AIzaSyD-abcdefghijklmnopqrstuvwxyz12345",
        "api_token",
    ),
    (f"cookie {JWT}", JWT, "jwt"),
    (
        "Authorization: Bearer abc123def456ghi789jkl",
        "abc123def456ghi789jkl",
        "bearer",
    ),
    ("git clone https://alice:s3cretpw@example.com/r.git", "s3cretpw", "url_password"),
    (f"key:\n{PRIVATE_KEY}\nthanks", "b3BlbnNzaC1rZXktdjEAAAAABG5vbmU", "private_key"),
    (
        "sha 3f786850e387550fdab836ed7e6dc881de23001b",
        "3f786850e387550fdab836ed7e6dc881de23001b",
        "hex",
    ),
    ("id 0x9d5ed678fe57bcca610140957afab571", "9d5ed678fe57bcca610140957afab571", "hex"),
    (
        "session 6bX9qT2mRz4KpL8vWc1NfJ7sYd3HgA0e is live",
        "6bX9qT2mRz4KpL8vWc1NfJ7sYd3HgA0e",
        "base64",
    ),
    (
        "blob Zm9vYmFyMTIzNDU2Nzg5MGFiY2RlZmdoaWprbG1ub3A9PQ==",
        "Zm9vYmFyMTIzNDU2Nzg5MGFiY2RlZmdoaWprbG1ub3A9PQ==",
        "base64",
    ),
    ("card 4111 1111 1111 1111 exp 12/29", "4111 1111 1111 1111", "card_number"),
    ("mc 5500-0000-0000-0004.", "5500-0000-0000-0004", "card_number"),
    ("amex 378282246310005", "378282246310005", "card_number"),
    (
        "key 123e4567-e89b-12d3-a456-426614174000",
        "123e4567-e89b-12d3-a456-426614174000",
        "uuid",
    ),
]

NEGATIVE = [
    "The quick brown fox jumps over the lazy dog.",
    "My password is very strong and I never share it.",
    "token: a unit of text in NLP",
    "The bearer of bad news arrived late.",
    "Call me at 555-123-4567 tomorrow, or +44 20 7946 0958.",
    "Order 4111 1111 1111 1112 shipped today",  # fails Luhn
    "It cost $1,234,567.89 in 2023 and 12345678 units.",
    "ISBN 978-3-16-148410-0, version 1.2.3-beta+build.20240501",
    "short hex deadbeef and cafe1234 and #ff00aa",
    "pneumonoultramicroscopicsilicovolcanoconiosis",
    "thisIsAVeryLongCamelCaseIdentifierName2 = AbstractSingletonProxyFactoryBean1234()",
    "open /home/user/Projects/MyApp2024/src/main/java/com/Example.java",
    "see https://example.com/some/very/long/path/to/resource/v2/items",
    "test_redaction_handles_long_names_v2_ABC and HTTP_PROXY_AUTHORIZATION_HEADER_NAME_V2",
    "org/apache/commons/lang3/StringUtils2024 my-project-2024-final-version-3-draft-B",
    "alice@example.com wrote on 2024-05-01 12:30: let's meet",
    "password_hash is computed with argon2",
    "def tokenize(text): token = tokenizer.encode(text)",
    "",
]


@pytest.mark.parametrize(("text", "secret", "rule"), POSITIVE)
def test_secret_is_redacted(text: str, secret: str, rule: str) -> None:
    out = redact(text)
    assert secret not in out
    assert REDACTED in out
    assert rule in {f.rule for f in find_secrets(text)}


@pytest.mark.parametrize("text", NEGATIVE)
def test_ordinary_text_is_untouched(text: str) -> None:
    assert find_secrets(text) == []
    assert redact(text) == text


def test_redaction_keeps_the_surrounding_text() -> None:
    assert redact("my password: hunter2 and more") == f"my password: {REDACTED} and more"
    assert redact('{"password": "x y"}') == f'{{"password": "{REDACTED}"}}'
    assert redact("a 4111111111111111 b") == f"a {REDACTED} b"


def test_overlapping_findings_become_one_placeholder() -> None:
    # A key that matches both the assignment rule and the token rule.
    text = "api_key=sk_live_4eC39HqLyjWDarjtT1zdp7dc end"
    assert redact(text) == f"api_key={REDACTED} end"


def test_luhn() -> None:
    assert luhn_valid("4111 1111 1111 1111")
    assert luhn_valid("378282246310005")
    assert not luhn_valid("4111 1111 1111 1112")
    assert not luhn_valid("4111")  # too short to be a card


def test_random_looking_strings() -> None:
    assert looks_random("6bX9qT2mRz4KpL8vWc1NfJ7sYd3HgA0e")
    assert not looks_random("thisIsAVeryLongCamelCaseIdentifierName2")
    assert not looks_random("aaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaa1")


@settings(max_examples=100, deadline=None)
@given(st.text(max_size=300))
def test_redact_never_fails_and_is_idempotent(text: str) -> None:
    once = redact(text)
    assert redact(once) == once


@pytest.mark.parametrize(
    ("source", "excluded"),
    [
        ("/home/u/project/.env", True),
        ("/home/u/project/prod.env", True),
        (".env.local", True),
        ("vscode:/srv/app/config/secrets.yaml", True),
        ("MyPasswords.kdbx", True),
        ("~/.ssh/config", True),
        ("/srv/keys/server.PEM", True),
        ("dotenv", True),
        ("/home/u/notes/todo.md", False),
        ("python", False),
        ("slack", False),
        ("", False),
    ],
)
def test_default_excluded_sources(source: str, excluded: bool) -> None:
    import os

    source = os.path.expanduser(source) if source.startswith("~") else source
    assert (excluded_by(source, DEFAULT_EXCLUDED_SOURCES) is not None) == excluded


def test_ssh_dir_matches_inside_a_prefixed_source() -> None:
    import os

    ssh = os.path.expanduser("~/.ssh/known_hosts")
    assert excluded_by(f"vscode:{ssh}", ["~/.ssh/*"]) == "~/.ssh/*"
    assert excluded_by("/work/report.docx", ["*.docx"]) == "*.docx"
    assert excluded_by("/work/report.docx", []) is None
