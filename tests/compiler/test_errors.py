"""errors.short_message: the one shortener of every one-line error."""

import onnx
import pytest

from beats_compiler.errors import SHORT_LIMIT, short_message


def test_short_cuts_at_a_word_boundary():
    msg = short_message(RuntimeError("[ONNXRuntimeError] : 2 : INVALID_ARGUMENT : " + "word " * 100))
    assert msg.endswith("word ...") and len(msg) <= SHORT_LIMIT + 4 and "ONNXRuntimeError" not in msg
    path = "/onnxruntime_src/onnxruntime/core/x.cc:12 onnxruntime::F::G(const int&, bool) the real reason"
    assert short_message(RuntimeError(path)) == "the real reason"
    assert short_message(RuntimeError("Load model from /tmp/m.onnx failed:Fatal error: bad op")) == "bad op"


def test_whitespace_collapsed_and_punctuation_dropped_at_the_cut():
    assert short_message(ValueError("  a\n\n  b\tc  ")) == "a b c"
    assert short_message("one two, three four", 9) == "one two ..."
    assert short_message("short enough", 12) == "short enough"


def test_empty_text_gives_the_exception_type():
    assert short_message(KeyError()) == "KeyError"
    assert short_message("") == ""
    assert short_message(RuntimeError("Load model from /tmp/m.onnx failed:")) == "RuntimeError"


def test_first_line_names_the_type():
    exc = onnx.checker.ValidationError("Field 'type' is missing.\n\n==> Context: Bad node spec for node r")
    assert short_message(exc, None, first_line=True) == "ValidationError: Field 'type' is missing."
    assert short_message(ValueError("\n\n"), None, first_line=True) == "ValueError"


def test_raw_keeps_runtime_text():
    text = "[ONNXRuntimeError] : 2 : INVALID_ARGUMENT :  x\ny"
    assert short_message(text, None, raw=True) == "[ONNXRuntimeError] : 2 : INVALID_ARGUMENT : x y"
    assert short_message(text, None) == "x y"


@pytest.mark.parametrize("limit", [10, 40, 60])
def test_fit_and_hard_cuts_stay_within_the_limit(limit):
    text = "alpha beta gamma delta epsilon zeta eta theta iota kappa lambda mu"
    fit, hard = short_message(text, limit, cut="fit"), short_message(text, limit, cut="hard")
    assert len(fit) <= limit and fit.endswith(" ...") and text.startswith(fit[:-4])
    assert len(hard) == limit and hard == text[:limit - 3] + "..."
    name = "x" * 80  # a name without spaces: cut inside it
    assert short_message(name, 40, cut="hard") == "x" * 37 + "..."
    assert short_message(name, 40) == "x" * 40 + " ..."
