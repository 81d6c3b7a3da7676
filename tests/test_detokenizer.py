"""IncrementalDetokenizer against a full `tokenizer.decode` of the same ids (the reference)."""

import random

import pytest

from cluster.detokenizer import IncrementalDetokenizer
from tests.fake_engine import byte_level_tokenizer, metaspace_tokenizer

TOKENIZERS = {"byte_level": byte_level_tokenizer, "metaspace": metaspace_tokenizer}
PIECES = ["hello", "world", "quick", "fox", "🌍", "🚀🔥", "你好", "世界", "こんにちは", "café", "naïve",
          "😀x", "ü"]


def random_text(rng: random.Random) -> str:
    return " ".join(rng.choice(PIECES) + rng.choice(["", ",", ".", "!"]) for _ in range(rng.randint(3, 20)))


def run(detok: IncrementalDetokenizer, ids: list[int], chunk_sizes: list[int]) -> tuple[list[str], bool]:
    """Feed `ids` in chunks; return the deltas (flush included unless stopped) and stopped."""
    deltas, pos, stopped = [], 0, False
    for size in chunk_sizes:
        if pos >= len(ids):
            break
        text, stopped = detok.step(ids[pos : pos + size])
        deltas.append(text)
        pos += size
        if stopped:
            return deltas, True
    deltas.append(detok.flush())
    return deltas, False


@pytest.mark.parametrize("name", TOKENIZERS)
@pytest.mark.parametrize("seed", range(8))
def test_multibyte_chars_never_broken_and_deltas_match_full_decode(name: str, seed: int):
    tok, rng = TOKENIZERS[name](), random.Random(seed)
    prompt = tok.encode(random_text(rng), add_special_tokens=False)
    out = tok.encode(random_text(rng), add_special_tokens=False)
    assert any(tok.decode([i]).endswith("\ufffd") for i in out), "the text should split characters"
    chunks = [rng.choice([1, 1, 2, 3]) for _ in out]

    deltas, stopped = run(IncrementalDetokenizer(tok, prompt), out, chunks)

    assert not stopped
    assert not any("\ufffd" in d for d in deltas)
    full, prompt_text = tok.decode(prompt + out), tok.decode(prompt)
    assert full.startswith(prompt_text)
    assert "".join(deltas) == full[len(prompt_text) :]
    if name == "byte_level":  # no context-dependent spaces: the output decodes alone the same
        assert "".join(deltas) == tok.decode(out)


def test_stop_string_across_tokens_is_cut_and_nothing_after_is_emitted():
    tok = byte_level_tokenizer()
    out = tok.encode("The quick brown fox jumps over the lazy dog.")
    stop = "fox jumps"
    assert not any(stop in tok.decode([i]) for i in out)
    # the first prefix of the ids whose text contains the stop string
    needed = next(k for k in range(len(out) + 1) if stop in tok.decode(out[:k]))
    detok = IncrementalDetokenizer(tok, tok.encode("Say:"), stop=[stop])

    deltas = []
    for k, token in enumerate(out, start=1):
        text, stopped = detok.step([token])
        deltas.append(text)
        assert stopped == (k >= needed)
        if stopped:
            break

    assert "".join(deltas) == "The quick brown "
    assert detok.step(out[needed:]) == ("", True)
    assert detok.flush() == ""


def test_stop_string_inside_one_step_with_multibyte_chars():
    tok = byte_level_tokenizer()
    full = "Hello 🌍 world 你好 again"
    detok = IncrementalDetokenizer(tok, [], stop=["🌍 wor", "你好"])
    text, stopped = detok.step(tok.encode(full))
    assert (text, stopped) == ("Hello ", True)


def test_earliest_stop_string_wins():
    tok = byte_level_tokenizer()
    deltas, stopped = run(
        IncrementalDetokenizer(tok, [], stop=["lazy", "brown"]),
        tok.encode("The quick brown fox jumps over the lazy dog."),
        [1] * 100,
    )
    assert stopped and "".join(deltas) == "The quick "


def test_possible_stop_prefix_is_held_then_released():
    tok = byte_level_tokenizer()
    out = tok.encode("The quick brown fox")
    detok = IncrementalDetokenizer(tok, [], stop=["quick red"])
    upto_quick = next(k for k in range(len(out) + 1) if tok.decode(out[:k]) == "The quick")

    emitted = "".join(detok.step([t])[0] for t in out[:upto_quick])
    assert emitted == "The "  # "quick" may still become "quick red"

    rest = "".join(detok.step([t])[0] for t in out[upto_quick:]) + detok.flush()
    assert emitted + rest == "The quick brown fox"
    assert not detok.stopped


def test_flush_returns_held_stop_prefix():
    tok = byte_level_tokenizer()
    detok = IncrementalDetokenizer(tok, [], stop=["lazy dog!!"])
    text, stopped = detok.step(tok.encode("over the lazy dog"))
    assert (text, stopped) == ("over the ", False)
    assert detok.flush() == "lazy dog"


def test_flush_of_incomplete_character_matches_full_decode():
    tok = byte_level_tokenizer()
    out = tok.encode("Hi 🌍")[:-1]  # the emoji's last byte never came
    detok = IncrementalDetokenizer(tok, [])
    deltas = [detok.step([t])[0] for t in out]
    assert "".join(deltas) == "Hi "
    assert "".join(deltas) + detok.flush() == tok.decode(out)
    assert tok.decode(out).endswith("\ufffd")


@pytest.mark.parametrize("skip", [True, False])
def test_special_tokens(skip: bool):
    tok = byte_level_tokenizer()
    out = tok.encode("Hello") + [tok.eos_token_id] + tok.encode(" world")
    deltas, _ = run(IncrementalDetokenizer(tok, [], skip_special_tokens=skip), out, [1] * len(out))
    assert "".join(deltas) == tok.decode(out, skip_special_tokens=skip)
    assert ("<|endoftext|>" in "".join(deltas)) is not skip
