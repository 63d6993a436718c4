"""Every release with a tiny checkpoint in tests/data/conformance is served: a text request and
an image request give the library's own greedy answer (2.6 and 4.5 are covered in depth in
test_api.py; this walks the others that are present: 2.0, 2.5, o2.6)."""

from __future__ import annotations

import pytest

from .conftest import CONF, NAME, LiveServer, image_part, random_image

GREEDY = {"sampling": False, "num_beams": 1, "repetition_penalty": 1.0, "id0_quirk": False}
# runnable checkpoints only (o2.6-tts/_checkpoint is an archive the speech tests assemble)
OTHERS = sorted(p.parent.name for p in CONF.glob("*/_checkpoint")
                if p.parent.name not in ("2.6", "4.5") and any(p.glob("*.safetensors")))


@pytest.mark.parametrize("version", OTHERS)
def test_release_is_served(version):
    import minicpmv

    model = minicpmv.load(CONF / version / "_checkpoint", dtype="float32")
    img = random_image(4, (200, 150))
    with LiveServer(model, max_batch_size=2, max_model_len=2048) as srv:
        client = srv.client()
        for content, lib in [("Hello", ["Hello"]),
                             ([image_part(img), {"type": "text", "text": "What?"}], [img, "What?"])]:
            resp = client.chat.completions.create(model=NAME, messages=[{"role": "user", "content": content}],
                                                  max_tokens=8, temperature=0)
            expected = model.chat([{"role": "user", "content": lib}], max_new_tokens=8, **GREEDY)
            assert resp.choices[0].message.content.strip() == expected
        srv.wait_idle()
