"""Bad inputs to the in-process API raise typed errors with clear messages."""

import io

import pytest
from PIL import Image

from rlaifv.reward import AnswerError, ImageError, InvalidInputError
from rlaifv.reward.images import ImageLimits, decode_base64, decode_image, load_image


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
