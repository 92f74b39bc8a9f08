"""Chat messages and media arguments (vita_jax/data/chat.py) are checked before any preprocessing: one line
naming the message or field."""
import numpy as np
import pytest

# --------------------------------------------- refused early, nothing lost (slow, as the old test_hardening.py was)


@pytest.mark.slow  # as when test_hardening.py was slow as a whole
@pytest.mark.parametrize("messages, named", [
    ([("robot", "hi")], "role 'robot'"), ([("user", "hi"), ("assistant", "yo")], "last turn"),
    (7, "got int"), ([], "non-empty"), ("a \ud800 b", "not valid Unicode"), ([("user", 5)], "messages[0]"),
    ("", "nothing to answer"),
])
def test_chat_messages_are_checked(messages, named):
    from vita_jax.data import chat
    with pytest.raises(ValueError, match=named.replace("[", r"\[").replace("]", r"\]")):
        chat.check_messages(messages)
    chat.check_messages("", media=True)  # an empty question about an image or a clip is fine


# ---------------------------------------------------------- refused early, one line naming the file, field or option


@pytest.mark.parametrize("kw, named", [
    (dict(image=7), "image: expected a path, file object or PIL image, got int"),
    (dict(video=["a.mp4"]), "video: expected a path or file object, got list"),
    (dict(audio=7.5), "audio: expected a path, file object or (waveform, sample_rate), got float"),
    (dict(audio=(np.zeros(16000), "16k")), "audio: expected"),
    (dict(image=""), "image: an empty path"),
    (dict(messages=[("user", "hi", 7)]), "messages[0] audio: expected"),
])
def test_media_arguments_of_the_wrong_type_are_named(kw, named):
    from vita_jax.data import chat as chat_lib
    kw = dict(dict(messages="hi"), **kw)
    with pytest.raises(ValueError) as e:  # checked before any preprocessing or tokenizer is used
        chat_lib.chat_example(None, None, kw.pop("messages"), **kw)
    assert named in str(e.value) and "\n" not in str(e.value)
