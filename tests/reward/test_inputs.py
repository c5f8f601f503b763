"""Bad inputs to the in-process API raise typed errors with clear messages."""

import io

import pytest
from PIL import Image

from rlaifv.reward import AnswerError, ImageError, InvalidInputError
from rlaifv.reward.images import ImageLimits, decode_base64, decode_image, load_image
from rlaifv.reward.sampling import SamplingParams


def _png(size=(16, 16)) -> bytes:
    buffer = io.BytesIO()
    Image.new("RGB", size, (1, 2, 3)).save(buffer, format="PNG")
    return buffer.getvalue()


def test_empty_answer_list(tiny_pair, red_png):
    with pytest.raises(AnswerError, match="non-empty list") as info:
        tiny_pair.score(red_png, "What is in the image?", [])
    assert info.value.param == "answers"


@pytest.mark.parametrize(
    ("answers", "param"), [([""], "answers[0]"), (["   "], "answers[0]"), (["ok", None], "answers[1]")]
)
def test_empty_or_non_string_answers(tiny_pair, red_png, answers, param):
    with pytest.raises(AnswerError, match="non-empty strings") as info:
        tiny_pair.score(red_png, "What is in the image?", answers)
    assert info.value.param == param


def test_a_single_string_is_not_an_answer_list(tiny_pair, red_png):
    with pytest.raises(AnswerError, match="list of strings"):
        tiny_pair.score(red_png, "What is in the image?", "a red circle.")


@pytest.mark.parametrize("n", [0, -3, 2.5])
def test_n_below_one(tiny_pair, red_png, n):
    with pytest.raises(InvalidInputError, match="n must be a positive integer"):
        tiny_pair.best_of_n(red_png, "What is in the image?", n=n)


def test_non_image_bytes(tiny_pair):
    with pytest.raises(ImageError, match="not a recognised image"):
        tiny_pair.score(b"definitely not an image", "What?", ["a cat."])


def test_empty_question(tiny_pair, red_png):
    with pytest.raises(InvalidInputError, match="question must not be empty"):
        tiny_pair.score(red_png, "  ", ["a cat."])


