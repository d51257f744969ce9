"""Identifier splitting: Python and TensorFlow versions agree; the subtokens task uses it."""

import numpy as np
import pytest
import seqio
import tensorflow as tf

from encdec_adapt.data.identifiers import split_identifiers, split_identifiers_tf

CASES = {
    "read_file": "read file",
    "readFile": "read File",
    "parseHTTPResponse": "parse HTTP Response",
    "self.__init__(x2Y)": "self.  init  (x2 Y)",
    "ALL_CAPS_2": "ALL CAPS 2",
    "Plain prose, no identifiers.": "Plain prose, no identifiers.",
    "": "",
    "getURLsFromHTMLPage": "get UR Ls From HTML Page",
}


@pytest.mark.parametrize(("text", "want"), list(CASES.items()))
def test_python_and_tensorflow_agree(text, want):
    assert split_identifiers(text) == want
    assert split_identifiers_tf(tf.constant(text)).numpy().decode() == want


def test_lowercase_is_ascii_only_in_both_versions():
    text = "parseHTTPResponse Ünïcode ÉTÉ"
    want = "parse http response Ünïcode ÉtÉ"
    assert split_identifiers(text, lowercase=True) == want
    assert split_identifiers_tf(tf.constant(text), lowercase=True).numpy().decode() == want


def test_tensorflow_version_is_elementwise():
    texts = np.asarray([["a_b", "cD"], ["e", "fooBar_baz"]])
    got = split_identifiers_tf(tf.constant(texts)).numpy().astype(str)
    np.testing.assert_array_equal(got, [[split_identifiers(t) for t in row] for row in texts])


def test_subtokens_task_splits_queries_and_code():
    import encdec_adapt.tasks  # noqa: F401  (registers the embedded tasks)

    raw = seqio.get_mixture_or_task("stdlib_code_search").source
    split = seqio.get_mixture_or_task("stdlib_code_search_subtokens").source
    a = next(raw.get_dataset("validation", shuffle=False).as_numpy_iterator())
    b = next(split.get_dataset("validation", shuffle=False).as_numpy_iterator())
    assert b["query"].decode() == split_identifiers(a["query"].decode(), lowercase=True)
    assert b["positive"].decode() == split_identifiers(a["positive"].decode(), lowercase=True)
    assert "_" not in b["positive"].decode()
    assert [n.decode() for n in b["negatives"]] == [
        split_identifiers(n.decode(), lowercase=True) for n in a["negatives"]
    ]
