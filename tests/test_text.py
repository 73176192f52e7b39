from __future__ import annotations

from app.engine.text import TextStream

PIECES = {1: b"Hel", 2: b"lo", 3: b" wor", 4: b"ld", 5: b"\xe2\x82", 6: b"\xac", 7: b" END", 8: b"!"}


def stream(stop: tuple[str, ...] = ()) -> TextStream:
    return TextStream(PIECES.__getitem__, stop)


def test_utf8_split_across_tokens_is_joined() -> None:
    s = stream()
    s.push(5)
    assert s.release() == ""
    s.push(6)
    assert s.release() == "€"


def test_stop_string_is_cut_and_never_released() -> None:
    s = stream(("END",))
    released = ""
    for token in (1, 2, 7, 8):
        if s.push(token):
            break
        released += s.release()
    released += s.finish()
    assert s.stopped
    assert released == "Hello "
    assert "END" not in released


def test_possible_stop_prefix_is_held_back_then_released() -> None:
    s = stream(("world!",))
    s.push(3)  # " wor" could be the start of "world!"
    assert s.release() == " "
    s.push(2)  # " worlo" can no longer match
    assert s.release() == "worlo"


def test_stop_spanning_tokens_is_found() -> None:
    s = stream(("lo wo",))
    assert not s.push(1)
    assert not s.push(2)
    assert s.push(3)
    assert s.text == "Hel"