def test_truncated_png():
    data = _png((64, 64))
    with pytest.raises(ImageError, match="could not be decoded"):
        decode_image(data[: len(data) // 2])


def test_decompression_bomb_rejected_before_decoding():
    # A 30000x30000 image declared in a tiny PNG header: rejected on the header alone.
    bomb = io.BytesIO()
    Image.new("1", (30000, 30000)).save(bomb, format="PNG")
    assert len(bomb.getvalue()) < 200_000
    with pytest.raises(ImageError, match="pixel limit"):
        decode_image(bomb.getvalue())
    # Below PIL's own guard, our configured limit still applies, naming the size.
    big = io.BytesIO()
    Image.new("1", (5000, 5000)).save(big, format="PNG")
    with pytest.raises(ImageError, match="5000x5000"):
        decode_image(big.getvalue(), ImageLimits(max_pixels=1000 * 1000))


def test_byte_limit_and_format_allow_list():
    data = _png()
    with pytest.raises(ImageError, match="over the limit"):
        decode_image(data, ImageLimits(max_bytes=10))
    with pytest.raises(ImageError, match="format PNG is not allowed"):
        decode_image(data, ImageLimits(allowed_formats=frozenset({"JPEG"})))


def test_data_urls_and_base64():
    import base64

    data = _png()
    assert load_image("data:image/png;base64," + base64.b64encode(data).decode()).size == (16, 16)
    assert load_image(base64.b64encode(data).decode()).size == (16, 16)
    assert load_image("DATA:Image/PNG;Base64," + base64.b64encode(data).decode()).size == (16, 16)  # RFC 3986
    with pytest.raises(ImageError, match="not valid base64"):
        decode_base64("data:image/png;base64,@@@")
    with pytest.raises(ImageError, match="only base64"):
        decode_base64("data:image/png,rawdata")


def test_path_and_pil(tmp_path):
    path = tmp_path / "x.png"
    path.write_bytes(_png())
    assert load_image(path).size == (16, 16)
    assert load_image(str(path)).mode == "RGB"
    assert load_image(Image.new("L", (4, 4))).mode == "RGB"
    with pytest.raises(ImageError, match="unsupported image type"):
        load_image(42)


def test_a_16_bit_grey_png_keeps_its_tones():
    """PIL's convert("RGB") clips 16-bit grey at 255 (most of the image white); it is scaled to 8 bits instead."""
    import io

    import numpy as np
    from PIL import Image

    gradient = (np.arange(64 * 256).reshape(64, 256) * 4).astype(np.uint16)
    buffer = io.BytesIO()
    Image.fromarray(gradient).save(buffer, format="PNG")
    assert Image.open(io.BytesIO(buffer.getvalue())).mode == "I;16"
    red = np.asarray(decode_image(buffer.getvalue()))[..., 0]
    assert (red == gradient >> 8).all() and (red == 255).mean() < 0.01


def _jpeg_with_orientation(image: Image.Image, orientation: int) -> bytes:
    exif = Image.Exif()
    exif[0x0112] = orientation
    buffer = io.BytesIO()
    image.save(buffer, format="JPEG", quality=95, exif=exif)
    return buffer.getvalue()


def test_a_photo_stored_sideways_is_turned_upright_by_its_exif_orientation():
    """Phones store the sensor's pixels with a rotation tag; the model must see what viewers show (transformers'
    `load_image` and vLLM apply the tag too)."""
    import numpy as np
    from PIL import ImageOps

    stored = Image.new("RGB", (64, 32), (0, 0, 255))
    stored.paste((255, 0, 0), (0, 0, 16, 32))  # red on the stored left edge
    data = _jpeg_with_orientation(stored, 6)  # 6: the viewer turns it 90 degrees clockwise
    shown = decode_image(data)
    assert shown.size == (32, 64)
    pixels = np.asarray(shown).astype(int)
    assert pixels[4, 16, 0] > 200 and pixels[60, 16, 2] > 200  # red now on top, blue below
    assert load_image(data).size == (32, 64) and load_image(Image.open(io.BytesIO(data))).size == (32, 64)
    assert np.array_equal(np.asarray(shown), np.asarray(ImageOps.exif_transpose(Image.open(io.BytesIO(data)))))
    plain = _jpeg_with_orientation(stored, 1)
    assert decode_image(plain).size == (64, 32)


@pytest.mark.filterwarnings("ignore:Corrupt EXIF data")
def test_a_damaged_exif_block_or_an_unknown_orientation_shows_the_image_as_stored():
    stored = Image.new("RGB", (16, 8), (0, 128, 0))
    damaged = bytearray(_jpeg_with_orientation(stored, 6))
    start = damaged.find(b"Exif")
    damaged[start + 10 : start + 30] = b"\xff" * 20  # the TIFF header and first entries overwritten
    assert decode_image(bytes(damaged)).size == (16, 8)
    assert decode_image(_jpeg_with_orientation(stored, 9)).size == (16, 8)


@pytest.mark.parametrize("mode", ["RGBA", "LA", "P"])
def test_transparent_pixels_are_laid_over_white(mode):
    """vLLM's convention: a logo on a transparent background is seen on white, not on the black under it."""
    import numpy as np

    rgba = Image.new("RGBA", (8, 8), (0, 0, 0, 0))
    rgba.paste((200, 30, 30, 255), (0, 0, 4, 8))
    image = (
        rgba if mode == "RGBA" else rgba.convert(mode) if mode == "LA" else rgba.convert("P", palette=Image.ADAPTIVE)
    )
    if mode == "P":
        image.info["transparency"] = image.getpixel((7, 7))
    buffer = io.BytesIO()
    image.save(buffer, format="PNG")
    pixels = np.asarray(decode_image(buffer.getvalue()))
    assert (pixels[:, 4:] == 255).all()
    assert (pixels[:, :4] != 255).any()


def test_a_16_bit_grey_png_with_a_transparent_value_is_laid_over_white():
    import numpy as np

    values = np.full((4, 8), 1000, dtype=np.uint16)
    values[:, 4:] = 40000  # the tRNS value: transparent
    buffer = io.BytesIO()
    Image.fromarray(values).save(buffer, format="PNG", transparency=40000)
    assert Image.open(io.BytesIO(buffer.getvalue())).info.get("transparency") == 40000
    pixels = np.asarray(decode_image(buffer.getvalue()))
    assert (pixels[:, 4:] == 255).all() and (pixels[:, :4] == 1000 >> 8).all()


def _with_xmp_orientation(image: Image.Image, value: str) -> bytes:
    """An orientation only in the XMP, in a form Pillow reads but `exif_transpose` leaves in place."""
    xmp = (
        '<x:xmpmeta xmlns:x="adobe:ns:meta/"><rdf:RDF xmlns:rdf="http://www.w3.org/1999/02/22-rdf-syntax-ns#">'
        f'<rdf:Description xmlns:tiff="http://ns.adobe.com/tiff/1.0/"><tiff:Orientation>{value}</tiff:Orientation>'
        "</rdf:Description></rdf:RDF></x:xmpmeta>"
    )
    buffer = io.BytesIO()
    image.save(buffer, format="JPEG", quality=95, xmp=xmp.encode())
    return buffer.getvalue()


@pytest.mark.filterwarnings("ignore:Corrupt EXIF data")
def test_a_decoded_image_is_plain_pixels_and_converting_it_again_changes_nothing():
    """The service decodes an image, then the model pair converts what it got once more: an orientation left in
    the XMP turned the image a second time (the model saw it 90 degrees off), and a damaged EXIF block carried
    over raised a SyntaxError in the second pass (a 500 on every endpoint)."""
    import numpy as np

    stored = Image.new("RGB", (64, 32), (0, 0, 255))
    stored.paste((255, 0, 0), (0, 0, 16, 32))
    once = decode_image(_with_xmp_orientation(stored, "6 "))
    assert once.size == (32, 64) and not once.info
    assert np.array_equal(np.asarray(load_image(once)), np.asarray(once))

    buffer = io.BytesIO()
    Image.new("RGB", (16, 8), (200, 30, 30)).save(buffer, "JPEG", exif=b"Exif\x00\x00" + b"\xff" * 60)
    decoded = decode_image(buffer.getvalue())
    assert load_image(decoded).size == (16, 8)
    handed = Image.new("RGB", (16, 8))
    handed.info["exif"] = b"Exif\x00\x00" + b"\xff" * 60  # a PIL image a caller made: shown as stored
    assert load_image(handed).size == (16, 8)


def test_a_png_with_a_damaged_exif_block_shows_the_image_as_stored():
    buffer = io.BytesIO()
    Image.new("RGB", (16, 8), (0, 128, 0)).save(buffer, "PNG", exif=b"Exif\x00\x00" + b"\xff" * 60)
    assert decode_image(buffer.getvalue()).size == (16, 8)  # was "could not be decoded"


def test_a_phone_photo_with_a_second_image_mpo_is_read_as_its_jpeg():
    """Phones' Ultra HDR and gain-map photos are JPEGs with more images after the photo (Pillow: MPO); they were
    refused as "format MPO is not allowed" wherever JPEG was."""
    import numpy as np

    photo, gain = Image.new("RGB", (40, 30), (250, 0, 0)), Image.new("RGB", (20, 15), (0, 0, 250))
    buffer = io.BytesIO()
    photo.save(buffer, "MPO", save_all=True, append_images=[gain], quality=95)
    assert Image.open(io.BytesIO(buffer.getvalue())).format == "MPO"
    shown = decode_image(buffer.getvalue())
    assert shown.size == (40, 30) and np.asarray(shown)[..., 0].mean() > 200
    with pytest.raises(ImageError, match="MPO is not allowed"):
        decode_image(buffer.getvalue(), ImageLimits(allowed_formats=frozenset({"PNG"})))


@pytest.mark.parametrize(("size", "fragment"), [((1, 5000), "aspect ratio over 20"), ((21, 1), "aspect ratio")])
def test_a_long_thin_image_is_refused_from_its_header(tmp_path, size, fragment):
    """The Python API had no aspect bound: a 1 x 30000 PNG took 1.2 GB when resized to the model's square."""
    buffer = io.BytesIO()
    Image.new("RGB", size).save(buffer, "PNG")
    for image in (buffer.getvalue(), Image.new("RGB", size)):
        with pytest.raises(ImageError, match=fragment):
            load_image(image)
    assert load_image(Image.new("RGB", (20, 1))).size == (20, 1)
    assert decode_image(buffer.getvalue(), ImageLimits(max_aspect=6000)).size == size


def test_odd_pil_images_are_image_errors_not_crashes():
    with pytest.raises(ImageError, match="no pixels"):
        load_image(Image.new("RGB", (0, 0)))
    closed = Image.new("RGB", (8, 8))
    closed.close()
    with pytest.raises(ImageError, match="could not be converted") as info:
        load_image(closed, param="images[2]")
    assert info.value.param == "images[2]"


def test_an_8_bit_grey_image_in_mode_i_keeps_its_tones():
    """Mode "I" with 8-bit values was shifted as if 16-bit: scored as all black."""
    import numpy as np

    grey = Image.new("L", (8, 8), 200).convert("I")
    assert np.asarray(load_image(grey))[..., 0].min() == 200


def test_a_mistyped_path_is_named_as_a_path(tmp_path):
    """A path that does not exist was reported as "not valid base64" (or "not a recognised image")."""
    for text, fragment in (
        (str(tmp_path / "missing.png"), "does not exist"),
        ("photos/cat.jpg", "does not exist"),
        (str(tmp_path / "missing"), "does not exist"),
        (str(tmp_path), "is not a file"),
    ):
        with pytest.raises(ImageError, match=fragment):
            load_image(text)
    with pytest.raises(ImageError, match="base64"):
        load_image("not an image at all")


def test_threads_sharing_a_pair_take_turns(tiny_pair, red_png):
    """Calls from several threads at once failed (26 of 48): shared-prefix attention switches the models'
    attention implementation for the length of a call, and one call restored another's."""
    from concurrent.futures import ThreadPoolExecutor

    question, answers = "What is in the image?", ["a red square.", "a blue circle.", "two dogs."]
    alone = tiny_pair.score(red_png, question, answers).rewards
    sampled = tiny_pair.best_of_n(red_png, question, n=3, max_tokens=8, seed=5).rewards

    def call(i: int) -> list[float]:
        if i % 2:
            return tiny_pair.best_of_n(red_png, question, n=3, max_tokens=8, seed=5).rewards
        return tiny_pair.score(red_png, question, answers).rewards

    with ThreadPoolExecutor(4) as pool:
        results = list(pool.map(call, range(16)))
    for i, rewards in enumerate(results):
        assert rewards == pytest.approx(sampled if i % 2 else alone, abs=1e-5)
    assert tiny_pair.labeler.lock is tiny_pair._lock  # the claims judge, reachable as `pair.labeler`, takes turns too


def test_answers_past_the_models_positions_are_refused_in_process(tiny_pair, red_png):
    """The service refused them; the Python API scored a 1602-token answer on a 256-position model and sampled
    600-token answers past the positions."""
    from rlaifv.reward import ContextLengthError

    assert tiny_pair.max_positions == 512
    long = "square " * 600
    with pytest.raises(ContextLengthError, match="exceed the model's 512 positions") as info:
        tiny_pair.score(red_png, "What is in the image?", ["a red square.", long])
    assert info.value.param == "answers[1]"
    with pytest.raises(ContextLengthError, match=r"max_tokens \(600\)") as info:
        tiny_pair.best_of_n(red_png, "What is in the image?", n=2, max_tokens=600)
    assert info.value.param == "max_tokens"
    fitted = tiny_pair.best_of_n(
        red_png, "What is in the image?", n=1, sampling=SamplingParams(temperature=0.0, logit_bias={2: -100})
    )
    assert fitted.best.num_tokens <= 64  # the default max_tokens fits: shortened only if it had to be


def test_in_process_arguments_are_checked_and_named(tiny_pair, red_png):
    checks = [
        (dict(n=True), "n"),
        (dict(n=1025), "n"),
        (dict(seed=2**70), "seed"),
        (dict(seed=-1), "seed"),
        (dict(sampling=SamplingParams(), temperature=0.0), "temperature"),
        (dict(reward={"mode": "vibes"}), "reward"),
        (dict(reward=3), "reward"),
    ]
    for kwargs, param in checks:
        with pytest.raises(InvalidInputError) as info:
            base = {"n": 1} if "sampling" in kwargs else {"n": 1, "max_tokens": 4}
            tiny_pair.best_of_n(red_png, "What is in the image?", **base | kwargs)
        assert info.value.param == param, kwargs
    with pytest.raises(InvalidInputError, match="question must be a string") as info:
        tiny_pair.score(red_png, 5, ["a red square."])
    assert info.value.param == "question"
    as_dict = tiny_pair.score(red_png, "What is in the image?", ["a red square."], reward={"normalize": "sum"})
    assert as_dict.candidates[0].reward == pytest.approx(
        tiny_pair.score(red_png, "What is in the image?", ["a red square."]).candidates[0].reward
        * as_dict.candidates[0].num_tokens,
        rel=1e-5,
    )


def _progressive_with_repeated_scans(extra: int, size: int = 256) -> bytes:
    """A progressive JPEG whose last scan is repeated `extra` times: each repeat costs a pass over the image."""
    import re

    buffer = io.BytesIO()
    Image.new("L", (size, size), 128).save(buffer, "JPEG", progressive=True)
    data = buffer.getvalue()
    last = data.rindex(b"\xff\xda")
    length = int.from_bytes(data[last + 2 : last + 4], "big")
    following = re.compile(rb"\xff[^\x00\xd0-\xd7]").search(data, last + 2 + length)
    assert following is not None
    scan = data[last : following.start()]
    eoi = data.rindex(b"\xff\xd9")
    return data[:eoi] + scan * extra + data[eoi:]


def test_jpeg_scans_are_counted_from_the_markers_as_libjpeg_writes_them():
    """libjpeg's scripts: 1 scan baseline, 10 progressive in colour, 6 in grey; a segment holding a JPEG of its own
    (an EXIF thumbnail; here an ICC block) is skipped by its length; an MPO's second image is not the first's."""
    from rlaifv.reward.images import jpeg_scans

    def jpeg(image: Image.Image, **options) -> bytes:
        buffer = io.BytesIO()
        image.save(buffer, "JPEG", **options)
        return buffer.getvalue()

    colour = Image.new("RGB", (64, 48), (200, 30, 30))
    assert jpeg_scans(jpeg(colour)) == 1
    assert jpeg_scans(jpeg(colour, progressive=True)) == 10
    assert jpeg_scans(jpeg(colour.convert("L"), progressive=True)) == 6
    inside = jpeg(colour, progressive=True)  # a segment's payload holding scan markers (as an EXIF thumbnail)
    with_payload = jpeg(colour, icc_profile=inside)
    assert inside in with_payload and jpeg_scans(with_payload) == 1
    buffer = io.BytesIO()
    colour.save(buffer, "MPO", save_all=True, append_images=[colour], progressive=True)
    assert jpeg_scans(buffer.getvalue()) == 10
    assert jpeg_scans(_progressive_with_repeated_scans(50)) == 56


def test_a_jpeg_of_many_scans_is_refused_before_decoding():
    """A few kilobytes of repeated scans kept a CPU busy for minutes at 4096x4096, within every byte and pixel limit:
    over 100 scans is refused from the markers (libjpeg-turbo's advice for untrusted input)."""
    from rlaifv.reward.images import check_image

    fine = _progressive_with_repeated_scans(94)  # 6 + 94 = 100
    assert decode_image(fine).size == (256, 256)
    bomb = _progressive_with_repeated_scans(95)
    assert Image.open(io.BytesIO(bomb)).size == (256, 256) and len(bomb) < 20_000
    first_scan = bomb.index(b"\xff\xda")
    junk = bomb[:first_scan] + b"\x00" + bomb[first_scan:]  # libjpeg skips it and decodes every scan after
    for data in (bomb, junk):
        for check in (decode_image, check_image):
            with pytest.raises(ImageError, match="JPEG with over 100 scans") as info:
                check(data, param="images[0]")
            assert info.value.param == "images[0]"
