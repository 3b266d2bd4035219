"""Attacks on the worker token: guessable tokens, the public fingerprint, tracebacks."""

from __future__ import annotations

import base64
import itertools
import random
import traceback

import pytest

from vramcore import VramManager
from vramcore.errors import InvalidInput, VramError
from vramcore.seal import WorkerToken
from vramcore.testing import TEST_TOKEN

#: What a guesser tries: words people put in tokens, joined the ways people join them.
WORDS = ["vramcore", "worker", "token", "secret", "password", "prod", "gpu", "model", "test"]


@pytest.mark.parametrize(
    "token",
    [
        "ab" * 20,  # a repeated pattern
        "0123456789abcdef0123456789abcdef",  # runs
        "passwordpasswordpassword",  # a dictionary word, repeated
        "correct-horse-battery-staple-correct-horse",
        "vramcore-test-token-0123456789abcdef",  # what this project's tests used
        "Tr0ub4dor&3Tr0ub4dor&3Tr0ub4dor&3",
    ],
)
def test_a_guessable_token_is_refused_saying_how_to_make_one(token: str) -> None:
    with pytest.raises(InvalidInput, match=r"secrets\.token_urlsafe\(32\)") as info:
        WorkerToken(token)
    assert token not in str(info.value)


def test_no_token_a_dictionary_search_would_try_is_accepted() -> None:
    """The fingerprint is public and deterministic: whoever reads it can test guesses. So a
    token that a dictionary search would reach must not be usable at all."""
    guesses = [
        sep.join(words) + suffix
        for n in (2, 3)
        for words in itertools.permutations(WORDS, n)
        for sep in ("-", "_", "")
        for suffix in ("", "-2024", "1234567890")
    ]
    accepted = []
    for guess in guesses:
        try:
            WorkerToken(guess)
        except InvalidInput:
            continue
        accepted.append(guess)
    assert accepted == []


def test_random_tokens_are_accepted() -> None:
    rng = random.Random(1)  # deterministic: the same tokens every run
    for _ in range(300):
        raw = rng.randbytes(32)
        WorkerToken(raw)
        WorkerToken(base64.urlsafe_b64encode(raw).decode().rstrip("="))
        WorkerToken(raw.hex())


# -- tracebacks that capture local variables (as error reporters do) ----------------------


def _traceback_text(exc: BaseException) -> str:
    return "".join(traceback.TracebackException.from_exception(exc, capture_locals=True).format())


#: Refused by every version of vramcore (too short), and unlike any word in a message.
WEAK = "Q7xZ9kP2mW4vB8n"


def test_a_manager_that_fails_to_start_shows_no_token_in_a_traceback_with_locals() -> None:
    with pytest.raises(VramError) as info:
        VramManager(TEST_TOKEN, allocator="no-such-backend", audit="disabled")
    assert TEST_TOKEN not in _traceback_text(info.value)


def test_a_refused_token_is_not_shown_in_a_traceback_with_locals() -> None:
    with pytest.raises(InvalidInput) as info:
        VramManager(WEAK, allocator="mock", audit="disabled")
    assert WEAK not in _traceback_text(info.value)
